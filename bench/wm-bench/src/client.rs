//! The load generator: one single-threaded `mio` loop driving many client
//! connections, for echo throughput/latency and for idle-connection memory.
//!
//! Every message carries a payload derived from its connection and sequence
//! number, so each echo is checked byte for byte and in order.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use wm_proto::websocket::{apply_mask, frame_header};

/// The client side of a protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Proto {
    Text,
    Frame,
    Websocket,
}

impl Proto {
    pub fn scheme(self) -> &'static str {
        match self {
            Proto::Text => "text",
            Proto::Frame => "frame",
            Proto::Websocket => "websocket",
        }
    }
}

/// What an echo run does.
#[derive(Clone, Debug)]
pub struct EchoConfig {
    pub proto: Proto,
    pub addr: SocketAddr,
    pub conns: usize,
    pub inflight: usize,
    pub size: usize,
    pub warmup: Duration,
    pub duration: Duration,
}

/// What an echo run measured (over `duration`, after `warmup`).
#[derive(Clone, Debug, Default)]
pub struct EchoReport {
    pub msgs: u64,
    pub secs: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// Connections that failed: connect, handshake, reset, protocol.
    pub errors: u64,
    /// Echoes whose payload was not the one sent.
    pub wrong: u64,
    /// Connections that were open at the end.
    pub open: usize,
}

