//! The bus across hosts (issue 14's benchmark): two wm-host instances
//! sharing a private redis-server against one wm-host on the `local` bus,
//! in the same run.
//!
//! - Broadcast: a group of N text connections, half on each host; one
//!   member on host A sends `gsend`; the time until the last member of both
//!   hosts has it. Local: one host with as many workers as both together,
//!   all N members on it.
//! - Throughput: one connection on host A streams `gsend` to a group whose
//!   one member is on host B (at most `window` messages not yet received);
//!   messages/s, and per CPU-second of the masters (both, with Redis:
//!   `/proc/<pid>/stat` utime + stime over the measured window). Local: the
//!   same on one host.
//!
//! `wm-bench redis --out bench/RESULTS.md` replaces only the
//! `## Several hosts (Redis bus)` section (`make bench-redis`).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::Proto;
use crate::fanout::{self, FanoutConfig};
use crate::suite::{free_port, Bins};
use crate::sys;

const HEADING: &str = "## Several hosts (Redis bus)";

#[derive(clap::Args, Debug)]
pub struct RedisCmd {
    /// Members of the broadcast group, over both hosts.
    #[arg(long, default_value_t = 10_000)]
    pub conns: usize,
    /// Workers per host (the local host gets twice as many).
    #[arg(long, default_value_t = 2)]
    pub workers: usize,
    /// Broadcasts measured (after 2 not measured).
    #[arg(long, default_value_t = 10)]
    pub rounds: usize,
    /// Seconds of the throughput stream measured (after 1 s not measured).
    #[arg(long, default_value = "5", value_parser = crate::parse_secs)]
    pub duration: Duration,
    /// Messages sent and not yet received, at most, in the stream.
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// Payload bytes of the streamed messages.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// CPU of redis-server and the wm-host processes.
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    /// CPU of this client.
    #[arg(long, default_value_t = 1)]
    pub client_cpu: usize,
}

/// A private redis-server: free port, no persistence, killed when dropped.
struct Redis {
    child: Child,
    port: u16,
    dir: PathBuf,
}

