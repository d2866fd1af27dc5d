//! `wm.toml`: parsing and validation. Every error names the file, the line and
//! the key, on one line.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use toml::Spanned;

/// Workerman's default package limit.
pub const DEFAULT_MAX_PACKAGE: usize = 10 * 1024 * 1024;
/// Workerman's default per-connection send buffer limit.
pub const DEFAULT_MAX_SEND_BUFFER: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {msg}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub msg: String,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read config {0}: {1}")]
    Read(String, std::io::Error),
    /// The file is not there: say where we looked and how to get one.
    #[error("no config file at {0}; pass one with `-c FILE`, or create one with `wm-host new`")]
    Missing(String),
    #[error(transparent)]
    Invalid(#[from] ConfigError),
}

pub use wm_proto::Scheme;

/// What carries a listener's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    Tcp,
    /// `udp://`: each datagram is a message.
    Udp,
    /// `unix:///path`: a unix stream socket.
    Unix,
    /// TLS over TCP: `transport = "ssl"`, or the schemes `wss://` and
    /// `https://`.
    Ssl,
}

/// A parsed `listen = "scheme://host:port"` (or `unix:///path`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listen {
    pub scheme: Scheme,
    pub transport: Transport,
    /// tcp and udp: where to bind (unix: unspecified).
    pub addr: SocketAddr,
    /// unix: the socket file.
    pub path: Option<PathBuf>,
    /// As written, for logs and status.
    pub text: String,
}

impl Listen {
    pub fn parse(text: &str) -> Result<Listen, String> {
        let (scheme, rest) = text
            .split_once("://")
            .ok_or_else(|| format!("expected scheme://host:port, got {text:?}"))?;
        if scheme == "unix" {
            if !rest.starts_with('/') {
                return Err(format!(
                    "unix:// needs an absolute path (unix:///run/app.sock), got {text:?}"
                ));
            }
            return Ok(Listen {
                scheme: Scheme::Tcp,
                transport: Transport::Unix,
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                path: Some(PathBuf::from(rest)),
                text: text.to_string(),
            });
        }
        let (scheme, transport) = match scheme {
            "udp" => (Scheme::Tcp, Transport::Udp),
            "wss" => (Scheme::Websocket, Transport::Ssl),
            "https" => (Scheme::Http, Transport::Ssl),
            s => (
                Scheme::parse(s).ok_or_else(|| {
                    format!("unknown protocol {s:?} (supported: tcp, text, frame, websocket, ws, wss, http, https, custom, udp, unix)")
                })?,
                Transport::Tcp,
            ),
        };
        let addr = rest
            .to_socket_addrs()
            .map_err(|e| format!("bad address {rest:?}: {e}"))?
            .next()
            .ok_or_else(|| format!("address {rest:?} resolves to nothing"))?;
        Ok(Listen {
            scheme,
            transport,
            addr,
            path: None,
            text: text.to_string(),
        })
    }
}

/// `[worker.unix]`: who may use a unix:// listener's socket file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnixPerms {
    /// File mode (e.g. 0o660).
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// `[worker.tls]`: the files of an ssl listener, as configured (absolute).
/// The master reads and checks them at start and on every reload.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsFiles {
    /// PEM: the certificate, then the chain (intermediates).
    pub cert: PathBuf,
    /// PEM: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM: CA certificates; when set, clients must present a certificate
    /// they signed.
    pub client_ca: Option<PathBuf>,
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Everything a worker process needs to know, handed to it by the master.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerConfig {
    pub name: String,
    /// `None`: a worker without a listener (timers, publish, outbound
    /// connections only).
    pub listen: Option<Listen>,
    /// unix:// only: mode and owner of the socket file.
    #[serde(default)]
    pub unix: Option<UnixPerms>,
    /// ssl listeners only: certificate, key, client CA.
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    pub count: u32,
    pub plugin: PathBuf,
    pub reloadable: bool,
    pub options: BTreeMap<String, String>,
    pub max_package_size: usize,
    pub max_send_buffer_size: usize,
    /// Connections a worker holds at most; `None`: derived from the
    /// worker's descriptor limit (see [`connection_limit`]).
    pub max_connections: Option<usize>,
    /// http:// and websocket:// only: a request head (or the websocket
    /// handshake) must be complete this long after it began. `None`: off.
    pub header_timeout: Option<Duration>,
    /// A message (line, frame, websocket message with its fragments, HTTP
    /// request with its body) must be complete this long after its first
    /// byte arrived. `None`: off.
    pub message_timeout: Option<Duration>,
    /// Bytes of incomplete input one worker holds across its connections;
    /// past it the connection holding the most is closed.
    pub max_buffered_input: usize,
    /// http:// only: serve files from this folder before asking the plugin.
    pub static_dir: Option<PathBuf>,
    /// Reload when the plugin file (or a `watch_paths` entry) changes.
    pub watch: bool,
    pub watch_paths: Vec<PathBuf>,
    /// Close connections that sent nothing for this long (heartbeat).
    pub idle_timeout: Option<Duration>,
    /// websocket:// only: ping every connection this often.
    pub ws_ping_interval: Option<Duration>,
    /// permessage-deflate (RFC 7692): agreed to on the websocket:// listener
    /// when a client offers it, and offered by `ctx.connect("ws://…")`.
    pub ws_deflate: bool,
    /// Run the workers as this user (and group): uid, gid. The master keeps
    /// its privileges, so listeners can be bound below 1024.
    pub run_as: Option<(u32, u32)>,
    /// The user's name, for the startup table.
    pub user: Option<String>,
    /// A ready worker whose bus backlog has not moved for this long is
    /// killed and replaced.
    pub stuck_timeout: Duration,
    /// Recycle a worker (replaced new-before-old, as by a reload) once it
    /// has served this many messages / requests.
    pub max_requests: Option<u64>,
    /// Recycle a worker once its resident memory is over this many bytes.
    pub max_memory: Option<u64>,
    /// How a reload replaces this group's workers.
    #[serde(default)]
    pub reload_mode: ReloadMode,
}

/// `reload_mode`: what happens to established connections on a reload.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReloadMode {
    /// Each old worker hands its connections, and the plugin's state, to
    /// its replacement (when the new build supports it; else `Drain`).
    #[default]
    Handover,
    /// The old worker stops accepting, answers what arrived and closes its
    /// connections cleanly (websocket 1001, HTTP `Connection: close`).
    Drain,
}

impl WorkerConfig {
    /// The listen address as written, or "-" for a worker without one.
    pub fn listen_text(&self) -> &str {
        self.listen.as_ref().map_or("-", |l| l.text.as_str())
    }

