//! Logs are plain text when they do not go to a terminal: no ANSI colour
//! codes in the daemon's log file, nor in foreground output redirected to a
//! file, from the master and from the workers that share its output.

use std::fs::File;
use std::process::{Child, Command, Stdio};

use wm_e2e::*;

fn test_worker(port: u16) -> String {
    worker_table(
        "t",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        2,
        "",
    )
}

/// Makes the worker log from a connection: a panic in `on_message` is logged
/// by the worker that caught it.
fn log_from_a_connection(port: u16) {
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("hello"), "hello");
    c.send("panic");
    assert!(c.closed_by_server());
}

/// What every log must show, in plain text: master lines, worker lines (with
/// their span fields) and a line the plugin logged through the host.
fn assert_plain(log: &str) {
    assert!(
        !log.contains('\x1b'),
        "ANSI escape codes in the log:\n{log}"
    );
    for line in [
        "INFO master starting",
        "INFO all workers ready",
        "INFO worker{name=t id=0 pid=",
        "}: worker ready",
        "test plugin build",
        "ERROR worker{name=t id=",
        "plugin panicked in on_message: panic requested by the client",
        "INFO master stopped",
    ] {
        assert!(log.contains(line), "{line:?} missing from the log:\n{log}");
    }
}

#[test]
fn daemon_log_file_has_no_colour_codes() {
    let port = free_port();
    let s = Server::new(&test_worker(port));
    s.start();
    log_from_a_connection(port);
    wait_for("the panic to be logged", || {
        s.log().contains("plugin panicked").then_some(())
    });
    s.stop();
    assert_plain(&s.log());
}

/// Kills the foreground master if the test fails before stopping it.
struct Foreground(Child);

impl Drop for Foreground {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn foreground_output_redirected_to_a_file_has_no_colour_codes() {
    let port = free_port();
    let s = Server::new(&test_worker(port));
    // As `wm-host start -c wm.toml > out.log 2>&1`.
    let path = s.dir.path().join("out.log");
    let out = File::create(&path).unwrap();
    let mut master = Foreground(
        Command::new(host_bin())
            .args(["start", "-c"])
            .arg(&s.config)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .env_remove("NO_COLOR")
            .spawn()
            .unwrap(),
    );
    let read = || std::fs::read_to_string(&path).unwrap();
    wait_for("the foreground master to be ready", || {
        read().contains("all workers ready").then_some(())
    });
    log_from_a_connection(port);
    wait_for("the panic to be logged", || {
        read().contains("plugin panicked").then_some(())
    });
    // Ctrl+C, as a user of `make run` stops it.
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(master.0.id() as i32, libc::SIGINT) };
    assert!(master.0.wait().unwrap().success());
    assert_plain(&read());
}

/// Every line of `log`, parsed: the test fails on one that is not JSON.
fn json_lines(log: &str) -> Vec<Value> {
    assert!(!log.contains('\x1b'), "escape codes in the log:\n{log}");
    log.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn line_with<'a>(lines: &'a [Value], message: &str) -> &'a Value {
    lines
        .iter()
        .find(|l| l["message"].as_str().is_some_and(|m| m.contains(message)))
        .unwrap_or_else(|| panic!("no line with {message:?}: {lines:#?}"))
}

