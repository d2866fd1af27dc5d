//! Websocket client connections held in one `mio` loop, for the handover
//! scenarios: opened (handshake and one echo each), then left idle, probed
//! (one message each) or driven at a fixed rate, every echo checked against
//! what was sent, in order.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::client::{self, Payload, Proto};

/// Payload bytes of every message.
pub const SIZE: usize = 32;

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum State {
    Connecting,
    Handshake,
    Open,
    Dead,
}

struct Ws {
    sock: TcpStream,
    /// Its index, which is also its poll token and goes into its payloads.
    id: u32,
    state: State,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Messages in flight: (sequence number, when written).
    inflight: VecDeque<(u64, Instant)>,
    next_seq: u64,
}

/// What the connections share: the payload maker, a read buffer, counters.
struct Shared {
    payload: Payload,
    scratch: Vec<u8>,
    /// Echoes whose bytes were not the message sent (or not in order).
    wrong: u64,
    /// Connections that failed or were closed, and the first reason.
    dead: u64,
    first_error: Option<String>,
    /// Of those, connections that had been open (had completed their first echo).
    lost: u64,
}

/// Many websocket client connections to one server.
pub struct Fleet {
    poll: Poll,
    events: Events,
    conns: Vec<Ws>,
    sh: Shared,
}

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Fleet {
    /// Opens `n` connections from `sources` addresses 127.0.0.1.. (bound
    /// before connect, ports picked at connect time), each completing the
    /// handshake and one echo; at most 256 are on their way at once.
    pub fn open(
        addr: SocketAddr,
        n: usize,
        sources: usize,
        timeout: Duration,
    ) -> io::Result<Fleet> {
        const PENDING: usize = 256;
        let sources = sources.clamp(1, 250);
        let mut f = Fleet {
            poll: Poll::new()?,
            events: Events::with_capacity(4096),
            conns: Vec::with_capacity(n),
            sh: Shared {
                payload: Payload::new(SIZE),
                scratch: vec![0u8; 256 * 1024],
                wrong: 0,
                dead: 0,
                first_error: None,
                lost: 0,
            },
        };
        let start = Instant::now();
        loop {
            // Connections still on their way: neither dead nor open with
            // their first echo back.
            let pending = (f.conns.iter())
                .filter(|c| {
                    c.state != State::Dead && (c.state != State::Open || !c.inflight.is_empty())
                })
                .count();
            if f.conns.len() == n && pending == 0 {
                break;
            }
            if start.elapsed() > timeout {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{pending} of {n} connections not open after {timeout:?}"),
                ));
            }
            let mut room = PENDING.saturating_sub(pending);
            while room > 0 && f.conns.len() < n {
                let id = f.conns.len();
                let src = Ipv4Addr::new(127, 0, 0, 1 + (id % sources) as u8);
                let mut sock =
                    client::connect(addr, (sources > 1).then_some(src)).map_err(|e| {
                        io::Error::new(e.kind(), format!("connection {id} of {n}: {e}"))
                    })?;
                f.poll.registry().register(
                    &mut sock,
                    Token(id),
                    Interest::READABLE | Interest::WRITABLE,
                )?;
                f.conns.push(Ws {
                    sock,
                    id: id as u32,
                    state: State::Connecting,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                    wpos: 0,
                    inflight: VecDeque::new(),
                    next_seq: 0,
                });
                room -= 1;
            }
            f.pump(Duration::from_millis(50), &mut |_, _, _| {})?;
        }
        Ok(f)
    }

    /// Connections open now.
    pub fn open_count(&self) -> usize {
        self.conns.iter().filter(|c| c.state == State::Open).count()
    }

    /// Messages sent and not answered yet, over every open connection.
    pub fn in_flight(&self) -> usize {
        (self.conns.iter())
            .filter(|c| c.state == State::Open)
            .map(|c| c.inflight.len())
            .sum()
    }

    pub fn wrong(&self) -> u64 {
        self.sh.wrong
    }

    /// Connections that were open and then failed or were closed.
    pub fn lost(&self) -> u64 {
        self.sh.lost
    }

    /// Connections that failed, at any point (opening included).
    pub fn dead(&self) -> u64 {
        self.sh.dead
    }

    pub fn first_error(&self) -> Option<&str> {
        self.sh.first_error.as_deref()
    }

    /// Sends the next message on connection `i` (if it is open).
    pub fn send(&mut self, i: usize, now: Instant) -> bool {
        let c = &mut self.conns[i];
        if c.state != State::Open {
            return false;
        }
        c.queue(&mut self.sh, now);
        if let Err(e) = c.flush() {
            c.die(&mut self.sh, &e.to_string());
            return false;
        }
        true
    }

    /// One poll (up to `timeout`) and what it brought: `echo(i, sent,
    /// latency)` for each echo on connection `i`: when its message was
    /// written, and from then to when `poll` returned with the echo.
    pub fn pump(
        &mut self,
        timeout: Duration,
        echo: &mut dyn FnMut(usize, Instant, Duration),
    ) -> io::Result<()> {
        if let Err(e) = self.poll.poll(&mut self.events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let now = Instant::now();
        for ev in self.events.iter() {
            let i = ev.token().0;
            let c = &mut self.conns[i];
            if c.state == State::Dead {
                continue;
            }
            if let Err(e) = c.event(ev.is_readable(), &mut self.sh, now, &mut |sent, d| {
                echo(i, sent, d)
            }) {
                c.die(&mut self.sh, &e.to_string());
            }
        }
        Ok(())
    }

    /// Sends one message on every open connection and waits until each is
    /// answered (or `timeout`): (answered, time until the last answer).
    pub fn probe_all(&mut self, timeout: Duration) -> io::Result<(usize, Duration)> {
        let t0 = Instant::now();
        let mut waiting = vec![false; self.conns.len()];
        let mut left = 0;
        for (i, w) in waiting.iter_mut().enumerate() {
            if self.send(i, t0) {
                *w = true;
                left += 1;
            }
        }
        let (mut answered, mut last) = (0, Duration::ZERO);
        while left > 0 && t0.elapsed() < timeout {
            let mut got = Vec::new();
            self.pump(Duration::from_millis(20), &mut |i, _, _| got.push(i))?;
            let now = t0.elapsed();
            for i in got {
                if std::mem::take(&mut waiting[i]) {
                    left -= 1;
                    answered += 1;
                    last = now;
                }
            }
            // Connections that died while waiting will not answer.
            for (i, w) in waiting.iter_mut().enumerate() {
                if *w && self.conns[i].state == State::Dead {
                    *w = false;
                    left -= 1;
                }
            }
        }
        Ok((answered, last))
    }

    /// Waits up to `timeout` for every message in flight to be answered.
    pub fn drain(
        &mut self,
        timeout: Duration,
        echo: &mut dyn FnMut(usize, Instant, Duration),
    ) -> io::Result<()> {
        let end = Instant::now() + timeout;
        while self.in_flight() > 0 && Instant::now() < end {
            self.pump(Duration::from_millis(20), echo)?;
        }
        Ok(())
    }
}

