//! A worker process: one single-threaded mio loop that accepts on the
//! listening socket inherited from the master, frames messages with the
//! listener's codec and runs the plugin's callbacks.

mod conn;
mod core;
mod groups;
mod guard;
pub mod handover;
mod host_api;
pub(crate) mod logs;
mod migrate;
mod outbound;
mod respond;
mod runner;
mod sock;
mod stats;
mod timers;
mod tls;

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::{Duration, Instant};

use abi_stable::std_types::{RSlice, RStr, Tuple2};
use mio::net::UnixStream;
use mio::{Events, Interest, Poll, Token};
use plugin_api::abi::{Outcome, RawRequest, RawWorkerInfo};
use serde::{Deserialize, Serialize};

use self::conn::{Conn, State};
use self::core::{Core, FIRST_CONN};
use self::guard::Guard;
use self::logs::limited;
use self::runner::{Call, Runner};
use self::sock::Listener;
use crate::config::WorkerConfig;
use crate::ipc::{FromWorker, LineBuf, ToWorker};
use crate::plugin::LoadedPlugin;
use wm_proto::static_files::StaticDir;
use wm_proto::{http, websocket, Codec, DecodeCx, Error, Framer, Step};

/// File descriptors a worker inherits, by number.
pub const LISTEN_FD: i32 = 3;
pub const CONTROL_FD: i32 = 4;
pub const BUS_FD: i32 = 5;
pub use handover::HANDOVER_FD;
/// An ssl listener's certificate and key, as the master checked them (a memfd).
pub const TLS_FD: i32 = 8;
/// Environment variable carrying the [`Spec`] as JSON.
pub const SPEC_ENV: &str = "WM_WORKER_SPEC";

const LISTENER: Token = Token(0);
const CONTROL: Token = Token(1);
const BUS: Token = Token(2);
/// Shared by all connections of the worker: a connection keeps only the bytes
/// of a message not yet complete.
const READ_BUF: usize = 64 * 1024;
/// Full reads one connection may do per wake-up before others get a turn.
const READS_PER_WAKE: usize = 16;
/// After a (non-graceful) stop, connections are still read and answered this
/// long before they are closed, so a request already on its way when the
/// stop came is answered rather than cut off.
const DRAIN: Duration = Duration::from_millis(500);
/// Out of descriptors, accepting is retried this often (and whenever a
/// connection closes)…
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// …and once it has failed for this long, queued connections are accepted
/// and closed at once (with the reserve descriptor) instead of waiting.
const SHED_AFTER: Duration = Duration::from_secs(1);

/// Heartbeats: closing idle connections and pinging websockets, on a
/// coarse schedule (a quarter of the period) so one sweep covers many.
struct Housekeeping {
    idle: Option<Duration>,
    ping: Option<Duration>,
    next_sweep: Option<Instant>,
    next_ping: Option<Instant>,
}

impl Housekeeping {
    fn new(idle: Option<Duration>, ping: Option<Duration>) -> Housekeeping {
        let now = Instant::now();
        Housekeeping {
            idle,
            ping,
            next_sweep: idle.map(|d| now + (d / 4).max(Duration::from_millis(10))),
            next_ping: ping.map(|d| now + d),
        }
    }

    fn next(&self, core: &Core) -> Option<Instant> {
        let linger = core.lingering.iter().map(|(t, _)| *t).min();
        let connects = core.connect_deadlines.iter().map(|(t, _)| *t).min();
        let redials = core.redials.iter().map(|(t, _)| *t).min();
        [self.next_sweep, self.next_ping, linger, connects, redials]
            .into_iter()
            .flatten()
            .min()
    }

    /// Sends due pings; returns the connections idle for too long.
    fn due(&mut self, core: &mut Core, now: Instant) -> Vec<u64> {
        if let (Some(at), Some(every)) = (self.next_ping, self.ping) {
            if at <= now {
                self.next_ping = Some(now + every);
                // Only accepted websockets: an outbound connection may speak
                // another protocol, and a client's frames must be masked.
                let ids: Vec<u64> = core
                    .conns
                    .iter()
                    .filter(|(_, c)| c.state == State::Open && !c.frozen)
                    .filter(|(_, c)| {
                        matches!(&c.codec, Codec::Websocket(ws)
                            if ws.role() == websocket::Role::Server && ws.is_open())
                    })
                    .map(|(_, c)| c.id)
                    .collect();
                for id in ids {
                    core.send_raw(id, &websocket::PING);
                }
            }
        }
        let (Some(at), Some(idle)) = (self.next_sweep, self.idle) else {
            return Vec::new();
        };
        if at > now {
            return Vec::new();
        }
        self.next_sweep = Some(now + (idle / 4).max(Duration::from_millis(10)));
        let quiet: Vec<u64> = core
            .conns
            .iter()
            .filter(|(_, c)| {
                c.state == State::Open && !c.frozen && now.duration_since(c.last_active) >= idle
            })
            .map(|(_, c)| c.id)
            .collect();
        for id in &quiet {
            tracing::debug!(conn = id, "closing idle connection (idle_timeout {idle:?})");
        }
        quiet
    }
}

