//! `wm-bench suite`: every scenario against wm-host and against the native
//! baseline, in one run, with the same pinning and the same client; writes
//! the figures and their ratios to a Markdown file.
//!
//! Servers run on `server_cpu` (`taskset`), this process (the client) and
//! `wrk` on `client_cpu`. Every scenario starts fresh servers.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{self, EchoConfig, EchoReport, Proto};
use crate::sys;

pub struct SuiteOpts {
    pub out: Option<PathBuf>,
    pub warmup: Duration,
    pub duration: Duration,
    /// Idle websocket (and text) connection counts to measure.
    pub idle: Vec<usize>,
    pub server_cpu: usize,
    pub client_cpu: usize,
    /// Run only the scenarios whose name contains this.
    pub only: Option<String>,
    /// Runs per side of each load scenario, interleaved; the best is kept.
    pub repeat: usize,
}

/// The release binaries next to this one.
struct Bins {
    host: PathBuf,
    baseline: PathBuf,
    echo_plugin: PathBuf,
    hello_plugin: PathBuf,
}

impl Bins {
    fn find() -> Result<Bins, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = exe.parent().ok_or("no folder for this binary")?;
        let b = Bins {
            host: dir.join("wm-host"),
            baseline: dir.join("wm-baseline"),
            echo_plugin: dir.join("libecho_plugin.so"),
            hello_plugin: dir.join("libbench_hello_plugin.so"),
        };
        for p in [&b.host, &b.baseline, &b.echo_plugin, &b.hello_plugin] {
            if !p.exists() {
                return Err(format!(
                    "{} is missing: run `cargo build --release --workspace` first",
                    p.display()
                ));
            }
        }
        Ok(b)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Wm,
    Base,
}

#[derive(Clone, Copy)]
enum Service {
    Echo(Proto),
    Hello,
}

impl Service {
    fn scheme(self) -> &'static str {
        match self {
            Service::Echo(p) => p.scheme(),
            Service::Hello => "http",
        }
    }
}

