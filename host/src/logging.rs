//! Log output for the master and workers: the terminal in the foreground, the
//! `log_file` when daemonized (workers learn which from the environment).
//!
//! Colours (ANSI escape codes) are written only when the writer is a terminal
//! and `NO_COLOR` is unset or empty: output redirected to a file or a pipe
//! (`wm-host start > x.log 2>&1`, the daemon's `log_file`) stays plain text.
//! Each process decides for itself on the descriptor it actually writes to, so
//! workers, which inherit the master's stderr or log file, decide the same way.

use std::fs::OpenOptions;
use std::io::IsTerminal;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::EnvFilter;

/// Set for workers of a daemonized master: their log file is open at fd
/// [`LOG_FD`] (they may run as a user who could not open it by path).
pub const LOG_FD_ENV: &str = "WM_LOG_FD";
pub const LOG_FD: i32 = 6;

fn filter() -> EnvFilter {
    EnvFilter::try_from_env("WM_LOG").unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Whether to colour output going to a writer that is (or is not) a terminal.
/// `NO_COLOR` (<https://no-color.org/>) set to anything but "" turns colours
/// off even on a terminal.
fn colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn install<W>(writer: W, is_terminal: bool)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let ansi = colour(is_terminal, std::env::var_os("NO_COLOR").as_deref());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_target(false)
        .with_ansi(ansi)
        .with_writer(writer)
        .try_init();
}

pub fn to_stderr() {
    install(std::io::stderr, std::io::stderr().is_terminal());
}

pub fn to_file(path: &Path) -> std::io::Result<()> {
    to_open_file(OpenOptions::new().create(true).append(true).open(path)?);
    Ok(())
}

fn to_open_file(file: std::fs::File) {
    // A regular file is never a terminal; asking keeps one rule for all.
    let is_terminal = file.is_terminal();
    install(Mutex::new(file), is_terminal);
}

/// Workers log where their master does.
pub fn for_worker() {
    if std::env::var_os(LOG_FD_ENV).is_some() {
        // SAFETY: the master hands this descriptor over open, for us alone.
        to_open_file(unsafe { std::fs::File::from_raw_fd(LOG_FD) });
    } else {
        // Inherited from the master: the same terminal, file or pipe.
        to_stderr();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
        assert!(!colour(false, Some(OsStr::new(""))));
    }

    #[test]
    fn a_log_file_is_not_a_terminal() {
        let f = tempfile::tempfile().unwrap();
        assert!(!f.is_terminal());
    }
}
