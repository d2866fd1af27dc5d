//! A TLS connection on the worker's loop: `rustls::ServerConnection`, sans
//! IO, fed from the socket by `Read` and `Write` on [`TlsStream`], so that
//! the codecs and the plugin above see plaintext.
//!
//! Reading drains the socket (edge-triggered epoll gives no second notice):
//! ciphertext goes into rustls (`read_tls`, `process_new_packets`), which
//! answers the handshake by itself; plaintext comes out of `reader()` into
//! the caller's buffer. A read that returns less than the buffer holds
//! means the socket had nothing more.
//!
//! Writing encrypts the caller's plaintext (`writer()`, one record for a
//! small multi-part message) and writes the records to the socket at once
//! (`write_tls`). Records the socket does not take wait in `wire`, owned
//! here so their size is known (`Conn::pending` counts them), and go out
//! before anything else; while they wait no more plaintext is taken, so
//! unsent data stays plaintext in the connection's buffer, bounded by its
//! `max_send_buffer_size` as before.

use std::io::{self, IoSlice, Read, Write};

use mio::net::TcpStream;
use rustls::ServerConnection;

/// Bytes of the client's first flight kept to tell plain HTTP from TLS.
const SNIFF: usize = 8;

/// The answer to plain HTTP on a TLS port (as nginx answers it).
const PLAIN_HTTP: &[u8] = b"HTTP/1.1 400 Bad Request\r\n\
Content-Type: text/plain\r\n\
Content-Length: 46\r\n\
Connection: close\r\n\r\n\
The plain HTTP request was sent to HTTPS port\n";

/// Why a TLS connection failed: the log line says it.
#[derive(Debug)]
pub struct TlsFailure(pub String);

impl std::fmt::Display for TlsFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsFailure {}

pub struct TlsStream {
    pub io: TcpStream,
    tls: ServerConnection,
    /// Records made but not yet taken by the socket, from `wire_pos`.
    wire: Vec<u8>,
    wire_pos: usize,
    /// The first bytes the client sent (up to [`SNIFF`]).
    first: [u8; SNIFF],
    first_len: u8,
    /// The plugin was told the handshake is done (see `take_established`).
    told: bool,
    /// close_notify is queued.
    notified: bool,
    /// The peer closed its side (EOF read).
    eof: bool,
}

/// Reads from the socket, keeping a copy of the client's first bytes.
struct Sniff<'a> {
    io: &'a mut TcpStream,
    first: &'a mut [u8; SNIFF],
    first_len: &'a mut u8,
}

impl Read for Sniff<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.io.read(buf)?;
        let have = usize::from(*self.first_len);
        if have < SNIFF {
            let take = (SNIFF - have).min(n);
            self.first[have..have + take].copy_from_slice(&buf[..take]);
            *self.first_len += take as u8;
        }
        Ok(n)
    }
}

impl TlsStream {
    pub fn new(io: TcpStream, tls: ServerConnection) -> TlsStream {
        TlsStream {
            io,
            tls,
            wire: Vec::new(),
            wire_pos: 0,
            first: [0; SNIFF],
            first_len: 0,
            told: false,
            notified: false,
            eof: false,
        }
    }

    pub fn handshaking(&self) -> bool {
        self.tls.is_handshaking()
    }

    /// True once, when the handshake has finished: the plugin hears
    /// `on_connect` then.
    pub fn take_established(&mut self) -> bool {
        if self.told || self.tls.is_handshaking() {
            return false;
        }
        self.told = true;
        true
    }

    /// The peer closed, or rustls still holds plaintext: read again even
    /// after a short read.
    pub fn more_to_read(&self) -> bool {
        self.eof
    }

    /// Ciphertext waiting for the socket.
    pub fn wire_pending(&self) -> usize {
        self.wire.len() - self.wire_pos
    }

