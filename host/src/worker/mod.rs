//! A worker process: one single-threaded mio loop that accepts on the
//! listening socket inherited from the master, frames messages with the
//! listener's codec and runs the plugin's callbacks.

mod conn;
mod core;
mod host_api;
mod outbound;
mod timers;

use std::ffi::c_void;
use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::time::{Duration, Instant};

use abi_stable::std_types::{RSlice, RStr, Tuple2};
use mio::net::{TcpListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use plugin_api::abi::{HostCtx, HostVTableRef, Outcome, RawRequest, RawWorkerInfo};
use serde::{Deserialize, Serialize};

use self::conn::{Conn, State};
use self::core::{slot, Core, Deferred, FIRST_CONN};
use crate::config::WorkerConfig;
use crate::ipc::{FromWorker, LineBuf, ToWorker};
use crate::plugin::{CustomProtocol, LoadedPlugin};
use wm_proto::static_files::StaticDir;
use wm_proto::websocket::{self, Decoded};
use wm_proto::{http, Codec, Kind, Message, Pending};

/// File descriptors a worker inherits, by number.
pub const LISTEN_FD: i32 = 3;
pub const CONTROL_FD: i32 = 4;
pub const BUS_FD: i32 = 5;
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
                for id in core.open_ids() {
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
            .filter(|(_, c)| c.state == State::Open && now.duration_since(c.last_active) >= idle)
            .map(|(_, c)| c.id)
            .collect();
        for id in &quiet {
            tracing::debug!(conn = id, "closing idle connection (idle_timeout {idle:?})");
        }
        quiet
    }
}

/// Finds the next message with the plugin's `custom://` framing; the host
/// still enforces `max_package_size`.
fn custom_decode(
    proto: CustomProtocol,
    input: &[u8],
    max: usize,
) -> Result<Option<Message>, String> {
    if input.is_empty() {
        return Ok(None);
    }
    match proto.input(input)? {
        Some(0) => Err("the protocol reported an empty packet".into()),
        Some(n) if n > max => Err(format!(
            "packet of {n} bytes is over max_package_size ({max})"
        )),
        Some(n) if n > input.len() => Ok(None),
        Some(n) => {
            let (start, end) = proto.decode(&input[..n]);
            Ok(Some(Message {
                start,
                end,
                consumed: n,
            }))
        }
        None if input.len() >= max => Err(format!(
            "no complete packet in {} bytes (max_package_size {max})",
            input.len()
        )),
        None => Ok(None),
    }
}

/// Runs the websocket frames at the start of `input` through the
/// connection's reader, calling `on_message` for each message. Returns the
/// bytes used; the rest is an incomplete frame, or waits for `resume_recv`.
fn ws_input(core: &mut Core, runner: &Runner, id: u64, input: &mut [u8]) -> usize {
    let mut pos = 0;
    // Control replies; allocated only when there is one.
    let mut out = Vec::new();
    loop {
        let Some(conn) = core.get(id) else {
            return input.len();
        };
        if conn.state != State::Open || conn.paused {
            return pos;
        }
        let (Codec::Websocket(Some(reader)) | Codec::WsClient(Some(reader))) = &mut conn.codec
        else {
            return pos;
        };
        let step = reader.decode(&mut input[pos..], &mut out);
        if !out.is_empty() {
            core.send_raw(id, &out);
            out.clear();
        }
        let assembled: Vec<u8>;
        let (binary, msg) = match step {
            None => return pos,
            Some(Decoded::Message {
                binary,
                start,
                end,
                consumed,
            }) => {
                let msg = pos + start..pos + end;
                pos += consumed;
                (binary, &input[msg])
            }
            Some(Decoded::Assembled {
                binary,
                data,
                consumed,
            }) => {
                pos += consumed;
                assembled = data;
                (binary, &assembled[..])
            }
            Some(Decoded::Skipped { consumed }) => {
                pos += consumed;
                continue;
            }
            Some(Decoded::Closed { .. }) => {
                core.close(id, None);
                return input.len();
            }
            Some(Decoded::Failed { code, reason }) => {
                let peer = core.peer(id);
                tracing::warn!(conn = id, %peer, "closing websocket ({code}): {reason}");
                core.close(id, None);
                return input.len();
            }
        };
        core.total_messages += 1;
        core.current_kind = if binary { Kind::Binary } else { Kind::Text };
        runner.call(core, Call::Message(id, msg));
        core.current_kind = Kind::Default;
        runner.settle(core);
    }
}

