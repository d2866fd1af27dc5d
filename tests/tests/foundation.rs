//! The foundation, end to end: real wm-host processes, real sockets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

use wm_e2e::*;

fn echo_worker(name: &str, scheme: &str, port: u16, count: u32) -> String {
    format!(
        "[[worker]]\nname = \"{name}\"\nlisten = \"{scheme}://127.0.0.1:{port}\"\ncount = {count}\nplugin = \"{}\"\n",
        plugin("echo_plugin").display()
    )
}

fn test_worker(name: &str, port: u16, count: u32, extra: &str) -> String {
    format!(
        "[[worker]]\nname = \"{name}\"\nlisten = \"text://127.0.0.1:{port}\"\ncount = {count}\nplugin = \"{}\"\n{extra}\n",
        plugin("test_plugin").display()
    )
}

fn total_requests(s: &Value, group: &str) -> Vec<u64> {
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["group"] == group)
        .map(|w| w["stats"]["total_messages"].as_u64().unwrap())
        .collect()
}

#[test]
fn many_clients_echo_on_text_frame_and_tcp_served_by_both_workers() {
    let (pt, pf, pc) = (free_port(), free_port(), free_port());
    let server = Server::new(&format!(
        "{}{}{}",
        echo_worker("text", "text", pt, 2),
        echo_worker("frame", "frame", pf, 2),
        echo_worker("tcp", "tcp", pc, 2)
    ));
    server.start();

    let clients = 32;
    let per_client = 20;
    let mut threads = Vec::new();
    for c in 0..clients {
        threads.push(thread::spawn(move || {
            // text: partial and coalesced lines, \r\n accepted.
            let mut t = TextClient::connect(pt);
            for i in 0..per_client {
                assert_eq!(
                    t.call(&format!("client {c} message {i}\r")),
                    format!("client {c} message {i}")
                );
            }
            // frame: two frames in one write, then one split over two writes.
            let mut f = TcpStream::connect(("127.0.0.1", pf)).unwrap();
            f.set_read_timeout(Some(DEADLINE)).unwrap();
            let mut two = frame(format!("a{c}").as_bytes());
            two.extend(frame(b""));
            f.write_all(&two).unwrap();
            assert_eq!(read_frame(&mut f).unwrap(), format!("a{c}").as_bytes());
            assert_eq!(read_frame(&mut f).unwrap(), b"");
            let big = frame(&vec![b'x'; 100_000]);
            f.write_all(&big[..3]).unwrap();
            f.flush().unwrap();
            f.write_all(&big[3..]).unwrap();
            assert_eq!(read_frame(&mut f).unwrap().len(), 100_000);
            // tcp: whatever arrives comes back.
            let mut p = TcpStream::connect(("127.0.0.1", pc)).unwrap();
            p.set_read_timeout(Some(DEADLINE)).unwrap();
            p.write_all(b"raw bytes \x00\x01").unwrap();
            let mut got = Vec::new();
            while got.len() < 12 {
                let mut buf = [0u8; 64];
                let n = p.read(&mut buf).unwrap();
                assert!(n > 0, "tcp echo closed early");
                got.extend_from_slice(&buf[..n]);
            }
            assert_eq!(got, b"raw bytes \x00\x01");
        }));
    }
    for t in threads {
        t.join().unwrap();
    }

    let s = server.status();
    assert_eq!(s["workers"].as_array().unwrap().len(), 6, "{s:#}");
    let text = total_requests(&s, "text");
    assert_eq!(text.iter().sum::<u64>(), (clients * per_client) as u64);
    assert!(
        text.iter().all(|&n| n > 0),
        "both text workers served: {text:?}"
    );
    let frame = total_requests(&s, "frame");
    assert!(
        frame.iter().all(|&n| n > 0),
        "both frame workers served: {frame:?}"
    );
    server.stop();
}

