//! UDP echo (issue 13's benchmark): `udp://` on wm-host with
//! bench-hello-plugin (every datagram sent back to its sender) against
//! `wm-baseline --proto udp` (a native recv_from/send_to loop), in the same
//! run and with the same pinning: server on `--server-cpu`, client here.
//!
//! `wm-bench udp --out bench/RESULTS.md` replaces only the `## UDP echo`
//! section (`make bench-udp`).

use std::fmt::Write as _;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::suite::{free_port, Bins, CpuPool};
use crate::sys;

#[derive(clap::Args, Debug)]
pub struct UdpCmd {
    /// Client sockets (each its own source port).
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// Datagrams in flight per client.
    #[arg(long, default_value_t = 8)]
    pub inflight: usize,
    #[arg(long, default_value_t = 32)]
    pub size: usize,
    #[arg(long, default_value = "5", value_parser = crate::parse_secs)]
    pub duration: Duration,
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub server_cpu: usize,
    #[arg(long, default_value_t = 1)]
    pub client_cpu: usize,
}

struct Figures {
    msgs: u64,
    secs: f64,
    cpu: f64,
    resent: u64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.msgs as f64 / self.secs
    }
    fn per_cpu(&self) -> f64 {
        self.msgs as f64 / self.cpu.max(1e-9)
    }
}

/// Echo load on `addr`: `clients` non-blocking sockets on one thread, each
/// keeping `inflight` datagrams out; a datagram lost (nothing back for
/// 50 ms on that socket) is replaced. Counts echoes over `duration` after a
/// 1 s warm-up, and the server's CPU time (`pids`) over the same window.
fn load(addr: SocketAddr, o: &UdpCmd, pids: &[u32]) -> Result<Figures, String> {
    let socks: Vec<UdpSocket> = (0..o.clients)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.connect(addr)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .collect::<std::io::Result<_>>()
        .map_err(|e: std::io::Error| e.to_string())?;
    let msg = vec![b'x'; o.size];
    let mut buf = vec![0u8; 65536];
    let mut last = vec![Instant::now(); o.clients];
    for s in &socks {
        for _ in 0..o.inflight {
            let _ = s.send(&msg);
        }
    }
    let cpu = |pids: &[u32]| {
        pids.iter()
            .filter_map(|&p| sys::cpu_seconds(p))
            .sum::<f64>()
    };
    let t0 = Instant::now();
    let warm = t0 + Duration::from_secs(1);
    let end = warm + o.duration;
    let (mut counting, mut msgs, mut resent, mut c0) = (false, 0u64, 0u64, 0.0);
    let mut tm = warm;
    loop {
        let now = Instant::now();
        if !counting && now >= warm {
            counting = true;
            c0 = cpu(pids);
            tm = now;
        }
        if now >= end {
            break;
        }
        let mut got = false;
        for (i, s) in socks.iter().enumerate() {
            while let Ok(n) = s.recv(&mut buf) {
                got = true;
                if n != o.size {
                    return Err(format!("echo of {n} bytes, {} sent", o.size));
                }
                if counting {
                    msgs += 1;
                }
                last[i] = now;
                let _ = s.send(&msg);
            }
            if now.duration_since(last[i]) > Duration::from_millis(50) {
                let _ = s.send(&msg);
                last[i] = now;
                resent += 1;
            }
        }
        if !got {
            std::hint::spin_loop();
        }
    }
    let secs = tm.elapsed().as_secs_f64();
    let c1 = cpu(pids);
    Ok(Figures {
        msgs,
        secs,
        cpu: c1 - c0,
        resent,
    })
}

