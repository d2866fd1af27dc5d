//! The runtime dir: the pid file, locked for the master's whole life so a
//! second master for the same dir is refused, and found by the CLI.
//!
//! The lock is the truth about whether a master runs: a master killed with
//! SIGKILL leaves its pid file behind, and the pid in it may by now belong to
//! any process, but the kernel drops its lock the moment it dies.
//!
//! Before anything is written there, the runtime dir is made and checked as
//! sshd's StrictModes would (see [`crate::trust`]): root writes the pid file
//! and runs the plugin copies kept in `plugins/`, so no other user may be
//! able to change the folder or plant links in it.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::kill;
use nix::unistd::Pid;

use crate::config::Config;
use crate::trust;

/// Mode of the runtime dir and of the folders made for it: others may pass
/// through (workers running as another user load their plugin copy from
/// here) but not list it.
const RUNTIME_DIR_MODE: u32 = 0o711;

/// How long a starting master retries a lock held for an instant by a CLI
/// probing whether a master runs (see [`running_master`]).
const LOCK_RETRY: Duration = Duration::from_millis(500);

pub struct PidLock {
    path: PathBuf,
    _file: File,
}

impl PidLock {
    pub fn acquire(cfg: &Config) -> Result<PidLock, String> {
        prepare(cfg)?;
        let dir = &cfg.host.runtime_dir;
        let path = cfg.pid_file();
        let file = open_nofollow(
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644),
            &path,
        )
        .map_err(|e| refusal(&path, "pid file", e))?;
        let md = file
            .metadata()
            .map_err(|e| format!("cannot stat pid file {}: {e}", path.display()))?;
        if !md.is_file() {
            return Err(format!(
                "pid file {} is not a regular file: remove it",
                path.display()
            ));
        }
        if cfg.host.strict_modes && md.uid() != 0 && md.uid() != nix::unistd::geteuid().as_raw() {
            return Err(format!(
                "pid file {} is owned by uid {}: remove it, or set [host] strict_modes = false for development",
                path.display(),
                md.uid()
            ));
        }
        // Whatever the umask: the pid is for everyone to read, not to change.
        let _ = file.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644));
        if !lock(&file)? {
            return Err(format!(
                "wm-host is already running for {} (master pid {})",
                dir.display(),
                read_pid(&file).map_or_else(|| "unknown".to_string(), |p| p.to_string())
            ));
        }
        // Written over the old text, then cut: a reader never sees it empty.
        let text = format!("{}\n", std::process::id());
        file.write_all_at(text.as_bytes(), 0)
            .and_then(|_| file.set_len(text.len() as u64))
            .map_err(|e| format!("cannot write pid file {}: {e}", path.display()))?;
        Ok(PidLock { path, _file: file })
    }
}

impl Drop for PidLock {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Makes the runtime dir ready and safe before anything is written in it:
/// creates what is missing (mode 0711, whatever the umask), checks it, the
/// folders above it and the plugin files (`strict_modes`), refuses symlinks
/// at the pid file's and control socket's paths, and keeps `plugins/`
/// closed. Run by `start` before it daemonizes, and by the master itself.
pub fn prepare(cfg: &Config) -> Result<(), String> {
    let strict = cfg.host.strict_modes;
    trust::set_strict(strict);
    let dir = &cfg.host.runtime_dir;
    create_runtime_dir(dir, strict)?;
    if strict {
        trust::check_runtime_dir(dir)?;
        for w in &cfg.workers {
            trust::check_plugin(&w.plugin)?;
        }
    }
    for (what, path) in [
        ("pid file", cfg.pid_file()),
        ("control socket", cfg.control_socket()),
    ] {
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(symlink_refusal(&path, what));
        }
    }
    plugins_dir(cfg, strict)
}