    /// The listener's protocol, if it has a listener.
    pub fn scheme(&self) -> Option<Scheme> {
        self.listen.as_ref().map(|l| l.scheme)
    }
}

/// `stuck_timeout` when not set.
pub const DEFAULT_STUCK_TIMEOUT: Duration = Duration::from_secs(10);
/// `header_timeout` when not set.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// `message_timeout` when not set.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// `max_buffered_input` when not set: per worker.
pub const DEFAULT_MAX_BUFFERED_INPUT: usize = 64 << 20;
/// Descriptors a worker keeps for itself (its sockets, the plugin, its
/// outbound connections, logs) when `max_connections` is derived.
pub const FD_RESERVE: u64 = 64;

/// `max_connections` when not set: the worker's descriptor limit
/// (`RLIMIT_NOFILE`, soft) less [`FD_RESERVE`], and at least 1.
pub fn connection_limit(nofile: u64) -> usize {
    usize::try_from(nofile.saturating_sub(FD_RESERVE).max(1)).unwrap_or(usize::MAX)
}

/// `[host] log_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostConfig {
    pub runtime_dir: PathBuf,
    pub stop_timeout: Duration,
    pub start_timeout: Duration,
    pub stdout_file: PathBuf,
    pub log_file: PathBuf,
    /// How log lines are written: plain text, or one JSON object a line.
    pub log_format: LogFormat,
    /// sshd's StrictModes: refuse to start when the runtime dir, a plugin
    /// file or a folder above them could be changed by another user.
    pub strict_modes: bool,
    /// `admin = "127.0.0.1:9090"`: the master's HTTP listener for
    /// `/metrics`, `/status`, `/connections` and the dashboard. Off unless set.
    #[serde(default)]
    pub admin: Option<AdminConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// `admin_token` or the content of `admin_token_file`: every request
    /// must carry `Authorization: Bearer <token>`.
    pub token: Option<String>,
}

/// `admin`: `"host:port"` with an IP address (or `localhost`), or a bare
/// port (`"9090"`, `":9090"`), which binds loopback only.
pub fn parse_admin_addr(text: &str) -> Result<SocketAddr, String> {
    let t = text.trim();
    let port = t.strip_prefix(':').unwrap_or(t);
    if let Ok(p) = port.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
    }
    if let Some(p) = t.strip_prefix("localhost:") {
        if let Ok(p) = p.parse::<u16>() {
            return Ok(SocketAddr::from(([127, 0, 0, 1], p)));
        }
    }
    t.parse::<SocketAddr>()
        .map_err(|_| format!("expected \"127.0.0.1:9090\", \"[::1]:9090\" or a port, got {text:?}"))
}

/// `[bus]`: what carries groups, uids, broadcasts and publish between
/// worker processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusConfig {
    /// `None`: `local`, this host only. Else a `redis://` or `rediss://`
    /// URL: every host sharing it (and `namespace`) shares the bus.
    pub redis: Option<String>,
    /// Prefix of the Redis channel and keys, so clusters can share a server.
    pub namespace: String,
    /// How often this host tells the others it is alive.
    pub heartbeat: Duration,
    /// A host not heard of for this long is gone, its members with it.
    pub host_ttl: Duration,
    /// `rediss://` only: PEM files of the CAs to trust instead of the
    /// system's (`ca`), and a client certificate and key for a Redis with
    /// `tls-auth-clients yes` (`cert`, `key`).
    #[serde(default)]
    pub tls: BusTls,
}

/// `[bus] ca`, `cert`, `key`: TLS to Redis beyond the URL.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl Default for BusConfig {
    fn default() -> Self {
        BusConfig {
            redis: None,
            namespace: "wm".to_string(),
            heartbeat: Duration::from_secs(1),
            host_ttl: Duration::from_secs(5),
            tls: BusTls::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Config {
    /// The config file, absolute.
    pub path: PathBuf,
    pub host: HostConfig,
    #[serde(default)]
    pub bus: BusConfig,
    pub workers: Vec<WorkerConfig>,
}

// ---- raw TOML shape ----

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    host: RawHost,
    #[serde(default)]
    worker: Vec<RawWorker>,
    bus: Option<Spanned<RawBus>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawBus {
    backend: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    heartbeat: Option<Spanned<Dur>>,
    host_ttl: Option<Spanned<Dur>>,
    ca: Option<Spanned<String>>,
    cert: Option<Spanned<String>>,
    key: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawHost {
    runtime_dir: Option<String>,
    stop_timeout: Option<Dur>,
    start_timeout: Option<Dur>,
    stdout_file: Option<String>,
    log_file: Option<String>,
    log_format: Option<LogFormat>,
    strict_modes: Option<bool>,
    admin: Option<Spanned<String>>,
    admin_token: Option<Spanned<String>>,
    admin_token_file: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorker {
    name: Spanned<String>,
    listen: Option<Spanned<String>>,
    transport: Option<Spanned<String>>,
    unix: Option<Spanned<RawUnix>>,
    tls: Option<Spanned<RawTls>>,
    #[serde(default = "one")]
    count: Spanned<u32>,
    plugin: Spanned<String>,
    #[serde(default = "yes")]
    reloadable: bool,
    options: Option<Spanned<BTreeMap<String, toml::Value>>>,
    max_package_size: Option<Spanned<usize>>,
    max_send_buffer_size: Option<Spanned<usize>>,
    max_connections: Option<Spanned<usize>>,
    header_timeout: Option<Spanned<Dur>>,
    message_timeout: Option<Dur>,
    max_buffered_input: Option<Spanned<Size>>,
    static_dir: Option<Spanned<String>>,
    watch: Option<bool>,
    #[serde(default)]
    watch_paths: Vec<String>,
    idle_timeout: Option<Dur>,
    ws_ping_interval: Option<Spanned<Dur>>,
    ws_deflate: Option<bool>,
    user: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
    stuck_timeout: Option<Spanned<Dur>>,
    max_requests: Option<Spanned<u64>>,
    max_memory: Option<Spanned<Size>>,
    reload_mode: Option<ReloadMode>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUnix {
    mode: Option<String>,
    owner: Option<String>,
    group: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Spanned<String>,
    key: Spanned<String>,
    client_ca: Option<Spanned<String>>,
}

fn one() -> Spanned<u32> {
    Spanned::new(0..0, 1)
}
fn yes() -> bool {
    true
}

/// A duration written as "2s", "500ms", "1m 30s".
struct Dur(Duration);

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map(Dur).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {s:?} ({e}); write e.g. \"2s\" or \"500ms\""
            ))
        })
    }
}

/// A size in bytes: an integer, or a string with a unit: "256MiB", "512K",
/// "1GB" (K, M, G, KiB, MiB, GiB count in 1024s; KB, MB, GB in 1000s).
struct Size(u64);

