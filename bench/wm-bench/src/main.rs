//! wm-bench: the load generator and benchmark runner for wm-host.
//!
//!     wm-bench echo --proto websocket --addr 127.0.0.1:7000 --conns 100 --inflight 16 --size 32
//!     wm-bench idle --proto websocket --addr 127.0.0.1:7000 --conns 10000 --server-pid 1234
//!     wm-bench idle --proto websocket --addr 127.0.0.1:7000 --conns 100000 --server-pid 1,2,…
//!     wm-bench allocs --proto websocket -n 2000          # needs valgrind
//!     wm-bench suite --out bench/RESULTS.md     # what `make bench` runs
//!     wm-bench handover --out bench/RESULTS.md  # its handover section alone
//!
//! Pin it away from the server (`taskset -c 1 wm-bench …`); `suite` pins itself.

mod allocs;
mod client;
mod fanout;
mod handover;
mod idle;
mod redis;
mod suite;
mod sys;
mod tls;
mod udp;

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Parser, Subcommand};

use client::{EchoConfig, Proto};

#[derive(Parser)]
#[command(about = "Load generator and benchmark suite for wm-host")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo load: C connections with P messages of B bytes in flight each.
    Echo {
        #[arg(long, value_enum)]
        proto: Proto,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(short, long, default_value_t = 100)]
        conns: usize,
        #[arg(short = 'p', long, default_value_t = 16)]
        inflight: usize,
        #[arg(short, long, default_value_t = 32)]
        size: usize,
        /// Seconds measured.
        #[arg(short, long, default_value = "5", value_parser = parse_secs)]
        duration: Duration,
        /// Seconds of load before measuring.
        #[arg(short, long, default_value = "1", value_parser = parse_secs)]
        warmup: Duration,
        /// Also report this process's CPU time (the server's) per message.
        #[arg(long)]
        server_pid: Option<u32>,
    },
    /// Opens C connections (handshake and one echo each), then reports the
    /// server processes' RSS growth per connection.
    Idle {
        #[arg(long, value_enum)]
        proto: Proto,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(short, long, default_value_t = 10_000)]
        conns: usize,
        /// Client processes (`idle-hold`), each from its own source
        /// addresses; 1: this process (0: one per 15000 connections).
        #[arg(long, default_value_t = 0)]
        clients: usize,
        /// Source addresses per client process (0: enough for its share).
        #[arg(long, default_value_t = 0)]
        sources: usize,
        /// The serving processes, comma-separated (wm-host workers:
        /// `wm-host status`); their RSS is summed.
        #[arg(long, value_delimiter = ',', required = true)]
        server_pid: Vec<u32>,
    },
    /// A client process of `idle`: opens C idle connections from source
    /// addresses 127.0.0.F.., prints `open N errors E wrong W`, and holds
    /// them until stdin says `finish` or closes.
    #[command(hide = true)]
    IdleHold {
        #[arg(long, value_enum)]
        proto: Proto,
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        conns: usize,
        #[arg(long, default_value_t = 1)]
        first_source: u8,
        #[arg(long, default_value_t = 1)]
        sources: usize,
    },
    /// Heap allocations per echoed message in the wm-host worker (or the
    /// baseline), by `valgrind --tool=dhat`: runs of N and 2N messages.
    Allocs {
        #[arg(long, value_enum)]
        proto: allocs::Service,
        /// N: messages in the first run (the second has 2N).
        #[arg(short = 'n', long, default_value_t = 2000)]
        messages: usize,
        /// Measure wm-baseline instead of wm-host.
        #[arg(long)]
        baseline: bool,
        /// CPU the server is pinned to.
        #[arg(long, default_value_t = 0)]
        server_cpu: usize,
    },
    /// Every scenario against wm-host and the native baseline; writes Markdown.
    Suite(suite::SuiteOpts),
    /// Live handover on reload: handover time, echo latency under reloads,
    /// wrk errors over reloads; replaces the report's `## Handover` section.
    Handover(handover::HandoverCmd),
    /// TLS (wss echo, https, handshakes, idle wss memory) against the
    /// baseline with `--cert`; writes the TLS section of the Markdown file.
    Tls(tls::TlsOpts),
    /// UDP echo, wm-host against wm-baseline; replaces `## UDP echo`.
    Udp(udp::UdpCmd),
    /// The Redis bus across two hosts against the local bus: broadcast to
    /// 10,000 members, cross-host stream; replaces its section.
    Redis(redis::RedisCmd),
}

