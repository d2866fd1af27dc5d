//! systemd's `Type=notify`: the foreground master, started with
//! `NOTIFY_SOCKET` pointing at a datagram socket this test made (as systemd
//! does), says READY=1 only once every worker of every group is ready,
//! RELOADING=1 … READY=1 around `wm-host reload`, STOPPING=1 on stop, and
//! its MAINPID.

use std::io::ErrorKind;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::process::{Child, Command, Stdio};

use wm_e2e::*;

/// Kills the foreground master if the test fails before it stops.
struct Foreground(Child);

impl Drop for Foreground {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn foreground(s: &Server, notify_socket: &str) -> Foreground {
    Foreground(
        Command::new(host_bin())
            .args(["start", "-c"])
            .arg(&s.config)
            .env("NOTIFY_SOCKET", notify_socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The next notification, waited for up to the deadline.
fn next(sock: &UnixDatagram) -> String {
    sock.set_nonblocking(false).unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = [0u8; 4096];
    let n = sock
        .recv(&mut buf)
        .expect("a notification within the deadline");
    String::from_utf8(buf[..n].to_vec()).unwrap()
}

/// Whether a notification is waiting now.
fn pending(sock: &UnixDatagram) -> Option<String> {
    sock.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    match sock.recv(&mut buf) {
        Ok(n) => Some(String::from_utf8_lossy(&buf[..n]).into_owned()),
        Err(e) if e.kind() == ErrorKind::WouldBlock => None,
        Err(e) => panic!("recv: {e}"),
    }
}

fn text_server(port: u16, count: u32) -> Server {
    let listen = format!("text://127.0.0.1:{port}");
    Server::new(&worker_table("t", &listen, "test_plugin", count, ""))
}

fn field<'a>(msg: &'a str, key: &str) -> Option<&'a str> {
    msg.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
}

fn monotonic_usec() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the struct it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}

#[test]
fn ready_reloading_and_stopping_reach_the_notify_socket() {
    let (fast, slow) = (free_port(), free_port());
    // The second group's worker waits in on_worker_start while this exists.
    let hold = tempfile::NamedTempFile::new().unwrap();
    let hold_opt = format!(
        "[worker.options]\nhold_start_file = {:?}\n",
        hold.path().display().to_string()
    );
    let workers = worker_table(
        "fast",
        &format!("text://127.0.0.1:{fast}"),
        "test_plugin",
        2,
        "",
    ) + &worker_table(
        "slow",
        &format!("text://127.0.0.1:{slow}"),
        "test_plugin",
        1,
        &hold_opt,
    );
    let s = Server::new(&workers);
    let path = s.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut master = foreground(&s, path.to_str().unwrap());

    // One group ready, the other still starting: systemd hears nothing yet.
    wait_for("the fast group's workers to be ready", || {
        let st = s.try_status()?;
        let ready = st["workers"]
            .as_array()?
            .iter()
            .filter(|w| w["group"] == "fast" && !w["stats"].is_null())
            .count();
        (ready == 2).then_some(())
    });
    assert_eq!(TextClient::connect(fast).call("ping"), "ping");
    assert_eq!(pending(&sock), None, "READY=1 before every group was ready");

    std::fs::remove_file(hold.path()).unwrap();
    let ready = next(&sock);
    assert_eq!(field(&ready, "READY"), Some("1"), "{ready:?}");
    assert_eq!(
        field(&ready, "MAINPID"),
        Some(master.0.id().to_string().as_str())
    );
    assert!(field(&ready, "STATUS").is_some(), "{ready:?}");
    // By then every worker accepts.
    assert_eq!(TextClient::connect(slow).call("ping"), "ping");
    assert_eq!(TextClient::connect(fast).call("ping"), "ping");

    // ExecReload=wm-host reload.
    let before = monotonic_usec();
    let out = s.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reloading = next(&sock);
    assert_eq!(field(&reloading, "RELOADING"), Some("1"), "{reloading:?}");
    let usec: u64 = field(&reloading, "MONOTONIC_USEC")
        .unwrap()
        .parse()
        .unwrap();
    assert!(before <= usec && usec <= monotonic_usec(), "{usec}");
    let again = next(&sock);
    assert_eq!(field(&again, "READY"), Some("1"), "{again:?}");
    assert_eq!(field(&again, "MAINPID"), None, "{again:?}");
    assert_eq!(TextClient::connect(slow).call("ping"), "ping");

    // `wm-host stop` waits for the master to be gone, so it runs beside
    // this test, which reaps the master (its parent).
    let mut stop = Command::new(host_bin())
        .args(["stop", "-c"])
        .arg(&s.config)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stopping = next(&sock);
    assert_eq!(field(&stopping, "STOPPING"), Some("1"), "{stopping:?}");
    assert!(master.0.wait().unwrap().success());
    assert!(stop.wait().unwrap().success());
    assert_eq!(pending(&sock), None);
}

/// Workers never see NOTIFY_SOCKET: only the master speaks for the service.
#[test]
fn workers_do_not_inherit_the_notify_socket() {
    let port = free_port();
    let s = text_server(port, 1);
    let path = s.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let _master = foreground(&s, path.to_str().unwrap());
    assert_eq!(field(&next(&sock), "READY"), Some("1"));
    let pid = pid_of(&mut TextClient::connect(port));
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(
        !env.split(|&b| b == 0)
            .any(|v| v.starts_with(b"NOTIFY_SOCKET=")),
        "a worker has NOTIFY_SOCKET"
    );
}

/// Some service managers hand out an abstract socket: `@name`.
#[test]
fn an_abstract_notify_socket_works_too() {
    let port = free_port();
    let s = text_server(port, 2);
    let name = format!("wm-e2e-notify-{}-{port}", std::process::id());
    let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let sock = UnixDatagram::bind_addr(&addr).unwrap();
    let mut master = foreground(&s, &format!("@{name}"));
    assert_eq!(field(&next(&sock), "READY"), Some("1"));
    // systemd's KillSignal=SIGTERM.
    // SAFETY: a plain kill(2) of the master this test started.
    unsafe { libc::kill(master.0.id() as i32, libc::SIGTERM) };
    assert_eq!(field(&next(&sock), "STOPPING"), Some("1"));
    assert!(master.0.wait().unwrap().success());
}

/// examples/systemd/wm-host.service is a unit systemd accepts (every
/// directive known and well-formed), pointed at the binary under test.
#[test]
fn the_example_unit_passes_systemd_analyze_verify() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("examples/systemd/wm-host.service")).unwrap();
    assert!(unit.contains("Type=notify"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("wm-host.service");
    let bin = host_bin().display().to_string();
    std::fs::write(&path, unit.replace("/usr/local/bin/wm-host", &bin)).unwrap();
    let out = match Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(&path)
        .output()
    {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run systemd-analyze ({e}): this test needs it \
             (Debian: apt-get install systemd; `make test-deps` installs it)"
        ),
    };
    let said = String::from_utf8_lossy(&out.stderr);
    // Other systemd versions and containers warn about things unrelated to
    // this unit (other units, no running manager…): only lines naming it,
    // or saying what systemd says of a bad directive, count.
    let about_it: Vec<&str> = said
        .lines()
        .filter(|l| {
            l.contains("wm-host.service")
                || ["Unknown key", "Invalid", "Failed to parse"]
                    .iter()
                    .any(|w| l.contains(w))
        })
        .collect();
    // Not the exit status either: it is non-zero for those too.
    assert!(
        about_it.is_empty(),
        "{}\n({}; all of it:\n{said})",
        about_it.join("\n"),
        out.status
    );
}

/// A worker that cannot start: no READY=1, STOPPING=1 says why to look at
/// the log, and the master exits non-zero (systemd marks the unit failed).
#[test]
fn a_failed_start_is_never_ready() {
    let port = free_port();
    let listen = format!("text://127.0.0.1:{port}");
    let opts = "[worker.options]\nfail_start = \"error\"\n";
    let s = Server::new(&worker_table("t", &listen, "test_plugin", 1, opts));
    let path = s.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let mut master = foreground(&s, path.to_str().unwrap());
    let msg = next(&sock);
    assert_eq!(field(&msg, "READY"), None, "{msg:?}");
    assert_eq!(field(&msg, "STOPPING"), Some("1"), "{msg:?}");
    assert!(
        field(&msg, "STATUS").unwrap().contains("see the log"),
        "{msg:?}"
    );
    assert!(!master.0.wait().unwrap().success());
    assert_eq!(pending(&sock), None);
}
