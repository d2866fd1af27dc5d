//! Live handover on reload, measured (issue 11's benchmark): how long
//! moving idle websocket connections to a new worker takes, what reloads
//! every 200 ms do to echo latency, and how many keep-alive HTTP requests
//! 100 reloads under `wrk` cost, with `reload_mode = "drain"` for contrast.
//!
//! Part of `wm-bench suite` (a section of its own at the end of the
//! report), or alone: `wm-bench handover --out bench/RESULTS.md` replaces
//! just that section of the file. Every scenario runs wm-host with
//! bench-hello-plugin, which opts in to handover and carries no state.

mod fleet;
mod host;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleet::Fleet;
use host::{Host, Reload};

use crate::suite::{auto_sources, free_port, Bins};
use crate::sys;

/// The handover scenarios' settings (also `wm-bench suite`'s).
#[derive(clap::Args, Debug, Clone)]
pub struct HandoverOpts {
    /// Idle websocket connection counts whose handover is timed (one worker).
    #[arg(
        long = "handover-conns",
        value_delimiter = ',',
        default_value = "1000,10000"
    )]
    pub conns: Vec<usize>,
    /// Workers of one more row at the largest count (0 or 1: no such row).
    #[arg(long = "handover-workers", default_value_t = 4)]
    pub workers: usize,
    /// Echo latency under reloads: connections…
    #[arg(long = "handover-latency-conns", default_value_t = 200)]
    pub latency_conns: usize,
    /// …messages per second over all of them (a fixed schedule)…
    #[arg(long = "handover-latency-rate", default_value_t = 10_000)]
    pub latency_rate: u64,
    /// …seconds measured without reloads, and as many with them…
    #[arg(long = "handover-latency-secs", default_value = "5", value_parser = crate::parse_secs)]
    pub latency_secs: Duration,
    /// …and seconds from one reload's start to the next.
    #[arg(long = "handover-reload-every", default_value = "0.2", value_parser = crate::parse_secs)]
    pub reload_every: Duration,
    /// Reloads under wrk's keep-alive load (each reload mode).
    #[arg(long = "handover-reloads", default_value_t = 100)]
    pub reloads: usize,
    /// wrk's connections.
    #[arg(long = "handover-wrk-conns", default_value_t = 50)]
    pub wrk_conns: usize,
    /// Leave the handover scenarios out.
    #[arg(long = "no-handover")]
    pub skip: bool,
}

/// `wm-bench handover`: the handover scenarios alone.
#[derive(clap::Args, Debug)]
pub struct HandoverCmd {
    #[command(flatten)]
    pub opts: HandoverOpts,
    /// Only scenarios whose name contains this text.
    #[arg(long)]
    pub only: Option<String>,
    /// Markdown file whose `## Handover` section is replaced (or appended).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    #[arg(long, default_value_t = 1)]
    pub client_cpu: usize,
}

#[derive(Clone, Copy)]
enum Kind {
    /// `conns` idle websocket connections over `workers` workers, one reload.
    Time { conns: usize, workers: usize },
    /// Echo at a fixed rate, without reloads, then with reloads.
    Latency,
    /// wrk keep-alive over many reloads, handover then drain.
    Http,
}

struct Scenario {
    name: String,
    kind: Kind,
}

fn scenarios(o: &HandoverOpts) -> Vec<Scenario> {
    let mut v = Vec::new();
    let plural = |n: usize| if n == 1 { "" } else { "s" };
    for &conns in &o.conns {
        v.push(Scenario {
            name: format!("handover: {conns} idle websocket connections, 1 worker"),
            kind: Kind::Time { conns, workers: 1 },
        });
    }
    if let Some(&most) = o.conns.iter().max() {
        if o.workers > 1 {
            v.push(Scenario {
                name: format!(
                    "handover: {most} idle websocket connections, {} worker{}",
                    o.workers,
                    plural(o.workers)
                ),
                kind: Kind::Time {
                    conns: most,
                    workers: o.workers,
                },
            });
        }
    }
    v.push(Scenario {
        name: format!(
            "handover: websocket echo, {} conns, {} msg/s in all, reloads every {} ms vs none",
            o.latency_conns,
            o.latency_rate,
            o.reload_every.as_millis()
        ),
        kind: Kind::Latency,
    });
    v.push(Scenario {
        name: format!(
            "handover: HTTP keep-alive, wrk 1 thread × {} conns, {} reloads",
            o.wrk_conns, o.reloads
        ),
        kind: Kind::Http,
    });
    v
}

/// One table row after the scenario's name.
pub struct Row {
    what: String,
    value: String,
    reference: String,
    ratio: String,
    target: String,
}

fn row(
    what: impl Into<String>,
    value: String,
    reference: String,
    ratio: String,
    target: &str,
) -> Row {
    Row {
        what: what.into(),
        value,
        reference,
        ratio,
        target: target.into(),
    }
}

/// One scenario's outcome.
pub struct Done {
    name: String,
    command: String,
    result: Result<(Vec<Row>, String), String>,
}

/// Runs the scenarios whose name contains `only` (all without it).
pub fn run(
    bins: &Bins,
    o: &HandoverOpts,
    only: Option<&str>,
    server_cpu: usize,
    client_cpu: usize,
) -> Vec<Done> {
    if o.skip {
        return Vec::new();
    }
    let cpus = Cpus {
        server: server_cpu,
        client: client_cpu,
    };
    let mut done = Vec::new();
    for sc in scenarios(o) {
        if only.is_some_and(|t| !sc.name.contains(t)) {
            continue;
        }
        eprintln!("== {}", sc.name);
        let command = command(sc.kind, o, cpus);
        let result = match sc.kind {
            Kind::Time { conns, workers } => time(bins, conns, workers, cpus),
            Kind::Latency => latency(bins, o, cpus),
            Kind::Http => http(bins, o, cpus),
        };
        match &result {
            Ok((rows, details)) => {
                for r in rows {
                    eprintln!(
                        "   {}: {} (reference {}) {}",
                        r.what, r.value, r.reference, r.ratio
                    );
                }
                eprintln!("   {details}");
            }
            Err(e) => eprintln!("   FAILED: {e}"),
        }
        done.push(Done {
            name: sc.name,
            command,
            result,
        });
    }
    done
}

