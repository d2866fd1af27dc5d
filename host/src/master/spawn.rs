//! Starting a worker: fork+exec of our own binary in worker mode. The master
//! has threads (signal handling), so nothing but async-signal-safe calls may
//! run between fork and exec; the listening socket and the control socket
//! are moved to fixed descriptor numbers there.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use mio::net::UnixStream;
use nix::unistd::Pid;

use crate::config::WorkerConfig;
use crate::worker::{Spec, CONTROL_FD, LISTEN_FD, SPEC_ENV};

pub struct Child {
    pub pid: Pid,
    /// Master's end of the control socket, non-blocking.
    pub ctl: UnixStream,
}

pub fn worker(exe: &Path, cfg: &WorkerConfig, id: u32, listener: &OwnedFd) -> io::Result<Child> {
    let (ours, theirs) = StdUnixStream::pair()?;
    let spec = Spec {
        worker: cfg.clone(),
        id,
    };
    let spec = serde_json::to_string(&spec).map_err(io::Error::other)?;
    let listen_fd = listener.as_raw_fd();
    let ctl_fd = theirs.as_raw_fd();
    let mut cmd = Command::new(exe);
    cmd.arg("worker").env(SPEC_ENV, spec).stdin(Stdio::null());
    // SAFETY: only fcntl/dup2 run in the child before exec; both are
    // async-signal-safe. Both fds are first copied above 10 so that moving one
    // to 3 or 4 cannot overwrite the other, and dup2 onto a different number
    // clears close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            let l = libc::fcntl(listen_fd, libc::F_DUPFD, 10);
            let c = libc::fcntl(ctl_fd, libc::F_DUPFD, 10);
            if l < 0 || c < 0 || libc::dup2(l, LISTEN_FD) < 0 || libc::dup2(c, CONTROL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            libc::close(l);
            libc::close(c);
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    ours.set_nonblocking(true)?;
    Ok(Child {
        pid: Pid::from_raw(child.id() as i32),
        ctl: UnixStream::from_std(ours),
    })
}