/// What a connection kept from earlier reads, with this read appended; empty
/// when it kept nothing: the read is then decoded where it lies in the shared
/// read buffer, without a copy.
fn gather_kept(conn: &mut Conn, read: &[u8]) -> Vec<u8> {
    let mut kept = std::mem::take(&mut conn.inbuf);
    if !kept.is_empty() {
        kept.extend_from_slice(read);
    }
    kept
}

/// Keeps the input from `pos` on (an incomplete message) for the next read:
/// `kept` when that was the input, else a copy of the rest of `read`.
fn keep_rest(conn: &mut Conn, mut kept: Vec<u8>, read: &[u8], pos: usize) {
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
    if let Some(Codec::Http(h)) = core.get(id).map(|c| &mut c.codec) {
        h.pending.push_back(Pending {
            keep_alive: req.keep_alive,
            head,
        });
    }
    if let Some(dir) = static_dir {
        if req.method == "GET" || head {
            if let Some(resp) = dir.serve(req.path, req.header("if-modified-since")) {
                core.respond_with(id, &resp);
                return runner.settle(core);
            }
        }
    }
    runner.call(core, Call::Request(id, &raw_request(req)));
    runner.settle(core);
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Now,
    Graceful,
}

/// A plugin callback, with its arguments.
enum Call<'a> {
    WorkerStart,
    WorkerStop,
    WorkerReload,
    Connect(u64),
    Message(u64, &'a [u8]),
    Close(u64),
    BufferFull(u64),
    BufferDrain(u64),
    Error(u64, u32, &'a str),
    Timer(u64),
    WebsocketConnect(u64, &'a RawRequest<'a>),
    Request(u64, &'a RawRequest<'a>),
    Publish(&'a str, &'a [u8]),
}

impl Call<'_> {
    fn name(&self) -> &'static str {
        match self {
            Call::WorkerStart => "on_worker_start",
            Call::WorkerStop => "on_worker_stop",
            Call::WorkerReload => "on_worker_reload",
            Call::Connect(_) => "on_connect",
            Call::Message(..) => "on_message",
            Call::Close(_) => "on_close",
            Call::BufferFull(_) => "on_buffer_full",
            Call::BufferDrain(_) => "on_buffer_drain",
            Call::Error(..) => "on_error",
            Call::Timer(_) => "on_timer",
            Call::WebsocketConnect(..) => "on_websocket_connect",
            Call::Request(..) => "on_request",
            Call::Publish(..) => "on_publish",
        }
    }

    fn conn(&self) -> Option<u64> {
        match *self {
            Call::Connect(c)
            | Call::Message(c, _)
            | Call::Close(c)
            | Call::BufferFull(c)
            | Call::BufferDrain(c)
            | Call::Error(c, ..)
            | Call::WebsocketConnect(c, _)
            | Call::Request(c, _) => Some(c),
            _ => None,
        }
    }
}

/// The plugin with the host vtable: runs callbacks and handles their outcome.
struct Runner {
    plugin: LoadedPlugin,
    vt: HostVTableRef,
}

