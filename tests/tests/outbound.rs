//! Outbound connections from plugins, reconnects, and the proxy plugin.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use wm_e2e::*;

/// A host with a test-plugin group `t` (text) and echo groups on text,
/// frame, tcp and websocket.
fn servers() -> (Server, u16, [u16; 4]) {
    let t = free_port();
    let echo = [free_port(), free_port(), free_port(), free_port()];
    let s = Server::new(&format!(
        "{}{}{}{}{}",
        worker_table("t", &format!("text://127.0.0.1:{t}"), "test_plugin", 1, ""),
        worker_table(
            "et",
            &format!("text://127.0.0.1:{}", echo[0]),
            "echo_plugin",
            1,
            ""
        ),
        worker_table(
            "ef",
            &format!("frame://127.0.0.1:{}", echo[1]),
            "echo_plugin",
            1,
            ""
        ),
        worker_table(
            "ec",
            &format!("tcp://127.0.0.1:{}", echo[2]),
            "echo_plugin",
            1,
            ""
        ),
        worker_table(
            "ew",
            &format!("websocket://127.0.0.1:{}", echo[3]),
            "echo_plugin",
            1,
            ""
        ),
    ));
    s.start();
    (s, t, echo)
}

#[test]
fn outbound_clients_round_trip_on_every_protocol() {
    let (s, t, echo) = servers();
    let mut c = TextClient::connect(t);
    for url in [
        format!("text://127.0.0.1:{}", echo[0]),
        format!("frame://127.0.0.1:{}", echo[1]),
        format!("tcp://127.0.0.1:{}", echo[2]),
        format!("ws://127.0.0.1:{}/", echo[3]),
    ] {
        // The message is sent right after connect(): queued until connected.
        c.send(&format!(
            "dial {url} hello over {}",
            &url[..url.find(':').unwrap()]
        ));
        let mut got = vec![c.recv().unwrap(), c.recv().unwrap()];
        got.sort();
        let scheme = &url[..url.find(':').unwrap()];
        assert_eq!(
            got,
            vec![
                "connected".to_string(),
                format!("reply hello over {scheme}")
            ],
            "{url}"
        );
    }
    s.stop();
}

#[test]
fn a_refused_connect_reports_error_1_then_close() {
    let (s, t, _) = servers();
    let dead = free_port();
    let mut c = TextClient::connect(t);
    c.send(&format!("dial tcp://127.0.0.1:{dead} x"));
    assert_eq!(c.recv().unwrap(), "error 1");
    assert_eq!(c.recv().unwrap(), "upstream closed");
    assert_eq!(
        c.call("dial nope://x y"),
        "dial error: cannot connect to nope:// (supported: tcp, text, frame, ws)"
    );
    s.stop();
}

#[test]
fn reconnect_retries_until_the_server_appears() {
    let (s, t, _) = servers();
    let port = free_port();
    let mut c = TextClient::connect(t);
    c.send(&format!("redial tcp://127.0.0.1:{port} 100"));
    // The first attempts fail (nothing listens yet)…
    assert_eq!(c.recv().unwrap(), "error 1");
    // …then a server appears and a later attempt gets through.
    let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (mut accepted, _) = listener.accept().unwrap();
    loop {
        let line = c.recv().unwrap();
        if line == "connected" {
            break;
        }
        assert_eq!(line, "error 1");
    }
    accepted.write_all(b"from the new server").unwrap();
    assert_eq!(c.recv().unwrap(), "reply from the new server");
    s.stop();
}

#[test]
fn proxy_pipes_both_ways_with_back_pressure() {
    // The upstream: a blocking echo, so it never drops and never outruns.
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let echo = upstream.local_addr().unwrap().port();
    thread::spawn(move || {
        for conn in upstream.incoming() {
            let Ok(mut conn) = conn else { return };
            thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let proxy = free_port();
    let s = Server::new(&worker_table(
        "proxy",
        &format!("tcp://127.0.0.1:{proxy}"),
        "proxy_plugin",
        1,
        &format!(
            "max_send_buffer_size = 65536\n[worker.options]\nupstream = \"tcp://127.0.0.1:{echo}\""
        ),
    ));
    s.start();
    let mut c = TcpStream::connect(("127.0.0.1", proxy)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c.write_all(b"ping through the proxy").unwrap();
    let mut buf = [0u8; 64];
    let n = c.read(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping through the proxy");
    // 32 MiB written faster than it is read back: with 64 KiB send buffers
    // in the proxy, only back-pressure (pausing the faster side) keeps every
    // byte (a send over the limit would be dropped and counted).
    let total = 32 * 1024 * 1024;
    let writer = {
        let mut w = c.try_clone().unwrap();
        thread::spawn(move || {
            let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            for _ in 0..total / chunk.len() {
                w.write_all(&chunk).unwrap();
            }
        })
    };
    let mut got = 0usize;
    let mut buf = vec![0u8; 65536];
    let mut largest_queue = 0;
    let mut next_sample = 0;
    while got < total {
        let n = c.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {got} bytes");
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(*b, ((got + i) % 65536 % 251) as u8, "byte {}", got + i);
        }
        got += n;
        // A slow receiver (its pace, not a wait): the proxy must hold the
        // sender back rather than buffer for it.
        thread::sleep(std::time::Duration::from_micros(200));
        if got >= next_sample {
            next_sample += 2 * 1024 * 1024;
            let out = s.cli(&["connections", "--json"]);
            let rows: Value = serde_json::from_slice(&out.stdout).unwrap();
            for r in rows["connections"].as_array().into_iter().flatten() {
                largest_queue = largest_queue.max(r["send_q"].as_u64().unwrap_or(0));
            }
        }
    }
    writer.join().unwrap();
    // One forwarded read (64 KiB) may land on a buffer just under its limit.
    assert!(
        largest_queue <= 2 * 65536,
        "the proxy buffered {largest_queue} bytes for one connection"
    );
    // Closing the client closes the upstream too.
    drop(c);
    wait_for("both proxy connections to close", || {
        let st = s.status();
        let conns: u64 = st["workers"]
            .as_array()?
            .iter()
            .map(|w| w["stats"]["connections"].as_u64().unwrap_or(1))
            .sum();
        (conns == 0).then_some(())
    });
    s.stop();
}
