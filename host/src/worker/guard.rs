//! Limits on what slow or greedy clients can hold: a deadline for a
//! request head or websocket handshake (`header_timeout`), one for
//! finishing a message once started (`message_timeout`), and a budget for
//! incomplete input across the worker's connections (`max_buffered_input`).
//!
//! `idle_timeout` cannot do this: one byte resets it. These clocks start
//! when a head or message begins and only its end stops them.

use std::time::{Duration, Instant};

use super::conn::State;
use super::core::Core;
use super::logs::limited;
use wm_proto::{http, Codec};

/// Why a connection is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// ssl listeners: the TLS handshake took longer than `header_timeout`.
    Handshake(Duration),
    Header(Duration),
    Message(Duration),
    Budget(usize),
}

impl Cut {
    /// The HTTP answer before the close (when none is owed before it).
    fn status(self) -> u16 {
        match self {
            Cut::Handshake(_) | Cut::Header(_) | Cut::Message(_) => 408,
            Cut::Budget(_) => 503,
        }
    }
}

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cut::Handshake(t) => {
                write!(
                    f,
                    "TLS handshake not complete within header_timeout ({t:?})"
                )
            }
            Cut::Header(t) => write!(f, "header not complete within header_timeout ({t:?})"),
            Cut::Message(t) => write!(f, "message not complete within message_timeout ({t:?})"),
            Cut::Budget(max) => write!(
                f,
                "the worker holds over max_buffered_input ({max} bytes) of incomplete input, \
                 this connection the most"
            ),
        }
    }
}

pub struct Guard {
    header: Option<Duration>,
    message: Option<Duration>,
    max_buffered: usize,
    /// How often deadlines are checked: a quarter of the shorter one.
    every: Option<Duration>,
    next_sweep: Option<Instant>,
}

