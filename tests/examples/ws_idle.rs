//! Measures the worker memory that idle websocket connections cost.
//!
//!     cargo build --workspace && cargo run -p wm-e2e --example ws_idle -- 10000
//!
//! Starts wm-host (echo plugin, one websocket worker), opens N connections
//! that complete the handshake and one echo, then stay idle, and reports the
//! worker's RSS growth per connection.

use std::io::Write;
use std::net::TcpStream;

use wm_e2e::*;

fn raise_fd_limit(want: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on our own process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = want.min(lim.rlim_max);
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
}

fn worker_rss(server: &Server) -> u64 {
    server.status()["workers"][0]["rss_bytes"].as_u64().unwrap()
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    // Client sockets plus the worker's (which inherits this limit).
    raise_fd_limit(2 * n as u64 + 1000);
    let port = free_port();
    let server = Server::new(&worker_table(
        "ws",
        &format!("websocket://127.0.0.1:{port}"),
        "echo_plugin",
        1,
        "",
    ));
    server.start();
    let mut first = ws_raw(port, "/");
    first.write_all(&ws_frame(true, 1, b"warm", true)).unwrap();
    ws_read_frame(&mut first).unwrap();
    let before = worker_rss(&server);
    let mut conns: Vec<TcpStream> = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = ws_raw(port, "/");
        s.write_all(&ws_frame(true, 1, b"hello", true)).unwrap();
        assert_eq!(ws_read_frame(&mut s).unwrap().2, b"hello");
        conns.push(s);
    }
    let after = worker_rss(&server);
    let conns_seen = server.status()["workers"][0]["stats"]["connections"]
        .as_u64()
        .unwrap();
    println!("idle websocket connections: {n} (worker reports {conns_seen})");
    println!(
        "worker RSS before: {:.1} MiB, after: {:.1} MiB",
        before as f64 / 1048576.0,
        after as f64 / 1048576.0
    );
    println!(
        "per connection: {:.0} bytes ({:.2} KiB)",
        (after.saturating_sub(before)) as f64 / n as f64,
        (after.saturating_sub(before)) as f64 / n as f64 / 1024.0
    );
    drop(conns);
    server.stop();
}
