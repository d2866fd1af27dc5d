//! The commands users run. Errors are `anyhow` here, at the binary's edge.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::config::Config;
use crate::ipc::{self, Request, Response};
use crate::logging;
use crate::master::{Master, Readiness};
use crate::report::{render_connections, render_status};
use crate::runtime::{alive, running_master};
use crate::worker;

/// The descriptor a daemonized master reports readiness on.
const READY_FD: i32 = 3;

pub fn worker() -> i32 {
    logging::for_worker();
    let spec = std::env::var(worker::SPEC_ENV)
        .ok()
        .and_then(|s| serde_json::from_str::<worker::Spec>(&s).ok());
    match spec {
        Some(spec) => worker::run(spec),
        None => {
            eprintln!("wm-host worker: started without a spec; workers are started by the master");
            2
        }
    }
}

pub fn start(path: &Path, daemon: bool) -> Result<()> {
    let cfg = Config::load(path)?;
    crate::runtime::prepare(&cfg).map_err(anyhow::Error::msg)?;
    if let Some(pid) = running_master(&cfg) {
        bail!(
            "wm-host is already running for {} (master pid {pid})",
            cfg.host.runtime_dir.display()
        );
    }
    if daemon {
        return start_daemon(&cfg);
    }
    logging::to_stderr(cfg.host.log_format);
    let master = Master::new(cfg)?;
    master.run(Readiness::Terminal)?;
    Ok(())
}

fn start_daemon(cfg: &Config) -> Result<()> {
    let stdout = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&cfg.host.stdout_file)
        .with_context(|| format!("cannot open stdout_file {}", cfg.host.stdout_file.display()))?;
    // Close-on-exec: only the copy moved to READY_FD reaches the master.
    let (read_end, write_end) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).context("pipe")?;
    let exe = std::env::current_exe().context("cannot find own executable")?;
    let mut cmd = Command::new(exe);
    cmd.arg("master")
        .arg("--config")
        .arg(&cfg.path)
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stdout);
    let w = write_end.as_raw_fd();
    // SAFETY: setsid and dup2 are async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 || libc::dup2(w, READY_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the master")?;
    drop(write_end);
    let mut report = String::new();
    // The master closes the pipe once every worker is ready, or on failure.
    File::from(read_end).read_to_string(&mut report)?;
    if let Some(table) = report.strip_prefix("ok\n") {
        print!("{table}");
        println!(
            "wm-host started in the background (master pid {})",
            child.id()
        );
        return Ok(());
    }
    // Failed: make sure nothing is left behind before reporting.
    let _ = child.wait();
    match report.strip_prefix("error: ") {
        Some(e) => Err(anyhow!("{}", e.trim())),
        None => Err(anyhow!(
            "the master exited during start-up; see {}",
            cfg.host.log_file.display()
        )),
    }
}

