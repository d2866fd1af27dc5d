//! The admin listener (`[host] admin`): HTTP/1.1 served by the master's own
//! mio loop, so it needs no thread and never loads plugin code. `/metrics`,
//! `/status` and `/connections` are gathered from the workers like the
//! CLI's reports (`control.rs`); `/` is the dashboard, a static page that
//! polls `/status`, and `/history` what it charts for the last minutes,
//! sampled every `SAMPLE_EVERY` while the listener is on.
//!
//! A slow or hostile client must not stall the master: sockets are
//! non-blocking, a request head is at most `MAX_HEAD` bytes and bodies are
//! refused, and every connection has `TIMEOUT` to send its request and take
//! its answer. Past `MAX_CONNS`, a new connection takes the place of the
//! oldest one that owes nothing (still sending its head, or idle between
//! requests), so half-sent connections cannot lock a scraper out; only when
//! every one is being answered is the new one refused (503).
//! One request is answered at a time per connection; pipelined ones wait
//! in its (bounded) input.
//!
//! Requests never pile up work on the workers: one gather per kind (status
//! or connections) is in flight at a time, and a request that comes while
//! one is takes its report too.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use wm_proto::http::{self, Event, HttpDecoder, Limits, Response, Scratch};

use super::control::Gathered;
use crate::config::AdminConfig;
use crate::ipc::StatusReport;

/// Connections at once; past it the oldest that owes nothing is closed.
pub const MAX_CONNS: usize = 32;
/// To send a request (from accept, or from the previous answer) and to take
/// an answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// A request head; admin requests have no body.
const MAX_HEAD: usize = 8 * 1024;

const DASHBOARD: &str = include_str!("admin/dashboard.html");

/// How often the history is sampled, and how far back it goes.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
pub const HISTORY_SPAN: Duration = Duration::from_secs(300);

/// One point of a group's history.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Point {
    /// Unix milliseconds.
    pub t: u64,
    /// Messages per second since the previous sample, over the group's
    /// workers that were in both.
    pub msgs: f64,
    pub conns: u64,
}

/// Per group, the last `HISTORY_SPAN` of samples: what the dashboard shows
/// of the time before it was opened. Bounded: one point per group per
/// `SAMPLE_EVERY`, and groups come from the config.
#[derive(Debug, Default, serde::Serialize)]
pub struct History {
    groups: BTreeMap<String, VecDeque<Point>>,
    /// Per worker pid, when its message total was last read and the total
    /// (kept across samples it missed, busy in a callback).
    #[serde(skip)]
    totals: HashMap<u32, (Instant, u64)>,
    #[serde(skip)]
    sampled: bool,
}

impl History {
    pub fn record(&mut self, r: &StatusReport, now: Instant, wall: SystemTime) {
        let t = wall
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let mut totals = HashMap::new();
        let mut per: BTreeMap<&str, (f64, u64)> = BTreeMap::new();
        for g in &r.groups {
            per.insert(&g.name, (0.0, 0));
        }
        for w in &r.workers {
            let before = self.totals.get(&w.pid).copied();
            let Some(s) = &w.stats else {
                totals.extend(before.map(|b| (w.pid, b)));
                continue;
            };
            totals.insert(w.pid, (now, s.total_messages));
            let Some(p) = per.get_mut(w.group.as_str()) else {
                continue;
            };
            p.1 += s.connections;
            if let Some((at, b)) = before {
                let secs = now.duration_since(at).as_secs_f64().max(0.001);
                p.0 += s.total_messages.saturating_sub(b) as f64 / secs;
            }
        }
        // The first sample only sets the totals: there is no rate yet.
        if std::mem::replace(&mut self.sampled, true) {
            let keep = (HISTORY_SPAN.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
            for (name, (msgs, conns)) in per {
                let s = self.groups.entry(name.to_string()).or_default();
                s.push_back(Point { t, msgs, conns });
                while s.len() > keep {
                    s.pop_front();
                }
            }
        }
        self.totals = totals;
    }
}

/// What a request needs from the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Status,
    Metrics,
    Connections,
}

/// A report gathered from the workers for the admin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Gather {
    /// For `/status` and `/metrics`.
    Status,
    Connections,
}

impl Want {
    fn gather(self) -> Gather {
        match self {
            Want::Status | Want::Metrics => Gather::Status,
            Want::Connections => Gather::Connections,
        }
    }
}

