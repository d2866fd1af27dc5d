//! One accepted connection: socket, decoder state and the send buffer.

use std::io::{self, IoSlice, Write};
use std::net::SocketAddr;
use std::time::Instant;

use super::sock::Sock;

use wm_proto::{Codec, Kind, ProtocolError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Outbound, waiting for the TCP handshake; sends are queued.
    Connecting,
    Open,
    /// Close once the send buffer is flushed; no more reading.
    Closing,
    /// Outbound and closed, its slot kept for a reconnect.
    Dead,
}

/// Messages up to this size go out with one `send` from a stack copy.
const SMALL_SEND: usize = 256;

pub struct Conn {
    pub id: u64,
    pub sock: Sock,
    pub codec: Codec,
    /// Unconsumed input: a partial message. Empty while idle.
    pub inbuf: Vec<u8>,
    out: Vec<u8>,
    out_pos: usize,
    pub state: State,
    /// `on_buffer_full` was raised; `on_buffer_drain` is owed.
    pub full: bool,
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// `pause_recv`: leave input in the kernel until resumed.
    pub paused: bool,
    /// `end()`: half-close once flushed instead of closing.
    pub ending: bool,
    /// Send buffer limit (the listener's, unless the plugin set one).
    pub max_send: usize,
    /// Last time anything arrived, for `idle_timeout`.
    pub last_active: Instant,
    /// When the request head or websocket handshake being read began
    /// (`header_timeout`); `None` when none is.
    pub head_since: Option<Instant>,
    /// When the incomplete message being read began (`message_timeout`).
    pub msg_since: Option<Instant>,
    /// Bytes of incomplete input this connection holds (kept input and
    /// joined websocket fragments), as counted in `Core::buffered`.
    pub held: usize,
    /// Set for connections the plugin opened.
    pub outbound: Option<Box<super::outbound::Outbound>>,
    /// `pipe`: input goes, as read, to this connection…
    pub pipe_to: Option<u64>,
    /// …and this connection's input comes here.
    pub pipe_from: Option<u64>,
    /// Paused by a pipe whose destination is full (not by the plugin).
    pub pipe_paused: bool,
    /// While its input is dispatched, replies are gathered and written
    /// with one syscall afterwards instead of one per message.
    pub corked: bool,
    /// Exported to a replacement that has not confirmed yet: neither read
    /// nor written (sends wait in the buffer) until it is resumed or gone.
    pub frozen: bool,
    /// Refused by the plugin's import: it never knew it, so no `on_close`.
    pub unknown: bool,
}

impl Conn {
    pub fn new(id: u64, sock: Sock, codec: Codec, max_send: usize) -> Conn {
        let remote = sock.peer_addr().ok();
        let local = sock.local_addr().ok();
        Conn {
            id,
            sock,
            codec,
            inbuf: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            state: State::Open,
            full: false,
            remote,
            local,
            bytes_read: 0,
            bytes_written: 0,
            paused: false,
            ending: false,
            max_send,
            last_active: Instant::now(),
            head_since: None,
            msg_since: None,
            held: 0,
            outbound: None,
            pipe_to: None,
            pipe_from: None,
            pipe_paused: false,
            corked: false,
            frozen: false,
            unknown: false,
        }
    }

    /// Open for the plugin: its protocol's handshake (websocket) and the
    /// TLS handshake are done.
    #[inline]
    pub fn established(&self) -> bool {
        self.codec.established() && !self.sock.handshaking()
    }

    /// Whether `Core::flush` (and `check_connect`) would do nothing on a
    /// writable event: open, no send buffer (so nothing queued and no
    /// memory to give back), no drain owed, no pipe to resume, and not TLS
    /// (its records are flushed there).
    #[inline]
    pub fn nothing_to_flush(&self) -> bool {
        self.state == State::Open
            && self.out.capacity() == 0
            && !self.full
            && self.pipe_from.is_none()
            && !self.sock.is_tls()
    }

    /// What waits in the send buffer (copied into a handover).
    pub fn output(&self) -> &[u8] {
        &self.out[self.out_pos..]
    }

    /// Output carried over from the previous worker, to go out first.
    pub fn set_output(&mut self, out: Vec<u8>) {
        self.out = out;
        self.out_pos = 0;
    }

    /// Lends the worker's reply buffer for one corked read, so gathering
    /// replies allocates nothing in steady state.
    /// Returns the buffer when this connection has one of its own.
    pub fn lend_out(&mut self, buf: Vec<u8>) -> Option<Vec<u8>> {
        if self.out.capacity() != 0 {
            return Some(buf);
        }
        self.out = buf;
        self.out_pos = 0;
        None
    }

    /// The lent buffer back, once everything in it was written.
    pub fn take_back_out(&mut self) -> Option<Vec<u8>> {
        (self.queued() == 0 && self.out.capacity() > 0).then(|| {
            self.out_pos = 0;
            std::mem::take(&mut self.out)
        })
    }

    /// Puts bytes ahead of what is queued (a handshake before early sends).
    pub fn prepend_output(&mut self, bytes: &[u8]) {
        let rest = self.out.split_off(self.out_pos);
        self.out.clear();
        self.out_pos = 0;
        self.out.extend_from_slice(bytes);
        self.out.extend_from_slice(&rest);
    }