impl Runner {
    fn call(&self, core: &mut Core, call: Call<'_>) -> Outcome {
        let ctx = HostCtx {
            state: core as *mut Core as *mut c_void,
            vt: self.vt,
        };
        let outcome = self.plugin.call(ctx, |vt, st, ctx| match call {
            Call::WorkerStart => (vt.on_worker_start())(st, ctx),
            Call::WorkerStop => (vt.on_worker_stop())(st, ctx),
            Call::WorkerReload => (vt.on_worker_reload())(st, ctx),
            Call::Connect(c) => (vt.on_connect())(st, ctx, c),
            Call::Message(c, d) => (vt.on_message())(st, ctx, c, RSlice::from_slice(d)),
            Call::Close(c) => (vt.on_close())(st, ctx, c),
            Call::BufferFull(c) => (vt.on_buffer_full())(st, ctx, c),
            Call::BufferDrain(c) => (vt.on_buffer_drain())(st, ctx, c),
            Call::Error(c, code, m) => (vt.on_error())(st, ctx, c, code, RStr::from_str(m)),
            Call::Timer(t) => (vt.on_timer())(st, ctx, t),
            Call::WebsocketConnect(c, r) => (vt.on_websocket_connect())(st, ctx, c, r),
            Call::Request(c, r) => (vt.on_request())(st, ctx, c, r),
            Call::Publish(t, d) => {
                (vt.on_publish())(st, ctx, RStr::from_str(t), RSlice::from_slice(d))
            }
        });
        if outcome == Outcome::Panicked {
            let msg = self.plugin.failure();
            match call.conn() {
                Some(conn) => {
                    tracing::error!(
                        conn,
                        "plugin panicked in {}: {msg}; closing the connection",
                        call.name()
                    );
                    core.destroy(conn);
                }
                None => tracing::error!("plugin panicked in {}: {msg}", call.name()),
            }
        }
        outcome
    }

    /// Closes an outbound connection: the plugin hears `on_close`, and may
    /// ask for a reconnect there, which keeps the slot (and the id).
    fn finish_outbound(&self, core: &mut Core, id: u64) {
        core.forget_conn(id);
        let Some(conn) = core.get(id) else { return };
        if conn.state == State::Dead {
            return;
        }
        let _ = conn.sock.shutdown(std::net::Shutdown::Both);
        conn.state = State::Dead;
        conn.discard_output();
        conn.inbuf = Vec::new();
        let partners = [conn.pipe_to.take(), conn.pipe_from.take()];
        for p in partners.into_iter().flatten() {
            core.close(p, None);
        }
        self.call(core, Call::Close(id));
        let Some(conn) = core.get(id) else { return };
        match conn.outbound.as_ref().and_then(|o| o.reconnect_after) {
            Some(after) => core.redials.push((Instant::now() + after, id)),
            None => {
                let mut conn = core.conns.remove(slot(id));
                let _ = core.registry().deregister(&mut conn.sock);
            }
        }
    }

    /// Runs what the last callback queued: buffer events, errors, and the
    /// `on_close` of connections torn down, until nothing is left.
    fn settle(&self, core: &mut Core) {
        loop {
            if let Some(d) = core.deferred.pop_front() {
                match &d {
                    Deferred::BufferFull(c) => self.call(core, Call::BufferFull(*c)),
                    Deferred::BufferDrain(c) => self.call(core, Call::BufferDrain(*c)),
                    Deferred::Error(c, code, msg) => self.call(core, Call::Error(*c, *code, msg)),
                    Deferred::Connect(c) => self.call(core, Call::Connect(*c)),
                    Deferred::Publish(topic, data) => self.call(core, Call::Publish(topic, data)),
                };
                continue;
            }
            if let Some(id) = core.closing.pop() {
                if let Some(conn) = core.get(id) {
                    if conn.outbound.is_some() {
                        self.finish_outbound(core, id);
                        continue;
                    }
                    let known = conn.codec.established();
                    let partners = [conn.pipe_to, conn.pipe_from];
                    // Dropping the socket closes it and takes it out of epoll.
                    core.conns.remove(slot(id));
                    // A pipe's other end goes too, once it has flushed.
                    for p in partners.into_iter().flatten() {
                        core.close(p, None);
                    }
                    // Memberships go first, so `on_close` sees the group without it.
                    core.forget_conn(id);
                    // The plugin never saw a websocket whose handshake did not finish.
                    if known {
                        self.call(core, Call::Close(id));
                    }
                }
                continue;
            }
            break;
        }
    }
}