/// Runs the connection's input through its codec, one step at a time,
/// until it needs more bytes, the plugin pauses it, or it ends. Returns the
/// bytes used; the caller keeps the rest for the next read.
fn decode_input(
    core: &mut Core,
    runner: &Runner,
    static_dir: Option<&StaticDir>,
    id: u64,
    input: &mut [u8],
) -> usize {
    let mut pos = 0;
    // Replies of the codec itself; allocated only when there is one.
    let mut replies = Vec::new();
    let custom = core.custom;
    let mut cx = DecodeCx {
        max: core.max_package_size,
        replies: &mut replies,
        framer: custom.as_ref().map(|p| p as &dyn Framer),
    };
    loop {
        let Some(conn) = core::lookup(&mut core.conns, id) else {
            return input.len();
        };
        if conn.state != State::Open {
            return input.len();
        }
        // Paused by the plugin: keep the rest for after `resume_recv`.
        if conn.paused {
            return pos;
        }
        // All used: the HTTP decoder would only say it needs more (it has
        // nothing pending to emit on no input), so skip that call.
        if pos == input.len() && matches!(conn.codec, Codec::Http(_)) {
            return pos;
        }
        let mut scratch = http::Scratch::new();
        let step = conn.codec.decode(&mut input[pos..], &mut scratch, &mut cx);
        if !cx.replies.is_empty() {
            core.send_raw(id, cx.replies);
            cx.replies.clear();
        }
        match step {
            Ok(Step::NeedMore) => return pos,
            Ok(Step::Skip { consumed }) => pos += consumed,
            Ok(Step::Message {
                data,
                kind,
                consumed,
            }) => {
                pos += consumed;
                core.total_messages += 1;
                runner.invoke(core, Call::Message(id, &data, kind));
            }
            Ok(Step::Request { request, consumed }) => {
                pos += consumed;
                core.total_messages += 1;
                serve_request(core, runner, static_dir, id, &request);
            }
            Ok(Step::Upgrade { request, consumed }) => {
                pos += consumed;
                if !upgrade(core, runner, id, &request) {
                    return input.len();
                }
            }
            Ok(Step::Connected { consumed }) => {
                pos += consumed;
                runner.invoke(core, Call::Connect(id));
            }
            Ok(Step::Closed) => {
                core.close(id, None);
                return input.len();
            }
            Err(e) => {
                fail(core, id, e);
                return input.len();
            }
        }
    }
}

/// Ends a connection whose input broke its protocol. What the peer should
/// still hear is already sent.
fn fail(core: &mut Core, id: u64, e: Error) {
    let peer = core.peer(id);
    match e {
        Error::Framing(e) => {
            limited!(conn = id, %peer, "closing connection: {e}");
            core.destroy(id);
        }
        Error::Http(e) => {
            limited!(conn = id, %peer, "bad http request: {e}");
            core.close(id, None);
        }
        Error::Refused { status, reason } => {
            limited!(conn = id, %peer, "refusing websocket handshake: {status} {reason}");
            core.close(id, None);
        }
        Error::Websocket { code, reason } => {
            limited!(conn = id, %peer, "closing websocket ({code}): {reason}");
            core.close(id, None);
        }
        Error::Rejected(msg) => core.connect_failed(id, msg),
    }
}

/// The answer to a websocket handshake the plugin refused with a status
/// that is not an error (4xx/5xx): its mistake, so a server error.
const REFUSE_FALLBACK: u16 = 500;

/// A websocket upgrade request: the plugin may refuse it; otherwise the 101
/// goes out and the plugin hears `on_connect`. Returns false when the
/// connection ends here.
fn upgrade(core: &mut Core, runner: &Runner, id: u64, req: &http::Request<'_>) -> bool {
    let outcome = runner.invoke(core, Call::WebsocketConnect(id, &raw_request(req)));
    let Some(Codec::Websocket(ws)) = core.get(id).map(|c| &mut c.codec) else {
        // A panic closed it.
        return false;
    };
    let mut out = Vec::new();
    match outcome {
        Outcome::Ok => ws.accept(&mut out),
        Outcome::Refused(asked) => {
            // Only an error status refuses: a 101 or 200 would tell the
            // client it got in, and 0 is not a status at all.
            let status = if (400..600).contains(&asked) {
                asked
            } else {
                REFUSE_FALLBACK
            };
            ws.refuse(status, &mut out);
            let peer = core.peer(id);
            if status == asked {
                limited!(conn = id, %peer, "refusing websocket handshake: {status} refused by the plugin");
            } else {
                limited!(error, conn = id, %peer, "on_websocket_connect refused with status {asked}, which is not 4xx/5xx; answering {status}");
            }
            core.send_raw(id, &out);
            core.close(id, None);
            return false;
        }
        Outcome::Failed | Outcome::Panicked => {
            core.destroy(id);
            return false;
        }
    }
    core.send_raw(id, &out);
    runner.invoke(core, Call::Connect(id));
    true
}

/// The input to decode: empty when the connection kept nothing, and the
/// read is then decoded where it lies in the shared read buffer, without a
/// copy; else what it kept, with this read appended.
fn gather(conn: &mut Conn, read: &[u8]) -> Vec<u8> {
    let mut kept = std::mem::take(&mut conn.inbuf);
    if !kept.is_empty() {
        kept.extend_from_slice(read);
    }
    kept
}

/// Keeps the input from `pos` on (an incomplete message) for the next read:
/// `kept` when that was the input, else a copy of the rest of `read`.
fn keep(conn: &mut Conn, mut kept: Vec<u8>, read: &[u8], pos: usize) {
    if kept.is_empty() {
        if pos < read.len() {
            conn.inbuf = read[pos..].to_vec();
        }
    } else if pos < kept.len() {
        kept.drain(..pos);
        conn.inbuf = kept;
    }
}

