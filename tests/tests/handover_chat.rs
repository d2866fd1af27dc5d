//! The chat demo at scale across reloads: 1,000 websocket clients in one
//! room over 4 workers, messages flowing the whole time, 10 reloads. Nobody
//! is disconnected, every message arrives exactly once and in order per
//! sender, and history and presence are what they were.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wm_e2e::*;

const CLIENTS: usize = 1000;
const SENDERS: usize = 2;
const RELOADS: usize = 10;
/// Each sender says something this often.
const EVERY: Duration = Duration::from_millis(100);

/// One client: its socket and what it has seen.
struct Client {
    sock: TcpStream,
    buf: Vec<u8>,
    /// Sequence numbers received, per sender.
    got: HashMap<usize, Vec<u64>>,
    /// The last online list, and how many presence messages came.
    online: usize,
    presences: u64,
    history: Option<Vec<Value>>,
    /// Why it ended, if it did.
    ended: Option<String>,
}

impl Client {
    fn new(port: u16) -> Client {
        let sock = ws_raw(port, "/");
        sock.set_nonblocking(true).unwrap();
        Client {
            sock,
            buf: Vec::new(),
            got: HashMap::new(),
            online: 0,
            presences: 0,
            history: None,
            ended: None,
        }
    }

    fn send(&mut self, text: &str) {
        let frame = ws_frame(true, 1, text.as_bytes(), true);
        // Small frames to a socket we drain: a short write would be a bug here.
        self.sock.set_nonblocking(false).unwrap();
        if let Err(e) = self.sock.write_all(&frame) {
            self.ended.get_or_insert(format!("write: {e}"));
        }
        self.sock.set_nonblocking(true).unwrap();
    }

    /// Reads what is there and handles every whole frame.
    fn pump(&mut self) {
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match self.sock.read(&mut chunk) {
                Ok(0) => {
                    self.ended.get_or_insert("closed by the server".into());
                    break;
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    self.ended.get_or_insert(format!("read: {e}"));
                    break;
                }
            }
        }
        while let Some((op, payload, used)) = parse(&self.buf) {
            self.buf.drain(..used);
            if op != 1 {
                self.ended
                    .get_or_insert(format!("frame with opcode {op}: {payload:?}"));
                continue;
            }
            self.handle(&payload);
        }
    }

    fn handle(&mut self, payload: &[u8]) {
        let text = std::str::from_utf8(payload).unwrap();
        if text.starts_with("{\"type\":\"message\"") {
            // `"text":"s<sender>-<seq>"`, cheaply.
            let t = text.split("\"text\":\"").nth(1).unwrap();
            let t = &t[..t.find('"').unwrap()];
            let (s, n) = t[1..].split_once('-').unwrap();
            let (s, n) = (s.parse().unwrap(), n.parse().unwrap());
            self.got.entry(s).or_default().push(n);
            return;
        }
        let v: Value = serde_json::from_str(text).unwrap();
        match v["type"].as_str() {
            Some("presence") => {
                self.presences += 1;
                self.online = v["online"].as_array().unwrap().len();
            }
            Some("history") => self.history = Some(v["messages"].as_array().unwrap().clone()),
            _ => panic!("unexpected: {text}"),
        }
    }
}

/// A whole unmasked server frame at the start of `b`: opcode, payload, size.
fn parse(b: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if b.len() < 2 {
        return None;
    }
    let (mut at, mut len) = (2, (b[1] & 0x7f) as usize);
    if len == 126 {
        len = u16::from_be_bytes(b.get(2..4)?.try_into().unwrap()) as usize;
        at = 4;
    } else if len == 127 {
        len = u64::from_be_bytes(b.get(2..10)?.try_into().unwrap()) as usize;
        at = 10;
    }
    let payload = b.get(at..at + len)?.to_vec();
    Some((b[0] & 0x0f, payload, at + len))
}

/// Waits for any client socket to be readable (or `within` to pass), then
/// pumps every client.
fn pump_all(clients: &mut [Client], within: Duration) {
    let mut fds: Vec<libc::pollfd> = clients
        .iter()
        .map(|c| libc::pollfd {
            fd: c.sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid array of pollfds.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as _, within.as_millis() as i32) };
    for (c, p) in clients.iter_mut().zip(&fds) {
        if p.revents != 0 {
            c.pump();
        }
    }
}

fn pump_until(clients: &mut [Client], what: &str, mut done: impl FnMut(&[Client]) -> bool) {
    let end = Instant::now() + Duration::from_secs(60);
    while !done(clients) {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        pump_all(clients, Duration::from_millis(20));
    }
}