impl Size {
    fn parse(s: &str) -> Option<u64> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let num: u64 = num.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kib" => 1 << 10,
            "m" | "mib" => 1 << 20,
            "g" | "gib" => 1 << 30,
            "kb" => 1_000,
            "mb" => 1_000_000,
            "gb" => 1_000_000_000,
            _ => return None,
        };
        num.checked_mul(mult)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        let bad = |s: &str| {
            serde::de::Error::custom(format!(
                "invalid size {s:?}; write bytes, or e.g. \"256MiB\" or \"1G\""
            ))
        };
        match Raw::deserialize(d)? {
            Raw::Bytes(n) => Ok(Size(n)),
            Raw::Text(s) => Size::parse(&s).map(Size).ok_or_else(|| bad(&s)),
        }
    }
}

struct Source<'a> {
    file: String,
    text: &'a str,
}

impl Source<'_> {
    fn line_of(&self, offset: usize) -> usize {
        self.text[..offset.min(self.text.len())]
            .matches('\n')
            .count()
            + 1
    }

    fn error(&self, span: Option<Range<usize>>, msg: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.file.clone(),
            line: span.map(|s| self.line_of(s.start)).unwrap_or(0),
            msg: msg.into(),
        }
    }

    fn key_error(&self, span: Range<usize>, key: &str, msg: impl fmt::Display) -> ConfigError {
        self.error(Some(span), format!("{key}: {msg}"))
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, LoadError> {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LoadError::Missing(abs.display().to_string()),
            _ => LoadError::Read(path.display().to_string(), e),
        })?;
        Ok(Config::parse(&text, &abs)?)
    }

    /// Parses config text; relative paths are resolved against `path`'s folder.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let src = Source {
            file: path.display().to_string(),
            text,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            // toml's own message spans several lines with a drawing; keep one.
            let msg = e.message().trim().replace('\n', " ");
            let key = e
                .span()
                .and_then(|s| key_at(text, s.start))
                .map(|k| format!("{k}: "))
                .unwrap_or_default();
            src.error(e.span(), format!("{key}{msg}"))
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        let rel = |p: &str| normalize(&base.join(p));
        let runtime_dir = rel(raw.host.runtime_dir.as_deref().unwrap_or("run"));
        let admin = parse_admin(&src, &raw.host, &rel)?;
        let host = HostConfig {
            stop_timeout: raw
                .host
                .stop_timeout
                .map_or(Duration::from_secs(2), |d| d.0),
            start_timeout: raw
                .host
                .start_timeout
                .map_or(Duration::from_secs(30), |d| d.0),
            stdout_file: raw
                .host
                .stdout_file
                .as_deref()
                .map_or_else(|| PathBuf::from("/dev/null"), rel),
            log_file: raw
                .host
                .log_file
                .as_deref()
                .map_or_else(|| runtime_dir.join("wm-host.log"), rel),
            log_format: raw.host.log_format.unwrap_or_default(),
            strict_modes: raw.host.strict_modes.unwrap_or(true),
            admin,
            runtime_dir,
        };

        let bus = match &raw.bus {
            None => BusConfig::default(),
            Some(b) => parse_bus(&src, b.get_ref(), &rel)?,
        };
        if raw.worker.is_empty() {
            return Err(src.error(None, "no [[worker]] table: nothing to run"));
        }
        let mut workers: Vec<WorkerConfig> = Vec::new();
        for w in raw.worker {
            let name = w.name.get_ref().trim().to_string();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(src.key_error(
                    w.name.span(),
                    "name",
                    "must be non-empty, without spaces",
                ));
            }
            if workers.iter().any(|o| o.name == name) {
                return Err(src.key_error(
                    w.name.span(),
                    "name",
                    format!("duplicate worker name {name:?}"),
                ));
            }
            let mut listen = match &w.listen {
                Some(l) => Some(
                    Listen::parse(l.get_ref()).map_err(|e| src.key_error(l.span(), "listen", e))?,
                ),
                None => None,
            };
            if let Some(t) = &w.transport {
                let Some(l) = listen.as_mut() else {
                    return Err(src.key_error(t.span(), "transport", "needs `listen`"));
                };
                match (t.get_ref().as_str(), l.transport) {
                    ("ssl", Transport::Tcp | Transport::Ssl) => l.transport = Transport::Ssl,
                    ("tcp", Transport::Tcp) => {}
                    ("tcp", Transport::Ssl) => {
                        return Err(src.key_error(
                            t.span(),
                            "transport",
                            format!("{:?} is TLS by its scheme", l.text),
                        ));
                    }
                    ("ssl", _) => {
                        return Err(src.key_error(
                            t.span(),
                            "transport",
                            "ssl works over TCP only, not udp:// or unix://",
                        ));
                    }
                    (other, _) => {
                        return Err(src.key_error(
                            t.span(),
                            "transport",
                            format!("{other:?}: expected \"tcp\" or \"ssl\" (udp:// and unix:// are chosen by `listen`)"),
                        ));
                    }
                }
            }
            let ssl = listen.as_ref().map(|l| l.transport) == Some(Transport::Ssl);
            let tls = match (&w.tls, ssl) {
                (Some(t), false) => {
                    return Err(src.key_error(
                        t.span(),
                        "tls",
                        "only ssl listeners (transport = \"ssl\", wss://, https://) use a certificate",
                    ));
                }
                (None, true) => {
                    let span = w
                        .transport
                        .as_ref()
                        .map(|t| t.span())
                        .or(w.listen.as_ref().map(|l| l.span()));
                    return Err(src.error(
                        span,
                        "tls: an ssl listener needs [worker.tls] with `cert` and `key` (PEM files)",
                    ));
                }
                (Some(t), true) => {
                    let t = t.get_ref();
                    let file = |v: &Spanned<String>, key: &str| {
                        if v.get_ref().trim().is_empty() {
                            Err(src.key_error(v.span(), key, "must name a PEM file"))
                        } else {
                            Ok(rel(v.get_ref()))
                        }
                    };
                    Some(TlsFiles {
                        cert: file(&t.cert, "tls.cert")?,
                        key: file(&t.key, "tls.key")?,
                        client_ca: match &t.client_ca {
                            Some(c) => Some(file(c, "tls.client_ca")?),
                            None => None,
                        },
                    })
                }
                (None, false) => None,
            };
            let scheme = listen.as_ref().map(|l| l.scheme);
            let unix = match &w.unix {
                None => None,
                Some(u) if listen.as_ref().map(|l| l.transport) != Some(Transport::Unix) => {
                    return Err(src.key_error(
                        u.span(),
                        "unix",
                        "only unix:// listeners have a socket file",
                    ));
                }
                Some(u) => {
                    let r = u.get_ref();
                    let mode = match &r.mode {
                        Some(m) => Some(
                            u32::from_str_radix(m.trim_start_matches("0o"), 8)
                                .ok()
                                .filter(|m| *m <= 0o777)
                                .ok_or_else(|| {
                                    src.key_error(
                                        u.span(),
                                        "unix.mode",
                                        format!("{m:?} is not an octal file mode such as \"0660\""),
                                    )
                                })?,
                        ),
                        None => None,
                    };
                    let uid = match &r.owner {
                        Some(o) => Some(
                            nix::unistd::User::from_name(o)
                                .ok()
                                .flatten()
                                .ok_or_else(|| {
                                    src.key_error(
                                        u.span(),
                                        "unix.owner",
                                        format!("no such user {o:?}"),
                                    )
                                })?
                                .uid
                                .as_raw(),
                        ),
                        None => None,
                    };
                    let gid = match &r.group {
                        Some(g) => Some(
                            nix::unistd::Group::from_name(g)
                                .ok()
                                .flatten()
                                .ok_or_else(|| {
                                    src.key_error(
                                        u.span(),
                                        "unix.group",
                                        format!("no such group {g:?}"),
                                    )
                                })?
                                .gid
                                .as_raw(),
                        ),
                        None => None,
                    };
                    Some(UnixPerms { mode, uid, gid })
                }
            };
            if *w.count.get_ref() == 0 {
                return Err(src.key_error(w.count.span(), "count", "must be at least 1"));
            }
            let mut options = BTreeMap::new();
            let run_as = match &w.user {
                None => {
                    if let Some(g) = &w.group {
                        return Err(src.key_error(g.span(), "group", "needs `user` too"));
                    }
                    None
                }
                Some(u) => {
                    let user = nix::unistd::User::from_name(u.get_ref())
                        .ok()
                        .flatten()
                        .ok_or_else(|| {
                            src.key_error(
                                u.span(),
                                "user",
                                format!("no such user {:?}", u.get_ref()),
                            )
                        })?;
                    let gid = match &w.group {
                        None => user.gid.as_raw(),
                        Some(g) => nix::unistd::Group::from_name(g.get_ref())
                            .ok()
                            .flatten()
                            .ok_or_else(|| {
                                src.key_error(
                                    g.span(),
                                    "group",
                                    format!("no such group {:?}", g.get_ref()),
                                )
                            })?
                            .gid
                            .as_raw(),
                    };
                    Some((user.uid.as_raw(), gid))
                }
            };
            let ws_ping_interval = match &w.ws_ping_interval {
                Some(d) if scheme != Some(Scheme::Websocket) => {
                    return Err(src.key_error(
                        d.span(),
                        "ws_ping_interval",
                        "only websocket:// listeners ping",
                    ));
                }
                Some(d) => Some(d.get_ref().0).filter(|d| !d.is_zero()),
                None => None,
            };
            // TLS handshakes are held to it too.
            let has_head = ssl || matches!(scheme, Some(Scheme::Http | Scheme::Websocket));
            let header_timeout = match &w.header_timeout {
                Some(d) if !has_head => {
                    return Err(src.key_error(
                        d.span(),
                        "header_timeout",
                        "only http://, websocket:// and ssl listeners read a header or handshake",
                    ));
                }
                Some(d) => Some(d.get_ref().0).filter(|d| !d.is_zero()),
                None => has_head.then_some(DEFAULT_HEADER_TIMEOUT),
            };
            let message_timeout = match &w.message_timeout {
                Some(d) => Some(d.0).filter(|d| !d.is_zero()),
                None => Some(DEFAULT_MESSAGE_TIMEOUT),
            };
            let static_dir = match &w.static_dir {
                Some(d) if scheme != Some(Scheme::Http) => {
                    return Err(src.key_error(
                        d.span(),
                        "static_dir",
                        "only http:// listeners serve files",
                    ));
                }
                Some(d) => Some(rel(d.get_ref())),
                None => None,
            };
            let no_options = Spanned::new(0..0, BTreeMap::new());
            let raw_options = w.options.as_ref().unwrap_or(&no_options);
            for (k, v) in raw_options.get_ref() {
                let v = match v {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_) => {
                        v.to_string()
                    }
                    _ => {
                        return Err(src.key_error(
                            raw_options.span(),
                            &format!("options.{k}"),
                            "must be a string, number or boolean",
                        ))
                    }
                };
                options.insert(k.clone(), v);
            }
            let stuck_timeout = match &w.stuck_timeout {
                Some(d) if d.get_ref().0.is_zero() => {
                    return Err(src.key_error(d.span(), "stuck_timeout", "must be more than 0"));
                }
                Some(d) => d.get_ref().0,
                None => DEFAULT_STUCK_TIMEOUT,
            };
            let at_least_one = |v: Option<(Range<usize>, u64)>, key: &str| match v {
                Some((span, 0)) => Err(src.key_error(span, key, "must be at least 1")),
                Some((_, n)) => Ok(Some(n)),
                None => Ok(None),
            };
            let max_requests = at_least_one(
                w.max_requests.as_ref().map(|v| (v.span(), *v.get_ref())),
                "max_requests",
            )?;
            let max_memory = at_least_one(
                w.max_memory.as_ref().map(|v| (v.span(), v.get_ref().0)),
                "max_memory",
            )?;
            let positive = |v: &Option<Spanned<usize>>, key: &str, default: usize| match v {
                Some(s) if *s.get_ref() == 0 => {
                    Err(src.key_error(s.span(), key, "must be at least 1"))
                }
                Some(s) => Ok(*s.get_ref()),
                None => Ok(default),
            };
            workers.push(WorkerConfig {
                listen,
                unix,
                tls,
                count: *w.count.get_ref(),
                plugin: rel(w.plugin.get_ref()),
                reloadable: w.reloadable,
                options,
                max_package_size: positive(
                    &w.max_package_size,
                    "max_package_size",
                    DEFAULT_MAX_PACKAGE,
                )?,
                max_send_buffer_size: positive(
                    &w.max_send_buffer_size,
                    "max_send_buffer_size",
                    DEFAULT_MAX_SEND_BUFFER,
                )?,
                max_connections: match &w.max_connections {
                    Some(_) => Some(positive(&w.max_connections, "max_connections", 0)?),
                    None => None,
                },
                header_timeout,
                message_timeout,
                max_buffered_input: match &w.max_buffered_input {
                    Some(s) if s.get_ref().0 == 0 => {
                        return Err(src.key_error(
                            s.span(),
                            "max_buffered_input",
                            "must be more than 0",
                        ));
                    }
                    Some(s) => usize::try_from(s.get_ref().0).unwrap_or(usize::MAX),
                    None => DEFAULT_MAX_BUFFERED_INPUT,
                },
                static_dir,
                watch: w.watch.unwrap_or(true),
                idle_timeout: w.idle_timeout.map(|d| d.0).filter(|d| !d.is_zero()),
                ws_ping_interval,
                ws_deflate: w.ws_deflate.unwrap_or(false),
                user: w.user.as_ref().map(|u| u.get_ref().clone()),
                run_as,
                watch_paths: w.watch_paths.iter().map(|p| rel(p)).collect(),
                stuck_timeout,
                max_requests,
                max_memory,
                reload_mode: w.reload_mode.unwrap_or_default(),
                name,
            });
        }
        Ok(Config {
            path: path.to_path_buf(),
            host,
            bus,
            workers,
        })
    }

    pub fn pid_file(&self) -> PathBuf {
        self.host.runtime_dir.join("wm-host.pid")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.host.runtime_dir.join("wm-host.sock")
    }
}

