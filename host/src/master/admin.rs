//! The admin listener (`[host] admin`): HTTP/1.1 served by the master's own
//! mio loop, so it needs no thread and never loads plugin code. `/metrics`,
//! `/status` and `/connections` are gathered from the workers like the
//! CLI's reports (`control.rs`); `/` is the dashboard, a static page that
//! polls `/status`.
//!
//! A slow or hostile client must not stall the master: sockets are
//! non-blocking, a request head is at most `MAX_HEAD` bytes and bodies are
//! refused, every connection has `TIMEOUT` to send its request and take
//! its answer, and past `MAX_CONNS` new connections are closed at once.
//! One request is answered at a time per connection; pipelined ones wait
//! in its (bounded) input.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use wm_proto::http::{self, Event, HttpDecoder, Limits, Response, Scratch};

use super::control::Gathered;
use crate::config::AdminConfig;

/// Connections at once; more are closed as they come.
pub const MAX_CONNS: usize = 32;
/// To send a request (from accept, or from the previous answer) and to take
/// an answer.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// A request head; admin requests have no body.
const MAX_HEAD: usize = 8 * 1024;

const DASHBOARD: &str = include_str!("admin/dashboard.html");

/// What a request needs from the workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    Status,
    Metrics,
    Connections,
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
    /// went away cannot reach a later one.
    next: u64,
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
                        // One try, never waited for: the socket is dropped
                        // either way. What the client sent is read first, or
                        // the close would reset the connection and lose the 503.
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
    /// a report to gather for it, if its request needs one.
    pub fn on_event(&mut self, id: u64, registry: &Registry, now: Instant) -> Option<Want> {
        let c = self.conns.get_mut(&id)?;
        let (want, alive) = drive(c, self.token.as_deref(), now);
        if !alive {
            self.close(id, registry);
        }
        want
    }

    /// The report gathered for `id`'s request. Returns the report its next
    /// request (pipelined, already read) needs, if any.
    pub fn answer(
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
        let (more, alive) = drive(c, self.token.as_deref(), now);
        if !alive {
            self.close(id, registry);
        }
        more
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.conns.values().map(|c| c.deadline).min()
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
fn drive(c: &mut Conn, token: Option<&str>, now: Instant) -> (Option<Want>, bool) {
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
                (Some((route(&request, token), keep, head)), consumed)
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

fn route(req: &http::Request<'_>, token: Option<&str>) -> Route {
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