#[derive(Clone, Copy)]
struct Cpus {
    server: usize,
    client: usize,
}

fn command(kind: Kind, o: &HandoverOpts, cpus: Cpus) -> String {
    let s = cpus.server;
    match kind {
        Kind::Time { conns, workers } => format!(
            "`taskset -c {s} wm-host start -d` (`websocket://`, `count = {workers}`, \
             bench-hello-plugin); {conns} websocket connections from {} source addresses, each \
             with its handshake and one echo; one echo on each (the reference); then \
             `wm-host reload`, and right after it returns one echo on each again",
            auto_sources(conns)
        ),
        Kind::Latency => format!(
            "`taskset -c {s} wm-host start -d` (`websocket://`, `count = 1`, bench-hello-plugin); \
             {} connections, one {} B message every {:.0} µs in turn (open loop: nothing waits \
             for an echo); 1 s warm-up, then {} cycles of 1 s without reloads, 1 s with `wm-host \
             reload` started every {} ms (or as soon as the previous one returned) and 300 ms \
             not counted; then the same load for {:.0} s against `taskset -c {s} wm-baseline \
             --proto websocket` (the floor)",
            o.latency_conns,
            fleet::SIZE,
            1e6 / o.latency_rate.max(1) as f64,
            o.latency_secs.as_secs_f64().ceil().max(1.0),
            o.reload_every.as_millis(),
            o.latency_secs.as_secs_f64(),
        ),
        Kind::Http => format!(
            "`taskset -c {s} wm-host start -d` (`http://`, `count = 1`, bench-hello-plugin, \
             `reload_mode = \"handover\"`, then a fresh one with `\"drain\"`); `taskset -c {c} \
             wrk -t1 -c{} -d300s --latency http://127.0.0.1:PORT/`; after 1 s, {} `wm-host \
             reload` one after the other; 1 s later wrk is stopped by SIGINT and prints its totals",
            o.wrk_conns,
            o.reloads,
            c = cpus.client
        ),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// TCP segments retransmitted on this machine so far (`/proc/net/snmp`):
/// on loopback they mean drops, each costing a retransmission timeout
/// (200 ms or more) to some message, often another process's load.
fn retransmits() -> Option<u64> {
    let snmp = std::fs::read_to_string("/proc/net/snmp").ok()?;
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next()?, tcp.next()?);
    let i = names.split_whitespace().position(|n| n == "RetransSegs")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Reloads per handover-time scenario (the figures are their medians).
const TIME_ROUNDS: usize = 3;

/// Busy share of `cpu` over a scenario (every process, ours included): how
/// disturbed the run was on this shared machine.
struct Busy {
    cpu: usize,
    t0: Instant,
    busy0: f64,
    retrans0: Option<u64>,
}

impl Busy {
    fn start(cpu: usize) -> Busy {
        Busy {
            cpu,
            t0: Instant::now(),
            busy0: sys::core_busy_seconds(cpu).unwrap_or(0.0),
            retrans0: retransmits(),
        }
    }

    /// `ours`: CPU seconds of `whose` processes meanwhile, if known.
    fn text(&self, ours: Option<f64>, whose: &str) -> String {
        let busy = sys::core_busy_seconds(self.cpu).unwrap_or(0.0) - self.busy0;
        let secs = self.t0.elapsed().as_secs_f64();
        let others = match ours {
            Some(o) => format!(
                ", {:.0}% by other processes than {whose}",
                100.0 * (busy - o).max(0.0) / secs
            ),
            None => format!(" (by every process, {whose} included)"),
        };
        let retrans = match self.retrans0.zip(retransmits()) {
            Some((a, b)) => format!(
                "; {} TCP segments retransmitted machine-wide meanwhile",
                b - a
            ),
            None => String::new(),
        };
        format!(
            "CPU {} was busy {:.0}% of the {secs:.1} s{others}{retrans}",
            self.cpu,
            100.0 * busy / secs,
        )
    }
}

/// CPU seconds of the whole server so far: the master, with the workers it
/// has reaped (cutime, cstime), and the workers alive now. The difference
/// of two readings counts workers that came and went in between.
fn server_cpu(host: &Host) -> Option<f64> {
    let st = host.status()?;
    let master = st["master_pid"].as_u64()? as u32;
    let stat = std::fs::read_to_string(format!("/proc/{master}/stat")).ok()?;
    let f: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime, stime, cutime, cstime: fields 14 to 17, 11 to 14 after "(comm)".
    let ticks: u64 = (11..15)
        .map(|i| f.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum::<Option<u64>>()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let workers: f64 = (st["workers"].as_array().cloned().unwrap_or_default().iter())
        .filter_map(|w| w["pid"].as_u64())
        .filter_map(|p| sys::cpu_seconds(p as u32))
        .sum();
    Some(ticks as f64 / tck + workers)
}

/// One reload of the handover-time scenario.
struct Round {
    r: Reload,
    /// The longest any trickle message waited for its echo during the
    /// reload, and how many were sent.
    wait_max: Duration,
    trickled: usize,
    /// From spawning `reload` until it returned, and then until every
    /// connection echoed.
    returned: Duration,
    probe: Duration,
    answered: usize,
    handed: Vec<(u64, f64)>,
    took: Vec<(u64, f64)>,
    after: Vec<(u32, u64)>,
    replaced: bool,
    old_alive: usize,
}

impl Round {
    fn outside(&self) -> Duration {
        self.returned + self.probe
    }
}

/// Messages per second, to the connections in turn, while a reload of the
/// handover-time scenario runs: one that lands on a frozen connection waits
/// until the new worker serves it, so the longest wait is how long the
/// connections were out of service, seen from outside.
const TRICKLE_RATE: f64 = 2000.0;

/// Runs `wm-host reload` while sending the trickle; returns the reload, when
/// it returned, and every trickle message's wait.
fn reload_with_trickle(
    host: &Host,
    fleet: &mut Fleet,
) -> Result<(Reload, Duration, Vec<Duration>), String> {
    let t0 = Instant::now();
    let mut waits = Vec::new();
    std::thread::scope(|s| {
        let reloader = s.spawn(|| {
            let r = host.reload();
            (r, t0.elapsed())
        });
        let mut record = |_: usize, _: Instant, lat: Duration| waits.push(lat);
        let sent = (|| -> std::io::Result<()> {
            let interval = Duration::from_secs_f64(1.0 / TRICKLE_RATE);
            let n = fleet.open_count().max(1);
            let (mut next, mut i) = (t0, 0);
            while !reloader.is_finished() {
                let now = Instant::now();
                while next <= now {
                    fleet.send(i, now);
                    i = (i + 1) % n;
                    next += interval;
                }
                let wait = next.saturating_duration_since(Instant::now());
                fleet.pump(wait.min(Duration::from_millis(2)), &mut record)?;
            }
            fleet.drain(Duration::from_secs(5), &mut record)
        })();
        let (r, returned) = reloader.join().map_err(|_| "the reload thread panicked")?;
        sent.map_err(|e| e.to_string())?;
        Ok((r, returned, waits))
    })
}

/// Handover time for `conns` idle websocket connections.
fn time(
    bins: &Bins,
    conns: usize,
    workers: usize,
    cpus: Cpus,
) -> Result<(Vec<Row>, String), String> {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let host = Host::start(bins, "websocket", workers, port, false, cpus.server)?;
    let t = Instant::now();
    let mut fleet = Fleet::open(addr, conns, auto_sources(conns), Duration::from_secs(60))
        .map_err(|e| format!("opening {conns} connections: {e}"))?;
    let opened = t.elapsed();
    if fleet.open_count() != conns {
        return Err(format!(
            "{} of {conns} connections opened: {}",
            fleet.open_count(),
            fleet.first_error().unwrap_or("")
        ));
    }
    let first = host.workers();
    let held: u64 = first.iter().map(|w| w.1).sum();
    if held != conns as u64 {
        return Err(format!(
            "the clients hold {conns} connections, wm-host status counts {held}"
        ));
    }
    let (answered, probe_before) = fleet
        .probe_all(Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    if answered != conns {
        return Err(format!("{answered} of {conns} answered before the reload"));
    }
    let busy = Busy::start(cpus.server);
    let cpu0 = server_cpu(&host);
    let mut rounds = Vec::new();
    let mut before = first.clone();
    for _ in 0..TIME_ROUNDS {
        let log0 = host.log_len();
        let (r, returned, waits) = reload_with_trickle(&host, &mut fleet)?;
        if !r.ok {
            return Err(format!("wm-host reload failed: {}", r.out.trim()));
        }
        let (answered, probe) = fleet
            .probe_all(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let after = host.workers();
        // The old workers go once they handed everything over.
        let end = Instant::now() + Duration::from_secs(5);
        while before.iter().any(|w| pid_alive(w.0)) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let log = host.log_since(log0);
        rounds.push(Round {
            wait_max: waits.iter().copied().max().unwrap_or_default(),
            trickled: waits.len(),
            returned,
            probe,
            answered,
            handed: host::handed_over(&log),
            took: host::took_over(&log),
            replaced: after.iter().all(|a| before.iter().all(|b| b.0 != a.0)),
            old_alive: before.iter().filter(|w| pid_alive(w.0)).count(),
            after: after.clone(),
            r,
        });
        before = after;
    }
    let disturbed = busy.text(
        cpu0.zip(server_cpu(&host)).map(|(a, b)| b - a),
        "the server's",
    );
    let st = host.status();
    let last = st
        .as_ref()
        .map(|s| s["groups"][0]["last_handover"].to_string())
        .unwrap_or_default();
    let host_ms: Vec<f64> = (rounds.iter())
        .map(|x| x.r.host_ms.map_or(f64::NAN, |v| v as f64))
        .collect();
    let outside: Vec<f64> = rounds.iter().map(|x| ms(x.outside())).collect();
    let waited: Vec<f64> = rounds.iter().map(|x| ms(x.wait_max)).collect();
    let old_ms: Vec<f64> = (rounds.iter())
        .map(|x| x.handed.iter().map(|h| h.1).sum())
        .collect();
    let lost = rounds.iter().map(|x| conns - x.answered).max().unwrap_or(0) as u64 + fleet.lost();
    let all = |v: &[f64], d: usize| -> String {
        v.iter()
            .map(|x| format!("{x:.d$}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let target = if conns >= 10_000 { "< 200 ms" } else { "" };
    let rows = vec![
        row(
            format!("moved in, per `wm-host reload` (median of {TIME_ROUNDS} reloads)"),
            format!("{:.0} ms", median(&mut host_ms.clone())),
            String::new(),
            "–".into(),
            target,
        ),
        row(
            format!(
                "longest echo wait during the reload (outside, {TRICKLE_RATE:.0} msg/s to the \
                 connections in turn; median of {TIME_ROUNDS})"
            ),
            format!("{:.1} ms", median(&mut waited.clone())),
            String::new(),
            "–".into(),
            target,
        ),
        row(
            "from `reload` to every connection echoing from the new build (outside; reference: \
             one echo on each before)",
            format!("{:.1} ms", median(&mut outside.clone())),
            format!("{:.1} ms", ms(probe_before)),
            "–".into(),
            "",
        ),
        row(
            "connections lost",
            format!("{lost} of {conns}"),
            String::new(),
            "–".into(),
            "0",
        ),
    ];
    let per = |v: &[(u64, f64)]| -> String {
        v.iter()
            .map(|(n, ms)| format!("{n} in {ms:.1} ms"))
            .collect::<Vec<_>>()
            .join(" + ")
    };
    let mut details = format!(
        "reloads' handover time (report) {} ms, old workers' (log) {} ms, longest echo wait \
         during the reload {} ms, reload to every connection echoing {} ms; \
         before the reloads one echo on every connection took {:.1} ms; ",
        all(&host_ms, 0),
        all(&old_ms, 1),
        all(&waited, 1),
        all(&outside, 1),
        ms(probe_before),
    );
    for (i, x) in rounds.iter().enumerate() {
        let _ = write!(
            details,
            "reload {}: {} handed over, {} refused, {} closed, in {} ms; `wm-host reload` \
             returned after {:.1} ms ({} trickle messages meanwhile, the longest wait {:.1} \
             ms), then one echo on every connection took {:.1} ms ({} answered); old worker log \"handed N connections over\" {}; new worker log \
             \"took over N connections\" {}; workers after {}, all new: {}, old still alive 5 s \
             later: {}; ",
            i + 1,
            x.r.moved,
            x.r.refused,
            x.r.closed,
            x.r.host_ms.unwrap_or(0),
            ms(x.returned),
            x.trickled,
            ms(x.wait_max),
            ms(x.probe),
            x.answered,
            per(&x.handed),
            per(&x.took),
            spread(&x.after),
            if x.replaced { "yes" } else { "NO" },
            x.old_alive,
        );
    }
    let _ = write!(
        details,
        "`status` last handover {last}; connections per worker at first {}; {} wrong echoes, \
         {} connections failed{}; opening took {:.1} s; {disturbed}",
        spread(&first),
        fleet.wrong(),
        fleet.dead(),
        fleet
            .first_error()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
        opened.as_secs_f64(),
    );
    Ok((rows, details))
}

fn spread(w: &[(u32, u64)]) -> String {
    w.iter()
        .map(|(p, n)| format!("{n} (pid {p})"))
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Latencies (ns) of one phase.
#[derive(Default)]
struct Phase {
    lat: Vec<u64>,
    sent: u64,
}

impl Phase {
    fn pct(&mut self, p: f64) -> f64 {
        if self.lat.is_empty() {
            return 0.0;
        }
        self.lat.sort_unstable();
        self.lat[((self.lat.len() - 1) as f64 * p).round() as usize] as f64 / 1e3
    }
}

/// The latency scenario's timeline: a warm-up, then cycles of a window
/// without reloads, one with, and a pause that is not counted (the last
/// reload's tail), so both sides see the same background.
struct Timeline {
    start: Instant,
    warmup: Duration,
    window: Duration,
    pause: Duration,
    cycles: u32,
}

impl Timeline {
    fn cycle(&self) -> Duration {
        2 * self.window + self.pause
    }

    fn end(&self) -> Instant {
        self.start + self.warmup + self.cycle() * self.cycles
    }

    /// 0: without reloads, 1: with, None: warm-up or pause.
    fn side(&self, t: Instant) -> Option<usize> {
        let since = t.checked_duration_since(self.start + self.warmup)?;
        if since >= self.cycle() * self.cycles {
            return None;
        }
        let into = since.as_secs_f64() % self.cycle().as_secs_f64();
        let w = self.window.as_secs_f64();
        if into < w {
            Some(0)
        } else if into < 2.0 * w {
            Some(1)
        } else {
            None
        }
    }

    /// Where the `k`th window with reloads starts.
    fn reloads_from(&self, k: u32) -> Instant {
        self.start + self.warmup + self.cycle() * k + self.window
    }
}

/// The open-loop sender: from `start` to `end`, one message every
/// `interval`, to the connections in turn, whatever the echoes do; a message
/// counts in `sent[side(t)]` (`None`: not counted).
fn drive(
    fleet: &mut Fleet,
    interval: Duration,
    start: Instant,
    end: Instant,
    side: &dyn Fn(Instant) -> Option<usize>,
    sent: &mut [u64],
    record: &mut dyn FnMut(usize, Instant, Duration),
) -> std::io::Result<()> {
    let n = fleet.open_count().max(1);
    let (mut next, mut i) = (start, 0);
    loop {
        let now = Instant::now();
        if now >= end {
            return Ok(());
        }
        while next <= now {
            if fleet.send(i, now) {
                if let Some(k) = side(now) {
                    sent[k] += 1;
                }
            }
            i = (i + 1) % n;
            next += interval;
        }
        let wait = next.saturating_duration_since(Instant::now());
        fleet.pump(wait.min(Duration::from_millis(5)), record)?;
    }
}

/// The same open-loop load against `wm-baseline --proto websocket` (no
/// plugin, no reloads): what this machine and client give at best.
fn floor(bins: &Bins, o: &HandoverOpts, cpus: Cpus) -> Result<(Phase, u64, String), String> {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let mut child = Command::new("taskset")
        .args(["-c", &cpus.server.to_string()])
        .arg(&bins.baseline)
        .args(["--proto", "websocket", "--listen"])
        .arg(addr.to_string())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("taskset: {e}"))?;
    let result = (|| {
        let end = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if Instant::now() > end {
                return Err("wm-baseline did not listen within 10 s".to_string());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let n = o.latency_conns.max(1);
        let mut fleet = Fleet::open(addr, n, 1, Duration::from_secs(30))
            .map_err(|e| format!("opening {n} connections to wm-baseline: {e}"))?;
        let interval = Duration::from_secs_f64(1.0 / o.latency_rate.max(1) as f64);
        let start = Instant::now();
        let from = start + Duration::from_secs(1);
        let end = from + o.latency_secs;
        let mut phase = Phase::default();
        let mut sent = [0u64];
        let r0 = retransmits();
        let side = |t: Instant| (t >= from && t < end).then_some(0);
        let mut record = |_: usize, t: Instant, lat: Duration| {
            if side(t).is_some() {
                phase.lat.push(lat.as_nanos() as u64);
            }
        };
        drive(
            &mut fleet,
            interval,
            start,
            end,
            &side,
            &mut sent,
            &mut record,
        )
        .and_then(|()| fleet.drain(Duration::from_secs(3), &mut record))
        .map_err(|e| e.to_string())?;
        phase.sent = sent[0];
        let retrans = r0
            .zip(retransmits())
            .map(|(a, b)| {
                format!(
                    ", {} TCP segments retransmitted machine-wide meanwhile",
                    b - a
                )
            })
            .unwrap_or_default();
        Ok((phase, fleet.in_flight() as u64 + fleet.lost(), retrans))
    })();
    // SAFETY: signals our own child by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    result
}

/// Echo latency with and without reloads, on the same connections.
fn latency(bins: &Bins, o: &HandoverOpts, cpus: Cpus) -> Result<(Vec<Row>, String), String> {
    let port = free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let host = Host::start(bins, "websocket", 1, port, false, cpus.server)?;
    let n = o.latency_conns.max(1);
    let mut fleet = Fleet::open(addr, n, 1, Duration::from_secs(30))
        .map_err(|e| format!("opening {n} connections: {e}"))?;
    if fleet.open_count() != n {
        return Err(format!("{} of {n} connections opened", fleet.open_count()));
    }
    let interval = Duration::from_secs_f64(1.0 / o.latency_rate.max(1) as f64);
    let window = Duration::from_secs(1);
    let tl = Timeline {
        start: Instant::now(),
        warmup: Duration::from_secs(1),
        window,
        pause: Duration::from_millis(300),
        cycles: (o.latency_secs.as_secs_f64() / window.as_secs_f64())
            .ceil()
            .max(1.0) as u32,
    };
    let busy = Busy::start(cpus.server);
    let client_busy = Busy::start(cpus.client);
    let client_cpu0 = sys::cpu_seconds(std::process::id());
    let cpu0 = server_cpu(&host);
    let end = tl.end();
    let mut phases = [Phase::default(), Phase::default()];
    let stop = AtomicBool::new(false);
    let mut reloads: Vec<Reload> = Vec::new();
    let result = std::thread::scope(|s| -> Result<(), String> {
        let reloader = s.spawn(|| {
            let mut done = Vec::new();
            // Reloads start at fixed points of each window with reloads
            // (or as soon as the previous one returned).
            let every = o.reload_every.max(Duration::from_millis(1));
            let per_window = (window.as_nanos() / every.as_nanos()).max(1) as u32;
            'cycles: for k in 0..tl.cycles {
                for j in 0..per_window {
                    let at = tl.reloads_from(k) + every * j;
                    while Instant::now() < at {
                        if stop.load(Ordering::Relaxed) {
                            break 'cycles;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    if stop.load(Ordering::Relaxed) {
                        break 'cycles;
                    }
                    done.push(host.reload());
                }
            }
            done
        });
        let mut record = |_: usize, sent: Instant, lat: Duration| {
            if let Some(k) = tl.side(sent) {
                phases[k].lat.push(lat.as_nanos() as u64);
            }
        };
        let mut sent = [0u64; 2];
        let run = (|| -> std::io::Result<()> {
            let side = |t: Instant| tl.side(t);
            drive(
                &mut fleet,
                interval,
                tl.start,
                end,
                &side,
                &mut sent,
                &mut record,
            )?;
            // Answers keep coming while the last reload finishes.
            while !reloader.is_finished() {
                fleet.pump(Duration::from_millis(5), &mut record)?;
            }
            fleet.drain(Duration::from_secs(3), &mut record)
        })();
        stop.store(true, Ordering::Relaxed);
        reloads = reloader.join().unwrap_or_default();
        phases[0].sent = sent[0];
        phases[1].sent = sent[1];
        run.map_err(|e| e.to_string())
    });
    result?;
    let disturbed = format!(
        "{}; client side: {} (the `wm-host reload` commands run there too)",
        busy.text(
            cpu0.zip(server_cpu(&host)).map(|(a, b)| b - a),
            "the server's"
        ),
        client_busy.text(
            client_cpu0
                .zip(sys::cpu_seconds(std::process::id()))
                .map(|(a, b)| b - a),
            "this client's",
        )
    );
    let unanswered = fleet.in_flight();
    let failed = reloads.iter().filter(|r| !r.ok).count();
    let mut walls: Vec<f64> = reloads.iter().map(|r| ms(r.wall)).collect();
    let mut hosts: Vec<f64> = (reloads.iter())
        .filter_map(|r| r.host_ms)
        .map(|v| v as f64)
        .collect();
    let moved: Vec<u64> = reloads.iter().map(|r| r.moved).collect();
    let [mut quiet, mut busy_side] = phases;
    let mut rows = Vec::new();
    for (what, p) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
        let (w, q) = (busy_side.pct(p), quiet.pct(p));
        rows.push(row(
            format!("{what} echo latency with reloads (reference: without)"),
            format!("{w:.0} µs"),
            format!("{q:.0} µs"),
            format!("{:.2}", if q > 0.0 { w / q } else { 0.0 }),
            "",
        ));
    }
    rows.push(row(
        "messages lost, connections lost, wrong echoes",
        format!(
            "{unanswered}, {}, {} of {} sent",
            fleet.lost(),
            fleet.wrong(),
            busy_side.sent + quiet.sent
        ),
        String::new(),
        "–".into(),
        "0",
    ));
    let spread = |p: &mut Phase| -> String {
        [0.9, 0.95, 0.999]
            .iter()
            .map(|&q| format!("p{} {:.0} µs", q * 100.0, p.pct(q)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (spread_busy, spread_quiet) = (spread(&mut busy_side), spread(&mut quiet));
    let details = format!(
        "with reloads {spread_busy}, without {spread_quiet}; \
         {} cycles of {:.0} ms without reloads, {:.0} ms with, {:.0} ms not counted; without: \
         {} echoes of {} sent; with: {} echoes of {} sent, {} reloads ({} failed{}), `wm-host \
         reload` took {:.1} ms median, {:.1} ms max, the reports' handover time {:.0} ms median, \
         {:.0} ms max, connections handed over per reload {}; 3 s after the last send \
         {unanswered} messages were unanswered and {} connections had failed{}; {disturbed}",
        tl.cycles,
        ms(tl.window),
        ms(tl.window),
        ms(tl.pause),
        quiet.lat.len(),
        quiet.sent,
        busy_side.lat.len(),
        busy_side.sent,
        reloads.len(),
        failed,
        reloads
            .iter()
            .find(|r| !r.ok)
            .map(|r| format!(": {}", r.out.trim().replace('\n', " ")))
            .unwrap_or_default(),
        median(&mut walls),
        walls.last().copied().unwrap_or(0.0),
        median(&mut hosts),
        hosts.last().copied().unwrap_or(0.0),
        match (moved.iter().min(), moved.iter().max()) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}–{b}"),
            _ => "–".into(),
        },
        fleet.dead(),
        fleet
            .first_error()
            .map(|e| format!(" (first: {e})"))
            .unwrap_or_default(),
    );
    drop(fleet);
    drop(host);
    let floor = match floor(bins, o, cpus) {
        Ok((mut p, lost, retrans)) => format!(
            "; the same load against wm-baseline (no plugin, no reloads; the floor of this \
             machine and client) in the same run: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs, {} \
             of {} unanswered{retrans}",
            p.pct(0.5),
            p.pct(0.99),
            p.pct(1.0),
            lost,
            p.sent
        ),
        Err(e) => format!("; the wm-baseline floor failed: {e}"),
    };
    Ok((rows, details + &floor))
}

/// What wrk printed, and the reloads meanwhile.
#[derive(Default)]
struct WrkRun {
    requests: u64,
    rate: f64,
    connect: u64,
    read: u64,
    write: u64,
    timeout: u64,
    non2xx: u64,
    p99: String,
    max: String,
    reloads: Vec<Reload>,
}

impl WrkRun {
    fn errors(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout + self.non2xx
    }

    fn cell(&self) -> String {
        format!(
            "{} (connect {}, read {}, write {}, timeout {}; non-2xx {}) in {:.2} M requests",
            self.errors(),
            self.connect,
            self.read,
            self.write,
            self.timeout,
            self.non2xx,
            self.requests as f64 / 1e6
        )
    }

    fn details(&self, mode: &str) -> String {
        let mut walls: Vec<f64> = self.reloads.iter().map(|r| ms(r.wall)).collect();
        let failed = self.reloads.iter().filter(|r| !r.ok).count();
        let moved: u64 = self.reloads.iter().map(|r| r.moved).sum();
        let closed: u64 = self.reloads.iter().map(|r| r.closed).sum();
        let handed = self.reloads.iter().filter(|r| r.host_ms.is_some()).count();
        format!(
            "{mode}: {} requests at {:.0}/s, p99 {}, max {}; {} reloads ({failed} failed), {handed} \
             of them with a handover ({moved} connections handed over, {closed} closed in all), \
             `wm-host reload` {:.1} ms median, {:.1} ms max",
            self.requests,
            self.rate,
            self.p99,
            self.max,
            self.reloads.len(),
            median(&mut walls),
            walls.last().copied().unwrap_or(0.0)
        )
    }
}

fn parse_wrk(text: &str, into: &mut WrkRun) -> bool {
    let mut seen = false;
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        let n = |s: &str| s.trim_end_matches(',').parse::<u64>().unwrap_or(0);
        match t.as_slice() {
            [r, "requests", "in", ..] => {
                into.requests = n(r);
                seen = true;
            }
            ["Socket", "errors:", "connect", c, "read", r, "write", w, "timeout", to] => {
                (into.connect, into.read, into.write, into.timeout) = (n(c), n(r), n(w), n(to));
            }
            ["Non-2xx", "or", "3xx", "responses:", v] => into.non2xx = n(v),
            ["Requests/sec:", v] => into.rate = v.parse().unwrap_or(0.0),
            ["99%", v] => into.p99 = v.to_string(),
            ["Latency", _avg, _stdev, max, ..] => into.max = max.to_string(),
            _ => {}
        }
    }
    seen
}

fn wrk_under_reloads(
    bins: &Bins,
    o: &HandoverOpts,
    cpus: Cpus,
    drain: bool,
) -> Result<WrkRun, String> {
    let port = free_port();
    let host = Host::start(bins, "http", 1, port, drain, cpus.server)?;
    let child = Command::new("taskset")
        .args(["-c", &cpus.client.to_string(), "wrk", "-t1"])
        .arg(format!("-c{}", o.wrk_conns))
        .args(["-d300s", "--latency"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("wrk: {e}"))?;
    std::thread::sleep(Duration::from_secs(1));
    let mut run = WrkRun::default();
    for _ in 0..o.reloads {
        run.reloads.push(host.reload());
    }
    std::thread::sleep(Duration::from_secs(1));
    // wrk prints its totals when interrupted. `taskset` exec'd it: same pid.
    // SAFETY: signals our own child by its pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().map_err(|e| format!("wrk: {e}"))?;
    drop(host);
    let text = String::from_utf8_lossy(&out.stdout);
    if !parse_wrk(&text, &mut run) {
        return Err(format!(
            "unreadable wrk output: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(run)
}

/// wrk's errors over many reloads: handover, then drain.
fn http(bins: &Bins, o: &HandoverOpts, cpus: Cpus) -> Result<(Vec<Row>, String), String> {
    let has_wrk = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("wrk").is_file()));
    if !has_wrk {
        return Err("wrk is not installed (apt-get install wrk)".into());
    }
    let handover = wrk_under_reloads(bins, o, cpus, false)?;
    let drain = wrk_under_reloads(bins, o, cpus, true);
    let reference = match &drain {
        Ok(d) => format!("`reload_mode = \"drain\"`: {}", d.cell()),
        Err(e) => format!("drain failed: {e}"),
    };
    let rows = vec![row(
        "wrk socket errors and non-2xx answers (reference: `reload_mode = \"drain\"`)",
        handover.cell(),
        reference,
        "–".into(),
        "0",
    )];
    let mut details = handover.details("handover");
    if let Ok(d) = &drain {
        let _ = write!(details, "; {}", d.details("drain"));
    }
    Ok((rows, details))
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

/// The `## Handover` section of the report.
pub fn section(
    done: &[Done],
    o: &HandoverOpts,
    server_cpu: usize,
    client_cpu: usize,
    took: Duration,
) -> String {
    let mut md = String::new();
    let git = cmd_out("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !cmd_out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    let _ = writeln!(md, "## Handover\n");
    let _ = writeln!(
        md,
        "Live handover on reload (issue 11): connections moved to the new build instead of \
         closed. Written by `make bench` with the rest, or alone by `make bench-handover`, \
         which replaces only this section.\n"
    );
    let _ = writeln!(
        md,
        "- date: {}; commit: {git}{}\n- servers pinned to CPU {server_cpu}; the client \
         (wm-bench, wrk, the `wm-host reload` commands) to CPU {client_cpu}; these scenarios \
         took {:.0} s",
        cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        },
        took.as_secs_f64()
    );
    let _ = writeln!(md, "\n### Commands\n");
    let _ = writeln!(
        md,
        "```sh\nmake bench-handover\n# which is:\ncommand -v wrk || apt-get install -y wrk\n\
         cargo build --release --workspace\ntarget/release/wm-bench handover --out bench/RESULTS.md\n\
         # one of them: … --only 'handover: 10000 idle'\n```\n"
    );
    for d in done {
        let _ = writeln!(md, "- {}: {}", d.name, d.command);
    }
    let _ = writeln!(md, "\n### Results\n");
    let _ = writeln!(
        md,
        "The reference is measured in the same run, on the same server and connections where \
         it can be; ratio = measured ÷ reference.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | measured | reference (same run) | ratio | target |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---|");
    for d in done {
        match &d.result {
            Ok((rows, _)) => {
                for r in rows {
                    let _ = writeln!(
                        md,
                        "| {}: {} | {} | {} | {} | {} |",
                        d.name, r.what, r.value, r.reference, r.ratio, r.target
                    );
                }
            }
            Err(e) => {
                let _ = writeln!(
                    md,
                    "| {} | failed: {} | | – | |",
                    d.name,
                    e.lines().next().unwrap_or("").replace('|', "/")
                );
            }
        }
    }
    let _ = writeln!(md, "\n### Details\n");
    let _ = writeln!(md, "| scenario | figures |");
    let _ = writeln!(md, "|---|---|");
    for d in done {
        let text = match &d.result {
            Ok((_, details)) => details.clone(),
            Err(e) => format!("failed: {}", e.replace('\n', " ")),
        };
        let _ = writeln!(md, "| {} | {} |", d.name, text.replace('|', "/"));
    }
    let _ = writeln!(md, "\n### Method\n");
    let _ = writeln!(
        md,
        "- Every scenario runs a fresh wm-host with bench-hello-plugin (its `handover()` is \
         true; it exports and imports nothing) and reloads it onto the same build: a reload \
         always replaces every worker of a reloadable group, whose new worker takes the old \
         one's connections over (`reload_mode = \"handover\"`, the default).\n\
         - Handover time: N websocket connections (handshake and one echo each, then idle), \
         counted by `wm-host status`. The host's own figure is the `in X ms` of `wm-host \
         reload`'s `connections: … handed over` line, summed over the group's workers (they \
         roll one after another): each new worker's time from the first message of the old \
         worker's export to having adopted every connection (its log line \"took over N \
         connections … in X ms\"); the Details add the old worker's log line, which starts \
         earlier, when it begins its export (freezing and serialising the connections), and \
         ends when the new worker confirms. The outside figure runs from spawning `wm-host \
         reload` until every connection has echoed one message sent right after the command \
         returned; it includes starting the new worker and loading the plugin. Its reference \
         is the same round of one echo per connection just before the reload. While the \
         reload runs, {} messages per second go to the connections in turn: one that lands \
         on a frozen connection waits until the new worker serves it, so the longest wait \
         is how long connections were out of service (from the old worker's freeze until \
         the new one polls them), which the host's own figure does not cover whole. \
         Connections lost: those that did not echo, or were closed, by then; the Details \
         also check that the workers are new processes and the old ones exited.\n\
         - Echo latency: one client loop holds the connections and writes one {} B message \
         every 1/rate seconds, to the connections in turn, whatever the echoes do; latency runs \
         from writing a message to the `poll` that returned its echo, counted in the phase it \
         was sent in. The same connections and server first run without reloads, then with a \
         thread that starts `wm-host reload` every {} ms (the next one once the previous has \
         returned). Windows of 1 s without and 1 s with reloads alternate (then 300 ms not \
         counted, for the last reload's tail), so both sides see the same background load. \
         Every echo is checked byte for byte and in order; messages lost are those \
         unanswered 3 s after the last send. The Details add the same load against \
         `wm-baseline --proto websocket` (no plugin, no reloads), the floor of this machine \
         and client, and how busy both CPUs were and how many TCP segments were \
         retransmitted machine-wide meanwhile (on loopback a retransmission means a drop and \
         a timeout of 200 ms or more; this machine is shared with other builds and \
         benchmarks). A reload also starts a process and loads the plugin on the server's \
         core; the handover itself is the reports' handover time.\n\
         - HTTP keep-alive: wrk against `GET /` (`200 Hello, world!`); wrk counts a request on \
         a keep-alive connection that the server closes after wrk wrote it as a read error, so \
         `reload_mode = \"drain\"` (connections closed cleanly, `Connection: close`) shows \
         errors by design; handover shows the connections were kept.",
        TRICKLE_RATE,
        fleet::SIZE,
        o.reload_every.as_millis()
    );
    md
}

/// Replaces the `## Handover` section of `text` (up to the next `## `
/// heading), or appends it.
pub fn splice(text: &str, section: &str) -> String {
    splice_named(text, "## Handover", section)
}

/// The commit, short, with a note when the tree has uncommitted changes.
pub fn git_head() -> String {
    let git = cmd_out("git", &["rev-parse", "--short", "HEAD"]);
    let dirty = !cmd_out("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
    format!(
        "{git}{}",
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        }
    )
}

pub fn utc_now() -> String {
    cmd_out("date", &["-u", "+%Y-%m-%d %H:%M UTC"])
}

/// Replaces the section headed `heading` (up to the next `## `), or appends it.
pub fn splice_named(text: &str, heading: &str, section: &str) -> String {
    let mut out = String::new();
    let mut lines = text.split_inclusive('\n').peekable();
    let mut placed = false;
    while let Some(line) = lines.next() {
        if line.trim_end() == heading && !placed {
            out.push_str(section);
            placed = true;
            while lines.peek().is_some_and(|l| !l.starts_with("## ")) {
                lines.next();
            }
            if lines.peek().is_some() {
                out.push('\n');
            }
            continue;
        }
        out.push_str(line);
    }
    if !placed {
        if !out.is_empty() && !out.ends_with("\n\n") {
            out.push('\n');
        }
        out.push_str(section);
    }
    out
}

/// `wm-bench handover`.
pub fn main(cmd: HandoverCmd) -> Result<(), String> {
    let bins = Bins::find()?;
    let most = cmd.opts.conns.iter().copied().max().unwrap_or(0) as u64;
    sys::raise_nofile(most + 4096);
    sys::pin_to_cpu(cmd.client_cpu)
        .map_err(|e| format!("pinning the client to CPU {}: {e}", cmd.client_cpu))?;
    let started = Instant::now();
    let done = run(
        &bins,
        &cmd.opts,
        cmd.only.as_deref(),
        cmd.server_cpu,
        cmd.client_cpu,
    );
    let md = section(
        &done,
        &cmd.opts,
        cmd.server_cpu,
        cmd.client_cpu,
        started.elapsed(),
    );
    println!("{md}");
    if let Some(out) = &cmd.out {
        let old = std::fs::read_to_string(out).unwrap_or_default();
        std::fs::write(out, splice(&old, &md)).map_err(|e| format!("{}: {e}", out.display()))?;
        eprintln!("wrote the Handover section of {}", out.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_the_section_in_place() {
        let s = "## Handover\n\nnew\n";
        assert_eq!(
            splice("# R\n\n## A\n\na\n", s),
            "# R\n\n## A\n\na\n\n## Handover\n\nnew\n"
        );
        assert_eq!(
            splice("# R\n\n## Handover\n\nold\n### x\nold\n\n## B\n\nb\n", s),
            "# R\n\n## Handover\n\nnew\n\n## B\n\nb\n"
        );
        assert_eq!(
            splice("# R\n\n## Handover\n\nold\n", s),
            "# R\n\n## Handover\n\nnew\n"
        );
    }

    #[test]
    fn reads_wrk_errors_one_by_one() {
        let mut r = WrkRun::default();
        let text = "  1 threads and 50 connections\n    Latency     2.03ms    3.67ms  35.61ms   90.96%\n\
                    \x20    99%   18.38ms\n  72568 requests in 2.23s, 10.80MB read\n  Socket errors: \
                    connect 0, read 550, write 2, timeout 1\n  Non-2xx or 3xx responses: 3\n\
                    Requests/sec:  32575.48\n";
        assert!(parse_wrk(text, &mut r));
        assert_eq!(
            (r.requests, r.connect, r.read, r.write, r.timeout, r.non2xx),
            (72568, 0, 550, 2, 1, 3)
        );
        assert_eq!((r.p99.as_str(), r.max.as_str()), ("18.38ms", "35.61ms"));
        assert_eq!(r.errors(), 556);
    }

    #[test]
    fn names_are_distinct() {
        let o = HandoverOpts {
            conns: vec![1000, 10_000],
            workers: 4,
            latency_conns: 200,
            latency_rate: 10_000,
            latency_secs: Duration::from_secs(5),
            reload_every: Duration::from_millis(200),
            reloads: 100,
            wrk_conns: 50,
            skip: false,
        };
        let s = scenarios(&o);
        assert_eq!(s.len(), 5);
        let names: std::collections::HashSet<_> = s.iter().map(|s| &s.name).collect();
        assert_eq!(names.len(), s.len());
    }
}