/// `admin`, `admin_token` and `admin_token_file` of `[host]`.
fn parse_admin(
    src: &Source<'_>,
    h: &RawHost,
    rel: &dyn Fn(&str) -> PathBuf,
) -> Result<Option<AdminConfig>, ConfigError> {
    let token = match (&h.admin_token, &h.admin_token_file) {
        (Some(_), Some(f)) => {
            return Err(src.key_error(
                f.span(),
                "admin_token_file",
                "set either admin_token or admin_token_file, not both",
            ))
        }
        (Some(t), None) => Some((t.span(), "admin_token", t.get_ref().trim().to_string())),
        (None, Some(f)) => {
            let path = rel(f.get_ref());
            let text = std::fs::read_to_string(&path).map_err(|e| {
                src.key_error(
                    f.span(),
                    "admin_token_file",
                    format!("{}: {e}", path.display()),
                )
            })?;
            Some((f.span(), "admin_token_file", text.trim().to_string()))
        }
        (None, None) => None,
    };
    if let Some((span, key, t)) = &token {
        // Sent unencoded in `?access_token=` and compared as sent: a `+`,
        // `%`, `&` or `#` would be read differently by the page and the
        // server. These are safe in a URL and in a Bearer header (RFC 6750).
        let ok = |c: char| c.is_ascii_alphanumeric() || "._~-".contains(c);
        if t.is_empty() || !t.chars().all(ok) {
            return Err(src.key_error(
                span.clone(),
                key,
                "the token must be non-empty and only letters, digits, `.`, `_`, `~` or `-`",
            ));
        }
    }
    let Some(a) = &h.admin else {
        if let Some((span, key, _)) = token {
            return Err(src.key_error(span, key, "needs `admin` (the address to listen on)"));
        }
        return Ok(None);
    };
    let addr = parse_admin_addr(a.get_ref()).map_err(|e| src.key_error(a.span(), "admin", e))?;
    Ok(Some(AdminConfig {
        addr,
        token: token.map(|t| t.2),
    }))
}

