//! Seeing inside, end to end: `status` (global block, exit statistics, per
//! worker load and state) and `connections`, as Workerman shows them.

use std::io::{Read, Write};
use std::net::TcpStream;

use wm_e2e::*;

fn rows<'a>(s: &'a Value, group: &str) -> Vec<&'a Value> {
    s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["group"] == group)
        .collect()
}

fn stat(w: &Value, field: &str) -> u64 {
    w["stats"][field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {w}"))
}

fn cli_ok(server: &Server, args: &[&str]) -> String {
    let out = server.cli(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn connections(server: &Server) -> Value {
    serde_json::from_str(&cli_ok(server, &["connections", "--json"])).unwrap()
}

/// The text table's header row starting with `first`, and the value under
/// `col` in the row starting with `row_start`.
fn cell(table: &str, first: &str, row_start: &str, col: &str) -> String {
    let header = table
        .lines()
        .find(|l| l.starts_with(first))
        .unwrap_or_else(|| panic!("header {first} in\n{table}"));
    let row = table
        .lines()
        .find(|l| l.starts_with(row_start))
        .unwrap_or_else(|| panic!("row {row_start} in\n{table}"));
    let at = header
        .find(col)
        .unwrap_or_else(|| panic!("{col} in {header}"));
    row[at..]
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

#[test]
fn status_shows_global_block_and_per_worker_load_and_state() {
    let (pe, pt) = (free_port(), free_port());
    let server = Server::new(&format!(
        "{}{}",
        worker_table(
            "echo",
            &format!("text://127.0.0.1:{pe}"),
            "echo_plugin",
            1,
            "max_send_buffer_size = 1\nmax_package_size = 67108864",
        ),
        worker_table("t", &format!("text://127.0.0.1:{pt}"), "test_plugin", 2, ""),
    ));
    server.start();

    // Global block.
    let table = cli_ok(&server, &["status"]);
    let master = server.master_pid().unwrap();
    for want in [
        "wm-host version: ".to_string(),
        format!("master pid: {master}"),
        "start time: ".into(),
        " days ".into(),
        "load average: ".into(),
        "2 worker groups    3 processes".into(),
    ] {
        assert!(table.contains(&want), "{want:?} in\n{table}");
    }
    assert_eq!(cell(&table, "worker ", "echo ", "processes"), "1");
    assert_eq!(cell(&table, "worker ", "t ", "processes"), "2");
    assert_eq!(cell(&table, "worker ", "t ", "exit_count"), "0");
    let s = server.status();
    assert_eq!(s["groups"].as_array().unwrap().len(), 2, "{s:#}");
    assert!(s["exits"].as_array().unwrap().is_empty(), "{s:#}");
    for key in ["version", "start_time", "uptime_secs"] {
        assert!(!s[key].is_null(), "{key} in {s:#}");
    }
    assert_eq!(s["load_average"].as_str().unwrap().split(", ").count(), 3);

    // Per worker: the new columns, every worker idle.
    for (_, pid) in server.worker_pids("t") {
        let p = pid.to_string();
        for col in ["send_fail", "timers", "total_request", "qps"] {
            let v = cell(&table, "pid ", &format!("{p} "), col);
            assert!(v.parse::<f64>().is_ok(), "{col} = {v:?} in\n{table}");
        }
        assert_eq!(cell(&table, "pid ", &format!("{p} "), "state"), "[idle]");
    }
    assert!(rows(&s, "t").iter().all(|w| w["state"] == "idle"), "{s:#}");

    // timers: a pending one-shot timer is counted.
    let mut timed = TextClient::connect(pt);
    timed.send("timer 60000");
    wait_for("the pending timer to be counted", || {
        let s = server.try_status()?;
        let n: u64 = rows(&s, "t").iter().map(|w| stat(w, "timers")).sum();
        (n == 1).then_some(())
    });

    // qps: messages between two status requests, over the time between them.
    server.status();
    let mut c = TextClient::connect(pt);
    for i in 0..20 {
        assert_eq!(c.call(&format!("m{i}")), format!("m{i}"));
    }
    let s = server.status();
    let busiest = rows(&s, "t")
        .into_iter()
        .max_by_key(|w| stat(w, "total_messages"))
        .unwrap();
    assert!(busiest["qps"].as_f64().unwrap() > 0.0, "{s:#}");

    // send_fail: with a 1-byte send buffer, a message echoed while the last
    // one is still queued (the client does not read) is dropped and counted.
    let mut slow = TcpStream::connect(("127.0.0.1", pe)).unwrap();
    let mut big = vec![b'a'; 16 << 20];
    big.extend_from_slice(b"\nx\n");
    slow.write_all(&big).unwrap();
    wait_for("the dropped send to be counted", || {
        let s = server.try_status()?;
        (stat(rows(&s, "echo")[0], "send_fail") == 1).then_some(())
    });
    let conns = connections(&server);
    let local = slow.local_addr().unwrap().to_string();
    let row = conns["connections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["remote"] == local.as_str())
        .unwrap_or_else(|| panic!("{local} in {conns:#}"));
    assert!(row["send_q"].as_u64().unwrap() > 0, "{row}");

    // busy: a worker that does not answer within the deadline (stopped here,
    // as it would be inside a long callback) shows [busy] and no counters.
    let (_, frozen) = server.worker_pids("t")[0];
    unsafe { libc::kill(frozen as i32, libc::SIGSTOP) };
    let table = cli_ok(&server, &["status"]);
    let row = format!("{frozen} ");
    assert_eq!(cell(&table, "pid ", &row, "state"), "[busy]", "{table}");
    for col in ["connections", "send_fail", "timers", "total_request", "qps"] {
        assert_eq!(cell(&table, "pid ", &row, col), "-", "{col}:\n{table}");
    }
    let s = server.status();
    let w = rows(&s, "t")
        .into_iter()
        .find(|w| w["pid"] == frozen)
        .unwrap();
    assert_eq!(w["state"], "busy", "{w}");
    assert!(w["stats"].is_null(), "{w}");
    assert!(
        rows(&s, "echo")[0]["state"] == "idle",
        "the others still answer: {s:#}"
    );
    let conns = connections(&server);
    assert_eq!(conns["busy"], serde_json::json!([frozen]), "{conns:#}");
    unsafe { libc::kill(frozen as i32, libc::SIGCONT) };
    wait_for("the worker to be idle again", || {
        let s = server.try_status()?;
        rows(&s, "t")
            .iter()
            .all(|w| w["state"] == "idle")
            .then_some(())
    });
    drop(slow);
    server.stop();
}

#[test]
fn exit_statistics_count_a_killed_worker_but_not_a_reload() {
    let (pa, pb) = (free_port(), free_port());
    let server = Server::new(&format!(
        "{}{}",
        worker_table("a", &format!("text://127.0.0.1:{pa}"), "test_plugin", 2, ""),
        worker_table("b", &format!("text://127.0.0.1:{pb}"), "test_plugin", 1, ""),
    ));
    server.start();
    let (_, victim) = server.worker_pids("a")[1];
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    let s = wait_for("the replacement, and the exit counted", || {
        let s = server.try_status()?;
        let back = rows(&s, "a")
            .iter()
            .all(|w| w["state"] == "idle" && w["pid"] != victim);
        (back && rows(&s, "a").len() == 2).then_some(s)
    });
    assert_eq!(
        s["exits"],
        serde_json::json!([{"group": "a", "status": "signal SIGKILL", "count": 1}]),
        "{s:#}"
    );
    let table = cli_ok(&server, &["status"]);
    assert_eq!(
        cell(&table, "worker ", "a ", "exit_status"),
        "signal",
        "{table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("a ") && l.contains("signal SIGKILL  1")),
        "{table}"
    );
    assert_eq!(cell(&table, "worker ", "b ", "exit_status"), "-", "{table}");
    assert_eq!(cell(&table, "worker ", "b ", "exit_count"), "0", "{table}");

    // Workers replaced by a reload exit cleanly when told to: not counted.
    let out = server.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let s = wait_for("the replaced workers to be gone", || {
        let s = server.try_status()?;
        let settled = s["groups"]
            .as_array()?
            .iter()
            .all(|g| g["processes"] == g["count"]);
        settled.then_some(s)
    });
    assert_eq!(s["exits"].as_array().unwrap().len(), 1, "{s:#}");
    assert_eq!(s["exits"][0]["count"], 1, "{s:#}");
    server.stop();
}

/// What `connections` must show for one client.
struct Expect {
    stream: TcpStream,
    worker: &'static str,
    protocol: &'static str,
    read: u64,
    written: u64,
    recv_q: u64,
    state: &'static str,
}

#[test]
fn connections_lists_every_client_with_addresses_and_byte_counts() {
    let (pt, pf, pw) = (free_port(), free_port(), free_port());
    let server = Server::new(&format!(
        "{}{}{}",
        worker_table(
            "txt",
            &format!("text://127.0.0.1:{pt}"),
            "echo_plugin",
            1,
            ""
        ),
        worker_table(
            "frm",
            &format!("frame://127.0.0.1:{pf}"),
            "echo_plugin",
            1,
            ""
        ),
        worker_table(
            "ws",
            &format!("websocket://127.0.0.1:{pw}"),
            "echo_plugin",
            1,
            ""
        ),
    ));
    server.start();
    let mut expect = Vec::new();
    // Three text clients: a whole line (echoed) and the start of the next.
    for i in 0..3 {
        let mut s = TcpStream::connect(("127.0.0.1", pt)).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        let line = format!("hello {}\n", "x".repeat(i * 10));
        let partial = "p".repeat(i + 1);
        s.write_all(format!("{line}{partial}").as_bytes()).unwrap();
        let mut back = vec![0u8; line.len()];
        s.read_exact(&mut back).unwrap();
        assert_eq!(back, line.as_bytes());
        expect.push(Expect {
            stream: s,
            worker: "txt",
            protocol: "text",
            read: (line.len() + partial.len()) as u64,
            written: line.len() as u64,
            recv_q: partial.len() as u64,
            state: "ESTABLISHED",
        });
    }
    // One frame client: "jhdxr" (9 bytes, echoed), then 3 bytes of a header.
    let mut f = TcpStream::connect(("127.0.0.1", pf)).unwrap();
    f.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = frame(b"jhdxr");
    out.extend_from_slice(&[0, 0, 0]);
    f.write_all(&out).unwrap();
    assert_eq!(read_frame(&mut f).unwrap(), b"jhdxr");
    expect.push(Expect {
        stream: f,
        worker: "frm",
        protocol: "frame",
        read: 12,
        written: 9,
        recv_q: 3,
        state: "ESTABLISHED",
    });
    // A websocket whose handshake is not complete yet.
    let mut w = TcpStream::connect(("127.0.0.1", pw)).unwrap();
    let head = b"GET / HTTP/1.1\r\nHost: x\r\n";
    w.write_all(head).unwrap();
    expect.push(Expect {
        stream: w,
        worker: "ws",
        protocol: "websocket",
        read: head.len() as u64,
        written: 0,
        recv_q: head.len() as u64,
        state: "HANDSHAKE",
    });

    let pids: Vec<(&str, u32)> = ["txt", "frm", "ws"]
        .iter()
        .map(|g| (*g, server.worker_pids(g)[0].1))
        .collect();
    let matches = |r: &Value, e: &Expect| {
        r["remote"] == e.stream.local_addr().unwrap().to_string().as_str()
            && r["local"] == e.stream.peer_addr().unwrap().to_string().as_str()
            && r["worker"] == e.worker
            && r["protocol"] == e.protocol
            && r["transport"] == "tcp"
            && r["bytes_read"] == e.read
            && r["bytes_written"] == e.written
            && r["recv_q"] == e.recv_q
            && r["send_q"] == 0
            && r["state"] == e.state
            && pids.contains(&(e.worker, r["pid"].as_u64().unwrap() as u32))
    };
    let report = wait_for("every client listed with its byte counts", || {
        let c = connections(&server);
        let list = c["connections"].as_array()?;
        (list.len() == expect.len()
            && expect
                .iter()
                .all(|e| list.iter().filter(|r| matches(r, e)).count() == 1))
        .then_some(c)
    });
    assert!(report["busy"].as_array().unwrap().is_empty(), "{report:#}");

    // The table: one row per connection, under its header.
    let table = cli_ok(&server, &["connections"]);
    let header = table.lines().next().unwrap();
    for col in [
        "pid",
        "worker",
        "cid",
        "trans",
        "protocol",
        "local_address",
        "remote_address",
        "recv_q",
        "send_q",
        "bytes_r",
        "bytes_w",
        "state",
    ] {
        assert!(header.contains(col), "{col} in {header}");
    }
    assert!(table.contains("5 connections"), "{table}");
    for e in &expect {
        let remote = e.stream.local_addr().unwrap().to_string();
        let row = table
            .lines()
            .find(|l| l.contains(&format!(" {remote} ")))
            .unwrap_or_else(|| panic!("{remote} in\n{table}"));
        let at = header.find("bytes_r").unwrap();
        assert_eq!(
            row[at..].split_whitespace().next().unwrap(),
            e.read.to_string()
        );
        assert!(row.ends_with(e.state), "{row}");
    }

    // SIGIO: the same list goes to the log.
    let master = server.master_pid().unwrap();
    unsafe { libc::kill(master as i32, libc::SIGIO) };
    let remote = expect[3].stream.local_addr().unwrap().to_string();
    wait_for("the connections in the log", || {
        let log = server.log();
        (log.contains("SIGIO: 5 connections") && log.contains(&remote)).then_some(())
    });
    server.stop();
}