/// Answers one request: with a file from `static_dir` when one matches, else
/// by the plugin's `on_request`.
fn serve_request(
    core: &mut Core,
    runner: &Runner,
    static_dir: Option<&StaticDir>,
    id: u64,
    req: &http::Request<'_>,
) {
    let head = req.method == "HEAD";
    if let Some(dir) = static_dir {
        if req.method == "GET" || head {
            if let Some(resp) = dir.serve(req.path, req.header("if-modified-since")) {
                core.respond_with(id, &resp);
                return runner.settle(core);
            }
        }
    }
    runner.invoke(core, Call::Request(id, &raw_request(req)));
}

/// The FFI view of a request: the same borrowed parts.
fn raw_request<'a>(req: &http::Request<'a>) -> RawRequest<'a> {
    RawRequest {
        method: RStr::from_str(req.method),
        path: RStr::from_str(req.path),
        query: RStr::from_str(req.query),
        version: req.version,
        headers: RSlice::from_slice(req.headers),
        body: RSlice::from_slice(req.body),
    }
}

/// What the master tells a worker it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Spec {
    pub worker: WorkerConfig,
    pub id: u32,
    /// The private copy of `worker.plugin` to load.
    pub load_from: std::path::PathBuf,
    /// A replacement that takes over its predecessor's connections: it
    /// finds the handover socket on [`HANDOVER_FD`].
    #[serde(default)]
    pub handover: bool,
    /// An ssl listener: the certificate and key are on [`TLS_FD`].
    #[serde(default)]
    pub tls: bool,
    /// The build's short hash, as `status` shows it: in every log line.
    #[serde(default)]
    pub build: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Now,
    Graceful,
}

struct Worker {
    poll: Poll,
    core: Core,
    runner: Runner,
    listener: Option<Listener>,
    ctl: UnixStream,
    ctl_buf: LineBuf,

    read_buf: Box<[u8]>,
    static_dir: Option<StaticDir>,
    scheme: crate::config::Scheme,
    max_connections: usize,
    stop: Option<Stop>,
    housekeeping: Housekeeping,
    guard: Guard,
    /// Opened at start and given up when descriptors run out, so one queued
    /// connection can be accepted and closed (see `out_of_fds`).
    reserve_fd: Option<std::fs::File>,
    /// Out of descriptors since then: accepting is retried on a timer and
    /// whenever a connection closes (edge-triggered: the listener will not
    /// say again that connections are waiting).
    fds_out: Option<Instant>,
    next_accept: Option<Instant>,
    /// Connections open when accepting last failed: fewer means one closed.
    conns_when_out: usize,
    /// Connections accepted and closed at once in this episode.
    shed: u64,
    /// Connections with input left over after their turn.
    again: Vec<u64>,
    /// When a stop closes the remaining connections.
    close_at: Option<Instant>,
    full_logged: bool,
    /// Not accepting while a handover runs (either side).
    parked_listener: Option<Listener>,
    /// Descriptors that came with control messages.
    ctl_fds: migrate::CtlFds,
    /// Old worker: the socket to the replacement, until the `Cut`…
    handover_fd: Option<OwnedFd>,
    /// …or bus frames after a `Cut` that came before the socket.
    cut_pending: Option<Vec<Vec<u8>>>,
    /// Old worker: exported, waiting for the replacement's answer.
    outgoing: Option<migrate::Outgoing>,
    /// New worker: waiting for the export.
    incoming: Option<migrate::Incoming>,
    /// ssl listeners: the configuration every accepted connection shares.
    tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// When `poll` last returned: what this turn's reads record as their
    /// connections' `last_active` (one clock read per wake-up, not per read).
    woke: Instant,
    /// When the `Date` of answers may change (see `run`).
    date_until: Option<Instant>,
    /// udp:// peers by address, oldest first.
    udp_peers: std::collections::HashMap<std::net::SocketAddr, u64>,
    udp_order: std::collections::VecDeque<std::net::SocketAddr>,
}

/// udp:// peers a worker remembers for later answers.
const MAX_UDP_PEERS: usize = 4096;

/// Entry point of `wm-host worker`. Returns the process exit code.
pub fn run(spec: Spec) -> i32 {
    // Ctrl-C in a terminal reaches the whole process group; the master decides
    // how workers stop, and tells them over the control socket.
    ignore_signals();
    // SAFETY: the master passes these descriptors to every worker, open.
    let ctl = unsafe { StdUnixStream::from_raw_fd(CONTROL_FD) };
    let listener =
        (spec.worker.listen.is_some()).then(|| unsafe { OwnedFd::from_raw_fd(LISTEN_FD) });
    let bus = unsafe { StdUnixStream::from(OwnedFd::from_raw_fd(BUS_FD)) };
    // SAFETY: the master passes it to replacements that take over.
    let handover = spec
        .handover
        .then(|| unsafe { StdUnixStream::from(OwnedFd::from_raw_fd(HANDOVER_FD)) });
    // SAFETY: the master passes it to workers of ssl listeners.
    let tls = spec.tls.then(|| unsafe { OwnedFd::from_raw_fd(TLS_FD) });
    serve_tls(spec, ctl, listener, bus, handover, tls)
}

/// Runs a worker on these sockets until it is told to stop over `ctl` (or
/// `ctl` closes), and returns its exit code. `run` is this on the inherited
/// descriptors; tests call it in-process, on a thread. The sockets need not
/// be non-blocking yet.
pub fn serve(spec: Spec, ctl: StdUnixStream, listener: Option<OwnedFd>, bus: StdUnixStream) -> i32 {
    serve_with(spec, ctl, listener, bus, None)
}

