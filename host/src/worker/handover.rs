//! The handover socket and its messages (the wire part of live handover;
//! the steps are in `migrate.rs`).
//!
//! Live handover on reload: an old worker gives its established
//! connections (the sockets, unread input, unsent output, codec state,
//! counters) and its plugin's exported state to its replacement, which
//! imports them into the new build and carries on. Nobody reconnects.
//!
//! The master sets it up (see `master/mod.rs`, `Action::Handover`): the
//! replacement starts with one end of a unix socket pair on
//! [`HANDOVER_FD`], and reports ready without accepting. The old worker gets
//! the other end with `ToWorker::Handover` (SCM_RIGHTS), and both get a
//! `Cut` marker on their bus at the same point of the relay's order.
//!
//! 1. Old worker, at the `Cut`: stops accepting, freezes the connections it
//!    can move (they are neither read nor written; sends to them wait in
//!    their buffers), runs `on_export` and `on_export_conn`, writes
//!    `Exported` on its bus and sends everything, descriptors attached, on
//!    the socket. Connections it cannot move (outbound ones, pipes, HTTP
//!    requests still owed an answer) stay and are closed cleanly later.
//! 2. New worker, once it has the whole export and its own `Cut`: runs
//!    `on_import` and `on_import_conn` per connection, answers `Taken`, then
//!    reads, writes and accepts. Bus frames it held meanwhile are delivered
//!    in order: those before the `Cut` to everyone but the adopted
//!    connections (the old worker delivered those), those after to all.
//! 3. Old worker, on `Taken`: forgets the moved connections without a
//!    close (their descriptors are the new worker's now). On `Abort`, or if
//!    the socket closes first (the new build failed to import, died or was
//!    killed for being late), it resumes every frozen connection: nothing
//!    was read or written meanwhile, so nothing is lost.
//!
//! Connections keep their bus gid (old pid, old id), so group memberships
//! and uid bindings stay valid everywhere without a message; the master
//! moves the old worker's node to the new one (`master/relay.rs`).

use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

use crate::bus::Gid;
use crate::plugin::BuildInfo;
use wm_proto::Codec;

/// The descriptor a replacement finds its end of the handover socket on.
pub const HANDOVER_FD: i32 = 7;
/// Connections per message: their descriptors go in one SCM_RIGHTS
/// message, and the kernel takes at most 253 there.
pub const BATCH: usize = 200;
/// How long a send may wait for a peer that does not read.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Messages larger than this are refused (a peer gone wrong).
const MAX_MSG: usize = 1 << 30;

/// One connection on its way (the sender's view borrows it).
#[derive(Serialize)]
pub struct RecordRef<'a> {
    pub gid: Gid,
    pub codec: &'a Codec,
    pub inbuf: &'a [u8],
    pub out: &'a [u8],
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub paused: bool,
    pub max_send: u64,
    pub full: bool,
    /// A unix stream, not TCP.
    pub unix: bool,
}

/// One connection as received; the same fields as [`RecordRef`].
#[derive(Deserialize)]
pub struct Record {
    pub gid: Gid,
    pub codec: Codec,
    pub inbuf: Vec<u8>,
    pub out: Vec<u8>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    pub paused: bool,
    pub max_send: u64,
    pub full: bool,
    /// A unix stream, not TCP.
    pub unix: bool,
}

#[derive(Serialize, Deserialize)]
pub enum Msg {
    /// Old to new, first: the build and the plugin's worker state.
    Header {
        from: BuildInfo,
        /// False when the old build does not take part (it keeps and
        /// drains its connections, and the new build imports nothing).
        exported: bool,
        state: Vec<u8>,
        conns: u64,
    },
    /// Old to new: per connection a postcard [`Record`] and the plugin's
    /// bytes for it, with as many descriptors attached, in the same order.
    Conns(Vec<(Vec<u8>, Vec<u8>)>),
    /// Old to new, last: how many connections stay behind.
    End { kept: u64 },
    /// New to old: every descriptor is taken; forget them.
    Taken,
    /// New to old: resume them all.
    Abort { why: String },
}

/// A message and the descriptors that came with it.
pub type Received = (Msg, Vec<OwnedFd>);

/// A handover socket: framed messages (4-byte length, then postcard),
/// descriptors attached to the message they belong to. Reads never block;
/// sends wait up to [`SEND_TIMEOUT`].
pub struct Channel {
    sock: UnixStream,
    inbuf: Vec<u8>,
    fds: VecDeque<OwnedFd>,
}

impl Channel {
    pub fn new(sock: UnixStream) -> io::Result<Channel> {
        sock.set_nonblocking(true)?;
        Ok(Channel {
            sock,
            inbuf: Vec::new(),
            fds: VecDeque::new(),
        })
    }

