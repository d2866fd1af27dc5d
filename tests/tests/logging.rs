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