/// [`serve`], for a replacement that takes over the connections of the
/// worker at the other end of `handover`.
pub fn serve_with(
    spec: Spec,
    ctl: StdUnixStream,
    listener: Option<OwnedFd>,
    bus: StdUnixStream,
    handover: Option<StdUnixStream>,
) -> i32 {
    serve_tls(spec, ctl, listener, bus, handover, None)
}

/// [`serve_with`], and for an ssl listener the memfd holding its
/// certificate and key (see `crate::tls`).
fn serve_tls(
    spec: Spec,
    ctl: StdUnixStream,
    listener: Option<OwnedFd>,
    bus: StdUnixStream,
    handover: Option<StdUnixStream>,
    tls: Option<OwnedFd>,
) -> i32 {
    let _span = tracing::info_span!(
        "worker",
        name = %spec.worker.name,
        id = spec.id,
        pid = std::process::id(),
        build = %spec.build
    )
    .entered();
    match start(spec, ctl, listener, bus, handover, tls) {
        Ok(mut worker) => match worker.run() {
            Ok(()) => 0,
            Err(e) => {
                tracing::error!("worker loop failed: {e}");
                1
            }
        },
        Err((mut ctl, error)) => {
            tracing::error!("{error}");
            let _ =
                io::Write::write_all(&mut ctl, &crate::ipc::encode(&FromWorker::Failed { error }));
            2
        }
    }
}

fn ignore_signals() {
    use nix::sys::signal::{signal, SigHandler, Signal};
    for s in [
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
        Signal::SIGHUP,
        Signal::SIGPIPE,
    ] {
        // SAFETY: SIG_IGN installs no handler code.
        unsafe {
            let _ = signal(s, SigHandler::SigIgn);
        }
    }
}

/// The worker's descriptor limit (soft `RLIMIT_NOFILE`).
fn nofile_limit() -> u64 {
    use nix::sys::resource::{getrlimit, Resource};
    getrlimit(Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The descriptor kept in reserve for shedding connections when out of them.
fn reserve_fd() -> Option<std::fs::File> {
    std::fs::File::open("/dev/null").ok()
}

fn leak_info(spec: &Spec) -> &'static RawWorkerInfo {
    fn leak(s: &str) -> RStr<'static> {
        RStr::from_str(Box::leak(s.to_string().into_boxed_str()))
    }
    let options: Vec<Tuple2<RStr<'static>, RStr<'static>>> = spec
        .worker
        .options
        .iter()
        .map(|(k, v)| Tuple2(leak(k), leak(v)))
        .collect();
    // Lives as long as the process: plugins may keep these strings.
    Box::leak(Box::new(RawWorkerInfo {
        name: leak(&spec.worker.name),
        id: spec.id,
        count: spec.worker.count,
        pid: std::process::id(),
        listen: leak(spec.worker.listen_text()),
        options: RSlice::from_slice(Box::leak(options.into_boxed_slice())),
    }))
}