/// Creates the missing folders of `dir` one by one, each 0711. Only folders
/// made here are chmodded: an existing one with unsafe modes is refused by
/// the checks, not silently changed. Before creating anything the existing
/// folders above are checked, so nothing is made where others could swap it.
fn create_runtime_dir(dir: &Path, strict: bool) -> Result<(), String> {
    let mut missing = Vec::new();
    let mut cur = dir.to_path_buf();
    loop {
        match std::fs::symlink_metadata(&cur) {
            Ok(_) => break,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                missing.push(cur.clone());
                if !cur.pop() {
                    break;
                }
            }
            Err(e) => return Err(format!("cannot stat {}: {e}", cur.display())),
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    if strict && !cur.as_os_str().is_empty() {
        trust::check_runtime_dir_parent(&cur, dir)?;
    }
    for m in missing.iter().rev() {
        match std::fs::DirBuilder::new().mode(RUNTIME_DIR_MODE).create(m) {
            // The umask may have taken bits off (or a 0 umask none).
            Ok(()) => chmod_nofollow(m, RUNTIME_DIR_MODE)
                .map_err(|e| format!("cannot chmod {}: {e}", m.display()))?,
            // Made meanwhile by someone else: the checks judge it.
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create runtime_dir {}: {e}", dir.display())),
        }
    }
    Ok(())
}

/// `runtime_dir/plugins/`, where workers load their copy from: 0700, or 0711
/// when a group runs as another user, who must reach its copy by name. Set
/// on every start, even if the folder exists.
fn plugins_dir(cfg: &Config, strict: bool) -> Result<(), String> {
    let path = cfg.host.runtime_dir.join("plugins");
    let me = nix::unistd::geteuid().as_raw();
    let other_users = cfg
        .workers
        .iter()
        .any(|w| w.run_as.is_some_and(|(uid, _)| uid != me));
    let want = if other_users { 0o711 } else { 0o700 };
    match std::fs::DirBuilder::new().mode(want).create(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot create {}: {e}", path.display())),
    }
    let md = std::fs::symlink_metadata(&path)
        .map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
    if md.is_dir() && md.uid() == me {
        if md.mode() & 0o7777 != want {
            chmod_nofollow(&path, want)
                .map_err(|e| format!("cannot chmod {}: {e}", path.display()))?;
        }
    } else if strict {
        return Err(format!(
            "{} is not a directory of uid {me} (owner uid {}, {}): remove it, \
             or set [host] strict_modes = false for development",
            path.display(),
            md.uid(),
            if md.file_type().is_symlink() {
                "a symbolic link"
            } else if md.is_dir() {
                "a directory"
            } else {
                "not a directory"
            }
        ));
    }
    Ok(())
}

/// chmod that never follows a symlink at `path` (fails on one instead).
pub fn chmod_nofollow(path: &Path, mode: u32) -> io::Result<()> {
    let c = trust::c_path(path)?;
    // SAFETY: a valid C string; glibc changes the file itself via O_PATH.
    let r = unsafe {
        libc::fchmodat(
            libc::AT_FDCWD,
            c.as_ptr(),
            mode as libc::mode_t,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `path` without following a symlink at it (nor blocking on a FIFO).
fn open_nofollow(opts: &mut OpenOptions, path: &Path) -> io::Result<File> {
    opts.custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
}

fn symlink_refusal(path: &Path, what: &str) -> String {
    format!(
        "{what} {} is a symbolic link; wm-host does not follow it: remove it",
        path.display()
    )
}

fn refusal(path: &Path, what: &str, e: io::Error) -> String {
    if e.raw_os_error() == Some(libc::ELOOP) {
        symlink_refusal(path, what)
    } else {
        format!("cannot open {what} {}: {e}", path.display())
    }
}

/// Takes the lock, retrying for a moment in case a CLI is only probing it.
fn lock(file: &File) -> Result<bool, String> {
    let end = Instant::now() + LOCK_RETRY;
    loop {
        match try_lock(file) {
            Ok(true) => return Ok(true),
            Ok(false) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            Ok(false) => return Ok(false),
            Err(e) => return Err(format!("cannot lock pid file: {e}")),
        }
    }
}

fn try_lock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(false),
        _ => Err(e),
    }
}

/// The first line of the pid file, if it is a pid.
fn read_pid(file: &File) -> Option<Pid> {
    let mut buf = [0u8; 32];
    let n = file.read_at(&mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    (pid > 0).then(|| Pid::from_raw(pid))
}

/// The master's pid, if a master holds the lock on the pid file. Probes the
/// lock (taking and dropping it at once when free) rather than trusting the
/// pid written in the file.
pub fn running_master(cfg: &Config) -> Option<Pid> {
    let file = open_nofollow(OpenOptions::new().read(true), &cfg.pid_file()).ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    match try_lock(&file) {
        Ok(true) => {
            // SAFETY: flock on a descriptor we own.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            return None;
        }
        Ok(false) => {}
        Err(_) => return None,
    }
    // Held. A master writes its pid right after taking the lock.
    let end = Instant::now() + LOCK_RETRY;
    loop {
        if let Some(pid) = read_pid(&file) {
            return Some(pid);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn alive(pid: Pid) -> bool {
    kill(pid, None).is_ok()
}
