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

use crate::config::WorkerConfig;

/// Workerman's backlog; the kernel caps it at net.core.somaxconn.
const BACKLOG: i32 = 102_400;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {listen} (worker {name:?}): {source}")]
pub struct BindError {
    listen: String,
    name: String,
    source: io::Error,
}

fn new_socket(addr: SocketAddr) -> io::Result<Socket> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    Ok(s)
}

fn bind_all(w: &WorkerConfig) -> io::Result<Vec<OwnedFd>> {
    let mut addr = w.listen.addr;
    // SO_REUSEPORT would let us share a port with another process of the same
    // user; a plain bind first tells us whether anyone holds it.
    if addr.port() != 0 {
        let probe = new_socket(addr)?;
        probe.bind(&addr.into())?;
    }
    let mut fds = Vec::new();
    for _ in 0..w.count {
        let s = new_socket(addr)?;
        s.set_reuse_port(true)?;
        s.set_keepalive(true)?;
        s.bind(&addr.into())?;
        s.listen(BACKLOG)?;
        if addr.port() == 0 {
            // Port 0: the first socket picks the port, the others join it.
            addr = s.local_addr()?.as_socket().unwrap_or(addr);
        }
        fds.push(OwnedFd::from(s));
    }
    Ok(fds)
}

/// Binds `count` sockets for a group.
pub fn bind(w: &WorkerConfig) -> Result<Vec<OwnedFd>, BindError> {
    bind_all(w).map_err(|source| BindError {
        listen: w.listen.text.clone(),
        name: w.name.clone(),
        source,
    })
}
