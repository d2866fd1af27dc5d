//! The bus across hosts (`[bus] backend = "redis://…"`, issue 14): two
//! wm-host instances on different ports sharing a private redis-server.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use wm_e2e::redis::{Options, Redis, TlsFiles};
use wm_e2e::*;

mod common;
use common::certs::Ca;

/// Short, so the tests are quick: a dead host's members vanish within
/// `HOST_TTL + HEARTBEAT`.
const HEARTBEAT: Duration = Duration::from_millis(200);
const HOST_TTL: Duration = Duration::from_secs(1);

fn bus(url: &str) -> String {
    format!(
        "[bus]\nbackend = \"{url}\"\nheartbeat = \"{}ms\"\nhost_ttl = \"{}ms\"\n",
        HEARTBEAT.as_millis(),
        HOST_TTL.as_millis()
    )
}

/// A host with two test-plugin workers on a text:// port, started.
fn host(redis: &Redis) -> (Server, u16) {
    host_with(&bus(&redis.url()), 2)
}

/// A host with `count` test-plugin workers and this `[bus]`, started.
fn host_with(bus_toml: &str, count: u32) -> (Server, u16) {
    let port = free_port();
    let s = Server::with_host(
        bus_toml,
        &worker_table(
            "t",
            &format!("text://127.0.0.1:{port}"),
            "test_plugin",
            count,
            "",
        ),
    );
    s.start();
    (s, port)
}

fn wait_answer(c: &mut TextClient, cmd: &str, want: &str) {
    wait_for(&format!("`{cmd}` to answer {want}"), || {
        (c.call(cmd) == want).then_some(())
    });
}

fn bus_status(s: &Server) -> Value {
    s.status()["bus"].clone()
}

/// Reads `n` lines and checks that each sender's numbers come in order.
fn assert_in_order(c: &mut TextClient, n: usize, senders: &[&str], per_sender: u32) {
    let mut next: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..n {
        let line = c.recv().expect("closed");
        let (who, i) = line.split_once('-').unwrap_or_else(|| panic!("{line}"));
        let i: u32 = i.parse().unwrap();
        let want = next.entry(who.to_string()).or_default();
        assert_eq!(i, *want, "from {who}: got {i}, expected {want}");
        *want += 1;
    }
    for s in senders {
        assert_eq!(next.get(*s), Some(&per_sender), "{next:?}");
    }
}

#[test]
fn groups_uids_publish_and_order_span_two_hosts() {
    let redis = Redis::start();
    let (a, pa) = host(&redis);
    let (b, pb) = host(&redis);
    wait_for("both hosts to see each other", || {
        (bus_status(&a)["peers"] == 1 && bus_status(&b)["peers"] == 1).then_some(())
    });
    let st = bus_status(&a);
    assert_eq!(st["state"], "connected", "{st}");
    assert!(st["backend"].as_str().unwrap().starts_with("redis://"));

    let mut members: Vec<TextClient> = [pa, pa, pb, pb]
        .into_iter()
        .map(TextClient::connect)
        .collect();
    for (i, c) in members.iter_mut().enumerate() {
        assert_eq!(c.call("join room"), "ok");
        assert_eq!(c.call(&format!("uid u{i}")), "ok");
    }
    // Counts and member lists cover both hosts, from either side.
    for c in &mut members {
        wait_answer(c, "count room", "4");
        wait_answer(c, "uids room", "u0,u1,u2,u3");
    }

    // One sender on each host, 300 messages each, at the same time: every
    // member, on either host, gets each sender's messages in order.
    const N: u32 = 300;
    let mut sa = TextClient::connect(pa);
    let mut sb = TextClient::connect(pb);
    for i in 0..N {
        sa.send(&format!("gsend room a-{i}"));
        sb.send(&format!("gsend room b-{i}"));
    }
    for c in &mut members {
        assert_in_order(c, 2 * N as usize, &["a", "b"], N);
    }

    // send_to_uid reaches a user on the other host, and back.
    sa.send("touid u3 to-three");
    assert_eq!(members[3].recv().as_deref(), Some("to-three"));
    sb.send("touid u0 to-zero");
    assert_eq!(members[0].recv().as_deref(), Some("to-zero"));

    // publish reaches the workers of the other host.
    let mut sub = TextClient::connect(pb);
    assert_eq!(sub.call("sub"), "ok");
    sa.send("publish news hello");
    assert_eq!(sub.recv().as_deref(), Some("published news hello"));

    // Leaving and disconnecting are seen on the other host.
    assert_eq!(members[0].call("leave room"), "ok");
    members.remove(1).shutdown();
    wait_answer(&mut members[1], "count room", "2");
    wait_answer(&mut members[1], "uids room", "u2,u3");

    let st = bus_status(&a);
    assert!(st["sent"].as_u64().unwrap() >= N as u64, "{st}");
    assert!(st["received"].as_u64().unwrap() >= N as u64, "{st}");
    assert_eq!(st["dropped"], 0, "{st}");
    let text = String::from_utf8(a.cli(&["status"]).stdout).unwrap();
    assert!(text.contains("state: connected"), "{text}");
    assert_eq!(members[0].call("join room"), "ok");
    wait_answer(&mut members[1], "count room", "3");
    a.stop();
    // A host that stops says so: its members leave at once.
    wait_answer(&mut members[1], "count room", "2");
    b.stop();
}

