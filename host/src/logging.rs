//! Log output for the master and workers: the terminal in the foreground, the
//! `log_file` when daemonized (workers learn which from the environment).

use std::fs::OpenOptions;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Set for workers of a daemonized master: their log file is open at fd
/// [`LOG_FD`] (they may run as a user who could not open it by path).
pub const LOG_FD_ENV: &str = "WM_LOG_FD";
pub const LOG_FD: i32 = 6;

fn filter() -> EnvFilter {
    EnvFilter::try_from_env("WM_LOG").unwrap_or_else(|_| EnvFilter::new("info"))
}

pub fn to_stderr() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn to_file(path: &Path) -> std::io::Result<()> {
    to_open_file(OpenOptions::new().create(true).append(true).open(path)?);
    Ok(())
}

fn to_open_file(file: std::fs::File) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_target(false)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init();
}

/// Workers log where their master does.
pub fn for_worker() {
    if std::env::var_os(LOG_FD_ENV).is_some() {
        // SAFETY: the master hands this descriptor over open, for us alone.
        to_open_file(unsafe { std::fs::File::from_raw_fd(LOG_FD) });
    } else {
        to_stderr();
    }
}
