//! The runtime dir: the pid file, locked for the master's whole life so a
//! second master for the same dir is refused, and found by the CLI.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;

use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::config::Config;

pub struct PidLock {
    path: PathBuf,
    _file: File,
}

impl PidLock {
    pub fn acquire(cfg: &Config) -> Result<PidLock, String> {
        let dir = &cfg.host.runtime_dir;
        std::fs::DirBuilder::new()
            .recursive(true)
            // Others may pass through (workers running as another user load
            // their plugin copy from here) but not list it.
            .mode(0o711)
            .create(dir)
            .map_err(|e| format!("cannot create runtime_dir {}: {e}", dir.display()))?;
        let path = cfg.pid_file();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open pid file {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut old = String::new();
            let _ = file.read_to_string(&mut old);
            return Err(format!(
                "wm-host is already running for {} (master pid {})",
                dir.display(),
                old.trim()
            ));
        }
        let write = |f: &mut File| -> std::io::Result<()> {
            f.set_len(0)?;
            f.rewind()?;
            writeln!(f, "{}", std::process::id())
        };
        write(&mut file).map_err(|e| format!("cannot write pid file {}: {e}", path.display()))?;
        Ok(PidLock { path, _file: file })
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The master's pid, if its pid file names a live process.
pub fn running_master(cfg: &Config) -> Option<Pid> {
    let text = std::fs::read_to_string(cfg.pid_file()).ok()?;
    let pid = Pid::from_raw(text.trim().parse().ok()?);
    alive(pid).then_some(pid)
}

pub fn alive(pid: Pid) -> bool {
    kill(pid, None).is_ok()
}