fn start(
    spec: Spec,
    ctl_std: StdUnixStream,
    listener_fd: Option<OwnedFd>,
    bus_std: StdUnixStream,
    handover: Option<StdUnixStream>,
    tls_fd: Option<OwnedFd>,
) -> Result<Worker, (StdUnixStream, String)> {
    // The master checked these files; this only fails if it could not
    // hand them over.
    let tls = match tls_fd.map(|fd| {
        let http = matches!(
            spec.worker.scheme(),
            Some(crate::config::Scheme::Http | crate::config::Scheme::Websocket)
        );
        crate::tls::TlsMaterial::from_fd(fd)
            .map_err(|e| format!("tls: cannot read the certificate from the master: {e}"))
            .and_then(|m| m.server_config(http))
    }) {
        Some(Err(e)) => return Err((ctl_std, e)),
        Some(Ok(c)) => Some(c),
        None => None,
    };
    let plugin = match LoadedPlugin::load(&spec.load_from, &spec.worker.plugin) {
        Ok(p) => p,
        Err(e) => return Err((ctl_std, e.to_string())),
    };
    tracing::debug!(plugin = %plugin.label, "plugin loaded");
    let runner = Runner::new(plugin);
    let mut core = Core::new(
        leak_info(&spec),
        spec.worker.max_package_size,
        spec.worker.max_send_buffer_size,
    );
    core.custom = runner.plugin.protocol();
    core.ws_deflate = spec.worker.ws_deflate;
    // The loop exists before on_worker_start, which may open connections.
    let poll = match Poll::new().and_then(|p| p.registry().try_clone().map(|r| (p, r))) {
        Ok((p, r)) => {
            core.poll_registry = Some(r);
            p
        }
        Err(e) => return Err((ctl_std, format!("epoll: {e}"))),
    };
    if spec.worker.scheme() == Some(crate::config::Scheme::Custom) && core.custom.is_none() {
        let error = format!(
            "plugin {}: custom:// needs a plugin that provides a protocol (Plugin::protocol)",
            spec.worker.plugin.display()
        );
        return Err((ctl_std, error));
    }
    match runner.invoke(&mut core, Call::WorkerStart) {
        Outcome::Ok | Outcome::Refused(_) => {}
        o @ Outcome::Failed => {
            let e = runner.failure(o);
            return Err((ctl_std, format!("on_worker_start failed: {e}")));
        }
        o @ Outcome::Panicked => {
            let e = runner.failure(o);
            return Err((ctl_std, format!("on_worker_start panicked: {e}")));
        }
    }
    let setup = |poll: Poll| -> io::Result<(Poll, Option<Listener>, UnixStream, UnixStream)> {
        let mut listener = listener_fd.map(Listener::from_fd).transpose()?;
        ctl_std.set_nonblocking(true)?;
        let mut ctl = UnixStream::from_std(ctl_std.try_clone()?);
        if let Some(l) = listener.as_mut() {
            poll.registry().register(l, LISTENER, Interest::READABLE)?;
        }
        poll.registry()
            .register(&mut ctl, CONTROL, Interest::READABLE | Interest::WRITABLE)?;
        bus_std.set_nonblocking(true)?;
        let mut bus = UnixStream::from_std(bus_std);
        poll.registry()
            .register(&mut bus, BUS, Interest::READABLE | Interest::WRITABLE)?;
        Ok((poll, listener, ctl, bus))
    };
    let static_dir = match &spec.worker.static_dir {
        Some(dir) => match StaticDir::new(dir) {
            Ok(d) => Some(d),
            Err(e) => return Err((ctl_std, format!("static_dir {}: {e}", dir.display()))),
        },
        None => None,
    };
    let (poll, listener, ctl, bus) = match setup(poll) {
        Ok(v) => v,
        Err(e) => return Err((ctl_std, format!("worker setup failed: {e}"))),
    };
    core.bus = Some(bus);
    let mut worker = Worker {
        poll,
        core,
        listener,
        ctl,
        ctl_buf: LineBuf::default(),

        read_buf: vec![0u8; READ_BUF].into_boxed_slice(),
        static_dir,
        scheme: spec.worker.scheme().unwrap_or(crate::config::Scheme::Tcp),
        max_connections: spec
            .worker
            .max_connections
            .unwrap_or_else(|| crate::config::connection_limit(nofile_limit())),
        stop: None,
        again: Vec::new(),
        housekeeping: Housekeeping::new(spec.worker.idle_timeout, spec.worker.ws_ping_interval),
        guard: Guard::new(
            spec.worker.header_timeout,
            spec.worker.message_timeout,
            spec.worker.max_buffered_input,
        ),
        reserve_fd: reserve_fd(),
        fds_out: None,
        next_accept: None,
        conns_when_out: 0,
        shed: 0,
        close_at: None,
        full_logged: false,
        parked_listener: None,
        ctl_fds: Default::default(),
        handover_fd: None,
        cut_pending: None,
        outgoing: None,
        incoming: None,
        udp_peers: Default::default(),
        udp_order: Default::default(),
        tls,
        woke: Instant::now(),
        date_until: None,
        runner,
    };
    // Only a build that can import waits for the old worker's connections.
    if let Some(sock) = handover.filter(|_| worker.runner.plugin.handover()) {
        if let Err(e) = worker.await_handover(sock) {
            return Err((ctl_std, format!("handover socket: {e}")));
        }
    }
    // What on_worker_start sent on the bus reaches the master before we say
    // ready: a handover's cut comes after it (see `handover.rs`).
    if let Some(bus) = worker.core.bus.as_mut() {
        let _ = handover::write_all_within(
            bus,
            &mut worker.core.bus_buf.outbuf,
            Duration::from_secs(1),
        );
    }
    worker.ctl_buf.queue(&FromWorker::Ready {
        plugin: worker.runner.plugin.label.clone(),
        handover: worker.incoming.is_some(),
    });
    let _ = worker.ctl_buf.flush(&mut worker.ctl);
    tracing::info!(
        listen = %spec.worker.listen_text(),
        plugin = %spec.worker.plugin.display(),
        copy = %worker.runner.plugin.path.display(),
        "worker ready ({})",
        worker.runner.plugin.label
    );
    if let Some(d) = &worker.static_dir {
        tracing::debug!(root = %d.root().display(), "serving static files");
    }
    Ok(worker)
}

