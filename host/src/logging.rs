//! Log output for the master and workers: the terminal in the foreground, the
//! `log_file` when daemonized (workers learn which from the environment).

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

/// Set for workers of a daemonized master: append logs to this file.
pub const LOG_FILE_ENV: &str = "WM_LOG_FILE";

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
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_target(false)
        .with_ansi(false)
        .with_writer(Mutex::new(file))
        .try_init();
    Ok(())
}

/// Workers log where their master does.
pub fn for_worker() {
    match std::env::var_os(LOG_FILE_ENV) {
        Some(p) if to_file(Path::new(&p)).is_ok() => {}
        _ => to_stderr(),
    }
}
