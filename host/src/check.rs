//! `wm-host check`, like `nginx -t`: parse the config, bind-test the
//! listeners, read the certificates, and load each plugin in a throwaway
//! child process (`wm-host check-plugin`, fork+exec of this binary), so the
//! process that checks never maps plugin code either.
//!
//! What is fine goes to stdout; each problem is one line on stderr, and the
//! exit status is non-zero when there is any.
//!
//! Run as root, the child loading a plugin drops to the `user` and `group`
//! of a group that runs it, as that group's workers do; it loads a copy of
//! the file in a memfd, as workers load the master's copy (see `builds`),
//! so a plugin under a folder that user cannot read still checks.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
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

/// Set for `check-plugin` when it loads a memfd copy of the plugin, passed
/// at [`PLUGIN_FD`], rather than the path it names in its messages.
const PLUGIN_FD_ENV: &str = "WM_HOST_CHECK_PLUGIN_FD";
const PLUGIN_FD: i32 = 3;

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
        /// The user id it was loaded as.
        #[serde(default)]
        uid: u32,
    },
    Failed {
        error: String,
    },
}

/// `wm-host check-plugin PATH`: the child side. Loads the plugin (its
/// constructor runs, and its destructor), prints one JSON line, exits.
pub fn plugin_child(path: &Path) -> ExitCode {
    let from = match std::env::var_os(PLUGIN_FD_ENV) {
        Some(_) => PathBuf::from(format!("/proc/self/fd/{PLUGIN_FD}")),
        None => path.to_path_buf(),
    };
    let report = match plugin::api_version(&from)
        .and_then(|api| LoadedPlugin::load(&from, path).map(|p| (api, p)))
    {
        Ok((api, p)) => PluginReport::Loaded {
            name: p.name.clone(),
            version: p.version.clone(),
            api,
            handover: p.handover(),
            uid: nix::unistd::getuid().as_raw(),
        },
        Err(e) => PluginReport::Failed {
            // Messages name the file, not the memfd.
            error: e
                .to_string()
                .replace(&from.display().to_string(), &path.display().to_string()),
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

/// A copy of `path` in an anonymous memory file, readable by the child
/// whatever user it runs as.
fn memfd_copy(path: &Path) -> io::Result<OwnedFd> {
    // SAFETY: a NUL-terminated name and flags; the result is checked.
    let fd = unsafe { libc::memfd_create(c"wm-host-check".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor we just opened and own.
    let mut copy = unsafe { File::from_raw_fd(fd) };
    io::copy(&mut File::open(path)?, &mut copy)?;
    copy.seek(SeekFrom::Start(0))?;
    Ok(copy.into())
}

/// Runs `wm-host check-plugin` on `path` with a deadline; as `run_as`
/// (uid, gid) when given and this process is root, as `spawn_worker` starts
/// workers.
fn load_in_child(path: &Path, run_as: Option<(u32, u32)>) -> Result<PluginReport, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find own executable: {e}"))?;
    let run_as = run_as.filter(|_| nix::unistd::geteuid().is_root());
    let mut cmd = Command::new(exe);
    cmd.arg("check-plugin")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let copy = match run_as {
        Some(_) => Some(memfd_copy(path).map_err(|e| format!("cannot read: {e}"))?),
        None => None,
    };
    if let (Some((uid, gid)), Some(copy)) = (run_as, &copy) {
        let copy_fd = copy.as_raw_fd();
        cmd.env(PLUGIN_FD_ENV, "1");
        // SAFETY: only fcntl/dup2/setgroups/setgid/setuid run in the child
        // before exec, all async-signal-safe. The copy goes above 10 first,
        // so that dup2 onto PLUGIN_FD is never a no-op that would keep
        // close-on-exec.
        unsafe {
            cmd.pre_exec(move || {
                let high = libc::fcntl(copy_fd, libc::F_DUPFD_CLOEXEC, 10);
                if high < 0 || libc::dup2(high, PLUGIN_FD) < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Group first: once the user changes, it no longer may.
                if libc::setgroups(1, &gid) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("cannot start the checking process: {e}"))?;
    drop(copy);
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

/// Whether a running master holds a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Held {
    Yes,
    No,
    /// Its /proc/<pid>/fd cannot be read as this user (EACCES), but a
    /// socket of its user is bound to the port.
    Probably,
}

/// Whether process `pid` holds a socket bound to `port` (TCP listening or
/// UDP), from /proc: tells a running wm-host's own listener from someone
/// else's.
fn holds_port(pid: i32, port: u16, udp: bool) -> Held {
    let files: &[&str] = match udp {
        true => &["/proc/net/udp", "/proc/net/udp6"],
        false => &["/proc/net/tcp", "/proc/net/tcp6"],
    };
    // socket:[inode] -> the uid that owns it.
    let mut inodes = BTreeMap::new();
    for f in files {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            let (Some(local), Some(state), Some(uid), Some(inode)) =
                (cols.get(1), cols.get(3), cols.get(7), cols.get(9))
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
                inodes.insert(format!("socket:[{inode}]"), uid.parse::<u32>().ok());
            }
        }
    }
    let fds = match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(fds) => fds,
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            // Another user's master: its descriptors are hidden, its uid is
            // not.
            let owner = std::fs::metadata(format!("/proc/{pid}")).map(|m| m.uid());
            return match owner {
                Ok(uid) if inodes.values().any(|&u| u == Some(uid)) => Held::Probably,
                _ => Held::No,
            };
        }
        Err(_) => return Held::No,
    };
    let ours = fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|l| inodes.contains_key(l.to_string_lossy().as_ref()))
    });
    if ours {
        Held::Yes
    } else {
        Held::No
    }
}