impl Redis {
    fn start(cpu: usize) -> Result<Redis, String> {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("wm-bench-redis-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let bin = ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .ok_or("redis-server is missing (make test-deps installs it)")?;
        let child = Command::new("taskset")
            .args(["-c", &cpu.to_string(), bin])
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server: {e}"))?;
        let r = Redis { child, port, dir };
        wait("redis-server to answer", || {
            let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            s.write_all(b"PING\r\n").ok()?;
            let mut b = [0u8; 7];
            s.read_exact(&mut b).ok()?;
            (&b == b"+PONG\r\n").then_some(())
        })?;
        Ok(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Polls `f` every 20 ms for up to 30 s.
fn wait<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T, String> {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() > end {
            return Err(format!("timed out waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A wm-host started with `start -d`, stopped when dropped.
struct Host {
    bin: PathBuf,
    cfg: PathBuf,
    addr: SocketAddr,
}

impl Host {
    fn start(bins: &Bins, bus: &str, workers: usize, cpu: usize) -> Result<Host, String> {
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("wm-bench-redis-host-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let cfg = dir.join("wm.toml");
        std::fs::write(
            &cfg,
            format!(
                "[host]\nruntime_dir = \"run\"\nstop_timeout = \"2s\"\n\n{bus}\n\n[[worker]]\n\
                 name = \"t\"\nlisten = \"text://127.0.0.1:{port}\"\ncount = {workers}\n\
                 plugin = \"{}\"\n",
                bins.test_plugin.display()
            ),
        )
        .map_err(|e| e.to_string())?;
        let host = Host {
            bin: bins.host.clone(),
            cfg,
            addr: ([127, 0, 0, 1], port).into(),
        };
        let st = Command::new("taskset")
            .args(["-c", &cpu.to_string()])
            .arg(&bins.host)
            .args(["start", "-d", "-c"])
            .arg(&host.cfg)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !st.status.success() {
            return Err(format!(
                "wm-host start: {}",
                String::from_utf8_lossy(&st.stderr).trim()
            ));
        }
        Ok(host)
    }

    fn status(&self) -> serde_json::Value {
        Command::new(&self.bin)
            .args(["status", "--json", "-c"])
            .arg(&self.cfg)
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    }

    fn master_pid(&self) -> Result<u32, String> {
        self.status()["master_pid"]
            .as_u64()
            .map(|p| p as u32)
            .ok_or_else(|| "wm-host status names no master".to_string())
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = Command::new(&self.bin)
            .args(["stop", "-c"])
            .arg(&self.cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(d) = self.cfg.parent() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Two hosts on one Redis, each seeing the other.
fn pair(bins: &Bins, redis: &Redis, o: &RedisCmd) -> Result<(Host, Host), String> {
    let bus = format!("[bus]\nbackend = \"{}\"", redis.url());
    let a = Host::start(bins, &bus, o.workers, o.server_cpu)?;
    let b = Host::start(bins, &bus, o.workers, o.server_cpu)?;
    wait("both hosts to see each other on the bus", || {
        (a.status()["bus"]["peers"] == 1 && b.status()["bus"]["peers"] == 1).then_some(())
    })?;
    Ok((a, b))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Broadcast {
    last_ms: f64,
    p50_ms: f64,
    joined: usize,
    errors: u64,
    wrong: u64,
    short: usize,
}

fn broadcast(addr: SocketAddr, more: Vec<SocketAddr>, o: &RedisCmd) -> Result<Broadcast, String> {
    let cfg = FanoutConfig {
        proto: Proto::Text,
        addr,
        more_addrs: more,
        conns: o.conns,
        sources: 1,
        rounds: o.rounds.max(1),
        warmup_rounds: 2,
        size: 32,
        round_timeout: Duration::from_secs(10),
    };
    let r = fanout::run(&cfg, &mut || {}).map_err(|e| e.to_string())?;
    let mut last: Vec<f64> = r.rounds.iter().map(|r| r.last_ms).collect();
    let mut p50: Vec<f64> = r.rounds.iter().map(|r| r.p50_ms).collect();
    Ok(Broadcast {
        last_ms: median(&mut last),
        p50_ms: median(&mut p50),
        joined: r.joined,
        errors: r.errors,
        wrong: r.wrong,
        short: r.rounds.iter().filter(|x| x.received < r.joined).count(),
    })
}

struct Stream {
    msgs: u64,
    secs: f64,
    /// The masters' CPU time over the window.
    cpu: f64,
    /// redis-server's, when there is one.
    redis_cpu: f64,
}

impl Stream {
    fn rate(&self) -> f64 {
        self.msgs as f64 / self.secs
    }
    fn per_cpu(&self) -> f64 {
        self.msgs as f64 / self.cpu.max(1e-9)
    }
}

fn line_client(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    Ok(s)
}

/// Sends `line` and reads one answer line.
fn call(s: &mut TcpStream, line: &str) -> Result<String, String> {
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        s.read_exact(&mut b).map_err(|e| format!("{line}: {e}"))?;
        out.push(b[0]);
    }
    Ok(String::from_utf8_lossy(&out).trim_end().to_string())
}

/// The stream: `gsend s <payload>` from a non-member on `from`, one member
/// on `to`; counts what the member receives.
fn stream(
    from: SocketAddr,
    to: SocketAddr,
    masters: &[u32],
    redis: Option<u32>,
    o: &RedisCmd,
) -> Result<Stream, String> {
    let mut rx = line_client(to)?;
    if call(&mut rx, "join s")? != "ok" {
        return Err("join s: not ok".into());
    }
    let mut tx = line_client(from)?;
    wait("the sender's host to count the member", || {
        (call(&mut tx, "count s").ok()? == "1").then_some(())
    })?;
    rx.set_read_timeout(Some(Duration::from_millis(2)))
        .map_err(|e| e.to_string())?;
    let mut line = b"gsend s ".to_vec();
    line.resize(line.len() + o.size, b'x');
    line.push(b'\n');
    let cpu = |pids: &[u32]| {
        pids.iter()
            .filter_map(|&p| sys::cpu_seconds(p))
            .sum::<f64>()
    };
    let redis_pids: Vec<u32> = redis.into_iter().collect();
    let (mut sent, mut got) = (0u64, 0u64);
    let mut batch = Vec::with_capacity(line.len() * 64);
    let mut buf = vec![0u8; 256 * 1024];
    let warm = Instant::now() + Duration::from_secs(1);
    let end = warm + o.duration;
    let (mut counting, mut got0, mut c0, mut r0, mut t0) = (false, 0, 0.0, 0.0, warm);
    loop {
        let now = Instant::now();
        if !counting && now >= warm {
            counting = true;
            (got0, c0, r0, t0) = (got, cpu(masters), cpu(&redis_pids), now);
        }
        if now >= end {
            break;
        }
        let room = (o.window as u64).saturating_sub(sent - got).min(64);
        if room > 0 {
            batch.clear();
            for _ in 0..room {
                batch.extend_from_slice(&line);
            }
            tx.write_all(&batch).map_err(|e| format!("sender: {e}"))?;
            sent += room;
        }
        match rx.read(&mut buf) {
            Ok(0) => return Err("the member's connection closed".into()),
            Ok(n) => got += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(format!("member: {e}")),
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    Ok(Stream {
        msgs: got - got0,
        secs,
        cpu: cpu(masters) - c0,
        redis_cpu: cpu(&redis_pids) - r0,
    })
}

struct Figures {
    local_fan: Broadcast,
    redis_fan: Broadcast,
    local_stream: Stream,
    redis_stream: Stream,
}

fn measure(bins: &Bins, o: &RedisCmd) -> Result<Figures, String> {
    let cpu = o.server_cpu;
    eprintln!(
        "   redis: broadcast to {} members on one host (local bus)",
        o.conns
    );
    let local_fan = {
        let h = Host::start(bins, "", o.workers * 2, cpu)?;
        broadcast(h.addr, Vec::new(), o)?
    };
    let redis = Redis::start(cpu)?;
    eprintln!("   redis: broadcast to {} members on two hosts", o.conns);
    let redis_fan = {
        let (a, b) = pair(bins, &redis, o)?;
        broadcast(a.addr, vec![b.addr], o)?
    };
    eprintln!("   redis: stream on one host (local bus)");
    let local_stream = {
        let h = Host::start(bins, "", o.workers, cpu)?;
        stream(h.addr, h.addr, &[h.master_pid()?], None, o)?
    };
    eprintln!("   redis: stream from host A to host B");
    let redis_stream = {
        let (a, b) = pair(bins, &redis, o)?;
        let masters = [a.master_pid()?, b.master_pid()?];
        stream(a.addr, b.addr, &masters, Some(redis.child.id()), o)?
    };
    Ok(Figures {
        local_fan,
        redis_fan,
        local_stream,
        redis_stream,
    })
}

/// Runs it all and returns the section's Markdown.
pub fn section(bins: &Bins, o: &RedisCmd) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "{HEADING}\n");
    let _ = writeln!(
        md,
        "The bus across hosts (issue 14): two wm-host instances sharing a private \
         redis-server against one wm-host on the `local` bus, in the same run. Written by \
         `make bench` with the rest, or alone by `make bench-redis`, which replaces only this \
         section.\n\n- date: {}; commit: {}\n- redis-server and every wm-host process pinned \
         to CPU {}, the client to CPU {}; {} workers per host (the local host: {})\n",
        crate::handover::utc_now(),
        crate::handover::git_head(),
        o.server_cpu,
        o.client_cpu,
        o.workers,
        o.workers * 2
    );
    let _ = writeln!(
        md,
        "```sh\nmake bench-redis\n# which is:\ncargo build --release --workspace\n\
         target/release/wm-bench redis --out bench/RESULTS.md\n```\n"
    );
    let f = match measure(bins, o) {
        Ok(f) => f,
        Err(e) => {
            let _ = writeln!(md, "Failed: {e}");
            return md;
        }
    };
    let (lf, rf, ls, rs) = (&f.local_fan, &f.redis_fan, &f.local_stream, &f.redis_stream);
    let _ = writeln!(
        md,
        "| bus | redis (two hosts) | local (one host, same run) | ratio |\n|---|---:|---:|---:|"
    );
    let _ = writeln!(
        md,
        "| broadcast to {} members: last member has it (median ms) | {:.1} | {:.1} | {:.2} |",
        o.conns,
        rf.last_ms,
        lf.last_ms,
        rf.last_ms / lf.last_ms
    );
    let _ = writeln!(
        md,
        "| same: half of them have it (median ms) | {:.1} | {:.1} | {:.2} |",
        rf.p50_ms,
        lf.p50_ms,
        rf.p50_ms / lf.p50_ms
    );
    let _ = writeln!(
        md,
        "| stream host A → host B: msgs/s | {:.0} | {:.0} | {:.2} |",
        rs.rate(),
        ls.rate(),
        rs.rate() / ls.rate()
    );
    let _ = writeln!(
        md,
        "| same: msgs per master CPU-second | {:.0} | {:.0} | {:.2} |",
        rs.per_cpu(),
        ls.per_cpu(),
        rs.per_cpu() / ls.per_cpu()
    );
    let _ = writeln!(
        md,
        "\nDetails: broadcast: {} and {} members joined (redis, local), {} and {} errors, {} \
         and {} wrong, {} and {} of {} rounds missed someone within 10 s. Stream: redis {} \
         messages in {:.2} s, masters' CPU {:.2} s (both hosts), redis-server CPU {:.2} s; \
         local {} in {:.2} s, master CPU {:.2} s.",
        rf.joined,
        lf.joined,
        rf.errors,
        lf.errors,
        rf.wrong,
        lf.wrong,
        rf.short,
        lf.short,
        o.rounds.max(1),
        rs.msgs,
        rs.secs,
        rs.cpu,
        rs.redis_cpu,
        ls.msgs,
        ls.secs,
        ls.cpu
    );
    let _ = writeln!(
        md,
        "\n### Method\n\n- Broadcast: the test plugin on `text://`; {n} connections from \
         this client, alternating between host A and host B (redis) or all on the one host \
         (local), each `join g`; once `count g` on host A counts all {n}, a member on host A \
         sends `gsend g <32 B>`, and the time from writing it until the last member's socket \
         is readable with it is taken; 2 rounds not measured, then {r}, medians shown. The \
         local host has as many workers as the two hosts together.\n- Stream: one \
         connection on host A sends `gsend s <{size} B>` lines, keeping at most {w} not yet \
         received by the group's one member, a connection on host B (local: both on the one \
         host, {wk} workers; the master relays every bus frame to the other workers either \
         way); messages received over {d:.0} s after 1 s of warm-up. Master CPU: utime + \
         stime from /proc over the same window, both masters with Redis (A publishes, B \
         receives), redis-server's shown apart.\n- A shared machine (2 cores, other builds \
         running): ratios within the run are what to read, not the absolute figures.",
        n = o.conns,
        r = o.rounds.max(1),
        size = o.size,
        w = o.window,
        wk = o.workers,
        d = o.duration.as_secs_f64()
    );
    md
}

/// `wm-bench redis`.
pub fn main(o: RedisCmd) -> Result<(), String> {
    let bins = Bins::find()?;
    sys::raise_nofile(o.conns as u64 + 1024);
    sys::pin_to_cpu(o.client_cpu).map_err(|e| e.to_string())?;
    let md = section(&bins, &o);
    println!("{md}");
    if let Some(out) = &o.out {
        let old = std::fs::read_to_string(out).unwrap_or_default();
        std::fs::write(out, crate::handover::splice_named(&old, HEADING, &md))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
