//! Hardening, end to end: the runtime dir and plugin files are checked the way
//! sshd's StrictModes checks a user's files, the pid file is never followed
//! through a symlink, and whether a master runs is decided by the lock on the
//! pid file, not by the pid written in it. Tests run as root and create files
//! owned by other users with chown.

use std::ffi::CString;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use wm_e2e::*;

const NOBODY: u32 = 65534;

fn worker_with(port: u16, plugin: &Path, count: u32) -> String {
    format!(
        "[[worker]]\nname = \"t\"\nlisten = \"text://127.0.0.1:{port}\"\ncount = {count}\nplugin = \"{}\"\n",
        plugin.display()
    )
}

fn worker(port: u16) -> String {
    worker_with(port, &plugin("test_plugin"), 1)
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(p: &Path, uid: u32, gid: u32) {
    let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid C string; lchown changes a link itself, never its target.
    assert_eq!(
        unsafe { libc::lchown(c.as_ptr(), uid, gid) },
        0,
        "chown {p:?}"
    );
}

fn mode_of(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// `start -d` fails with exactly one line on stderr holding every `expect`.
fn start_refused(server: &Server, expect: &[&str]) -> String {
    let out = server.cli(&["start", "-d"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "start should be refused: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for e in expect {
        assert!(err.contains(e), "{e:?} in {err}");
    }
    assert!(
        server.master_pid().is_none_or(|p| !pid_alive(p)),
        "no master left"
    );
    err
}

/// A copy of the test plugin in the server's folder, to change its modes.
fn own_plugin(server: &Server) -> PathBuf {
    let p = server.dir.path().join("libmine.so");
    std::fs::copy(plugin("test_plugin"), &p).unwrap();
    chmod(&p, 0o755);
    p
}

fn rewrite_config(server: &Server, host_extra: &str, workers: &str) {
    std::fs::write(
        &server.config,
        format!("[host]\nruntime_dir = \"run\"\nstop_timeout = \"3s\"\n{host_extra}\n{workers}"),
    )
    .unwrap();
}

#[test]
fn a_fresh_runtime_dir_is_0711_and_its_plugins_dir_0700() {
    let server = Server::new(&worker(free_port()));
    let rt = server.runtime_dir();
    // A plugins/ folder an earlier run left too open is tightened.
    std::fs::create_dir(&rt).unwrap();
    chmod(&rt, 0o711);
    std::fs::create_dir(rt.join("plugins")).unwrap();
    chmod(&rt.join("plugins"), 0o777);
    server.start();
    assert_eq!(mode_of(&rt), 0o711);
    assert_eq!(mode_of(&rt.join("plugins")), 0o700);
    server.stop();

    // Created from nothing (with its parent), whatever the umask.
    let server = Server::new("");
    std::fs::write(
        &server.config,
        format!("[host]\nruntime_dir = \"var/run\"\n{}", worker(free_port())),
    )
    .unwrap();
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "umask 0 && exec {} start -d -c {}",
            host_bin().display(),
            server.config.display()
        ))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rt = server.dir.path().join("var/run");
    assert_eq!(mode_of(&rt), 0o711);
    assert_eq!(mode_of(&server.dir.path().join("var")), 0o711);
    assert_eq!(mode_of(&rt.join("plugins")), 0o700);
    let out = server.cli(&["stop"]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn a_runtime_dir_another_user_made_first_is_refused() {
    let server = Server::new(&worker(free_port()));
    let rt = server.runtime_dir();
    std::fs::create_dir(&rt).unwrap();
    chmod(&rt, 0o777);
    chown(&rt, NOBODY, NOBODY);
    let shown = rt.display().to_string();
    let err = start_refused(
        &server,
        &[
            &format!("runtime_dir {shown} is writable by others (mode 0777, owner uid 65534)"),
            &format!("chown root {shown} && chmod 0711 {shown}"),
            "strict_modes = false",
        ],
    );
    assert!(err.starts_with("wm-host: "), "{err}");
    // Nothing was written into it, and its mode was left as found.
    assert_eq!(std::fs::read_dir(&rt).unwrap().count(), 0);
    assert_eq!(mode_of(&rt), 0o777);

    // Ours but open to everyone: refused too, not silently chmodded.
    chown(&rt, 0, 0);
    start_refused(&server, &["is writable by others (mode 0777, owner uid 0)"]);
    assert_eq!(mode_of(&rt), 0o777);

    // Owned by another user, even closed: refused.
    chmod(&rt, 0o700);
    chown(&rt, NOBODY, NOBODY);
    start_refused(&server, &["is owned by uid 65534"]);

    // A parent anyone may write to (and not sticky, as /tmp is).
    let server = Server::new(&worker(free_port()));
    let parent = server.dir.path();
    chmod(parent, 0o777);
    start_refused(
        &server,
        &[
            &format!("{} (a parent of runtime_dir", parent.display()),
            "writable by others",
        ],
    );
    chmod(parent, 0o700);
}

#[test]
fn strict_modes_false_lets_the_same_start() {
    let port = free_port();
    let server = Server::new(&worker(port));
    let rt = server.runtime_dir();
    std::fs::create_dir(&rt).unwrap();
    chmod(&rt, 0o777);
    chown(&rt, NOBODY, NOBODY);
    let plugin = own_plugin(&server);
    chmod(&plugin, 0o666);
    rewrite_config(
        &server,
        "strict_modes = false",
        &worker_with(port, &plugin, 1),
    );
    server.start();
    assert_eq!(TextClient::connect(port).call("hi"), "hi");
    server.stop();
}

#[test]
fn world_writable_or_foreign_plugin_files_are_refused() {
    let port = free_port();
    let server = Server::new("");
    let plugin = own_plugin(&server);
    rewrite_config(&server, "", &worker_with(port, &plugin, 1));
    let shown = plugin.display().to_string();

    chmod(&plugin, 0o666);
    start_refused(
        &server,
        &[
            &format!("plugin {shown} is writable by others (mode 0666, owner uid 0)"),
            "strict_modes",
        ],
    );

    chmod(&plugin, 0o755);
    chown(&plugin, NOBODY, NOBODY);
    start_refused(&server, &[&format!("plugin {shown} is owned by uid 65534")]);
    chown(&plugin, 0, 0);

    // Its folder writable by its group (one with members other than root).
    let dir = server.dir.path().join("lib");
    std::fs::create_dir(&dir).unwrap();
    let inner = dir.join("libmine.so");
    std::fs::copy(&plugin, &inner).unwrap();
    chown(&dir, 0, NOBODY);
    chmod(&dir, 0o775);
    rewrite_config(&server, "", &worker_with(port, &inner, 1));
    start_refused(
        &server,
        &[&format!(
            "{} (a parent of plugin {}",
            dir.display(),
            inner.display()
        )],
    );

    // Fixed: it starts. Made writable later: a reload refuses to load it.
    chmod(&dir, 0o755);
    server.start();
    chmod(&inner, 0o666);
    let out = server.cli(&["reload"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("is writable by others"), "{text}");
    assert_eq!(TextClient::connect(port).call("still"), "still");
    server.stop();
}

#[test]
fn a_symlink_at_the_pid_path_is_refused_not_followed() {
    let server = Server::new(&worker(free_port()));
    let rt = server.runtime_dir();
    std::fs::create_dir(&rt).unwrap();
    chmod(&rt, 0o711);
    let victim = server.dir.path().join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    std::os::unix::fs::symlink(&victim, rt.join("wm-host.pid")).unwrap();
    start_refused(
        &server,
        &[&format!(
            "{} is a symbolic link",
            rt.join("wm-host.pid").display()
        )],
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
    assert!(std::fs::symlink_metadata(rt.join("wm-host.pid"))
        .unwrap()
        .file_type()
        .is_symlink());

    // The control socket's path, likewise.
    std::fs::remove_file(rt.join("wm-host.pid")).unwrap();
    std::os::unix::fs::symlink(&victim, rt.join("wm-host.sock")).unwrap();
    start_refused(
        &server,
        &[&format!(
            "{} is a symbolic link",
            rt.join("wm-host.sock").display()
        )],
    );
    assert_eq!(mode_of(&victim), 0o644);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");
}

#[test]
fn start_right_after_the_master_was_killed_succeeds_at_once() {
    // Port 0: the old workers may still be on their way out.
    let server = Server::new(&worker(0));
    server.start();
    let master = server.master_pid().unwrap();
    unsafe { libc::kill(master as i32, libc::SIGKILL) };
    // Dead once its last thread is: the control socket refuses then. (Its
    // main thread shows as a zombie while other threads are still exiting.)
    let sock = server.runtime_dir().join("wm-host.sock");
    wait_for("the master to be gone", || {
        std::os::unix::net::UnixStream::connect(&sock)
            .is_err()
            .then_some(())
    });
    // The pid file is left behind; its lock went with the master.
    assert!(server.runtime_dir().join("wm-host.pid").exists());
    let out = server.cli(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("not running"),
        "{err}"
    );
    let out = server.cli(&["start", "-d"]);
    assert!(
        out.status.success(),
        "start right after kill -9: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(server.master_pid(), Some(master));
    server.status();
    server.stop();
}

#[test]
fn a_pid_file_naming_an_unrelated_process_does_not_block_start() {
    let port = free_port();
    let server = Server::new(&worker(port));
    let rt = server.runtime_dir();
    std::fs::create_dir(&rt).unwrap();
    chmod(&rt, 0o711);
    let mut sleeper = Command::new("sleep").arg("60").spawn().unwrap();
    std::fs::write(rt.join("wm-host.pid"), format!("{}\n", sleeper.id())).unwrap();

    for cmd in ["status", "stop"] {
        let out = server.cli(&[cmd]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("not running"),
            "{cmd}: {err}"
        );
    }
    let out = server.cli(&["start", "-d"]);
    let started = out.status.success();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    assert!(started, "start with a stale pid file: {err}");
    assert_eq!(TextClient::connect(port).call("ok"), "ok");
    // A second start is refused while the master holds the lock.
    let out = server.cli(&["start", "-d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already running"),
        "{err}"
    );
    server.stop();
}