struct Worker {
    poll: Poll,
    core: Core,
    runner: Runner,
    listener: Option<TcpListener>,
    ctl: UnixStream,
    ctl_buf: LineBuf,

    read_buf: Box<[u8]>,
    static_dir: Option<StaticDir>,
    scheme: crate::config::Scheme,
    max_connections: usize,
    stop: Option<Stop>,
    housekeeping: Housekeeping,
    /// Connections with input left over after their turn.
    again: Vec<u64>,
    /// When a stop closes the remaining connections.
    close_at: Option<Instant>,
    full_logged: bool,
}

/// Entry point of `wm-host worker`. Returns the process exit code.
pub fn run(spec: Spec) -> i32 {
    // Ctrl-C in a terminal reaches the whole process group; the master decides
    // how workers stop, and tells them over the control socket.
    ignore_signals();
    // SAFETY: the master passes these descriptors to every worker, open.
    let ctl_std = unsafe { StdUnixStream::from_raw_fd(CONTROL_FD) };
    let listen_fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FD) };
    let bus_fd = unsafe { OwnedFd::from_raw_fd(BUS_FD) };
    let _span = tracing::info_span!("worker", name = %spec.worker.name, id = spec.id, pid = std::process::id()).entered();
    match start(spec, ctl_std, listen_fd, bus_fd) {
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
        listen: leak(&spec.worker.listen.text),
        options: RSlice::from_slice(Box::leak(options.into_boxed_slice())),
    }))
}