#[test]
fn a_thousand_chatters_over_ten_reloads_notice_nothing() {
    let port = free_port();
    let s = Server::new(&worker_table(
        "chat",
        &format!("websocket://127.0.0.1:{port}"),
        "chat_plugin",
        4,
        // On a slow shared machine a debug build delivering to 1,000
        // clients can be busy for seconds: this test is about reloads, not
        // idleness or stuck workers.
        "watch = false\nstuck_timeout = \"120s\"\n[worker.options]\nidle_timeout_ms = \"0\"",
    ));
    s.start();
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client::new(port)).collect();
    let pids = s.worker_pids("chat");
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&format!(
            "{{\"type\":\"join\",\"room\":\"big\",\"name\":\"u{i}\"}}"
        ));
    }
    pump_until(&mut clients, "everyone online", |cs| {
        cs.iter()
            .all(|c| c.online == CLIENTS && c.history.is_some())
    });
    // Spread over every worker.
    let per_worker: Vec<u64> = s.status()["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["stats"]["connections"].as_u64().unwrap_or(0))
        .collect();
    assert!(per_worker.iter().all(|&n| n > 0), "{per_worker:?}");
    for c in clients.iter_mut() {
        c.presences = 0;
    }

    let done = Arc::new(AtomicBool::new(false));
    let reloader = {
        let (done, config) = (done.clone(), s.config.clone());
        let host = host_bin();
        std::thread::spawn(move || {
            let mut outs = Vec::new();
            for _ in 0..RELOADS {
                let out = std::process::Command::new(&host)
                    .args(["reload", "-c"])
                    .arg(&config)
                    .output()
                    .unwrap();
                outs.push((
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).to_string(),
                ));
            }
            done.store(true, Ordering::Relaxed);
            outs
        })
    };
    let mut sent = [0u64; SENDERS];
    let mut next = Instant::now();
    while !done.load(Ordering::Relaxed) {
        if Instant::now() >= next {
            next += EVERY;
            for (k, n) in sent.iter_mut().enumerate() {
                *n += 1;
                let text = format!("s{k}-{n}");
                clients[k * 7].send(&format!("{{\"type\":\"say\",\"text\":\"{text}\"}}"));
            }
        }
        pump_all(&mut clients, Duration::from_millis(5));
    }
    for (ok, out) in reloader.join().unwrap() {
        let log = s.log();
        if !(ok && out.contains(&format!("{CLIENTS} handed over"))) {
            let _ = std::fs::write(target_dir().join("handover_chat.log"), &log);
        }
        let tail: Vec<&str> = log.lines().filter(|l| !l.contains("DEBUG")).collect();
        assert!(
            ok && out.contains(&format!("{CLIENTS} handed over")),
            "{out}\nlog:\n{}",
            tail[tail.len().saturating_sub(60)..].join("\n")
        );
    }
    pump_until(&mut clients, "every message everywhere", |cs| {
        cs.iter().all(|c| {
            c.ended.is_some()
                || (0..SENDERS).all(|k| c.got.get(&k).map_or(0, Vec::len) as u64 >= sent[k])
        })
    });
    let ended: Vec<_> = (clients.iter().enumerate())
        .filter_map(|(i, c)| c.ended.as_ref().map(|e| (i, e)))
        .collect();
    assert!(
        ended.is_empty(),
        "{} disconnected, e.g. {:?}",
        ended.len(),
        &ended[..ended.len().min(3)]
    );
    for (i, c) in clients.iter().enumerate() {
        for (k, &n) in sent.iter().enumerate() {
            let want: Vec<u64> = (1..=n).collect();
            assert_eq!(
                c.got[&k], want,
                "client {i}, sender {k}: exactly once, in order"
            );
        }
        assert_eq!(c.presences, 0, "client {i}: nobody left or joined");
    }
    // Every worker was replaced, and the room is whole: a newcomer sees
    // everyone and the latest history.
    let now = s.worker_pids("chat");
    assert!(pids.iter().all(|p| !now.contains(p)), "{pids:?} {now:?}");
    let mut late = Client::new(port);
    late.send("{\"type\":\"join\",\"room\":\"big\",\"name\":\"late\"}");
    let mut one = [late];
    pump_until(&mut one, "the newcomer's presence", |cs| {
        cs[0].online == CLIENTS + 1 && cs[0].history.is_some()
    });
    let history = one[0].history.as_ref().unwrap();
    assert_eq!(history.len(), 50.min(SENDERS * sent[0] as usize));
    for (k, &n) in sent.iter().enumerate() {
        let seqs: Vec<u64> = history
            .iter()
            .filter_map(|m| {
                m["text"]
                    .as_str()?
                    .strip_prefix(&format!("s{k}-"))?
                    .parse()
                    .ok()
            })
            .collect();
        // Each sender's part of the history is its latest messages, in order.
        let tail: Vec<u64> = (n + 1 - seqs.len() as u64..=n).collect();
        assert_eq!(seqs, tail, "sender {k}");
    }
    s.stop();
}