/// `wm-host master`: the daemon side of `start -d`.
pub fn daemon_master(path: &Path) -> Result<()> {
    // SAFETY: the CLI passes the pipe at READY_FD.
    let ready = unsafe { File::from_raw_fd(READY_FD) };
    // Workers must not inherit it, or the CLI would never see the pipe close.
    let _ = nix::fcntl::fcntl(
        &ready,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let mut readiness = Readiness::Pipe(Some(ready));
    let cfg = Config::load(path)?;
    let log = &cfg.host.log_file;
    if let Some(dir) = log.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    logging::to_file(log, cfg.host.log_format)
        .with_context(|| format!("cannot open log_file {}", log.display()))?;
    // A second handle for the workers, passed to them open.
    let for_workers = std::fs::OpenOptions::new().append(true).open(log)?;
    let master = match Master::new(cfg) {
        Ok(m) => m.with_worker_log(for_workers),
        Err(e) => {
            tracing::error!("start failed: {e}");
            readiness.fail(&e.to_string());
            return Err(e.into());
        }
    };
    master.run(readiness)?;
    Ok(())
}

fn connect(cfg: &Config) -> Result<UnixStream> {
    let path = cfg.control_socket();
    if running_master(cfg).is_none() {
        bail!(
            "wm-host is not running (no live master for {})",
            cfg.host.runtime_dir.display()
        );
    }
    UnixStream::connect(&path)
        .with_context(|| format!("cannot reach the master at {}", path.display()))
}

fn request(cfg: &Config, req: &Request, timeout: Duration) -> Result<Response> {
    let mut stream = connect(cfg)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.write_all(&ipc::encode(req))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .context("no answer from the master")?;
    if line.is_empty() {
        bail!("the master closed the connection without answering");
    }
    serde_json::from_str(&line).context("bad answer from the master")
}

pub fn stop(path: &Path, graceful: bool) -> Result<()> {
    let cfg = Config::load(path)?;
    let pid = running_master(&cfg);
    let wait = cfg.host.stop_timeout + Duration::from_secs(10);
    match request(&cfg, &Request::Stop { graceful }, wait)? {
        Response::Stopped => {}
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    }
    // The master answers just before exiting; wait until it is gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pid.is_some_and(alive) || cfg.pid_file().exists() {
        if Instant::now() > deadline {
            bail!("the master said it stopped but is still running");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    println!("wm-host stopped");
    Ok(())
}

pub fn reload(path: &Path, graceful: bool) -> Result<()> {
    let cfg = Config::load(path)?;
    // Each replacement may take start_timeout; old workers stop_timeout.
    let per_worker = cfg.host.start_timeout + cfg.host.stop_timeout;
    let workers: u32 = cfg.workers.iter().map(|w| w.count).sum();
    let wait = per_worker * workers.max(1) + Duration::from_secs(10);
    let report = match request(&cfg, &Request::Reload { graceful }, wait)? {
        Response::Reloaded(r) => r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    for g in &report.groups {
        match (&g.error, g.kept) {
            (Some(e), _) => println!(
                "{}: FAILED after {}/{} workers: {e}",
                g.name, g.rolled, g.count
            ),
            (None, true) => println!(
                "{}: not reloadable, {} workers kept on build {} (on_worker_reload run)",
                g.name, g.count, g.old
            ),
            (None, false) => println!(
                "{}: build {} -> {}, {}/{} workers rolled in {:.2}s",
                g.name,
                g.old,
                g.new,
                g.rolled,
                g.count,
                g.millis as f64 / 1000.0
            ),
        }
        if let Some(h) = &g.handover {
            println!("  {}", crate::report::handover_line(h));
        } else if g.error.is_none() && !g.kept && g.rolled > 0 {
            println!(
                "  connections drained (reload_mode = \"drain\", or the new build cannot import)"
            );
        }
    }
    if !report.ok() {
        bail!("reload failed; the old build keeps serving");
    }
    Ok(())
}

pub fn reopen_logs(path: &Path) -> Result<()> {
    let cfg = Config::load(path)?;
    // Workers have a second to answer; the master's own wait is that.
    let r = match request(&cfg, &Request::ReopenLogs, Duration::from_secs(10))? {
        Response::LogsReopened(r) => r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    let Some(log) = r.path else {
        println!("nothing to reopen: the master logs to its standard error (started without -d)");
        return Ok(());
    };
    let s = if r.workers == 1 { "" } else { "s" };
    println!("{log} reopened by the master and {} worker{s}", r.workers);
    if !r.busy.is_empty() {
        println!(
            "  busy, will switch once their callback returns: pids {:?}",
            r.busy
        );
    }
    if !r.failed.is_empty() {
        bail!("workers could not reopen the log: {}", r.failed.join("; "));
    }
    Ok(())
}

pub fn restart(path: &Path, daemon: bool) -> Result<()> {
    let cfg = Config::load(path)?;
    if running_master(&cfg).is_some() {
        stop(path, false)?;
    }
    start(path, daemon)
}

pub fn status(path: &Path, json: bool) -> Result<()> {
    let cfg = Config::load(path)?;
    let report = match request(&cfg, &Request::Status, Duration::from_secs(5))? {
        Response::Status(r) => r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_status(&report));
    }
    Ok(())
}

pub fn connections(path: &Path, json: bool) -> Result<()> {
    let cfg = Config::load(path)?;
    let report = match request(&cfg, &Request::Connections, Duration::from_secs(5))? {
        Response::Connections(r) => r,
        Response::Error { message } => bail!("{message}"),
        other => bail!("unexpected answer: {other:?}"),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render_connections(&report));
    }
    Ok(())
}