fn start(
    spec: Spec,
    ctl_std: StdUnixStream,
    listen_fd: OwnedFd,
    bus_fd: OwnedFd,
) -> Result<Worker, (StdUnixStream, String)> {
    let plugin = match LoadedPlugin::load(&spec.load_from, &spec.worker.plugin) {
        Ok(p) => p,
        Err(e) => return Err((ctl_std, e.to_string())),
    };
    tracing::debug!(plugin = %plugin.label, "plugin loaded");
    let runner = Runner {
        plugin,
        vt: host_api::vtable(),
    };
    let mut core = Core::new(
        leak_info(&spec),
        spec.worker.max_package_size,
        spec.worker.max_send_buffer_size,
    );
    core.custom = runner.plugin.protocol();
    // The loop exists before on_worker_start, which may open connections.
    let poll = match Poll::new().and_then(|p| p.registry().try_clone().map(|r| (p, r))) {
        Ok((p, r)) => {
            core.poll_registry = Some(r);
            p
        }
        Err(e) => return Err((ctl_std, format!("epoll: {e}"))),
    };
    if spec.worker.listen.scheme == crate::config::Scheme::Custom && core.custom.is_none() {
        let error = format!(
            "plugin {}: custom:// needs a plugin that provides a protocol (Plugin::protocol)",
            spec.worker.plugin.display()
        );
        return Err((ctl_std, error));
    }
    match runner.call(&mut core, Call::WorkerStart) {
        Outcome::Ok | Outcome::Refused(_) => {}
        Outcome::Failed => {
            let e = runner.plugin.failure();
            return Err((ctl_std, format!("on_worker_start failed: {e}")));
        }
        Outcome::Panicked => {
            let e = runner.plugin.failure();
            return Err((ctl_std, format!("on_worker_start panicked: {e}")));
        }
    }
    let setup = |poll: Poll| -> io::Result<(Poll, TcpListener, UnixStream, UnixStream)> {
        let std_listener = std::net::TcpListener::from(listen_fd);
        std_listener.set_nonblocking(true)?;
        let mut listener = TcpListener::from_std(std_listener);
        ctl_std.set_nonblocking(true)?;
        let mut ctl = UnixStream::from_std(ctl_std.try_clone()?);
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        poll.registry()
            .register(&mut ctl, CONTROL, Interest::READABLE | Interest::WRITABLE)?;
        let bus_std = StdUnixStream::from(bus_fd);
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
        listener: Some(listener),
        ctl,
        ctl_buf: LineBuf::default(),

        read_buf: vec![0u8; READ_BUF].into_boxed_slice(),
        static_dir,
        scheme: spec.worker.listen.scheme,
        max_connections: spec.worker.max_connections,
        stop: None,
        again: Vec::new(),
        housekeeping: Housekeeping::new(spec.worker.idle_timeout, spec.worker.ws_ping_interval),
        close_at: None,
        full_logged: false,
        runner,
    };
    worker.runner.settle(&mut worker.core);
    worker.ctl_buf.queue(&FromWorker::Ready {
        plugin: worker.runner.plugin.label.clone(),
    });
    let _ = worker.ctl_buf.flush(&mut worker.ctl);
    tracing::info!(
        listen = %spec.worker.listen,
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
            let wake = [self.close_at, self.housekeeping.next(&self.core)]
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
            for ev in events.iter() {
                match ev.token() {
                    LISTENER => self.accept(),
                    CONTROL => self.control(),
                    BUS => self.bus_in(),
                    Token(t) => {
                        let idx = t - FIRST_CONN;
                        let Some(id) = self.core.conns.get(idx).map(|c| c.id) else {
                            continue;
                        };
                        if ev.is_writable() {
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
            self.fire_timers();
            self.after_events();
            if self.close_at.is_some_and(|c| c <= Instant::now()) {
                self.close_at = None;
                self.close_all();
            }
            self.flush_bus();
        }
        self.runner.call(&mut self.core, Call::WorkerStop);
        self.flush_bus();
        tracing::info!("worker stopped");
        Ok(())
    }

    /// Work that is not an IO event: resumed readers, lingering half-closed
    /// connections, idle connections, websocket pings.
    fn after_events(&mut self) {
        let now = Instant::now();
        self.core.expire_connects(now);
        let (due, keep): (Vec<_>, Vec<_>) =
            self.core.redials.drain(..).partition(|(t, _)| *t <= now);
        self.core.redials = keep;
        for (_, id) in due {
            self.core.redial(id);
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
        let now = Instant::now();
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
        self.runner.settle(&mut self.core);
    }

    fn fire_timers(&mut self) {
        let now = Instant::now();
        while let Some(id) = self.core.timers.pop_due(now) {
            self.runner.call(&mut self.core, Call::Timer(id));
            self.runner.settle(&mut self.core);
        }
    }

    fn accept(&mut self) {
        loop {
            let Some(listener) = self.listener.as_ref() else {
                return;
            };
            let (mut sock, _) = match listener.accept() {
                Ok(v) => v,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: leave the rest queued for later.
                    tracing::warn!("accept failed: {e}");
                    return;
                }
            };
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
            let _ = sock.set_nodelay(true);
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
            let id = self.core.next_id(idx);
            let codec = Codec::new(self.scheme);
            let known = codec.established();
            let max_send = self.core.max_send_buffer_size;
            self.core.conns.insert(Conn::new(id, sock, codec, max_send));
            // A websocket is "connected" for the plugin once its handshake is done.
            if known {
                self.runner.call(&mut self.core, Call::Connect(id));
            }
            self.runner.settle(&mut self.core);
        }
    }

    /// Reads all that is available, running `on_message` for each complete
    /// message as it is found.
    fn read(&mut self, id: u64) {
        for _ in 0..READS_PER_WAKE {
            let Some(conn) = self.core.get(id) else {
                return;
            };
            if conn.state != State::Open || conn.paused {
                return;
            }
            match conn.sock.read(&mut self.read_buf) {
                Ok(0) => {
                    // Peer closed: send what is owed, then close.
                    self.core.close(id, None);
                    return;
                }
                Ok(n) => {
                    conn.bytes_read += n as u64;
                    conn.last_active = Instant::now();
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
                    if n < self.read_buf.len() {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::debug!(conn = id, "read failed: {e}");
                    self.core.destroy(id);
                    return;
                }
            }
        }
        // Still more to read: come back after the others had their turn.
        self.again.push(id);
    }

    /// Hands `read_buf[..n]` to the connection's protocol.
    fn dispatch(&mut self, id: u64, n: usize) {
        if let Some(dst) = self.core.get(id).and_then(|c| c.pipe_to) {
            let Worker { core, read_buf, .. } = self;
            core.forward(id, dst, &read_buf[..n]);
            return;
        }
        match self.core.get(id).map(|c| &c.codec) {
            Some(Codec::WsClient(None)) => self.client_handshake(id, n),
            Some(Codec::WsClient(Some(_))) => self.dispatch_ws(id, n),
            Some(Codec::Websocket(Some(_))) => self.dispatch_ws(id, n),
            Some(Codec::Websocket(None)) => self.handshake(id, n),
            Some(Codec::Http(_)) => self.dispatch_http(id, n),
            Some(_) => self.dispatch_framed(id, n),
            None => {}
        }
    }

    /// Appends input to what the connection kept and returns it all.
    fn gather(&mut self, id: u64, n: usize) -> Option<Vec<u8>> {
        let conn = self.core.get(id)?;
        let mut buf = std::mem::take(&mut conn.inbuf);
        buf.extend_from_slice(&self.read_buf[..n]);
        Some(buf)
    }

    /// Keeps the unconsumed rest of `buf` for the next read.
    fn keep(&mut self, id: u64, mut buf: Vec<u8>, used: usize) {
        if let Some(conn) = self.core.get(id) {
            if used < buf.len() {
                buf.drain(..used);
                conn.inbuf = buf;
            }
        }
    }

    /// Reads the websocket handshake; once complete asks the plugin, then
    /// answers 101 and switches the connection to frames.
    fn handshake(&mut self, id: u64, n: usize) {
        let Some(buf) = self.gather(id, n) else {
            return;
        };
        let limits = http::Limits::new(0);
        let mut decoder = http::HttpDecoder::new();
        let mut scratch = http::Scratch::new();
        let req = match decoder.decode(&buf, &limits, &mut scratch) {
            Ok(Some(http::Event::Request { request, consumed })) => (request, consumed),
            Ok(Some(http::Event::Continue)) | Ok(None) => {
                return self.keep(id, buf, 0);
            }
            Err(e) => return self.refuse(id, e.status(), &e.to_string()),
        };
        let (req, used) = req;
        let accept = match websocket::accept_key(req.method, req.version, |h| req.header(h)) {
            Ok(a) => a,
            Err(r) => return self.refuse(id, r.status, r.reason),
        };
        let raw = raw_request(&req);
        let outcome = self
            .runner
            .call(&mut self.core, Call::WebsocketConnect(id, &raw));
        match outcome {
            Outcome::Ok => {}
            Outcome::Refused(status) => return self.refuse(id, status, "refused by the plugin"),
            // A panic already destroyed the connection.
            _ => return self.runner.settle(&mut self.core),
        }
        let max = self.core.max_package_size;
        self.core
            .send_raw(id, &websocket::switching_protocols(&accept));
        let Some(conn) = self.core.get(id) else {
            return;
        };
        conn.codec = Codec::Websocket(Some(Box::new(websocket::WsReader::new(max))));
        self.runner.call(&mut self.core, Call::Connect(id));
        self.runner.settle(&mut self.core);
        // Frames the client sent right behind its handshake.
        self.feed_ws(id, buf, used);
    }

    /// Reads the server's answer to our websocket handshake.
    fn client_handshake(&mut self, id: u64, n: usize) {
        let Some(buf) = self.gather(id, n) else {
            return;
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let used = match resp.parse(&buf) {
            Ok(httparse::Status::Complete(used)) => used,
            Ok(httparse::Status::Partial) if buf.len() < 16 * 1024 => return self.keep(id, buf, 0),
            _ => {
                return self
                    .core
                    .connect_failed(id, "bad websocket handshake answer".into())
            }
        };
        let accept = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|h| String::from_utf8_lossy(h.value).into_owned());
        let code = resp.code.unwrap_or(0);
        let max = self.core.max_package_size;
        let Some(conn) = self.core.get(id) else {
            return;
        };
        let key = conn
            .outbound
            .as_ref()
            .and_then(|o| o.ws.as_ref())
            .map(|w| w.key.clone())
            .unwrap_or_default();
        if code != 101
            || accept.as_deref() != Some(&tungstenite::handshake::derive_accept_key(key.as_bytes()))
        {
            return self
                .core
                .connect_failed(id, format!("websocket handshake refused (HTTP {code})"));
        }
        conn.codec = Codec::WsClient(Some(Box::new(websocket::WsReader::client(max))));
        self.runner.call(&mut self.core, Call::Connect(id));
        self.runner.settle(&mut self.core);
        self.feed_ws(id, buf, used);
    }

    fn refuse(&mut self, id: u64, status: u16, reason: &str) {
        let peer = self.core.peer(id);
        tracing::warn!(conn = id, %peer, "refusing websocket handshake: {status} {reason}");
        let mut resp = http::error_response(status);
        if status == 426 {
            resp.headers
                .push(("Sec-WebSocket-Version".into(), "13".into()));
        }
        let mut out = Vec::new();
        http::encode_response(&resp, false, false, &mut out);
        self.core.send_raw(id, &out);
        self.core.close(id, None);
    }

    /// Frames `read_buf[..n]` (after any partial frame kept from before),
    /// decoding straight from the shared read buffer when nothing is kept.
    fn dispatch_ws(&mut self, id: u64, n: usize) {
        let Worker {
            core,
            runner,
            read_buf,
            ..
        } = self;
        let read = &mut read_buf[..n];
        let Some(conn) = core.get(id) else { return };
        let mut kept = gather_kept(conn, read);
        let used = if kept.is_empty() {
            ws_input(core, runner, id, read)
        } else {
            ws_input(core, runner, id, &mut kept)
        };
        if let Some(conn) = core.get(id) {
            keep_rest(conn, kept, read, used);
        }
    }

    /// Frames the client sent right behind a handshake.
    fn feed_ws(&mut self, id: u64, mut buf: Vec<u8>, from: usize) {
        let used = ws_input(&mut self.core, &self.runner, id, &mut buf[from..]);
        self.keep(id, buf, from + used);
    }

    /// HTTP requests, answered in order (see `serve_request`), decoded like
    /// other framings straight from the shared read buffer.
    fn dispatch_http(&mut self, id: u64, n: usize) {
        let Worker {
            core,
            runner,
            read_buf,
            static_dir,
            ..
        } = self;
        let read = &read_buf[..n];
        let Some(conn) = core.get(id) else { return };
        let kept = gather_kept(conn, read);
        let input: &[u8] = if kept.is_empty() { read } else { &kept };
        let limits = http::Limits::new(core.max_package_size);
        let mut pos = 0;
        loop {
            let Some(conn) = core.get(id) else { return };
            if conn.state != State::Open {
                return;
            }
            if conn.paused {
                break;
            }
            let Codec::Http(h) = &mut conn.codec else {
                return;
            };
            let mut scratch = http::Scratch::new();
            match h.decoder.decode(&input[pos..], &limits, &mut scratch) {
                Ok(Some(http::Event::Continue)) => {
                    core.send_raw(id, b"HTTP/1.1 100 Continue\r\n\r\n");
                }
                Ok(Some(http::Event::Request { request, consumed })) => {
                    pos += consumed;
                    core.total_messages += 1;
                    serve_request(core, runner, static_dir.as_ref(), id, &request);
                }
                Ok(None) => break,
                Err(e) => {
                    let peer = conn.remote.map(|a| a.to_string()).unwrap_or_default();
                    tracing::warn!(conn = id, %peer, "bad http request: {e}");
                    h.pending.clear();
                    let mut out = Vec::new();
                    http::encode_response(
                        &http::error_response(e.status()),
                        false,
                        false,
                        &mut out,
                    );
                    core.send_raw(id, &out);
                    core.close(id, None);
                    return;
                }
            }
        }
        if let Some(conn) = core.get(id) {
            keep_rest(conn, kept, read, pos);
        }
    }

    /// Frames `read_buf[..n]` (after any partial message kept from before).
    fn dispatch_framed(&mut self, id: u64, n: usize) {
        let custom = self.core.custom;
        let Worker {
            core,
            runner,
            read_buf,
            ..
        } = self;
        let read = &read_buf[..n];
        let Some(conn) = core.get(id) else { return };
        let kept = gather_kept(conn, read);
        let input: &[u8] = if kept.is_empty() { read } else { &kept };
        let mut pos = 0;
        let max = core.max_package_size;
        loop {
            let Some(conn) = core.get(id) else { return };
            if conn.state != State::Open {
                return;
            }
            // Paused by the plugin: keep the rest for after `resume_recv`.
            if conn.paused {
                break;
            }
            let decoded = match (&mut conn.codec, custom) {
                (Codec::Custom, Some(proto)) => custom_decode(proto, &input[pos..], max),
                (codec, _) => codec.decode(&input[pos..], max).map_err(|e| e.to_string()),
            };
            match decoded {
                Ok(Some(m)) => {
                    let msg = &input[pos + m.start..pos + m.end];
                    pos += m.consumed;
                    conn.codec.consumed(m.consumed);
                    core.total_messages += 1;
                    runner.call(core, Call::Message(id, msg));
                    runner.settle(core);
                }
                Ok(None) => break,
                Err(e) => {
                    let peer = conn.remote.map(|a| a.to_string()).unwrap_or_default();
                    tracing::warn!(conn = id, %peer, "closing connection: {e}");
                    core.destroy(id);
                    return;
                }
            }
        }
        if let Some(conn) = core.get(id) {
            keep_rest(conn, kept, read, pos);
        }
    }

    fn bus_in(&mut self) {
        let Some(sock) = self.core.bus.as_mut() else {
            return;
        };
        let (frames, closed) = self.core.bus_buf.read_frames(sock);
        for f in frames {
            self.core.on_bus_frame(&f);
            self.runner.settle(&mut self.core);
        }
        if closed {
            tracing::warn!("bus to the master closed");
        }
        self.flush_bus();
    }

    fn flush_bus(&mut self) {
        self.core.flush_bus();
    }

    fn control(&mut self) {
        let (msgs, closed) = self.ctl_buf.read_from::<ToWorker>(&mut self.ctl);
        for msg in msgs {
            match msg {
                Ok(ToWorker::Stop { graceful }) => {
                    self.begin_stop(if graceful { Stop::Graceful } else { Stop::Now })
                }
                Ok(ToWorker::Reload) => {
                    self.runner.call(&mut self.core, Call::WorkerReload);
                    self.runner.settle(&mut self.core);
                }
                Ok(ToWorker::Stats { req }) => {
                    let (stats, qps) = self.core.stats_and_qps();
                    self.ctl_buf.queue(&FromWorker::Stats { req, stats, qps });
                }
                Ok(ToWorker::Connections { req }) => {
                    let rows = self.core.connection_rows();
                    self.ctl_buf.queue(&FromWorker::Connections { req, rows });
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
        if mode == Stop::Now {
            self.close_at = Some(Instant::now() + DRAIN);
        }
    }

    /// Closes every connection once what it is owed is written.
    fn close_all(&mut self) {
        let ids: Vec<u64> = self.core.conns.iter().map(|(_, c)| c.id).collect();
        for id in ids {
            self.core.close(id, None);
        }
        self.runner.settle(&mut self.core);
    }
}
