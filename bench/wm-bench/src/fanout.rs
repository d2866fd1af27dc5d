//! Broadcast fan-out against wm-host running the test plugin: C connections
//! (text or websocket) each `join g`; once `count g` shows all of them, one
//! of them sends `gsend g <payload>` and the time until the last connection
//! has the payload is measured, round after round.
//!
//! One `mio` loop holds every connection. A message's arrival time is the
//! moment `poll` returned with its socket readable (taken once per batch of
//! events, before any of them is read), counted from just before the
//! `gsend` was written.

use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use wm_proto::websocket::write_frame;

use crate::client::{self, Proto};

/// What a fan-out run does.
#[derive(Clone, Debug)]
pub struct FanoutConfig {
    pub proto: Proto,
    pub addr: SocketAddr,
    /// Other servers (hosts sharing a bus): connections are spread
    /// round-robin over `addr` and these; the broadcast goes from `addr`.
    pub more_addrs: Vec<SocketAddr>,
    pub conns: usize,
    /// Source addresses 127.0.0.1..=127.0.0.N.
    pub sources: usize,
    /// Rounds measured, after `warmup_rounds` that are not.
    pub rounds: usize,
    pub warmup_rounds: usize,
    /// Payload bytes of the broadcast message.
    pub size: usize,
    /// Longest wait for one round.
    pub round_timeout: Duration,
}

/// One broadcast: milliseconds from the `gsend` to the first, median and
/// last arrival, and how many connections had it by the deadline.
#[derive(Clone, Debug, Default)]
pub struct Round {
    pub first_ms: f64,
    pub p50_ms: f64,
    pub last_ms: f64,
    pub received: usize,
}

