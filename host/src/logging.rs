//! Log output for the master and workers: the terminal in the foreground, the
//! `log_file` when daemonized (workers learn which from the environment), as
//! text or as one JSON object a line (`[host] log_format`).
//!
//! Colours (ANSI escape codes) are written only when the writer is a terminal
//! and `NO_COLOR` is unset or empty: output redirected to a file or a pipe
//! (`wm-host start > x.log 2>&1`, the daemon's `log_file`) stays plain text.
//! Each process decides for itself on the descriptor it actually writes to, so
//! workers, which inherit the master's stderr or log file, decide the same way.
//! JSON lines never have colours; control characters in them are escaped.
//!
//! `wm-host reopen-logs` (or SIGHUP) lets logrotate move the file away: the
//! master opens the path again and puts the new file on the descriptor its
//! writer uses (dup2), then hands it to every worker, which does the same on
//! [`LOG_FD`]. Writers never see a closed descriptor, so no line is lost.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::Mutex;

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormattedFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

pub use crate::config::LogFormat;

/// Set for workers of a daemonized master: their log file is open at fd
/// [`LOG_FD`] (they may run as a user who could not open it by path).
pub const LOG_FD_ENV: &str = "WM_LOG_FD";
pub const LOG_FD: i32 = 6;
/// Set to `json` for workers of a master with `log_format = "json"`.
pub const LOG_FORMAT_ENV: &str = "WM_LOG_FORMAT";

/// The descriptor the master's file writer writes to (-1: not a file).
static MASTER_LOG_FD: AtomicI32 = AtomicI32::new(-1);
/// This process is a worker (for the `process` field of JSON lines).
static IS_WORKER: AtomicBool = AtomicBool::new(false);

fn filter() -> EnvFilter {
    EnvFilter::try_from_env("WM_LOG").unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Whether to colour output going to a writer that is (or is not) a terminal.
/// `NO_COLOR` (<https://no-color.org/>) set to anything but "" turns colours
/// off even on a terminal.
fn colour(is_terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    is_terminal && no_color.is_none_or(|v| v.is_empty())
}

fn install<W>(writer: W, is_terminal: bool, format: LogFormat)
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(writer);
    let _ = match format {
        LogFormat::Text => {
            let ansi = colour(is_terminal, std::env::var_os("NO_COLOR").as_deref());
            builder.with_target(false).with_ansi(ansi).try_init()
        }
        LogFormat::Json => builder
            .with_ansi(false)
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine)
            .try_init(),
    };
}

pub fn to_stderr(format: LogFormat) {
    install(std::io::stderr, std::io::stderr().is_terminal(), format);
}

/// The daemonized master's log: appended to `path`, which
/// [`reopen_master`] can open again.
pub fn to_file(path: &Path, format: LogFormat) -> io::Result<()> {
    let file = open_log(path)?;
    MASTER_LOG_FD.store(file.as_raw_fd(), Ordering::Relaxed);
    to_open_file(file, format);
    Ok(())
}

/// The log file, appended to (created when missing, as logrotate without
/// `create` leaves it).
pub fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn to_open_file(file: File, format: LogFormat) {
    // A regular file is never a terminal; asking keeps one rule for all.
    let is_terminal = file.is_terminal();
    install(Mutex::new(file), is_terminal, format);
}

/// Workers log where their master does, in its format.
pub fn for_worker() {
    IS_WORKER.store(true, Ordering::Relaxed);
    let format = match std::env::var(LOG_FORMAT_ENV).as_deref() {
        Ok("json") => LogFormat::Json,
        _ => LogFormat::Text,
    };
    if std::env::var_os(LOG_FD_ENV).is_some() {
        // SAFETY: the master hands this descriptor over open, for us alone.
        to_open_file(unsafe { File::from_raw_fd(LOG_FD) }, format);
    } else {
        // Inherited from the master: the same terminal, file or pipe.
        to_stderr(format);
    }
}

/// What a worker needs to log where the master does: the log file (daemon
/// only) and the format.
#[derive(Default)]
pub struct WorkerLog {
    pub file: Option<File>,
    pub format: LogFormat,
}