    pub fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    /// Sends one message with `fds` attached to its first byte.
    pub fn send(&mut self, msg: &Msg, fds: &[RawFd]) -> io::Result<()> {
        let body = postcard::to_allocvec(msg).map_err(io::Error::other)?;
        let mut frame = Vec::with_capacity(body.len() + 4);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        let deadline = Instant::now() + SEND_TIMEOUT;
        let mut sent = loop {
            let rights = [ControlMessage::ScmRights(fds)];
            let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
            match sendmsg::<()>(
                self.sock.as_raw_fd(),
                &[IoSlice::new(&frame)],
                cmsgs,
                MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) => break n,
                Err(nix::errno::Errno::EAGAIN) => wait(&self.sock, libc::POLLOUT, deadline)?,
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        };
        while sent < frame.len() {
            match self.sock.write(&frame[sent..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    wait(&self.sock, libc::POLLOUT, deadline)?
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what is available. Returns the complete messages with their
    /// descriptors, and whether the peer closed.
    pub fn recv(&mut self) -> io::Result<(Vec<Received>, bool)> {
        let mut chunk = vec![0u8; 256 * 1024];
        let mut cmsg = nix::cmsg_space!([RawFd; 253]);
        let closed = loop {
            let mut iov = [IoSliceMut::new(&mut chunk)];
            let got = recvmsg::<()>(
                self.sock.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_CMSG_CLOEXEC,
            );
            let (n, fds) = match got {
                Ok(m) => {
                    let mut fds = Vec::new();
                    for c in m.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(r) = c {
                            fds.extend(r);
                        }
                    }
                    (m.bytes, fds)
                }
                Err(nix::errno::Errno::EAGAIN) => break false,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            // SAFETY: the kernel just created these descriptors for us.
            self.fds
                .extend(fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            if n == 0 {
                break true;
            }
            self.inbuf.extend_from_slice(&chunk[..n]);
        };
        let mut out = Vec::new();
        let mut pos = 0;
        while let Some(head) = self.inbuf[pos..].first_chunk::<4>() {
            let len = u32::from_be_bytes(*head) as usize;
            if len > MAX_MSG {
                return Err(io::Error::other(format!("handover message of {len} bytes")));
            }
            if self.inbuf.len() - pos - 4 < len {
                break;
            }
            let body = &self.inbuf[pos + 4..pos + 4 + len];
            let msg: Msg = postcard::from_bytes(body).map_err(io::Error::other)?;
            pos += 4 + len;
            let wanted = match &msg {
                Msg::Conns(records) => records.len(),
                _ => 0,
            };
            if self.fds.len() < wanted {
                return Err(io::Error::other(format!(
                    "{wanted} connections came with {} descriptors",
                    self.fds.len()
                )));
            }
            out.push((msg, self.fds.drain(..wanted).collect()));
        }
        self.inbuf.drain(..pos);
        Ok((out, closed))
    }
}

/// Waits until `sock` is ready for `events`, or fails at `deadline`.
fn wait(sock: &UnixStream, events: libc::c_short, deadline: Instant) -> io::Result<()> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the other worker does not read",
        ));
    }
    let mut p = libc::pollfd {
        fd: sock.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(())
}

/// Writes all of `buf` to a non-blocking stream, waiting for room up to
/// `timeout` (the bus before `Ready`: what the worker sent while starting
/// must reach the master before the handover's cut).
pub fn write_all_within(
    sock: &mut mio::net::UnixStream,
    buf: &mut Vec<u8>,
    timeout: Duration,
) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    while !buf.is_empty() {
        match sock.write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                buf.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                let mut p = libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut p, 1, left.as_millis().max(1) as i32) };
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads from a unix stream with `recvmsg`, keeping descriptors that come
/// with the bytes (the master sends the handover socket this way on the
/// control channel).
pub struct FdReader<'a> {
    pub sock: &'a mio::net::UnixStream,
    pub fds: &'a mut VecDeque<OwnedFd>,
}

impl Read for FdReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut cmsg = nix::cmsg_space!([RawFd; 4]);
        let mut iov = [IoSliceMut::new(buf)];
        let m = recvmsg::<()>(
            self.sock.as_raw_fd(),
            &mut iov,
            Some(&mut cmsg),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        for c in m.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(r) = c {
                // SAFETY: the kernel just created these descriptors for us.
                self.fds
                    .extend(r.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
            }
        }
        Ok(m.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_descriptors_in_order() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut tx, mut rx) = (Channel::new(a).unwrap(), Channel::new(b).unwrap());
        let files: Vec<std::fs::File> = (0..3).map(|_| tempfile::tempfile().unwrap()).collect();
        for (i, f) in files.iter().enumerate() {
            f.set_len(i as u64 + 10).unwrap();
        }
        tx.send(
            &Msg::Header {
                from: BuildInfo {
                    name: "p".into(),
                    version: "1".into(),
                    hash: "h".into(),
                },
                exported: true,
                state: vec![1, 2, 3],
                conns: 3,
            },
            &[],
        )
        .unwrap();
        let fds: Vec<RawFd> = files.iter().map(|f| f.as_raw_fd()).collect();
        let rec = |i: u8| (vec![i], vec![]);
        tx.send(&Msg::Conns(vec![rec(0), rec(1)]), &fds[..2])
            .unwrap();
        tx.send(&Msg::Conns(vec![rec(2)]), &fds[2..]).unwrap();
        tx.send(&Msg::End { kept: 1 }, &[]).unwrap();
        drop(tx);
        let (msgs, closed) = rx.recv().unwrap();
        assert!(closed);
        assert_eq!(msgs.len(), 4);
        let mut sizes = Vec::new();
        for (m, fds) in msgs {
            if let Msg::Conns(r) = m {
                assert_eq!(r.len(), fds.len());
                for fd in fds {
                    sizes.push(std::fs::File::from(fd).metadata().unwrap().len());
                }
            }
        }
        // The very files sent, in order.
        assert_eq!(sizes, [10, 11, 12]);
    }
}