#[test]
fn a_redis_outage_keeps_local_traffic_and_cross_host_traffic_resumes() {
    let mut redis = Redis::start();
    let (a, pa) = host(&redis);
    let (b, pb) = host(&redis);
    let mut a1 = TextClient::connect(pa);
    let mut a2 = TextClient::connect(pa);
    let mut b1 = TextClient::connect(pb);
    for c in [&mut a1, &mut a2, &mut b1] {
        assert_eq!(c.call("join room"), "ok");
    }
    wait_answer(&mut a1, "count room", "3");
    wait_answer(&mut b1, "count room", "3");

    redis.kill();
    wait_for("host A to notice", || {
        (bus_status(&a)["state"] == "reconnecting").then_some(())
    });
    // Local traffic goes on, on both hosts.
    for i in 0..20 {
        a1.send(&format!("gsend room during-{i}"));
    }
    for i in 0..20 {
        assert_eq!(a1.recv(), Some(format!("during-{i}")));
        assert_eq!(a2.recv(), Some(format!("during-{i}")));
    }
    assert_eq!(b1.call("echo-b"), "echo-b");
    // Cross-host sends are dropped and counted, not queued without bound.
    let st = bus_status(&a);
    assert!(st["dropped"].as_u64().unwrap() >= 20, "{st}");
    assert!(st["disconnects"].as_u64().unwrap() >= 1, "{st}");
    // Past host_ttl without news, the other host's members are gone here.
    wait_answer(&mut a1, "count room", "2");

    redis.restart();
    wait_for("both hosts to reconnect", || {
        (bus_status(&a)["state"] == "connected" && bus_status(&b)["state"] == "connected")
            .then_some(())
    });
    // Memberships were published again: counts are whole.
    wait_answer(&mut a1, "count room", "3");
    wait_answer(&mut b1, "count room", "3");
    // And cross-host messages flow both ways again.
    b1.send("gsend room after-b");
    assert_eq!(b1.recv().as_deref(), Some("after-b"));
    assert_eq!(a1.recv().as_deref(), Some("after-b"));
    assert_eq!(a2.recv().as_deref(), Some("after-b"));
    a1.send("gsend room after-a");
    assert_eq!(b1.recv().as_deref(), Some("after-a"));
    // Nothing crashed: same masters, every worker still there.
    for s in [&a, &b] {
        assert!(pid_alive(s.master_pid().unwrap()));
        assert_eq!(s.worker_pids("t").len(), 2);
        assert!(s.status()["exits"].as_array().unwrap().is_empty());
    }
}

