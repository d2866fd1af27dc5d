//! Idle-connection memory: open many connections, leave them idle, and see
//! how much the server processes' RSS grew per connection.
//!
//! RLIMIT_NOFILE caps every process (20000 here, and raising the hard limit
//! needs CAP_SYS_RESOURCE), so large counts are spread: the server runs one
//! process per `SERVER_SHARE` connections (SO_REUSEPORT spreads them), and
//! the client runs one `wm-bench idle-hold` process per `CLIENT_SHARE`, each
//! from its own 127.0.0.x source addresses, so no process and no
//! (source address, destination) pair runs out of descriptors or ports.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client::{self, IdleSet, Proto};
use crate::suite::{auto_sources, Figures};
use crate::sys;

/// Connections per server process at most (12500 leaves room under a
/// 20000-descriptor limit for SO_REUSEPORT's uneven spread).
pub const SERVER_SHARE: usize = 12_500;
/// Connections per client process at most.
pub const CLIENT_SHARE: usize = 15_000;

/// Server processes for `conns` idle connections.
pub fn server_procs(conns: usize) -> usize {
    conns.div_ceil(SERVER_SHARE).max(1)
}

/// Client processes for `conns` idle connections (1: this process).
pub fn client_procs(conns: usize) -> usize {
    conns.div_ceil(CLIENT_SHARE).max(1)
}

/// One idle measurement.
pub struct IdleConfig {
    pub proto: Proto,
    pub addr: SocketAddr,
    pub conns: usize,
    /// Client processes (1: opened by this process).
    pub clients: usize,
    /// Source addresses per client process (0: enough for its share).
    pub sources: usize,
    /// The serving processes whose RSS counts (wm-host workers, not the
    /// master; the baseline's children under `--procs N`).
    pub pids: Vec<u32>,
}

/// Source addresses per client and each client's share of the connections.
fn shares(cfg: &IdleConfig) -> (usize, Vec<usize>) {
    let clients = cfg.clients.max(1);
    let shares: Vec<usize> = (0..clients)
        .map(|i| cfg.conns / clients + usize::from(i < cfg.conns % clients))
        .collect();
    let sources = if cfg.sources == 0 {
        auto_sources(shares[0])
    } else {
        cfg.sources
    };
    (sources, shares)
}

fn rss_sum(pids: &[u32]) -> Result<u64, String> {
    pids.iter()
        .map(|&p| sys::rss_bytes(p).ok_or(format!("server process {p} is gone")))
        .sum()
}

/// The servers' RSS once it has stopped moving: the first of two readings
/// 50 ms apart that agree, or the last one after 3 s.
fn settled_rss(pids: &[u32]) -> Result<u64, String> {
    let end = Instant::now() + Duration::from_secs(3);
    let mut last = rss_sum(pids)?;
    loop {
        std::thread::sleep(Duration::from_millis(50)); // the sampling interval
        let now = rss_sum(pids)?;
        if now == last || Instant::now() > end {
            return Ok(now);
        }
        last = now;
    }
}

fn fds(pids: &[u32]) -> Vec<usize> {
    pids.iter()
        .map(|&p| sys::fd_count(p).unwrap_or(0))
        .collect()
}

/// Opens warm-up connections until every server process holds at least one
/// (SO_REUSEPORT picks the process by a hash of the addresses), so that no
/// process's first-connection costs fall into the measurement.
fn warm_up(cfg: &IdleConfig) -> Result<Vec<IdleSet>, String> {
    let n = if cfg.pids.len() > 1 {
        16 * cfg.pids.len()
    } else {
        1
    };
    let fd0 = fds(&cfg.pids);
    let mut warm = Vec::new();
    for _ in 0..4 {
        warm.push(
            client::open_idle(cfg.proto, cfg.addr, n, 1, 1, Duration::from_secs(10))
                .map_err(|e| format!("warm-up connections: {e}"))?,
        );
        if fds(&cfg.pids).iter().zip(&fd0).all(|(now, was)| now > was) {
            return Ok(warm);
        }
    }
    let missed: Vec<String> = (cfg.pids.iter().zip(fds(&cfg.pids)).zip(&fd0))
        .filter(|((_, now), was)| now <= was)
        .map(|((p, _), _)| p.to_string())
        .collect();
    Err(format!(
        "server process(es) {} got none of {} warm-up connections",
        missed.join(", "),
        4 * n
    ))
}