/// Puts `new` where `fd` was: writers using `fd` go on to the new file.
fn replace_fd(new: &impl AsRawFd, fd: RawFd) -> io::Result<()> {
    // SAFETY: dup2 on two descriptors we own; `fd` stays open throughout.
    if unsafe { libc::dup2(new.as_raw_fd(), fd) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The master, on `reopen-logs`: opens `path` again and writes its own lines
/// there from now on; the workers' handle (`log.file`) follows too, so
/// workers started later inherit the new file. Returns the file to hand to
/// running workers.
pub fn reopen_master(path: &Path, log: &WorkerLog) -> io::Result<File> {
    let fd = MASTER_LOG_FD.load(Ordering::Relaxed);
    if fd < 0 {
        return Err(io::Error::other("the master does not log to a file"));
    }
    let new = open_log(path)?;
    replace_fd(&new, fd)?;
    if let Some(f) = &log.file {
        replace_fd(&new, f.as_raw_fd())?;
    }
    Ok(new)
}

/// A worker, on `reopen-logs`: the master's new file replaces [`LOG_FD`].
pub fn reopen_worker(new: OwnedFd) -> io::Result<()> {
    if std::env::var_os(LOG_FD_ENV).is_none() {
        return Err(io::Error::other("this worker logs to its master's output"));
    }
    replace_fd(&new, LOG_FD)
}

/// `log_format = "json"`: one object a line, e.g.
/// `{"timestamp":"…","level":"INFO","message":"worker ready","process":"worker",
/// "pid":4242,"worker":"chat","worker_id":0,"build":"3f2a…"}`. Who wrote it
/// is always at the top level: `process` (`master` or `worker`) and `pid`,
/// and for a worker its group (`worker`), id and plugin build, from its
/// span. The event's own fields go under `fields`, so a master line about
/// a worker (`pid = …`) cannot be taken for the worker's own.
struct JsonLine;

impl<S> FormatEvent<S, JsonFields> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        // In this order, whatever serde_json's map would sort them into.
        let mut line: Vec<(String, Value)> = Vec::with_capacity(10);
        let mut ts = String::new();
        SystemTime.format_time(&mut Writer::new(&mut ts))?;
        line.push(("timestamp".into(), ts.into()));
        let level = event.metadata().level().as_str();
        line.push(("level".into(), level.into()));
        let mut fields = Fields::default();
        event.record(&mut fields);
        line.push(("message".into(), fields.message.unwrap_or_default().into()));
        let process = match IS_WORKER.load(Ordering::Relaxed) {
            true => "worker",
            false => "master",
        };
        line.push(("process".into(), process.into()));
        line.push(("pid".into(), std::process::id().into()));
        // The worker span: name, id, pid, build (stored as JSON by JsonFields).
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                let Some(f) = ext.get::<FormattedFields<JsonFields>>() else {
                    continue;
                };
                let Ok(Value::Object(map)) = serde_json::from_str::<Value>(&f.fields) else {
                    continue;
                };
                for (k, v) in map {
                    let k = match k.as_str() {
                        "name" => "worker".to_string(),
                        "id" => "worker_id".to_string(),
                        _ => k,
                    };
                    match line.iter_mut().find(|(have, _)| *have == k) {
                        Some(slot) => slot.1 = v,
                        None => line.push((k, v)),
                    }
                }
            }
        }
        if !fields.rest.is_empty() {
            line.push(("fields".into(), Value::Object(fields.rest)));
        }
        let mut sep = '{';
        for (k, v) in &line {
            let k = serde_json::to_string(k).map_err(|_| fmt::Error)?;
            let v = serde_json::to_string(v).map_err(|_| fmt::Error)?;
            write!(writer, "{sep}{k}:{v}")?;
            sep = ',';
        }
        writeln!(writer, "}}")
    }
}

/// An event's fields: its message, and the rest as JSON values.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    rest: Map<String, Value>,
}

impl Fields {
    fn put(&mut self, field: &Field, v: Value) {
        match (field.name(), v) {
            ("message", Value::String(s)) => self.message = Some(s),
            (name, v) => {
                self.rest.insert(name.to_string(), v);
            }
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // `message` is format_args!, whose Debug is the text itself.
        self.put(field, format!("{value:?}").into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;
    use std::sync::Arc;

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

    /// Lines written to memory, for one subscriber set as the default of
    /// this thread only.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_who_wrote_them_and_the_event_fields_apart() {
        let out = Lines::default();
        let sink = out.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .fmt_fields(JsonFields::new())
            .event_format(JsonLine)
            .finish();
        tracing::subscriber::with_default(sub, || {
            tracing::info!(pid = 7u32, "about another process");
            let span = tracing::info_span!("worker", name = %"chat", id = 1u32, pid = 4242u32, build = %"3f2a");
            let _in = span.enter();
            tracing::warn!("bad input \x1b[31m from {}", "a client");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(!text.contains('\x1b'), "{text}");
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2, "{text}");
        let master = &lines[0];
        assert_eq!(master["message"], "about another process");
        assert_eq!(master["level"], "INFO");
        assert_eq!(master["pid"], std::process::id());
        assert_eq!(master["fields"]["pid"], 7);
        assert!(master["timestamp"].as_str().unwrap().ends_with('Z'));
        let worker = &lines[1];
        assert_eq!(worker["message"], "bad input \x1b[31m from a client");
        assert_eq!(worker["level"], "WARN");
        assert_eq!(worker["worker"], "chat");
        assert_eq!(worker["worker_id"], 1);
        assert_eq!(worker["pid"], 4242);
        assert_eq!(worker["build"], "3f2a");
        assert!(worker.get("fields").is_none(), "{worker}");
        assert!(text.starts_with("{\"timestamp\":"), "{text}");
    }
}
