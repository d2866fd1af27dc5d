//! The admin listener (`[host] admin`): `/metrics` in the Prometheus text
//! format moving with real traffic, `/status` and `/connections` as the
//! CLI's `--json`, the bearer token, a hostile client that cannot stall the
//! master, and the dashboard in headless Chromium across a reload.
//!
//! Needs `cargo build -p wm-host`, `make test-builds`, and for the browser
//! test `apt-get install chromium chromium-driver`.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpStream;

use wm_e2e::webdriver::Driver;
use wm_e2e::*;

/// A server with the admin listener on a free port; `host` goes into
/// `[host]`, the group `t` (text, test plugin build "a") has `extra`.
fn setup(host: &str, extra: &str) -> (Server, u16, u16) {
    let (port, admin) = (free_port(), free_port());
    let s = Server::with_host(
        &format!("admin = \"127.0.0.1:{admin}\"\n{host}"),
        &format!(
            "[[worker]]\nname = \"t\"\nlisten = \"text://127.0.0.1:{port}\"\ncount = 2\nplugin = \"live.so\"\nwatch = false\n{extra}\n"
        ),
    );
    std::fs::copy(test_build("a"), s.dir.path().join("live.so")).unwrap();
    (s, port, admin)
}

struct Answer {
    status: u16,
    head: String,
    body: String,
}

/// One request on its own connection (`Connection: close`), read to the end.
fn get(port: u16, path: &str, auth: Option<&str>) -> Answer {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{auth}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {raw:?}"));
    Answer {
        status,
        head: head.to_string(),
        body: body.to_string(),
    }
}

type Series = BTreeMap<(String, BTreeMap<String, String>), f64>;

/// Parses the Prometheus text format (0.0.4) strictly: every line is a
/// HELP, a TYPE or a sample of a declared family, label values are quoted
/// with only `\\`, `\"` and `\n` escaped, values are floats, and no series
/// appears twice. Panics naming the line otherwise.
fn parse_prometheus(text: &str) -> Series {
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.chars().enumerate().all(|(i, c)| {
                c.is_ascii_alphabetic() || c == '_' || c == ':' || (i > 0 && c.is_ascii_digit())
            })
    };
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Series::new();
    for (no, line) in text.lines().enumerate() {
        let bad = |why: &str| -> ! { panic!("line {}: {why}: {line:?}\n{text}", no + 1) };
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, what) = (parts.next(), parts.next(), parts.next());
            match (kind, name, what) {
                (Some("HELP"), Some(n), _) if name_ok(n) => {}
                (Some("TYPE"), Some(n), Some(t))
                    if name_ok(n)
                        && ["counter", "gauge", "untyped", "summary", "histogram"].contains(&t) =>
                {
                    if types.insert(n.to_string(), t.to_string()).is_some() {
                        bad("family declared twice");
                    }
                }
                _ => bad("a comment that is neither HELP nor TYPE"),
            }
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or_else(|| bad("no value"));
        let name = &line[..name_end];
        if !name_ok(name) {
            bad("bad metric name");
        }
        if !types.contains_key(name) {
            bad("sample without a TYPE line before it");
        }
        let mut rest = &line[name_end..];
        let mut labels = BTreeMap::new();
        if let Some(r) = rest.strip_prefix('{') {
            let mut r = r;
            loop {
                if let Some(after) = r.strip_prefix('}') {
                    r = after;
                    break;
                }
                let eq = r.find("=\"").unwrap_or_else(|| bad("label without =\""));
                let key = &r[..eq];
                if !name_ok(key) {
                    bad("bad label name");
                }
                let mut value = String::new();
                let mut chars = r[eq + 2..].char_indices();
                let end = loop {
                    match chars.next() {
                        Some((i, '"')) => break eq + 2 + i + 1,
                        Some((_, '\\')) => match chars.next() {
                            Some((_, '\\')) => value.push('\\'),
                            Some((_, '"')) => value.push('"'),
                            Some((_, 'n')) => value.push('\n'),
                            _ => bad("bad escape in a label value"),
                        },
                        Some((_, '\n')) | None => bad("unterminated label value"),
                        Some((_, c)) => value.push(c),
                    }
                };
                if labels.insert(key.to_string(), value).is_some() {
                    bad("label repeated");
                }
                r = &r[end..];
                r = r.strip_prefix(',').unwrap_or(r);
            }
            rest = r;
        }
        let mut fields = rest
            .strip_prefix(' ')
            .unwrap_or_else(|| bad("no space before the value"))
            .split(' ');
        let value: f64 = match fields.next() {
            Some("+Inf") => f64::INFINITY,
            Some("-Inf") => f64::NEG_INFINITY,
            Some(v) => v.parse().unwrap_or_else(|_| bad("value is not a float")),
            None => bad("no value"),
        };
        if let Some(ts) = fields.next() {
            ts.parse::<i64>()
                .unwrap_or_else(|_| bad("timestamp is not an integer"));
        }
        if fields.next().is_some() {
            bad("trailing fields");
        }
        if types[name] == "counter" && value < 0.0 {
            bad("negative counter");
        }
        if out.insert((name.to_string(), labels), value).is_some() {
            bad("series repeated");
        }
    }
    out
}