#[test]
fn status_table_shows_every_worker() {
    let port = free_port();
    let server = Server::new(&echo_worker("echo", "text", port, 2));
    server.start();
    let out = server.cli(&["status"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    let header = table
        .lines()
        .find(|l| l.starts_with("pid"))
        .expect("a header row");
    for col in [
        "group",
        "id",
        "listen",
        "memory",
        "connections",
        "total_request",
        "plugin",
    ] {
        assert!(header.contains(col), "column {col} in {header}");
    }
    let pids = server.worker_pids("echo");
    assert_eq!(pids.iter().map(|p| p.0).collect::<Vec<_>>(), vec![0, 1]);
    for (id, pid) in pids {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("{pid} ")))
            .unwrap_or_else(|| panic!("row for pid {pid} in\n{table}"));
        assert!(
            row.contains(&format!(" {id} ")) && row.contains("libecho_plugin.so"),
            "{row}"
        );
        // Columns are aligned: every row starts its `listen` where the header does.
        assert_eq!(row.find("text://"), header.find("listen"), "{table}");
    }
    server.stop();
}

#[test]
fn killed_worker_comes_back_with_its_id() {
    let port = free_port();
    let server = Server::new(&test_worker("t", port, 2, ""));
    server.start();
    let before = server.worker_pids("t");
    let (victim_id, victim) = before[1];
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let after = wait_for("a replacement worker", || {
        let now = server.try_status()?;
        let ready = now["workers"]
            .as_array()?
            .iter()
            .all(|w| !w["stats"].is_null());
        let pids = server.worker_pids("t");
        (ready && pids.len() == 2 && !pids.iter().any(|p| p.1 == victim)).then_some(pids)
    });
    assert_eq!(after[0], before[0], "the other worker was left alone");
    assert_eq!(after[1].0, victim_id, "the replacement keeps the id");
    // Service goes on, and connections reach the new process too.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let mut c = TextClient::connect(port);
        let who = c.call("whoami");
        seen.insert(
            who.split_whitespace()
                .find(|f| f.starts_with("pid="))
                .unwrap()
                .to_string(),
        );
        if seen.len() == 2 {
            break;
        }
    }
    assert!(seen.contains(&format!("pid={}", after[1].1)), "{seen:?}");
    assert!(
        server.log().contains("signal SIGKILL"),
        "the death is logged:\n{}",
        server.log()
    );
    server.stop();
}

