//! `wm-bench suite`: every scenario against wm-host and against the native
//! baseline, in one run, with the same pinning and the same client; writes
//! the figures and their ratios to a Markdown file.
//!
//! Servers run on `server_cpu` (`taskset`), this process (the client) and
//! `wrk` on `client_cpu`. Every scenario starts fresh servers.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::allocs;
use crate::client::{self, EchoConfig, EchoReport, Proto};
use crate::fanout::{self, FanoutConfig};
use crate::idle::{self, IdleConfig};
use crate::sys;

/// `wm-bench suite`'s options.
#[derive(clap::Args, Debug)]
pub struct SuiteOpts {
    /// Markdown file to write (also printed).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Seconds of warm-up before each measured run.
    #[arg(long, default_value = "1", value_parser = crate::parse_secs)]
    pub warmup: Duration,
    /// Seconds measured per run.
    #[arg(long, default_value = "5", value_parser = crate::parse_secs)]
    pub duration: Duration,
    /// Idle connection counts to measure, comma-separated: websocket at
    /// each, text too where one process serves them. Above 12500 the
    /// servers run one process per 12500 connections and the client
    /// one per 15000 (RLIMIT_NOFILE is per process).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    pub idle: Vec<usize>,
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    #[arg(long, default_value_t = 1)]
    pub client_cpu: usize,
    /// Only scenarios whose name contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// Runs per side of each load scenario (interleaved): rates and
    /// latencies from the best, per-CPU-second figures over all. Five,
    /// because single runs of one server spread by ±15 % on an idle machine.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,
    /// Connections in the broadcast fan-out group (0: skip it).
    #[arg(long, default_value_t = 10_000)]
    pub fanout_conns: usize,
    /// Measured broadcasts (after one warm-up).
    #[arg(long, default_value_t = 7)]
    pub fanout_rounds: usize,
    /// Cold starts per side.
    #[arg(long, default_value_t = 5)]
    pub cold_runs: usize,
    /// N of the allocation count (runs of N and 2N messages under
    /// valgrind; 0: skip it).
    #[arg(long, default_value_t = 2000)]
    pub allocs_messages: usize,
    /// Live handover scenarios (a section of their own, after the rest).
    #[command(flatten)]
    pub handover: crate::handover::HandoverOpts,
}

/// The release binaries next to this one.
pub(crate) struct Bins {
    pub(crate) host: PathBuf,
    pub(crate) baseline: PathBuf,
    pub(crate) echo_plugin: PathBuf,
    pub(crate) hello_plugin: PathBuf,
    pub(crate) test_plugin: PathBuf,
    /// The workspace (for `cargo bench`): two levels above `target/release`.
    pub(crate) root: PathBuf,
}

impl Bins {
    pub(crate) fn find() -> Result<Bins, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = exe.parent().ok_or("no folder for this binary")?;
        let b = Bins {
            host: dir.join("wm-host"),
            baseline: dir.join("wm-baseline"),
            echo_plugin: dir.join("libecho_plugin.so"),
            hello_plugin: dir.join("libbench_hello_plugin.so"),
            test_plugin: dir.join("libtest_plugin.so"),
            root: dir
                .parent()
                .and_then(|t| t.parent())
                .map(PathBuf::from)
                .unwrap_or_default(),
        };
        for p in [
            &b.host,
            &b.baseline,
            &b.echo_plugin,
            &b.hello_plugin,
            &b.test_plugin,
        ] {
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
        /// The workers' pids, from `wm-host status`.
        pids: Vec<u32>,
    },
    Base {
        child: Child,
        /// `--procs N`: the children serving, not the waiting parent.
        children: Vec<u32>,
    },
}

