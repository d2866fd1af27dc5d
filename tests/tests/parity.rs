//! Workerman parity: flow control, pause/resume, timers, heartbeats, end().

use std::io::Write;
use std::time::{Duration, Instant};

use wm_e2e::*;

fn server(extra: &str) -> (Server, u16) {
    let port = free_port();
    let s = Server::new(&worker_table(
        "p",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        1,
        extra,
    ));
    s.start();
    (s, port)
}

#[test]
fn slow_reader_fills_the_buffer_then_drains_and_drops_are_counted() {
    let (s, port) = server("max_send_buffer_size = 1048576");
    let mut c = TextClient::connect(port);
    // 40 MiB at once: the kernel takes some, the send buffer 1 MiB, the rest is dropped.
    c.send("flood 640 65536");
    // Not reading yet: once the server reports drops, the buffer was full.
    wait_for("sends to fail while the client does not read", || {
        let st = s.status();
        (st["workers"][0]["stats"]["send_fail"].as_u64()? > 0).then_some(())
    });
    // Now read it all; the plugin says `drained` once its buffer is empty.
    let mut lines = 0;
    loop {
        let line = c.recv().expect("connection stays open");
        if line == "drained" {
            break;
        }
        assert_eq!(line.len(), 65536);
        lines += 1;
    }
    assert!(lines < 640, "some messages were dropped ({lines} arrived)");
    let events = c.call("events");
    let field = |k: &str| -> u32 {
        events
            .split_whitespace()
            .find_map(|f| f.strip_prefix(k))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(field("full="), 1, "{events}");
    assert_eq!(field("drain="), 1, "{events}");
    assert_eq!(field("dropped="), 640 - lines, "{events}");
    assert_eq!(
        field("errors="),
        field("dropped="),
        "each drop reported through on_error: {events}"
    );
    let st = s.status();
    assert_eq!(
        st["workers"][0]["stats"]["send_fail"].as_u64().unwrap(),
        u64::from(640 - lines)
    );
    s.stop();
}

#[test]
fn pause_recv_holds_input_until_resume() {
    let (s, port) = server("");
    let mut c = TextClient::connect(port);
    c.send("pause 300");
    c.send("sent while paused");
    assert_eq!(c.recv().unwrap(), "paused");
    assert_eq!(c.recv().unwrap(), "resumed", "nothing is read while paused");
    assert_eq!(c.recv().unwrap(), "sent while paused");
    s.stop();
}

#[test]
fn timers_fire_on_time_and_can_be_deleted() {
    let (s, port) = server("");
    let mut c = TextClient::connect(port);
    // One-shot.
    let t0 = Instant::now();
    assert_eq!(c.call("timer 150"), "timer fired");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(150), "never early: {took:?}");
    // Repeating, measured from the client side; it deletes itself after 5.
    c.send("every 100 5");
    let start = Instant::now();
    let mut at = Vec::new();
    for k in 1..=5 {
        assert_eq!(c.recv().unwrap(), format!("tick {k}"));
        at.push(start.elapsed());
    }
    assert_eq!(c.recv().unwrap(), "done");
    for (k, t) in at.iter().enumerate() {
        let due = Duration::from_millis(100 * (k as u64 + 1));
        // Not early; late by at most a generous margin on a shared machine.
        assert!(
            *t + Duration::from_millis(5) >= due && *t <= due + Duration::from_millis(500),
            "tick {} at {t:?}",
            k + 1
        );
    }
    // Delete-all stops a running repeating timer: after the answer, no tick.
    c.send("every 20 1000000");
    assert_eq!(c.recv().unwrap(), "tick 1");
    c.send("deltimers");
    loop {
        let l = c.recv().unwrap();
        if l.starts_with("deleted") {
            assert_eq!(l, "deleted 1");
            break;
        }
        assert!(l.starts_with("tick "), "{l}");
    }
    assert_eq!(c.call("ping"), "ping", "no tick after the delete");
    s.stop();
}

#[test]
fn idle_timeout_closes_silent_clients_only() {
    let (s, port) = server("idle_timeout = \"400ms\"");
    let mut silent = TextClient::connect(port);
    let mut chatty = TextClient::connect(port);
    let start = Instant::now();
    // The chatty client talks every 100 ms; the silent one says nothing.
    while start.elapsed() < Duration::from_millis(1200) {
        assert_eq!(chatty.call("still here"), "still here");
        std::thread::sleep(Duration::from_millis(100)); // the client's pace, not a wait for readiness
    }
    assert!(silent.closed_by_server(), "the silent client was closed");
    assert_eq!(chatty.call("and now"), "and now");
    s.stop();
}

#[test]
fn end_half_closes_after_flushing() {
    let (s, port) = server("");
    let mut c = TextClient::connect(port);
    c.send("end");
    assert_eq!(c.recv().unwrap(), "ending");
    assert_eq!(c.recv(), None, "end of stream after the last message");
    s.stop();
}

#[test]
fn plugin_sees_byte_counts_and_its_connections() {
    let (s, port) = server("");
    let _other = TextClient::connect(port);
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("12345"), "12345");
    // 6 bytes, then 5 for "info\n": 11 read; 6 written before.
    let info = c.call("info");
    assert_eq!(info, "read=11 written=6 conns=2");
    s.stop();
}

#[test]
fn max_connections_refuses_extra_clients_with_a_log_line() {
    let (s, port) = server("max_connections = 2");
    let mut a = TextClient::connect(port);
    let mut b = TextClient::connect(port);
    assert_eq!(a.call("one"), "one");
    assert_eq!(b.call("two"), "two");
    let mut extra = TextClient::connect(port);
    extra.send("three");
    assert!(extra.closed_by_server(), "a third client is refused");
    assert_eq!(a.call("still"), "still");
    assert!(s.log().contains("connection limit reached"), "{}", s.log());
    s.stop();
}

#[test]
fn websocket_listeners_ping_when_asked() {
    let port = free_port();
    let s = Server::new(&worker_table(
        "ws",
        &format!("websocket://127.0.0.1:{port}"),
        "test_plugin",
        1,
        "ws_ping_interval = \"100ms\"",
    ));
    s.start();
    let mut c = ws_raw(port, "/");
    let (fin, op, payload) = ws_read_frame(&mut c).unwrap();
    assert_eq!((fin, op, payload.len()), (true, 0x9, 0), "a server ping");
    s.stop();
}

#[test]
fn websocket_pings_do_not_reach_outbound_connections() {
    let port = free_port();
    let s = Server::new(&worker_table(
        "ws",
        &format!("websocket://127.0.0.1:{port}"),
        "test_plugin",
        1,
        "ws_ping_interval = \"100ms\"",
    ));
    s.start();
    // A plain TCP peer the plugin dials out to.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_port = upstream.local_addr().unwrap().port();
    let mut c = ws_raw(port, "/");
    c.write_all(&ws_frame(
        true,
        0x1,
        format!("dial tcp://127.0.0.1:{up_port} hello").as_bytes(),
        true,
    ))
    .unwrap();
    let (mut up, _) = upstream.accept().unwrap();
    // Two pings reached the websocket client: two sweeps have run since
    // the outbound connection was made.
    let mut pings = 0;
    while pings < 2 {
        let (_, op, _) = ws_read_frame(&mut c).unwrap();
        if op == 0x9 {
            pings += 1;
        }
    }
    up.set_nonblocking(true).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = std::io::Read::read(&mut up, &mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        got, b"hello",
        "the outbound TCP peer got only what the plugin sent"
    );
    s.stop();
}
