//! Binding listeners in the master, before any worker starts.
//!
//! Each worker id of a group gets its own `SO_REUSEPORT` socket, held open by
//! the master for its whole life and inherited by whichever process runs that
//! id. The kernel spreads connections over the sockets (no thundering herd:
//! one process waits on each), and since the master never closes them a
//! worker that stops or is replaced never drops the connections still queued
//! on its socket: the next process for that id accepts them.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::{Transport, UnixPerms, WorkerConfig};

/// Workerman's backlog; the kernel caps it at net.core.somaxconn.
const BACKLOG: i32 = 102_400;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {listen} (worker {name:?}): {source}")]
pub struct BindError {
    listen: String,
    name: String,
    source: io::Error,
}

fn new_socket(addr: SocketAddr, udp: bool) -> io::Result<Socket> {
    let s = match udp {
        true => Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?,
        false => Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?,
    };
    // TCP: so a port in TIME_WAIT can be bound again. Not UDP: there
    // SO_REUSEADDR lets two sockets share the port, so the plain probe bind
    // would not see another process holding it.
    if !udp {
        s.set_reuse_address(true)?;
    }
    Ok(s)
}

fn bind_all(w: &WorkerConfig) -> io::Result<Vec<OwnedFd>> {
    let Some(listen) = &w.listen else {
        return Ok(Vec::new());
    };
    if let (Transport::Unix, Some(path)) = (listen.transport, &listen.path) {
        return bind_unix(path, w.unix.as_ref(), w.count);
    }
    let udp = listen.transport == Transport::Udp;
    let mut addr = listen.addr;
    // SO_REUSEPORT would let us share a port with another process of the same
    // user; a plain bind first tells us whether anyone holds it.
    if addr.port() != 0 {
        let probe = new_socket(addr, udp)?;
        probe.bind(&addr.into())?;
    }
    let mut fds = Vec::new();
    for _ in 0..w.count {
        let s = new_socket(addr, udp)?;
        s.set_reuse_port(true)?;
        s.bind(&addr.into())?;
        if !udp {
            s.set_keepalive(true)?;
            s.listen(BACKLOG)?;
        }
        if addr.port() == 0 {
            // Port 0: the first socket picks the port, the others join it.
            addr = s.local_addr()?.as_socket().unwrap_or(addr);
        }
        fds.push(OwnedFd::from(s));
    }
    Ok(fds)
}

/// A unix stream listener: one socket, shared by the group's workers (the
/// kernel hands each connection to one of them). A socket file left by a
/// master that died is replaced; one that answers is someone else's.
fn bind_unix(path: &Path, perms: Option<&UnixPerms>, count: u32) -> io::Result<Vec<OwnedFd>> {
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = std::os::unix::net::UnixListener::bind(path)?;
    if let Some(p) = perms {
        if let Some(mode) = p.mode {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        }
        if p.uid.is_some() || p.gid.is_some() {
            std::os::unix::fs::chown(path, p.uid, p.gid)?;
        }
    }
    let fd = OwnedFd::from(l);
    (0..count).map(|_| fd.try_clone()).collect()
}

/// Binds `count` sockets for a group (none for a group without `listen`).
pub fn bind(w: &WorkerConfig) -> Result<Vec<OwnedFd>, BindError> {
    bind_all(w).map_err(|source| BindError {
        listen: w.listen_text().to_string(),
        name: w.name.clone(),
        source,
    })
}

/// `wm-host check`: whether `w`'s listener could be bound now, without
/// keeping anything. A plain bind, without SO_REUSEPORT (like the master's
/// own first probe): with it, a bind next to any process of the same user
/// that listens with SO_REUSEPORT would succeed and the kernel would split
/// connections between them. A unix socket file is created and removed
/// only if none is there; a stale one passes (the master replaces it).
pub fn probe(w: &WorkerConfig) -> Result<(), BindError> {
    let result = (|| -> io::Result<()> {
        let Some(listen) = &w.listen else {
            return Ok(());
        };
        if let (Transport::Unix, Some(path)) = (listen.transport, &listen.path) {
            if path.exists() {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{} is in use by another process", path.display()),
                    ));
                }
                return Ok(());
            }
            std::os::unix::net::UnixListener::bind(path)?;
            return std::fs::remove_file(path);
        }
        let udp = listen.transport == Transport::Udp;
        let s = new_socket(listen.addr, udp)?;
        s.bind(&listen.addr.into())
    })();
    result.map_err(|source| BindError {
        listen: w.listen_text().to_string(),
        name: w.name.clone(),
        source,
    })
}

impl BindError {
    pub fn in_use(&self) -> bool {
        self.source.kind() == io::ErrorKind::AddrInUse
    }
}

/// Removes the socket files of unix:// listeners (the master stops).
pub fn remove_unix_files(workers: &[WorkerConfig]) {
    for w in workers {
        if let Some(path) = w.listen.as_ref().and_then(|l| l.path.as_ref()) {
            let _ = std::fs::remove_file(path);
        }
    }
}