#[derive(Clone, Debug, Default)]
pub struct FanoutReport {
    /// Connections that joined the group.
    pub joined: usize,
    /// Connections that failed (connect, handshake, join, later errors).
    pub errors: u64,
    /// Messages that were not the expected payload, or came twice.
    pub wrong: u64,
    /// Time to open and join every connection.
    pub setup: Duration,
    /// Time from the last join answered until `count g` showed them all.
    pub visible_after: Duration,
    /// Measured rounds (warm-up rounds left out).
    pub rounds: Vec<Round>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum St {
    Connecting,
    Handshake,
    Joining,
    Ready,
    Dead,
}

struct Conn {
    sock: TcpStream,
    st: St,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// 1 + the last round whose payload arrived here (0: none).
    got: usize,
}

/// What the connections are waiting for.
struct Driver {
    proto: Proto,
    /// Connection that asks `count g` and sends the broadcasts.
    control: Option<usize>,
    /// The last `count g` answer.
    count: Option<u64>,
    /// The round in progress: its number (1-based), payload and start.
    round: usize,
    payload: Vec<u8>,
    t0: Instant,
    /// Arrival time of this batch of events.
    now: Instant,
    arrivals: Vec<f64>,
    wrong: u64,
}

/// Appends one client message, framed (websocket: masked text frame).
fn frame(proto: Proto, msg: &[u8], out: &mut Vec<u8>) {
    match proto {
        Proto::Text => {
            out.extend_from_slice(msg);
            out.push(b'\n');
        }
        Proto::Frame => {
            out.extend_from_slice(&((msg.len() + 4) as u32).to_be_bytes());
            out.extend_from_slice(msg);
        }
        Proto::Websocket => write_frame(out, 1, msg, Some([0x5a, 0x17, 0xc3, 0x8e])),
    }
}

fn err(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Conn {
    fn send(&mut self, proto: Proto, msg: &[u8]) -> io::Result<()> {
        frame(proto, msg, &mut self.wbuf);
        self.flush()
    }

    fn flush(&mut self) -> io::Result<()> {
        if !client::write_out(&mut self.sock, &self.wbuf, &mut self.wpos)? {
            return Ok(());
        }
        self.wbuf.clear();
        self.wpos = 0;
        Ok(())
    }

    /// Handles an event; returns the state before it, so the caller can
    /// count connections that became ready or died.
    fn event(&mut self, idx: usize, writable: bool, scratch: &mut [u8], d: &mut Driver) -> St {
        let before = self.st;
        if before == St::Dead {
            return before;
        }
        if self.try_event(idx, writable, scratch, d).is_err() {
            self.st = St::Dead;
            self.rbuf = Vec::new();
            self.wbuf = Vec::new();
        }
        before
    }

    fn try_event(
        &mut self,
        idx: usize,
        writable: bool,
        scratch: &mut [u8],
        d: &mut Driver,
    ) -> io::Result<()> {
        if self.st == St::Connecting {
            if !client::connect_finished(&self.sock)? {
                return Ok(());
            }
            if d.proto == Proto::Websocket {
                client::ws_request(&self.sock, &mut self.wbuf)?;
                self.st = St::Handshake;
            } else {
                frame(d.proto, b"join g", &mut self.wbuf);
                self.st = St::Joining;
            }
        }
        loop {
            let n = match self.sock.read(scratch) {
                Ok(0) => return Err(err("closed by the server")),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if self.rbuf.is_empty() {
                let used = self.consume(idx, &scratch[..n], d)?;
                self.rbuf.extend_from_slice(&scratch[used..n]);
            } else {
                self.rbuf.extend_from_slice(&scratch[..n]);
                let buf = std::mem::take(&mut self.rbuf);
                let used = self.consume(idx, &buf, d)?;
                self.rbuf = buf;
                self.rbuf.drain(..used);
            }
            if n < scratch.len() {
                break;
            }
        }
        if writable || !self.wbuf.is_empty() {
            self.flush()?;
        }
        Ok(())
    }

    /// Handles the complete messages at the start of `data`; returns the
    /// bytes used.
    fn consume(&mut self, idx: usize, data: &[u8], d: &mut Driver) -> io::Result<usize> {
        let mut pos = 0;
        if self.st == St::Handshake {
            let Some(end) = client::ws_answer(data)? else {
                return Ok(0);
            };
            pos = end;
            frame(d.proto, b"join g", &mut self.wbuf);
            self.st = St::Joining;
        }
        while let Some((start, end, used)) = client::decode(d.proto, &data[pos..]).map_err(err)? {
            let msg = &data[pos + start..pos + end];
            pos += used;
            match self.st {
                St::Joining if msg == b"ok" => self.st = St::Ready,
                St::Joining => return Err(err("join answered with something else")),
                _ if Some(idx) == d.control && d.round == 0 => {
                    d.count = std::str::from_utf8(msg).ok().and_then(|s| s.parse().ok());
                }
                _ if d.round > 0 && self.got < d.round && msg == d.payload.as_slice() => {
                    self.got = d.round;
                    d.arrivals
                        .push(d.now.saturating_duration_since(d.t0).as_secs_f64() * 1e3);
                }
                _ => d.wrong += 1,
            }
        }
        Ok(pos)
    }
}

fn register(poll: &Poll, addr: SocketAddr, src: Option<Ipv4Addr>, idx: usize) -> io::Result<Conn> {
    let mut sock = client::connect(addr, src)?;
    poll.registry().register(
        &mut sock,
        Token(idx),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(Conn {
        sock,
        st: St::Connecting,
        rbuf: Vec::new(),
        wbuf: Vec::new(),
        wpos: 0,
        got: 0,
    })
}

struct Loop {
    poll: Poll,
    events: Events,
    scratch: Vec<u8>,
    conns: Vec<Conn>,
    d: Driver,
    ready: usize,
    dead: usize,
}

impl Loop {
    /// One poll and its events.
    fn turn(&mut self, timeout: Duration) -> io::Result<()> {
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        self.d.now = Instant::now();
        for ev in self.events.iter() {
            let idx = ev.token().0;
            let c = &mut self.conns[idx];
            let before = c.event(idx, ev.is_writable(), &mut self.scratch, &mut self.d);
            let after = c.st;
            if before != St::Ready && after == St::Ready {
                self.ready += 1;
            }
            if before != St::Dead && after == St::Dead {
                self.dead += 1;
                if before == St::Ready {
                    self.ready -= 1;
                }
            }
        }
        Ok(())
    }

    fn send(&mut self, idx: usize, msg: &[u8]) {
        let proto = self.d.proto;
        let c = &mut self.conns[idx];
        if c.st == St::Ready && c.send(proto, msg).is_err() {
            c.st = St::Dead;
            self.dead += 1;
            self.ready -= 1;
        }
    }
}

/// Opens and joins every connection, waits until the group shows them all,
/// calls `at_ready` (the connections are held meanwhile), then measures.
pub fn run(cfg: &FanoutConfig, at_ready: &mut dyn FnMut()) -> io::Result<FanoutReport> {
    const PENDING: usize = 256;
    let sources = cfg.sources.clamp(1, 250);
    let start = Instant::now();
    let mut l = Loop {
        poll: Poll::new()?,
        events: Events::with_capacity(16_384),
        scratch: vec![0u8; 64 * 1024],
        conns: Vec::with_capacity(cfg.conns),
        d: Driver {
            proto: cfg.proto,
            control: None,
            count: None,
            round: 0,
            payload: Vec::new(),
            t0: start,
            now: start,
            arrivals: Vec::with_capacity(cfg.conns),
            wrong: 0,
        },
        ready: 0,
        dead: 0,
    };
    let servers = 1 + cfg.more_addrs.len();
    let addr_of = |idx: usize| match idx % servers {
        0 => cfg.addr,
        i => cfg.more_addrs[i - 1],
    };
    let setup_deadline = start + Duration::from_secs(120);
    while l.ready + l.dead < cfg.conns && Instant::now() < setup_deadline {
        while l.conns.len() < cfg.conns && l.conns.len() - (l.ready + l.dead) < PENDING {
            let idx = l.conns.len();
            let src = Ipv4Addr::new(127, 0, 0, 1 + (idx % sources) as u8);
            let c = register(&l.poll, addr_of(idx), (sources > 1).then_some(src), idx).map_err(
                |e| io::Error::new(e.kind(), format!("connection {idx} of {}: {e}", cfg.conns)),
            )?;
            l.conns.push(c);
        }
        l.turn(Duration::from_millis(100))?;
    }
    let setup = start.elapsed();
    let control = l
        .conns
        .iter()
        .enumerate()
        .position(|(i, c)| c.st == St::Ready && i % servers == 0)
        .ok_or_else(|| io::Error::other("no connection joined the group"))?;
    l.d.control = Some(control);

    // Joins travel to the other workers through the master: wait until the
    // control connection's worker counts every member.
    let joined = l.ready;
    let visible_at = Instant::now();
    let deadline = visible_at + Duration::from_secs(30);
    loop {
        l.d.count = None;
        l.send(control, b"count g");
        let asked = Instant::now();
        while l.d.count.is_none() && asked.elapsed() < Duration::from_secs(5) {
            l.turn(Duration::from_millis(5))?;
        }
        if l.d.count.is_some_and(|n| n >= joined as u64) {
            break;
        }
        if Instant::now() > deadline {
            return Err(io::Error::other(format!(
                "count g showed {:?} of {joined} members after 30 s",
                l.d.count
            )));
        }
        l.turn(Duration::from_millis(10))?;
    }
    let visible_after = visible_at.elapsed();
    at_ready();

    let mut rounds = Vec::new();
    for r in 1..=cfg.warmup_rounds + cfg.rounds {
        // Quiet first: nothing left over from the previous round.
        let quiet = Instant::now();
        while quiet.elapsed() < Duration::from_millis(100) {
            l.turn(Duration::from_millis(20))?;
        }
        let head = format!("fan{r:03}-");
        let mut payload = head.into_bytes();
        payload.resize(cfg.size.max(payload.len()), b'x');
        let mut cmd = b"gsend g ".to_vec();
        cmd.extend_from_slice(&payload);
        l.d.round = r;
        l.d.payload = payload;
        l.d.arrivals.clear();
        l.d.t0 = Instant::now();
        l.send(control, &cmd);
        let deadline = l.d.t0 + cfg.round_timeout;
        while l.d.arrivals.len() < l.ready && Instant::now() < deadline {
            l.turn(Duration::from_millis(10))?;
        }
        if r > cfg.warmup_rounds {
            let mut a = std::mem::take(&mut l.d.arrivals);
            a.sort_by(f64::total_cmp);
            rounds.push(Round {
                first_ms: a.first().copied().unwrap_or(0.0),
                p50_ms: a.get(a.len() / 2).copied().unwrap_or(0.0),
                last_ms: a.last().copied().unwrap_or(0.0),
                received: a.len(),
            });
        }
    }
    Ok(FanoutReport {
        joined,
        errors: l.dead as u64 + (cfg.conns - l.conns.len()) as u64,
        wrong: l.d.wrong,
        setup,
        visible_after,
        rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wm_proto::websocket::apply_mask;

    #[test]
    fn frames_client_commands() {
        let mut out = Vec::new();
        frame(Proto::Text, b"join g", &mut out);
        assert_eq!(out, b"join g\n");
        out.clear();
        frame(Proto::Websocket, b"join g", &mut out);
        assert_eq!(&out[..2], &[0x81, 0x80 | 6]);
        let mask = [out[2], out[3], out[4], out[5]];
        let mut body = out[6..].to_vec();
        apply_mask(&mut body, mask);
        assert_eq!(body, b"join g");
    }
}