/// A running server under test; stopped on drop.
enum Server {
    Wm {
        host: PathBuf,
        dir: PathBuf,
        config: PathBuf,
        pid: u32,
    },
    Base {
        child: Child,
    },
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl Server {
    fn start(
        side: Side,
        svc: Service,
        port: u16,
        bins: &Bins,
        cpu: usize,
    ) -> Result<Server, String> {
        let cpu = cpu.to_string();
        match side {
            Side::Wm => {
                let dir =
                    std::env::temp_dir().join(format!("wm-bench-{}-{port}", std::process::id()));
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                let config = dir.join("wm.toml");
                let plugin = match svc {
                    Service::Echo(_) => &bins.echo_plugin,
                    Service::Hello => &bins.hello_plugin,
                };
                let text = format!(
                    "[host]\nruntime_dir = \"run\"\nstop_timeout = \"2s\"\n\n\
                     [[worker]]\nname = \"bench\"\nlisten = \"{}://127.0.0.1:{port}\"\n\
                     count = 1\nplugin = \"{}\"\n",
                    svc.scheme(),
                    plugin.display()
                );
                std::fs::write(&config, text).map_err(|e| e.to_string())?;
                let out = Command::new("taskset")
                    .args(["-c", &cpu])
                    .arg(&bins.host)
                    .args(["start", "-d", "-c"])
                    .arg(&config)
                    .stdin(Stdio::null())
                    .output()
                    .map_err(|e| format!("taskset: {e}"))?;
                let mut server = Server::Wm {
                    host: bins.host.clone(),
                    dir,
                    config,
                    pid: 0,
                };
                if !out.status.success() {
                    return Err(format!(
                        "wm-host start failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                let pid = server
                    .wm_status()
                    .and_then(|s| s["workers"][0]["pid"].as_u64())
                    .ok_or("wm-host status names no worker")?;
                if let Server::Wm { pid: p, .. } = &mut server {
                    *p = pid as u32;
                }
                Ok(server)
            }
            Side::Base => {
                let proto = match svc {
                    Service::Echo(p) => p.scheme(),
                    Service::Hello => "http",
                };
                let child = Command::new("taskset")
                    .args(["-c", &cpu])
                    .arg(&bins.baseline)
                    .args(["--proto", proto, "--listen"])
                    .arg(format!("127.0.0.1:{port}"))
                    .stdin(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("taskset: {e}"))?;
                let server = Server::Base { child };
                let end = Instant::now() + Duration::from_secs(10);
                while TcpStream::connect(("127.0.0.1", port)).is_err() {
                    if Instant::now() > end {
                        return Err("wm-baseline did not listen within 10 s".into());
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Ok(server)
            }
        }
    }

    /// The process doing the work: the worker, or the baseline itself.
    fn pid(&self) -> u32 {
        match self {
            Server::Wm { pid, .. } => *pid,
            Server::Base { child } => child.id(),
        }
    }

    fn wm_status(&self) -> Option<Value> {
        let Server::Wm { host, config, .. } = self else {
            return None;
        };
        let out = Command::new(host)
            .args(["status", "--json", "-c"])
            .arg(config)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())?
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match self {
            Server::Wm {
                host, dir, config, ..
            } => {
                let _ = Command::new(&*host)
                    .args(["stop", "-c"])
                    .arg(&*config)
                    .stdin(Stdio::null())
                    .output();
                let _ = std::fs::remove_dir_all(&*dir);
            }
            Server::Base { child } => {
                // SAFETY: signals our own child by its pid.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Echo {
        proto: Proto,
        conns: usize,
        inflight: usize,
        size: usize,
    },
    Http {
        conns: usize,
    },
    Idle {
        proto: Proto,
        conns: usize,
    },
}

struct Scenario {
    name: String,
    kind: Kind,
}

fn scenarios(idle: &[usize]) -> Vec<Scenario> {
    let echo = |proto, conns, inflight, size: usize| {
        let size_s = if size >= 1024 {
            format!("{} KiB", size / 1024)
        } else {
            format!("{size} B")
        };
        Scenario {
            name: format!(
                "{} echo {conns} conns × {inflight} in flight × {size_s}",
                proto_name(proto)
            ),
            kind: Kind::Echo {
                proto,
                conns,
                inflight,
                size,
            },
        }
    };
    let mut v = vec![
        echo(Proto::Text, 100, 16, 32),
        echo(Proto::Text, 100, 1, 32),
        echo(Proto::Frame, 100, 16, 32),
        echo(Proto::Websocket, 100, 16, 32),
        echo(Proto::Websocket, 100, 16, 4096),
        echo(Proto::Websocket, 100, 1, 32),
        echo(Proto::Websocket, 1000, 1, 32),
        Scenario {
            name: "HTTP hello keep-alive, wrk 1 thread × 100 conns".into(),
            kind: Kind::Http { conns: 100 },
        },
    ];
    for &n in idle {
        for proto in [Proto::Websocket, Proto::Text] {
            v.push(Scenario {
                name: format!("idle {} connections × {n}", proto_name(proto)),
                kind: Kind::Idle { proto, conns: n },
            });
        }
    }
    v
}

fn proto_name(p: Proto) -> &'static str {
    match p {
        Proto::Text => "text",
        Proto::Frame => "frame",
        Proto::Websocket => "websocket",
    }
}

/// One side's figures for one scenario.
#[derive(Clone, Default)]
pub struct Figures {
    /// Messages (or requests) per second.
    pub rate: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    pub errors: u64,
    pub wrong: u64,
    /// Server CPU seconds over the measured window.
    pub cpu_s: f64,
    /// Messages (or requests) in the measured window.
    pub msgs: u64,
    /// CPU-seconds the server's core spent on other processes meanwhile.
    pub other_cpu_s: f64,
    /// Rates of every run, when repeated.
    pub runs: Vec<f64>,
    /// Idle: RSS growth per connection, bytes.
    pub rss_per_conn: f64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub open: usize,
    pub note: String,
}

impl Figures {
    fn per_cpu_s(&self) -> f64 {
        if self.cpu_s > 0.0 {
            self.msgs as f64 / self.cpu_s
        } else {
            0.0
        }
    }
}

struct Outcome {
    scenario: Scenario,
    wm: Result<Figures, String>,
    base: Result<Figures, String>,
    client_cmd: String,
}

pub fn run(opts: SuiteOpts) -> Result<(), String> {
    let bins = Bins::find()?;
    let nproc = sys::online_cpus();
    let max_idle = opts.idle.iter().copied().max().unwrap_or(0) as u64;
    let nofile = sys::raise_nofile(2 * max_idle + 4096);
    sys::pin_to_cpu(opts.client_cpu)
        .map_err(|e| format!("pinning the client to CPU {}: {e}", opts.client_cpu))?;
    let wrk = has_wrk();
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for sc in scenarios(&opts.idle) {
        if let Some(only) = &opts.only {
            if !sc.name.contains(only.as_str()) {
                continue;
            }
        }
        eprintln!("== {}", sc.name);
        if let Kind::Idle { conns, .. } = sc.kind {
            if conns as u64 + 1024 > nofile {
                let e = format!(
                    "skipped: needs {} open files per process, RLIMIT_NOFILE is {nofile} \
                     (raising the hard limit needs CAP_SYS_RESOURCE)",
                    conns + 1024
                );
                eprintln!("   {e}");
                outcomes.push(Outcome {
                    scenario: sc,
                    wm: Err(e.clone()),
                    base: Err(e),
                    client_cmd: String::new(),
                });
                continue;
            }
        }
        let mut client_cmd = String::new();
        let runs = match sc.kind {
            Kind::Idle { .. } => 1,
            _ => opts.repeat.max(1),
        };
        // A run during which other processes took more than this of the
        // server's core is disturbed: it counts only when no other did not,
        // and up to two more runs are made to get an undisturbed one.
        let limit = 0.1 * opts.duration.as_secs_f64();
        let clean = |r: &Result<Figures, String>| r.as_ref().is_ok_and(|f| f.other_cpu_s <= limit);
        let mut pair: Vec<Result<Figures, String>> =
            vec![Err("not run".into()), Err("not run".into())];
        for round in 0..runs + 2 {
            if round >= runs && (pair.iter().all(clean) || matches!(sc.kind, Kind::Idle { .. })) {
                break;
            }
            for (i, side) in [Side::Wm, Side::Base].into_iter().enumerate() {
                if round >= runs && clean(&pair[i]) {
                    continue;
                }
                let r = run_one(&sc, side, &bins, &opts, wrk, &mut client_cmd);
                match &r {
                    Ok(f) => eprintln!("   {:8} {}", side_name(side), summary(&sc.kind, f)),
                    Err(e) => eprintln!("   {:8} FAILED: {e}", side_name(side)),
                }
                let prev = std::mem::replace(&mut pair[i], Err(String::new()));
                pair[i] = best(prev, r, limit);
            }
        }
        let base = pair.pop().unwrap();
        let wm = pair.pop().unwrap();
        outcomes.push(Outcome {
            scenario: sc,
            wm,
            base,
            client_cmd,
        });
    }
    let took = started.elapsed();
    let md = report(&opts, &outcomes, nproc, nofile, took);
    println!("{md}");
    if let Some(out) = &opts.out {
        std::fs::write(out, &md).map_err(|e| format!("{}: {e}", out.display()))?;
        eprintln!("wrote {} ({:.0} s)", out.display(), took.as_secs_f64());
    }
    Ok(())
}

/// The better of two runs: undisturbed first (see `limit`), then by rate;
/// remembers every run's rate.
fn best(
    a: Result<Figures, String>,
    b: Result<Figures, String>,
    limit: f64,
) -> Result<Figures, String> {
    let key = |f: &Figures| (f.other_cpu_s <= limit, f.rate);
    match (a, b) {
        (Ok(mut a), Ok(mut b)) => {
            let mut runs = std::mem::take(&mut a.runs);
            runs.push(b.rate);
            if key(&b) > key(&a) {
                b.runs = runs;
                Ok(b)
            } else {
                a.runs = runs;
                Ok(a)
            }
        }
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(mut b)) => {
            b.runs = vec![b.rate];
            Ok(b)
        }
        (Err(_), Err(e)) => Err(e),
    }
}

fn side_name(s: Side) -> &'static str {
    match s {
        Side::Wm => "wm-host",
        Side::Base => "baseline",
    }
}

fn summary(kind: &Kind, f: &Figures) -> String {
    match kind {
        Kind::Idle { .. } => format!(
            "{} open, {} errors, {:.0} B/conn (RSS {:.1} → {:.1} MiB)",
            f.open,
            f.errors,
            f.rss_per_conn,
            f.rss_before as f64 / 1048576.0,
            f.rss_after as f64 / 1048576.0
        ),
        _ => format!(
            "{:.0}/s, p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs, {} errors, {} wrong, \
             server {:.2} CPU-s ({:.0}/CPU-s), others on its core {:.2} CPU-s",
            f.rate,
            f.p50_us,
            f.p99_us,
            f.max_us,
            f.errors,
            f.wrong,
            f.cpu_s,
            f.per_cpu_s(),
            f.other_cpu_s
        ),
    }
}

fn run_one(
    sc: &Scenario,
    side: Side,
    bins: &Bins,
    opts: &SuiteOpts,
    wrk: bool,
    client_cmd: &mut String,
) -> Result<Figures, String> {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    match sc.kind {
        Kind::Echo {
            proto,
            conns,
            inflight,
            size,
        } => {
            let server = Server::start(side, Service::Echo(proto), port, bins, opts.server_cpu)?;
            let pid = server.pid();
            let cfg = EchoConfig {
                proto,
                addr,
                conns,
                inflight,
                size,
                warmup: opts.warmup,
                duration: opts.duration,
            };
            *client_cmd = format!(
                "wm-bench echo --proto {} --addr 127.0.0.1:PORT --conns {conns} --inflight {inflight} \
                 --size {size} --warmup {} --duration {}",
                proto.scheme(),
                opts.warmup.as_secs_f64(),
                opts.duration.as_secs_f64()
            );
            let core = opts.server_cpu;
            let (mut c0, mut c1) = ((0.0, 0.0), (0.0, 0.0));
            let r = client::run_echo(
                &cfg,
                || c0 = cpu_snapshot(pid, core),
                || c1 = cpu_snapshot(pid, core),
            )
            .map_err(|e| e.to_string())?;
            drop(server);
            let mut f = echo_figures(&r, c1.0 - c0.0);
            f.other_cpu_s = ((c1.1 - c0.1) - f.cpu_s).max(0.0);
            Ok(f)
        }
        Kind::Http { conns } => {
            if !wrk {
                return Err("wrk is not installed (apt-get install wrk)".into());
            }
            let server = Server::start(side, Service::Hello, port, bins, opts.server_cpu)?;
            let pid = server.pid();
            let url = format!("http://127.0.0.1:{port}/");
            let cpu = opts.client_cpu.to_string();
            let wrk_args = |secs: f64| -> Vec<String> {
                vec![
                    "-c".into(),
                    cpu.clone(),
                    "wrk".into(),
                    "-t1".into(),
                    format!("-c{conns}"),
                    format!("-d{}s", secs.ceil() as u64),
                    "--latency".into(),
                    url.clone(),
                ]
            };
            *client_cmd = format!(
                "taskset -c {cpu} wrk -t1 -c{conns} -d{}s --latency http://127.0.0.1:PORT/",
                opts.duration.as_secs_f64().ceil()
            );
            if !opts.warmup.is_zero() {
                let _ = Command::new("taskset")
                    .args(wrk_args(opts.warmup.as_secs_f64()))
                    .output();
            }
            let c0 = cpu_snapshot(pid, opts.server_cpu);
            let out = Command::new("taskset")
                .args(wrk_args(opts.duration.as_secs_f64()))
                .output()
                .map_err(|e| format!("wrk: {e}"))?;
            let c1 = cpu_snapshot(pid, opts.server_cpu);
            drop(server);
            let text = String::from_utf8_lossy(&out.stdout);
            let mut f =
                parse_wrk(&text).ok_or_else(|| format!("unreadable wrk output:\n{text}"))?;
            f.cpu_s = c1.0 - c0.0;
            f.other_cpu_s = ((c1.1 - c0.1) - f.cpu_s).max(0.0);
            Ok(f)
        }
        Kind::Idle { proto, conns } => {
            let server = Server::start(side, Service::Echo(proto), port, bins, opts.server_cpu)?;
            let pid = server.pid();
            let sources = auto_sources(conns);
            *client_cmd = format!(
                "wm-bench idle --proto {} --addr 127.0.0.1:PORT --conns {conns} --sources {sources} --server-pid PID",
                proto.scheme()
            );
            let probe = || match server.wm_status() {
                Some(st) => {
                    let w = &st["workers"][0];
                    format!(
                        "wm-host status meanwhile: {} connections, rss_bytes {:.1} MiB",
                        w["stats"]["connections"],
                        w["rss_bytes"].as_f64().unwrap_or(0.0) / 1048576.0
                    )
                }
                None => String::new(),
            };
            let f = measure_idle(proto, addr, conns, sources, pid, &probe)?;
            drop(server);
            Ok(f)
        }
    }
}

/// (CPU-seconds of `pid`, busy seconds of core `core`).
fn cpu_snapshot(pid: u32, core: usize) -> (f64, f64) {
    (
        sys::cpu_seconds(pid).unwrap_or(0.0),
        sys::core_busy_seconds(core).unwrap_or(0.0),
    )
}

/// Source addresses for `conns` client connections: several, and enough
/// that none runs out of ephemeral ports.
pub fn auto_sources(conns: usize) -> usize {
    conns.div_ceil(16_000).max(4)
}

/// Opens one warm connection, reads RSS, opens `conns` more, reads it again.
pub fn measure_idle(
    proto: Proto,
    addr: SocketAddr,
    conns: usize,
    sources: usize,
    pid: u32,
    probe: &dyn Fn() -> String,
) -> Result<Figures, String> {
    let warm =
        client::open_idle(proto, addr, 1, 1, Duration::from_secs(10)).map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(300));
    let before = sys::rss_bytes(pid).ok_or("server is gone")?;
    let set = client::open_idle(proto, addr, conns, sources, Duration::from_secs(120))
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_millis(500));
    let after = sys::rss_bytes(pid).ok_or("server is gone")?;
    let probed = probe();
    let f = Figures {
        rss_per_conn: after.saturating_sub(before) as f64 / set.open.max(1) as f64,
        rss_before: before,
        rss_after: after,
        open: set.open,
        errors: set.errors + warm.errors,
        wrong: set.wrong + warm.wrong,
        note: if probed.is_empty() {
            format!("opened in {:.1} s", set.took.as_secs_f64())
        } else {
            format!("opened in {:.1} s; {probed}", set.took.as_secs_f64())
        },
        ..Figures::default()
    };
    drop(set);
    drop(warm);
    Ok(f)
}

fn echo_figures(r: &EchoReport, cpu_s: f64) -> Figures {
    Figures {
        rate: r.rate(),
        p50_us: r.p50_us,
        p99_us: r.p99_us,
        max_us: r.max_us,
        errors: r.errors,
        wrong: r.wrong,
        cpu_s,
        msgs: r.msgs,
        open: r.open,
        ..Figures::default()
    }
}

fn has_wrk() -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("wrk").is_file()))
        .unwrap_or(false)
}