#[test]
fn stop_leaves_no_process_pid_file_or_socket() {
    let port = free_port();
    let server = Server::new(&echo_worker("echo", "text", port, 2));
    server.start();
    let master = server.master_pid().unwrap();
    let workers: Vec<u32> = server.worker_pids("echo").iter().map(|p| p.1).collect();
    let mut client = TextClient::connect(port);
    assert_eq!(client.call("hi"), "hi");
    server.stop();
    assert!(!pid_alive(master));
    for w in workers {
        assert!(!pid_alive(w), "worker {w} left behind");
    }
    assert!(!server.runtime_dir().join("wm-host.pid").exists());
    assert!(!server.runtime_dir().join("wm-host.sock").exists());
    assert!(client.closed_by_server(), "connections are closed on stop");
    // The port is free again.
    TcpListener::bind(("127.0.0.1", port)).unwrap();
    // A second stop says it is not running.
    let out = server.cli(&["stop"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not running"));
}

#[test]
fn graceful_stop_waits_for_connections_to_end() {
    let port = free_port();
    let server = Server::with_host("", &echo_worker("echo", "text", port, 1));
    server.start();
    let mut client = TextClient::connect(port);
    assert_eq!(client.call("before"), "before");
    let stopper = {
        let cfg = server.config.clone();
        thread::spawn(move || {
            std::process::Command::new(host_bin())
                .args(["stop", "-g", "-c"])
                .arg(cfg)
                .output()
                .unwrap()
        })
    };
    // While the stop waits, the existing connection is still served, and new
    // connections are no longer accepted by that worker.
    wait_for("the worker to stop accepting", || {
        let s = server.try_status();
        (s.is_none()
            || TcpStream::connect(("127.0.0.1", port)).is_ok_and(|mut c| {
                c.set_read_timeout(Some(std::time::Duration::from_millis(200)))
                    .unwrap();
                c.write_all(b"x\n").is_ok() && c.read(&mut [0u8; 4]).is_err()
            }))
        .then_some(())
    });
    assert_eq!(client.call("during"), "during");
    assert!(!stopper.is_finished());
    client.shutdown();
    let out = stopper.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn foreground_master_stops_on_sigint_and_prints_startup_table() {
    let port = free_port();
    let mut server = Server::new(&echo_worker("echo", "text", port, 2));
    let child = server.start_foreground(2);
    let pid = child.id();
    let mut stdout = child.stdout.take().unwrap();
    unsafe { libc::kill(pid as i32, libc::SIGINT) };
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    stdout.read_to_string(&mut out).unwrap();
    for col in ["proto", "user", "worker", "listen", "count", "state"] {
        assert!(out.contains(col), "{out}");
    }
    assert!(out.contains(&format!("text://127.0.0.1:{port}")), "{out}");
    assert!(!server.runtime_dir().join("wm-host.pid").exists());
}

#[test]
fn second_start_is_refused_while_running() {
    let port = free_port();
    let server = Server::new(&echo_worker("echo", "text", port, 1));
    server.start();
    let out = server.cli(&["start", "-d"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("already running"));
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("still here"), "still here");
    server.stop();
}

/// A failed start prints one line naming the cause and leaves nothing behind.
fn assert_start_fails(server: &Server, expect: &[&str]) {
    let out = server.cli(&["start", "-d"]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "start should fail");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    for e in expect {
        assert!(err.contains(e), "{e:?} in {err}");
    }
    assert!(
        server.master_pid().is_none_or(|p| !pid_alive(p)),
        "no master left"
    );
    assert!(!server.runtime_dir().join("wm-host.sock").exists());
}

#[test]
fn missing_plugin_is_a_one_line_error() {
    let port = free_port();
    let server = Server::new(&format!(
        "[[worker]]\nname = \"x\"\nlisten = \"text://127.0.0.1:{port}\"\ncount = 2\nplugin = \"nope/libmissing.so\"\n"
    ));
    assert_start_fails(&server, &["libmissing.so", "not found"]);
    TcpListener::bind(("127.0.0.1", port)).expect("port released");
}

#[test]
fn file_that_is_not_a_plugin_is_refused() {
    let port = free_port();
    let server = Server::new(&format!(
        "[[worker]]\nname = \"x\"\nlisten = \"text://127.0.0.1:{port}\"\nplugin = \"fake.so\"\n"
    ));
    std::fs::write(
        server.dir.path().join("fake.so"),
        b"this is not an ELF file",
    )
    .unwrap();
    assert_start_fails(&server, &["fake.so", "not a wm-host plugin"]);
    // A real shared library without our root module is refused too.
    let server = Server::new(&format!(
        "[[worker]]\nname = \"x\"\nlisten = \"text://127.0.0.1:{port}\"\nplugin = \"/lib/x86_64-linux-gnu/libz.so.1\"\n"
    ));
    if std::path::Path::new("/lib/x86_64-linux-gnu/libz.so.1").exists() {
        assert_start_fails(&server, &["libz.so.1", "not a wm-host plugin"]);
    }
}

#[test]
fn bad_config_key_names_key_and_line() {
    let port = free_port();
    let server = Server::new(&format!(
        "{}colour = \"blue\"\n",
        echo_worker("echo", "text", port, 1)
    ));
    // [host] is 3 lines + a blank, then the worker table: `colour` is line 10.
    let out = server.cli(&["start", "-d"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("wm.toml:10:") && err.contains("colour"),
        "{err}"
    );
    let out = server.cli(&["status"]);
    assert!(!out.status.success());
}

#[test]
fn port_in_use_is_a_one_line_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let server = Server::new(&echo_worker("echo", "text", port, 2));
    assert_start_fails(&server, &[&format!("text://127.0.0.1:{port}"), "in use"]);
}

#[test]
fn failing_on_worker_start_fails_the_start() {
    for (mode, expect) in [("error", "fail_start is set"), ("panic", "panicked")] {
        let port = free_port();
        let server = Server::new(&test_worker(
            "t",
            port,
            2,
            &format!("[worker.options]\nfail_start = \"{mode}\""),
        ));
        assert_start_fails(&server, &["on_worker_start", expect]);
    }
}

#[test]
fn panic_in_on_message_loses_only_that_connection() {
    let port = free_port();
    let server = Server::new(&test_worker("t", port, 1, ""));
    server.start();
    let pids = server.worker_pids("t");
    let mut good = TextClient::connect(port);
    let mut bad = TextClient::connect(port);
    assert_eq!(good.call("one"), "one");
    bad.send("panic");
    assert!(bad.closed_by_server(), "the panicking connection is closed");
    assert_eq!(good.call("two"), "two");
    let mut fresh = TextClient::connect(port);
    assert_eq!(fresh.call("three"), "three");
    assert_eq!(server.worker_pids("t"), pids, "the worker process survived");
    let log = server.log();
    assert!(
        log.contains("plugin panicked in on_message")
            && log.contains("panic requested by the client"),
        "{log}"
    );
    server.stop();
}

#[test]
fn oversize_and_malformed_input_close_only_that_connection() {
    let (pt, pf) = (free_port(), free_port());
    let server = Server::new(&format!(
        "{}max_package_size = 64\n{}",
        echo_worker("text", "text", pt, 1),
        echo_worker("frame", "frame", pf, 1)
    ));
    server.start();
    let mut ok = TextClient::connect(pt);
    let mut big = TextClient::connect(pt);
    big.send(&"y".repeat(100));
    assert!(big.closed_by_server());
    assert_eq!(ok.call("fine"), "fine");

    let mut bad = TcpStream::connect(("127.0.0.1", pf)).unwrap();
    bad.set_read_timeout(Some(DEADLINE)).unwrap();
    bad.write_all(&2u32.to_be_bytes()).unwrap();
    assert_eq!(
        bad.read(&mut [0u8; 8]).unwrap_or(0),
        0,
        "bad frame length closes"
    );
    let mut good = TcpStream::connect(("127.0.0.1", pf)).unwrap();
    good.set_read_timeout(Some(DEADLINE)).unwrap();
    good.write_all(&frame(b"ok")).unwrap();
    assert_eq!(read_frame(&mut good).unwrap(), b"ok");
    let log = server.log();
    assert!(
        log.contains("over max_package_size") && log.contains("below the 4-byte header"),
        "{log}"
    );
    server.stop();
}

#[test]
fn plugin_sees_worker_info_options_addresses_and_timers() {
    let port = free_port();
    let server = Server::new(&test_worker(
        "svc",
        port,
        2,
        "[worker.options]\ngreeting = \"hello there\"\nlimit = 5",
    ));
    server.start();
    let mut c = TextClient::connect(port);
    let who = c.call("whoami");
    assert!(
        who.starts_with("name=svc id=") && who.ends_with("count=2"),
        "{who}"
    );
    assert_eq!(c.call("option greeting"), "hello there");
    assert_eq!(c.call("option limit"), "5");
    assert_eq!(c.call("option missing"), "<none>");
    let addr = c.call("addr");
    assert!(
        addr.contains(&format!("local=127.0.0.1:{port}")) && addr.contains("remote=127.0.0.1:"),
        "{addr}"
    );
    let start = std::time::Instant::now();
    assert_eq!(c.call("timer 100"), "timer fired");
    assert!(start.elapsed() >= std::time::Duration::from_millis(100));
    assert_eq!(c.call("close"), "bye");
    assert!(c.closed_by_server());
    server.stop();
}

#[test]
fn plugin_built_against_incompatible_api_is_refused() {
    let port = free_port();
    let server = Server::new(&format!(
        "[[worker]]\nname = \"x\"\nlisten = \"text://127.0.0.1:{port}\"\nplugin = \"{}\"\n",
        plugin("abi_mismatch_plugin").display()
    ));
    assert_start_fails(
        &server,
        &["libabi_mismatch_plugin.so", "incompatible plugin-api"],
    );
}

#[test]
fn workers_run_as_the_configured_user_and_still_log() {
    let port = free_port();
    let server = Server::new(&test_worker("t", port, 2, "user = \"nobody\""));
    let out = server.start();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.contains("nobody") && l.contains(&port.to_string())),
        "{table}"
    );
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("unix-uid"), "65534", "the worker runs as nobody");
    assert_eq!(c.call("still serving"), "still serving");
    // Workers write to the daemon's log through the descriptor they inherit.
    assert!(server.log().contains("worker ready"), "{}", server.log());
    server.stop();
    // Unknown users are config errors naming the key.
    let bad = Server::new(&test_worker(
        "t",
        free_port(),
        1,
        "user = \"no-such-user-here\"",
    ));
    let out = bad.cli(&["start", "-d"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("user: no such user"),
        "{:?}",
        out
    );
}