impl EchoReport {
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.msgs as f64 / self.secs
        } else {
            0.0
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum State {
    Connecting,
    Handshake,
    Open,
    /// Idle mode: the handshake and one echo are done.
    Idle,
    Dead,
}

#[derive(Default)]
struct Stats {
    msgs: u64,
    lat_ns: Vec<u32>,
    errors: u64,
    wrong: u64,
}

/// Per-run settings and counters every connection uses.
struct Cx {
    proto: Proto,
    /// Messages kept in flight per connection; 0 in idle mode.
    inflight: usize,
    now: Instant,
    measuring: bool,
    sending: bool,
    stats: Stats,
    payload: Payload,
}

impl Cx {
    fn idle(&self) -> bool {
        self.inflight == 0
    }
}

struct Conn {
    sock: TcpStream,
    id: u32,
    state: State,
    /// Bytes of an incomplete reply.
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    wpos: usize,
    /// Send time of each message in flight, oldest first.
    sent: VecDeque<Instant>,
    next_seq: u64,
    recv_seq: u64,
}

enum Step {
    Nothing,
    BecameIdle,
    /// Failed before becoming idle.
    Failed,
    /// Failed after becoming idle.
    Lost,
}

/// Payloads: message `seq` on connection `id` is `"{id}.{seq}."` followed by
/// a fixed ASCII pattern, cut to the message size (no line breaks).
pub(crate) struct Payload {
    template: Vec<u8>,
    head: Vec<u8>,
}

impl Payload {
    pub(crate) fn new(size: usize) -> Payload {
        Payload {
            template: (0..size).map(|i| b'a' + (i % 26) as u8).collect(),
            head: Vec::with_capacity(32),
        }
    }

    /// Formats the head of message `seq`; returns how much of it is used.
    fn head(&mut self, id: u32, seq: u64) -> usize {
        self.head.clear();
        let _ = write!(self.head, "{id}.{seq}.");
        self.head.len().min(self.template.len())
    }

    fn write(&mut self, id: u32, seq: u64, out: &mut Vec<u8>) {
        let h = self.head(id, seq);
        out.extend_from_slice(&self.head[..h]);
        out.extend_from_slice(&self.template[h..]);
    }

    pub(crate) fn matches(&mut self, id: u32, seq: u64, got: &[u8]) -> bool {
        let h = self.head(id, seq);
        got.len() == self.template.len()
            && got[..h] == self.head[..h]
            && got[h..] == self.template[h..]
    }
}

/// Writes `buf[*pos..]` to a non-blocking socket, advancing `pos`; true
/// once all of it is written.
pub(crate) fn write_out(sock: &mut impl Write, buf: &[u8], pos: &mut usize) -> io::Result<bool> {
    while *pos < buf.len() {
        match sock.write(&buf[*pos..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => *pos += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Whether a non-blocking connect has finished; its error if it failed.
pub(crate) fn connect_finished(sock: &TcpStream) -> io::Result<bool> {
    if let Some(e) = sock.take_error()? {
        return Err(e);
    }
    match sock.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// Queues a websocket handshake request.
pub(crate) fn ws_request(sock: &TcpStream, wbuf: &mut Vec<u8>) -> io::Result<()> {
    let _ = write!(
        wbuf,
        "GET / HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        sock.peer_addr()?
    );
    Ok(())
}

/// The length of the server's `101` answer at the start of `data`, or
/// `None` while it is incomplete.
pub(crate) fn ws_answer(data: &[u8]) -> io::Result<Option<usize>> {
    let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
        if data.len() > 8192 {
            return Err(err("handshake answer too long"));
        }
        return Ok(None);
    };
    if !data.starts_with(b"HTTP/1.1 101") {
        return Err(err("handshake refused"));
    }
    Ok(Some(end + 4))
}

/// Appends message `seq` of connection `id`, framed for `proto`.
pub(crate) fn encode(proto: Proto, id: u32, seq: u64, p: &mut Payload, out: &mut Vec<u8>) {
    let len = p.template.len();
    match proto {
        Proto::Text => {
            p.write(id, seq, out);
            out.push(b'\n');
        }
        Proto::Frame => {
            out.extend_from_slice(&((len + 4) as u32).to_be_bytes());
            p.write(id, seq, out);
        }
        Proto::Websocket => {
            // A final text frame, with the mask bit a client must set; the
            // payload is formatted in place and then masked.
            let (mut head, n) = frame_header(len, false);
            head[1] |= 0x80;
            out.extend_from_slice(&head[..n]);
            let mask = ((seq as u32).wrapping_mul(0x9e37_79b1) | 1).to_be_bytes();
            out.extend_from_slice(&mask);
            let start = out.len();
            p.write(id, seq, out);
            apply_mask(&mut out[start..], mask);
        }
    }
}

/// One complete reply at the start of `data`: (payload range, bytes used).
pub(crate) fn decode(
    proto: Proto,
    data: &[u8],
) -> Result<Option<(usize, usize, usize)>, &'static str> {
    match proto {
        Proto::Text => Ok(data.iter().position(|&b| b == b'\n').map(|i| {
            let end = if i > 0 && data[i - 1] == b'\r' {
                i - 1
            } else {
                i
            };
            (0, end, i + 1)
        })),
        Proto::Frame => {
            if data.len() < 4 {
                return Ok(None);
            }
            let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
            if len < 4 {
                return Err("frame length below 4");
            }
            Ok((data.len() >= len).then_some((4, len, len)))
        }
        Proto::Websocket => {
            if data.len() < 2 {
                return Ok(None);
            }
            if data[1] & 0x80 != 0 {
                return Err("masked server frame");
            }
            if data[0] & 0x0f == 8 {
                return Err("close frame from the server");
            }
            if data[0] != 0x81 {
                return Err("not a final text frame");
            }
            let (len, head) = match data[1] & 0x7f {
                126 if data.len() >= 4 => (u16::from_be_bytes([data[2], data[3]]) as usize, 4),
                127 if data.len() >= 10 => (
                    u64::from_be_bytes(data[2..10].try_into().unwrap()) as usize,
                    10,
                ),
                126 | 127 => return Ok(None),
                n => (n as usize, 2),
            };
            Ok((data.len() >= head + len).then_some((head, head + len, head + len)))
        }
    }
}

fn err(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

impl Conn {
    fn event(&mut self, readable: bool, writable: bool, scratch: &mut [u8], cx: &mut Cx) -> Step {
        if self.state == State::Dead {
            return Step::Nothing;
        }
        match self.try_event(readable, writable, scratch, cx) {
            Ok(step) => step,
            Err(_) => {
                let was_idle = self.state == State::Idle;
                self.state = State::Dead;
                cx.stats.errors += 1;
                if was_idle {
                    Step::Lost
                } else {
                    Step::Failed
                }
            }
        }
    }

    fn try_event(
        &mut self,
        readable: bool,
        writable: bool,
        scratch: &mut [u8],
        cx: &mut Cx,
    ) -> io::Result<Step> {
        if self.state == State::Connecting {
            if !connect_finished(&self.sock)? {
                return Ok(Step::Nothing);
            }
            if cx.proto == Proto::Websocket {
                ws_request(&self.sock, &mut self.wbuf)?;
                self.state = State::Handshake;
            } else {
                self.opened(cx);
            }
        }
        let mut step = Step::Nothing;
        if readable {
            loop {
                let n = match self.sock.read(scratch) {
                    Ok(0) => return Err(err("closed by the server")),
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                };
                let became_idle = if self.rbuf.is_empty() {
                    let (used, idle) = self.consume(&scratch[..n], cx)?;
                    self.rbuf.extend_from_slice(&scratch[used..n]);
                    idle
                } else {
                    self.rbuf.extend_from_slice(&scratch[..n]);
                    let buf = std::mem::take(&mut self.rbuf);
                    let (used, idle) = self.consume(&buf, cx)?;
                    self.rbuf = buf;
                    self.rbuf.drain(..used);
                    idle
                };
                if became_idle {
                    step = Step::BecameIdle;
                    // An idle connection keeps nothing.
                    self.rbuf = Vec::new();
                }
                if n < scratch.len() {
                    break;
                }
            }
        }
        if writable || !self.wbuf.is_empty() {
            self.flush()?;
        }
        Ok(step)
    }

    fn opened(&mut self, cx: &mut Cx) {
        self.state = State::Open;
        for _ in 0..cx.inflight.max(1) {
            self.send_next(cx);
        }
    }

    fn send_next(&mut self, cx: &mut Cx) {
        let seq = self.next_seq;
        self.next_seq += 1;
        encode(cx.proto, self.id, seq, &mut cx.payload, &mut self.wbuf);
        self.sent.push_back(cx.now);
    }

    /// Handles the replies at the start of `data`: (bytes used, became idle).
    fn consume(&mut self, data: &[u8], cx: &mut Cx) -> io::Result<(usize, bool)> {
        let mut pos = 0;
        if self.state == State::Handshake {
            let Some(end) = ws_answer(data)? else {
                return Ok((0, false));
            };
            pos = end;
            self.opened(cx);
        }
        while self.state == State::Open {
            let Some((start, end, used)) = decode(cx.proto, &data[pos..]).map_err(err)? else {
                break;
            };
            self.reply(&data[pos + start..pos + end], cx)?;
            pos += used;
        }
        Ok((pos, self.state == State::Idle))
    }

    fn reply(&mut self, got: &[u8], cx: &mut Cx) -> io::Result<()> {
        let Some(sent_at) = self.sent.pop_front() else {
            return Err(err("an answer to nothing"));
        };
        let ok = cx.payload.matches(self.id, self.recv_seq, got);
        self.recv_seq += 1;
        if !ok {
            cx.stats.wrong += 1;
        }
        if cx.idle() {
            self.state = State::Idle;
            return Ok(());
        }
        if cx.measuring {
            cx.stats.msgs += 1;
            let ns = cx.now.saturating_duration_since(sent_at).as_nanos();
            cx.stats.lat_ns.push(ns.min(u32::MAX as u128) as u32);
        }
        if cx.sending {
            self.send_next(cx);
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !write_out(&mut self.sock, &self.wbuf, &mut self.wpos)? {
            return Ok(());
        }
        self.wbuf.clear();
        self.wpos = 0;
        if self.state == State::Idle {
            self.wbuf = Vec::new();
            self.sent = VecDeque::new();
        }
        Ok(())
    }
}

/// A non-blocking connect, from `src` (port chosen at connect time) if given.
pub(crate) fn connect(addr: SocketAddr, src: Option<Ipv4Addr>) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    if let Some(ip) = src {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on our own socket with a valid int.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        s.bind(&SocketAddr::new(ip.into(), 0).into())?;
    }
    match s.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(s.into()))
}

fn new_conn(poll: &Poll, addr: SocketAddr, src: Option<Ipv4Addr>, id: usize) -> io::Result<Conn> {
    let mut sock = connect(addr, src)?;
    poll.registry().register(
        &mut sock,
        Token(id),
        Interest::READABLE | Interest::WRITABLE,
    )?;
    Ok(Conn {
        sock,
        id: id as u32,
        state: State::Connecting,
        rbuf: Vec::new(),
        wbuf: Vec::new(),
        wpos: 0,
        sent: VecDeque::new(),
        next_seq: 0,
        recv_seq: 0,
    })
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
}

/// Holds `cfg.conns` connections with `cfg.inflight` messages in flight each
/// for `warmup + duration`; `at_measure` runs when the measured part starts
/// and `at_end` right when it ends (before any connection is closed).
pub fn run_echo(
    cfg: &EchoConfig,
    mut at_measure: impl FnMut(),
    mut at_end: impl FnMut(),
) -> io::Result<EchoReport> {
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let mut cx = Cx {
        proto: cfg.proto,
        inflight: cfg.inflight.max(1),
        now: Instant::now(),
        measuring: false,
        sending: true,
        stats: Stats::default(),
        payload: Payload::new(cfg.size),
    };
    let mut conns = Vec::with_capacity(cfg.conns);
    for i in 0..cfg.conns {
        match new_conn(&poll, cfg.addr, None, i) {
            Ok(c) => conns.push(c),
            Err(e) => return Err(io::Error::new(e.kind(), format!("connect: {e}"))),
        }
    }
    let mut scratch = vec![0u8; 256 * 1024];
    let start = Instant::now();
    let measure_at = start + cfg.warmup;
    let end = measure_at + cfg.duration;
    let mut t0 = measure_at;
    loop {
        let now = Instant::now();
        if !cx.measuring && now >= measure_at {
            cx.measuring = true;
            cx.stats.msgs = 0;
            cx.stats.lat_ns.clear();
            t0 = now;
            at_measure();
        }
        if now >= end {
            break;
        }
        let next = if cx.measuring { end } else { measure_at };
        let timeout = next
            .saturating_duration_since(now)
            .min(Duration::from_millis(100));
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        cx.now = Instant::now();
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            c.event(ev.is_readable(), ev.is_writable(), &mut scratch, &mut cx);
        }
    }
    at_end();
    let secs = t0.elapsed().as_secs_f64();
    let open = conns.iter().filter(|c| c.state == State::Open).count();
    drop(conns);
    let mut lat = std::mem::take(&mut cx.stats.lat_ns);
    lat.sort_unstable();
    Ok(EchoReport {
        msgs: cx.stats.msgs,
        secs,
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        max_us: lat.last().copied().unwrap_or(0) as f64 / 1000.0,
        errors: cx.stats.errors,
        wrong: cx.stats.wrong,
        open,
    })
}

/// Idle connections held open; dropping it closes them.
pub struct IdleSet {
    _conns: Vec<Conn>,
    pub open: usize,
    pub errors: u64,
    pub wrong: u64,
}

/// Opens `n` connections, each doing the handshake (websocket) and one 8-byte
/// echo, then left idle. They come from `sources` addresses 127.0.0.F,
/// 127.0.0.F+1, … (F = `first_source`), or from whatever the kernel picks
/// when that is just 127.0.0.1.
pub fn open_idle(
    proto: Proto,
    addr: SocketAddr,
    n: usize,
    sources: usize,
    first_source: u8,
    timeout: Duration,
) -> io::Result<IdleSet> {
    const PENDING: usize = 256;
    let first_source = first_source.max(1);
    let sources = sources.clamp(1, 255 - first_source as usize);
    let bind = sources > 1 || first_source > 1;
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(4096);
    let mut cx = Cx {
        proto,
        inflight: 0,
        now: Instant::now(),
        measuring: false,
        sending: false,
        stats: Stats::default(),
        payload: Payload::new(8),
    };
    let mut scratch = vec![0u8; 64 * 1024];
    let mut conns: Vec<Conn> = Vec::with_capacity(n);
    // Connections that became idle or failed on the way.
    let (mut pending, mut settled) = (0usize, 0usize);
    let start = Instant::now();
    while settled < n && start.elapsed() < timeout {
        while pending < PENDING && conns.len() < n {
            let id = conns.len();
            let src = Ipv4Addr::new(127, 0, 0, first_source + (id % sources) as u8);
            match new_conn(&poll, addr, bind.then_some(src), id) {
                Ok(c) => {
                    conns.push(c);
                    pending += 1;
                }
                Err(e) => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!("connection {id} of {n}: {e}"),
                    ))
                }
            }
        }
        if let Err(e) = poll.poll(&mut events, Some(Duration::from_millis(100))) {
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
        cx.now = Instant::now();
        for ev in events.iter() {
            let c = &mut conns[ev.token().0];
            match c.event(ev.is_readable(), ev.is_writable(), &mut scratch, &mut cx) {
                Step::BecameIdle | Step::Failed => {
                    settled += 1;
                    pending -= 1;
                }
                Step::Lost | Step::Nothing => {}
            }
        }
    }
    let open = conns.iter().filter(|c| c.state == State::Idle).count();
    Ok(IdleSet {
        _conns: conns,
        open,
        errors: (n - open) as u64,
        wrong: cx.stats.wrong,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_are_distinct_sized_and_checked() {
        let mut p = Payload::new(32);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        p.write(3, 7, &mut a);
        p.write(3, 8, &mut b);
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.iter().all(|c| c.is_ascii_graphic()));
        assert!(p.matches(3, 7, &a));
        assert!(!p.matches(3, 8, &a));
        a[20] ^= 1;
        assert!(!p.matches(3, 7, &a));
        let mut tiny = Payload::new(3);
        let mut t = Vec::new();
        tiny.write(12345, 1, &mut t);
        assert_eq!(t, b"123");
    }

    #[test]
    fn decode_reads_what_servers_send() {
        assert_eq!(decode(Proto::Text, b"ab\r\ncd"), Ok(Some((0, 2, 4))));
        assert_eq!(decode(Proto::Text, b"ab"), Ok(None));
        assert_eq!(decode(Proto::Frame, b"\0\0\0\x06hi!"), Ok(Some((4, 6, 6))));
        assert!(decode(Proto::Frame, b"\0\0\0\x02").is_err());
        assert_eq!(decode(Proto::Websocket, b"\x81\x02hi"), Ok(Some((2, 4, 4))));
        assert_eq!(decode(Proto::Websocket, b"\x81\x7e\x01"), Ok(None));
        assert!(decode(Proto::Websocket, b"\x88\x02\x03\xe8").is_err());
    }

    #[test]
    fn websocket_frames_are_masked() {
        let mut p = Payload::new(21);
        let mut out = Vec::new();
        encode(Proto::Websocket, 4, 1, &mut p, &mut out);
        assert_eq!(out[0], 0x81);
        assert_eq!(out[1], 0x80 | 21);
        let mask = &out[2..6];
        let plain: Vec<u8> = out[6..]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ mask[i % 4])
            .collect();
        assert!(p.matches(4, 1, &plain));
        assert!(plain.starts_with(b"4.1."));
    }
}