/// The client processes (`wm-bench idle-hold`), told to finish and waited
/// for on drop.
struct Holders(Vec<(Child, Option<ChildStdin>)>);

impl Drop for Holders {
    fn drop(&mut self) {
        for (_, stdin) in &mut self.0 {
            if let Some(mut s) = stdin.take() {
                let _ = s.write_all(b"finish\n");
            }
        }
        for (child, _) in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// What the client processes hold: (open, errors, wrong).
fn spawn_holders(cfg: &IdleConfig) -> Result<(Holders, usize, u64, u64), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let (sources, shares) = shares(cfg);
    if shares.len() * sources > 254 {
        return Err(format!(
            "{} clients × {sources} source addresses do not fit in 127.0.0.1-254",
            shares.len()
        ));
    }
    let mut holders = Holders(Vec::new());
    for (i, share) in shares.iter().enumerate() {
        let mut child = Command::new(&exe)
            .arg("idle-hold")
            .args(["--proto", cfg.proto.scheme(), "--addr"])
            .arg(cfg.addr.to_string())
            .arg("--conns")
            .arg(share.to_string())
            .arg("--first-source")
            .arg((1 + i * sources).to_string())
            .arg("--sources")
            .arg(sources.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("{}: {e}", exe.display()))?;
        let stdin = child.stdin.take();
        holders.0.push((child, stdin));
    }
    let (mut open, mut errors, mut wrong) = (0, 0, 0);
    for (i, (child, _)) in holders.0.iter_mut().enumerate() {
        let mut line = String::new();
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let _ = BufReader::new(stdout).read_line(&mut line);
        let report = parse_report(&line);
        let Some((o, e, w)) = report else {
            let mut err = String::new();
            if let Some(mut s) = child.stderr.take() {
                let _ = s.read_to_string(&mut err);
            }
            return Err(format!(
                "client process {i} (of {} connections) reported nothing: {}",
                shares[i],
                err.trim()
            ));
        };
        open += o;
        errors += e;
        wrong += w;
    }
    Ok((holders, open, errors, wrong))
}

/// `open N errors E wrong W` → (N, E, W).
fn parse_report(line: &str) -> Option<(usize, u64, u64)> {
    let w: Vec<&str> = line.split_whitespace().collect();
    match w.as_slice() {
        ["open", o, "errors", e, "wrong", x, ..] => {
            Some((o.parse().ok()?, e.parse().ok()?, x.parse().ok()?))
        }
        _ => None,
    }
}

/// `wm-bench idle-hold`: opens `conns` idle connections, prints
/// `open N errors E wrong W` once they are settled, then holds them until
/// stdin says `finish` or closes (the parent is gone).
pub fn hold(
    proto: Proto,
    addr: SocketAddr,
    conns: usize,
    sources: usize,
    first_source: u8,
) -> Result<(), String> {
    sys::raise_nofile(conns as u64 + 256);
    let set = client::open_idle(
        proto,
        addr,
        conns,
        sources,
        first_source,
        Duration::from_secs(120),
    )
    .map_err(|e| e.to_string())?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "open {} errors {} wrong {}",
        set.open, set.errors, set.wrong
    );
    let _ = out.flush();
    let mut line = String::new();
    let stdin = std::io::stdin();
    loop {
        line.clear();
        match stdin.read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) if line.trim() == "finish" => break,
            Ok(_) => {}
        }
    }
    drop(set);
    Ok(())
}