impl Worker {
    fn run(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        loop {
            if self.stop.is_some() && self.core.conns.is_empty() {
                break;
            }
            let now = Instant::now();
            let wake = [
                self.close_at,
                self.housekeeping.next(&self.core),
                self.guard.next(),
                self.next_accept,
                logs::due(),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.saturating_duration_since(now));
            let timeout = match (self.core.timers.timeout(now), wake) {
                _ if !self.again.is_empty() => Some(Duration::ZERO),
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            self.woke = Instant::now();
            // `Date` changes once a second: the wall clock is read again
            // only once the second it was read in is over.
            if self.date_until.is_none_or(|t| self.woke >= t) {
                self.date_until = self.core.date.refresh_for().map(|left| self.woke + left);
            }
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    CONTROL => self.control(),
                    BUS => self.bus_in(),
                    migrate::HANDOVER => self.handover_io(),
                    Token(t) => {
                        let idx = t - FIRST_CONN;
                        let Some(conn) = self.core.conns.get(idx) else {
                            continue;
                        };
                        let id = conn.id;
                        // epoll reports writable with nearly every readable
                        // edge: skip the flush when it would change nothing.
                        if ev.is_writable() && !conn.nothing_to_flush() {
                            self.core.check_connect(id);
                            self.core.flush(id);
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.read(id);
                        }
                        self.runner.settle(&mut self.core);
                    }
                }
            }
            // The wake-up's time: a timer falling due while the events
            // were handled fires on the next turn (its timeout is then 0).
            self.fire_timers(self.woke);
            self.after_events(self.woke);
            if self.close_at.is_some_and(|c| c <= Instant::now()) {
                self.close_at = None;
                self.close_all();
            }
            self.flush_bus();
        }
        self.runner.invoke(&mut self.core, Call::WorkerStop);
        self.flush_bus();
        tracing::info!("worker stopped");
        Ok(())
    }

    /// Work that is not an IO event: resumed readers, lingering half-closed
    /// connections, idle connections, websocket pings.
    fn after_events(&mut self, now: Instant) {
        // Both lists are empty unless the plugin opens connections.
        if !self.core.connect_deadlines.is_empty() {
            self.core.expire_connects(now);
        }
        if !self.core.redials.is_empty() {
            let (due, keep): (Vec<_>, Vec<_>) =
                self.core.redials.drain(..).partition(|(t, _)| *t <= now);
            self.core.redials = keep;
            for (_, id) in due {
                self.core.redial(id);
            }
        }
        for id in std::mem::take(&mut self.again) {
            self.read(id);
            self.runner.settle(&mut self.core);
        }
        while let Some(id) = self.core.resumed.pop() {
            // Messages already buffered first, then what waited in the kernel.
            self.dispatch(id, 0);
            self.read(id);
            self.runner.settle(&mut self.core);
        }
        let core = &mut self.core;
        // In place: this runs on every turn of the loop.
        let Core {
            lingering, closing, ..
        } = core;
        lingering.retain(|&(t, id)| {
            let done = t <= now;
            if done {
                closing.push(id);
            }
            !done
        });
        for id in self.housekeeping.due(&mut self.core, now) {
            self.core.close(id, None);
        }
        for (id, why) in self.guard.due(&mut self.core, now) {
            guard::cut(&mut self.core, id, why);
        }
        self.runner.settle(&mut self.core);
        self.retry_accept(now);
        logs::flush(now);
    }

    /// Out of descriptors: accepts again once a connection closed or the
    /// retry timer is due.
    fn retry_accept(&mut self, now: Instant) {
        if self.fds_out.is_none() {
            return;
        }
        let freed = self.core.conns.len() < self.conns_when_out;
        if freed || self.next_accept.is_some_and(|t| t <= now) {
            self.accept();
        }
    }

    /// `accept` failed for want of descriptors. Queued connections wait
    /// (retried every [`ACCEPT_RETRY`] and on every close); once that has
    /// lasted [`SHED_AFTER`], each is accepted on the reserve descriptor
    /// and closed at once, so clients hear a close rather than hang.
    /// Logged once per episode.
    fn out_of_fds(&mut self, e: &io::Error) {
        let now = Instant::now();
        let since = *self.fds_out.get_or_insert_with(|| {
            tracing::warn!(
                connections = self.core.conns.len(),
                "accept failed: {e}; queued connections wait for a descriptor \
                 (shed after {SHED_AFTER:?})"
            );
            now
        });
        self.conns_when_out = self.core.conns.len();
        self.next_accept = Some(now + ACCEPT_RETRY);
        if now.duration_since(since) < SHED_AFTER {
            return;
        }
        if self.reserve_fd.is_none() {
            self.reserve_fd = reserve_fd();
        }
        while let (Some(listener), Some(reserve)) = (self.listener.as_ref(), self.reserve_fd.take())
        {
            drop(reserve);
            let got = listener.accept().map(drop);
            // The shed socket is closed by now: its descriptor is the reserve again.
            self.reserve_fd = reserve_fd();
            match got {
                Ok(()) => self.shed += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
    }

    /// Accepting works again: the end of an out-of-descriptors episode.
    fn fds_back(&mut self) {
        if self.fds_out.take().is_some() {
            tracing::info!(
                shed = self.shed,
                "accepting again ({} queued connections were closed meanwhile)",
                self.shed
            );
            self.shed = 0;
            self.next_accept = None;
        }
        if self.reserve_fd.is_none() {
            self.reserve_fd = reserve_fd();
        }
    }

    fn fire_timers(&mut self, now: Instant) {
        // A replacement runs no plugin code before its import.
        if self.incoming.is_some() {
            return;
        }
        while let Some(id) = self.core.timers.pop_due(now) {
            self.runner.invoke(&mut self.core, Call::Timer(id));
        }
    }

    /// udp://: each datagram is a message from a peer that `send` answers.
    /// Peers get no `on_connect`/`on_close`; the last [`MAX_UDP_PEERS`] are
    /// kept so a plugin may answer later.
    fn recv_datagrams(&mut self) {
        loop {
            let Some(Listener::Udp(sock, replies)) = self.listener.as_ref() else {
                return;
            };
            let (n, from) = match sock.recv_from(&mut self.read_buf) {
                Ok(v) => v,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    limited!("udp receive failed: {e}");
                    return;
                }
            };
            let replies = replies.clone();
            if n > self.core.max_package_size {
                limited!(peer = %from, "dropping a datagram of {n} bytes: over max_package_size ({})", self.core.max_package_size);
                continue;
            }
            let id = self.udp_peer(from, replies);
            self.core.total_messages += 1;
            let Worker {
                core,
                runner,
                read_buf,
                ..
            } = self;
            runner.invoke(
                core,
                Call::Message(id, &read_buf[..n], wm_proto::Kind::Default),
            );
        }
    }

    /// The connection standing for a udp:// peer, made on its first datagram.
    fn udp_peer(
        &mut self,
        from: std::net::SocketAddr,
        replies: std::rc::Rc<std::net::UdpSocket>,
    ) -> u64 {
        if let Some(&id) = self.udp_peers.get(&from) {
            if self.core.get(id).is_some() {
                return id;
            }
        }
        while self.udp_peers.len() >= MAX_UDP_PEERS {
            let Some(old) = self.udp_order.pop_front() else {
                break;
            };
            if let Some(id) = self.udp_peers.remove(&old) {
                if self.core.get(id).is_some() {
                    self.core.remove(id);
                }
            }
        }
        let idx = self.core.conns.vacant_entry().key();
        let id = self.core.next_id(idx);
        let sock = sock::Sock::Udp(replies, from);
        let mut conn = Conn::new(id, sock, Codec::Tcp, self.core.max_send_buffer_size);
        // Not a stream the plugin saw open: no on_close for it.
        conn.unknown = true;
        self.core.conns.insert(conn);
        self.udp_peers.insert(from, id);
        self.udp_order.push_back(from);
        id
    }

    fn accept(&mut self) {
        if matches!(self.listener, Some(Listener::Udp(..))) {
            return self.recv_datagrams();
        }
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let mut sock = match listener.accept() {
                Ok(v) => v,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.fds_back();
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    self.out_of_fds(&e);
                    return;
                }
                Err(e) => {
                    limited!("accept failed: {e}");
                    return;
                }
            };
            self.fds_back();
            if self.core.conns.len() >= self.max_connections {
                if !self.full_logged {
                    tracing::warn!(
                        max_connections = self.max_connections,
                        "connection limit reached; refusing new connections"
                    );
                    self.full_logged = true;
                }
                continue;
            }
            self.full_logged = false;
            let entry = self.core.conns.vacant_entry();
            let idx = entry.key();
            if let Err(e) = self.poll.registry().register(
                &mut sock,
                Token(idx + FIRST_CONN),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::warn!("cannot register connection: {e}");
                continue;
            }
            let sock = match (&self.tls, sock) {
                (Some(cfg), sock::Sock::Tcp(tcp)) => {
                    match rustls::ServerConnection::new(cfg.clone()) {
                        Ok(tls) => sock::Sock::Tls(Box::new(tls::TlsStream::new(tcp, tls))),
                        Err(e) => {
                            limited!("cannot start TLS on a connection: {e}");
                            let _ = self.poll.registry().deregister(&mut sock::Sock::Tcp(tcp));
                            continue;
                        }
                    }
                }
                (_, sock) => sock,
            };
            let id = self.core.next_id(idx);
            let mut codec = Codec::new(self.scheme);
            codec.set_deflate(self.core.ws_deflate);
            // TLS: `on_connect` once the handshake is done (see `read`).
            let known = codec.established() && !sock.is_tls();
            let max_send = self.core.max_send_buffer_size;
            let mut conn = Conn::new(id, sock, codec, max_send);
            conn.head_since =
                self.guard
                    .header_clock(&conn.codec, conn.sock.is_tls(), conn.last_active);
            self.core.conns.insert(conn);
            // A websocket is "connected" for the plugin once its handshake is done.
            if known {
                self.runner.invoke(&mut self.core, Call::Connect(id));
            }
        }
    }

    /// Reads all that is available, running `on_message` for each complete
    /// message as it is found.
    fn read(&mut self, id: u64) {
        for _ in 0..READS_PER_WAKE {
            let Some(conn) = self.core.get(id) else {
                return;
            };
            if conn.state != State::Open || conn.paused || conn.frozen {
                return;
            }
            let got = conn.sock.read(&mut self.read_buf);
            if conn.sock.take_established() {
                self.tls_established(id);
            }
            match got {
                Ok(0) => {
                    // Peer closed: send what is owed, then close.
                    self.core.close(id, None);
                    return;
                }
                Ok(n) => {
                    let Some(conn) = self.core.get(id) else {
                        return;
                    };
                    conn.bytes_read += n as u64;
                    conn.last_active = self.woke;
                    conn.corked = true;
                    let spare = std::mem::take(&mut self.core.spare_out);
                    if let Some(unused) = self.core.get(id).and_then(|c| c.lend_out(spare)) {
                        self.core.spare_out = unused;
                    }
                    self.dispatch(id, n);
                    if self.core.get(id).is_some() {
                        self.core.flush(id);
                    }
                    if let Some(conn) = self.core.get(id) {
                        conn.corked = false;
                        if let Some(buf) = conn.take_back_out() {
                            self.core.spare_out = buf;
                        }
                    }
                    // A short read emptied the socket: new data brings a new
                    // edge, so there is no need to try again now.
                    if n < self.read_buf.len()
                        && !self.core.get(id).is_some_and(|c| c.sock.more_to_read())
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    match e
                        .get_ref()
                        .and_then(|e| e.downcast_ref::<tls::TlsFailure>())
                    {
                        Some(why) => {
                            let peer = self.core.peer(id);
                            limited!(conn = id, %peer, "closing connection: {why}");
                        }
                        None => tracing::debug!(conn = id, "read failed: {e}"),
                    }
                    self.core.destroy(id);
                    return;
                }
            }
        }
        // Still more to read: come back after the others had their turn.
        self.again.push(id);
    }

    /// A TLS handshake finished: the plugin hears of the connection now
    /// (websockets: after their own handshake), and what was queued for it
    /// meanwhile goes out.
    #[cold]
    fn tls_established(&mut self, id: u64) {
        let Some(conn) = self.core.get(id) else {
            return;
        };
        // The header clock covered the TLS handshake; HTTP and websocket
        // heads keep it running.
        if !matches!(&conn.codec, Codec::Http(_) | Codec::Websocket(_)) {
            conn.head_since = None;
        }
        if conn.state == State::Open && conn.established() {
            self.runner.invoke(&mut self.core, Call::Connect(id));
        }
        self.core.flush(id);
    }

    /// Hands `read_buf[..n]` to the connection: to its pipe, or through its
    /// codec (after any partial message kept from before).
    fn dispatch(&mut self, id: u64, n: usize) {
        if let Some(dst) = self.core.get(id).and_then(|c| c.pipe_to) {
            let Worker { core, read_buf, .. } = self;
            core.forward(id, dst, &read_buf[..n]);
            return;
        }
        let Worker {
            core,
            runner,
            read_buf,
            static_dir,
            guard,
            ..
        } = self;
        let read = &mut read_buf[..n];
        let Some(conn) = core.get(id) else { return };
        let mut kept = gather(conn, read);
        let dir = static_dir.as_ref();
        let before = core.total_messages;
        let used = if kept.is_empty() {
            decode_input(core, runner, dir, id, read)
        } else {
            decode_input(core, runner, dir, id, &mut kept)
        };
        if let Some(conn) = core.get(id) {
            keep(conn, kept, read, used);
        }
        guard.track(core, id, core.total_messages != before);
    }

    fn bus_in(&mut self) {
        let Some(sock) = self.core.bus.as_mut() else {
            return;
        };
        let (frames, closed) = self.core.bus_buf.read_frames(sock);
        for f in frames {
            self.bus_frame_in(f);
        }
        if closed {
            tracing::warn!("bus to the master closed");
        }
        self.flush_bus();
        self.try_import();
    }

    /// A bus frame as it arrives: held while a handover needs it to wait.
    fn bus_frame_in(&mut self, f: Vec<u8>) {
        if self.incoming.is_some() {
            return self.hold_bus_frame(f);
        }
        if let Some(held) = self.cut_pending.as_mut() {
            held.push(f);
            return;
        }
        if crate::bus::is_cut(&f) {
            self.at_cut();
            return;
        }
        self.bus_frame(&f);
    }

    fn bus_frame(&mut self, f: &[u8]) {
        self.core.on_bus_frame(f);
        self.runner.settle(&mut self.core);
    }

    fn flush_bus(&mut self) {
        self.core.flush_bus();
    }

    fn control(&mut self) {
        let mut from = handover::FdReader {
            sock: &self.ctl,
            fds: &mut self.ctl_fds,
        };
        let (msgs, closed) = self.ctl_buf.read_from::<ToWorker>(&mut from);
        for msg in msgs {
            match msg {
                Ok(ToWorker::Handover) => self.handover_asked(),
                Ok(ToWorker::Stop { graceful }) => {
                    self.begin_stop(if graceful { Stop::Graceful } else { Stop::Now })
                }
                Ok(ToWorker::Reload) => {
                    self.runner.invoke(&mut self.core, Call::WorkerReload);
                }
                Ok(ToWorker::Stats { req }) => {
                    let (stats, qps) = self.core.stats_and_qps();
                    self.ctl_buf.queue(&FromWorker::Stats { req, stats, qps });
                }
                Ok(ToWorker::Connections { req }) => {
                    let rows = self.core.connection_rows();
                    self.ctl_buf.queue(&FromWorker::Connections { req, rows });
                }
                Ok(ToWorker::ReopenLog { req }) => {
                    let done = match self.ctl_fds.pop_front() {
                        Some(fd) => crate::logging::reopen_worker(fd).map_err(|e| e.to_string()),
                        None => Err("no file came with the request".to_string()),
                    };
                    match &done {
                        Ok(()) => tracing::info!("log file reopened"),
                        Err(e) => tracing::error!("cannot reopen the log file: {e}"),
                    }
                    let error = done.err();
                    self.ctl_buf.queue(&FromWorker::LogReopened { req, error });
                }
                Err(e) => tracing::warn!("bad control message: {e}"),
            }
        }
        if closed {
            // The master is gone: nobody supervises us any more.
            tracing::warn!("master went away; stopping");
            self.begin_stop(Stop::Now);
        }
        let _ = self.ctl_buf.flush(&mut self.ctl);
    }

    fn begin_stop(&mut self, mode: Stop) {
        if self.stop == Some(Stop::Now) {
            return;
        }
        tracing::debug!(?mode, "stopping");
        self.stop = Some(mode);
        // Stop accepting at once. The master keeps the listening socket open,
        // so connections waiting in its queue stay there for the process that
        // takes over this id (a reload's replacement).
        if let Some(mut l) = self.listener.take() {
            let _ = self.poll.registry().deregister(&mut l);
        }
        // Clients hear that we go: websockets get 1001, HTTP answers
        // `Connection: close`, and idle keep-alive connections a FIN now.
        self.core.retiring = true;
        let idle: Vec<u64> = (self.core.conns.iter())
            .filter(|(_, c)| c.state == State::Open && !c.frozen && c.inbuf.is_empty())
            .filter(|(_, c)| matches!(&c.codec, Codec::Http(h) if h.pending.is_empty()))
            .map(|(_, c)| c.id)
            .collect();
        for id in idle {
            self.core.close(id, None);
        }
        self.runner.settle(&mut self.core);
        if mode == Stop::Now {
            self.close_at = Some(Instant::now() + DRAIN);
        }
    }

    /// Closes every connection once what it is owed is written.
    fn close_all(&mut self) {
        // Exported ones are the replacement's, or resumed and closed later.
        let ids: Vec<u64> = (self.core.conns.iter())
            .filter(|(_, c)| !c.frozen)
            .map(|(_, c)| c.id)
            .collect();
        for id in ids {
            self.core.close(id, None);
        }
        self.runner.settle(&mut self.core);
    }
}