    /// Writes waiting ciphertext. Returns true when none is left.
    pub fn flush_wire(&mut self) -> io::Result<bool> {
        while self.wire_pos < self.wire.len() {
            match self.io.write(&self.wire[self.wire_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wire_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if !self.wire.is_empty() {
            // Idle connections keep no buffer.
            self.wire = Vec::new();
            self.wire_pos = 0;
        }
        Ok(true)
    }

    /// Moves what rustls made (records, alerts, handshake messages) to the
    /// socket; what it does not take, to `wire`.
    fn push(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            if self.wire_pending() > 0 {
                // Behind what waits already.
                self.tls.write_tls(&mut self.wire)?;
                continue;
            }
            match self.tls.write_tls(&mut self.io) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.wire_pos = 0;
                    self.wire.clear();
                    self.tls.write_tls(&mut self.wire)?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Queues close_notify (once) and writes it when the socket takes it.
    pub fn close_notify(&mut self) {
        if self.notified || self.tls.is_handshaking() {
            return;
        }
        self.notified = true;
        self.tls.send_close_notify();
        let _ = self.push();
    }

    /// The client's first bytes look like an HTTP request line.
    fn plain_http(&self) -> bool {
        let first = &self.first[..usize::from(self.first_len)];
        let method_len = first.iter().take_while(|b| b.is_ascii_uppercase()).count();
        method_len >= 3 && first.get(method_len) == Some(&b' ')
    }

    /// The handshake or a record failed: rustls' alert goes out (or a 400 in
    /// plaintext to plain HTTP), and the error says why.
    fn failed(&mut self, e: rustls::Error) -> io::Error {
        let why = if self.tls.is_handshaking() && self.plain_http() {
            let _ = self.io.write(PLAIN_HTTP);
            let _ = self.io.shutdown(std::net::Shutdown::Write);
            // Read what is left of the request, so closing sends a FIN
            // rather than a reset that could destroy the answer.
            let mut sink = [0u8; 4096];
            for _ in 0..16 {
                match self.io.read(&mut sink) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
            "plain HTTP request sent to a TLS port: answered 400".to_string()
        } else {
            let _ = self.push();
            match self.tls.is_handshaking() {
                true => format!("TLS handshake failed: {e}"),
                false => format!("TLS error: {e}"),
            }
        };
        io::Error::new(io::ErrorKind::InvalidData, TlsFailure(why))
    }
}

impl Read for TlsStream {
    /// Plaintext, until `buf` is full or the socket has nothing more.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = 0;
        loop {
            match self.tls.reader().read(&mut buf[n..]) {
                // close_notify: the end, once what came before is taken.
                Ok(0) => return Ok(n),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // EOF without close_notify: an end all the same.
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(n),
                Err(e) => return Err(e),
            }
            if n == buf.len() {
                return Ok(n);
            }
            let mut src = Sniff {
                io: &mut self.io,
                first: &mut self.first,
                first_len: &mut self.first_len,
            };
            match self.tls.read_tls(&mut src) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return match n {
                        0 => Err(e),
                        n => Ok(n),
                    };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            if let Err(e) = self.tls.process_new_packets() {
                return Err(self.failed(e));
            }
            // Handshake messages, tickets, alerts.
            self.push()?;
        }
    }
}

impl Write for TlsStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// Encrypts as much of `bufs` as the socket takes, in records of up
    /// to 16 KiB (a small multi-part message is one record). Nothing is
    /// taken while earlier records wait or the handshake runs.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if !self.flush_wire()? || self.tls.is_handshaking() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let mut done = 0;
        while done < total && self.wire_pending() == 0 {
            let k = if done == 0 {
                self.tls.writer().write_vectored(bufs)?
            } else {
                // Rare: more than rustls takes at once (64 KiB).
                let (i, off) = position(bufs, done);
                self.tls.writer().write(&bufs[i][off..])?
            };
            if k == 0 {
                break;
            }
            done += k;
            self.push()?;
        }
        Ok(done)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.flush_wire().map(drop)
    }
}

/// Which slice and offset `done` bytes into `bufs` fall at.
fn position(bufs: &[IoSlice<'_>], mut done: usize) -> (usize, usize) {
    for (i, b) in bufs.iter().enumerate() {
        if done < b.len() {
            return (i, done);
        }
        done -= b.len();
    }
    (bufs.len().saturating_sub(1), 0)
}