/// Warms up, reads the server processes' RSS, opens `cfg.conns` idle
/// connections, reads it again after 0.5 s. `probe(held)` runs meanwhile with
/// the number of connections the clients hold and may reject the run (wm-host:
/// `status` must count as many). Not every connection open is an error, not a
/// figure.
pub fn measure(
    cfg: &IdleConfig,
    probe: &dyn Fn(usize) -> Result<String, String>,
) -> Result<Figures, String> {
    if cfg.pids.is_empty() {
        return Err("no server process to measure".into());
    }
    let warm = warm_up(cfg)?;
    let warm_open: usize = warm.iter().map(|w| w.open).sum();
    let warm_errors: u64 = warm.iter().map(|w| w.errors).sum();
    let before = settled_rss(&cfg.pids)?;
    let fd_before: usize = fds(&cfg.pids).iter().sum();
    let t0 = Instant::now();
    let (sources, shares) = shares(cfg);
    // Either this process holds the connections or the client processes do.
    let (held, open, errors, wrong) = if shares.len() == 1 {
        let set = client::open_idle(
            cfg.proto,
            cfg.addr,
            cfg.conns,
            sources,
            1,
            Duration::from_secs(120),
        )
        .map_err(|e| e.to_string())?;
        let (o, e, w) = (set.open, set.errors, set.wrong);
        (Ok(set), o, e, w)
    } else {
        let (h, o, e, w) = spawn_holders(cfg)?;
        (Err(h), o, e, w)
    };
    let took = t0.elapsed();
    let after = settled_rss(&cfg.pids)?;
    let fd_after: usize = fds(&cfg.pids).iter().sum();
    let sockstat = sys::tcp_sockstat();
    let probed = probe(warm_open + open);
    drop(held);
    let grown = after.saturating_sub(before);
    let figures = format!(
        "{open} of {} open, {} errors, {wrong} wrong; server RSS {:.1} → {:.1} MiB over {} \
         process(es); the server processes hold {} more descriptors",
        cfg.conns,
        errors + warm_errors,
        before as f64 / 1048576.0,
        after as f64 / 1048576.0,
        cfg.pids.len(),
        fd_after as i64 - fd_before as i64
    );
    if open != cfg.conns {
        return Err(format!("not every connection opened: {figures}"));
    }
    if fd_after < fd_before + open {
        return Err(format!(
            "the server processes hold fewer sockets than the clients: {figures}"
        ));
    }
    let probed = probed.map_err(|e| format!("{e}; {figures}"))?;
    let mut note = format!(
        "opened in {:.1} s by {} client process(es) from {} source address(es) each, after \
         {warm_open} warm-up connection(s); the server processes hold {} more descriptors; \
         /proc/net/sockstat meanwhile: TCP {sockstat}",
        took.as_secs_f64(),
        shares.len(),
        sources,
        fd_after - fd_before
    );
    if !probed.is_empty() {
        note = format!("{note}; {probed}");
    }
    Ok(Figures {
        rss_per_conn: grown as f64 / open as f64,
        rss_before: before,
        rss_after: after,
        open,
        errors: errors + warm_errors,
        wrong,
        note,
        ..Figures::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_large_counts_over_processes() {
        assert_eq!((server_procs(10_000), client_procs(10_000)), (1, 1));
        assert_eq!((server_procs(100_000), client_procs(100_000)), (8, 7));
        let cfg = IdleConfig {
            proto: Proto::Websocket,
            addr: ([127, 0, 0, 1], 1).into(),
            conns: 100_000,
            clients: 7,
            sources: 0,
            pids: vec![1],
        };
        let (sources, s) = shares(&cfg);
        assert_eq!(s.iter().sum::<usize>(), 100_000);
        assert!(s.iter().all(|&n| n <= CLIENT_SHARE));
        assert_eq!(sources, 4);
    }

    #[test]
    fn reads_a_holder_report() {
        assert_eq!(
            parse_report("open 14286 errors 0 wrong 1\n"),
            Some((14286, 0, 1))
        );
        assert_eq!(parse_report("wm-bench: connect refused"), None);
    }
}
