//! `wm-host check`, like `nginx -t`: parse the config, bind-test the
//! listeners, read the certificates, and load each plugin in a throwaway
//! child process (`wm-host check-plugin`, fork+exec of this binary), so the
//! process that checks never maps plugin code either.
//!
//! What is fine goes to stdout; each problem is one line on stderr, and the
//! exit status is non-zero when there is any.

use std::collections::{BTreeMap, HashSet};
use std::io::Read;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{Config, Transport, WorkerConfig};
use crate::master::{builds, probe_listener, redis_client};
use crate::plugin::{self, LoadedPlugin};
use crate::runtime::running_master;
use crate::tls::TlsMaterial;

/// A plugin whose constructor takes longer than this is reported as hung.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What `check-plugin` prints: one JSON line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PluginReport {
    Loaded {
        name: String,
        version: String,
        /// The plugin-api version it was built against.
        api: String,
        /// Whether it takes part in live handover.
        handover: bool,
    },
    Failed {
        error: String,
    },
}

/// `wm-host check-plugin PATH`: the child side. Loads the plugin (its
/// constructor runs, and its destructor), prints one JSON line, exits.
pub fn plugin_child(path: &Path) -> ExitCode {
    let report = match plugin::api_version(path)
        .and_then(|api| LoadedPlugin::load(path, path).map(|p| (api, p)))
    {
        Ok((api, p)) => PluginReport::Loaded {
            name: p.name.clone(),
            version: p.version.clone(),
            api,
            handover: p.handover(),
        },
        Err(e) => PluginReport::Failed {
            error: e.to_string(),
        },
    };
    let ok = matches!(report, PluginReport::Loaded { .. });
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `wm-host check-plugin` on `path` with a deadline.
fn load_in_child(path: &Path) -> Result<PluginReport, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let mut child = Command::new(exe)
        .arg("check-plugin")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the checking process: {e}"))?;
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("piped");
    // Read on a thread: a plugin that prints a lot must not block on a
    // full pipe while we wait for it to exit.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut out = String::new();
        let _ = stdout.read_to_string(&mut out);
        let _ = tx.send(out);
    });
    let out = match rx.recv_timeout(PLUGIN_TIMEOUT) {
        Ok(out) => out,
        Err(_) => {
            // SAFETY: kill(2) of the child we started and have not reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            let _ = child.wait();
            return Err(format!(
                "loading did not finish within {PLUGIN_TIMEOUT:?} (the constructor hangs?)"
            ));
        }
    };
    let status = child.wait().map_err(|e| e.to_string())?;
    match out.lines().last().map(serde_json::from_str::<PluginReport>) {
        Some(Ok(report)) => Ok(report),
        _ => Err(
            match std::os::unix::process::ExitStatusExt::signal(&status) {
                Some(sig) => format!("the process loading it died with signal {sig}"),
                None => format!("the process loading it exited with {status} without a report"),
            },
        ),
    }
}

/// Whether process `pid` holds a socket bound to `port` (TCP listening or
/// UDP), from /proc: tells a running wm-host's own listener from someone
/// else's.
fn holds_port(pid: i32, port: u16, udp: bool) -> bool {
    let files: &[&str] = match udp {
        true => &["/proc/net/udp", "/proc/net/udp6"],
        false => &["/proc/net/tcp", "/proc/net/tcp6"],
    };
    let mut inodes = HashSet::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(inode)) = (cols.get(1), cols.get(3), cols.get(9))
            else {
                continue;
            };
            let p = local
                .rsplit(':')
                .next()
                .and_then(|h| u16::from_str_radix(h, 16).ok());
            // 0A: LISTEN; 07: an unconnected UDP socket.
            let bound = if udp { *state == "07" } else { *state == "0A" };
            if p == Some(port) && bound {
                inodes.insert(format!("socket:[{inode}]"));
            }
        }
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path()).is_ok_and(|l| inodes.contains(l.to_string_lossy().as_ref()))
    })
}

fn check_listener(w: &WorkerConfig, master: Option<i32>, problems: &mut Vec<String>) {
    let Some(listen) = &w.listen else {
        return;
    };
    let what = format!("listen {} (worker {:?})", listen.text, w.name);
    match probe_listener(w) {
        Ok(()) => println!("{what}: free"),
        Err(e) if e.in_use() => {
            let ours = match (listen.transport, master) {
                (_, None) => false,
                // The socket file is this config's: its master holds it.
                (Transport::Unix, Some(_)) => true,
                (t, Some(pid)) => holds_port(pid, listen.addr.port(), t == Transport::Udp),
            };
            match (ours, master) {
                (true, Some(pid)) => {
                    println!("{what}: held by the running wm-host (master pid {pid})")
                }
                _ => problems.push(format!("{what}: address in use by another process")),
            }
        }
        Err(e) => problems.push(e.to_string()),
    }
}

/// `wm-host check [-c FILE]`.
pub fn run(path: &Path) -> ExitCode {
    let cfg = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("wm-host: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("config {}: syntax ok", cfg.path.display());
    crate::trust::set_strict(cfg.host.strict_modes);
    let mut problems = Vec::new();
    let master = running_master(&cfg).map(|p| p.as_raw());

    for w in &cfg.workers {
        check_listener(w, master, &mut problems);
        if let Some(files) = &w.tls {
            match TlsMaterial::load(files) {
                Ok(_) => println!(
                    "tls {} (worker {:?}): certificate and key ok",
                    files.cert.display(),
                    w.name
                ),
                Err(e) => problems.push(format!("worker {:?}: {e}", w.name)),
            }
        }
    }

    // Each plugin file once, however many groups run it.
    let mut seen: BTreeMap<&Path, Vec<&str>> = BTreeMap::new();
    for w in &cfg.workers {
        seen.entry(&w.plugin).or_default().push(&w.name);
    }
    for (file, groups) in seen {
        let what = format!("plugin {} (worker {})", file.display(), groups.join(", "));
        if !file.exists() {
            problems.push(format!("{what}: file not found"));
            continue;
        }
        if let Err(e) = crate::trust::check_plugin(file) {
            problems.push(format!("{what}: {e}"));
            continue;
        }
        let hash = match builds::hash_file(file) {
            Ok(h) => h,
            Err(e) => {
                problems.push(format!("{what}: cannot read: {e}"));
                continue;
            }
        };
        match load_in_child(file) {
            Ok(PluginReport::Loaded {
                name,
                version,
                api,
                handover,
            }) => println!(
                "{what}: {name} {version}, plugin-api {api}, handover {}, build {hash}",
                if handover { "yes" } else { "no" }
            ),
            // The loader's errors name the file; add the groups.
            Ok(PluginReport::Failed { error }) => {
                problems.push(error.replacen(&format!("plugin {}", file.display()), &what, 1))
            }
            Err(e) => problems.push(format!("{what}: {e}")),
        }
    }

    if let Some(url) = &cfg.bus.redis {
        let shown = crate::cluster::redact(url);
        match redis_client(&cfg.bus) {
            Ok(_) => println!("bus {shown}: ok (not contacted)"),
            Err(e) => problems.push(e),
        }
    }

    if problems.is_empty() {
        println!("config {}: test is successful", cfg.path.display());
        return ExitCode::SUCCESS;
    }
    for p in &problems {
        eprintln!("wm-host: {p}");
    }
    ExitCode::FAILURE
}
