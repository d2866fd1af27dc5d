//! wm-baseline: what the hardware gives, for the benchmark suite.
//!
//! The same services the suite asks of wm-host — text, frame and websocket
//! echo, and an HTTP hello — served by one bare single-threaded `mio` loop per
//! process: no plugin, no ABI, no supervisor, no IPC. Built the way a careful
//! hand-written server would be: input is read into one per-process buffer and
//! a connection keeps only the bytes of an incomplete message; answers to one
//! read go out in one write, and only what the socket refuses is kept.
//!
//!     wm-baseline --proto websocket --listen 127.0.0.1:9000 [--procs 2]
//!
//! `--procs N` runs N such processes on one port with `SO_REUSEPORT`.
//! `--cert C --key K` speaks TLS (rustls, as wm-host's ssl listeners do):
//! `--proto websocket` is then wss echo and `--proto http` https (`tls.rs`).
//! `--proto ws-group` is the floor for broadcast fan-out: one process, the
//! test plugin's `join g` / `count g` / `gsend g <text>` commands over
//! websocket text messages, and a broadcast written to every member socket in
//! one pass (one frame built once, one `write` per socket).
//! Websocket: RFC 6455 handshake and unfragmented frames (masked, as clients
//! must send them), text checked for UTF-8, ping/pong and close; a fragmented
//! message closes the connection with 1003 (no client of the suite sends one).
//!
//! What wm-host's codecs already do is not written twice: requests (HTTP and
//! the websocket handshake) are parsed by `wm_proto::http::HttpDecoder`, the
//! handshake checked by `websocket::accept_key`, frames written by
//! `websocket::write_frame` and payloads unmasked by `websocket::apply_mask`.
//! What stays here is the lean loop around them, and answers built from
//! bytes prepared once.

use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::process::Command;

use clap::{Parser, ValueEnum};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use wm_proto::http::{self, HttpDecoder, Limits, Scratch};
use wm_proto::websocket::{accept_key, apply_mask, write_frame};

mod tls;
use tls::Stream;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Proto {
    /// One message per line (`\n` or `\r\n`).
    Text,
    /// 4-byte big-endian length (header included), then the payload.
    Frame,
    /// RFC 6455 echo: text and binary messages are sent back as they came.
    Websocket,
    /// HTTP/1.1 keep-alive: `200 Hello, world!` for every request, but
    /// `GET /plaintext` (TechEmpower's plaintext test), answered byte for
    /// byte as wm-host answers it for `bench-hello-plugin`.
    Http,
    /// Websocket with one group: `join g` (answered `ok`), `count g`,
    /// `gsend g <text>` (text to every member, the sender included).
    WsGroup,
    /// UDP echo: every datagram is sent back to its sender unchanged (a
    /// larger one than `--max-package-size` is dropped, as wm-host does).
    Udp,
}

#[derive(Parser, Debug)]
#[command(about = "Native echo / HTTP hello servers on a bare mio loop")]
struct Args {
    #[arg(long, value_enum)]
    proto: Proto,
    /// Address to listen on, e.g. 127.0.0.1:9000.
    #[arg(long)]
    listen: SocketAddr,
    /// Processes sharing the port with SO_REUSEPORT.
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// A larger message closes its connection (as wm-host's default).
    #[arg(long, default_value_t = 10 << 20)]
    max_package_size: usize,
    /// Set on the children of `--procs N`.
    #[arg(long, hide = true)]
    reuseport: bool,
    /// TLS: the certificate chain (PEM); needs `--key`.
    #[arg(long, requires = "key")]
    cert: Option<String>,
    /// TLS: the private key (PEM).
    #[arg(long, requires = "cert")]
    key: Option<String>,
}

const LISTENER: Token = Token(usize::MAX);
const READ_CHUNK: usize = 64 * 1024;
/// The length of an IMF-fixdate (`Thu, 01 Jan 2015 00:00:00 GMT`).
const DATE_LEN: usize = 29;

/// An HTTP answer prepared once: `before`, the `Date` value, `after`.
struct Canned {
    before: &'static [u8],
    after: &'static [u8],
}

impl Canned {
    fn write(&self, date: &[u8; DATE_LEN], out: &mut Vec<u8>) {
        out.extend_from_slice(self.before);
        out.extend_from_slice(date);
        out.extend_from_slice(self.after);
    }
}