/// Polls until the baseline on `port` accepts a connection, or `end`.
fn wait_accepting(port: u16, end: Instant) -> Result<(), String> {
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > end {
            return Err("wm-baseline did not listen within 10 s".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// A fresh runtime folder with a `wm.toml` for one worker group.
fn wm_config(
    scheme: &str,
    plugin: &Path,
    count: usize,
    port: u16,
) -> Result<(PathBuf, PathBuf), String> {
    let dir = std::env::temp_dir().join(format!("wm-bench-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let config = dir.join("wm.toml");
    let text = format!(
        "[host]\nruntime_dir = \"run\"\nstop_timeout = \"2s\"\n\n\
         [[worker]]\nname = \"bench\"\nlisten = \"{scheme}://127.0.0.1:{port}\"\n\
         count = {count}\nplugin = \"{}\"\n",
        plugin.display()
    );
    std::fs::write(&config, text).map_err(|e| e.to_string())?;
    Ok((dir, config))
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

impl Server {
    /// Starts `procs` server processes: wm-host workers (`count`) or
    /// `wm-baseline --procs`.
    fn start(
        side: Side,
        svc: Service,
        port: u16,
        bins: &Bins,
        cpu: usize,
        procs: usize,
    ) -> Result<Server, String> {
        let cpu = cpu.to_string();
        match side {
            Side::Wm => {
                let plugin = match svc {
                    Service::Echo(_) => &bins.echo_plugin,
                    Service::Hello => &bins.hello_plugin,
                };
                Server::start_wm(&bins.host, svc.scheme(), plugin, procs, port, &cpu)
            }
            Side::Base => {
                let proto = match svc {
                    Service::Echo(p) => p.scheme(),
                    Service::Hello => "http",
                };
                let mut cmd = Command::new("taskset");
                cmd.args(["-c", &cpu])
                    .arg(&bins.baseline)
                    .args(["--proto", proto, "--listen"])
                    .arg(format!("127.0.0.1:{port}"));
                if procs > 1 {
                    cmd.arg("--procs").arg(procs.to_string());
                }
                let child = cmd
                    .stdin(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("taskset: {e}"))?;
                let mut server = Server::Base {
                    child,
                    children: Vec::new(),
                };
                let end = Instant::now() + Duration::from_secs(10);
                if procs > 1 {
                    // Every child must listen before connections come, or
                    // SO_REUSEPORT spreads them over the early ones only.
                    while sys::listeners_on(port) < procs {
                        if Instant::now() > end {
                            return Err(format!(
                                "wm-baseline --procs {procs}: {} of {procs} listening after 10 s",
                                sys::listeners_on(port)
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    let Server::Base { child, children } = &mut server else {
                        unreachable!()
                    };
                    *children = sys::children_of(child.id());
                    if children.len() != procs {
                        return Err(format!(
                            "wm-baseline --procs {procs} has {} children",
                            children.len()
                        ));
                    }
                }
                wait_accepting(port, end)?;
                Ok(server)
            }
        }
    }

    /// Starts `wm-baseline --proto ws-group` on `cpus`; returns once it
    /// accepts connections.
    fn start_base_group(baseline: &Path, port: u16, cpus: &str) -> Result<Server, String> {
        let child = Command::new("taskset")
            .args(["-c", cpus])
            .arg(baseline)
            .args(["--proto", "ws-group", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("taskset: {e}"))?;
        let server = Server::Base {
            child,
            children: Vec::new(),
        };
        wait_accepting(port, Instant::now() + Duration::from_secs(10))?;
        Ok(server)
    }

    /// Starts `wm-host start -d` (pinned to `cpu`) with `count` workers of
    /// `plugin` listening on `scheme://127.0.0.1:port`; returns once it is
    /// ready.
    fn start_wm(
        host: &Path,
        scheme: &str,
        plugin: &Path,
        count: usize,
        port: u16,
        cpu: &str,
    ) -> Result<Server, String> {
        let (dir, config) = wm_config(scheme, plugin, count, port)?;
        let out = Command::new("taskset")
            .args(["-c", cpu])
            .arg(host)
            .args(["start", "-d", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("taskset: {e}"))?;
        let mut server = Server::Wm {
            host: host.to_path_buf(),
            dir,
            config,
            pids: Vec::new(),
        };
        if !out.status.success() {
            return Err(format!(
                "wm-host start failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let found: Vec<u32> = server
            .wm_status()
            .and_then(|s| {
                s["workers"]
                    .as_array()?
                    .iter()
                    .map(|w| w["pid"].as_u64().map(|p| p as u32))
                    .collect()
            })
            .unwrap_or_default();
        if found.len() != count {
            return Err(format!(
                "wm-host status names {} workers, {count} configured",
                found.len()
            ));
        }
        if let Server::Wm { pids, .. } = &mut server {
            *pids = found;
        }
        Ok(server)
    }

    /// The process doing the work: the (first) worker, or the baseline.
    fn pid(&self) -> u32 {
        self.pids()[0]
    }

    /// Every process doing the work: the workers, not the master; the
    /// baseline's children under `--procs N`, else the baseline itself.
    fn pids(&self) -> Vec<u32> {
        match self {
            Server::Wm { pids, .. } => pids.clone(),
            Server::Base { child, children } if children.is_empty() => vec![child.id()],
            Server::Base { children, .. } => children.clone(),
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
            Server::Base { child, .. } => {
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
    /// wrk against the HTTP service; `pipeline` > 1 is TechEmpower's
    /// plaintext test: `GET /plaintext` with its headers, that many
    /// requests sent at once per connection (its `pipeline.lua`).
    Http { conns: usize, pipeline: usize },
    /// `procs` server processes (wm-host `count`, `wm-baseline --procs`).
    Idle {
        proto: Proto,
        conns: usize,
        procs: usize,
    },
    /// Criterion: a callback through the plugin ABI vs a direct call.
    Abi,
    /// Spawn to first echo, wm-host vs baseline.
    ColdStart,
    /// Heap allocations per message under valgrind's dhat.
    Allocs { service: allocs::Service },
    /// One broadcast to a group of `conns` connections over `workers`;
    /// `pinned`: server on the server CPU, client on the client CPU, as
    /// everywhere else; otherwise both may use every CPU.
    Fanout {
        proto: Proto,
        conns: usize,
        workers: usize,
        pinned: bool,
    },
}

struct Scenario {
    name: String,
    kind: Kind,
}

fn scenarios(idle: &[usize], fanout_conns: usize, allocs_messages: usize) -> Vec<Scenario> {
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
        Scenario {
            name: "ABI overhead per callback".into(),
            kind: Kind::Abi,
        },
        Scenario {
            name: "cold start to first echo".into(),
            kind: Kind::ColdStart,
        },
        echo(Proto::Text, 100, 16, 32),
        echo(Proto::Text, 100, 1, 32),
        echo(Proto::Frame, 100, 16, 32),
        echo(Proto::Websocket, 100, 16, 32),
        echo(Proto::Websocket, 100, 16, 4096),
        echo(Proto::Websocket, 100, 1, 32),
        echo(Proto::Websocket, 1000, 1, 32),
        Scenario {
            name: "HTTP hello keep-alive, wrk 1 thread × 100 conns".into(),
            kind: Kind::Http {
                conns: 100,
                pipeline: 1,
            },
        },
        Scenario {
            name: "HTTP plaintext (TechEmpower), wrk 1 thread × 256 conns × 16 pipelined".into(),
            kind: Kind::Http {
                conns: 256,
                pipeline: 16,
            },
        },
    ];
    if allocs_messages > 0 {
        for (service, what) in [
            (
                allocs::Service::Text,
                "text echo 1 conn × 1 in flight × 32 B",
            ),
            (
                allocs::Service::Frame,
                "frame echo 1 conn × 1 in flight × 32 B",
            ),
            (
                allocs::Service::Websocket,
                "websocket echo 1 conn × 1 in flight × 32 B",
            ),
            (allocs::Service::Http, "HTTP hello keep-alive GETs, 1 conn"),
        ] {
            v.push(Scenario {
                name: format!("heap allocations, {what}"),
                kind: Kind::Allocs { service },
            });
        }
    }
    if fanout_conns > 0 {
        for pinned in [true, false] {
            let cpus = if pinned {
                "server on one CPU"
            } else {
                "server and client unpinned"
            };
            v.push(Scenario {
                name: format!(
                    "broadcast to {fanout_conns} websocket connections over 4 workers, {cpus}"
                ),
                kind: Kind::Fanout {
                    proto: Proto::Websocket,
                    conns: fanout_conns,
                    workers: 4,
                    pinned,
                },
            });
        }
    }
    for &n in idle {
        let procs = idle::server_procs(n);
        // Text only where one process serves them: the issue's target for
        // many processes is websocket, and each such run takes a while.
        let protos: &[Proto] = if procs == 1 {
            &[Proto::Websocket, Proto::Text]
        } else {
            &[Proto::Websocket]
        };
        for &proto in protos {
            v.push(Scenario {
                name: format!("idle {} connections × {n}", proto_name(proto)),
                kind: Kind::Idle {
                    proto,
                    conns: n,
                    procs,
                },
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
    /// (messages, server CPU-seconds) of every run, when repeated.
    pub cpu_runs: Vec<(u64, f64)>,
    /// Idle: RSS growth per connection, bytes.
    pub rss_per_conn: f64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub open: usize,
    pub note: String,
    /// Cold start and fan-out: the headline figure (ms) and every sample.
    pub value: f64,
    pub samples: Vec<f64>,
    /// ABI: criterion estimates, (id, ns per call, low, high).
    pub estimates: Vec<(String, f64, f64, f64)>,
    /// Heap allocations and bytes allocated per message (dhat).
    pub allocs_per_msg: f64,
    pub alloc_bytes_per_msg: f64,
    /// HTTP plaintext: one response as sent, its `Date` value masked.
    pub response: Vec<u8>,
}

impl Figures {
    fn per_cpu_s(&self) -> f64 {
        if self.cpu_s > 0.0 {
            self.msgs as f64 / self.cpu_s
        } else {
            0.0
        }
    }

    /// Messages per server CPU-second over every run of this side: the
    /// runs' spread (the baseline's frame echo went from 0.8 to 1.35 M/s
    /// between runs on an idle machine) moves the best-rate run's figure
    /// more than any difference between the servers.
    fn pooled_per_cpu_s(&self) -> f64 {
        let mut pool = CpuPool::default();
        for &(msgs, cpu_s) in &self.cpu_runs {
            pool.add(msgs as f64, cpu_s);
        }
        match pool.per_cpu_s() {
            Some(v) if self.cpu_runs.len() > 1 => v,
            _ => self.per_cpu_s(),
        }
    }
}

/// Messages per server CPU-second over several runs of one side: all the
/// messages ÷ all the CPU-seconds. The suite, `tls` and `udp` report it
/// because single runs of the same server differ more than the servers do.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuPool {
    msgs: f64,
    cpu_s: f64,
}

impl CpuPool {
    pub fn add(&mut self, msgs: f64, cpu_s: f64) {
        self.msgs += msgs;
        self.cpu_s += cpu_s;
    }

    /// `None` before any CPU time was added.
    pub fn per_cpu_s(&self) -> Option<f64> {
        (self.cpu_s > 0.0).then(|| self.msgs / self.cpu_s)
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
    // The most connections one process holds: an idle client or server
    // process, or the fan-out client.
    let max_idle = opts
        .idle
        .iter()
        .map(|&n| {
            n.div_ceil(idle::client_procs(n))
                .max(n.div_ceil(idle::server_procs(n)))
        })
        .max()
        .unwrap_or(0) as u64;
    let most = max_idle.max(opts.fanout_conns as u64);
    let nofile = sys::raise_nofile(2 * most + 4096);
    sys::pin_to_cpu(opts.client_cpu)
        .map_err(|e| format!("pinning the client to CPU {}: {e}", opts.client_cpu))?;
    let wrk = has_wrk();
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for sc in scenarios(&opts.idle, opts.fanout_conns, opts.allocs_messages) {
        if let Some(only) = &opts.only {
            if !sc.name.contains(only.as_str()) {
                continue;
            }
        }
        eprintln!("== {}", sc.name);
        if matches!(
            sc.kind,
            Kind::Abi | Kind::ColdStart | Kind::Fanout { .. } | Kind::Allocs { .. }
        ) {
            let (wm, base, client_cmd) = run_special(&sc, &bins, &opts, nofile);
            for (side, r) in [("wm-host", &wm), ("baseline", &base)] {
                match r {
                    Ok(f) => eprintln!("   {side:8} {}; {}", summary(&sc.kind, f), f.note),
                    Err(e) => eprintln!("   {side:8} {e}"),
                }
            }
            outcomes.push(Outcome {
                scenario: sc,
                wm,
                base,
                client_cmd,
            });
            continue;
        }
        if let Kind::Idle { conns, procs, .. } = sc.kind {
            // Per process: a server's share with room for an uneven
            // SO_REUSEPORT spread, or a client's share.
            let share =
                (conns.div_ceil(procs) * 5 / 4).max(conns.div_ceil(idle::client_procs(conns)));
            if share as u64 + 1024 > nofile {
                let e = format!(
                    "skipped: needs {} open files per process, RLIMIT_NOFILE is {nofile} \
                     (raising the hard limit needs CAP_SYS_RESOURCE)",
                    share + 1024
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
    let ho_started = Instant::now();
    let ho = crate::handover::run(
        &bins,
        &opts.handover,
        opts.only.as_deref(),
        opts.server_cpu,
        opts.client_cpu,
    );
    let ho_took = ho_started.elapsed();
    let took = started.elapsed();
    let mut md = report(&opts, &outcomes, nproc, nofile, took);
    if !ho.is_empty() {
        let section = crate::handover::section(
            &ho,
            &opts.handover,
            opts.server_cpu,
            opts.client_cpu,
            ho_took,
        );
        md = format!("{md}\n{section}");
    }
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
            let mut cpu_runs = std::mem::take(&mut a.cpu_runs);
            cpu_runs.push((b.msgs, b.cpu_s));
            if key(&b) > key(&a) {
                b.runs = runs;
                b.cpu_runs = cpu_runs;
                Ok(b)
            } else {
                a.runs = runs;
                a.cpu_runs = cpu_runs;
                Ok(a)
            }
        }
        (Ok(a), Err(_)) => Ok(a),
        (Err(_), Ok(mut b)) => {
            b.runs = vec![b.rate];
            b.cpu_runs = vec![(b.msgs, b.cpu_s)];
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
        Kind::Abi => f
            .estimates
            .iter()
            .map(|(id, ns, lo, hi)| format!("{id} {ns:.2} ns [{lo:.2}, {hi:.2}]"))
            .collect::<Vec<_>>()
            .join(", "),
        Kind::Allocs { .. } => format!(
            "{:.2} allocations, {:.1} B per message",
            f.allocs_per_msg, f.alloc_bytes_per_msg
        ),
        Kind::ColdStart | Kind::Fanout { .. } => {
            let runs: Vec<String> = f.samples.iter().map(|v| format!("{v:.1}")).collect();
            format!("median {:.1} ms of runs at {} ms", f.value, runs.join(", "))
        }
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
        Kind::Abi | Kind::ColdStart | Kind::Fanout { .. } | Kind::Allocs { .. } => {
            Err("run by run_special, not as a load scenario".into())
        }
        Kind::Echo {
            proto,
            conns,
            inflight,
            size,
        } => {
            let server = Server::start(side, Service::Echo(proto), port, bins, opts.server_cpu, 1)?;
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
        Kind::Http { conns, pipeline } => {
            if !wrk {
                return Err("wrk is not installed (apt-get install wrk)".into());
            }
            let server = Server::start(side, Service::Hello, port, bins, opts.server_cpu, 1)?;
            let pid = server.pid();
            let response = if pipeline > 1 {
                plaintext_response(addr)?
            } else {
                Vec::new()
            };
            let cpu = opts.client_cpu.to_string();
            let script =
                std::env::temp_dir().join(format!("wm-bench-pipeline-{}.lua", std::process::id()));
            let mut args: Vec<String> = vec!["-t1".into(), format!("-c{conns}")];
            let mut url = format!("http://127.0.0.1:{port}/");
            if pipeline > 1 {
                std::fs::write(&script, PIPELINE_LUA)
                    .map_err(|e| format!("{}: {e}", script.display()))?;
                for h in TFB_HEADERS {
                    args.extend(["-H".into(), h.to_string()]);
                }
                url.push_str("plaintext");
            }
            args.extend(["--latency".into(), url]);
            if pipeline > 1 {
                args.extend([
                    "-s".into(),
                    script.display().to_string(),
                    "--".into(),
                    pipeline.to_string(),
                ]);
            }
            let wrk_cmd = |secs: f64| -> Command {
                let mut c = Command::new("taskset");
                c.args(["-c", &cpu, "wrk", &format!("-d{}s", secs.ceil() as u64)])
                    .args(&args);
                c
            };
            *client_cmd = format!(
                "taskset -c {cpu} wrk -d{}s {}",
                opts.duration.as_secs_f64().ceil(),
                args.iter()
                    .map(|a| if a.contains(' ') {
                        format!("'{a}'")
                    } else {
                        a.clone()
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
                    .replace(&port.to_string(), "PORT")
                    .replace(&script.display().to_string(), "pipeline.lua")
            );
            if !opts.warmup.is_zero() {
                let _ = wrk_cmd(opts.warmup.as_secs_f64()).output();
            }
            let c0 = cpu_snapshot(pid, opts.server_cpu);
            let out = wrk_cmd(opts.duration.as_secs_f64())
                .output()
                .map_err(|e| format!("wrk: {e}"))?;
            let c1 = cpu_snapshot(pid, opts.server_cpu);
            drop(server);
            let _ = std::fs::remove_file(&script);
            let text = String::from_utf8_lossy(&out.stdout);
            let mut f = parse_wrk(&text).ok_or_else(|| {
                format!(
                    "unreadable wrk output:\n{text}{}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })?;
            f.cpu_s = c1.0 - c0.0;
            f.other_cpu_s = ((c1.1 - c0.1) - f.cpu_s).max(0.0);
            f.response = response;
            Ok(f)
        }
        Kind::Idle {
            proto,
            conns,
            procs,
        } => {
            let server = Server::start(
                side,
                Service::Echo(proto),
                port,
                bins,
                opts.server_cpu,
                procs,
            )?;
            let cfg = IdleConfig {
                proto,
                addr,
                conns,
                clients: idle::client_procs(conns),
                sources: 0,
                pids: server.pids(),
            };
            *client_cmd = idle_command(&cfg, procs, opts.server_cpu);
            // wm-host must count every connection the clients hold.
            let probe = |held: usize| -> Result<String, String> {
                if side == Side::Base {
                    return Ok(String::new());
                }
                let st = server.wm_status().ok_or("wm-host status failed")?;
                let ws = st["workers"].as_array().cloned().unwrap_or_default();
                let per: Vec<u64> = ws
                    .iter()
                    .map(|w| w["stats"]["connections"].as_u64().unwrap_or(0))
                    .collect();
                let total: u64 = per.iter().sum();
                let rss: f64 = ws.iter().filter_map(|w| w["rss_bytes"].as_f64()).sum();
                let text = format!(
                    "wm-host status meanwhile: {total} connections{}, rss_bytes {:.1} MiB",
                    if per.len() > 1 {
                        let p: Vec<String> = per.iter().map(u64::to_string).collect();
                        format!(" ({} per worker)", p.join(" / "))
                    } else {
                        String::new()
                    },
                    rss / 1048576.0
                );
                if total != held as u64 {
                    return Err(format!("the clients hold {held} connections but {text}"));
                }
                Ok(text)
            };
            let f = idle::measure(&cfg, &probe)?;
            drop(server);
            Ok(f)
        }
    }
}

/// TechEmpower's `pipeline.lua`: `depth` copies of the request, sent at
/// once and sent again when all their answers are in.
const PIPELINE_LUA: &str = r#"init = function(args)
  local r = {}
  local depth = tonumber(args[1]) or 1
  for i = 1, depth do
    r[i] = wrk.format()
  end
  req = table.concat(r)
end

request = function()
  return req
end
"#;

/// The headers TechEmpower's plaintext test sends (`wrk -H`).
const TFB_HEADERS: [&str; 3] = [
    "Host: tfb-server",
    "Accept: text/plain,text/html;q=0.9,application/xhtml+xml;q=0.9,application/xml;q=0.8,*/*;q=0.7",
    "Connection: keep-alive",
];

/// Sends two plaintext requests at once and returns the first answer with
/// its `Date` value masked; both answers must agree and be a `200` with
/// `Hello, World!`, so the two servers' answers can be compared byte for byte.
fn plaintext_response(addr: SocketAddr) -> Result<Vec<u8>, String> {
    use std::io::{Read, Write};
    let mut req = String::from("GET /plaintext HTTP/1.1\r\n");
    for h in TFB_HEADERS {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    let mut s = TcpStream::connect(addr).map_err(|e| format!("plaintext check: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    s.write_all(req.repeat(2).as_bytes())
        .map_err(|e| format!("plaintext check: {e}"))?;
    let (mut buf, mut answers) = (Vec::new(), Vec::new());
    let mut chunk = [0u8; 4096];
    while answers.len() < 2 {
        while let Some(n) = allocs::http_response_len(&buf) {
            answers.push(mask_date(&buf[..n]));
            buf.drain(..n);
        }
        if answers.len() == 2 {
            break;
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("plaintext check: closed before two answers".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("plaintext check: {e}")),
        }
    }
    let first = &answers[0];
    if !first.starts_with(b"HTTP/1.1 200 ") || !first.ends_with(b"\r\n\r\nHello, World!") {
        return Err(format!(
            "plaintext check: unexpected answer {:?}",
            String::from_utf8_lossy(first)
        ));
    }
    if answers[1] != *first {
        return Err("plaintext check: two answers differ beyond their Date".into());
    }
    Ok(answers.swap_remove(0))
}

/// `response` with the value of its `Date` header replaced by `#`s.
fn mask_date(response: &[u8]) -> Vec<u8> {
    let mut r = response.to_vec();
    let head = r
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(r.len());
    let mut at = 0;
    while let Some(i) = r[at..head].windows(2).position(|w| w == b"\r\n") {
        let line = at + i + 2;
        if r.len() >= line + 5 && r[line..line + 5].eq_ignore_ascii_case(b"date:") {
            let end = r[line..head]
                .windows(2)
                .position(|w| w == b"\r\n")
                .map_or(head, |e| line + e);
            let start = line + 5 + r[line + 5..end].iter().take_while(|&&b| b == b' ').count();
            r[start..end].fill(b'#');
            break;
        }
        at = line;
    }
    r
}

/// How an idle scenario is run, for the report.
fn idle_command(cfg: &IdleConfig, procs: usize, server_cpu: usize) -> String {
    let mut client = format!(
        "wm-bench idle --proto {} --addr 127.0.0.1:PORT --conns {}",
        cfg.proto.scheme(),
        cfg.conns
    );
    if cfg.clients > 1 {
        let _ = write!(client, " --clients {}", cfg.clients);
    } else {
        let _ = write!(client, " --sources {}", auto_sources(cfg.conns));
    }
    if procs == 1 {
        return format!("`{client} --server-pid PID`");
    }
    format!(
        "`taskset -c {server_cpu} wm-host start -d` with `count = {procs}` (the RSS of its \
         {procs} workers, not the master's), then `taskset -c {server_cpu} wm-baseline --proto {p} --listen 127.0.0.1:PORT --procs \
         {procs}` (the RSS of its {procs} children); client: `{client} --server-pid PID1,…,PID{procs}` \
         ({} `wm-bench idle-hold` processes of ≤ {} connections, {} source addresses each)",
        cfg.clients,
        cfg.conns.div_ceil(cfg.clients),
        auto_sources(cfg.conns.div_ceil(cfg.clients)),
        p = cfg.proto.scheme()
    )
}

/// The median of `v` (0 when empty).
fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// The scenarios that are not echo load: (wm-host, baseline, command).
fn run_special(
    sc: &Scenario,
    bins: &Bins,
    opts: &SuiteOpts,
    nofile: u64,
) -> (Result<Figures, String>, Result<Figures, String>, String) {
    match sc.kind {
        Kind::Abi => {
            let cmd = format!(
                "cargo bench -p plugin-api --bench abi -- {}",
                ABI_ARGS.join(" ")
            );
            match run_abi(bins) {
                Ok((abi, direct)) => (Ok(abi), Ok(direct), cmd),
                Err(e) => (Err(e.clone()), Err(e), cmd),
            }
        }
        Kind::ColdStart => {
            let (mut wm, mut base) = (Vec::new(), Vec::new());
            let mut cli = Vec::new();
            let mut failed = (None, None);
            for _ in 0..opts.cold_runs.max(1) {
                match cold_start(Side::Wm, bins, opts.server_cpu) {
                    Ok((ms, cli_ms)) => {
                        wm.push(ms);
                        cli.extend(cli_ms);
                    }
                    Err(e) => failed.0 = Some(e),
                }
                match cold_start(Side::Base, bins, opts.server_cpu) {
                    Ok((ms, _)) => base.push(ms),
                    Err(e) => failed.1 = Some(e),
                }
            }
            let figures = |v: Vec<f64>, failed: Option<String>, note: String| {
                if v.is_empty() {
                    return Err(failed.unwrap_or_else(|| "no run".into()));
                }
                Ok(Figures {
                    value: median(&v),
                    samples: v,
                    note: match failed {
                        Some(e) => format!("{note}; a run failed: {e}"),
                        None => note,
                    },
                    ..Figures::default()
                })
            };
            let cli_note = format!(
                "`wm-host start -d` itself returned after {:.1} ms (median)",
                median(&cli)
            );
            (
                figures(wm, failed.0, cli_note),
                figures(base, failed.1, "the process was spawned directly".into()),
                format!(
                    "spawn `taskset -c {} wm-host start -d` (text echo, count = 1) or \
                     `wm-baseline --proto text`, then connect + `ping\\n` until echoed; \
                     {} runs per side, interleaved",
                    opts.server_cpu,
                    opts.cold_runs.max(1)
                ),
            )
        }
        Kind::Fanout {
            proto,
            conns,
            workers,
            pinned,
        } => {
            let cmd = format!(
                "wm-host (`count = {workers}`, test plugin, `{}://`{}), {conns} connections from \
                 {} source addresses, each `join g`; one sends `gsend g <32 B>`; 1 warm-up + {} \
                 measured broadcasts",
                proto.scheme(),
                if pinned {
                    format!(", `taskset -c {}`", opts.server_cpu)
                } else {
                    String::new()
                },
                auto_sources(conns),
                opts.fanout_rounds
            );
            let wm = if conns as u64 + 256 > nofile {
                Err(format!(
                    "skipped: needs {} open files, RLIMIT_NOFILE is {nofile}",
                    conns + 256
                ))
            } else {
                run_fanout(Side::Wm, proto, conns, workers, pinned, bins, opts)
            };
            let base = if wm.as_ref().is_err_and(|e| e.starts_with("skipped")) {
                Err("skipped".to_string())
            } else {
                run_fanout(Side::Base, proto, conns, workers, pinned, bins, opts)
            };
            let cmd = format!(
                "{cmd}; baseline: `wm-baseline --proto ws-group` (one process{})",
                if pinned {
                    format!(", `taskset -c {}`", opts.server_cpu)
                } else {
                    String::new()
                }
            );
            (wm, base, cmd)
        }
        Kind::Allocs { service } => {
            let n = opts.allocs_messages;
            let cmd = allocs_command(service, n, opts.server_cpu);
            let side = |baseline: bool| {
                allocs::measure(service, n, baseline, bins, opts.server_cpu).map(|r| Figures {
                    allocs_per_msg: r.blocks_per_msg,
                    alloc_bytes_per_msg: r.bytes_per_msg,
                    note: if r.sites.is_empty() {
                        format!("serving process: {}", r.totals_text())
                    } else {
                        format!(
                            "serving process: {}; per message at: {}",
                            r.totals_text(),
                            r.sites_text(8)
                        )
                    },
                    ..Figures::default()
                })
            };
            (side(false), side(true), cmd)
        }
        _ => unreachable!("not a special scenario"),
    }
}

/// How an allocation count is run, for the report.
fn allocs_command(service: allocs::Service, n: usize, server_cpu: usize) -> String {
    let (plugin, what) = match service {
        allocs::Service::Http => ("bench-hello-plugin", "keep-alive `GET /` requests"),
        _ => ("echo plugin", "32 B messages"),
    };
    format!(
        "`taskset -c {server_cpu} valgrind --tool=dhat --trace-children=yes \
         --dhat-out-file=DIR/dhat.%p wm-host start -c wm.toml` (`{s}://`, {plugin}, \
         `count = 1`), one connection sends {n}, then in a second run {}, {what} one at a time, \
         then `wm-host stop`; the baseline: `taskset -c {server_cpu} valgrind --tool=dhat \
         wm-baseline --proto {s} …`, stopped by SIGTERM; as one command: `wm-bench allocs \
         --proto {s} -n {n} [--baseline]`",
        2 * n,
        s = service.scheme()
    )
}

/// Criterion's arguments when the suite runs the ABI bench.
const ABI_ARGS: [&str; 4] = ["--warm-up-time", "1", "--measurement-time", "3"];

/// Criterion benchmark ids: (through the ABI, its direct counterpart,
/// the row's name, its target).
const ABI_PAIRS: [(&str, &str, &str, &str); 4] = [
    (
        "on_message/abi",
        "on_message/direct",
        "ABI: `on_message` (trivial body) via the plugin vtable vs via `&mut dyn Plugin`: ns per call",
        "≤ +5 ns",
    ),
    (
        "echo/abi",
        "echo/direct",
        "ABI: echo `on_message` calling `ctx.send` via the vtable vs via `&mut dyn Plugin`: ns per call",
        "≤ +5 ns",
    ),
    (
        "echo/abi",
        "echo/native",
        "ABI: echo via the vtable (2 crossings) vs `&mut dyn` plugin and `&mut dyn` host, no ABI: ns per call",
        "≤ +10 ns",
    ),
    (
        "on_message_spilled/abi",
        "on_message_spilled/direct",
        "ABI: `on_message` (trivial body), message slice stored to memory just before each call: ns per call",
        "≤ +5 ns",
    ),
];

/// Runs `cargo bench -p plugin-api --bench abi` and reads criterion's
/// estimates (ns per call): (the `abi` ids, the others).
fn run_abi(bins: &Bins) -> Result<(Figures, Figures), String> {
    let home = bins.root.join("target").join("criterion");
    for group in ["on_message", "echo", "on_message_spilled"] {
        let _ = std::fs::remove_dir_all(home.join(group));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(&cargo)
        .current_dir(&bins.root)
        .env("CRITERION_HOME", &home)
        .args(["bench", "-p", "plugin-api", "--bench", "abi", "--"])
        .args(ABI_ARGS)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("{cargo}: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        return Err(format!(
            "cargo bench failed: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
        ));
    }
    let (mut abi, mut direct) = (Figures::default(), Figures::default());
    let mut seen = std::collections::HashSet::new();
    for (a, d, ..) in ABI_PAIRS {
        for (id, into) in [(a, &mut abi), (d, &mut direct)] {
            if seen.insert(id) {
                let (ns, lo, hi) = criterion_estimate(&home, id)?;
                into.estimates.push((id.to_string(), ns, lo, hi));
            }
        }
    }
    Ok((abi, direct))
}

/// ns per iteration from `<home>/<id>/new/estimates.json`: the slope when
/// criterion fitted one, else the mean; with its 95% interval.
fn criterion_estimate(home: &Path, id: &str) -> Result<(f64, f64, f64), String> {
    let path = home.join(id).join("new").join("estimates.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let est = if v["slope"].is_object() {
        &v["slope"]
    } else {
        &v["mean"]
    };
    let get = |x: &Value| x.as_f64().ok_or(format!("{}: no estimate", path.display()));
    Ok((
        get(&est["point_estimate"])?,
        get(&est["confidence_interval"]["lower_bound"])?,
        get(&est["confidence_interval"]["upper_bound"])?,
    ))
}

/// The ns per call of criterion id `id` in `f`.
fn estimate(f: &Figures, id: &str) -> Option<f64> {
    f.estimates.iter().find(|e| e.0 == id).map(|e| e.1)
}

/// Connects and has `ping` echoed, again and again, until it works or
/// `deadline` passes; returns when it first worked.
fn first_echo(addr: SocketAddr, deadline: Instant) -> Result<Instant, String> {
    use std::io::{Read, Write};
    let mut last_err = String::from("never connected");
    while Instant::now() < deadline {
        let mut s = match TcpStream::connect(addr) {
            Ok(s) => s,
            Err(e) => {
                last_err = e.to_string();
                std::hint::spin_loop();
                continue;
            }
        };
        let _ = s.set_nodelay(true);
        let left = deadline.saturating_duration_since(Instant::now());
        let _ = s.set_read_timeout(Some(left.max(Duration::from_millis(1))));
        if let Err(e) = s.write_all(b"ping\n") {
            last_err = e.to_string();
            continue;
        }
        let mut buf = [0u8; 64];
        let mut got = 0;
        loop {
            match s.read(&mut buf[got..]) {
                Ok(0) => {
                    last_err = "closed before the echo".into();
                    break;
                }
                Ok(n) => {
                    got += n;
                    if buf[..got].contains(&b'\n') {
                        if &buf[..got] == b"ping\n" {
                            return Ok(Instant::now());
                        }
                        return Err(format!(
                            "wrong echo: {:?}",
                            String::from_utf8_lossy(&buf[..got])
                        ));
                    }
                    if got == buf.len() {
                        return Err("echo too long".into());
                    }
                }
                Err(e) => {
                    last_err = e.to_string();
                    break;
                }
            }
        }
    }
    Err(format!("no echo within 10 s: {last_err}"))
}

/// One cold start: ms from spawning the server until a first echo, and for
/// wm-host the ms until `wm-host start -d` returned.
fn cold_start(side: Side, bins: &Bins, cpu: usize) -> Result<(f64, Option<f64>), String> {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let cpu = cpu.to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    match side {
        Side::Wm => {
            let (dir, config) = wm_config("text", &bins.echo_plugin, 1, port)?;
            let t0 = Instant::now();
            let mut child = Command::new("taskset")
                .args(["-c", &cpu])
                .arg(&bins.host)
                .args(["start", "-d", "-c"])
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("taskset: {e}"))?;
            // Stops the server on every way out.
            let _server = Server::Wm {
                host: bins.host.clone(),
                dir,
                config,
                pids: Vec::new(),
            };
            let waiter = std::thread::spawn(move || {
                let out = child.wait();
                (Instant::now(), out)
            });
            let echoed = first_echo(addr, deadline);
            let (returned, status) = waiter.join().map_err(|_| "waiter panicked")?;
            let echoed = echoed?;
            let cli = status
                .ok()
                .filter(|s| s.success())
                .map(|_| (returned - t0).as_secs_f64() * 1e3);
            Ok(((echoed - t0).as_secs_f64() * 1e3, cli))
        }
        Side::Base => {
            let t0 = Instant::now();
            let child = Command::new("taskset")
                .args(["-c", &cpu])
                .arg(&bins.baseline)
                .args(["--proto", "text", "--listen"])
                .arg(addr.to_string())
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("taskset: {e}"))?;
            let _server = Server::Base {
                child,
                children: Vec::new(),
            };
            let echoed = first_echo(addr, deadline)?;
            Ok(((echoed - t0).as_secs_f64() * 1e3, None))
        }
    }
}

/// Starts wm-host with the test plugin and `workers` workers and measures
/// broadcasts to a group of `conns` connections.
fn run_fanout(
    side: Side,
    proto: Proto,
    conns: usize,
    workers: usize,
    pinned: bool,
    bins: &Bins,
    opts: &SuiteOpts,
) -> Result<Figures, String> {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let all = format!("0-{}", sys::online_cpus().saturating_sub(1));
    let cpus = if pinned {
        opts.server_cpu.to_string()
    } else {
        all
    };
    if !pinned {
        sys::unpin().map_err(|e| format!("unpinning the client: {e}"))?;
    }
    let result = fanout_on(side, proto, conns, workers, addr, &cpus, bins, opts);
    if !pinned {
        sys::pin_to_cpu(opts.client_cpu)
            .map_err(|e| format!("pinning the client to CPU {}: {e}", opts.client_cpu))?;
    }
    result
}

#[allow(clippy::too_many_arguments)]
fn fanout_on(
    side: Side,
    proto: Proto,
    conns: usize,
    workers: usize,
    addr: SocketAddr,
    cpus: &str,
    bins: &Bins,
    opts: &SuiteOpts,
) -> Result<Figures, String> {
    let server = match side {
        Side::Wm => Server::start_wm(
            &bins.host,
            proto.scheme(),
            &bins.test_plugin,
            workers,
            addr.port(),
            cpus,
        )?,
        Side::Base => Server::start_base_group(&bins.baseline, addr.port(), cpus)?,
    };
    let cfg = FanoutConfig {
        proto,
        addr,
        more_addrs: Vec::new(),
        conns,
        sources: auto_sources(conns),
        rounds: opts.fanout_rounds.max(1),
        warmup_rounds: 1,
        size: 32,
        round_timeout: Duration::from_secs(5),
    };
    // Once every member is visible: how the connections are spread, and the
    // server processes (master and workers) whose CPU time is counted.
    let mut spread = String::new();
    let mut pids: Vec<u32> = Vec::new();
    let mut cpu0 = 0.0;
    let report = fanout::run(&cfg, &mut || {
        if let Some(st) = server.wm_status() {
            let ws = st["workers"].as_array().cloned().unwrap_or_default();
            spread = ws
                .iter()
                .map(|w| w["stats"]["connections"].to_string())
                .collect::<Vec<_>>()
                .join(" / ");
            pids = ws
                .iter()
                .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
                .collect();
            if let Some(m) = st["master_pid"].as_u64() {
                pids.push(m as u32);
            }
        } else {
            spread = "1 (one process)".into();
            pids = server.pids();
        }
        cpu0 = pids.iter().filter_map(|&p| sys::cpu_seconds(p)).sum();
    })
    .map_err(|e| e.to_string())?;
    let cpu1: f64 = pids.iter().filter_map(|&p| sys::cpu_seconds(p)).sum();
    drop(server);
    let broadcasts = (cfg.warmup_rounds + cfg.rounds) as f64;
    let cpu_ms = (cpu1 - cpu0).max(0.0) * 1e3 / broadcasts;
    let last: Vec<f64> = report.rounds.iter().map(|r| r.last_ms).collect();
    let first: Vec<f64> = report.rounds.iter().map(|r| r.first_ms).collect();
    let p50: Vec<f64> = report.rounds.iter().map(|r| r.p50_ms).collect();
    let short = report
        .rounds
        .iter()
        .filter(|r| r.received < report.joined)
        .count();
    Ok(Figures {
        value: median(&last),
        samples: last,
        open: report.joined,
        errors: report.errors,
        wrong: report.wrong,
        note: format!(
            "first client had it after {:.1} ms, half of them after {:.1} ms (medians); \
             {} joined, {} errors, {} wrong; {} of {} rounds missed someone within 5 s; \
             connections per process {spread}; server CPU (all its processes) \
             {cpu_ms:.0} ms per broadcast (clock ticks of 10 ms); joining took {:.1} s, and `count g` showed \
             every member {:.0} ms after the last join was answered",
            median(&first),
            median(&p50),
            report.joined,
            report.errors,
            report.wrong,
            short,
            report.rounds.len(),
            report.setup.as_secs_f64(),
            report.visible_after.as_secs_f64() * 1e3
        ),
        ..Figures::default()
    })
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

/// The table rows of the ABI, cold start and fan-out scenarios; false for
/// the others.
fn special_rows(md: &mut String, o: &Outcome, opts: &SuiteOpts) -> bool {
    let name = &o.scenario.name;
    let fail = |r: &Result<Figures, String>| match r {
        Ok(_) => "ok".to_string(),
        Err(e) if e.starts_with("skipped") || e.starts_with("n/a") => e.clone(),
        Err(e) => format!("failed: {}", e.lines().next().unwrap_or("")),
    };
    match o.scenario.kind {
        Kind::Abi => {
            let (Ok(abi), Ok(direct)) = (&o.wm, &o.base) else {
                let _ = writeln!(md, "| {name} | {} | {} | – | |", fail(&o.wm), fail(&o.base));
                return true;
            };
            for (a, d, label, target) in ABI_PAIRS {
                let (Some(x), Some(y)) = (estimate(abi, a), estimate(direct, d)) else {
                    continue;
                };
                let _ = writeln!(
                    md,
                    "| {label} | {x:.2} ns | {y:.2} ns | {:+.2} ns | {target} |",
                    x - y
                );
            }
        }
        Kind::ColdStart => {
            let row = format!(
                "cold start: spawn to first echo, median of {}",
                opts.cold_runs.max(1)
            );
            match (&o.wm, &o.base) {
                (Ok(w), Ok(b)) => {
                    let _ = writeln!(
                        md,
                        "| {row} | {:.1} ms | {:.1} ms | {} | |",
                        w.value,
                        b.value,
                        ratio(w.value, b.value)
                    );
                }
                (w, b) => {
                    let _ = writeln!(md, "| {row} | {} | {} | – | |", fail(w), fail(b));
                }
            }
        }
        Kind::Allocs { .. } => {
            let cell = |r: &Result<Figures, String>| match r {
                Ok(f) => format!("{:.2} ({:.0} B)", f.allocs_per_msg, f.alloc_bytes_per_msg),
                Err(_) => fail(r),
            };
            let _ = writeln!(
                md,
                "| {name}: allocations (bytes) per message | {} | {} | – | 0 |",
                cell(&o.wm),
                cell(&o.base)
            );
        }
        Kind::Fanout { .. } => {
            let row = format!(
                "{name}: last client has it, median of {}",
                opts.fanout_rounds.max(1)
            );
            let cell = |r: &Result<Figures, String>| match r {
                Ok(f) => format!("{:.1} ms", f.value),
                Err(_) => fail(r),
            };
            let ratio = match (&o.wm, &o.base) {
                (Ok(w), Ok(b)) => ratio(w.value, b.value),
                _ => "–".into(),
            };
            let _ = writeln!(
                md,
                "| {row} | {} | {} | {ratio} | < 50 ms |",
                cell(&o.wm),
                cell(&o.base)
            );
        }
        _ => return false,
    }
    true
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
         interleaved; rates and latencies are the best undisturbed run's (a run is disturbed \
         when other processes took over 10% of the server's core; up to two more runs replace \
         it), per-CPU-second figures pool every run; suite took {:.0} s",
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
         command -v valgrind || apt-get install -y valgrind\n\
         cargo build --release --workspace\n\
         cargo bench -p plugin-api --bench abi --no-run\n\
         target/release/wm-bench suite --out bench/RESULTS.md\n```\n"
    );
    let _ = writeln!(
        md,
        "Each echo, HTTP and idle scenario starts a fresh wm-host (`taskset -c {s} wm-host start -d`, one worker, \
         `count = 1` unless the scenario says otherwise, the echo plugin, or `bench-hello-plugin` for HTTP) and then a fresh \
         `taskset -c {s} wm-baseline --proto P --listen 127.0.0.1:PORT`, and drives both with \
         the same client on CPU {c}:\n",
        s = opts.server_cpu,
        c = opts.client_cpu
    );
    for o in outcomes.iter().filter(|o| !o.client_cmd.is_empty()) {
        match o.scenario.kind {
            Kind::Abi => {
                let _ = writeln!(md, "- {}: `{}`", o.scenario.name, o.client_cmd);
            }
            // These describe themselves, with their own code spans.
            Kind::ColdStart | Kind::Fanout { .. } | Kind::Idle { .. } | Kind::Allocs { .. } => {
                let _ = writeln!(md, "- {}: {}", o.scenario.name, o.client_cmd);
            }
            _ => {
                let _ = writeln!(md, "- {}: `{}`", o.scenario.name, o.client_cmd);
            }
        }
    }
    let _ = writeln!(md, "\n## Results\n");
    let _ = writeln!(
        md,
        "Ratio = wm-host ÷ baseline, both measured in this run. Throughput and per-CPU-second \
         ratios want to be high, latency and memory ratios low. In the ABI rows the wm-host \
         column is the call through the plugin's FFI vtable, the baseline column the direct \
         call, and the ratio column their difference.\n"
    );
    let _ = writeln!(md, "| scenario | wm-host | baseline | ratio | target |");
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    for o in outcomes {
        let name = &o.scenario.name;
        if special_rows(&mut md, o, opts) {
            continue;
        }
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
                // Pipelined, wrk times batches, not requests: no latency row.
                if !matches!(o.scenario.kind, Kind::Http { pipeline: 2.., .. }) {
                    let _ = writeln!(
                        md,
                        "| {name}: p99 latency | {:.0} µs | {:.0} µs | {} | ≤ 1.50 |",
                        wm.p99_us,
                        base.p99_us,
                        ratio(wm.p99_us, base.p99_us)
                    );
                }
                let _ = writeln!(
                    md,
                    "| {name}: {unit} per server CPU-second, all runs | {} | {} | {} | ≥ 0.90 |",
                    num(wm.pooled_per_cpu_s()),
                    num(base.pooled_per_cpu_s()),
                    ratio(wm.pooled_per_cpu_s(), base.pooled_per_cpu_s())
                );
                if !wm.response.is_empty() || !base.response.is_empty() {
                    let same = if wm.response == base.response {
                        "identical"
                    } else {
                        "DIFFERENT"
                    };
                    let _ = writeln!(
                        md,
                        "| {name}: response bytes (the Date value aside) | {} B | {} B | {same} | identical |",
                        wm.response.len(),
                        base.response.len()
                    );
                }
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
                    if matches!(o.scenario.kind, Kind::Echo { .. }) {
                        let _ = write!(s, ", {} connections open at the end", f.open);
                    }
                    if f.runs.len() > 1 {
                        let rates: Vec<String> = f.runs.iter().map(|r| num(*r)).collect();
                        let _ = write!(s, "; best of runs at {}/s", rates.join(", "));
                        let per_cpu: Vec<String> = (f.cpu_runs.iter())
                            .map(|&(m, c)| num(if c > 0.0 { m as f64 / c } else { 0.0 }))
                            .collect();
                        let _ = write!(
                            s,
                            "; per CPU-s {} (all runs: {})",
                            per_cpu.join(", "),
                            num(f.pooled_per_cpu_s())
                        );
                    }
                    if !f.note.is_empty() {
                        let _ = write!(s, "; {}", f.note);
                    }
                    if !f.response.is_empty() {
                        let text = String::from_utf8_lossy(&f.response);
                        let _ = write!(s, "; response `{}`", text.escape_debug());
                    }
                    s
                }
                Err(e) if e.starts_with("skipped") || e.starts_with("n/a") => e.clone(),
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
         client is often the bottleneck of the messages/s figures. The rates and latencies are \
         those of each side's best-rate run; the per-CPU-second row pools every run of a side \
         (all its messages ÷ all its server CPU-seconds), since single runs of the same server \
         differ by up to 1.5× on an idle machine (the Details list each run's figure). \"Others on its core\" is \
         the server core's busy time (`/proc/stat`) less the server's: other processes that \
         disturbed the run (this machine is shared).\n\
         - HTTP: `wrk -t1 -c100` against `GET /` answered with `200 Hello, world!` \
         (`bench-hello-plugin` on wm-host); `wrong` counts non-2xx answers.\n\
         - HTTP plaintext: TechEmpower's plaintext test on one core: wrk with its headers and \
         its `pipeline.lua` (16 requests written at once per connection, the next 16 once all \
         are answered), `GET /plaintext` answered `200 Hello, World!` with `Server`, `Date`, \
         `Content-Type: text/plain` and `Content-Length` (wm-host adds `Connection: keep-alive` \
         to every answer, so the baseline does too). Before the load, two pipelined requests \
         to each server check the answers: the response row compares them byte for byte with \
         the `Date` value masked (the Details show them). wrk's latency is per batch of 16. \
         Requests per server CPU-second is the figure that holds on a shared machine. \
         Where the gap comes from: `bench/PROFILE.md`.\n\
         - Idle memory: warm-up connections are opened and used (one; with several server \
         processes 16 per process, until each holds one, seen in `/proc/PID/fd`), then the \
         server's RSS (`/proc/PID/statm`, summed over its serving processes) is read once two \
         readings 50 ms apart agree; then N \
         connections are opened from several 127.0.0.x source addresses (bind before connect, \
         `IP_BIND_ADDRESS_NO_PORT`), each completing the websocket handshake and one 8-byte \
         echo, and left idle; RSS is read again the same way. RSS per connection = growth ÷ N. \
         Kernel socket buffers are not in RSS. RLIMIT_NOFILE is per process, so counts above \
         12500 run one server process per 12500 (wm-host `count`, the workers' RSS, not the \
         master's; `wm-baseline --procs`, its children's) sharing the port by SO_REUSEPORT, and \
         one client process (`wm-bench idle-hold`) per 15000, each from its own source \
         addresses. A run counts only if every connection opened, the server processes hold \
         that many more descriptors, and for wm-host `status` counts every connection; \
         otherwise the row is an error.\n\
         - ABI overhead: criterion (`plugin-api/benches/abi.rs`, warm-up 1 s, 3 s measured \
         per benchmark, run by the suite on the client's CPU). A plugin object is built by \
         `plugin_api::adapter::create` (what `export_plugin!` runs; in-process, no dlopen) and \
         `on_message` is called through its FFI vtable as the host calls it, with a `HostCtx` \
         over a minimal host table (`send` counts bytes, the rest do nothing); the direct \
         counterpart calls the same `Plugin::on_message` through a `&mut dyn Plugin`. Each timed \
         round is 16 calls over 16 different slices of one buffer, as a read holding several \
         messages is handled; figures are ns per call (criterion's slope estimate; 95% \
         intervals in Details). `echo` calls `ctx.send` once: through the vtable that is two \
         boundary crossings; its `direct` form still calls `send` through the host table (a \
         `Context` has no other way), and `native` is the same logic with a `&mut dyn` plugin \
         calling a `&mut dyn` host. `on_message_spilled` passes each slice through \
         `black_box`, so it is stored to memory just before the call: had the 16-byte \
         `RSlice` gone on the stack (as it did while `Outcome` was returned through a hidden \
         pointer), reloading it would stall store-to-load forwarding.\n\
         - Cold start: the time from spawning `taskset -c S wm-host start -d` (a fresh runtime \
         folder, text echo plugin, `count = 1`; the master forks, binds, starts the worker, \
         which copies and loads the plugin) until a client, connecting and sending `ping\\n` \
         in a tight loop (a refused connect is retried at once; an accepted one waits for its \
         echo), first gets the echo; against spawning `wm-baseline --proto text` the same way. \
         Binaries and plugin are in the page cache (not a cold disk). Median of the runs, \
         sides interleaved; the Details also give when `start -d` itself returned.\n\
         - Heap allocations per message: the server runs under `valgrind --tool=dhat` \
         (wm-host with `--trace-children=yes`, which follows the workers the master \
         fork+execs; dhat writes one file per process, and the worker's is the one whose \
         command is `wm-host worker`; plugin code is counted with the worker's). One \
         connection (after the websocket handshake) sends N messages one at a time, each \
         answer checked, and the server is stopped with the connection still open \
         (`wm-host stop`; SIGTERM for the baseline); then the same with 2N. Per message = \
         (blocks allocated by the serving process in the 2N run − in the N run) ÷ N, summing \
         dhat's `tbk` (total blocks) over program points, and the same with `tb` (total \
         bytes); start-up, first-message buffers and shutdown cancel out. The Details name \
         the allocation sites that grew by at least one block per two messages, each by the \
         first frame on its stack that is a function of wm-host, plugin-api, a plugin or \
         the baseline.\n\
         - Broadcast fan-out: wm-host with `count = 4` workers and the test plugin \
         (`target/release/libtest_plugin.so`) on `websocket://`, all pinned to the server \
         CPU; the client (one `mio` loop) opens the connections from several 127.0.0.x \
         source addresses, each completes the handshake and sends `join g` (answered `ok`); \
         then one connection asks `count g` until it shows every member, because joins reach \
         the other workers through the master. One member then sends `gsend g <32 B payload>` \
         (delivered to every member, the sender included): the time runs from just before \
         that write until the last connection has the payload, where a message's arrival is \
         when `poll` returned with its socket readable (one clock reading per batch of \
         events, before they are read), so the client's own reading of earlier sockets can \
         only delay it. One warm-up broadcast, then the measured ones, 100 ms apart; the \
         figure is the median over broadcasts of the last arrival. The baseline is \
         `wm-baseline --proto ws-group` on the same CPUs: one process holding every \
         connection, answering `join g`/`count g` itself and writing the broadcast to each \
         member in one pass (one frame built once, one `write` per socket): the floor of \
         10,000 loopback writes on this machine, with no workers, bus or plugin.\n\
         - wm-baseline: one bare `mio` loop per process, no plugin, ABI, supervisor or IPC; \
         reads into one per-process buffer, keeps only incomplete messages per connection, \
         answers one read with one write; websocket frames by a small parser (UTF-8 checked \
         on text), unmasked and written by wm-proto's `apply_mask` and `write_frame`; HTTP \
         requests (and the websocket handshake) parsed by wm-proto's `HttpDecoder`, the one \
         wm-host uses, and answered with bytes prepared once and a `Date` formatted once a \
         second."
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_pool_divides_totals_not_averages_ratios() {
        let mut pool = CpuPool::default();
        assert_eq!(pool.per_cpu_s(), None);
        // 1,000 per CPU-second over 1 s and 3,000 over 3 s: the mean of the
        // ratios would be 2,000; all messages over all CPU time is 2,500.
        pool.add(1_000.0, 1.0);
        pool.add(9_000.0, 3.0);
        assert_eq!(pool.per_cpu_s(), Some(2_500.0));
    }

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
    fn masks_only_the_date_value() {
        let r = b"HTTP/1.1 200 OK\r\nServer: x\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n\
Content-Length: 5\r\n\r\nDate: hello";
        let m = mask_date(r);
        assert_eq!(
            String::from_utf8(m).unwrap(),
            format!(
                "HTTP/1.1 200 OK\r\nServer: x\r\nDate: {}\r\nContent-Length: 5\r\n\r\nDate: hello",
                "#".repeat(29)
            )
        );
        assert_eq!(
            mask_date(b"HTTP/1.1 200 OK\r\n\r\n"),
            b"HTTP/1.1 200 OK\r\n\r\n"
        );
    }

    #[test]
    fn every_scenario_has_a_distinct_name() {
        let s = scenarios(&[10_000, 100_000], 10_000, 2000);
        let names: std::collections::HashSet<_> = s.iter().map(|s| &s.name).collect();
        assert_eq!(names.len(), s.len());
    }

    #[test]
    fn sources_grow_with_connections() {
        assert_eq!(auto_sources(10_000), 4);
        assert_eq!(auto_sources(100_000), 7);
    }
}