#[test]
fn the_members_of_a_host_killed_with_sigkill_vanish_within_the_bound() {
    let redis = Redis::start();
    let (a, pa) = host(&redis);
    let (b, pb) = host(&redis);
    let mut a1 = TextClient::connect(pa);
    let mut bs: Vec<TextClient> = (0..3).map(|_| TextClient::connect(pb)).collect();
    assert_eq!(a1.call("join room"), "ok");
    for c in &mut bs {
        assert_eq!(c.call("join room"), "ok");
    }
    wait_answer(&mut a1, "count room", "4");
    let workers = b.worker_pids("t");
    let master = b.master_pid().unwrap();
    // SAFETY: plain kill(2) of processes this test started.
    unsafe { libc::kill(master as i32, libc::SIGKILL) };
    for (_, pid) in &workers {
        unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
    }
    let killed = Instant::now();
    wait_answer(&mut a1, "count room", "1");
    let took = killed.elapsed();
    // The bound the README states: host_ttl + heartbeat (+ scheduling slack).
    assert!(
        took <= HOST_TTL + HEARTBEAT + Duration::from_millis(700),
        "took {took:?}"
    );
    assert_eq!(bus_status(&a)["peers"], 0);
    drop(b);
    // A host started later does not see the dead one's members either.
    let (_c, pc) = host(&redis);
    let mut c1 = TextClient::connect(pc);
    wait_answer(&mut c1, "count room", "1");
}

/// A chat client (plugins/chat-plugin, JSON over websocket).
struct Chat(std::net::TcpStream);

impl Chat {
    fn connect(port: u16) -> Chat {
        Chat(ws_raw(port, "/"))
    }

    fn send(&mut self, json: &str) {
        use std::io::Write;
        self.0
            .write_all(&ws_frame(true, 1, json.as_bytes(), true))
            .unwrap();
    }

    /// Reads messages until one satisfies `pred`.
    fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + DEADLINE;
        loop {
            assert!(Instant::now() < end, "timed out waiting for {what}");
            let (_, op, payload) = ws_read_frame(&mut self.0).expect(what);
            if op != 1 {
                continue;
            }
            let v: Value = serde_json::from_slice(&payload).unwrap();
            if pred(&v) {
                return v;
            }
        }
    }
}