/// `GET /plaintext`: what wm-host's `http::encode_head` writes for
/// `bench-hello-plugin`'s answer (`Content-Type: text/plain`, `Hello, World!`),
/// so both servers send the same bytes (a test checks it).
const PLAINTEXT: Canned = Canned {
    before: b"HTTP/1.1 200 OK\r\nServer: wm-host\r\nDate: ",
    after: b"\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\
             Connection: keep-alive\r\n\r\nHello, World!",
};
const PLAINTEXT_CLOSE: Canned = Canned {
    before: b"HTTP/1.1 200 OK\r\nServer: wm-host\r\nDate: ",
    after: b"\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\
             Connection: close\r\n\r\nHello, World!",
};
/// Any other request: `Hello, world!` (the benchmark plugin's `BODY`).
const HELLO_KEEP: Canned = Canned {
    before: b"HTTP/1.1 200 OK\r\nServer: wm-baseline\r\nDate: ",
    after: b"\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\
             Connection: keep-alive\r\n\r\nHello, world!",
};
const HELLO_CLOSE: Canned = Canned {
    before: b"HTTP/1.1 200 OK\r\nServer: wm-baseline\r\nDate: ",
    after: b"\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\
             Connection: close\r\n\r\nHello, world!",
};

struct Conn {
    sock: Stream,
    /// Bytes of an incomplete message; unallocated while there are none.
    input: Vec<u8>,
    /// Bytes the socket did not take yet; unallocated while there are none.
    output: Vec<u8>,
    /// Websocket: the handshake is done.
    open: bool,
    /// Close once `output` is written.
    closing: bool,
    /// `ws-group`: joined the group.
    member: bool,
}

/// What one process shares between its connections.
struct Shared {
    proto: Proto,
    max: usize,
    read_buf: Vec<u8>,
    out: Vec<u8>,
    /// The `Date` value, refreshed once per wake-up.
    dates: http::DateCache,
    date: [u8; DATE_LEN],
    /// `ws-group`: members, and a broadcast waiting to go out.
    members: usize,
    fanout: Option<Vec<u8>>,
}

fn main() {
    let args = Args::parse();
    let result = if args.proto == Proto::Udp {
        serve_udp(&args)
    } else if args.procs > 1 {
        spawn_children(&args)
    } else {
        serve(&args)
    };
    if let Err(e) = result {
        eprintln!("wm-baseline: {e}");
        std::process::exit(1);
    }
}

/// `--proto udp`: one blocking socket, `recv_from` then `send_to` the
/// same bytes, forever (no mio: a datagram socket needs no readiness loop).
fn serve_udp(args: &Args) -> io::Result<()> {
    let sock = std::net::UdpSocket::bind(args.listen)?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if n > args.max_package_size {
            continue;
        }
        let _ = sock.send_to(&buf[..n], peer);
    }
}

/// `--procs N`: N copies of this program on one port; waits for them all.
fn spawn_children(args: &Args) -> io::Result<()> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for _ in 0..args.procs {
        children.push(
            Command::new(&exe)
                .arg("--proto")
                .arg(
                    args.proto
                        .to_possible_value()
                        .expect("no skipped variants")
                        .get_name(),
                )
                .arg("--listen")
                .arg(args.listen.to_string())
                .arg("--max-package-size")
                .arg(args.max_package_size.to_string())
                .arg("--reuseport")
                .args(
                    (args.cert.iter().zip(&args.key)).flat_map(|(c, k)| ["--cert", c, "--key", k]),
                )
                .spawn()?,
        );
    }
    for mut c in children {
        c.wait()?;
    }
    Ok(())
}

fn bind(addr: SocketAddr, reuseport: bool) -> io::Result<TcpListener> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    if reuseport {
        s.set_reuse_port(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(4096)?;
    s.set_nonblocking(true)?;
    Ok(TcpListener::from_std(s.into()))
}

fn serve(args: &Args) -> io::Result<()> {
    if args.reuseport {
        // A child of `--procs N` ends with its parent.
        // SAFETY: prctl with an integer argument.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
    }
    let tls = match (&args.cert, &args.key) {
        (Some(c), Some(k)) => Some(tls::config(c, k, args.proto == Proto::Http)?),
        _ => None,
    };
    let mut listener = bind(args.listen, args.reuseport)?;
    let mut poll = Poll::new()?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)?;
    let mut conns: Slab<Conn> = Slab::new();
    let mut events = Events::with_capacity(1024);
    let mut sh = Shared {
        proto: args.proto,
        max: args.max_package_size,
        read_buf: vec![0; READ_CHUNK],
        out: Vec::with_capacity(2 * READ_CHUNK),
        dates: http::DateCache::default(),
        date: [b' '; DATE_LEN],
        members: 0,
        fanout: None,
    };
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if sh.proto == Proto::Http {
            // Formatted only when the second changes.
            let now = sh.dates.now().as_bytes();
            if now.len() == DATE_LEN {
                sh.date.copy_from_slice(now);
            }
        }
        for ev in events.iter() {
            if ev.token() == LISTENER {
                accept_all(&listener, &poll, &mut conns, tls.as_ref());
                continue;
            }
            let key = ev.token().0;
            let Some(conn) = conns.get_mut(key) else {
                continue;
            };
            if drive(conn, ev.is_readable(), ev.is_writable(), &mut sh) {
                let mut conn = conns.remove(key);
                sh.members -= usize::from(conn.member);
                let _ = poll.registry().deregister(conn.sock.tcp());
            }
            if let Some(text) = sh.fanout.take() {
                broadcast(&mut conns, &text);
            }
        }
    }
}