struct Server {
    child: Option<Child>,
    host: Option<(PathBuf, PathBuf)>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = &mut self.child {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some((bin, cfg)) = &self.host {
            let _ = Command::new(bin)
                .args(["stop", "-c"])
                .arg(cfg)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            if let Some(d) = cfg.parent() {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

fn worker_pids(bin: &PathBuf, cfg: &PathBuf) -> Vec<u32> {
    let out = Command::new(bin)
        .args(["status", "--json", "-c"])
        .arg(cfg)
        .output()
        .ok();
    let v: serde_json::Value = out
        .and_then(|o| serde_json::from_slice(&o.stdout).ok())
        .unwrap_or_default();
    (v["workers"].as_array().cloned().unwrap_or_default().iter())
        .filter_map(|w| w["pid"].as_u64().map(|p| p as u32))
        .collect()
}

fn wm_host(bins: &Bins, port: u16, cpu: usize) -> Result<(Server, Vec<u32>), String> {
    let dir = std::env::temp_dir().join(format!("wm-bench-udp-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let cfg = dir.join("wm.toml");
    std::fs::write(
        &cfg,
        format!(
            "[host]\nruntime_dir = \"run\"\nstop_timeout = \"2s\"\n\n[[worker]]\nname = \"udp\"\n\
             listen = \"udp://127.0.0.1:{port}\"\ncount = 1\nplugin = \"{}\"\n",
            bins.hello_plugin.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let st = Command::new("taskset")
        .args(["-c", &cpu.to_string()])
        .arg(&bins.host)
        .args(["start", "-d", "-c"])
        .arg(&cfg)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let server = Server {
        child: None,
        host: Some((bins.host.clone(), cfg.clone())),
    };
    if !st.status.success() {
        return Err(format!(
            "wm-host start: {}",
            String::from_utf8_lossy(&st.stderr).trim()
        ));
    }
    let pids = worker_pids(&bins.host, &cfg);
    if pids.is_empty() {
        return Err("wm-host status names no worker".into());
    }
    Ok((server, pids))
}

fn baseline(bins: &Bins, port: u16, cpu: usize) -> Result<(Server, Vec<u32>), String> {
    let child = Command::new("taskset")
        .args(["-c", &cpu.to_string()])
        .arg(&bins.baseline)
        .args(["--proto", "udp", "--listen", &format!("127.0.0.1:{port}")])
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("wm-baseline: {e}"))?;
    let pid = child.id();
    let server = Server {
        child: Some(child),
        host: None,
    };
    echoes_within(port, Duration::from_secs(5))?;
    Ok((server, vec![pid]))
}

/// Readiness of a UDP echo server: a probe datagram answered, re-sent
/// every 50 ms (one sent before the bind is lost) until `limit`.
fn echoes_within(port: u16, limit: Duration) -> Result<(), String> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    sock.connect(("127.0.0.1", port))
        .map_err(|e| e.to_string())?;
    sock.set_read_timeout(Some(Duration::from_millis(50)))
        .map_err(|e| e.to_string())?;
    let end = std::time::Instant::now() + limit;
    let mut buf = [0u8; 16];
    while std::time::Instant::now() < end {
        // Refused (ICMP) before the bind: try again.
        let _ = sock.send(b"ready?");
        if let Ok(n) = sock.recv(&mut buf) {
            if &buf[..n] == b"ready?" {
                return Ok(());
            }
        }
    }
    Err(format!("no UDP echo on port {port} within {limit:?}"))
}

/// Runs both servers (baseline, wm-host, baseline, wm-host: the better of
/// two rounds each) and returns the section's Markdown.
pub fn section(bins: &Bins, o: &UdpCmd) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## UDP echo\n");
    let git = crate::handover::git_head();
    let _ = writeln!(
        md,
        "`udp://` echo (issue 13). Written by `make bench` with the rest, or alone by \
         `make bench-udp`, which replaces only this section.\n\n- date: {}; commit: {git}\n\
         - servers pinned to CPU {}, the client (one thread, {} sockets × {} datagrams of {} B \
         in flight) to CPU {}\n",
        crate::handover::utc_now(),
        o.server_cpu,
        o.clients,
        o.inflight,
        o.size,
        o.client_cpu
    );
    let _ = writeln!(
        md,
        "```sh\nmake bench-udp\n# which is:\ncargo build --release --workspace\n\
         target/release/wm-bench udp --out bench/RESULTS.md\n```\n"
    );
    let mut best: [Option<Figures>; 2] = [None, None];
    // The per-CPU row pools every round of a side.
    let mut pool = [CpuPool::default(); 2];
    let mut errs = Vec::new();
    for round in 0..2 {
        for (i, which) in ["baseline", "wm-host"].iter().enumerate() {
            let port = free_port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let started = if i == 0 {
                baseline(bins, port, o.server_cpu)
            } else {
                wm_host(bins, port, o.server_cpu)
            };
            let r = started.and_then(|(server, pids)| {
                let r = load(addr, o, &pids);
                drop(server);
                r
            });
            match r {
                Ok(f) => {
                    eprintln!(
                        "   udp {which} round {round}: {:.0} msgs/s, {:.0} per CPU-s, {} resent",
                        f.rate(),
                        f.per_cpu(),
                        f.resent
                    );
                    pool[i].add(f.msgs as f64, f.cpu);
                    if best[i].as_ref().is_none_or(|b| b.rate() < f.rate()) {
                        best[i] = Some(f);
                    }
                }
                Err(e) => errs.push(format!("{which}: {e}")),
            }
        }
    }
    let _ = writeln!(
        md,
        "| udp echo | wm-host | wm-baseline (same run) | ratio | target |\n|---|---:|---:|---:|---|"
    );
    match (&best[1], &best[0]) {
        (Some(w), Some(b)) => {
            let _ = writeln!(
                md,
                "| msgs/s | {:.0} | {:.0} | {:.2} | |",
                w.rate(),
                b.rate(),
                w.rate() / b.rate()
            );
            let [pb, pw] = pool.map(|p| p.per_cpu_s().unwrap_or(0.0));
            let _ = writeln!(
                md,
                "| msgs per server CPU-second, both rounds | {:.0} | {:.0} | {:.2} | ≥ 0.9 {} |",
                pw,
                pb,
                pw / pb,
                if pw / pb >= 0.9 { "✓" } else { "✗" }
            );
            let _ = writeln!(
                md,
                "\nDetails: wm-host {} echoes in {:.2} s, worker CPU {:.2} s, {} datagrams \
                 re-sent after 50 ms without an echo; baseline {} in {:.2} s, CPU {:.2} s, {} \
                 re-sent.",
                w.msgs, w.secs, w.cpu, w.resent, b.msgs, b.secs, b.cpu, b.resent
            );
        }
        _ => {
            let _ = writeln!(
                md,
                "| failed | {} | | – | |",
                errs.join("; ").replace('|', "/")
            );
        }
    }
    let _ = writeln!(
        md,
        "\n### Method\n\n- wm-host: `taskset -c {s} wm-host start -d`, one worker of \
         bench-hello-plugin on `udp://127.0.0.1:PORT` (`send` answers the datagram's sender); \
         wm-baseline: `taskset -c {s} wm-baseline --proto udp --listen 127.0.0.1:PORT`, one \
         blocking socket. The client keeps {} datagrams in flight on each of its {} connected \
         sockets, sends one more per echo received, re-sends when a socket got nothing for \
         50 ms (a drop), counts echoes for {:.0} s after 1 s of warm-up; server CPU is the \
         worker's (or the baseline's) utime + stime from /proc over the same window. Two \
         rounds each, alternating; the better of each is shown.",
        o.inflight,
        o.clients,
        o.duration.as_secs_f64(),
        s = o.server_cpu
    );
    md
}

/// `wm-bench udp`.
pub fn main(o: UdpCmd) -> Result<(), String> {
    let bins = Bins::find()?;
    sys::pin_to_cpu(o.client_cpu).map_err(|e| e.to_string())?;
    let md = section(&bins, &o);
    println!("{md}");
    if let Some(out) = &o.out {
        let old = std::fs::read_to_string(out).unwrap_or_default();
        std::fs::write(out, crate::handover::splice_named(&old, "## UDP echo", &md))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}
