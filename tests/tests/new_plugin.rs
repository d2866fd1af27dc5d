//! `wm-host new`: generate a plugin crate, build it with cargo, start it with
//! the generated wm.toml and talk to it; in an empty folder and inside a
//! workspace.
//!
//! The generated crates build offline into this workspace's target dir
//! (CARGO_TARGET_DIR), so abi_stable and plugin-api built for the workspace
//! are reused: the lock `new` copies from wm-host's sources pins the same
//! versions.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use wm_e2e::*;

/// The target dir the generated crates share with this workspace.
fn shared_target() -> PathBuf {
    target_dir().parent().expect("target dir").to_path_buf()
}

fn wm_new(cwd: &Path, args: &[&str]) -> Output {
    Command::new(host_bin())
        .arg("new")
        .args(args)
        .current_dir(cwd)
        .env("CARGO_TARGET_DIR", shared_target())
        .output()
        .unwrap()
}

fn wm_new_ok(cwd: &Path, args: &[&str]) -> String {
    let out = wm_new(cwd, args);
    assert!(
        out.status.success(),
        "wm-host new {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs cargo offline in `dir` on the shared target dir; its output.
fn cargo(dir: &Path, args: &[&str]) -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(args)
        .arg("--offline")
        .current_dir(dir)
        .env("CARGO_TARGET_DIR", shared_target())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "cargo {args:?} in {}:\n{text}",
        dir.display()
    );
    text
}

/// A host started with a generated wm.toml; stopped when dropped.
struct Started(PathBuf);