struct Conn {
    stream: TcpStream,
    inbuf: Vec<u8>,
    decoder: HttpDecoder,
    out: Vec<u8>,
    /// Closes at this time unless a request or the answer's end moves it.
    deadline: Instant,
    /// A report is being gathered for it: (what, keep-alive, HEAD).
    owed: Option<(Want, bool, bool)>,
    /// Close once `out` is written.
    close: bool,
}

pub struct Admin {
    listener: TcpListener,
    addr: SocketAddr,
    token: Option<String>,
    conns: BTreeMap<u64, Conn>,
    /// Connection ids are never reused: a report owed to a connection that
    /// went away cannot reach a later one. Ids grow with time: the smallest
    /// is the oldest.
    next: u64,
    /// Per kind, the gather in flight and the connections it answers.
    waiting: HashMap<Gather, Vec<u64>>,
    pub history: History,
    /// When the history is next sampled.
    sample_at: Instant,
}

impl Admin {
    pub fn bind(cfg: &AdminConfig) -> io::Result<Admin> {
        let listener = TcpListener::bind(cfg.addr)?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() && cfg.token.is_none() {
            tracing::warn!(
                "admin listener on {addr} without admin_token: anyone who reaches it sees status and connections"
            );
        }
        Ok(Admin {
            listener,
            addr,
            token: cfg.token.clone(),
            conns: BTreeMap::new(),
            next: 0,
            waiting: HashMap::new(),
            history: History::default(),
            sample_at: Instant::now(),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn listener(&mut self) -> &mut TcpListener {
        &mut self.listener
    }

    /// Accepts every waiting connection, registering each under `token(id)`.
    pub fn accept(&mut self, registry: &Registry, token: impl Fn(u64) -> Token, now: Instant) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    if self.conns.len() >= MAX_CONNS {
                        // The oldest that owes nothing makes room; its
                        // request, if it ever comes, is not lost work.
                        let idle = (self.conns.iter())
                            .find(|(_, c)| c.owed.is_none() && c.out.is_empty())
                            .map(|(&id, _)| id);
                        if let Some(old) = idle {
                            self.close(old, registry);
                        }
                    }
                    if self.conns.len() >= MAX_CONNS {
                        // All are being answered. One try, never waited
                        // for: the socket is dropped either way. What the
                        // client sent is read first, or the close would
                        // reset the connection and lose the 503.
                        let _ = stream.read(&mut [0u8; 4096]);
                        let mut out = Vec::new();
                        http::encode_response(&http::error_response(503), false, false, &mut out);
                        let _ = stream.write(&out);
                        continue;
                    }
                    let id = self.next;
                    self.next += 1;
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if registry.register(&mut stream, token(id), interest).is_ok() {
                        let conn = Conn {
                            stream,
                            inbuf: Vec::new(),
                            decoder: HttpDecoder::new(),
                            out: Vec::new(),
                            deadline: now + TIMEOUT,
                            owed: None,
                            close: false,
                        };
                        self.conns.insert(id, conn);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::warn!("admin accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// The socket is readable or writable: answers what it can. Returns
    /// a report to start gathering, if its request needs one and none of
    /// that kind is in flight (else it waits for that one).
    pub fn on_event(&mut self, id: u64, registry: &Registry, now: Instant) -> Option<Gather> {
        let c = self.conns.get_mut(&id)?;
        let (want, alive) = drive(c, self.token.as_deref(), &self.history, now);
        if !alive {
            self.close(id, registry);
        }
        self.wait_for(id, want?)
    }

    /// `id` waits for a report of `want`'s kind; returns it if it is to be
    /// started.
    fn wait_for(&mut self, id: u64, want: Want) -> Option<Gather> {
        let kind = want.gather();
        let fresh = !self.waiting.contains_key(&kind);
        self.waiting.entry(kind).or_default().push(id);
        fresh.then_some(kind)
    }

    /// A report gathered for the admin listener: answers every request
    /// waiting for its kind. Returns the reports to start next, for
    /// requests that were pipelined behind those.
    pub fn answer(&mut self, report: &Gathered, registry: &Registry, now: Instant) -> Vec<Gather> {
        let kind = match report {
            Gathered::Status(_) => Gather::Status,
            Gathered::Connections(_) => Gather::Connections,
            Gathered::Reopen(_) => return Vec::new(),
        };
        let ids = self.waiting.remove(&kind).unwrap_or_default();
        let mut start = Vec::new();
        for id in ids {
            let more = self.answer_one(id, report, registry, now);
            start.extend(more.and_then(|want| self.wait_for(id, want)));
        }
        start
    }

    /// Answers `id`'s request; returns what its next request needs.
    fn answer_one(
        &mut self,
        id: u64,
        report: &Gathered,
        registry: &Registry,
        now: Instant,
    ) -> Option<Want> {
        let c = self.conns.get_mut(&id)?;
        let (want, keep_alive, head_only) = c.owed.take()?;
        let resp = match (want, report) {
            (Want::Metrics, Gathered::Status(r)) => typed(
                200,
                crate::metrics::CONTENT_TYPE,
                crate::metrics::render(r).into_bytes(),
            ),
            (Want::Status, Gathered::Status(r)) => json(r),
            (Want::Connections, Gathered::Connections(r)) => json(r),
            _ => http::error_response(500),
        };
        http::encode_response(&resp, keep_alive, head_only, &mut c.out);
        c.close = !keep_alive;
        c.deadline = now + TIMEOUT;
        // Its next request may be waiting already.
        let (more, alive) = drive(c, self.token.as_deref(), &self.history, now);
        if !alive {
            self.close(id, registry);
        }
        more
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        let conns = self.conns.values().map(|c| c.deadline);
        conns.chain([self.sample_at]).min()
    }

    /// Whether the history is due a sample; if so, the next one is timed.
    pub fn sample_due(&mut self, now: Instant) -> bool {
        if self.sample_at > now {
            return false;
        }
        self.sample_at = now + SAMPLE_EVERY;
        true
    }

    /// Closes connections past their deadline.
    pub fn expire(&mut self, now: Instant, registry: &Registry) {
        let late: Vec<u64> = (self.conns.iter())
            .filter(|(_, c)| c.deadline <= now)
            .map(|(&k, _)| k)
            .collect();
        for id in late {
            self.close(id, registry);
        }
    }

    fn close(&mut self, id: u64, registry: &Registry) {
        if let Some(mut c) = self.conns.remove(&id) {
            let _ = registry.deregister(&mut c.stream);
        }
    }
}

/// Writes what is owed, then reads and answers requests until one needs a
/// report, the socket would block, or the connection ends. Returns the
/// report wanted and whether the connection lives on.
fn drive(
    c: &mut Conn,
    token: Option<&str>,
    history: &History,
    now: Instant,
) -> (Option<Want>, bool) {
    let limits = Limits {
        max_header_bytes: MAX_HEAD,
        max_body_bytes: 0,
    };
    loop {
        if !c.out.is_empty() {
            if crate::ipc::flush_buf(&mut c.out, &mut c.stream).is_err() {
                return (None, false);
            }
            if !c.out.is_empty() {
                return (None, true);
            }
            if c.close {
                return (None, false);
            }
            // The answer was taken: the clock is now the next request's.
            c.deadline = now + TIMEOUT;
        }
        if c.owed.is_some() {
            return (None, true);
        }
        let mut scratch = Scratch::new();
        let (answer, consumed) = match c.decoder.decode(&c.inbuf, &limits, &mut scratch) {
            Ok(Some(Event::Request { request, consumed })) => {
                let keep = request.keep_alive;
                let head = request.method == "HEAD";
                (
                    Some((route(&request, token, history), keep, head)),
                    consumed,
                )
            }
            // A body was announced; none is taken (the decoder refuses it).
            Ok(Some(Event::Continue)) => (None, 0),
            Ok(None) => {
                let mut chunk = [0u8; 4096];
                match c.stream.read(&mut chunk) {
                    Ok(0) => return (None, false),
                    Ok(n) => c.inbuf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return (None, true),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => return (None, false),
                }
                (None, 0)
            }
            Err(e) => {
                let resp = http::error_response(e.status());
                (Some((Route::Answer(resp), false, false)), 0)
            }
        };
        c.inbuf.drain(..consumed);
        match answer {
            None => {}
            Some((Route::Gather(want), keep, head)) => {
                c.owed = Some((want, keep, head));
                return (Some(want), true);
            }
            Some((Route::Answer(resp), keep, head)) => {
                http::encode_response(&resp, keep, head, &mut c.out);
                c.close = !keep;
            }
        }
    }
}

/// What a request gets: a report gathered from the workers, or an answer at once.
enum Route {
    Gather(Want),
    Answer(Response),
}

fn route(req: &http::Request<'_>, token: Option<&str>, history: &History) -> Route {
    if let Some(t) = token {
        let header = req
            .header("authorization")
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, v)| v.trim());
        // RFC 6750 §2.3: a browser opening the dashboard cannot send a header.
        let query = (req.query.split('&')).find_map(|kv| kv.strip_prefix("access_token="));
        if !header
            .or(query)
            .is_some_and(|g| same(g.as_bytes(), t.as_bytes()))
        {
            let mut r = http::error_response(401);
            r.headers
                .push(("WWW-Authenticate".into(), "Bearer realm=\"wm-host\"".into()));
            return Route::Answer(r);
        }
    }
    if req.method != "GET" && req.method != "HEAD" {
        let mut r = http::error_response(405);
        r.headers.push(("Allow".into(), "GET, HEAD".into()));
        return Route::Answer(r);
    }
    match req.path {
        "/" | "/index.html" => Route::Answer(typed(
            200,
            "text/html; charset=utf-8",
            DASHBOARD.as_bytes().to_vec(),
        )),
        "/history" => Route::Answer(json(history)),
        "/metrics" => Route::Gather(Want::Metrics),
        "/status" => Route::Gather(Want::Status),
        "/connections" => Route::Gather(Want::Connections),
        _ => Route::Answer(http::error_response(404)),
    }
}

/// Compares without stopping at the first difference, so the time taken
/// does not tell how much of a guessed token was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn typed(status: u16, content_type: &str, body: Vec<u8>) -> Response {
    let mut r = Response::new(status, body);
    r.headers.push(("Content-Type".into(), content_type.into()));
    r.headers.push(("Cache-Control".into(), "no-store".into()));
    r
}

/// The same JSON as the CLI's `--json`.
fn json<T: serde::Serialize>(v: &T) -> Response {
    let body = serde_json::to_vec_pretty(v).expect("reports always serialize");
    typed(200, "application/json", body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{GroupRow, WorkerRow, WorkerState, WorkerStats};

    fn report(workers: &[(u32, Option<u64>)]) -> StatusReport {
        StatusReport {
            version: String::new(),
            master_pid: 1,
            start_time: 0,
            uptime_secs: 0,
            load_average: String::new(),
            groups: vec![GroupRow {
                name: "g".into(),
                listen: String::new(),
                count: 2,
                processes: 2,
                bus_dropped: 0,
                restarts: BTreeMap::new(),
                last_handover: None,
                reloads: BTreeMap::new(),
            }],
            exits: Vec::new(),
            workers: (workers.iter())
                .map(|&(pid, total)| WorkerRow {
                    pid,
                    group: "g".into(),
                    id: 0,
                    listen: String::new(),
                    rss_bytes: 0,
                    plugin: String::new(),
                    build: String::new(),
                    loaded_at: 0,
                    bus_dropped: 0,
                    bus_backlog_bytes: 0,
                    stats: total.map(|t| WorkerStats {
                        connections: 1,
                        total_messages: t,
                        ..Default::default()
                    }),
                    qps: None,
                    state: WorkerState::Idle,
                })
                .collect(),
            bus: Default::default(),
            reloads: Vec::new(),
        }
    }

    struct Fixture {
        poll: mio::Poll,
        admin: Admin,
    }

    impl Fixture {
        fn new() -> Fixture {
            let cfg = AdminConfig {
                addr: "127.0.0.1:0".parse().unwrap(),
                token: None,
            };
            Fixture {
                poll: mio::Poll::new().unwrap(),
                admin: Admin::bind(&cfg).unwrap(),
            }
        }

        /// A client that has sent `req`, once the admin holds it.
        fn connect(&mut self, req: &[u8]) -> (std::net::TcpStream, u64) {
            let mut s = std::net::TcpStream::connect(self.admin.addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(req).unwrap();
            let id = self.admin.next;
            until("accepted", || {
                let reg = self.poll.registry();
                self.admin
                    .accept(reg, |id| Token(id as usize), Instant::now());
                self.admin.next > id
            });
            (s, id)
        }

        /// Drives `id` until its request is read; what it returned then.
        fn request(&mut self, id: u64) -> Option<Gather> {
            let mut started = None;
            until("request read", || {
                let reg = self.poll.registry();
                started = started.or(self.admin.on_event(id, reg, Instant::now()));
                self.admin.conns[&id].owed.is_some()
            });
            started
        }
    }

    fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out: {what}");
            std::thread::yield_now();
        }
    }

    /// Reads one answer's head and `Content-Length` body.
    fn read_answer(s: &mut std::net::TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = (head.lines())
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |n| n.trim().parse().unwrap());
                if body.len() >= len {
                    return text;
                }
            }
            let n = s.read(&mut chunk).expect("an answer");
            assert!(n > 0, "closed before a whole answer: {text:?}");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[test]
    fn admin_requests_share_the_gather_in_flight_of_their_kind() {
        let mut f = Fixture::new();
        let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        // `a` pipelines a second /status behind its first.
        let (mut a, ia) = f.connect(format!("{}{}", get("/status"), get("/status")).as_bytes());
        let (mut b, ib) = f.connect(get("/metrics").as_bytes());
        let (mut c, ic) = f.connect(get("/connections").as_bytes());
        let (mut d, id) = f.connect(get("/status").as_bytes());
        assert_eq!(f.request(ia), Some(Gather::Status));
        assert_eq!(f.request(ib), None, "/metrics waits for the /status gather");
        assert_eq!(f.request(ic), Some(Gather::Connections));
        assert_eq!(f.request(id), None);
        // One report answers all three; `a`'s next request starts the next one.
        let reg = f.poll.registry();
        let status = Gathered::Status(report(&[(7, Some(3))]));
        let next = f.admin.answer(&status, reg, Instant::now());
        assert_eq!(next, vec![Gather::Status]);
        for s in [&mut a, &mut d] {
            let text = read_answer(s);
            assert!(text.starts_with("HTTP/1.1 200"), "{text}");
            assert!(text.contains("\"master_pid\""), "{text}");
        }
        let text = read_answer(&mut b);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(text.contains("wm_worker_messages_total"), "{text}");
        // A request that comes now waits for the gather `a` started.
        d.write_all(get("/status").as_bytes()).unwrap();
        assert_eq!(f.request(id), None);
        let reg = f.poll.registry();
        assert!(f.admin.answer(&status, reg, Instant::now()).is_empty());
        for s in [&mut a, &mut d] {
            assert!(read_answer(s).starts_with("HTTP/1.1 200"));
        }
        // The connections report answers only `c`.
        let conns = Gathered::Connections(Default::default());
        assert!(f.admin.answer(&conns, reg, Instant::now()).is_empty());
        let text = read_answer(&mut c);
        assert!(
            text.starts_with("HTTP/1.1 200") && text.contains("\"busy\""),
            "{text}"
        );
        assert!(f.admin.waiting.is_empty());
    }

    #[test]
    fn past_the_cap_the_oldest_connection_owing_nothing_makes_room() {
        let mut f = Fixture::new();
        // The first is answered (owes a report): it is kept.
        let (_busy, first) = f.connect(b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(f.request(first), Some(Gather::Status));
        let mut half = Vec::new();
        for _ in 1..MAX_CONNS {
            half.push(f.connect(b"GET /status HTTP/1.1\r\n"));
        }
        assert_eq!(f.admin.conns.len(), MAX_CONNS);
        let (_new, new) = f.connect(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(f.admin.conns.len(), MAX_CONNS);
        let (mut oldest, old_id) = half.remove(0);
        assert!(!f.admin.conns.contains_key(&old_id), "the oldest idle went");
        assert!(f.admin.conns.contains_key(&first) && f.admin.conns.contains_key(&new));
        let mut buf = Vec::new();
        let ended = oldest.read_to_end(&mut buf);
        assert!(ended.is_ok() || ended.unwrap_err().kind() == io::ErrorKind::ConnectionReset);
        assert!(buf.is_empty(), "closed without an answer: {buf:?}");
    }

    #[test]
    fn history_rates_come_from_each_workers_totals_and_stay_bounded() {
        let mut h = History::default();
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let s = |n: u64| Duration::from_secs(n);
        h.record(&report(&[(1, Some(100)), (2, Some(0))]), t0, wall);
        assert!(h.groups.is_empty(), "one sample is no rate");
        h.record(&report(&[(1, Some(120)), (2, Some(10))]), t0 + s(2), wall);
        assert_eq!(h.groups["g"][0].msgs, 15.0);
        assert_eq!(h.groups["g"][0].conns, 2);
        // Worker 2 busy (no answer): its total is kept, and its next answer
        // counts over the 4 s since it was last read. Worker 3 is new (a
        // replacement): it counts from its second sample on.
        h.record(
            &report(&[(1, Some(120)), (2, None), (3, Some(50))]),
            t0 + s(4),
            wall,
        );
        assert_eq!(h.groups["g"][1].msgs, 0.0);
        h.record(&report(&[(2, Some(50)), (3, Some(50))]), t0 + s(6), wall);
        assert_eq!(h.groups["g"][2].msgs, 10.0);
        for i in 0..1000 {
            h.record(&report(&[(1, Some(0))]), t0 + s(8 + i), wall);
        }
        let keep = (HISTORY_SPAN.as_secs() / SAMPLE_EVERY.as_secs()) as usize;
        assert_eq!(h.groups["g"].len(), keep);
    }
}
