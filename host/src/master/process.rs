//! Worker processes at the system level: starting one (fork+exec of our own
//! binary in worker mode), reaping exits, signalling, reading memory use.
//!
//! The master has threads (signal handling, the file watcher, plugin
//! installs), so nothing but async-signal-safe calls may run between fork and
//! exec; the listening socket and the control socket are moved to fixed
//! descriptor numbers there.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use mio::net::UnixStream;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::builds::Build;
use crate::config::WorkerConfig;
use crate::logging::{LogFormat, WorkerLog, LOG_FD, LOG_FD_ENV, LOG_FORMAT_ENV};
use crate::worker::{Spec, BUS_FD, CONTROL_FD, HANDOVER_FD, LISTEN_FD, SPEC_ENV, TLS_FD};

pub struct Child {
    pub pid: Pid,
    /// Master's end of the control socket, non-blocking.
    pub ctl: UnixStream,
    /// Master's end of the bus socket, non-blocking.
    pub bus: UnixStream,
}

/// `build` is the plugin copy the worker loads (see `builds`), with the
/// certificate and key of an ssl listener.
pub fn spawn_worker(
    exe: &Path,
    cfg: &WorkerConfig,
    id: u32,
    build: &Build,
    listener: Option<&OwnedFd>,
    log: &WorkerLog,
    handover: Option<&OwnedFd>,
) -> io::Result<Child> {
    let (ours, theirs) = StdUnixStream::pair()?;
    let (bus_ours, bus_theirs) = StdUnixStream::pair()?;
    let spec = Spec {
        worker: cfg.clone(),
        id,
        load_from: build.copy.clone(),
        handover: handover.is_some(),
        tls: build.tls.is_some(),
        build: build.short().to_string(),
    };
    // The checked certificate and key, in memory only: see `tls`.
    let tls = build.tls.as_ref().map(|m| m.to_memfd()).transpose()?;
    let tls_fd = tls.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    let spec = serde_json::to_string(&spec).map_err(io::Error::other)?;
    // A worker without a listener gets nothing on its descriptor 3.
    let listen_fd = listener.map(|l| l.as_raw_fd()).unwrap_or(-1);
    let ctl_fd = theirs.as_raw_fd();
    let bus_fd = bus_theirs.as_raw_fd();
    // The daemon's log file, handed over open: a worker running as another
    // user could not open it by path.
    let log_fd = log.file.as_ref().map(|f| f.as_raw_fd()).unwrap_or(-1);
    let handover_fd = handover.map(|f| f.as_raw_fd()).unwrap_or(-1);
    let run_as = cfg.run_as;
    let mut cmd = Command::new(exe);
    cmd.arg("worker").env(SPEC_ENV, spec).stdin(Stdio::null());
    // Only the master speaks to systemd (NotifyAccess=main).
    cmd.env_remove("NOTIFY_SOCKET");
    if log_fd >= 0 {
        cmd.env(LOG_FD_ENV, LOG_FD.to_string());
    }
    if log.format == LogFormat::Json {
        cmd.env(LOG_FORMAT_ENV, "json");
    }
    // SAFETY: only fcntl/dup2/setgroups/setgid/setuid run in the child
    // before exec; all are async-signal-safe syscalls. The fds are first
    // copied above 10 so that moving one to 3..8 cannot overwrite another,
    // and dup2 onto a different number clears close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            let from = [listen_fd, ctl_fd, bus_fd, log_fd, handover_fd, tls_fd];
            let to = [LISTEN_FD, CONTROL_FD, BUS_FD, LOG_FD, HANDOVER_FD, TLS_FD];
            let mut high = [-1; 6];
            for (h, &f) in high.iter_mut().zip(&from) {
                if f < 0 {
                    continue;
                }
                *h = libc::fcntl(f, libc::F_DUPFD_CLOEXEC, 10);
                if *h < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (h, t) in high.into_iter().zip(to) {
                if h >= 0 && libc::dup2(h, t) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some((uid, gid)) = run_as {
                // Group first: once the user changes, it no longer may.
                if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(tls);
    drop(theirs);
    drop(bus_theirs);
    ours.set_nonblocking(true)?;
    bus_ours.set_nonblocking(true)?;
    Ok(Child {
        pid: Pid::from_raw(child.id() as i32),
        ctl: UnixStream::from_std(ours),
        bus: UnixStream::from_std(bus_ours),
    })
}

/// A child that exited.
pub struct Exit {
    pub pid: Pid,
    /// `exit code N` or `signal SIGNAME`, as logs and `status` show it.
    pub how: String,
    /// Exit code 0.
    pub clean: bool,
    /// It ended by itself: an exit code, or a signal a process raises
    /// against itself (a crash). False for signals sent from outside.
    pub by_itself: bool,
}

/// Signals a process gets from its own faults or calls (a crash, `abort`),
/// as opposed to one sent by someone else (SIGKILL, SIGTERM…).
fn self_inflicted(sig: Signal) -> bool {
    matches!(
        sig,
        Signal::SIGSEGV
            | Signal::SIGBUS
            | Signal::SIGABRT
            | Signal::SIGILL
            | Signal::SIGFPE
            | Signal::SIGSYS
            | Signal::SIGTRAP
    )
}

/// Every child that has exited since the last call (after SIGCHLD).
pub fn reap() -> Vec<Exit> {
    let mut out = Vec::new();
    loop {
        let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return out,
            Ok(s) => s,
        };
        match status {
            WaitStatus::Exited(pid, code) => out.push(Exit {
                pid,
                how: format!("exit code {code}"),
                clean: code == 0,
                by_itself: true,
            }),
            WaitStatus::Signaled(pid, sig, _) => out.push(Exit {
                pid,
                how: format!("signal {sig}"),
                clean: false,
                by_itself: self_inflicted(sig),
            }),
            _ => {}
        }
    }
}

/// SIGKILL; a process already gone is not an error worth reporting.
pub fn kill_now(pid: Pid) {
    let _ = kill(pid, Signal::SIGKILL);
}

/// Resident memory of a process, from /proc.
pub fn rss_bytes(pid: Pid) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}