impl Started {
    fn new(config: PathBuf) -> Started {
        let out = Command::new(host_bin())
            .args(["start", "-d", "-c"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "start {}: {}",
            config.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Started(config)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = Command::new(host_bin())
            .args(["stop", "-c"])
            .arg(&self.0)
            .output();
    }
}

#[test]
fn new_in_an_empty_folder_builds_starts_and_answers() {
    let folder = tempfile::tempdir().unwrap();
    let port = free_port();
    let said = wm_new_ok(
        folder.path(),
        &["hello-text", "--listen", &format!("127.0.0.1:{port}")],
    );
    assert!(said.contains("cargo build"), "{said}");
    let dir = folder.path().join("hello-text");
    let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    assert!(
        manifest.contains(r#"crate-type = ["cdylib", "rlib"]"#),
        "{manifest}"
    );
    assert!(dir.join("Cargo.lock").is_file(), "the lock is seeded");

    // The generated unit test runs, through plugin_api::testing.
    let tested = cargo(&dir, &["test"]);
    assert!(
        tested.contains("numbers_each_connections_messages ... ok"),
        "{tested}"
    );
    cargo(&dir, &["build"]);
    let _host = Started::new(dir.join("wm.toml"));
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("hi"), "hello #1: hi");
    assert_eq!(c.call("again"), "hello #2: again");
    // State is per connection: a new one starts at 1.
    assert_eq!(TextClient::connect(port).call("x"), "hello #1: x");
}

#[test]
fn new_inside_a_workspace_joins_its_members() {
    let ws = tempfile::tempdir().unwrap();
    let root = ws.path();
    std::fs::write(
        root.join("Cargo.toml"),
        "# our services\n[workspace]\nresolver = \"2\"\nmembers = [\n    \"tools/*\", # tools\n]\n",
    )
    .unwrap();
    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let listen = |i: usize| format!("127.0.0.1:{}", ports[i]);
    wm_new_ok(
        root,
        &[
            "plugins/ws-chat",
            "--protocol",
            "websocket",
            "--listen",
            &listen(0),
        ],
    );
    wm_new_ok(root, &["plugins/web", "-p", "http", "--listen", &listen(1)]);
    wm_new_ok(
        root,
        &["plugins/dgram", "-p", "udp", "--listen", &listen(2)],
    );
    let said = wm_new_ok(
        root,
        &["tools/lines", "-p", "custom", "--listen", &listen(3)],
    );
    assert!(said.contains("already a member"), "{said}");

    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    assert_eq!(
        manifest,
        "# our services\n[workspace]\nresolver = \"2\"\nmembers = [\n    \"tools/*\", # tools\n    \
         \"plugins/ws-chat\",\n    \"plugins/web\",\n    \"plugins/dgram\",\n]\n"
    );
    assert!(root.join("Cargo.lock").is_file());
    assert!(!root.join("plugins/web/Cargo.lock").exists());

    // Every template's own unit test passes.
    let tested = cargo(root, &["test", "--workspace"]);
    for t in [
        "echoes_to_the_sender_and_tells_the_lobby ... ok",
        "routes ... ok",
        "answers_each_datagram ... ok",
        "lines_are_cut_at_crlf_and_numbered ... ok",
    ] {
        assert!(tested.contains(t), "{t}:\n{tested}");
    }
    cargo(root, &["build", "--workspace"]);

    let _ws_host = Started::new(root.join("plugins/ws-chat/wm.toml"));
    let url = format!("ws://{}/", listen(0));
    let (mut alice, _) = tungstenite::connect(&url).unwrap();
    let (mut bob, _) = tungstenite::connect(&url).unwrap();
    assert_eq!(alice.read().unwrap().into_text().unwrap().as_str(), "hello");
    assert_eq!(bob.read().unwrap().into_text().unwrap().as_str(), "hello");
    alice.send("hi bob".into()).unwrap();
    assert_eq!(
        alice.read().unwrap().into_text().unwrap().as_str(),
        "hi bob"
    );
    // Bob is in the lobby, whichever worker holds him.
    assert_eq!(bob.read().unwrap().into_text().unwrap().as_str(), "hi bob");

    let _web = Started::new(root.join("plugins/web/wm.toml"));
    let mut s = TcpStream::connect(listen(1)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /hello?name=ann HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nhello ann\n"), "{answer}");

    let _udp = Started::new(root.join("plugins/dgram/wm.toml"));
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(DEADLINE)).unwrap();
    sock.send_to(b"there", listen(2)).unwrap();
    let mut buf = [0u8; 64];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"hello there");

    let _lines = Started::new(root.join("tools/lines/wm.toml"));
    let mut c = TextClient::connect(ports[3]);
    // TextClient ends with \n: "one\r\n" is one packet of the plugin's framing.
    assert_eq!(c.call("one\r"), "hello #1: one\r");
}

#[test]
fn wm_toml_points_where_cargo_builds() {
    // With no CARGO_TARGET_DIR: the target dir of the crate's workspace.
    let plugin_line = |cwd: &Path, path: &str| {
        let out = Command::new(host_bin())
            .args(["new", path])
            .current_dir(cwd)
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
        let wm = std::fs::read_to_string(cwd.join(path).join("wm.toml")).unwrap();
        wm.lines()
            .find(|l| l.starts_with("plugin ="))
            .unwrap()
            .to_string()
    };
    let ws = tempfile::tempdir().unwrap();
    std::fs::write(ws.path().join("Cargo.toml"), "[workspace]\n").unwrap();
    assert_eq!(
        plugin_line(ws.path(), "crates/late"),
        "plugin = \"../../target/debug/liblate.so\""
    );
    let solo = tempfile::tempdir().unwrap();
    assert_eq!(
        plugin_line(solo.path(), "solo"),
        "plugin = \"target/debug/libsolo.so\""
    );
}

#[test]
fn new_refuses_bad_names_busy_folders_and_missing_plugin_api() {
    let folder = tempfile::tempdir().unwrap();
    let err = |args: &[&str]| {
        let out = wm_new(folder.path(), args);
        assert!(!out.status.success(), "{args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(err(&["9lives"]).contains("must start with a letter"));
    assert!(err(&["x", "--name", "fn"]).contains("reserved"));
    std::fs::create_dir(folder.path().join("busy")).unwrap();
    std::fs::write(folder.path().join("busy/file"), "").unwrap();
    let e = err(&["busy"]);
    assert!(e.contains("busy") && e.contains("not empty"), "{e}");
    let e = err(&["ok", "--plugin-api", "/nonexistent/plugin-api"]);
    assert!(e.contains("/nonexistent/plugin-api"), "{e}");
    assert!(err(&["ok", "--listen", "ws://1.2.3.4:5"]).contains("HOST:PORT"));
    assert!(
        !folder.path().join("ok").exists(),
        "nothing written on error"
    );
}