fn parse_bus(
    src: &Source<'_>,
    b: &RawBus,
    rel: &dyn Fn(&str) -> PathBuf,
) -> Result<BusConfig, ConfigError> {
    let mut bus = BusConfig::default();
    if let Some(v) = &b.backend {
        let text = v.get_ref().trim();
        if text != "local" {
            if !(text.starts_with("redis://") || text.starts_with("rediss://")) {
                return Err(src.key_error(
                    v.span(),
                    "backend",
                    format!("expected \"local\" or a redis:// or rediss:// URL, got {text:?}"),
                ));
            }
            // Parsed (not connected) now, so a bad URL or a TLS URL this
            // build cannot serve fails at start, with its line.
            redis::Client::open(text).map_err(|e| {
                src.key_error(
                    v.span(),
                    "backend",
                    format!("{}: {e}", crate::cluster::redact(text)),
                )
            })?;
            bus.redis = Some(text.to_string());
        }
    }
    if let Some(ns) = &b.namespace {
        let n = ns.get_ref().trim();
        if n.is_empty() || n.contains(char::is_whitespace) {
            return Err(src.key_error(ns.span(), "namespace", "must be non-empty, without spaces"));
        }
        bus.namespace = n.to_string();
    }
    if let Some(h) = &b.heartbeat {
        if h.get_ref().0 < Duration::from_millis(10) {
            return Err(src.key_error(h.span(), "heartbeat", "must be at least 10ms"));
        }
        bus.heartbeat = h.get_ref().0;
    }
    if let Some(t) = &b.host_ttl {
        bus.host_ttl = t.get_ref().0;
    }
    if bus.host_ttl < 2 * bus.heartbeat {
        let span = b
            .host_ttl
            .as_ref()
            .or(b.heartbeat.as_ref())
            .map(|s| s.span());
        return Err(src.error(
            span,
            format!(
                "host_ttl ({:?}) must be at least twice heartbeat ({:?})",
                bus.host_ttl, bus.heartbeat
            ),
        ));
    }
    let tls = bus
        .redis
        .as_deref()
        .is_some_and(|u| u.starts_with("rediss://"));
    let file = |v: &Option<Spanned<String>>, key: &str| match v {
        None => Ok(None),
        Some(_) if !tls => Err(src.key_error(
            v.as_ref().unwrap().span(),
            key,
            "only for TLS to Redis (backend = \"rediss://…\")",
        )),
        Some(p) if p.get_ref().trim().is_empty() => {
            Err(src.key_error(p.span(), key, "must name a PEM file"))
        }
        Some(p) => Ok(Some(rel(p.get_ref().trim()))),
    };
    bus.tls = BusTls {
        ca: file(&b.ca, "ca")?,
        cert: file(&b.cert, "cert")?,
        key: file(&b.key, "key")?,
    };
    if let (Some(v), None) | (None, Some(v)) = (&b.cert, &b.key) {
        if tls {
            return Err(src.error(
                Some(v.span()),
                "cert and key: a client certificate needs both (PEM files)",
            ));
        }
    }
    Ok(bus)
}

