//! Hardening, end to end: outside kills are not crash loops, a stuck worker
//! cannot make the master grow and is replaced, workers are recycled after
//! `max_requests`.

use std::time::{Duration, Instant};

use wm_e2e::*;

fn test_worker(name: &str, port: u16, count: u32, extra: &str) -> String {
    worker_table(
        name,
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        count,
        extra,
    )
}

/// The pid serving `id` of `group` and whether it is ready (answered stats).
fn slot(s: &Value, group: &str, id: u64) -> Option<(u32, bool)> {
    s["workers"].as_array()?.iter().find_map(|w| {
        (w["group"] == group && w["id"] == id)
            .then(|| (w["pid"].as_u64().unwrap() as u32, !w["stats"].is_null()))
    })
}

#[test]
fn a_worker_killed_from_outside_each_time_it_is_back_is_respawned_at_once() {
    let port = free_port();
    let server = Server::new(&test_worker("t", port, 1, ""));
    server.start();
    let mut pid = server.worker_pids("t")[0].1;
    for round in 0..5 {
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let killed = Instant::now();
        // No growing delay: the replacement is there at once each time.
        let (next, at) = wait_for("the replacement", || {
            let (p, _) = slot(&server.try_status()?, "t", 0)?;
            (p != pid).then(|| (p, killed.elapsed()))
        });
        assert!(
            at < Duration::from_secs(1),
            "round {round}: the replacement took {at:?}\n{}",
            server.log()
        );
        // It serves before it is killed again.
        wait_for("the replacement to be ready", || {
            slot(&server.try_status()?, "t", 0)?.1.then_some(())
        });
        pid = next;
    }
    assert_eq!(TextClient::connect(port).call("hi"), "hi");
    assert!(
        server.log().contains("restarting at once"),
        "{}",
        server.log()
    );
    server.stop();
}