fn scrape(admin: u16) -> Series {
    let a = get(admin, "/metrics", None);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.head
            .contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{}",
        a.head
    );
    parse_prometheus(&a.body)
}

/// The sum of a metric over the series whose labels include `with`.
fn sum(m: &Series, name: &str, with: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|((n, l), _)| {
            n == name
                && with
                    .iter()
                    .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let (s, port, admin) = setup("", "max_send_buffer_size = 4096");
    s.start();
    let before = scrape(admin);
    // Every worker has its series, labelled with group, id, pid and build.
    let status = s.status();
    for w in status["workers"].as_array().unwrap() {
        let pid = w["pid"].to_string();
        let build = w["build"].as_str().unwrap();
        let l = [("group", "t"), ("pid", pid.as_str()), ("build", build)];
        assert_eq!(sum(&before, "wm_worker_responding", &l), 1.0, "{pid}");
        assert!(sum(&before, "wm_worker_memory_bytes", &l) > 0.0);
    }
    assert_eq!(sum(&before, "wm_group_processes", &[("group", "t")]), 2.0);
    let msgs = sum(&before, "wm_worker_messages_total", &[("group", "t")]);
    let bytes_in = sum(&before, "wm_worker_received_bytes_total", &[("group", "t")]);
    let bytes_out = sum(&before, "wm_worker_sent_bytes_total", &[("group", "t")]);

    // 10 lines in, 10 echoed: messages and bytes both ways move by that.
    let mut c = TextClient::connect(port);
    for i in 0..10 {
        assert_eq!(c.call(&format!("hello {i}")), format!("hello {i}"));
    }
    let sent = (0..10).map(|i| format!("hello {i}\n").len()).sum::<usize>() as f64;
    wait_for("the counters to count 10 messages", || {
        let m = scrape(admin);
        let d = sum(&m, "wm_worker_messages_total", &[("group", "t")]) - msgs;
        (d == 10.0).then_some(())
    });
    let m = scrape(admin);
    assert_eq!(
        sum(&m, "wm_worker_received_bytes_total", &[("group", "t")]) - bytes_in,
        sent
    );
    assert_eq!(
        sum(&m, "wm_worker_sent_bytes_total", &[("group", "t")]) - bytes_out,
        sent
    );
    assert_eq!(sum(&m, "wm_worker_connections", &[("group", "t")]), 1.0);

    // A client that reads nothing while the plugin floods it: sends past
    // the send buffer are dropped and counted.
    let mut slow = TextClient::connect(port);
    slow.send("flood 200 4000");
    wait_for("send failures to be counted", || {
        let m = scrape(admin);
        (sum(&m, "wm_worker_send_failures_total", &[("group", "t")]) > 0.0).then_some(())
    });

    // A reload hands the connections over: the new workers count what they
    // read and write themselves, not the bytes the old ones had. (The
    // flooded client goes first: its old worker may still owe it output.)
    drop(slow);
    wait_for("the flooded connection to close", || {
        (sum(&scrape(admin), "wm_worker_connections", &[("group", "t")]) == 1.0).then_some(())
    });
    std::fs::copy(test_build("b"), s.dir.path().join("live.so")).unwrap();
    let out = s.cli(&["reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("handed over"),
        "{said}"
    );
    let new = s.status()["reloads"][0]["groups"][0]["new"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(c.call("after"), "after");
    wait_for("the new build's counters to count one message", || {
        let m = scrape(admin);
        let l = [("group", "t"), ("build", new.as_str())];
        (sum(&m, "wm_worker_messages_total", &l) == 1.0).then_some(m)
    });
    let m = scrape(admin);
    let l = [("group", "t"), ("build", new.as_str())];
    assert_eq!(sum(&m, "wm_worker_received_bytes_total", &l), 6.0);
    assert_eq!(sum(&m, "wm_worker_sent_bytes_total", &l), 6.0);
    let ok = [("group", "t"), ("outcome", "ok")];
    assert_eq!(sum(&m, "wm_group_reloads_total", &ok), 1.0);
    assert!(
        sum(
            &m,
            "wm_group_last_reload_duration_seconds",
            &[("group", "t")]
        ) > 0.0
    );
    wait_for("the old workers to exit", || {
        (s.status()["workers"].as_array()?.len() == 2).then_some(())
    });

    // A worker killed from outside is replaced: a restart by cause `died`.
    let victim = s.worker_pids("t")[0].1;
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    wait_for("the restart to be counted", || {
        let m = scrape(admin);
        let died = sum(
            &m,
            "wm_group_restarts_total",
            &[("group", "t"), ("cause", "died")],
        );
        (died == 1.0 && sum(&m, "wm_group_processes", &[("group", "t")]) == 2.0).then_some(())
    });
    s.stop();
}

/// The keys of a JSON value, recursively, with arrays reduced to the union
/// of their elements' shapes: what a consumer of the JSON relies on.
fn shape(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
        Value::Array(a) => {
            let mut all = serde_json::Map::new();
            for e in a {
                if let Value::Object(m) = shape(e) {
                    all.extend(m);
                }
            }
            Value::Array(vec![Value::Object(all)])
        }
        Value::Null => Value::Null,
        _ => Value::String(
            match v {
                Value::Bool(_) => "bool",
                Value::Number(_) => "number",
                _ => "string",
            }
            .into(),
        ),
    }
}

#[test]
fn status_and_connections_are_the_clis_json() {
    let (s, port, admin) = setup("", "");
    s.start();
    let mut c = TextClient::connect(port);
    assert_eq!(c.call("hi"), "hi");
    // A reload, so that the history is in both.
    std::fs::copy(test_build("b"), s.dir.path().join("live.so")).unwrap();
    assert!(s.cli(&["reload"]).status.success());
    // Until the old workers have exited, two requests may see different workers.
    wait_for("the old workers to exit", || {
        (s.status()["workers"].as_array()?.len() == 2).then_some(())
    });

    let cli = s.status();
    let a = get(admin, "/status", None);
    assert_eq!(a.status, 200, "{}", a.body);
    assert!(
        a.head.contains("Content-Type: application/json"),
        "{}",
        a.head
    );
    let http: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(shape(&http), shape(&cli));
    let pids = |v: &Value| -> BTreeSet<u64> {
        (v["workers"].as_array().unwrap().iter())
            .map(|w| w["pid"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(pids(&http), pids(&cli));
    assert_eq!(http["reloads"], cli["reloads"]);
    let reload = &http["reloads"][0];
    assert_eq!(reload["ok"], true, "{reload}");
    assert_eq!(reload["groups"][0]["rolled"], 2, "{reload}");
    assert_eq!(http["groups"][0]["reloads"]["ok"], 1, "{http}");
    // The text status says it too.
    let text = String::from_utf8_lossy(&s.cli(&["status"]).stdout).into_owned();
    let line = text
        .lines()
        .find(|l| l.starts_with("last reload: "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.contains(" ok in ") && line.contains("2/2"), "{line}");

    let out = s.cli(&["connections", "--json"]);
    let cli: Value = serde_json::from_slice(&out.stdout).unwrap();
    let a = get(admin, "/connections", None);
    assert_eq!(a.status, 200, "{}", a.body);
    let http: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(shape(&http), shape(&cli));
    let ids = |v: &Value| -> BTreeSet<(u64, u64)> {
        (v["connections"].as_array().unwrap().iter())
            .map(|r| (r["pid"].as_u64().unwrap(), r["id"].as_u64().unwrap()))
            .collect()
    };
    assert_eq!(ids(&http).len(), 1, "{http}");
    assert_eq!(ids(&http), ids(&cli));
    s.stop();
}

#[test]
fn a_token_is_required_on_every_path() {
    let (s, _port, admin) = setup("admin_token = \"s3cret-t0ken\"", "");
    let out = s.start();
    // `start` says where it listens (never the token).
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("admin: http://127.0.0.1:{admin}/")),
        "{said}"
    );
    assert!(!said.contains("s3cret"), "{said}");
    for path in ["/", "/metrics", "/status", "/connections", "/nowhere"] {
        for auth in [None, Some("Bearer wrong"), Some("Basic s3cret-t0ken")] {
            let a = get(admin, path, auth);
            assert_eq!(a.status, 401, "{path} with {auth:?}");
            assert!(
                a.head
                    .contains("WWW-Authenticate: Bearer realm=\"wm-host\""),
                "{}",
                a.head
            );
        }
    }
    for path in ["/", "/metrics", "/status", "/connections"] {
        let a = get(admin, path, Some("Bearer s3cret-t0ken"));
        assert_eq!(a.status, 200, "{path}: {}", a.body);
    }
    assert_eq!(
        get(admin, "/nowhere", Some("Bearer s3cret-t0ken")).status,
        404
    );
    // A browser opening the dashboard passes it in the query (RFC 6750).
    assert_eq!(get(admin, "/?access_token=s3cret-t0ken", None).status, 200);
    assert_eq!(get(admin, "/?access_token=nope", None).status, 401);
    s.stop();
}

#[test]
fn slow_and_excess_admin_clients_do_not_stall_the_master() {
    let (s, port, admin) = setup("", "");
    s.start();
    // Clients that send half a request head and then nothing, past the cap.
    let mut idle = Vec::new();
    for _ in 0..40 {
        let mut c = TcpStream::connect(("127.0.0.1", admin)).unwrap();
        c.write_all(b"GET /status HTTP/1.1\r\nHost: x\r\n").unwrap();
        idle.push(c);
    }
    // The master still answers the CLI and serves traffic meanwhile.
    assert!(s.cli(&["status"]).status.success());
    assert_eq!(TextClient::connect(port).call("ping"), "ping");
    // They cannot lock a scraper out: a real request takes the place of
    // the oldest half-sent one, and is answered.
    let m = get(admin, "/metrics", None);
    assert_eq!(m.status, 200, "{}", m.body);
    // The cap is 32: the 8 oldest made room for the later ones and the
    // 9th for the scrape, each closed without an answer.
    let ended = |c: &mut TcpStream| -> Option<Vec<u8>> {
        c.set_nonblocking(true).unwrap();
        let mut buf = Vec::new();
        match c.read_to_end(&mut buf) {
            Ok(_) => Some(buf),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(buf),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
                None
            }
            Err(e) => panic!("{e}"),
        }
    };
    let mut closed = BTreeSet::new();
    wait_for("the 9 oldest closed", || {
        for (i, c) in idle.iter_mut().enumerate() {
            if !closed.contains(&i) {
                if let Some(buf) = ended(c) {
                    assert!(buf.is_empty(), "{i}: {:?}", String::from_utf8_lossy(&buf));
                    closed.insert(i);
                }
            }
        }
        (closed.len() >= 9).then_some(())
    });
    assert_eq!(closed, (0..9).collect(), "the oldest ones go");
    // The others are closed by the master when their time to send a
    // request is up (10 s), without an answer.
    for c in &mut idle[9..] {
        c.set_nonblocking(false).unwrap();
        c.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut buf = Vec::new();
        let ended = c.read_to_end(&mut buf);
        assert!(ended.is_ok() || ended.unwrap_err().kind() == std::io::ErrorKind::ConnectionReset);
        assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
    }
    // An oversized head is refused with 431 and the connection closed.
    let mut big = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    let mut req = b"GET /status HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    req.extend(std::iter::repeat_n(b'a', 16 * 1024));
    req.extend(b"\r\n\r\n");
    let _ = big.write_all(&req);
    big.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut buf = Vec::new();
    let _ = big.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 431"), "{text:?}");
    assert_eq!(get(admin, "/status", None).status, 200);
    s.stop();
}

#[test]
fn dashboard_shows_the_workers_and_the_build_changes_after_a_reload() {
    let (s, port, admin) = setup("", "");
    s.start();
    let builds = |s: &Server| -> BTreeSet<String> {
        (s.status()["workers"].as_array().unwrap().iter())
            .map(|w| w["build"].as_str().unwrap().to_string())
            .collect()
    };
    let old = builds(&s);
    assert_eq!(old.len(), 1);
    let old = old.into_iter().next().unwrap();

    // Traffic before the page is opened: the master's samples keep it
    // (once it has a first sample to count from).
    let history = || -> Option<Vec<Value>> {
        let h: Value = serde_json::from_str(&get(admin, "/history", None).body).ok()?;
        h["groups"]["t"].as_array().cloned()
    };
    wait_for("the first points of /history", || {
        history().filter(|p| !p.is_empty())
    });
    let mut c = TextClient::connect(port);
    for i in 0..20 {
        assert_eq!(c.call(&format!("m{i}")), format!("m{i}"));
    }
    wait_for("/history to show the traffic", || {
        history()?
            .iter()
            .any(|p| p["msgs"].as_f64() > Some(0.0) && p["conns"] == 1)
            .then_some(())
    });

    let driver = Driver::start();
    let page = driver.new_session();
    page.goto(&format!("http://127.0.0.1:{admin}/"));
    let card = ".group[data-group=\"t\"]";
    // The chart starts with that history, not empty.
    wait_for("the chart to show the earlier messages", || {
        let peaks = page.try_text(&format!("{card} .scale"))?;
        let lines = page.execute(&format!(
            "return document.querySelectorAll('{card} polyline.line-msgs').length;"
        ));
        (lines == 1 && !peaks.starts_with("peaks: 0.0/s")).then_some(())
    });
    let pids: BTreeSet<String> = s
        .worker_pids("t")
        .iter()
        .map(|(_, p)| p.to_string())
        .collect();
    wait_for("the dashboard to list both workers", || {
        let shown: BTreeSet<String> = page
            .texts(&format!("{card} .worker td:nth-child(2)"))
            .into_iter()
            .map(|t| t.trim().to_string())
            .collect();
        (shown == pids).then_some(())
    });
    assert_eq!(page.text(&format!("{card} .facts .build")).trim(), old);
    assert_eq!(page.text("#live").trim(), "live");

    // Connections show on the card.
    wait_for("the card to count the connection", || {
        (page.try_text(&format!("{card} .connections"))?.trim() == "1").then_some(())
    });

    std::fs::copy(test_build("b"), s.dir.path().join("live.so")).unwrap();
    let out = s.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // Retiring workers may still be listed with the old build: the new one
    // is the reload's.
    let new = s.status()["reloads"][0]["groups"][0]["new"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new, old);
    assert!(builds(&s).contains(&new));
    // The page updates itself: no navigation, the same document.
    page.execute("window.__samePage = true; return true;");
    wait_for("the build label to change to the new build", || {
        (page.try_text(&format!("{card} .facts .build"))?.trim() == new).then_some(())
    });
    wait_for("the reload to show in the history", || {
        let rows = page.texts("#reloads .reload");
        rows.iter()
            .any(|r| r.contains("ok") && r.contains(&format!("{old} → {new}")))
            .then_some(())
    });
    assert_eq!(
        page.execute("return window.__samePage === true;"),
        Value::Bool(true)
    );
    page.screenshot(&target_dir().parent().unwrap().join("admin-dashboard.png"));
    drop(page);
    drop(driver);
    s.stop();
}
