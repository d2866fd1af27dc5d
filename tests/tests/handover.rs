//! Live handover on reload: established connections, their unfinished
//! input and the plugin's state move to the new build; nobody reconnects.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;

use wm_e2e::*;

/// A server whose group `g` (`count` workers on `scheme`) loads `live.so`,
/// a copy of test build "a".
fn setup(scheme: &str, count: u32, extra: &str) -> (Server, u16, PathBuf) {
    let port = free_port();
    let s = Server::new(&format!(
        "[[worker]]\nname = \"g\"\nlisten = \"{scheme}://127.0.0.1:{port}\"\ncount = {count}\nplugin = \"live.so\"\nwatch = false\n{extra}\n"
    ));
    let live = s.dir.path().join("live.so");
    std::fs::copy(test_build("a"), &live).unwrap();
    (s, port, live)
}

fn reload(s: &Server) -> (bool, String) {
    let out = s.cli(&["reload"]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Reloads onto `tag` and waits until the old workers are gone.
fn reload_onto(s: &Server, live: &PathBuf, tag: &str) -> String {
    let old: Vec<u32> = s.worker_pids("g").iter().map(|p| p.1).collect();
    std::fs::copy(test_build(tag), live).unwrap();
    let (ok, out) = reload(s);
    assert!(ok, "{out}");
    wait_for("the old workers to exit", || {
        old.iter().all(|&p| !pid_alive(p)).then_some(())
    });
    out
}

fn ws_call(c: &mut TcpStream, m: &str) -> String {
    c.write_all(&ws_frame(true, 1, m.as_bytes(), true)).unwrap();
    let (_, op, data) = ws_read_frame(c).unwrap();
    assert_eq!(op, 1, "a text frame, not a close: {data:?}");
    String::from_utf8(data).unwrap()
}

#[test]
fn text_connections_stay_open_and_reach_the_new_build() {
    let (s, port, live) = setup("text", 2, "");
    s.start();
    let mut clients: Vec<TextClient> = one_client_per_worker(port, 2).into_values().collect();
    for c in clients.iter_mut() {
        assert_eq!(c.call("build"), "a");
    }
    let out = reload_onto(&s, &live, "b");
    assert!(out.contains("2 handed over"), "{out}");
    for c in clients.iter_mut() {
        // The same TCP connection, now served by the new build.
        assert_eq!(c.call("build"), "b");
        assert_eq!(c.call("hello"), "hello");
    }
    let status = s.cli(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("last reload: connections: 2 handed over"),
        "{text}"
    );
    s.stop();
}

#[test]
fn a_message_cut_in_two_by_a_reload_arrives_whole() {
    let (s, port, live) = setup("websocket", 1, "");
    s.start();
    let mut c = ws_raw(port, "/");
    assert_eq!(ws_call(&mut c, "build"), "a");
    // The first fragment of a message, and half of the next frame's bytes.
    c.write_all(&ws_frame(false, 1, b"hel", true)).unwrap();
    let last = ws_frame(true, 0, b"lo there", true);
    c.write_all(&last[..5]).unwrap();
    // Wait until the old worker has read both halves: it keeps the
    // frame's 5 bytes (the fragment before it is joined in its codec).
    wait_for("the worker to read the halves", || {
        let out = s.cli(&["connections", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let rows = v["connections"].as_array()?.clone();
        rows.iter().any(|r| r["recv_q"] == 5).then_some(())
    });
    reload_onto(&s, &live, "b");
    c.write_all(&last[5..]).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let (_, op, data) = ws_read_frame(&mut c).unwrap();
    assert_eq!((op, data.as_slice()), (1, &b"hello there"[..]));
    assert_eq!(ws_call(&mut c, "build"), "b");
    s.stop();
}

#[test]
fn http_keep_alive_connections_carry_on_across_a_reload() {
    let (s, port, live) = setup("http", 1, "");
    s.start();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let ask = |c: &mut TcpStream| {
        c.write_all(b"GET /hello?x HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let head = read_http_head(c);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("connection: close"));
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length: ")
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap();
        let mut body = vec![0; len];
        c.read_exact(&mut body).unwrap();
        String::from_utf8(body).unwrap()
    };
    assert_eq!(ask(&mut c), "hello GET x");
    reload_onto(&s, &live, "b");
    assert_eq!(ask(&mut c), "hello GET x");
    s.stop();
}

#[test]
fn reload_mode_drain_closes_cleanly_instead() {
    let (s, port, live) = setup("websocket", 1, "reload_mode = \"drain\"");
    s.start();
    let mut c = ws_raw(port, "/");
    assert_eq!(ws_call(&mut c, "build"), "a");
    std::fs::copy(test_build("b"), &live).unwrap();
    let (ok, out) = reload(&s);
    assert!(ok, "{out}");
    assert!(out.contains("drained"), "{out}");
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let (_, op, data) = ws_read_frame(&mut c).unwrap();
    assert_eq!(op, 8, "a close frame");
    assert_eq!(&data[..2], &1001u16.to_be_bytes(), "going away");
    // Then a FIN, not a reset.
    let mut rest = Vec::new();
    c.read_to_end(&mut rest).unwrap();
    s.stop();
}

/// One keep-alive request and its answer; an error names what went wrong.
fn http_roundtrip(c: &mut TcpStream, i: u64) -> Result<(), String> {
    let req = format!("GET /hello?{i} HTTP/1.1\r\nHost: t\r\n\r\n");
    c.write_all(req.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match c.read(&mut byte) {
            Ok(0) => return Err("closed by the server".into()),
            Ok(_) => head.push(byte[0]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") || head.contains("connection: close") {
        return Err(format!("answer: {head}"));
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .ok_or("no content-length")?;
    let mut body = vec![0; len];
    c.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
    let want = format!("hello GET {i}");
    match body == want.as_bytes() {
        true => Ok(()),
        false => Err(format!("body {:?}", String::from_utf8_lossy(&body))),
    }
}

#[test]
fn a_hundred_reloads_under_keep_alive_load_fail_no_request() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let (s, port, live) = setup("http", 2, "");
    s.start();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    // Many connections, each opened once and never retried: any error or
    // close across the reloads shows.
    let load: Vec<_> = (0..16)
        .map(|_| {
            let (stop, ok) = (stop.clone(), ok.clone());
            let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
            c.set_read_timeout(Some(DEADLINE)).unwrap();
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    http_roundtrip(&mut c, i).map_err(|e| format!("request {i}: {e}"))?;
                    ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok::<u64, String>(i)
            })
        })
        .collect();
    for i in 0..100 {
        let tag = if i % 2 == 0 { "b" } else { "a" };
        std::fs::copy(test_build(tag), &live).unwrap();
        let (done, out) = reload(&s);
        assert!(done, "reload {i}: {out}");
        assert!(out.contains("handed over"), "reload {i}: {out}");
    }
    stop.store(true, Ordering::Relaxed);
    let results: Vec<Result<u64, String>> = load.into_iter().map(|t| t.join().unwrap()).collect();
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "connections failed: {failed:?}");
    assert!(ok.load(Ordering::Relaxed) > 1000, "the load ran");
    s.stop();
}

#[test]
fn a_new_build_that_panics_in_import_leaves_every_connection_with_the_old_one() {
    let flag = tempfile::NamedTempFile::new().unwrap();
    let (s, port, live) = setup(
        "websocket",
        2,
        &format!(
            "[worker.options]\nimport_panic_file = \"{}\"",
            flag.path().display()
        ),
    );
    s.start();
    let mut clients: Vec<TcpStream> = (0..6).map(|_| ws_raw(port, "/")).collect();
    for c in clients.iter_mut() {
        assert_eq!(ws_call(c, "build"), "a");
    }
    let old: Vec<u32> = s.worker_pids("g").iter().map(|p| p.1).collect();
    std::fs::copy(test_build("b"), &live).unwrap();
    let (ok, out) = reload(&s);
    assert!(!ok, "the reload must fail: {out}");
    assert!(out.contains("on_import"), "{out}");
    // Every connection is still served, by the old build.
    for c in clients.iter_mut() {
        assert_eq!(ws_call(c, "build"), "a");
        assert_eq!(ws_call(c, "still"), "still");
    }
    let now: Vec<u32> = s.worker_pids("g").iter().map(|p| p.1).collect();
    assert_eq!(now, old);
    // Once the new build imports, the same connections move.
    drop(flag);
    let (ok, out) = reload(&s);
    assert!(ok, "{out}");
    for c in clients.iter_mut() {
        assert_eq!(ws_call(c, "build"), "b");
    }
    s.stop();
}

#[test]
fn a_plugin_without_import_closes_cleanly_on_reload() {
    let (ws_port, http_port) = (free_port(), free_port());
    let s = Server::new(&format!(
        "{}{}",
        worker_table(
            "ws",
            &format!("websocket://127.0.0.1:{ws_port}"),
            "echo_plugin",
            1,
            "watch = false"
        ),
        worker_table(
            "web",
            &format!("http://127.0.0.1:{http_port}"),
            "echo_plugin",
            1,
            "watch = false"
        ),
    ));
    s.start();
    let mut ws = ws_raw(ws_port, "/");
    assert_eq!(ws_call(&mut ws, "hi"), "hi");
    let mut web = TcpStream::connect(("127.0.0.1", http_port)).unwrap();
    web.set_read_timeout(Some(DEADLINE)).unwrap();
    web.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let head = read_http_head(&mut web);
    let len: usize = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| {
            l.strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap();
    web.read_exact(&mut vec![0; len]).unwrap();
    let (ok, out) = reload(&s);
    assert!(ok, "{out}");
    assert!(out.contains("drained"), "{out}");
    // The websocket hears "going away", then the connection ends with a FIN.
    let (_, op, data) = ws_read_frame(&mut ws).unwrap();
    assert_eq!((op, &data[..2]), (8, &1001u16.to_be_bytes()[..]));
    let mut rest = Vec::new();
    ws.read_to_end(&mut rest).expect("a FIN, not a reset");
    // The idle keep-alive connection is closed with a FIN, not a reset.
    let mut rest = Vec::new();
    web.read_to_end(&mut rest).expect("a FIN, not a reset");
    assert!(rest.is_empty());
    s.stop();
}

/// Waits until the server holds `n` bytes of unfinished input on a
/// connection (the first part of a message the reload will cut in two).
fn wait_recv_q(s: &Server, n: u64) {
    wait_for("the worker to read the first part", || {
        let out = s.cli(&["connections", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        let rows = v["connections"].as_array()?.clone();
        rows.iter().any(|r| r["recv_q"] == n).then_some(())
    });
}

#[test]
fn frame_custom_and_tcp_connections_move_too() {
    // frame://: half a frame before the reload, the rest after.
    let (s, port, live) = setup("frame", 1, "");
    s.start();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c.write_all(&frame(b"build")).unwrap();
    assert_eq!(read_frame(&mut c).unwrap(), b"a");
    let msg = frame(b"split frame");
    c.write_all(&msg[..6]).unwrap();
    wait_recv_q(&s, 6);
    reload_onto(&s, &live, "b");
    c.write_all(&msg[6..]).unwrap();
    assert_eq!(read_frame(&mut c).unwrap(), b"split frame");
    c.write_all(&frame(b"build")).unwrap();
    assert_eq!(read_frame(&mut c).unwrap(), b"b");
    s.stop();

    // custom:// (the test plugin's CRLF framing).
    let (s, port, live) = setup("custom", 1, "");
    s.start();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let line = |c: &mut TcpStream| {
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n") {
            assert_eq!(c.read(&mut b).unwrap(), 1, "closed after {got:?}");
            got.push(b[0]);
        }
        String::from_utf8(got[..got.len() - 2].to_vec()).unwrap()
    };
    c.write_all(b"build\r\n").unwrap();
    assert_eq!(line(&mut c), "a");
    c.write_all(b"half a").unwrap();
    wait_recv_q(&s, 6);
    reload_onto(&s, &live, "b");
    c.write_all(b" line\r\nbuild\r\n").unwrap();
    assert_eq!(line(&mut c), "half a line");
    assert_eq!(line(&mut c), "b");
    s.stop();

    // tcp://: each read is a message; the connection carries on.
    let (s, port, live) = setup("tcp", 1, "");
    s.start();
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    let ask = |c: &mut TcpStream, m: &str| {
        c.write_all(m.as_bytes()).unwrap();
        let mut b = [0u8; 64];
        let n = c.read(&mut b).unwrap();
        String::from_utf8(b[..n].to_vec()).unwrap()
    };
    assert_eq!(ask(&mut c, "build"), "a");
    reload_onto(&s, &live, "b");
    assert_eq!(ask(&mut c, "build"), "b");
    s.stop();
}

#[test]
fn a_connection_the_new_build_refuses_is_closed_cleanly_and_the_others_carry_on() {
    let (s, port, live) = setup("websocket", 1, "");
    s.start();
    let mut keep = ws_raw(port, "/");
    let mut refuse = ws_raw(port, "/");
    assert_eq!(ws_call(&mut keep, "note kept"), "ok");
    assert_eq!(ws_call(&mut refuse, "refuse-import"), "ok");
    let out = reload_onto(&s, &live, "b");
    assert!(out.contains("1 handed over, 1 refused"), "{out}");
    // The refused one hears a close frame, then a FIN.
    let (_, op, _) = ws_read_frame(&mut refuse).unwrap();
    assert_eq!(op, 8, "a close frame");
    let mut rest = Vec::new();
    refuse.read_to_end(&mut rest).expect("a FIN, not a reset");
    // The other one kept its state and serves on in the new build.
    assert_eq!(ws_call(&mut keep, "build"), "b");
    assert!(ws_call(&mut keep, "state").contains("note=kept"));
    assert!(ws_call(&mut keep, "imported").contains("conns=1 refused=1"));
    s.stop();
}

#[test]
fn deflate_websockets_move_unless_they_hold_the_clients_context() {
    let (s, port, live) = setup("websocket", 1, "ws_deflate = true");
    s.start();
    // One client drops its compression context after each message, one
    // keeps it (as browsers do), so the worker keeps that client's
    // context, which cannot be serialized.
    let (mut fresh, _) = ws_offering(port, "permessage-deflate; client_no_context_takeover");
    let (mut keeps, _) = ws_offering(port, "permessage-deflate");
    for c in [&mut fresh, &mut keeps] {
        c.write_all(&ws_deflated_frame(1, b"build")).unwrap();
        assert_eq!(ws_read_message(c), (true, 1, b"a".to_vec()));
    }
    let out = reload_onto(&s, &live, "b");
    assert!(out.contains("1 handed over"), "{out}");
    fresh.write_all(&ws_deflated_frame(1, b"build")).unwrap();
    assert_eq!(ws_read_message(&mut fresh), (true, 1, b"b".to_vec()));
    // The other stayed with the old worker, which said goodbye as it went.
    let (_, op, payload) = ws_read_frame(&mut keeps).unwrap();
    assert_eq!((op, &payload[..2]), (8, &1001u16.to_be_bytes()[..]));
    s.stop();
}