    /// Bytes waiting to be sent: in the send buffer, and TLS records the
    /// socket did not take yet.
    #[inline]
    pub fn pending(&self) -> usize {
        self.queued() + self.sock.wire_pending()
    }

    /// Bytes in the send buffer (plaintext on TLS).
    #[inline]
    fn queued(&self) -> usize {
        self.out.len() - self.out_pos
    }

    /// Writes `parts` as one message: straight to the socket when nothing is
    /// queued (one syscall), the rest into the send buffer.
    /// Returns true when all of it went out.
    // Inlined: while a read is dispatched (corked) every reply lands here
    // and only appends to the buffer.
    #[inline]
    pub fn write_parts(&mut self, parts: &[&[u8]]) -> io::Result<bool> {
        // While connecting or corked, everything waits in the buffer.
        if self.pending() == 0 && self.state != State::Connecting && !self.corked {
            return self.write_parts_now(parts);
        }
        self.queue(parts, 0);
        Ok(self.pending() == 0)
    }

    /// Marks the send buffer full once it reached `max_send`; true the
    /// first time (the plugin hears `on_buffer_full` once per filling).
    #[inline(always)]
    pub fn note_full(&mut self) -> bool {
        if self.pending() >= self.max_send && !self.full {
            self.full = true;
            return true;
        }
        false
    }

    /// While corked (a read being dispatched): frames `data` with the
    /// connection's codec straight into the send buffer, as `write_parts`
    /// would queue `Codec::encode`'s parts. `None` when not corked, or
    /// when the codec cannot frame that way (see `Codec::encode_into`).
    #[inline]
    pub fn queue_message(&mut self, data: &[u8], kind: Kind) -> Option<Result<(), ProtocolError>> {
        if !self.corked {
            return None;
        }
        self.codec.encode_into(data, kind, &mut self.out)
    }

    /// `write_parts` with nothing queued: one syscall, the rest buffered.
    #[inline(never)]
    fn write_parts_now(&mut self, parts: &[&[u8]]) -> io::Result<bool> {
        debug_assert!(parts.len() <= 3);
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let written = if let [one] = parts {
            // Framed already (a broadcast): one plain `send`, no copy.
            write_now(|| self.sock.write(one))?
        } else if total <= SMALL_SEND && parts.len() > 1 {
            // Joined on the stack and sent with one plain `send`: cheaper
            // in the kernel than `writev` over the pieces, which shows
            // when one message goes to thousands of sockets.
            let mut small = [0u8; SMALL_SEND];
            let mut at = 0;
            for p in parts {
                small[at..at + p.len()].copy_from_slice(p);
                at += p.len();
            }
            write_now(|| self.sock.write(&small[..total]))?
        } else {
            let slices: [IoSlice<'_>; 3] = [
                IoSlice::new(parts.first().copied().unwrap_or_default()),
                IoSlice::new(parts.get(1).copied().unwrap_or_default()),
                IoSlice::new(parts.get(2).copied().unwrap_or_default()),
            ];
            write_now(|| self.sock.write_vectored(&slices))?
        };
        self.bytes_written += written as u64;
        self.queue(parts, written);
        Ok(self.pending() == 0)
    }

    /// Appends `parts` to the send buffer, less their first `skip` bytes
    /// (those were written).
    #[inline]
    fn queue(&mut self, parts: &[&[u8]], mut skip: usize) {
        for part in parts {
            if skip >= part.len() {
                skip -= part.len();
                continue;
            }
            self.out.extend_from_slice(&part[skip..]);
            skip = 0;
        }
    }

    /// Writes queued bytes. Returns true when the buffer is empty.
    // Inlined into `Core::flush`, its one caller on every read (measured:
    // left to itself, LLVM stopped inlining it once the worker grew).
    #[inline]
    pub fn flush(&mut self) -> io::Result<bool> {
        // TLS records already made go first (no-op otherwise).
        let wire_done = self.sock.flush_wire()?;
        while wire_done && self.queued() > 0 {
            match self.sock.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.out_pos += n;
                    self.bytes_written += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.queued() == 0 {
            if self.corked {
                // The worker's lent buffer: it takes it back right after.
                self.out.clear();
            } else {
                // Give the memory back: idle connections should cost little.
                self.out = Vec::new();
            }
            self.out_pos = 0;
            if self.state == State::Closing {
                // TLS: everything is encrypted; close_notify comes last.
                self.sock.close_notify();
            }
            return Ok(self.sock.wire_pending() == 0);
        }
        if self.out_pos > self.out.len() / 2 {
            self.out.drain(..self.out_pos);
            self.out_pos = 0;
        }
        Ok(false)
    }

    /// Closing: TLS says close_notify once all that is queued is sent.
    pub fn close_notify_when_flushed(&mut self) {
        if self.queued() == 0 {
            self.sock.close_notify();
        }
    }

    pub fn discard_output(&mut self) {
        self.out = Vec::new();
        self.out_pos = 0;
    }
}

/// One non-blocking write: the bytes taken, 0 when the socket is full.
fn write_now(mut write: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match write() {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
