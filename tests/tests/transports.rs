//! The manual's other transports: udp://, unix:// stream listeners, and
//! workers without a listener.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::UdpSocket;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;

use wm_e2e::*;

fn udp_client() -> UdpSocket {
    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    c
}

fn udp_call(c: &UdpSocket, port: u16, msg: &str) -> Option<String> {
    c.send_to(msg.as_bytes(), ("127.0.0.1", port)).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = c.recv_from(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).to_string())
}

#[test]
fn udp_datagrams_are_messages_answered_to_their_sender() {
    let port = free_port();
    let s = Server::new(&worker_table(
        "u",
        &format!("udp://127.0.0.1:{port}"),
        "test_plugin",
        2,
        "max_package_size = 100",
    ));
    s.start();
    let c = udp_client();
    assert_eq!(udp_call(&c, port, "hello").as_deref(), Some("hello"));
    // Both workers share the port: peers spread over them.
    let mut pids = HashSet::new();
    for _ in 0..64 {
        let c = udp_client();
        let who = udp_call(&c, port, "whoami").unwrap();
        pids.insert(
            who.split_whitespace()
                .find(|f| f.starts_with("pid="))
                .unwrap()
                .to_string(),
        );
        if pids.len() == 2 {
            break;
        }
    }
    assert_eq!(pids.len(), 2, "{pids:?}");
    // A plugin that closes a datagram's connection does not close the listener.
    assert_eq!(udp_call(&c, port, "close").as_deref(), Some("bye"));
    assert_eq!(
        udp_call(&c, port, "still there").as_deref(),
        Some("still there")
    );
    // Over max_package_size: dropped (no answer), and the next one is fine.
    c.set_read_timeout(Some(std::time::Duration::from_millis(300)))
        .unwrap();
    assert_eq!(udp_call(&c, port, &"x".repeat(200)), None);
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(udp_call(&c, port, "after").as_deref(), Some("after"));
    let status = String::from_utf8_lossy(&s.cli(&["status"]).stdout).to_string();
    assert!(
        status.contains(&format!("udp://127.0.0.1:{port}")),
        "{status}"
    );
    s.stop();
}

#[test]
fn unix_stream_listener_with_mode_survives_reload_and_goes_on_stop() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let s = Server::new(&format!(
        "{}[worker.unix]\nmode = \"0660\"\n",
        worker_table(
            "x",
            &format!("unix://{}", path.display()),
            "test_plugin",
            2,
            "watch = false"
        )
    ));
    s.start();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let call = |c: &mut UnixStream, m: &str| {
        c.write_all(m.as_bytes()).unwrap();
        let mut b = [0u8; 256];
        let n = c.read(&mut b).unwrap();
        String::from_utf8_lossy(&b[..n]).to_string()
    };
    let mut c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(call(&mut c, "ping"), "ping");
    let out = s.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The connection moved with the reload, and the socket file stayed.
    assert_eq!(call(&mut c, "pong"), "pong");
    let mut d = UnixStream::connect(&path).unwrap();
    d.set_read_timeout(Some(DEADLINE)).unwrap();
    assert_eq!(call(&mut d, "new"), "new");
    s.stop();
    assert!(!path.exists(), "the socket file is removed on stop");
}

#[test]
fn a_worker_without_a_listener_runs_timers_and_publishes() {
    let port = free_port();
    let s = Server::new(&format!(
        "{}[[worker]]\nname = \"ticker\"\ncount = 1\nplugin = \"{}\"\n[worker.options]\npublish_every_ms = \"50\"\n",
        worker_table("t", &format!("text://127.0.0.1:{port}"), "test_plugin", 1, ""),
        plugin("test_plugin").display()
    ));
    s.start();
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("sub"), "ok");
    let got = wait_for("a tick from the listenless worker", || {
        let line = c.recv()?;
        line.starts_with("published tick ticker - ").then_some(line)
    });
    assert!(got.ends_with(|ch: char| ch.is_ascii_digit()), "{got}");
    let st = s.status();
    let ticker: Vec<&Value> = st["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["group"] == "ticker")
        .collect();
    assert_eq!(ticker.len(), 1);
    assert_eq!(ticker[0]["listen"], "-");
    s.stop();
}