/// Resolves `.` and `..` without touching the file system (the file may not
/// exist yet), so logs and status show plain paths.
fn normalize(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The key on the line holding `offset`, when that line is `key = …` or the
/// offset sits on a bare key.
fn key_at(text: &str, offset: usize) -> Option<String> {
    let start = text[..offset.min(text.len())]
        .rfind('\n')
        .map_or(0, |i| i + 1);
    let line = text[start..].lines().next()?;
    let key = line.split('=').next()?.trim();
    let ok = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_alphanumeric() || "_-.\"".contains(c));
    ok.then(|| key.trim_matches('"').to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/srv/app/wm.toml"))
    }

    const MINIMAL: &str = "[[worker]]\nname = \"echo\"\nlisten = \"text://127.0.0.1:2347\"\nplugin = \"libecho.so\"\n";

    #[test]
    fn minimal_config_gets_workerman_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.host.stop_timeout, Duration::from_secs(2));
        assert_eq!(c.host.runtime_dir, Path::new("/srv/app/run"));
        assert_eq!(c.host.stdout_file, Path::new("/dev/null"));
        let w = &c.workers[0];
        assert_eq!(w.count, 1);
        assert!(w.reloadable);
        assert_eq!(w.plugin, Path::new("/srv/app/libecho.so"));
        let c = parse(&MINIMAL.replace("libecho.so", "../target/./libecho.so")).unwrap();
        assert_eq!(c.workers[0].plugin, Path::new("/srv/target/libecho.so"));
        let l = w.listen.as_ref().unwrap();
        assert_eq!(l.scheme, Scheme::Text);
        assert_eq!(l.addr, "127.0.0.1:2347".parse().unwrap());
        assert_eq!(w.max_package_size, DEFAULT_MAX_PACKAGE);
        assert!(c.host.strict_modes, "StrictModes are on unless turned off");
    }

    #[test]
    fn admin_is_off_by_default_and_a_bare_port_binds_loopback() {
        assert_eq!(parse(MINIMAL).unwrap().host.admin, None);
        for (text, addr) in [
            ("9090", "127.0.0.1:9090"),
            (":9090", "127.0.0.1:9090"),
            ("localhost:9091", "127.0.0.1:9091"),
            ("0.0.0.0:9092", "0.0.0.0:9092"),
            ("[::1]:9093", "[::1]:9093"),
        ] {
            let c = parse(&format!("[host]\nadmin = \"{text}\"\n{MINIMAL}")).unwrap();
            let a = c.host.admin.unwrap();
            assert_eq!((a.addr, a.token), (addr.parse().unwrap(), None), "{text}");
        }
        let c = parse(&format!(
            "[host]\nadmin = \"9090\"\nadmin_token = \" s3cret \"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.host.admin.unwrap().token.as_deref(), Some("s3cret"));
    }

    #[test]
    fn admin_errors_name_the_key_and_line() {
        let err = |host: &str| {
            parse(&format!("[host]\n{host}{MINIMAL}"))
                .unwrap_err()
                .to_string()
        };
        let e = err("admin = \"example.org:80\"\n");
        assert!(e.contains(":2:") && e.contains("admin:"), "{e}");
        let e = err("admin_token = \"x\"\n");
        assert!(e.contains("admin_token: needs `admin`"), "{e}");
        let e = err("admin = \"1\"\nadmin_token = \"\"\n");
        assert!(
            e.contains(":3:") && e.contains("admin_token: the token"),
            "{e}"
        );
        for bad in ["a+b", "a%20b", "a&b", "a#b", "a b", "a/b", "a=b", "t\u{e9}"] {
            let e = err(&format!("admin = \"1\"\nadmin_token = \"{bad}\"\n"));
            assert!(
                e.contains(":3:") && e.contains("admin_token: the token"),
                "{bad}: {e}"
            );
        }
        let c = parse(&format!(
            "[host]\nadmin = \"1\"\nadmin_token = \"Az09._~-\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.host.admin.unwrap().token.as_deref(), Some("Az09._~-"));
        let e = err("admin = \"1\"\nadmin_token = \"a\"\nadmin_token_file = \"t\"\n");
        assert!(e.contains("admin_token_file: set either"), "{e}");
        let e = err("admin = \"1\"\nadmin_token_file = \"/nonexistent/token\"\n");
        assert!(
            e.contains("admin_token_file: /nonexistent/token:"),
            "the file is named: {e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "a+b\n").unwrap();
        let e = Config::parse(
            &format!("[host]\nadmin = \"1\"\nadmin_token_file = \"token\"\n{MINIMAL}"),
            &dir.path().join("wm.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains(":3:") && e.contains("admin_token_file: the token"),
            "{e}"
        );
        std::fs::write(&file, "from-file\n").unwrap();
        let c = Config::parse(
            &format!("[host]\nadmin = \"1\"\nadmin_token_file = \"token\"\n{MINIMAL}"),
            &dir.path().join("wm.toml"),
        )
        .unwrap();
        assert_eq!(c.host.admin.unwrap().token.as_deref(), Some("from-file"));
    }

    #[test]
    fn log_format_is_text_json_or_an_error_naming_the_key() {
        assert_eq!(parse(MINIMAL).unwrap().host.log_format, LogFormat::Text);
        let json = parse(&format!("[host]\nlog_format = \"json\"\n{MINIMAL}")).unwrap();
        assert_eq!(json.host.log_format, LogFormat::Json);
        let e = parse(&format!("[host]\nlog_format = \"xml\"\n{MINIMAL}")).unwrap_err();
        let e = e.to_string();
        assert!(e.contains("log_format") && e.contains("xml"), "{e}");
        assert!(e.contains("/srv/app/wm.toml:2"), "{e}");
    }

    #[test]
    fn a_missing_config_says_where_it_looked_and_how_to_get_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wm.toml");
        let e = Config::load(&path).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()), "{e}");
        assert!(e.contains("-c FILE") && e.contains("wm-host new"), "{e}");
    }

    #[test]
    fn full_config_parses() {
        let text = "[host]\nruntime_dir = \"/tmp/x\"\nstop_timeout = \"500ms\"\nlog_file = \"l.log\"\n\
            [[worker]]\nname = \"a\"\nlisten = \"frame://0.0.0.0:9000\"\ncount = 4\nplugin = \"/p.so\"\nreloadable = false\n\
            [worker.options]\ngreeting = \"hi\"\nlimit = 5\n";
        let c = parse(text).unwrap();
        assert_eq!(c.host.stop_timeout, Duration::from_millis(500));
        assert_eq!(c.host.log_file, Path::new("/srv/app/l.log"));
        let dev = parse(&format!("[host]\nstrict_modes = false\n{MINIMAL}")).unwrap();
        assert!(!dev.host.strict_modes);
        let w = &c.workers[0];
        assert_eq!((w.count, w.reloadable), (4, false));
        assert_eq!(w.options["greeting"], "hi");
        assert_eq!(w.options["limit"], "5");
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse(&format!("{MINIMAL}colour = \"red\"\n")).unwrap_err();
        let text = err.to_string();
        assert_eq!(err.line, 5, "{text}");
        assert!(text.contains("colour"), "{text}");
        assert!(!text.contains('\n'), "{text}");
    }

    #[test]
    fn bad_duration_names_key_and_line() {
        let err = parse(&format!("[host]\nstop_timeout = \"2 parsecs\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.msg.starts_with("stop_timeout:"), "{}", err.msg);
    }

    #[test]
    fn bad_listen_names_key_and_line() {
        let err = parse(&MINIMAL.replace("text://", "smtp://")).unwrap_err();
        assert_eq!(err.line, 3);
        assert!(
            err.msg.contains("listen") && err.msg.contains("smtp"),
            "{}",
            err.msg
        );
        let err = parse(&MINIMAL.replace("127.0.0.1:2347", "nowhere")).unwrap_err();
        assert!(err.msg.contains("listen"), "{}", err.msg);
    }

    #[test]
    fn zero_count_and_duplicate_names_are_refused() {
        let err = parse(&MINIMAL.replace("plugin", "count = 0\nplugin")).unwrap_err();
        assert!(err.msg.starts_with("count:"), "{}", err.msg);
        let err = parse(&format!("{MINIMAL}{MINIMAL}")).unwrap_err();
        assert!(err.msg.contains("duplicate"), "{}", err.msg);
        assert_eq!(err.line, 6);
    }

    #[test]
    fn recycling_and_stuck_keys_parse_with_units() {
        let c = parse(MINIMAL).unwrap();
        let w = &c.workers[0];
        assert_eq!(
            (w.max_requests, w.max_memory, w.stuck_timeout),
            (None, None, DEFAULT_STUCK_TIMEOUT)
        );
        for (text, bytes) in [
            ("1048576", 1 << 20),
            ("\"256MiB\"", 256 << 20),
            ("\"512K\"", 512 << 10),
            ("\"1 G\"", 1 << 30),
            ("\"2MB\"", 2_000_000),
        ] {
            let c = parse(&format!(
                "{MINIMAL}max_requests = 100000\nmax_memory = {text}\nstuck_timeout = \"3s\"\n"
            ))
            .unwrap();
            let w = &c.workers[0];
            assert_eq!(w.max_memory, Some(bytes), "{text}");
            assert_eq!(w.max_requests, Some(100_000));
            assert_eq!(w.stuck_timeout, Duration::from_secs(3));
        }
        for (line, key) in [
            ("max_memory = \"lots\"", "max_memory"),
            ("max_memory = 0", "max_memory"),
            ("max_requests = 0", "max_requests"),
            ("stuck_timeout = \"0s\"", "stuck_timeout"),
        ] {
            let err = parse(&format!("{MINIMAL}{line}\n")).unwrap_err();
            assert_eq!(err.line, 5, "{err}");
            assert!(err.msg.starts_with(&format!("{key}:")), "{err}");
        }
    }

    #[test]
    fn slow_client_limits_have_defaults_and_per_scheme_rules() {
        let c = parse(MINIMAL).unwrap();
        let w = &c.workers[0];
        assert_eq!(w.header_timeout, None, "text:// has no header");
        assert_eq!(w.message_timeout, Some(DEFAULT_MESSAGE_TIMEOUT));
        assert_eq!(w.max_buffered_input, DEFAULT_MAX_BUFFERED_INPUT);
        assert_eq!(w.max_connections, None);
        let http = MINIMAL.replace("text://", "http://");
        let c = parse(&http).unwrap();
        assert_eq!(c.workers[0].header_timeout, Some(DEFAULT_HEADER_TIMEOUT));
        let c = parse(&format!(
            "{http}header_timeout = \"1s\"\nmessage_timeout = \"0s\"\nmax_buffered_input = \"16MiB\"\nmax_connections = 5\n"
        ))
        .unwrap();
        let w = &c.workers[0];
        assert_eq!(w.header_timeout, Some(Duration::from_secs(1)));
        assert_eq!(w.message_timeout, None, "0s turns it off");
        assert_eq!(w.max_buffered_input, 16 << 20);
        assert_eq!(w.max_connections, Some(5));
        for (line, key) in [
            ("header_timeout = \"1s\"", "header_timeout"),
            ("max_buffered_input = 0", "max_buffered_input"),
            ("max_connections = 0", "max_connections"),
        ] {
            let err = parse(&format!("{MINIMAL}{line}\n")).unwrap_err();
            assert_eq!(err.line, 5, "{err}");
            assert!(err.msg.starts_with(&format!("{key}:")), "{err}");
        }
        assert_eq!(connection_limit(20_000), 20_000 - FD_RESERVE as usize);
        assert_eq!(connection_limit(10), 1);
    }

    #[test]
    fn bus_defaults_to_local_and_takes_redis_urls() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.bus, BusConfig::default());
        assert_eq!(c.bus.redis, None);
        let c = parse(&format!(
            "[bus]\nbackend = \"redis://:pw@10.0.0.2:6380/1\"\nnamespace = \"chat\"\n\
             heartbeat = \"500ms\"\nhost_ttl = \"3s\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(c.bus.redis.as_deref(), Some("redis://:pw@10.0.0.2:6380/1"));
        assert_eq!(c.bus.namespace, "chat");
        assert_eq!(c.bus.heartbeat, Duration::from_millis(500));
        assert_eq!(c.bus.host_ttl, Duration::from_secs(3));
        let local = parse(&format!("[bus]\nbackend = \"local\"\n{MINIMAL}")).unwrap();
        assert_eq!(local.bus.redis, None);
        let err = parse(&format!("[bus]\nbackend = \"amqp://x\"\n{MINIMAL}")).unwrap_err();
        assert_eq!(err.line, 2, "{err}");
        assert!(err.msg.starts_with("backend:"), "{err}");
        let err = parse(&format!(
            "[bus]\nbackend = \"redis://h\"\nheartbeat = \"2s\"\nhost_ttl = \"3s\"\n{MINIMAL}"
        ))
        .unwrap_err();
        assert_eq!(err.line, 4, "{err}");
        assert!(err.msg.contains("twice heartbeat"), "{err}");
    }

    #[test]
    fn bus_tls_files_resolve_beside_the_config_and_need_rediss() {
        let c = parse(&format!(
            "[bus]\nbackend = \"rediss://redis.example:6380/0\"\nca = \"certs/ca.pem\"\n\
             cert = \"certs/wm.pem\"\nkey = \"/etc/wm/wm.key\"\n{MINIMAL}"
        ))
        .unwrap();
        assert_eq!(
            c.bus.tls.ca.as_deref(),
            Some(Path::new("/srv/app/certs/ca.pem"))
        );
        assert_eq!(
            c.bus.tls.cert.as_deref(),
            Some(Path::new("/srv/app/certs/wm.pem"))
        );
        assert_eq!(c.bus.tls.key.as_deref(), Some(Path::new("/etc/wm/wm.key")));
        let err = parse(&format!(
            "[bus]\nbackend = \"redis://h\"\nca = \"ca.pem\"\n{MINIMAL}"
        ))
        .unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.msg.starts_with("ca: only for TLS"), "{err}");
        let err = parse(&format!(
            "[bus]\nbackend = \"rediss://h\"\ncert = \"wm.pem\"\n{MINIMAL}"
        ))
        .unwrap_err();
        assert_eq!(err.line, 3, "{err}");
        assert!(err.msg.contains("needs both"), "{err}");
    }

    #[test]
    fn the_chat_cluster_example_parses_and_shares_one_redis() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/chat-cluster");
        let a = Config::load(&dir.join("a/wm.toml")).unwrap();
        let b = Config::load(&dir.join("b/wm.toml")).unwrap();
        assert_eq!(a.bus, b.bus);
        assert!(a.bus.redis.is_some());
        assert_ne!(a.host.runtime_dir, b.host.runtime_dir);
        assert_ne!(a.workers[0].listen, b.workers[0].listen);
    }

    /// `wm-host start` from the repository root runs the same chat demo as
    /// `make run` (examples/chat/wm.toml): same plugin, page, ports and runtime dir.
    #[test]
    fn the_root_config_is_the_chat_example_from_the_repository_root() {
        let root = normalize(&Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
        let top = Config::load(&root.join("wm.toml")).unwrap();
        let example = Config::load(&root.join("examples/chat/wm.toml")).unwrap();
        assert_eq!(top.host.runtime_dir, example.host.runtime_dir);
        assert_eq!(top.host.runtime_dir, root.join("run/chat"));
        assert_eq!(top.workers.len(), example.workers.len());
        for (a, b) in top.workers.iter().zip(&example.workers) {
            assert_eq!((&a.name, &a.listen, a.count), (&b.name, &b.listen, b.count));
            assert_eq!(a.plugin, root.join("target/debug/libchat_plugin.so"));
            assert_eq!(a.plugin, b.plugin);
            assert_eq!(a.static_dir, b.static_dir);
            assert_eq!(a.options, b.options);
        }
        let web = top.workers.iter().find(|w| w.name == "web").unwrap();
        let page = web.static_dir.as_ref().unwrap().join("index.html");
        assert!(page.is_file(), "{} is missing", page.display());
    }

    #[test]
    fn ws_deflate_is_off_unless_asked() {
        let ws = MINIMAL.replace("text://", "websocket://");
        assert!(!parse(&ws).unwrap().workers[0].ws_deflate);
        let c = parse(&format!("{ws}ws_deflate = true\n")).unwrap();
        assert!(c.workers[0].ws_deflate);
        let err = parse(&format!("{ws}ws_deflate = \"yes\"\n")).unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(err.msg.starts_with("ws_deflate:"), "{err}");
    }

    #[test]
    fn reload_mode_defaults_to_handover() {
        assert_eq!(
            parse(MINIMAL).unwrap().workers[0].reload_mode,
            ReloadMode::Handover
        );
        let c = parse(&format!("{MINIMAL}reload_mode = \"drain\"\n")).unwrap();
        assert_eq!(c.workers[0].reload_mode, ReloadMode::Drain);
        let err = parse(&format!("{MINIMAL}reload_mode = \"rolling\"\n")).unwrap_err();
        assert_eq!(err.line, 5, "{err}");
        assert!(
            err.msg.contains("reload_mode") || err.msg.contains("drain"),
            "{err}"
        );
    }

    #[test]
    fn ssl_listeners_need_a_certificate_and_name_key_and_line() {
        let tls = "[worker.tls]\ncert = \"certs/a.pem\"\nkey = \"/k.pem\"\n";
        let c = parse(&format!("{}{tls}", MINIMAL.replace("text://", "wss://"))).unwrap();
        let w = &c.workers[0];
        let l = w.listen.as_ref().unwrap();
        assert_eq!((l.scheme, l.transport), (Scheme::Websocket, Transport::Ssl));
        let files = w.tls.as_ref().unwrap();
        assert_eq!(files.cert, Path::new("/srv/app/certs/a.pem"));
        assert_eq!(files.key, Path::new("/k.pem"));
        assert_eq!(files.client_ca, None);
        let https = Listen::parse("https://127.0.0.1:8443").unwrap();
        assert_eq!(
            (https.scheme, https.transport),
            (Scheme::Http, Transport::Ssl)
        );
        // transport = "ssl" on any TCP scheme.
        let c = parse(&format!(
            "{MINIMAL}transport = \"ssl\"\n{tls}client_ca = \"ca.pem\"\n"
        ))
        .unwrap();
        let w = &c.workers[0];
        assert_eq!(w.listen.as_ref().unwrap().transport, Transport::Ssl);
        assert_eq!(w.scheme(), Some(Scheme::Text));
        assert_eq!(
            w.tls.as_ref().unwrap().client_ca.as_deref(),
            Some(Path::new("/srv/app/ca.pem"))
        );
        for (text, line, key) in [
            (format!("{MINIMAL}transport = \"ssl\"\n"), 5, "tls"),
            (format!("{MINIMAL}{tls}"), 5, "tls"),
            (format!("{MINIMAL}transport = \"quic\"\n"), 5, "transport"),
            (
                format!(
                    "{}transport = \"ssl\"\n{tls}",
                    MINIMAL.replace("text://", "udp://")
                ),
                5,
                "transport",
            ),
            (
                format!(
                    "{}transport = \"tcp\"\n{tls}",
                    MINIMAL.replace("text://", "https://")
                ),
                5,
                "transport",
            ),
            (
                format!("{MINIMAL}transport = \"ssl\"\n[worker.tls]\ncert = \"a.pem\"\n"),
                6,
                "key",
            ),
            (
                format!("{MINIMAL}transport = \"ssl\"\n{tls}colour = 1\n"),
                9,
                "colour",
            ),
        ] {
            let err = parse(&text).unwrap_err();
            assert_eq!(err.line, line, "{err}\n{text}");
            assert!(err.msg.contains(key), "{err}");
            assert!(!err.msg.contains('\n'), "{err}");
        }
    }

    #[test]
    fn missing_key_and_no_workers_are_errors() {
        let err = parse("[[worker]]\nname = \"x\"\nlisten = \"tcp://127.0.0.1:1\"\n").unwrap_err();
        assert!(err.msg.contains("plugin"), "{}", err.msg);
        assert!(parse("[host]\n").is_err());
    }
}
