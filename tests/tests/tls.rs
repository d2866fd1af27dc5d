//! TLS end to end: `transport = "ssl"`, `wss://` and `https://` with
//! certificates made at test time (rcgen), a real rustls client,
//! `openssl s_client` for protocol versions and `curl` for HTTPS.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::certs::{self, Ca, Versions};
use wm_e2e::*;

/// `[worker.tls]` naming `cert.pem` and `key.pem` next to wm.toml.
const TLS: &str = "[worker.tls]\ncert = \"cert.pem\"\nkey = \"key.pem\"\n";

/// A server of one group on `listen`, with a certificate from `ca` (CN
/// `cn`) written next to its config before it starts.
fn tls_server(ca: &Ca, cn: &str, listen: &str, lib: &str, extra: &str) -> Server {
    let s = Server::new(&worker_table(
        "t",
        listen,
        lib,
        1,
        &format!("{extra}\n{TLS}"),
    ));
    ca.server(cn).write(s.dir.path(), "cert");
    std::fs::rename(s.dir.path().join("cert.key"), s.dir.path().join("key.pem")).unwrap();
    s
}

/// Runs `openssl s_client` with `args`, feeding `input`; returns (exit ok,
/// stdout, stderr).
fn s_client(port: u16, ca: &Path, args: &[&str], input: &str) -> (bool, String, String) {
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect"])
        .arg(format!("127.0.0.1:{port}"))
        .args([
            "-servername",
            "localhost",
            "-verify_return_error",
            "-brief",
            "-ign_eof",
        ])
        .arg("-CAfile")
        .arg(ca)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl (apt-get install openssl)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let end = Instant::now() + DEADLINE;
    while child.try_wait().unwrap().is_none() {
        assert!(Instant::now() < end, "openssl s_client {args:?} hangs");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads until the server closes; returns what came and whether it closed
/// (rather than timing out).
fn read_to_close(s: &mut TcpStream, within: Duration) -> (Vec<u8>, bool) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
    }
}

#[test]
fn ssl_text_speaks_tls12_and_tls13_and_refuses_tls11() {
    let ca = Ca::new("test CA");
    let port = free_port();
    let s = tls_server(
        &ca,
        "server",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        "transport = \"ssl\"",
    );
    let ca_file = ca.write(s.dir.path());
    s.start();

    for (flag, version) in [("-tls1_2", "TLSv1.2"), ("-tls1_3", "TLSv1.3")] {
        let (ok, out, err) = s_client(port, &ca_file, &[flag], "hello\nclose\n");
        assert!(ok, "{flag}: {err}");
        assert!(err.contains(version), "{flag}: {err}");
        assert!(err.contains("Verification: OK"), "{flag}: {err}");
        assert_eq!(out.lines().collect::<Vec<_>>(), ["hello", "bye"], "{flag}");
    }
    // TLS 1.1 is refused by the server, even when the client allows it.
    let (ok, out, err) = s_client(
        port,
        &ca_file,
        &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"],
        "hello\n",
    );
    assert!(!ok, "TLS 1.1 was accepted: {out} {err}");
    assert!(!out.contains("hello"), "{out}");

    // A rustls client, each version; the plugin sees plaintext lines.
    for v in [Versions::Tls12, Versions::Tls13] {
        let mut c = certs::connect(port, ca.client_config(v, None));
        assert_eq!(certs::call(&mut c, "hello over tls"), "hello over tls");
        let big = "x".repeat(100_000);
        assert_eq!(certs::call(&mut c, &big), big, "a line of many records");
    }
    // `connections` names the transport.
    let _held = certs::connect(port, ca.client_config(Versions::Any, None));
    let out = s.cli(&["connections", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"ssl\""), "{text}");
    s.stop();
}