#[test]
fn json_log_lines_say_which_process_worker_and_build_wrote_them() {
    let port = free_port();
    let s = Server::with_host("log_format = \"json\"", &test_worker(port));
    s.start();
    let status = s.status();
    let master_pid = status["master_pid"].as_u64().unwrap();
    let workers: Vec<(u64, u64, String)> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let build = w["build"].as_str().unwrap().to_string();
            (w["id"].as_u64().unwrap(), w["pid"].as_u64().unwrap(), build)
        })
        .collect();
    log_from_a_connection(port);
    wait_for("the panic to be logged", || {
        s.log().contains("plugin panicked").then_some(())
    });
    s.stop();
    let lines = json_lines(&s.log());
    for l in &lines {
        assert!(l["timestamp"].is_string() && l["level"].is_string(), "{l}");
        match l["process"].as_str() {
            Some("master") => assert_eq!(l["pid"], master_pid, "{l}"),
            Some("worker") => {
                let (id, pid) = (l["worker_id"].as_u64(), l["pid"].as_u64());
                let known = workers.iter().find(|w| Some(w.0) == id && Some(w.1) == pid);
                let (_, _, build) = known.unwrap_or_else(|| panic!("unknown worker: {l}"));
                assert_eq!(l["worker"], "t", "{l}");
                assert_eq!(l["build"], build.as_str(), "{l}");
                assert_eq!(build.len(), 12);
            }
            _ => panic!("no process field: {l}"),
        }
    }
    let started = line_with(&lines, "master starting");
    assert_eq!(started["process"], "master");
    assert!(started["fields"]["config"].is_string(), "{started}");
    assert_eq!(line_with(&lines, "all workers ready")["process"], "master");
    assert_eq!(line_with(&lines, "worker ready")["process"], "worker");
    // A line the plugin logged through the host, and one the worker logged.
    assert_eq!(line_with(&lines, "test plugin build")["process"], "worker");
    let panic = line_with(&lines, "plugin panicked in on_message");
    assert_eq!(
        (&panic["process"], &panic["level"]),
        (&"worker".into(), &"ERROR".into())
    );
    assert_eq!(line_with(&lines, "master stopped")["process"], "master");
}

/// What logrotate does without copytruncate: move the file away, then ask
/// the server to open the path again, by `reopen-logs` or SIGHUP.
#[test]
fn reopen_logs_moves_the_master_and_every_worker_to_a_fresh_file() {
    let port = free_port();
    let s = Server::new(&test_worker(port));
    s.start();
    let log = s.runtime_dir().join("wm-host.log");
    let pids: Vec<u32> = s.worker_pids("t").iter().map(|&(_, p)| p).collect();
    let master = s.master_pid().unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();

    let first = s.runtime_dir().join("wm-host.log.1");
    std::fs::rename(&log, &first).unwrap();
    let out = s.cli(&["reopen-logs"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("reopened by the master and 2 workers"),
        "{said}"
    );
    // The command returns once every worker switched.
    let fresh = read(&log);
    assert!(
        fresh
            .lines()
            .any(|l| !l.contains("worker{") && l.contains("log file reopened")),
        "the master did not say it reopened:\n{fresh}"
    );
    for pid in &pids {
        let line = format!("pid={pid} ");
        assert!(
            fresh
                .lines()
                .any(|l| l.contains(&line) && l.contains("log file reopened")),
            "worker {pid} did not say it reopened:\n{fresh}"
        );
    }
    // New lines from workers and the master go to the new file only.
    log_from_a_connection(port);
    wait_for("the panic in the new file", || {
        read(&log).contains("plugin panicked").then_some(())
    });
    let old = read(&first);
    assert!(old.contains("all workers ready") && old.contains("reopening the log file"));
    assert!(!old.contains("plugin panicked"), "{old}");

    // SIGHUP does the same, as logrotate's postrotate may send it.
    let second = s.runtime_dir().join("wm-host.log.2");
    std::fs::rename(&log, &second).unwrap();
    // SAFETY: a plain kill(2) of the master this test started.
    unsafe { libc::kill(master as i32, libc::SIGHUP) };
    wait_for("SIGHUP's report in the new file", || {
        read(&log)
            .contains("SIGHUP: log file reopened")
            .then_some(())
    });
    let fresh = read(&log);
    assert!(fresh.contains("workers=2"), "{fresh}");
    log_from_a_connection(port);
    wait_for("the second panic in the newest file", || {
        read(&log).contains("plugin panicked").then_some(())
    });
    s.stop();
    let fresh = read(&log);
    assert!(fresh.contains("master stopped"), "{fresh}");
    assert!(!read(&second).contains("master stopped"));
    assert!(!fresh.contains('\x1b') && !read(&second).contains('\x1b'));
}

#[test]
fn reopen_logs_in_the_foreground_has_nothing_to_reopen() {
    let port = free_port();
    let mut s = Server::new(&test_worker(port));
    let pid = s.start_foreground(2).id();
    let out = s.cli(&["reopen-logs"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("nothing to reopen"), "{said}");
    // SAFETY: a plain kill(2) of the master this test started (Drop reaps it).
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
}
