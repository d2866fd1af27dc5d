//! Supervision, end to end: outside kills are not crash loops, a stuck worker
//! cannot make the master grow and is replaced, workers are recycled after
//! `max_requests`.

use std::time::{Duration, Instant};

use wm_e2e::*;

const SEC: Duration = Duration::from_secs(1);

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

/// Resident memory of a process, in bytes.
fn vm_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb << 10
}

#[test]
fn a_stopped_worker_cannot_grow_the_master_and_is_replaced_after_stuck_timeout() {
    let port = free_port();
    // Long enough for the flood to reach the bound first on a slow machine
    // (debug workers parse and encode a few MB/s when the cores are shared).
    let server = Server::new(&test_worker("t", port, 2, "stuck_timeout = \"20s\""));
    server.start();
    let master = server.master_pid().unwrap();
    let mut clients: Vec<_> = one_client_per_worker(port, 2).into_iter().collect();
    for (_, c) in clients.iter_mut() {
        assert_eq!(c.call("join room"), "ok");
    }
    let (victim, _victim_client) = clients.remove(0);
    let (_, mut sender) = clients.remove(0);
    wait_for("both members known to the sender's worker", || {
        (sender.call("count room") == "2").then_some(())
    });
    let victim_id = server
        .worker_pids("t")
        .iter()
        .find(|w| w.1 == victim)
        .unwrap()
        .0;
    let before = vm_rss(master);
    unsafe { libc::kill(victim as i32, libc::SIGSTOP) };
    // 150 MiB of group messages that the stopped worker should relay to its member.
    let line = format!("gsendx room {}", "x".repeat(64 << 10));
    let mut peak = before;
    for i in 0..2400 {
        sender.send(&line);
        if i % 50 == 0 {
            peak = peak.max(vm_rss(master));
        }
    }
    // Everything sent was read by the master: the sender's worker answers.
    assert_eq!(sender.call("echo done"), "echo done");
    peak = peak.max(vm_rss(master));
    let growth = peak.saturating_sub(before);
    eprintln!(
        "master RSS {} MiB before, {} MiB at the peak of the flood",
        before >> 20,
        peak >> 20
    );
    assert!(
        growth < 100 << 20,
        "master grew by {} MiB behind a stopped worker",
        growth >> 20
    );
    // The drops are counted where `status` shows them.
    let s = server.status();
    let group = &s["groups"][0];
    assert!(group["bus_dropped"].as_u64().unwrap() > 0, "{s:#}");
    assert!(
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["bus_dropped"].is_u64()),
        "{s:#}"
    );
    let out = server.cli(&["status"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("bus_dropped"), "{table}");
    // Stuck past stuck_timeout: killed and replaced under the same id.
    let replacement = wait_for_within("the stopped worker to be replaced", 60 * SEC, || {
        let (pid, ready) = slot(&server.try_status()?, "t", victim_id)?;
        (pid != victim && ready && !pid_alive(victim)).then_some(pid)
    });
    eprintln!(
        "master RSS {} MiB once the stuck worker is replaced",
        vm_rss(master) >> 20
    );
    let log = server.log();
    assert!(log.contains("is stuck"), "{log}");
    assert!(log.contains("restarting at once"), "{log}");
    let s = server.status();
    assert_eq!(s["groups"][0]["restarts"]["stuck"], 1, "{s:#}");
    // Its member is gone, and the group works again.
    wait_for("the stopped worker's member to be gone", || {
        (sender.call("count room") == "1").then_some(())
    });
    let mut fresh = TextClient::connect(port);
    while pid_of(&mut fresh) != replacement {
        fresh = TextClient::connect(port);
    }
    assert_eq!(fresh.call("join room"), "ok");
    wait_for("the newcomer to be known", || {
        (sender.call("count room") == "2").then_some(())
    });
    sender.send("gsendx room hello again");
    assert_eq!(fresh.recv().unwrap(), "hello again");
    server.stop();
}

#[test]
fn a_worker_past_max_requests_is_replaced_without_a_failed_request() {
    let port = free_port();
    let server = Server::new(&test_worker("t", port, 2, "max_requests = 50"));
    server.start();
    let before = server.worker_pids("t");
    // One request per connection, as short-lived clients do; every one must
    // be answered while workers are recycled behind the listener.
    let mut served_by = std::collections::BTreeSet::new();
    let mut i = 0;
    let after = wait_for_within("both workers to be recycled", 60 * SEC, || {
        for _ in 0..20 {
            let mut c = TextClient::connect(port);
            let msg = format!("ping {i}");
            assert_eq!(c.call(&msg), msg, "request {i}");
            served_by.insert(pid_of(&mut c));
            i += 1;
        }
        let now = server.worker_pids("t");
        let fresh = now
            .iter()
            .zip(&before)
            .all(|(n, b)| n.0 == b.0 && n.1 != b.1);
        (fresh && now.len() == 2).then_some(now)
    });
    eprintln!("{i} requests, served by {} processes", served_by.len());
    assert!(i >= 50);
    let s = server.status();
    let recycled = s["groups"][0]["restarts"]["max_requests"].as_u64().unwrap();
    assert!(recycled >= 2, "{s:#}");
    assert!(
        s["exits"].as_array().unwrap().is_empty(),
        "told to stop, not died: {s:#}"
    );
    let log = server.log();
    assert!(log.contains("max_requests = 50"), "{log}");
    assert!(
        before.iter().all(|b| !after.iter().any(|a| a.1 == b.1)),
        "{before:?} -> {after:?}"
    );
    server.stop();
}

#[test]
fn a_retiring_worker_killed_at_stop_timeout_is_logged_once() {
    let port = free_port();
    // stop_timeout is 3 s in the harness; a graceful reload in drain mode
    // leaves connections with the old workers.
    let server = Server::new(&test_worker("t", port, 2, "reload_mode = \"drain\""));
    server.start();
    let clients = one_client_per_worker(port, 2);
    let out = server.cli(&["reload", "-g"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let warning = "did not stop within stop_timeout; killing it";
    wait_for_within(
        "both retiring workers to be killed and reaped",
        30 * SEC,
        || {
            let log = server.log();
            let gone = clients.iter().all(|(pid, _)| !pid_alive(*pid));
            (gone && log.matches("replaced worker t#").count() == 2).then_some(())
        },
    );
    let log = server.log();
    assert_eq!(log.matches(warning).count(), 2, "once per worker:\n{log}");
    server.stop();
}

#[test]
fn a_respawn_that_fails_to_start_is_logged_with_what_it_reported() {
    let port = free_port();
    let flag = tempfile::NamedTempFile::new().unwrap();
    let server = Server::new(&test_worker(
        "t",
        port,
        1,
        &format!(
            "[worker.options]\nfail_start_file = \"{}\"",
            flag.path().display()
        ),
    ));
    // The flag file exists only after the start: the respawn panics.
    let path = flag.path().to_path_buf();
    drop(flag);
    server.start();
    std::fs::write(&path, "").unwrap();
    let (_, pid) = server.worker_pids("t")[0];
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let line = wait_for("the failed respawn's exit line", || {
        server
            .log()
            .lines()
            .find(|l| l.contains("exited (exit code 2)"))
            .map(str::to_string)
    });
    assert!(line.contains("on_worker_start panicked"), "{line}");
    // Once it can start again, it serves.
    std::fs::remove_file(&path).unwrap();
    wait_for("the worker to be back", || {
        slot(&server.try_status()?, "t", 0)?.1.then_some(())
    });
    assert_eq!(TextClient::connect(port).call("hi"), "hi");
    server.stop();
}