impl Ws {
    fn queue(&mut self, sh: &mut Shared, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        client::encode(
            Proto::Websocket,
            self.id,
            seq,
            &mut sh.payload,
            &mut self.wbuf,
        );
        self.inflight.push_back((seq, now));
    }

    fn die(&mut self, sh: &mut Shared, why: &str) {
        if self.state == State::Dead {
            return;
        }
        if self.state == State::Open && self.next_seq > 0 {
            sh.lost += 1;
        }
        sh.dead += 1;
        sh.first_error.get_or_insert_with(|| why.to_string());
        self.state = State::Dead;
        self.rbuf = Vec::new();
        self.wbuf = Vec::new();
        self.inflight.clear();
    }

    fn flush(&mut self) -> io::Result<()> {
        if client::write_out(&mut self.sock, &self.wbuf, &mut self.wpos)? {
            self.wbuf.clear();
            self.wpos = 0;
        }
        Ok(())
    }

    fn event(
        &mut self,
        readable: bool,
        sh: &mut Shared,
        now: Instant,
        echo: &mut dyn FnMut(Instant, Duration),
    ) -> io::Result<()> {
        if self.state == State::Connecting {
            if !client::connect_finished(&self.sock)? {
                return Ok(());
            }
            client::ws_request(&self.sock, &mut self.wbuf)?;
            self.state = State::Handshake;
        }
        if readable {
            loop {
                match self.sock.read(&mut sh.scratch) {
                    Ok(0) => return Err(bad("closed by the server")),
                    Ok(n) => self.rbuf.extend_from_slice(&sh.scratch[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            self.consume(sh, now, echo)?;
        }
        self.flush()
    }

    fn consume(
        &mut self,
        sh: &mut Shared,
        now: Instant,
        echo: &mut dyn FnMut(Instant, Duration),
    ) -> io::Result<()> {
        let mut pos = 0;
        if self.state == State::Handshake {
            let Some(end) = client::ws_answer(&self.rbuf)? else {
                return Ok(());
            };
            pos = end;
            self.state = State::Open;
            // The opening echo.
            self.queue(sh, now);
        }
        let id = self.id;
        while let Some((start, end, used)) =
            client::decode(Proto::Websocket, &self.rbuf[pos..]).map_err(bad)?
        {
            let Some((seq, sent)) = self.inflight.pop_front() else {
                return Err(bad("an echo of nothing sent"));
            };
            if !sh
                .payload
                .matches(id, seq, &self.rbuf[pos + start..pos + end])
            {
                sh.wrong += 1;
            }
            echo(sent, now.saturating_duration_since(sent));
            pos += used;
        }
        self.rbuf.drain(..pos);
        Ok(())
    }
}