fn accept_all(
    listener: &TcpListener,
    poll: &Poll,
    conns: &mut Slab<Conn>,
    tls: Option<&std::sync::Arc<rustls::ServerConfig>>,
) {
    loop {
        match listener.accept() {
            Ok((mut sock, _)) => {
                let _ = sock.set_nodelay(true);
                let entry = conns.vacant_entry();
                let token = Token(entry.key());
                if poll
                    .registry()
                    .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
                    .is_ok()
                {
                    let sock = match tls {
                        Some(c) => match rustls::ServerConnection::new(c.clone()) {
                            Ok(t) => Stream::Tls(Box::new((sock, t))),
                            Err(_) => continue,
                        },
                        None => Stream::Plain(sock),
                    };
                    entry.insert(Conn {
                        sock,
                        input: Vec::new(),
                        output: Vec::new(),
                        open: false,
                        closing: false,
                        member: false,
                    });
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // EMFILE and friends: leave the rest queued for the next event.
            Err(_) => return,
        }
    }
}

/// Handles one readiness event; true when the connection is finished.
fn drive(conn: &mut Conn, readable: bool, writable: bool, sh: &mut Shared) -> bool {
    if writable && conn.sock.pump().is_err() {
        return true;
    }
    if writable && !conn.output.is_empty() && flush(conn).is_err() {
        return true;
    }
    if readable && !conn.closing {
        loop {
            let n = match conn.sock.read(&mut sh.read_buf) {
                Ok(0) => return true,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return true,
            };
            sh.out.clear();
            let close = if conn.input.is_empty() {
                let (used, close) = process(sh, conn, None, n);
                if used < n && !close {
                    conn.input.extend_from_slice(&sh.read_buf[used..n]);
                }
                close
            } else {
                conn.input.extend_from_slice(&sh.read_buf[..n]);
                let input = std::mem::take(&mut conn.input);
                let (used, close) = process(sh, conn, Some(&input), input.len());
                if used < input.len() && !close {
                    conn.input = input[used..].to_vec();
                }
                close
            };
            if send(conn, &sh.out).is_err() {
                return true;
            }
            if close {
                conn.closing = true;
                break;
            }
            // Edge-triggered epoll: a short read drained the socket, and data
            // arriving later raises a new event. Saves one read per event.
            if n < sh.read_buf.len() {
                break;
            }
        }
    }
    conn.closing && conn.output.is_empty()
}

/// Writes `data` unless older bytes still wait; keeps what the socket refuses.
fn send(conn: &mut Conn, data: &[u8]) -> io::Result<()> {
    if data.is_empty() {
        return Ok(());
    }
    if !conn.output.is_empty() {
        conn.output.extend_from_slice(data);
        return Ok(());
    }
    let mut done = 0;
    while done < data.len() {
        match conn.sock.write(&data[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    conn.output.extend_from_slice(&data[done..]);
    Ok(())
}

fn flush(conn: &mut Conn) -> io::Result<()> {
    let mut done = 0;
    while done < conn.output.len() {
        match conn.sock.write(&conn.output[done..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if done == conn.output.len() {
        conn.output = Vec::new();
    } else {
        conn.output.drain(..done);
    }
    Ok(())
}

/// Answers every complete message at the start of the input (`input`, or the
/// first `len` bytes of the read buffer) into `sh.out`. Returns the bytes
/// consumed, and whether the connection must close once `sh.out` is written.
fn process(sh: &mut Shared, conn: &mut Conn, input: Option<&[u8]>, len: usize) -> (usize, bool) {
    let data = match input {
        Some(d) => d,
        None => &sh.read_buf[..len],
    };
    let out = &mut sh.out;
    match sh.proto {
        Proto::Text => text(data, out, sh.max),
        Proto::Frame => frame(data, out, sh.max),
        Proto::Websocket | Proto::WsGroup => {
            let mut used = 0;
            if !conn.open {
                match ws_handshake(data, out) {
                    Handshake::Done(n) => {
                        conn.open = true;
                        used = n;
                    }
                    Handshake::Partial => return (0, data.len() > 16 * 1024),
                    Handshake::Refused => return (0, true),
                }
            }
            let mut group = (sh.proto == Proto::WsGroup).then_some(Group {
                member: &mut conn.member,
                members: &mut sh.members,
                fanout: &mut sh.fanout,
            });
            let (n, close) = ws_frames(&data[used..], out, sh.max, group.as_mut());
            (used + n, close)
        }
        Proto::Http => serve_http(data, out, &sh.date),
        Proto::Udp => unreachable!("udp is served by serve_udp"),
    }
}

fn text(data: &[u8], out: &mut Vec<u8>, max: usize) -> (usize, bool) {
    let mut pos = 0;
    while let Some(i) = data[pos..].iter().position(|&b| b == b'\n') {
        let mut line = &data[pos..pos + i];
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        out.extend_from_slice(line);
        out.push(b'\n');
        pos += i + 1;
    }
    (pos, data.len() - pos > max)
}

fn frame(data: &[u8], out: &mut Vec<u8>, max: usize) -> (usize, bool) {
    let mut pos = 0;
    while data.len() - pos >= 4 {
        let len = u32::from_be_bytes(data[pos..pos + 4].try_into().unwrap()) as usize;
        if !(4..=max).contains(&len) {
            return (pos, true);
        }
        if data.len() - pos < len {
            break;
        }
        // The answer is the message itself: same length, same payload.
        out.extend_from_slice(&data[pos..pos + len]);
        pos += len;
    }
    (pos, false)
}

enum Handshake {
    Done(usize),
    Partial,
    Refused,
}

fn ws_handshake(data: &[u8], out: &mut Vec<u8>) -> Handshake {
    let mut scratch = Scratch::new();
    let event = HttpDecoder::new().decode(data, &Limits::default(), &mut scratch);
    let (req, n) = match event {
        Ok(Some(http::Event::Request { request, consumed })) => (request, consumed),
        Ok(Some(http::Event::Continue) | None) => return Handshake::Partial,
        Err(e) => {
            refuse(out, e.status());
            return Handshake::Refused;
        }
    };
    match accept_key(req.method, req.version, |h| req.header(h)) {
        Ok(key) => {
            out.extend_from_slice(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                  Connection: Upgrade\r\nSec-WebSocket-Accept: ",
            );
            out.extend_from_slice(key.as_bytes());
            out.extend_from_slice(b"\r\n\r\n");
            Handshake::Done(n)
        }
        Err(refusal) => {
            refuse(out, refusal.status);
            Handshake::Refused
        }
    }
}

/// An empty answer with `status` that closes the connection.
fn refuse(out: &mut Vec<u8>, status: u16) {
    let _ = write!(
        out,
        "HTTP/1.1 {status} {}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        http::reason(status)
    );
}

fn ws_close(out: &mut Vec<u8>, code: u16) {
    write_frame(out, 8, &code.to_be_bytes(), None);
}

/// `ws-group`: one connection's view of the group.
struct Group<'a> {
    member: &'a mut bool,
    members: &'a mut usize,
    fanout: &'a mut Option<Vec<u8>>,
}

impl Group<'_> {
    /// Runs a command; the answer, if any, goes to `out`.
    fn command(&mut self, msg: &[u8], out: &mut Vec<u8>) {
        let answer = |out: &mut Vec<u8>, text: &[u8]| write_frame(out, 1, text, None);
        if msg == b"join g" {
            if !*self.member {
                *self.member = true;
                *self.members += 1;
            }
            answer(out, b"ok");
        } else if msg == b"count g" {
            answer(out, self.members.to_string().as_bytes());
        } else if let Some(text) = msg.strip_prefix(b"gsend g ") {
            *self.fanout = Some(text.to_vec());
        } else {
            answer(out, b"unknown command");
        }
    }
}

/// Writes one text frame of `text` to every member.
fn broadcast(conns: &mut Slab<Conn>, text: &[u8]) {
    let mut frame = Vec::with_capacity(text.len() + 10);
    write_frame(&mut frame, 1, text, None);
    for (_, c) in conns.iter_mut() {
        if c.member && !c.closing && send(c, &frame).is_err() {
            c.closing = true;
        }
    }
}

fn ws_frames(
    data: &[u8],
    out: &mut Vec<u8>,
    max: usize,
    mut group: Option<&mut Group<'_>>,
) -> (usize, bool) {
    let mut pos = 0;
    loop {
        let rest = &data[pos..];
        if rest.len() < 2 {
            return (pos, false);
        }
        let (b0, b1) = (rest[0], rest[1]);
        let (fin, opcode) = (b0 & 0x80 != 0, b0 & 0x0f);
        if b1 & 0x80 == 0 || b0 & 0x70 != 0 {
            ws_close(out, 1002);
            return (pos, true);
        }
        let (len, head) = match b1 & 0x7f {
            126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as u64, 4),
            127 if rest.len() >= 10 => (u64::from_be_bytes(rest[2..10].try_into().unwrap()), 10),
            126 | 127 => return (pos, false),
            n => (n as u64, 2),
        };
        if len > max as u64 {
            ws_close(out, 1009);
            return (pos, true);
        }
        let len = len as usize;
        let total = head + 4 + len;
        if rest.len() < total {
            return (pos, false);
        }
        let mask: [u8; 4] = rest[head..head + 4].try_into().unwrap();
        let payload = &rest[head + 4..total];
        pos += total;
        if !fin || opcode == 0 {
            ws_close(out, 1003);
            return (pos, true);
        }
        match opcode {
            1 | 2 | 9 => {
                let start = out.len();
                write_frame(out, if opcode == 9 { 10 } else { opcode }, payload, None);
                let body = out.len() - len;
                apply_mask(&mut out[body..], mask);
                if opcode == 1 && std::str::from_utf8(&out[body..]).is_err() {
                    out.truncate(start);
                    ws_close(out, 1007);
                    return (pos, true);
                }
                if let Some(g) = group.as_mut().filter(|_| opcode == 1) {
                    let msg = out.split_off(body);
                    out.truncate(start);
                    g.command(&msg, out);
                }
            }
            10 => {}
            8 => {
                let mut code = [0x03, 0xe8]; // 1000
                if len >= 2 {
                    code.copy_from_slice(&payload[..2]);
                    apply_mask(&mut code, mask);
                }
                ws_close(out, u16::from_be_bytes(code));
                return (pos, true);
            }
            _ => {
                ws_close(out, 1002);
                return (pos, true);
            }
        }
    }
}

/// Answers the complete requests at the start of `data`, parsed by
/// wm-proto's decoder (the one wm-host uses). A decoder is made per call: it
/// keeps nothing a connection needs, as it never consumes part of a request
/// and `data` holds every byte not yet consumed.
fn serve_http(data: &[u8], out: &mut Vec<u8>, date: &[u8; DATE_LEN]) -> (usize, bool) {
    let limits = Limits::default();
    let mut decoder = HttpDecoder::new();
    let mut pos = 0;
    while pos < data.len() {
        let mut scratch = Scratch::new();
        let (req, used) = match decoder.decode(&data[pos..], &limits, &mut scratch) {
            Ok(Some(http::Event::Request { request, consumed })) => (request, consumed),
            // No 100 Continue: no client of the suite asks for it.
            Ok(Some(http::Event::Continue) | None) => break,
            Err(e) => {
                refuse(out, e.status());
                return (pos, true);
            }
        };
        pos += used;
        let canned = match (req.path == "/plaintext", req.keep_alive) {
            (true, true) => &PLAINTEXT,
            (true, false) => &PLAINTEXT_CLOSE,
            (false, true) => &HELLO_KEEP,
            (false, false) => &HELLO_CLOSE,
        };
        canned.write(date, out);
        if !req.keep_alive {
            return (pos, true);
        }
    }
    (pos, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut v = vec![0x80 | opcode];
        assert!(payload.len() < 126);
        v.push(0x80 | payload.len() as u8);
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    #[test]
    fn text_keeps_incomplete_line() {
        let mut out = Vec::new();
        assert_eq!(text(b"ab\r\ncd\nef", &mut out, 100), (7, false));
        assert_eq!(out, b"ab\ncd\n");
    }

    #[test]
    fn frame_echoes_and_rejects_short_lengths() {
        let mut out = Vec::new();
        assert_eq!(frame(b"\0\0\0\x09jhdxr\0\0", &mut out, 100), (9, false));
        assert_eq!(out, b"\0\0\0\x09jhdxr");
        assert!(frame(b"\0\0\0\x02", &mut out, 100).1);
    }

    #[test]
    fn websocket_handshake_then_echo() {
        let mut req = b"GET / HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            .to_vec();
        let head = req.len();
        req.extend(masked(1, b"hello, websocket world"));
        let mut out = Vec::new();
        let Handshake::Done(n) = ws_handshake(&req, &mut out) else {
            panic!("handshake")
        };
        assert_eq!(n, head);
        assert!(String::from_utf8_lossy(&out).contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="));
        out.clear();
        assert_eq!(
            ws_frames(&req[n..], &mut out, 100, None),
            (req.len() - n, false)
        );
        assert_eq!(&out[2..], b"hello, websocket world");
        out.clear();
        assert!(ws_frames(&masked(1, &[0xff, 0xfe]), &mut out, 100, None).1);
        assert_eq!(out, [0x88, 2, 0x03, 0xef]); // 1007
    }

    #[test]
    fn http_answers_pipelined_requests() {
        let mut out = Vec::new();
        let date = [b'D'; DATE_LEN];
        let req = b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
        assert_eq!(serve_http(req, &mut out, &date), (req.len(), true));
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s.matches("Hello, world!").count(), 2);
        assert!(s.ends_with("Connection: close\r\n\r\nHello, world!"));
        // An incomplete request waits; a bad one is refused and closes.
        let mut out = Vec::new();
        assert_eq!(
            serve_http(b"GET / HTTP/1.1\r\nHo", &mut out, &date),
            (0, false)
        );
        assert_eq!(
            serve_http(b"GET / HTTP/1.1\r\n\r\n", &mut out, &date),
            (0, true)
        );
        assert!(out.starts_with(b"HTTP/1.1 400 Bad Request\r\n"));
    }

    /// The plaintext answer is, byte for byte, what wm-host writes for
    /// `bench-hello-plugin` (`respond(200, [Content-Type: text/plain],
    /// "Hello, World!")` through `http::encode_head`), kept alive or not.
    #[test]
    fn plaintext_is_what_wm_host_writes() {
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        for (keep_alive, canned) in [(true, &PLAINTEXT), (false, &PLAINTEXT_CLOSE)] {
            let mut host = Vec::new();
            let head = http::ResponseHead {
                status: 200,
                body_len: bench_hello_plugin::PLAINTEXT_BODY.len(),
                keep_alive,
                head_only: false,
            };
            let fields = bench_hello_plugin::PLAINTEXT_HEADERS.iter().copied();
            assert!(http::encode_head(&head, fields, date, &mut host));
            host.extend_from_slice(bench_hello_plugin::PLAINTEXT_BODY);
            let mut ours = Vec::new();
            canned.write(date.as_bytes().try_into().unwrap(), &mut ours);
            assert_eq!(String::from_utf8(ours), String::from_utf8(host));
        }
        // TechEmpower's request, pipelined.
        let one = b"GET /plaintext HTTP/1.1\r\nHost: tfb-server\r\nAccept: text/plain,text/html;\
q=0.9,application/xhtml+xml;q=0.9,application/xml;q=0.8,*/*;q=0.7\r\nConnection: keep-alive\r\n\r\n";
        let req = one.repeat(16);
        let mut out = Vec::new();
        let d = [b'D'; DATE_LEN];
        assert_eq!(serve_http(&req, &mut out, &d), (req.len(), false));
        assert_eq!(
            String::from_utf8(out)
                .unwrap()
                .matches("\r\n\r\nHello, World!")
                .count(),
            16
        );
    }

    #[test]
    fn group_commands_and_broadcast_frame() {
        let (mut member, mut members, mut fanout) = (false, 0, None);
        let mut g = Group {
            member: &mut member,
            members: &mut members,
            fanout: &mut fanout,
        };
        let mut wire = masked(1, b"join g");
        wire.extend(masked(1, b"join g"));
        wire.extend(masked(1, b"count g"));
        wire.extend(masked(1, b"gsend g hi"));
        let mut out = Vec::new();
        assert_eq!(
            ws_frames(&wire, &mut out, 100, Some(&mut g)),
            (wire.len(), false)
        );
        assert_eq!(
            out,
            [&[0x81, 2][..], b"ok", &[0x81, 2], b"ok", &[0x81, 1], b"1"].concat()
        );
        assert_eq!((member, members, fanout), (true, 1, Some(b"hi".to_vec())));
    }
}