#[test]
fn chat_rooms_span_two_hosts() {
    let redis = Redis::start();
    let hosts: Vec<(Server, u16)> = (0..2)
        .map(|_| {
            let port = free_port();
            let s = Server::with_host(
                &bus(&redis.url()),
                &worker_table(
                    "chat",
                    &format!("websocket://127.0.0.1:{port}"),
                    "chat_plugin",
                    2,
                    "",
                ),
            );
            s.start();
            (s, port)
        })
        .collect();
    let mut ann = Chat::connect(hosts[0].1);
    let mut bob = Chat::connect(hosts[1].1);
    ann.send(r#"{"type":"join","room":"lobby","name":"ann"}"#);
    ann.until("ann's presence", |v| v["type"] == "presence");
    bob.send(r#"{"type":"join","room":"lobby","name":"bob"}"#);
    // Presence lists the members of both hosts, on both hosts.
    let both =
        |v: &Value| v["type"] == "presence" && v["online"] == serde_json::json!(["ann", "bob"]);
    bob.until("bob to see ann and bob", both);
    ann.until("ann to see ann and bob", both);
    // Messages cross, in order per sender.
    for i in 0..50 {
        ann.send(&format!(r#"{{"type":"say","text":"a{i}"}}"#));
    }
    for i in 0..50 {
        let m = bob.until("ann's message", |v| v["type"] == "message");
        assert_eq!(m["from"], "ann");
        assert_eq!(m["text"], format!("a{i}"));
    }
    bob.send(r#"{"type":"say","text":"hi ann"}"#);
    ann.until("bob's message", |v| {
        v["type"] == "message" && v["from"] == "bob" && v["text"] == "hi ann"
    });
    // Bob leaves: ann's list shrinks.
    bob.send(r#"{"type":"leave"}"#);
    ann.until("ann alone", |v| {
        v["type"] == "presence" && v["online"] == serde_json::json!(["ann"])
    });
}

/// One member on each host; a message from host A's member reaches host B's.
fn assert_crosses(pa: u16, pb: u16) {
    let mut a1 = TextClient::connect(pa);
    let mut b1 = TextClient::connect(pb);
    assert_eq!(a1.call("join room"), "ok");
    assert_eq!(b1.call("join room"), "ok");
    // Each side counts the other's member: both subscribers are up.
    wait_answer(&mut a1, "count room", "2");
    wait_answer(&mut b1, "count room", "2");
    a1.send("gsend room across");
    assert_eq!(a1.recv().as_deref(), Some("across"));
    assert_eq!(b1.recv().as_deref(), Some("across"));
}

#[test]
fn a_password_protected_redis_carries_the_bus_and_bad_credentials_are_reported() {
    let redis = Redis::start_with(Options {
        password: Some("s3cret".into()),
        ..Options::default()
    });
    let with_pw = |pw: &str| bus(&redis.url().replace("redis://", &format!("redis://:{pw}@")));
    let (a, pa) = host_with(&with_pw("s3cret"), 1);
    let (_b, pb) = host_with(&with_pw("s3cret"), 1);
    assert_crosses(pa, pb);
    let st = bus_status(&a);
    assert_eq!(st["state"], "connected", "{st}");
    assert!(!st["backend"].as_str().unwrap().contains("s3cret"), "{st}");

    // A wrong password, and none at all: the host runs (local traffic
    // flows), and status says why the bus is not connected.
    for (toml, why) in [
        (with_pw("wrong"), "password"),
        (bus(&redis.url()), "noauth"),
    ] {
        let (c, pc) = host_with(&toml, 1);
        let st = wait_for("status to show the refusal", || {
            let st = bus_status(&c);
            (st["state"] == "auth failed").then_some(st)
        });
        let error = st["error"].as_str().unwrap().to_lowercase();
        assert!(error.contains(why), "{st}");
        let text = String::from_utf8(c.cli(&["status"]).stdout).unwrap();
        assert!(text.contains("state: auth failed ("), "{text}");
        let mut c1 = TextClient::connect(pc);
        assert_eq!(c1.call("join room"), "ok");
        c1.send("gsend room local");
        assert_eq!(c1.recv().as_deref(), Some("local"));
        assert!(pid_alive(c.master_pid().unwrap()));
        assert!(c.status()["exits"].as_array().unwrap().is_empty());
    }
}

#[test]
fn rediss_with_a_private_ca_and_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("wm test redis CA");
    let ca_pem = ca.write(dir.path());
    let (cert, key) = ca.server("redis").write(dir.path(), "redis");
    let (client_cert, client_key) = ca.client("wm-host").write(dir.path(), "wm");
    // Redis's default: client certificates required.
    let redis = Redis::start_with(Options {
        tls: Some(TlsFiles {
            cert,
            key,
            ca: ca_pem.clone(),
            auth_clients: true,
        }),
        ..Options::default()
    });
    assert!(redis.url().starts_with("rediss://"));
    let tls = format!(
        "{}ca = {:?}\ncert = {:?}\nkey = {:?}\n",
        bus(&redis.url()),
        ca_pem,
        client_cert,
        client_key
    );
    let (a, pa) = host_with(&tls, 1);
    let (_b, pb) = host_with(&tls, 1);
    assert_crosses(pa, pb);
    let st = bus_status(&a);
    assert_eq!(st["state"], "connected", "{st}");
    assert!(
        st["backend"].as_str().unwrap().starts_with("rediss://"),
        "{st}"
    );

    // Without `ca` the system's CA store does not know this CA: the host
    // runs and status names the certificate problem.
    let (c, _) = host_with(&bus(&redis.url()), 1);
    let st = wait_for("status to show the untrusted certificate", || {
        let st = bus_status(&c);
        (st["state"] == "reconnecting" && st["error"] != "").then_some(st)
    });
    assert!(
        st["error"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("certificate"),
        "{st}"
    );

    // An unreadable `ca` file stops the start with its key and path.
    let bad = Server::with_host(
        &format!("{}ca = \"missing-ca.pem\"\n", bus(&redis.url())),
        &worker_table(
            "t",
            &format!("text://127.0.0.1:{}", free_port()),
            "test_plugin",
            1,
            "",
        ),
    );
    let out = bad.cli(&["start", "-d"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("[bus] ca") && err.contains("missing-ca.pem"),
        "{err}"
    );
}