/// A duration given in (fractional) seconds on the command line.
fn parse_secs(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|e| format!("{s}: {e}"))?;
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s}: {e}"))
}

/// `wm-bench allocs`: both dhat runs, then what one message costs.
fn count_allocs(
    proto: allocs::Service,
    messages: usize,
    baseline: bool,
    server_cpu: usize,
) -> Result<(), String> {
    let bins = suite::Bins::find()?;
    let r = allocs::measure(proto, messages, baseline, &bins, server_cpu)?;
    println!(
        "{} {}: {:.2} allocations and {:.1} bytes per message (serving process: {})",
        if baseline {
            "wm-baseline"
        } else {
            "wm-host worker"
        },
        proto.scheme(),
        r.blocks_per_msg,
        r.bytes_per_msg,
        r.totals_text()
    );
    if !r.sites.is_empty() {
        println!("per message: {}", r.sites_text(usize::MAX));
    }
    Ok(())
}

fn main() {
    let result = match Cli::parse().cmd {
        Cmd::Echo {
            proto,
            addr,
            conns,
            inflight,
            size,
            duration,
            warmup,
            server_pid,
        } => {
            sys::raise_nofile(conns as u64 + 1024);
            let cfg = EchoConfig {
                proto,
                addr,
                conns,
                inflight,
                size,
                warmup,
                duration,
            };
            let cpu = |pid: Option<u32>| pid.and_then(sys::cpu_seconds).unwrap_or(0.0);
            let (mut c0, mut c1) = (0.0, 0.0);
            client::run_echo(&cfg, || c0 = cpu(server_pid), || c1 = cpu(server_pid))
                .map(|r| {
                    println!(
                        "{} echo: {conns} conns × {inflight} in flight × {size} B: {:.0} msgs/s \
                         ({} in {:.2} s), p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs, {} errors, \
                         {} wrong, {} open",
                        proto.scheme(),
                        r.rate(),
                        r.msgs,
                        r.secs,
                        r.p50_us,
                        r.p99_us,
                        r.max_us,
                        r.errors,
                        r.wrong,
                        r.open
                    );
                    if server_pid.is_some() && c1 > c0 {
                        println!(
                            "server CPU: {:.2} s, {:.0} msgs per CPU-second",
                            c1 - c0,
                            r.msgs as f64 / (c1 - c0)
                        );
                    }
                })
                .map_err(|e| e.to_string())
        }
        Cmd::Idle {
            proto,
            addr,
            conns,
            clients,
            sources,
            server_pid,
        } => {
            let clients = if clients == 0 {
                idle::client_procs(conns)
            } else {
                clients
            };
            if clients == 1 {
                sys::raise_nofile(conns as u64 + 1024);
            }
            let cfg = idle::IdleConfig {
                proto,
                addr,
                conns,
                clients,
                sources,
                pids: server_pid,
            };
            idle::measure(&cfg, &|_| Ok(String::new())).map(|f| {
                println!(
                    "idle {}: {} of {conns} open ({} errors, {} wrong echoes); server RSS \
                     {:.1} → {:.1} MiB: {:.0} bytes per connection; {}",
                    proto.scheme(),
                    f.open,
                    f.errors,
                    f.wrong,
                    f.rss_before as f64 / 1048576.0,
                    f.rss_after as f64 / 1048576.0,
                    f.rss_per_conn,
                    f.note
                )
            })
        }
        Cmd::IdleHold {
            proto,
            addr,
            conns,
            first_source,
            sources,
        } => idle::hold(proto, addr, conns, sources, first_source),
        Cmd::Allocs {
            proto,
            messages,
            baseline,
            server_cpu,
        } => count_allocs(proto, messages, baseline, server_cpu),
        Cmd::Suite(opts) => suite::run(opts),
        Cmd::Handover(cmd) => handover::main(cmd),
        Cmd::Tls(opts) => tls::run(opts),
        Cmd::Udp(cmd) => udp::main(cmd),
        Cmd::Redis(cmd) => redis::main(cmd),
    };
    if let Err(e) = result {
        eprintln!("wm-bench: {e}");
        std::process::exit(1);
    }
}