/// Reports an address in use: held by the running master, or a problem.
fn in_use(what: &str, held: Held, master: Option<i32>, problems: &mut Vec<String>) {
    match (held, master) {
        (Held::Yes, Some(pid)) => {
            println!("{what}: held by the running wm-host (master pid {pid})")
        }
        (Held::Probably, Some(pid)) => println!(
            "{what}: probably held by the running wm-host (master pid {pid}; \
             cannot verify as this user)"
        ),
        _ => problems.push(format!("{what}: address in use by another process")),
    }
}

fn check_listener(w: &WorkerConfig, master: Option<i32>, problems: &mut Vec<String>) {
    let Some(listen) = &w.listen else {
        return;
    };
    let what = format!("listen {} (worker {:?})", listen.text, w.name);
    match probe_listener(w) {
        Ok(()) => println!("{what}: free"),
        Err(e) if e.in_use() => {
            let held = match (listen.transport, master) {
                (_, None) => Held::No,
                // The socket file is this config's: its master holds it.
                (Transport::Unix, Some(_)) => Held::Yes,
                (t, Some(pid)) => holds_port(pid, listen.addr.port(), t == Transport::Udp),
            };
            in_use(&what, held, master, problems);
        }
        Err(e) => problems.push(e.to_string()),
    }
}

/// `[host] admin`: bound as the master binds it (std's bind, with
/// SO_REUSEADDR, which still fails next to a listening socket).
fn check_admin(addr: SocketAddr, master: Option<i32>, problems: &mut Vec<String>) {
    let what = format!("admin {addr}");
    match TcpListener::bind(addr) {
        Ok(_) => println!("{what}: free"),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
            let held = match master {
                Some(pid) => holds_port(pid, addr.port(), false),
                None => Held::No,
            };
            in_use(&what, held, master, problems);
        }
        Err(e) => problems.push(format!("{what}: cannot listen: {e}")),
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

    if let Some(admin) = &cfg.host.admin {
        check_admin(admin.addr, master, &mut problems);
    }
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
    // Loaded as the first of its groups that runs as another user.
    type RunAs = Option<(u32, u32)>;
    let mut seen: BTreeMap<&Path, (Vec<&str>, RunAs)> = BTreeMap::new();
    for w in &cfg.workers {
        let (groups, run_as) = seen.entry(&w.plugin).or_default();
        groups.push(&w.name);
        *run_as = run_as.or(w.run_as);
    }
    for (file, (groups, run_as)) in seen {
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
        match load_in_child(file, run_as) {
            Ok(PluginReport::Loaded {
                name,
                version,
                api,
                handover,
                uid,
            }) => println!(
                "{what}: {name} {version}, plugin-api {api}, handover {}, loaded as uid {uid}, \
                 build {hash}",
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
