//! A connection's socket: TCP, TLS over TCP, a unix stream or a udp peer.
//! Everything above reads, writes and polls it the same way, and sees
//! plaintext (`tls.rs` does the rest).

use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use std::rc::Rc;

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

use super::tls::TlsStream;

pub enum Sock {
    Tcp(TcpStream),
    /// An ssl listener's connection (boxed: rustls' state is large).
    Tls(Box<TlsStream>),
    Unix(UnixStream),
    /// A udp:// peer: what is written goes to it as one datagram from the
    /// listener's socket. It is never polled.
    Udp(Rc<std::net::UdpSocket>, SocketAddr),
}

impl Sock {
    /// A socket received in a handover: `unix` says which kind it is.
    pub fn from_fd(fd: OwnedFd, unix: bool) -> Sock {
        match unix {
            true => Sock::Unix(UnixStream::from_std(fd.into())),
            false => Sock::Tcp(TcpStream::from_std(fd.into())),
        }
    }

    pub fn is_unix(&self) -> bool {
        matches!(self, Sock::Unix(_))
    }

    pub fn is_udp(&self) -> bool {
        matches!(self, Sock::Udp(..))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Sock::Tls(_))
    }

    /// As `wm-host connections` shows it.
    pub fn transport(&self) -> &'static str {
        match self {
            Sock::Tcp(_) => "tcp",
            Sock::Tls(_) => "ssl",
            Sock::Unix(_) => "unix",
            Sock::Udp(..) => "udp",
        }
    }

    /// A TLS handshake is still running: the plugin does not know the
    /// connection yet.
    #[inline]
    pub fn handshaking(&self) -> bool {
        match self {
            Sock::Tls(t) => t.handshaking(),
            _ => false,
        }
    }

    /// True once, when a TLS handshake has just finished.
    #[inline]
    pub fn take_established(&mut self) -> bool {
        match self {
            Sock::Tls(t) => t.take_established(),
            _ => false,
        }
    }

    /// A short read did not empty it: read again (TLS after the peer's EOF).
    #[inline]
    pub fn more_to_read(&self) -> bool {
        match self {
            Sock::Tls(t) => t.more_to_read(),
            _ => false,
        }
    }

    /// TLS records made but not yet taken by the socket.
    #[inline]
    pub fn wire_pending(&self) -> usize {
        match self {
            Sock::Tls(t) => t.wire_pending(),
            _ => 0,
        }
    }

    /// Writes those records; true when none is left.
    #[inline]
    pub fn flush_wire(&mut self) -> io::Result<bool> {
        match self {
            Sock::Tls(t) => t.flush_wire(),
            _ => Ok(true),
        }
    }

    /// TLS: queues close_notify (once), before the socket is closed.
    pub fn close_notify(&mut self) {
        if let Sock::Tls(t) = self {
            t.close_notify();
        }
    }

    /// The peer's address (unix peers have none worth showing).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Sock::Tcp(s) => s.peer_addr(),
            Sock::Tls(t) => t.io.peer_addr(),
            Sock::Unix(_) => Err(io::ErrorKind::Unsupported.into()),
            Sock::Udp(_, to) => Ok(*to),
        }
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Sock::Tcp(s) => s.local_addr(),
            Sock::Tls(t) => t.io.local_addr(),
            Sock::Unix(_) => Err(io::ErrorKind::Unsupported.into()),
            Sock::Udp(s, _) => s.local_addr(),
        }
    }

    /// A udp:// peer has nothing to shut down (never the listener).
    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Tls(t) => t.io.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
            Sock::Udp(..) => Ok(()),
        }
    }

    pub fn take_error(&self) -> io::Result<Option<io::Error>> {
        match self {
            Sock::Tcp(s) => s.take_error(),
            Sock::Tls(t) => t.io.take_error(),
            Sock::Unix(s) => s.take_error(),
            Sock::Udp(..) => Ok(None),
        }
    }
}

/// One datagram to `to`. A full socket buffer drops it, as UDP may: it is
/// never queued for a writable event that a peer does not get.
fn send_datagram(s: &std::net::UdpSocket, to: SocketAddr, buf: &[u8]) -> io::Result<usize> {
    match s.send_to(buf, to) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(buf.len()),
        r => r,
    }
}

impl Read for Sock {
    #[inline]
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Tls(t) => t.read(buf),
            Sock::Unix(s) => s.read(buf),
            // Datagrams are read from the listener.
            Sock::Udp(..) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for Sock {
    #[inline]
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Tls(t) => t.write(buf),
            Sock::Unix(s) => s.write(buf),
            Sock::Udp(s, to) => send_datagram(s, *to, buf),
        }
    }

    #[inline]
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Tls(t) => t.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
            // One message is one datagram.
            Sock::Udp(s, to) => {
                let whole: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
                send_datagram(s, *to, &whole)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Tls(t) => t.io.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
            Sock::Udp(s, _) => s.as_raw_fd(),
        }
    }
}

impl Source for Sock {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.register(r, t, i),
            Sock::Tls(s) => s.io.register(r, t, i),
            Sock::Unix(s) => s.register(r, t, i),
            Sock::Udp(..) => Ok(()),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.reregister(r, t, i),
            Sock::Tls(s) => s.io.reregister(r, t, i),
            Sock::Unix(s) => s.reregister(r, t, i),
            Sock::Udp(..) => Ok(()),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.deregister(r),
            Sock::Tls(s) => s.io.deregister(r),
            Sock::Unix(s) => s.deregister(r),
            Sock::Udp(..) => Ok(()),
        }
    }
}

/// A listening socket inherited from the master: TCP or a unix stream.
pub enum Listener {
    Tcp(mio::net::TcpListener),
    Unix(mio::net::UnixListener),
    /// udp://: datagrams are read from it, and replies sent from a copy
    /// of it (shared by the peers).
    Udp(mio::net::UdpSocket, Rc<std::net::UdpSocket>),
}

impl Listener {
    /// The socket on `fd`, whichever kind it is, non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Listener> {
        use nix::sys::socket::{getsockname, getsockopt, sockopt, SockType, UnixAddr};
        let unix = getsockname::<UnixAddr>(fd.as_raw_fd()).is_ok_and(|a| a.path().is_some());
        let udp = getsockopt(&fd, sockopt::SockType).is_ok_and(|t| t == SockType::Datagram);
        Ok(if udp {
            let s = std::net::UdpSocket::from(fd);
            s.set_nonblocking(true)?;
            let replies = Rc::new(s.try_clone()?);
            Listener::Udp(mio::net::UdpSocket::from_std(s), replies)
        } else if unix {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            Listener::Unix(mio::net::UnixListener::from_std(l))
        } else {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Listener::Tcp(mio::net::TcpListener::from_std(l))
        })
    }

    pub fn accept(&self) -> io::Result<Sock> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Sock::Tcp(s)
            }),
            Listener::Unix(l) => l.accept().map(|(s, _)| Sock::Unix(s)),
            Listener::Udp(..) => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Source for Listener {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(s) => s.register(r, t, i),
            Listener::Unix(s) => s.register(r, t, i),
            Listener::Udp(s, _) => s.register(r, t, i),
        }
    }

    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Listener::Tcp(s) => s.reregister(r, t, i),
            Listener::Unix(s) => s.reregister(r, t, i),
            Listener::Udp(s, _) => s.reregister(r, t, i),
        }
    }

    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Listener::Tcp(s) => s.deregister(r),
            Listener::Unix(s) => s.deregister(r),
            Listener::Udp(s, _) => s.deregister(r),
        }
    }
}