impl Guard {
    pub fn new(header: Option<Duration>, message: Option<Duration>, max_buffered: usize) -> Guard {
        let every = [header, message]
            .into_iter()
            .flatten()
            .min()
            .map(|d| (d / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)));
        Guard {
            header,
            message,
            max_buffered,
            every,
            next_sweep: every.map(|e| Instant::now() + e),
        }
    }

    /// When a newly accepted connection's header clock starts, if it has
    /// one: HTTP heads, websocket handshakes, TLS handshakes (`tls`).
    pub fn header_clock(&self, codec: &Codec, tls: bool, now: Instant) -> Option<Instant> {
        let handshake = tls
            || matches!(codec, Codec::Http(_))
            || matches!(codec, Codec::Websocket(ws) if !ws.is_open());
        (self.header.is_some() && handshake).then_some(now)
    }

    pub fn next(&self) -> Option<Instant> {
        self.next_sweep
    }

    /// After input was decoded: counts what the connection keeps of an
    /// incomplete message, starts or stops its clocks, and enforces the
    /// budget. `completed`: a message or request was handed over.
    // Inlined into every read's dispatch, with the common case first.
    #[inline]
    pub fn track(&self, core: &mut Core, id: u64, completed: bool) {
        let Some(conn) = core.get(id) else { return };
        // A message or request done and nothing kept, held or timed before
        // (not a websocket: its fragments count): nothing changes below.
        if completed
            && conn.held == 0
            && conn.inbuf.capacity() == 0
            && conn.msg_since.is_none()
            && conn.head_since.is_none()
            && !matches!(conn.codec, Codec::Websocket(_))
            && core.buffered <= self.max_buffered
        {
            return;
        }
        self.track_changes(core, id, completed);
    }

    /// `track` past its common case.
    #[inline(never)]
    fn track_changes(&self, core: &mut Core, id: u64, completed: bool) {
        let Some(conn) = core.get(id) else { return };
        let held = conn.inbuf.capacity()
            + match &conn.codec {
                Codec::Websocket(ws) => ws.partial_len(),
                _ => 0,
            };
        let old = std::mem::replace(&mut conn.held, held);
        if conn.outbound.is_none() {
            // Set by the read that brought this input.
            let now = conn.last_active;
            if completed || held == 0 {
                conn.msg_since = None;
            }
            if held > 0 && conn.msg_since.is_none() {
                conn.msg_since = Some(now);
            }
            match &conn.codec {
                Codec::Http(h) => {
                    let head = h.decoder.reading_head();
                    if completed || !head {
                        conn.head_since = None;
                    }
                    // A keep-alive connection's next head: from its first byte.
                    if head && held > 0 && conn.head_since.is_none() && self.header.is_some() {
                        conn.head_since = Some(now);
                    }
                }
                Codec::Websocket(ws) if ws.is_open() => conn.head_since = None,
                _ => {}
            }
        }
        core.buffered = core.buffered.saturating_sub(old) + held;
        if core.buffered > self.max_buffered {
            self.shed(core);
        }
    }

    /// Cuts the connections holding the most until the worker is within
    /// its budget. The largest goes first: it frees the most, and it is the
    /// likeliest abuser (the newest may be an innocent client's first read).
    fn shed(&self, core: &mut Core) {
        while core.buffered > self.max_buffered {
            let victim = core
                .conns
                .iter()
                .filter(|(_, c)| c.state == State::Open)
                .max_by_key(|(_, c)| c.held)
                .filter(|(_, c)| c.held > 0)
                .map(|(_, c)| c.id);
            let Some(id) = victim else { break };
            cut(core, id, Cut::Budget(self.max_buffered));
        }
    }

    /// Connections past a deadline, checked on a coarse schedule.
    pub fn due(&mut self, core: &mut Core, now: Instant) -> Vec<(u64, Cut)> {
        let (Some(at), Some(every)) = (self.next_sweep, self.every) else {
            return Vec::new();
        };
        if at > now {
            return Vec::new();
        }
        self.next_sweep = Some(now + every);
        let mut late = Vec::new();
        for (_, c) in core.conns.iter_mut() {
            if c.state != State::Open || c.outbound.is_some() || c.frozen {
                continue;
            }
            if c.paused {
                // The plugin holds the input back: the client cannot finish.
                for since in [&mut c.head_since, &mut c.msg_since] {
                    if since.is_some() {
                        *since = Some(now);
                    }
                }
                continue;
            }
            let past = |since: Option<Instant>, limit: Option<Duration>| match (since, limit) {
                (Some(s), Some(l)) if now.duration_since(s) >= l => Some(l),
                _ => None,
            };
            if let Some(l) = past(c.head_since, self.header) {
                late.push((
                    c.id,
                    match c.sock.handshaking() {
                        true => Cut::Handshake(l),
                        false => Cut::Header(l),
                    },
                ));
            } else if let Some(l) = past(c.msg_since, self.message) {
                late.push((c.id, Cut::Message(l)));
            }
        }
        late
    }
}

/// Closes a connection for `why`, with a (rate-limited) log line; an HTTP
/// client hears a 408 (a 503 for the budget) first, unless answers are
/// still owed to it, and a websocket before its handshake a plain close.
pub fn cut(core: &mut Core, id: u64, why: Cut) {
    let peer = core.peer(id);
    limited!(conn = id, %peer, "closing connection: {why}");
    let Some(conn) = core.get(id) else { return };
    conn.inbuf = Vec::new();
    let held = std::mem::take(&mut conn.held);
    conn.head_since = None;
    conn.msg_since = None;
    let answer = match &conn.codec {
        Codec::Http(h) if h.pending.is_empty() => {
            let mut out = Vec::new();
            http::encode_response(&http::error_response(why.status()), false, false, &mut out);
            Some(out)
        }
        _ => None,
    };
    core.buffered = core.buffered.saturating_sub(held);
    if let Some(out) = answer {
        core.send_raw(id, &out);
    }
    core.close(id, None);
}
