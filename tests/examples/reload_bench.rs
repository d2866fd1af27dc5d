//! Figures for rolling reloads (no assertions: a measurement).
//!
//!     make test-builds && cargo run -p wm-e2e --example reload_bench
//!
//! 1. Time from a changed plugin file to all 4 workers on the new build,
//!    as the watcher sees it (median of 10).
//! 2. Requests failed over 20 reloads under load (4 client threads, each a
//!    new connection per request).
//! 3. Round-trip latency percentiles of that load during rolls vs. without.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use wm_e2e::*;

fn all_on(s: &Server, n: usize) -> bool {
    let st = s.status();
    let w = st["workers"].as_array().unwrap();
    let builds: std::collections::HashSet<&str> =
        w.iter().map(|w| w["build"].as_str().unwrap()).collect();
    w.len() == n && builds.len() == 1 && w.iter().all(|w| !w["stats"].is_null())
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// Runs the load until `stop`; returns (latencies, failures).
fn load(
    port: u16,
    stop: Arc<AtomicBool>,
    rolling: Arc<AtomicBool>,
) -> (Vec<Duration>, Vec<Duration>, usize) {
    let quiet = Arc::new(Mutex::new(Vec::new()));
    let busy = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(0usize));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (stop, rolling, quiet, busy, failed) = (
                stop.clone(),
                rolling.clone(),
                quiet.clone(),
                busy.clone(),
                failed.clone(),
            );
            thread::spawn(move || {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let msg = format!("t{t} r{i}");
                    let during = rolling.load(Ordering::Relaxed);
                    let start = Instant::now();
                    let ok = std::net::TcpStream::connect(("127.0.0.1", port))
                        .map(TextClient::from_stream)
                        .ok()
                        .and_then(|mut c| {
                            c.send(&msg);
                            c.recv()
                        })
                        .is_some_and(|r| r == msg);
                    let took = start.elapsed();
                    if !ok {
                        *failed.lock().unwrap() += 1;
                    } else if during {
                        busy.lock().unwrap().push(took);
                    } else {
                        quiet.lock().unwrap().push(took);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let q = std::mem::take(&mut *quiet.lock().unwrap());
    let b = std::mem::take(&mut *busy.lock().unwrap());
    let f = *failed.lock().unwrap();
    (q, b, f)
}

fn main() {
    let port = free_port();
    let s = Server::new(&format!(
        "[[worker]]\nname = \"t\"\nlisten = \"text://127.0.0.1:{port}\"\ncount = 4\nplugin = \"live.so\"\n"
    ));
    let live = s.dir.path().join("live.so");
    std::fs::copy(test_build("a"), &live).unwrap();
    s.start();

    // 1. change → all workers on the new build (watcher path).
    let mut times = Vec::new();
    for i in 0..10 {
        let tag = if i % 2 == 0 { "b" } else { "a" };
        let before = s.status()["workers"][0]["build"]
            .as_str()
            .unwrap()
            .to_string();
        let start = Instant::now();
        std::fs::copy(test_build(tag), &live).unwrap();
        wait_for("all workers on the new build", || {
            (all_on(&s, 4) && s.status()["workers"][0]["build"].as_str() != Some(&before))
                .then_some(())
        });
        times.push(start.elapsed());
    }
    let median = percentile(&mut times, 0.5);
    println!("change -> all 4 workers on the new build: median {:.0} ms (includes the 300 ms quiet period), max {:.0} ms",
        median.as_secs_f64() * 1000.0, times.iter().max().unwrap().as_secs_f64() * 1000.0);

    // 2 and 3. 20 reloads under load.
    std::fs::write(
        &s.config,
        std::fs::read_to_string(&s.config).unwrap().replace(
            "plugin = \"live.so\"",
            "plugin = \"live.so\"\nwatch = false",
        ),
    )
    .unwrap();
    s.stop();
    s.start();
    let stop = Arc::new(AtomicBool::new(false));
    let rolling = Arc::new(AtomicBool::new(false));
    let loader = {
        let (stop, rolling) = (stop.clone(), rolling.clone());
        thread::spawn(move || load(port, stop, rolling))
    };
    let mut roll_time = Duration::ZERO;
    for i in 0..20 {
        // A quiet stretch, then a roll.
        let quiet_until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < quiet_until {
            thread::yield_now();
        }
        let tag = if i % 2 == 0 { "b" } else { "a" };
        std::fs::copy(test_build(tag), &live).unwrap();
        rolling.store(true, Ordering::Relaxed);
        let start = Instant::now();
        let out = s.cli(&["reload"]);
        roll_time += start.elapsed();
        rolling.store(false, Ordering::Relaxed);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    stop.store(true, Ordering::Relaxed);
    let (mut quiet, mut busy, failed) = loader.join().unwrap();
    println!(
        "20 reloads under load: {} requests, {failed} failed; mean reload command {:.0} ms",
        quiet.len() + busy.len() + failed,
        roll_time.as_secs_f64() * 1000.0 / 20.0
    );
    let (q50, q99) = (percentile(&mut quiet, 0.5), percentile(&mut quiet, 0.99));
    let (b50, b99) = (percentile(&mut busy, 0.5), percentile(&mut busy, 0.99));
    println!(
        "latency without a roll: p50 {:.2} ms, p99 {:.2} ms ({} requests)",
        q50.as_secs_f64() * 1e3,
        q99.as_secs_f64() * 1e3,
        quiet.len()
    );
    println!(
        "latency during rolls:   p50 {:.2} ms, p99 {:.2} ms ({} requests)",
        b50.as_secs_f64() * 1e3,
        b99.as_secs_f64() * 1e3,
        busy.len()
    );
    println!(
        "p99 during / p99 without: {:.2}x",
        b99.as_secs_f64() / q99.as_secs_f64()
    );
    s.stop();
}