/// `1.23ms` → 1230 (µs).
fn wrk_time_us(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(text: &str) -> Option<Figures> {
    let mut f = Figures::default();
    let mut secs = 0.0;
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["Latency", _avg, _stdev, max, ..] => f.max_us = wrk_time_us(max)?,
            ["50%", v] => f.p50_us = wrk_time_us(v)?,
            ["99%", v] => f.p99_us = wrk_time_us(v)?,
            [n, "requests", "in", s, ..] => {
                f.msgs = n.parse().ok()?;
                secs = wrk_time_us(s.trim_end_matches(','))? / 1e6;
            }
            ["Socket", "errors:", rest @ ..] => {
                f.errors += rest
                    .iter()
                    .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                    .sum::<u64>();
            }
            ["Non-2xx", "or", "3xx", "responses:", n] => f.wrong = n.parse().ok()?,
            ["Requests/sec:", r] => f.rate = r.parse().ok()?,
            _ => {}
        }
    }
    (f.rate > 0.0 && secs > 0.0).then_some(f)
}

fn ratio(wm: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}", wm / base)
    } else {
        "–".into()
    }
}

fn num(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0} k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn cmd_out(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "?".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into())
}

fn report(
    opts: &SuiteOpts,
    outcomes: &[Outcome],
    nproc: usize,
    nofile: u64,
    took: Duration,
) -> String {
    let mut md = String::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<f64>().ok())
        })
        .map(|kib| format!("{:.0} GiB", kib / 1048576.0))
        .unwrap_or_default();
    let git = cmd_out("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !cmd_out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let _ = writeln!(md, "# wm-host benchmark results\n");
    let _ = writeln!(
        md,
        "Written by `make bench` (`wm-bench suite`); rerun it to replace this file.\n"
    );
    let _ = writeln!(md, "## Machine and run\n");
    let _ = writeln!(
        md,
        "- date: {}",
        cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
    );
    let _ = writeln!(
        md,
        "- CPU: {} × {nproc} (nproc {nproc}), memory {mem}",
        cpu_model()
    );
    let _ = writeln!(md, "- kernel: {kernel}");
    let _ = writeln!(md, "- {}", cmd_out("rustc", &["--version"]));
    let _ = writeln!(
        md,
        "- commit: {git}{}",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    );
    let _ = writeln!(
        md,
        "- servers pinned to CPU {}, client (wm-bench, wrk) to CPU {}; RLIMIT_NOFILE {nofile}; \
         warm-up {:.0} s, measured {:.0} s per run; load scenarios run {} times per side, \
         interleaved, and the best undisturbed run counts (a run is disturbed when other \
         processes took over 10% of the server's core; up to two more runs replace it); suite took {:.0} s",
        opts.server_cpu,
        opts.client_cpu,
        opts.warmup.as_secs_f64(),
        opts.duration.as_secs_f64(),
        opts.repeat.max(1),
        took.as_secs_f64()
    );
    let _ = writeln!(md, "\n## Commands\n");
    let _ = writeln!(
        md,
        "```sh\nmake bench\n# which is:\n\
         command -v wrk || apt-get install -y wrk\n\
         cargo build --release --workspace\n\
         target/release/wm-bench suite --out bench/RESULTS.md\n```\n"
    );
    let _ = writeln!(
        md,
        "Each scenario starts a fresh wm-host (`taskset -c {s} wm-host start -d`, one worker, \
         `count = 1`, the echo plugin, or `bench-hello-plugin` for HTTP) and then a fresh \
         `taskset -c {s} wm-baseline --proto P --listen 127.0.0.1:PORT`, and drives both with \
         the same client on CPU {c}:\n",
        s = opts.server_cpu,
        c = opts.client_cpu
    );
    for o in outcomes.iter().filter(|o| !o.client_cmd.is_empty()) {
        let _ = writeln!(md, "- {}: `{}`", o.scenario.name, o.client_cmd);
    }
    let _ = writeln!(md, "\n## Results\n");
    let _ = writeln!(
        md,
        "Ratio = wm-host ÷ baseline, both measured in this run. Throughput and per-CPU-second \
         ratios want to be high, latency and memory ratios low.\n"
    );
    let _ = writeln!(md, "| scenario | wm-host | baseline | ratio | target |");
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    for o in outcomes {
        let name = &o.scenario.name;
        let (wm, base) = match (&o.wm, &o.base) {
            (Ok(w), Ok(b)) => (w, b),
            (w, b) => {
                let e = |r: &Result<Figures, String>| match r {
                    Ok(_) => "ok".to_string(),
                    Err(e) if e.starts_with("skipped") => e.clone(),
                    Err(e) => format!("failed: {}", e.lines().next().unwrap_or("")),
                };
                let _ = writeln!(md, "| {name} | {} | {} | – | |", e(w), e(b));
                continue;
            }
        };
        match o.scenario.kind {
            Kind::Idle { proto, .. } => {
                let target = if proto == Proto::Websocket {
                    "wm-host ≤ 1024 B"
                } else {
                    ""
                };
                let _ = writeln!(
                    md,
                    "| {name}: server RSS per connection | {:.0} B | {:.0} B | {} | {target} |",
                    wm.rss_per_conn,
                    base.rss_per_conn,
                    ratio(wm.rss_per_conn, base.rss_per_conn)
                );
            }
            _ => {
                let unit = if matches!(o.scenario.kind, Kind::Http { .. }) {
                    "requests"
                } else {
                    "messages"
                };
                let _ = writeln!(
                    md,
                    "| {name}: {unit}/s | {} | {} | {} | ≥ 0.90 |",
                    num(wm.rate),
                    num(base.rate),
                    ratio(wm.rate, base.rate)
                );
                let _ = writeln!(
                    md,
                    "| {name}: p99 latency | {:.0} µs | {:.0} µs | {} | ≤ 1.50 |",
                    wm.p99_us,
                    base.p99_us,
                    ratio(wm.p99_us, base.p99_us)
                );
                let _ = writeln!(
                    md,
                    "| {name}: {unit} per server CPU-second | {} | {} | {} | |",
                    num(wm.per_cpu_s()),
                    num(base.per_cpu_s()),
                    ratio(wm.per_cpu_s(), base.per_cpu_s())
                );
            }
        }
    }
    let _ = writeln!(md, "\n## Details\n");
    let _ = writeln!(md, "| scenario | server | figures |");
    let _ = writeln!(md, "|---|---|---|");
    for o in outcomes {
        for (side, r) in [("wm-host", &o.wm), ("baseline", &o.base)] {
            let text = match r {
                Ok(f) => {
                    let mut s = summary(&o.scenario.kind, f);
                    if !matches!(o.scenario.kind, Kind::Idle { .. } | Kind::Http { .. }) {
                        let _ = write!(s, ", {} connections open at the end", f.open);
                    }
                    if f.runs.len() > 1 {
                        let rates: Vec<String> = f.runs.iter().map(|r| num(*r)).collect();
                        let _ = write!(s, "; best of runs at {}/s", rates.join(", "));
                    }
                    if !f.note.is_empty() {
                        let _ = write!(s, "; {}", f.note);
                    }
                    s
                }
                Err(e) if e.starts_with("skipped") => e.clone(),
                Err(e) => format!("failed: {}", e.replace('\n', " ")),
            };
            let _ = writeln!(md, "| {} | {side} | {text} |", o.scenario.name);
        }
    }
    let _ = writeln!(md, "\n## Method\n");
    let _ = writeln!(
        md,
        "- Echo: `wm-bench` is one `mio` loop holding C connections, each with P messages in \
         flight (a new one is sent as each echo arrives). Every payload is derived from its \
         connection and sequence number and every echo is compared byte for byte (`wrong`); \
         `errors` counts connections that failed (connect, handshake, reset, protocol). Latency \
         is from the loop iteration that queued a message to the one that read its echo.\n\
         - Server CPU-seconds: utime + stime of the serving process (the wm-host worker; the \
         baseline process) from `/proc/PID/stat` at the start and end of the measured window. \
         Messages per server CPU-second is what the client cannot cap: with one core each, the \
         client is often the bottleneck of the messages/s figures. \"Others on its core\" is \
         the server core's busy time (`/proc/stat`) less the server's: other processes that \
         disturbed the run (this machine is shared).\n\
         - HTTP: `wrk -t1 -c100` against `GET /` answered with `200 Hello, world!` \
         (`bench-hello-plugin` on wm-host); `wrong` counts non-2xx answers.\n\
         - Idle memory: one connection is opened and used, then the server's RSS \
         (`/proc/PID/statm`) is read; then N connections are opened from several 127.0.0.x \
         source addresses (bind before connect, `IP_BIND_ADDRESS_NO_PORT`), each completing the \
         websocket handshake and one 8-byte echo, and left idle; RSS is read again after \
         0.5 s. RSS per connection = growth ÷ N. Kernel socket buffers are not in RSS.\n\
         - wm-baseline: one bare `mio` loop per process, no plugin, ABI, supervisor or IPC; \
         reads into one per-process buffer, keeps only incomplete messages per connection, \
         answers one read with one write; websocket frames by a small parser (UTF-8 checked \
         on text), HTTP by `httparse` with a cached `Date`."
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_wrk_output() {
        let text = "Running 5s test @ http://127.0.0.1:1/
  1 threads and 100 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.02ms  200.00us   5.00ms   90.00%
    Req/Sec    98.00k     2.00k  100.00k    80.00%
  Latency Distribution
     50%  1.00ms
     75%    1.10ms
     90%    1.20ms
     99%  812.00us
  490000 requests in 5.00s, 60.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 5
Requests/sec:  98000.00
Transfer/sec:     12.00MB
";
        let f = parse_wrk(text).unwrap();
        assert_eq!(f.rate, 98000.0);
        assert_eq!(f.msgs, 490000);
        assert_eq!(f.p50_us, 1000.0);
        assert_eq!(f.p99_us, 812.0);
        assert_eq!(f.max_us, 5000.0);
        assert_eq!(f.errors, 3);
        assert_eq!(f.wrong, 5);
    }

    #[test]
    fn every_scenario_has_a_distinct_name() {
        let s = scenarios(&[10_000]);
        let names: std::collections::HashSet<_> = s.iter().map(|s| &s.name).collect();
        assert_eq!(names.len(), s.len());
    }

    #[test]
    fn sources_grow_with_connections() {
        assert_eq!(auto_sources(10_000), 4);
        assert_eq!(auto_sources(100_000), 7);
    }
}
