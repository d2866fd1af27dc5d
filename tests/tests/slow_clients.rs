//! Clients that hold a worker's resources: descriptors (EMFILE), slow heads
//! and messages, buffered incomplete input; and the worker-side checks of
//! issue 12: refusal statuses, a panic's text at start, rate-limited logs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use wm_e2e::*;

fn start(scheme: &str, extra: &str) -> (Server, u16) {
    let port = free_port();
    let s = Server::new(&worker_table(
        "s",
        &format!("{scheme}://127.0.0.1:{port}"),
        "test_plugin",
        1,
        extra,
    ));
    s.start();
    (s, port)
}

fn worker_pid(s: &Server) -> u32 {
    s.worker_pids("s")[0].1
}

fn connect(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c
}

/// Everything the server sends until it closes (a reset counts as a close).
fn read_to_close(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return all,
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return all,
            Err(e) => panic!("still open after {DEADLINE:?} ({e}); got {all:?}"),
        }
    }
}

/// Writes `byte` every 100 ms on a clone of `s` until a write fails (the
/// server closed), as a client trickling its input would.
fn drip(s: &TcpStream, byte: &'static [u8]) -> std::thread::JoinHandle<()> {
    let mut w = s.try_clone().unwrap();
    std::thread::spawn(move || {
        for _ in 0..(DEADLINE.as_millis() / 100) {
            if w.write_all(byte).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

fn http_get(port: u16, path: &str) -> String {
    let mut c = connect(port);
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .unwrap();
    String::from_utf8_lossy(&read_to_close(&mut c)).into_owned()
}

fn vm_hwm_kib(pid: u32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    st.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn out_of_descriptors_queued_clients_are_served_once_some_close() {
    let (s, port) = start("text", "");
    let pid = worker_pid(&s);
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count() as u64;
    // Room for 8 more descriptors in the worker.
    let lim = libc::rlimit {
        rlim_cur: open + 8,
        rlim_max: open + 8,
    };
    // SAFETY: plain syscall on another process, with a valid struct.
    let r = unsafe { libc::prlimit(pid as i32, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
    assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    // Connected one after the other: the kernel queues them in this order.
    let mut clients: Vec<TextClient> = (0..20)
        .map(|i| {
            let mut c = TextClient::connect(port);
            c.send(&format!("hello {i}"));
            c
        })
        .collect();
    wait_for("accept to fail for want of descriptors", || {
        s.log().contains("accept failed").then_some(())
    });
    let served = s.status()["workers"][0]["stats"]["connections"]
        .as_u64()
        .unwrap() as usize;
    assert!((1..15).contains(&served), "{served} accepted");
    for (i, c) in clients[..served].iter_mut().enumerate() {
        assert_eq!(c.recv().as_deref(), Some(&*format!("hello {i}")));
    }
    // Free three descriptors; no new client arrives.
    for c in &clients[..3] {
        c.shutdown();
    }
    for (i, c) in clients.iter_mut().enumerate().skip(served).take(3) {
        assert_eq!(
            c.recv().as_deref(),
            Some(&*format!("hello {i}")),
            "queued client {i} is served"
        );
    }
    // Still full: those left in the queue are shed, not left hanging.
    let last = clients.last_mut().unwrap();
    assert!(last.closed_by_server(), "the last queued client is closed");
    let log = s.log();
    assert!(log.contains("accepting again"), "{log}");
    s.stop();
}

#[test]
fn a_slow_request_head_is_cut_at_header_timeout_with_408() {
    let (s, port) = start("http", "header_timeout = \"1s\"");
    let mut slow = connect(port);
    slow.write_all(b"GET /hello HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let dripper = drip(&slow, b"X");
    // Others are served meanwhile.
    for _ in 0..3 {
        let r = http_get(port, "/hello?q");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let got = String::from_utf8_lossy(&read_to_close(&mut slow)).into_owned();
    assert!(got.starts_with("HTTP/1.1 408"), "{got}");
    dripper.join().unwrap();
    // Keep-alive: the clock starts at the first byte of each head, so a
    // connection quiet between requests for longer is not cut.
    let mut ka = connect(port);
    let req = b"GET /hello?q HTTP/1.1\r\nHost: x\r\n\r\n";
    ka.write_all(req).unwrap();
    assert!(read_http_head(&mut ka).starts_with("HTTP/1.1 200"));
    let mut body = [0u8; 11];
    ka.read_exact(&mut body).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    ka.write_all(req).unwrap();
    assert!(read_http_head(&mut ka).starts_with("HTTP/1.1 200"));
    wait_for("the cut to be logged", || {
        s.log().contains("header_timeout").then_some(())
    });
    s.stop();
}

#[test]
fn a_slow_websocket_handshake_gets_a_plain_close() {
    let (s, port) = start("websocket", "header_timeout = \"1s\"");
    let mut slow = connect(port);
    slow.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    let dripper = drip(&slow, b"X");
    let mut ok = ws_raw(port, "/");
    ok.write_all(&ws_frame(true, 1, b"hi", true)).unwrap();
    assert_eq!(ws_read_frame(&mut ok).unwrap().2, b"hi");
    assert_eq!(read_to_close(&mut slow), b"", "closed without an answer");
    dripper.join().unwrap();
    s.stop();
}

#[test]
fn a_message_started_and_never_finished_is_cut_at_message_timeout() {
    let (s, port) = start("frame", "message_timeout = \"1s\"");
    let mut slow = connect(port);
    slow.write_all(&frame(b"whole")).unwrap();
    assert_eq!(read_frame(&mut slow).unwrap(), b"whole");
    // A 1,000-byte frame, trickled a byte at a time: never done in time.
    slow.write_all(&1004u32.to_be_bytes()).unwrap();
    let dripper = drip(&slow, b"x");
    let mut ok = connect(port);
    for _ in 0..3 {
        ok.write_all(&frame(b"fast")).unwrap();
        assert_eq!(read_frame(&mut ok).unwrap(), b"fast");
    }
    assert_eq!(read_to_close(&mut slow), b"");
    dripper.join().unwrap();
    wait_for("the cut to be logged", || {
        s.log().contains("message_timeout").then_some(())
    });
    s.stop();

    // A websocket message whose fragments never end, with pings (whole
    // frames) keeping the connection busy meanwhile.
    let (s, port) = start("websocket", "message_timeout = \"1s\"");
    let mut ws = ws_raw(port, "/");
    ws.write_all(&ws_frame(false, 1, b"part", true)).unwrap();
    let ping = Box::leak(ws_frame(true, 9, b"", true).into_boxed_slice());
    let dripper = drip(&ws, ping);
    loop {
        match ws_read_frame(&mut ws) {
            Ok((_, 0xA, _)) => continue,
            Ok((_, 0x8, _)) | Err(_) => break,
            Ok(f) => panic!("unexpected frame {f:?}"),
        }
    }
    dripper.join().unwrap();
    s.stop();
}

#[test]
fn incomplete_input_is_bounded_per_worker() {
    let (s, port) = start("frame", "max_buffered_input = \"16MiB\"");
    let pid = worker_pid(&s);
    let chunk = vec![b'x'; 1 << 20];
    let mut clients = Vec::new();
    for _ in 0..40 {
        let mut c = connect(port);
        // 9 MB of a 10 MB frame (under max_package_size), never finished.
        // Writes to a connection the worker cut fail: that is expected.
        let _ = c.write_all(&10_000_004u32.to_be_bytes());
        for _ in 0..9 {
            if c.write_all(&chunk).is_err() {
                break;
            }
        }
        clients.push(c);
    }
    // Served meanwhile.
    let mut fresh = connect(port);
    fresh.write_all(&frame(b"still here")).unwrap();
    assert_eq!(read_frame(&mut fresh).unwrap(), b"still here");
    // The offenders are closed: the fresh client and at most one holder left.
    let left = wait_for("the holders to be cut", || {
        let n = s.status()["workers"][0]["stats"]["connections"].as_u64()?;
        (n <= 2).then_some(n)
    });
    let hwm = vm_hwm_kib(pid);
    eprintln!("worker peak RSS {hwm} KiB; {left} connections left of 41");
    assert!(hwm < 128 * 1024, "worker peak RSS {hwm} KiB");
    drop(clients);
    wait_for("the cut to be logged", || {
        s.log().contains("max_buffered_input").then_some(())
    });
    s.stop();
}

#[test]
fn websocket_refusals_other_than_4xx_5xx_become_500() {
    let (s, port) = start("websocket", "");
    for (asked, expect) in [("101", "500"), ("200", "500"), ("0", "500"), ("403", "403")] {
        let mut c = connect(port);
        let req = format!(
            "GET /?refuse={asked} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        c.write_all(req.as_bytes()).unwrap();
        let head = read_http_head(&mut c);
        assert!(
            head.starts_with(&format!("HTTP/1.1 {expect} ")),
            "refuse={asked}: {head}"
        );
    }
    wait_for("the plugin's mistake to be logged", || {
        s.log().contains("refused with status 101").then_some(())
    });
    s.stop();
}

#[test]
fn a_panic_in_on_worker_start_reports_its_text() {
    let port = free_port();
    let s = Server::new(&worker_table(
        "s",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        1,
        "[worker.options]\nfail_start = \"panic\"",
    ));
    let out = s.cli(&["start", "-d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("on_worker_start panicked: fail_start is set to panic"),
        "{err}"
    );
}

#[test]
fn a_flood_of_bad_input_logs_a_bounded_number_of_lines() {
    let (s, port) = start("frame", "max_package_size = 64");
    for _ in 0..100 {
        let mut c = connect(port);
        c.write_all(&1000u32.to_be_bytes()).unwrap();
        assert_eq!(read_to_close(&mut c), b"");
    }
    wait_for("a summary of the lines held back", || {
        s.log().contains("suppressed").then_some(())
    });
    let lines = s.log().matches("closing connection").count();
    assert!(lines <= 30, "{lines} lines for 100 bad clients");
    s.stop();
}