#[test]
fn wss_echoes_through_a_rustls_client() {
    let ca = Ca::new("test CA");
    let port = free_port();
    let s = tls_server(
        &ca,
        "server",
        &format!("wss://127.0.0.1:{port}"),
        "echo_plugin",
        "",
    );
    s.start();
    let mut config = (*ca.client_config(Versions::Any, None)).clone();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = certs::connect(port, std::sync::Arc::new(config));
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut ws, resp) = tungstenite::client::client(format!("wss://localhost:{port}/"), tls)
        .unwrap_or_else(|e| panic!("websocket handshake: {e}"));
    assert_eq!(resp.status(), 101);
    use tungstenite::Message;
    ws.send(Message::text("hello wss")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello wss"));
    // Many records each way, more than a socket buffer holds.
    let blob: String = (0..300_000u32)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    ws.send(Message::text(blob.clone())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text(blob));
    // 16 in flight, answered in order.
    for i in 0..16 {
        ws.send(Message::text(format!("m{i}"))).unwrap();
    }
    for i in 0..16 {
        assert_eq!(ws.read().unwrap(), Message::text(format!("m{i}")));
    }
    ws.close(None).unwrap();
    loop {
        match ws.read() {
            Ok(_) => continue,
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("closing: {e}"),
        }
    }
    s.stop();
}

#[test]
fn https_serves_static_files_and_the_plugin_to_curl() {
    let ca = Ca::new("test CA");
    let port = free_port();
    let s = tls_server(
        &ca,
        "server",
        &format!("https://127.0.0.1:{port}"),
        "test_plugin",
        "static_dir = \"public\"",
    );
    let ca_file = ca.write(s.dir.path());
    let root = s.dir.path().join("public");
    std::fs::create_dir_all(&root).unwrap();
    let page = "<h1>over https</h1>\n".repeat(5000);
    std::fs::write(root.join("index.html"), &page).unwrap();
    s.start();
    let curl = |path: &str| {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "20",
                "-w",
                "\n%{http_code} %{http_version}",
            ])
            .arg("--cacert")
            .arg(&ca_file)
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .expect("curl (apt-get install curl)");
        assert!(
            out.status.success(),
            "curl {path}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let got = curl("/index.html");
    assert_eq!(got, format!("{page}\n200 1.1"), "static file");
    let got = curl("/hello?x=1");
    assert_eq!(got, "hello GET x=1\n200 1.1", "the plugin's answer");
    // ALPN: http/1.1 is chosen over h2.
    let mut config = (*ca.client_config(Versions::Any, None)).clone();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut tls = certs::connect(port, std::sync::Arc::new(config));
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"http/1.1"[..]));
    // Keep-alive and pipelining over TLS.
    tls.write_all(
        b"GET /hello?a HTTP/1.1\r\nHost: x\r\n\r\nGET /hello?b HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).contains("hello GET b") {
        let n = tls.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.find("hello GET a") < text.find("hello GET b"),
        "{text}"
    );
    s.stop();
}

#[test]
fn a_renewed_certificate_is_served_after_reload_and_a_broken_one_is_refused() {
    let ca = Ca::new("test CA");
    let port = free_port();
    let s = Server::new(&worker_table(
        "t",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        2,
        &format!("transport = \"ssl\"\n{TLS}"),
    ));
    let dir = s.dir.path();
    let write = |leaf: &certs::Leaf| {
        std::fs::write(dir.join("cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &leaf.key_pem).unwrap();
    };
    let first = ca.server("first");
    write(&first);
    s.start();
    let config = ca.client_config(Versions::Any, None);
    let mut old = certs::connect(port, config.clone());
    assert_eq!(certs::served(&old), first.der);
    assert_eq!(certs::call(&mut old, "before"), "before");

    // Renewal: new files, then `reload`.
    let second = ca.server("second");
    write(&second);
    let out = s.cli(&["reload"]);
    assert!(
        out.status.success(),
        "reload: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for _ in 0..8 {
        let mut c = certs::connect(port, config.clone());
        assert_eq!(certs::served(&c), second.der, "the renewed certificate");
        assert_eq!(certs::call(&mut c, "after"), "after");
    }
    // The old connection could not move to the new worker: it was drained,
    // and closed with close_notify (a clean end, not a cut).
    let mut buf = [0u8; 64];
    match old.read(&mut buf) {
        Ok(0) => {}
        other => panic!("expected close_notify, got {other:?}"),
    }

    // A broken renewal: a key that does not match. The reload fails like a
    // bad build, naming the file; the workers keep serving the last good one.
    let pids = s.worker_pids("t");
    let stray = ca.server("stray");
    std::fs::write(dir.join("key.pem"), &stray.key_pem).unwrap();
    let out = s.cli(&["reload"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("tls.key") && said.contains("key.pem"),
        "{said}"
    );
    assert!(said.contains("does not match"), "{said}");
    assert_eq!(s.worker_pids("t"), pids, "the old workers keep serving");
    let mut c = certs::connect(port, config.clone());
    assert_eq!(certs::served(&c), second.der);
    assert_eq!(certs::call(&mut c, "still"), "still");
    s.stop();
}

#[test]
fn a_bad_certificate_or_key_fails_start_naming_the_file() {
    let ca = Ca::new("test CA");
    let good = ca.server("good");
    let other = ca.server("other");
    let cases: [(&str, Option<&str>, Option<&str>, &str); 4] = [
        ("missing cert", None, Some(&good.key_pem), "tls.cert"),
        (
            "not a certificate",
            Some("hello\n"),
            Some(&good.key_pem),
            "no certificate",
        ),
        (
            "no key in the key file",
            Some(&good.cert_pem),
            Some(&good.cert_pem),
            "no private key",
        ),
        (
            "a key of another certificate",
            Some(&good.cert_pem),
            Some(&other.key_pem),
            "does not match",
        ),
    ];
    for (what, cert, key, expect) in cases {
        let port = free_port();
        let s = Server::new(&worker_table(
            "t",
            &format!("wss://127.0.0.1:{port}"),
            "echo_plugin",
            1,
            TLS,
        ));
        if let Some(c) = cert {
            std::fs::write(s.dir.path().join("cert.pem"), c).unwrap();
        }
        if let Some(k) = key {
            std::fs::write(s.dir.path().join("key.pem"), k).unwrap();
        }
        let out = s.cli(&["start", "-d"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{what}: started");
        assert!(err.contains(expect), "{what}: {err}");
        let file = if expect == "tls.cert" || expect == "no certificate" {
            "cert.pem"
        } else {
            "key.pem"
        };
        assert!(
            err.contains(&format!("{}", s.dir.path().join(file).display())),
            "{what}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line: {err}");
        assert!(
            TcpStream::connect(("127.0.0.1", port)).is_err(),
            "{what}: nothing listens"
        );
    }
}

#[test]
fn failed_handshakes_close_only_their_connection() {
    let ca = Ca::new("test CA");
    let port = free_port();
    let s = tls_server(
        &ca,
        "server",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        "transport = \"ssl\"",
    );
    s.start();
    let config = ca.client_config(Versions::Any, None);
    let mut good = certs::connect(port, config.clone());
    assert_eq!(certs::call(&mut good, "one"), "one");

    // A client that does not trust the certificate gives up.
    let stranger = Ca::new("another CA");
    let err = certs::try_connect(port, stranger.client_config(Versions::Any, None)).err();
    assert!(err.is_some(), "a stranger's CA was accepted");
    // Garbage that is not TLS (nor HTTP): closed, not left hanging.
    let mut junk = TcpStream::connect(("127.0.0.1", port)).unwrap();
    junk.write_all(&[0x42; 300]).unwrap();
    let (_, closed) = read_to_close(&mut junk, Duration::from_secs(10));
    assert!(closed, "a connection sending garbage was left open");
    // A half handshake, then the client goes away.
    let mut half = TcpStream::connect(("127.0.0.1", port)).unwrap();
    half.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .unwrap();
    drop(half);

    assert_eq!(certs::call(&mut good, "two"), "two", "the others carry on");
    let mut fresh = certs::connect(port, config);
    assert_eq!(certs::call(&mut fresh, "three"), "three");
    wait_for("the failed handshake in the log", || {
        let log = s.log();
        (log.contains("TLS handshake failed") && log.contains("closing connection")).then_some(())
    });
    s.stop();
}

#[test]
fn plain_http_to_an_https_port_is_answered_and_closed() {
    let ca = Ca::new("test CA");
    let port = free_port();
    let s = tls_server(
        &ca,
        "server",
        &format!("https://127.0.0.1:{port}"),
        "test_plugin",
        "",
    );
    s.start();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(b"GET /hello HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let started = Instant::now();
    let (got, closed) = read_to_close(&mut c, Duration::from_secs(10));
    let text = String::from_utf8_lossy(&got);
    assert!(closed, "left hanging after {text:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(text.starts_with("HTTP/1.1 400 "), "{text}");
    assert!(
        text.contains("plain HTTP request was sent to HTTPS port"),
        "{text}"
    );
    // The port still speaks TLS.
    let mut tls = certs::connect(port, ca.client_config(Versions::Any, None));
    tls.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    let _ = tls.read_to_string(&mut body);
    assert!(body.contains("hello GET"), "{body}");
    s.stop();
}

#[test]
fn a_tls_handshake_must_finish_within_header_timeout() {
    let ca = Ca::new("test CA");
    let port = free_port();
    let s = tls_server(
        &ca,
        "server",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        "transport = \"ssl\"\nheader_timeout = \"1s\"",
    );
    s.start();
    let mut silent = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let started = Instant::now();
    let (_, closed) = read_to_close(&mut silent, Duration::from_secs(10));
    assert!(closed, "a client that never said hello was kept");
    assert!(started.elapsed() >= Duration::from_millis(900));
    // Established connections are not held to it.
    let mut c = certs::connect(port, ca.client_config(Versions::Any, None));
    std::thread::sleep(Duration::from_millis(1600));
    assert_eq!(certs::call(&mut c, "later"), "later");
    s.stop();
}

#[test]
fn client_ca_requires_a_client_certificate_it_signed() {
    let ca = Ca::new("test CA");
    let clients = Ca::new("client CA");
    let port = free_port();
    let s = tls_server(
        &ca,
        "server",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        "transport = \"ssl\"",
    );
    std::fs::write(s.dir.path().join("clients.pem"), clients.pem()).unwrap();
    let text = std::fs::read_to_string(&s.config).unwrap();
    std::fs::write(&s.config, format!("{text}client_ca = \"clients.pem\"\n")).unwrap();
    s.start();
    // Refused: without a certificate, and with one the client CA did not sign.
    for (what, cert) in [
        ("no certificate", None),
        ("a stranger's", Some(ca.client("eve"))),
    ] {
        for v in [Versions::Tls12, Versions::Tls13] {
            // TLS 1.3 clients finish before the server has checked them:
            // the refusal is the answer to their first message.
            let refused =
                certs::try_connect(port, ca.client_config(v, cert.as_ref())).and_then(|mut t| {
                    t.write_all(b"hello\n")?;
                    let mut b = [0u8; 16];
                    t.read(&mut b)
                });
            assert!(matches!(refused, Err(_) | Ok(0)), "{what}: {refused:?}");
        }
    }
    // Accepted: a certificate the client CA signed.
    let alice = clients.client("alice");
    for v in [Versions::Tls12, Versions::Tls13] {
        let mut c = certs::connect(port, ca.client_config(v, Some(&alice)));
        assert_eq!(certs::call(&mut c, "hello"), "hello");
    }
    s.stop();
}
