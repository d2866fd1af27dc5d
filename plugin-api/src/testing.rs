//! Test a plugin without a server: drive its callbacks in-process and look
//! at what it did.
//!
//! [`TestHost`] plays the worker. It implements the host's side of the ABI
//! (the same function table wm-host hands a plugin), so the plugin's
//! [`Context`] calls land here and are recorded: what each connection was
//! sent, HTTP answers, groups and uids, publishes, timers, closes and log
//! lines. The test fires the events (`connect`, `message`, `request`,
//! `advance` for timers, `publish`, `disconnect`…) and asserts on the
//! results, the way `actix_web::test` or `tower::ServiceExt` test a handler
//! without a socket.
//!
//! ```
//! use plugin_api::testing::TestHost;
//! use plugin_api::{ConnId, Context, Plugin};
//!
//! #[derive(Default)]
//! struct Shout;
//!
//! impl Plugin for Shout {
//!     fn on_connect(&mut self, ctx: &mut Context<'_>, conn: ConnId) {
//!         ctx.join_group(conn, "everyone");
//!     }
//!     fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
//!         ctx.send_to_group("everyone", data.to_ascii_uppercase(), Some(conn));
//!     }
//! }
//!
//! let mut host = TestHost::new(Shout);
//! host.start().unwrap();
//! let (alice, bob) = (host.connect(), host.connect());
//! host.message(alice, b"hi");
//! assert_eq!(host.recv_text(bob), ["HI"]);
//! assert!(host.recv(alice).is_empty()); // excluded: the sender
//! assert_eq!(host.members("everyone"), [alice, bob]);
//! ```
//!
//! It is one worker of one host, so the model is simplified where several
//! processes would be involved:
//!
//! - Groups, uids and [`Context::send_to_all`] reach this worker's
//!   connections only; [`Context::group_count`] and
//!   [`Context::group_uids`] count them only.
//! - [`Context::publish`] is recorded and delivered to this plugin's own
//!   [`Plugin::on_publish`] after the callback returns, as the host does
//!   (every worker gets it, this one included). [`TestHost::publish`] plays
//!   a publish from another worker.
//! - What a connection receives is recorded as the plugin handed it over,
//!   before framing (no `\n` on `text://`, no length on `frame://`); on
//!   `websocket://` each message carries the kind the host would pick.
//! - Timers run on a virtual clock that only [`TestHost::advance`] moves
//!   (it stops at [`Duration::MAX`]; a timer due later never fires).
//! - [`Context::connect`] takes the URLs the host takes (it checks them
//!   the same way, without resolving the host name) and makes an outbound
//!   connection that is never really opened: call
//!   [`TestHost::established`] to run its `on_connect`.
//! - A panic in a callback fails the test (the host would log it and close
//!   the connection concerned). So does a panic in the harness while it
//!   serves a [`Context`] call: it is reported, with its message, once the
//!   callback returns.
//!
//! As in the host, events a call causes (`on_close` after
//! [`Context::close`], `on_publish` after [`Context::publish`],
//! `on_error` after a dropped send) run after the callback returns, before
//! the driving method returns.
//!
//! The harness needs no cargo feature: it is plain code in `plugin-api`,
//! and a plugin that does not call it does not link it into its `.so`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ffi::c_void;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec, Tuple2};

use crate::abi::{
    HostCtx, HostVTable, HostVTableRef, RawAddr, RawConnInfo, RawFields, RawKind, RawLevel,
    RawRequest, RawSendStatus, RawWorkerInfo,
};
use crate::context::to_raw_addr;
use crate::{error_code, Build, ConnId, Context, Level, MessageKind, Plugin, Protocol, TimerId};

/// One message a connection was sent, as the plugin handed it to the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The payload, before the listener's framing.
    pub data: Vec<u8>,
    /// The websocket frame the host would use; `Binary` on other protocols.
    pub kind: MessageKind,
}

impl Sent {
    /// The payload as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

/// An HTTP answer made with [`Context::respond`] (or [`Context::send`] on
/// `http://`, which answers 200).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The header fields the plugin gave, in order (the host adds
    /// `Content-Length`, `Date` and `Connection`; they are not here).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Something the plugin asked of the host, in the order asked:
/// [`TestHost::effects`]. Sends that reach connections are also in each
/// connection's inbox ([`TestHost::recv`]).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Effect {
    /// [`Context::send`], `send_text` or `send_binary` on one connection
    /// (recorded even when the connection was gone).
    Send {
        /// The connection.
        conn: ConnId,
        /// The payload.
        data: Vec<u8>,
    },
    /// [`Context::respond`].
    Respond {
        /// The connection.
        conn: ConnId,
        /// The answer.
        response: Response,
    },
    /// [`Context::join_group`].
    JoinGroup {
        /// The connection.
        conn: ConnId,
        /// The group.
        group: String,
    },
    /// [`Context::leave_group`].
    LeaveGroup {
        /// The connection.
        conn: ConnId,
        /// The group.
        group: String,
    },
    /// [`Context::send_to_group`].
    SendToGroup {
        /// The group.
        group: String,
        /// The payload.
        data: Vec<u8>,
        /// The connection left out.
        exclude: Option<ConnId>,
    },
    /// [`Context::send_to_all`].
    SendToAll {
        /// The payload.
        data: Vec<u8>,
        /// The connection left out.
        exclude: Option<ConnId>,
    },
    /// [`Context::bind_uid`].
    BindUid {
        /// The connection.
        conn: ConnId,
        /// The user id.
        uid: String,
    },
    /// [`Context::send_to_uid`].
    SendToUid {
        /// The user id.
        uid: String,
        /// The payload.
        data: Vec<u8>,
    },
    /// [`Context::publish`].
    Publish {
        /// The topic.
        topic: String,
        /// The payload.
        data: Vec<u8>,
    },
    /// [`Context::close`] (`last: None`) or [`Context::close_with`].
    Close {
        /// The connection.
        conn: ConnId,
        /// The last message, for `close_with`.
        last: Option<Vec<u8>>,
    },
    /// [`Context::end`].
    End {
        /// The connection.
        conn: ConnId,
    },
    /// [`Context::destroy`].
    Destroy {
        /// The connection.
        conn: ConnId,
    },
    /// [`Context::add_timer`].
    AddTimer {
        /// The new timer.
        timer: TimerId,
        /// Its interval.
        interval: Duration,
        /// Whether it repeats.
        repeat: bool,
    },
    /// [`Context::del_timer`].
    DelTimer {
        /// The timer.
        timer: TimerId,
    },
    /// [`Context::connect`].
    Connect {
        /// The outbound connection's id.
        conn: ConnId,
        /// The URL asked for.
        url: String,
    },
    /// [`Context::reconnect`].
    Reconnect {
        /// The outbound connection.
        conn: ConnId,
        /// The delay asked for.
        delay: Duration,
    },
    /// [`Context::pipe`].
    Pipe {
        /// Where data comes from.
        src: ConnId,
        /// Where it goes.
        dst: ConnId,
    },
    /// A line for the log ([`Context::log`] and friends).
    Log {
        /// Its level.
        level: Level,
        /// Its text.
        text: String,
    },
}

/// An HTTP request (or websocket handshake) to hand to the plugin, built
/// like a client would send it.
///
/// ```
/// use plugin_api::testing::TestRequest;
///
/// let req = TestRequest::post("/api/items?page=2")
///     .header("Content-Type", "application/json")
///     .body(r#"{"name":"x"}"#);
/// # let _ = req;
/// ```
#[derive(Debug, Clone)]
pub struct TestRequest {
    method: String,
    path: String,
    query: String,
    version: u8,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl TestRequest {
    /// A request with any method; `uri` is a path with an optional `?query`.
    pub fn new(method: &str, uri: &str) -> TestRequest {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        TestRequest {
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            version: 1,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `GET uri`.
    pub fn get(uri: &str) -> TestRequest {
        TestRequest::new("GET", uri)
    }

    /// `POST uri`.
    pub fn post(uri: &str) -> TestRequest {
        TestRequest::new("POST", uri)
    }

    /// Adds a header field.
    pub fn header(mut self, name: &str, value: &str) -> TestRequest {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> TestRequest {
        self.body = body.into();
        self
    }

    /// HTTP/1.0 instead of HTTP/1.1.
    pub fn http10(mut self) -> TestRequest {
        self.version = 0;
        self
    }

    /// Lends the request to `f` as the host would pass it.
    fn with_raw<R>(&self, f: impl FnOnce(&RawRequest<'_>) -> R) -> R {
        let headers: Vec<Tuple2<RStr<'_>, RStr<'_>>> = self
            .headers
            .iter()
            .map(|(k, v)| Tuple2(RStr::from_str(k), RStr::from_str(v)))
            .collect();
        let raw = RawRequest {
            method: RStr::from_str(&self.method),
            path: RStr::from_str(&self.path),
            query: RStr::from_str(&self.query),
            version: self.version,
            headers: RSlice::from_slice(&headers),
            body: RSlice::from_slice(&self.body),
        };
        f(&raw)
    }
}

/// Sets up a [`TestHost`]: the worker's name, id, listen address and
/// `[worker.options]`, as the config would.
#[derive(Debug, Clone)]
pub struct Builder {
    name: String,
    id: u32,
    count: u32,
    listen: String,
    options: BTreeMap<String, String>,
    crate_name: String,
    crate_version: String,
}

impl Default for Builder {
    fn default() -> Builder {
        Builder {
            name: "test".into(),
            id: 0,
            count: 1,
            listen: "text://127.0.0.1:2347".into(),
            options: BTreeMap::new(),
            crate_name: "plugin".into(),
            crate_version: "0.0.0".into(),
        }
    }
}

impl Builder {
    /// The defaults: group `"test"`, worker 0 of 1, `text://127.0.0.1:2347`,
    /// no options.
    pub fn new() -> Builder {
        Builder::default()
    }

    /// The group's `name` (default `"test"`).
    pub fn name(mut self, name: &str) -> Builder {
        self.name = name.to_string();
        self
    }

    /// This worker's id and its group's `count` (default 0 of 1).
    pub fn worker(mut self, id: u32, count: u32) -> Builder {
        self.id = id;
        self.count = count;
        self
    }

    /// The `listen` address (default `"text://127.0.0.1:2347"`). Its scheme
    /// decides websocket frame kinds and whether `send` answers HTTP.
    pub fn listen(mut self, listen: &str) -> Builder {
        self.listen = listen.to_string();
        self
    }

    /// One `[worker.options]` entry.
    pub fn option(mut self, key: &str, value: &str) -> Builder {
        self.options.insert(key.to_string(), value.to_string());
        self
    }

    /// The plugin crate's name and version, as a handover's [`Build`]
    /// reports them (default `"plugin"`, `"0.0.0"`). Pass
    /// `env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION")`.
    pub fn crate_info(mut self, name: &str, version: &str) -> Builder {
        self.crate_name = name.to_string();
        self.crate_version = version.to_string();
        self
    }

    /// The host, with `plugin` built (its [`Plugin::protocol`] asked once,
    /// as the host does); call [`TestHost::start`] next.
    pub fn build<P: Plugin>(self, mut plugin: P) -> TestHost<P> {
        let protocol = plugin.protocol();
        let leak = |s: &str| -> RStr<'static> { RStr::from_str(Box::leak(s.into())) };
        let options: Vec<_> = self
            .options
            .iter()
            .map(|(k, v)| Tuple2(leak(k), leak(v)))
            .collect();
        // `worker_info` hands out `&'static`: one small leak per test host.
        let info: &'static RawWorkerInfo = Box::leak(Box::new(RawWorkerInfo {
            name: leak(&self.name),
            id: self.id,
            count: self.count,
            pid: std::process::id(),
            listen: leak(&self.listen),
            options: RSlice::from_slice(Box::leak(options.into_boxed_slice())),
        }));
        let scheme = self.listen.split("://").next().unwrap_or("");
        let kind = match scheme {
            "websocket" | "ws" | "wss" => Proto::Websocket,
            "http" | "https" => Proto::Http,
            _ => Proto::Other,
        };
        let local = self
            .listen
            .split_once("://")
            .and_then(|(_, a)| a.parse::<SocketAddr>().ok())
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
        TestHost {
            plugin,
            protocol,
            state: Box::new(Shared {
                info,
                failure: std::cell::Cell::new(None),
                state: std::cell::RefCell::new(State {
                    info,
                    proto: kind,
                    local,
                    next_conn: 1,
                    next_timer: 1,
                    conns: BTreeMap::new(),
                    groups: BTreeMap::new(),
                    timers: BTreeMap::new(),
                    now: Duration::ZERO,
                    effects: Vec::new(),
                    logs: Vec::new(),
                    pending: VecDeque::new(),
                    message: None,
                }),
            }),
            crate_name: self.crate_name,
            crate_version: self.crate_version,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    Websocket,
    Http,
    Other,
}

#[derive(Debug)]
struct Conn {
    remote: SocketAddr,
    inbox: Vec<Sent>,
    responses: Vec<Response>,
    /// Requests handed to `on_request` and not answered yet.
    waiting: usize,
    uid: Option<String>,
    paused: bool,
    outbound: bool,
    /// Closed, by either side; kept so its inbox can still be read.
    closing: bool,
    bytes_read: u64,
    bytes_written: u64,
    /// Bytes fed to a `custom://` protocol that do not make a packet yet.
    partial: Vec<u8>,
}

#[derive(Debug, Clone, Copy)]
struct Timer {
    /// `None`: past the end of the virtual clock; it never fires.
    due: Option<Duration>,
    interval: Duration,
    repeat: bool,
}

/// Events a callback caused, run once it returns.
enum Pending {
    Close(u64),
    Publish(String, Vec<u8>),
    Error(u64, u32, String),
}

struct State {
    info: &'static RawWorkerInfo,
    proto: Proto,
    local: SocketAddr,
    next_conn: u64,
    next_timer: u64,
    conns: BTreeMap<u64, Conn>,
    groups: BTreeMap<String, BTreeSet<u64>>,
    timers: BTreeMap<u64, Timer>,
    now: Duration,
    effects: Vec<Effect>,
    logs: Vec<(Level, String)>,
    pending: VecDeque<Pending>,
    /// The kind of the message `on_message` is handling.
    message: Option<MessageKind>,
}

impl State {
    fn open(&self, conn: u64) -> Option<&Conn> {
        self.conns.get(&conn).filter(|c| !c.closing)
    }

    fn open_mut(&mut self, conn: u64) -> Option<&mut Conn> {
        self.conns.get_mut(&conn).filter(|c| !c.closing)
    }

    /// The frame a send goes out in: the rule of [`Context::send`].
    fn kind(&self, data: &[u8], raw: RawKind) -> MessageKind {
        if self.proto != Proto::Websocket {
            return MessageKind::Binary;
        }
        match raw {
            RawKind::Text => MessageKind::Text,
            RawKind::Binary => MessageKind::Binary,
            RawKind::Default if self.message == Some(MessageKind::Binary) => MessageKind::Binary,
            RawKind::Default if std::str::from_utf8(data).is_ok() => MessageKind::Text,
            RawKind::Default => MessageKind::Binary,
        }
    }

    fn deliver(&mut self, conn: u64, data: &[u8], kind: MessageKind) -> RawSendStatus {
        if self.proto == Proto::Http && self.conns.get(&conn).is_some_and(|c| !c.outbound) {
            return self.respond(conn, 200, Vec::new(), data);
        }
        let Some(c) = self.open_mut(conn) else {
            return RawSendStatus::Closed;
        };
        c.bytes_written += data.len() as u64;
        c.inbox.push(Sent {
            data: data.to_vec(),
            kind,
        });
        RawSendStatus::Sent
    }

    fn respond(
        &mut self,
        conn: u64,
        status: u16,
        headers: Vec<(String, String)>,
        body: &[u8],
    ) -> RawSendStatus {
        let response = Response {
            status,
            headers,
            body: body.to_vec(),
        };
        self.effects.push(Effect::Respond {
            conn: ConnId(conn),
            response: response.clone(),
        });
        let http = self.proto == Proto::Http;
        match self.open_mut(conn) {
            Some(c) if http && c.waiting > 0 => {
                c.waiting -= 1;
                c.bytes_written += body.len() as u64;
                c.responses.push(response);
                RawSendStatus::Sent
            }
            Some(_) => RawSendStatus::Dropped,
            None => RawSendStatus::Closed,
        }
    }

    /// Takes a connection out of its groups, as the host does before
    /// `on_close`.
    fn forget_groups(&mut self, conn: u64) {
        self.groups.retain(|_, members| {
            members.remove(&conn);
            !members.is_empty()
        });
    }

    /// Marks a connection closed by the plugin; `on_close` runs later.
    fn close(&mut self, conn: u64) -> bool {
        match self.open_mut(conn) {
            Some(c) => {
                c.closing = true;
                self.forget_groups(conn);
                self.pending.push_back(Pending::Close(conn));
                true
            }
            None => false,
        }
    }

    fn new_conn(&mut self, remote: Option<SocketAddr>, outbound: bool) -> u64 {
        let id = self.next_conn;
        self.next_conn += 1;
        let remote = remote.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 40_000)));
        self.conns.insert(
            id,
            Conn {
                remote,
                inbox: Vec::new(),
                responses: Vec::new(),
                waiting: 0,
                uid: None,
                paused: false,
                outbound,
                closing: false,
                bytes_read: 0,
                bytes_written: 0,
                partial: Vec::new(),
            },
        );
        id
    }
}

/// What the plugin's context points at: the state, and the first panic of
/// a host function (see [`guard`]).
struct Shared {
    state: std::cell::RefCell<State>,
    info: &'static RawWorkerInfo,
    failure: std::cell::Cell<Option<String>>,
}

impl std::ops::Deref for Shared {
    type Target = std::cell::RefCell<State>;

    fn deref(&self) -> &Self::Target {
        &self.state
    }
}

/// # Safety
/// `state` is the pointer a [`TestHost`] put into the context: its boxed
/// [`Shared`], alive for the whole callback.
unsafe fn shared<'a>(state: *mut c_void) -> &'a Shared {
    unsafe { &*(state as *const Shared) }
}

/// # Safety
/// As [`shared`]. Host functions never call the plugin, so the borrow below
/// never overlaps another (if it did, [`guard`] reports it).
unsafe fn st<'a>(state: *mut c_void) -> std::cell::RefMut<'a, State> {
    unsafe { shared(state) }.borrow_mut()
}

/// Runs the body of host function `name`. Host functions are `extern "C"`:
/// a panic unwinding out of one would abort the whole test binary. So a
/// panic is caught here, recorded, and `fallback` returned to the plugin;
/// the [`TestHost`] raises it again as soon as the plugin's callback
/// returns, failing the test that caused it with its message.
fn guard<R>(state: *mut c_void, name: &str, fallback: R, body: impl FnOnce() -> R) -> R {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)) {
        Ok(r) => r,
        Err(payload) => {
            let msg = panic_text(payload.as_ref());
            let failure = &unsafe { shared(state) }.failure;
            // The first one is the cause; later ones follow from it.
            let first = failure.take();
            failure.set(Some(first.unwrap_or_else(|| {
                format!("test host: host function `{name}` panicked: {msg}")
            })));
            fallback
        }
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without a message)".into())
}

fn closed_info() -> RawConnInfo {
    RawConnInfo {
        open: false,
        remote: to_raw_addr(None),
        local: to_raw_addr(None),
        bytes_read: 0,
        bytes_written: 0,
        send_queue: 0,
        recv_queue: 0,
        paused: false,
    }
}

fn exclude(conn: u64) -> Option<ConnId> {
    (conn != 0).then_some(ConnId(conn))
}

extern "C" fn worker_info(state: *mut c_void) -> &'static RawWorkerInfo {
    // Outside the `RefCell`: nothing here can panic.
    unsafe { shared(state) }.info
}

extern "C" fn log(state: *mut c_void, level: RawLevel, msg: RStr<'_>) {
    guard(state, "log", (), || {
        let level = match level {
            RawLevel::Error => Level::Error,
            RawLevel::Warn => Level::Warn,
            RawLevel::Info => Level::Info,
            RawLevel::Debug => Level::Debug,
            RawLevel::Trace => Level::Trace,
        };
        // Shown with a failing test's output (libtest captures it otherwise).
        eprintln!("[plugin {level:?}] {msg}");
        let mut s = unsafe { st(state) };
        s.logs.push((level, msg.to_string()));
        s.effects.push(Effect::Log {
            level,
            text: msg.to_string(),
        });
    })
}

extern "C" fn send(
    state: *mut c_void,
    conn: u64,
    data: RSlice<'_, u8>,
    k: RawKind,
) -> RawSendStatus {
    guard(state, "send", RawSendStatus::Closed, || {
        let mut s = unsafe { st(state) };
        let data = data.as_slice();
        s.effects.push(Effect::Send {
            conn: ConnId(conn),
            data: data.to_vec(),
        });
        if s.proto == Proto::Websocket && k == RawKind::Text && std::str::from_utf8(data).is_err() {
            s.pending.push_back(Pending::Error(
                conn,
                error_code::SEND_FAILED,
                "text message is not UTF-8".into(),
            ));
            return RawSendStatus::Dropped;
        }
        let kind = s.kind(data, k);
        s.deliver(conn, data, kind)
    })
}

extern "C" fn message_kind(state: *mut c_void) -> RawKind {
    guard(state, "message_kind", RawKind::Binary, || {
        match unsafe { st(state) }.message {
            Some(MessageKind::Text) => RawKind::Text,
            _ => RawKind::Binary,
        }
    })
}

extern "C" fn respond(
    state: *mut c_void,
    conn: u64,
    status: u16,
    headers: RawFields<'_>,
    body: RSlice<'_, u8>,
) -> RawSendStatus {
    guard(state, "respond", RawSendStatus::Closed, || {
        let headers = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        unsafe { st(state) }.respond(conn, status, headers, body.as_slice())
    })
}

extern "C" fn join_group(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool {
    guard(state, "join_group", false, || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::JoinGroup {
            conn: ConnId(conn),
            group: group.to_string(),
        });
        if s.open(conn).is_none() {
            return false;
        }
        s.groups.entry(group.to_string()).or_default().insert(conn);
        true
    })
}

extern "C" fn leave_group(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool {
    guard(state, "leave_group", false, || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::LeaveGroup {
            conn: ConnId(conn),
            group: group.to_string(),
        });
        let Some(members) = s.groups.get_mut(group.as_str()) else {
            return s.open(conn).is_some();
        };
        members.remove(&conn);
        if members.is_empty() {
            s.groups.remove(group.as_str());
        }
        s.open(conn).is_some()
    })
}

/// Delivers one message to many connections of this worker.
fn fan_out(s: &mut State, to: Vec<u64>, data: &[u8], k: RawKind) {
    let kind = s.kind(data, k);
    for conn in to {
        s.deliver(conn, data, kind);
    }
}

extern "C" fn send_to_group(
    state: *mut c_void,
    group: RStr<'_>,
    data: RSlice<'_, u8>,
    k: RawKind,
    ex: u64,
) {
    guard(state, "send_to_group", (), || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::SendToGroup {
            group: group.to_string(),
            data: data.to_vec(),
            exclude: exclude(ex),
        });
        let to = s
            .groups
            .get(group.as_str())
            .map(|m| m.iter().copied().filter(|&c| c != ex).collect())
            .unwrap_or_default();
        fan_out(&mut s, to, data.as_slice(), k);
    })
}

extern "C" fn send_to_all(state: *mut c_void, data: RSlice<'_, u8>, k: RawKind, ex: u64) {
    guard(state, "send_to_all", (), || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::SendToAll {
            data: data.to_vec(),
            exclude: exclude(ex),
        });
        let to = s
            .conns
            .iter()
            .filter(|(&id, c)| id != ex && !c.closing && !c.outbound)
            .map(|(&id, _)| id)
            .collect();
        fan_out(&mut s, to, data.as_slice(), k);
    })
}

extern "C" fn bind_uid(state: *mut c_void, conn: u64, uid: RStr<'_>) -> bool {
    guard(state, "bind_uid", false, || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::BindUid {
            conn: ConnId(conn),
            uid: uid.to_string(),
        });
        match s.open_mut(conn) {
            Some(c) => {
                c.uid = Some(uid.to_string());
                true
            }
            None => false,
        }
    })
}

extern "C" fn send_to_uid(state: *mut c_void, uid: RStr<'_>, data: RSlice<'_, u8>, k: RawKind) {
    guard(state, "send_to_uid", (), || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::SendToUid {
            uid: uid.to_string(),
            data: data.to_vec(),
        });
        let to = s
            .conns
            .iter()
            .filter(|(_, c)| !c.closing && c.uid.as_deref() == Some(uid.as_str()))
            .map(|(&id, _)| id)
            .collect();
        fan_out(&mut s, to, data.as_slice(), k);
    })
}

extern "C" fn group_count(state: *mut c_void, group: RStr<'_>) -> u64 {
    guard(state, "group_count", 0, || {
        let s = unsafe { st(state) };
        s.groups.get(group.as_str()).map_or(0, |m| m.len() as u64)
    })
}

extern "C" fn group_uids(state: *mut c_void, group: RStr<'_>) -> RVec<RString> {
    guard(state, "group_uids", RVec::new(), || {
        let s = unsafe { st(state) };
        let uids: BTreeSet<&str> = s
            .groups
            .get(group.as_str())
            .into_iter()
            .flatten()
            .filter_map(|c| s.conns.get(c)?.uid.as_deref())
            .collect();
        uids.into_iter().map(RString::from).collect()
    })
}

extern "C" fn publish(state: *mut c_void, topic: RStr<'_>, data: RSlice<'_, u8>) {
    guard(state, "publish", (), || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::Publish {
            topic: topic.to_string(),
            data: data.to_vec(),
        });
        s.pending
            .push_back(Pending::Publish(topic.to_string(), data.to_vec()));
    })
}

extern "C" fn close(state: *mut c_void, conn: u64, last: ROption<RSlice<'_, u8>>) -> bool {
    guard(state, "close", false, || {
        let mut s = unsafe { st(state) };
        let last = last.into_option().map(|l| l.to_vec());
        s.effects.push(Effect::Close {
            conn: ConnId(conn),
            last: last.clone(),
        });
        if let Some(last) = last {
            let kind = s.kind(&last, RawKind::Default);
            s.deliver(conn, &last, kind);
        }
        s.close(conn)
    })
}

extern "C" fn addr(state: *mut c_void, conn: u64, remote: bool) -> RawAddr {
    guard(state, "addr", to_raw_addr(None), || {
        let s = unsafe { st(state) };
        let a = s
            .open(conn)
            .map(|c| if remote { c.remote } else { s.local });
        to_raw_addr(a)
    })
}

extern "C" fn add_timer(state: *mut c_void, interval_ms: u64, repeat: bool) -> u64 {
    guard(state, "add_timer", 0, || {
        let mut s = unsafe { st(state) };
        let id = s.next_timer;
        s.next_timer += 1;
        let interval = Duration::from_millis(interval_ms.max(1));
        let due = s.now.checked_add(interval);
        s.timers.insert(
            id,
            Timer {
                due,
                interval,
                repeat,
            },
        );
        s.effects.push(Effect::AddTimer {
            timer: TimerId(id),
            interval,
            repeat,
        });
        id
    })
}

extern "C" fn del_timer(state: *mut c_void, timer: u64) -> bool {
    guard(state, "del_timer", false, || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::DelTimer {
            timer: TimerId(timer),
        });
        s.timers.remove(&timer).is_some()
    })
}

extern "C" fn connection_count(state: *mut c_void) -> u64 {
    guard(state, "connection_count", 0, || {
        let s = unsafe { st(state) };
        s.conns.values().filter(|c| !c.closing).count() as u64
    })
}

extern "C" fn pause_recv(state: *mut c_void, conn: u64) -> bool {
    guard(state, "pause_recv", false, || {
        let mut s = unsafe { st(state) };
        s.open_mut(conn).map(|c| c.paused = true).is_some()
    })
}

extern "C" fn resume_recv(state: *mut c_void, conn: u64) -> bool {
    guard(state, "resume_recv", false, || {
        let mut s = unsafe { st(state) };
        s.open_mut(conn).map(|c| c.paused = false).is_some()
    })
}

extern "C" fn end(state: *mut c_void, conn: u64) -> bool {
    guard(state, "end", false, || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::End { conn: ConnId(conn) });
        s.close(conn)
    })
}

extern "C" fn destroy(state: *mut c_void, conn: u64) -> bool {
    guard(state, "destroy", false, || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::Destroy { conn: ConnId(conn) });
        s.close(conn)
    })
}

extern "C" fn set_max_send_buffer(state: *mut c_void, conn: u64, _bytes: u64) -> bool {
    guard(state, "set_max_send_buffer", false, || {
        unsafe { st(state) }.open(conn).is_some()
    })
}

extern "C" fn conn_info(state: *mut c_void, conn: u64) -> RawConnInfo {
    guard(state, "conn_info", closed_info(), || {
        let s = unsafe { st(state) };
        match s.open(conn) {
            Some(c) => RawConnInfo {
                open: true,
                remote: to_raw_addr(Some(c.remote)),
                local: to_raw_addr(Some(s.local)),
                bytes_read: c.bytes_read,
                bytes_written: c.bytes_written,
                send_queue: 0,
                recv_queue: c.partial.len() as u64,
                paused: c.paused,
            },
            None => closed_info(),
        }
    })
}

extern "C" fn connections(state: *mut c_void) -> RVec<u64> {
    guard(state, "connections", RVec::new(), || {
        let s = unsafe { st(state) };
        s.conns
            .iter()
            .filter(|(_, c)| !c.closing)
            .map(|(&id, _)| id)
            .collect()
    })
}

extern "C" fn del_all_timers(state: *mut c_void) -> u64 {
    guard(state, "del_all_timers", 0, || {
        let mut s = unsafe { st(state) };
        let n = s.timers.len() as u64;
        s.timers.clear();
        n
    })
}

extern "C" fn connect(
    state: *mut c_void,
    url: RStr<'_>,
    _timeout_ms: u64,
) -> RResult<u64, RString> {
    guard(
        state,
        "connect",
        RResult::RErr("the test host failed (see the test's panic)".into()),
        || {
            let mut s = unsafe { st(state) };
            // The host's own check (`crate::url::parse`, shared with wm-host's
            // `worker::outbound::parse`); only the name lookup is left out.
            if let Err(e) = crate::url::parse(url.as_str()) {
                return RResult::RErr(e.into());
            }
            let id = s.new_conn(None, true);
            s.effects.push(Effect::Connect {
                conn: ConnId(id),
                url: url.to_string(),
            });
            RResult::ROk(id)
        },
    )
}

extern "C" fn reconnect(state: *mut c_void, conn: u64, delay_ms: u64) -> bool {
    guard(state, "reconnect", false, || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::Reconnect {
            conn: ConnId(conn),
            delay: Duration::from_millis(delay_ms),
        });
        match s.conns.get_mut(&conn) {
            Some(c) if c.outbound => {
                c.closing = false;
                true
            }
            _ => false,
        }
    })
}

extern "C" fn pipe(state: *mut c_void, src: u64, dst: u64) -> bool {
    guard(state, "pipe", false, || {
        let mut s = unsafe { st(state) };
        s.effects.push(Effect::Pipe {
            src: ConnId(src),
            dst: ConnId(dst),
        });
        s.open(src).is_some() && s.open(dst).is_some()
    })
}

extern "C" fn is_outbound(state: *mut c_void, conn: u64) -> bool {
    guard(state, "is_outbound", false, || {
        unsafe { st(state) }
            .conns
            .get(&conn)
            .is_some_and(|c| c.outbound)
    })
}

fn vtable() -> HostVTableRef {
    static VT: OnceLock<HostVTableRef> = OnceLock::new();
    *VT.get_or_init(|| {
        HostVTable {
            worker_info,
            log,
            send,
            message_kind,
            respond,
            join_group,
            leave_group,
            send_to_group,
            send_to_all,
            bind_uid,
            send_to_uid,
            group_count,
            group_uids,
            publish,
            close,
            addr,
            add_timer,
            del_timer,
            connection_count,
            pause_recv,
            resume_recv,
            end,
            destroy,
            set_max_send_buffer,
            conn_info,
            connections,
            del_all_timers,
            connect,
            reconnect,
            pipe,
            is_outbound,
        }
        .leak_into_prefix()
    })
}

/// One worker of a host, in-process, running one plugin object. See the
/// [module docs](self).
pub struct TestHost<P: Plugin> {
    plugin: P,
    protocol: Option<Box<dyn Protocol>>,
    // Boxed: the plugin's context points at it while callbacks run.
    state: Box<Shared>,
    crate_name: String,
    crate_version: String,
}

impl<P: Plugin> TestHost<P> {
    /// A host for `plugin` with the [`Builder`]'s defaults.
    pub fn new(plugin: P) -> TestHost<P> {
        Builder::new().build(plugin)
    }

    /// Runs one callback with a context on this host, then what it caused.
    fn call<R>(&mut self, f: impl FnOnce(&mut P, &mut Context<'_>) -> R) -> R {
        let r = self.call_only(f);
        self.settle();
        r
    }

    fn call_only<R>(&mut self, f: impl FnOnce(&mut P, &mut Context<'_>) -> R) -> R {
        let ctx = HostCtx {
            state: &*self.state as *const Shared as *mut c_void,
            vt: vtable(),
        };
        let plugin = &mut self.plugin;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            f(plugin, &mut Context::from_raw(ctx))
        }));
        // A host function that panicked (see `guard`) is the cause of
        // whatever the plugin did next, a panic included: report it first.
        if let Some(failure) = self.state.failure.take() {
            panic!("{failure}");
        }
        r.unwrap_or_else(|payload| std::panic::resume_unwind(payload))
    }

    /// Runs the events callbacks caused (closes, publishes, send errors),
    /// and those they cause in turn, in order.
    fn settle(&mut self) {
        loop {
            let next = self.state.borrow_mut().pending.pop_front();
            match next {
                None => return,
                Some(Pending::Close(conn)) => {
                    // The connection stays listed, closed, so what it was
                    // sent can still be read.
                    self.call_only(|p, ctx| p.on_close(ctx, ConnId(conn)));
                }
                Some(Pending::Publish(topic, data)) => {
                    self.call_only(|p, ctx| p.on_publish(ctx, &topic, &data));
                }
                Some(Pending::Error(conn, code, msg)) => {
                    self.call_only(|p, ctx| p.on_error(ctx, ConnId(conn), code, &msg));
                }
            }
        }
    }

    fn expect_open(&self, conn: ConnId, what: &str) {
        assert!(
            self.state.borrow().open(conn.0).is_some(),
            "{what}: connection {conn} is not open"
        );
    }

    /// `on_worker_start`; its error as text.
    pub fn start(&mut self) -> Result<(), String> {
        self.call(|p, ctx| p.on_worker_start(ctx))
            .map_err(|e| e.to_string())
    }

    /// Stops the worker as the host does: closes every connection
    /// (`on_close` for each), then `on_worker_stop`.
    pub fn stop(&mut self) {
        let open: Vec<u64> = self.state.borrow().conns.keys().copied().collect();
        for conn in open {
            self.disconnect(ConnId(conn));
        }
        self.call(|p, ctx| p.on_worker_stop(ctx));
    }

    /// `on_worker_reload`: a reload asked of a worker that is not reloadable.
    pub fn worker_reload(&mut self) {
        self.call(|p, ctx| p.on_worker_reload(ctx));
    }

    /// A client connects: `on_connect`, from 127.0.0.1.
    pub fn connect(&mut self) -> ConnId {
        self.connect_from(SocketAddr::from(([127, 0, 0, 1], 40_000)))
    }

    /// A client connects from `remote`: `on_connect`.
    pub fn connect_from(&mut self, remote: SocketAddr) -> ConnId {
        let conn = ConnId(self.state.borrow_mut().new_conn(Some(remote), false));
        self.call(|p, ctx| p.on_connect(ctx, conn));
        conn
    }

    /// A websocket client sends its handshake `req`: `on_websocket_connect`,
    /// then `on_connect` if it was accepted. `Err(status)` when refused
    /// (the connection is gone).
    pub fn connect_websocket(&mut self, req: &TestRequest) -> Result<ConnId, u16> {
        let conn = ConnId(self.state.borrow_mut().new_conn(None, false));
        let verdict = self.call(|p, ctx| {
            req.with_raw(|raw| p.on_websocket_connect(ctx, conn, &crate::Request::from_raw(raw)))
        });
        match verdict {
            Ok(()) => {
                self.call(|p, ctx| p.on_connect(ctx, conn));
                Ok(conn)
            }
            Err(status) => {
                let mut s = self.state.borrow_mut();
                s.forget_groups(conn.0);
                s.conns.remove(&conn.0);
                Err(status)
            }
        }
    }

    /// An outbound connection made with [`Context::connect`] is
    /// established: its `on_connect`.
    pub fn established(&mut self, conn: ConnId) {
        assert!(
            self.state
                .borrow()
                .conns
                .get(&conn.0)
                .is_some_and(|c| c.outbound),
            "established: {conn} is not an outbound connection"
        );
        self.call(|p, ctx| p.on_connect(ctx, conn));
    }

    fn deliver(&mut self, conn: ConnId, data: &[u8], kind: MessageKind) {
        self.expect_open(conn, "message");
        {
            let mut s = self.state.borrow_mut();
            s.message = Some(kind);
            if let Some(c) = s.conns.get_mut(&conn.0) {
                c.bytes_read += data.len() as u64;
            }
        }
        self.call_only(|p, ctx| p.on_message(ctx, conn, data));
        self.state.borrow_mut().message = None;
        self.settle();
    }

    /// A message arrives on `conn`: `on_message`. On `websocket://` it is a
    /// text message when `data` is UTF-8, else binary (see
    /// [`TestHost::binary`]).
    pub fn message(&mut self, conn: ConnId, data: impl AsRef<[u8]>) {
        let data = data.as_ref();
        let ws = self.state.borrow().proto == Proto::Websocket;
        let kind = if ws && std::str::from_utf8(data).is_ok() {
            MessageKind::Text
        } else {
            MessageKind::Binary
        };
        self.deliver(conn, data, kind);
    }

    /// A binary websocket message arrives on `conn`: `on_message`.
    pub fn binary(&mut self, conn: ConnId, data: &[u8]) {
        self.deliver(conn, data, MessageKind::Binary);
    }

    /// Bytes arrive on a `custom://` connection: the plugin's
    /// [`Protocol`] cuts them into packets (`input`, `decode`), each one an
    /// `on_message`; an incomplete tail is kept for the next call. A
    /// protocol error closes the connection, as the host does. Panics if
    /// the plugin has no protocol.
    pub fn feed(&mut self, conn: ConnId, bytes: &[u8]) {
        self.expect_open(conn, "feed");
        let mut buf = std::mem::take(
            &mut self
                .state
                .borrow_mut()
                .conns
                .get_mut(&conn.0)
                .unwrap()
                .partial,
        );
        buf.extend_from_slice(bytes);
        loop {
            let proto = self
                .protocol
                .as_mut()
                .expect("feed: the plugin's protocol() returned None");
            match proto.input(&buf) {
                Ok(Some(n)) if n > 0 && n <= buf.len() => {
                    let packet: Vec<u8> = buf.drain(..n).collect();
                    let msg = proto.decode(&packet).to_vec();
                    self.deliver(conn, &msg, MessageKind::Binary);
                    if self.state.borrow().open(conn.0).is_none() {
                        return;
                    }
                }
                Ok(Some(n)) => {
                    panic!("feed: Protocol::input returned {n} for {} bytes", buf.len())
                }
                Ok(None) => break,
                Err(reason) => {
                    self.state.borrow_mut().logs.push((Level::Warn, reason));
                    self.disconnect(conn);
                    return;
                }
            }
        }
        if let Some(c) = self.state.borrow_mut().conns.get_mut(&conn.0) {
            c.partial = buf;
        }
    }

    /// An HTTP request arrives on `conn` (a connection of an `http://`
    /// host): `on_request`. Its answer, whenever the plugin gives it, is in
    /// [`TestHost::responses`].
    pub fn request(&mut self, conn: ConnId, req: &TestRequest) {
        self.expect_open(conn, "request");
        if let Some(c) = self.state.borrow_mut().conns.get_mut(&conn.0) {
            c.waiting += 1;
            c.bytes_read += req.body.len() as u64;
        }
        self.call(|p, ctx| {
            req.with_raw(|raw| p.on_request(ctx, conn, &crate::Request::from_raw(raw)))
        });
    }

    /// One request on a new connection, and the answer the plugin gave
    /// during it (`None` if it has not answered yet): a handler test in one
    /// line.
    pub fn call_http(&mut self, req: &TestRequest) -> Option<Response> {
        let conn = self.connect();
        self.request(conn, req);
        self.responses(conn).into_iter().next()
    }

    /// The client closes `conn`: the connection leaves its groups, then
    /// `on_close`.
    pub fn disconnect(&mut self, conn: ConnId) {
        // Already closed: nothing more happens.
        if self.state.borrow_mut().close(conn.0) {
            self.settle();
        }
    }

    /// `on_buffer_full` for `conn`.
    pub fn buffer_full(&mut self, conn: ConnId) {
        self.call(|p, ctx| p.on_buffer_full(ctx, conn));
    }

    /// `on_buffer_drain` for `conn`.
    pub fn buffer_drain(&mut self, conn: ConnId) {
        self.call(|p, ctx| p.on_buffer_drain(ctx, conn));
    }

    /// `on_error` for `conn` (see [`crate::error_code`]).
    pub fn error(&mut self, conn: ConnId, code: u32, msg: &str) {
        self.call(|p, ctx| p.on_error(ctx, conn, code, msg));
    }

    /// Another worker published: `on_publish`.
    pub fn publish(&mut self, topic: &str, data: impl AsRef<[u8]>) {
        self.call(|p, ctx| p.on_publish(ctx, topic, data.as_ref()));
    }

    /// Moves the virtual clock by `by`, firing every timer that comes due,
    /// in time order (`on_timer`; a repeating timer as often as it falls
    /// due). Returns the timers fired, in order.
    pub fn advance(&mut self, by: Duration) -> Vec<TimerId> {
        let end = self.state.borrow().now.saturating_add(by);
        let mut fired = Vec::new();
        loop {
            let next = {
                let mut s = self.state.borrow_mut();
                let due = s
                    .timers
                    .iter()
                    .filter_map(|(&id, t)| Some((t.due.filter(|&d| d <= end)?, id, *t)))
                    .min_by_key(|&(at, id, _)| (at, id))
                    .map(|(at, id, t)| (id, at, t));
                if let Some((id, at, t)) = due {
                    s.now = at;
                    if t.repeat {
                        s.timers.get_mut(&id).unwrap().due = at.checked_add(t.interval);
                    } else {
                        s.timers.remove(&id);
                    }
                }
                due.map(|(id, _, _)| id)
            };
            let Some(id) = next else { break };
            fired.push(TimerId(id));
            self.call(|p, ctx| p.on_timer(ctx, TimerId(id)));
        }
        self.state.borrow_mut().now = end;
        fired
    }

    /// The virtual clock: the sum of [`TestHost::advance`] calls (at most
    /// [`Duration::MAX`]).
    pub fn now(&self) -> Duration {
        self.state.borrow().now
    }

    /// Live timers: id, interval, whether it repeats, sorted by id.
    pub fn timers(&self) -> Vec<(TimerId, Duration, bool)> {
        let s = self.state.borrow();
        s.timers
            .iter()
            .map(|(&id, t)| (TimerId(id), t.interval, t.repeat))
            .collect()
    }

    /// What `conn` was sent since the last call (drained), including what
    /// reached it through groups, uids and `send_to_all`.
    pub fn recv(&mut self, conn: ConnId) -> Vec<Sent> {
        let mut s = self.state.borrow_mut();
        s.conns
            .get_mut(&conn.0)
            .map(|c| std::mem::take(&mut c.inbox))
            .unwrap_or_default()
    }

    /// [`TestHost::recv`] as text (lossy UTF-8).
    pub fn recv_text(&mut self, conn: ConnId) -> Vec<String> {
        self.recv(conn).iter().map(Sent::text).collect()
    }

    /// The HTTP answers `conn` got since the last call (drained), in order.
    pub fn responses(&mut self, conn: ConnId) -> Vec<Response> {
        let mut s = self.state.borrow_mut();
        s.conns
            .get_mut(&conn.0)
            .map(|c| std::mem::take(&mut c.responses))
            .unwrap_or_default()
    }

    /// Everything the plugin asked of the host so far, in order.
    pub fn effects(&self) -> Vec<Effect> {
        self.state.borrow().effects.clone()
    }

    /// [`TestHost::effects`], emptied.
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.state.borrow_mut().effects)
    }

    /// Every line the plugin logged, with its level.
    pub fn logs(&self) -> Vec<(Level, String)> {
        self.state.borrow().logs.clone()
    }

    /// Whether any line at `level` contains `text`.
    pub fn logged(&self, level: Level, text: &str) -> bool {
        self.state
            .borrow()
            .logs
            .iter()
            .any(|(l, t)| *l == level && t.contains(text))
    }

    /// The groups `conn` is in, sorted.
    pub fn groups(&self, conn: ConnId) -> Vec<String> {
        let s = self.state.borrow();
        s.groups
            .iter()
            .filter(|(_, m)| m.contains(&conn.0))
            .map(|(g, _)| g.clone())
            .collect()
    }

    /// The members of `group`, sorted.
    pub fn members(&self, group: &str) -> Vec<ConnId> {
        let s = self.state.borrow();
        s.groups
            .get(group)
            .into_iter()
            .flatten()
            .map(|&c| ConnId(c))
            .collect()
    }

    /// The uid `conn` is bound to.
    pub fn uid(&self, conn: ConnId) -> Option<String> {
        self.state.borrow().open(conn.0)?.uid.clone()
    }

    /// Whether `conn` is open (connected and not closed by either side).
    pub fn is_open(&self, conn: ConnId) -> bool {
        self.state.borrow().open(conn.0).is_some()
    }

    /// Whether reading from `conn` is paused ([`Context::pause_recv`]).
    pub fn is_paused(&self, conn: ConnId) -> bool {
        self.state.borrow().open(conn.0).is_some_and(|c| c.paused)
    }

    /// The open connections, sorted.
    pub fn connections(&self) -> Vec<ConnId> {
        let s = self.state.borrow();
        s.conns
            .iter()
            .filter(|(_, c)| !c.closing)
            .map(|(&id, _)| ConnId(id))
            .collect()
    }

    /// The plugin object, to look at its state.
    pub fn plugin(&self) -> &P {
        &self.plugin
    }

    /// The plugin object, mutable.
    pub fn plugin_mut(&mut self) -> &mut P {
        &mut self.plugin
    }

    /// Runs a reload with live handover onto `next` (the new build's
    /// object), as the host does: `on_export` and `on_export_conn` for each
    /// inbound connection here; then on a new host with the same settings,
    /// `on_worker_start`, `on_import`, and `on_import_conn` for each
    /// connection, under a new id, with its groups and uid already in
    /// place. Timers do not move. Connections the new build refuses are
    /// closed (without `on_close`).
    ///
    /// Returns the new host and the ids, old to new. `Err` is what the host
    /// would report when the handover aborts: the new build's
    /// `on_worker_start` or `on_import` failed (this host then keeps
    /// everything, as the old worker would). Like the host, it does not
    /// check [`Plugin::handover`].
    pub fn handover<Q: Plugin>(
        &mut self,
        next: Q,
    ) -> Result<(TestHost<Q>, BTreeMap<ConnId, ConnId>), String> {
        let worker = self.call(|p, ctx| p.on_export(ctx));
        let ids: Vec<u64> = {
            let s = self.state.borrow();
            s.conns
                .iter()
                .filter(|(_, c)| !c.closing && !c.outbound)
                .map(|(&id, _)| id)
                .collect()
        };
        let conns: Vec<(u64, Vec<u8>)> = ids
            .into_iter()
            .map(|id| (id, self.call(|p, ctx| p.on_export_conn(ctx, ConnId(id)))))
            .collect();
        let info = self.state.borrow().info;
        let mut builder = Builder::new()
            .name(info.name.as_str())
            .worker(info.id, info.count)
            .listen(info.listen.as_str())
            .crate_info(&self.crate_name, &self.crate_version);
        for t in info.options.as_slice() {
            builder = builder.option(t.0.as_str(), t.1.as_str());
        }
        let mut new = builder.build(next);
        // New ids do not collide with old ones, as in a real new worker.
        new.state.borrow_mut().next_conn = self.state.borrow().next_conn + 100;
        new.start()?;
        let from = Build {
            name: &self.crate_name,
            version: &self.crate_version,
            hash: "0000000000000000000000000000000000000000000000000000000000000000",
        };
        new.call(|p, ctx| p.on_import(ctx, &from, &worker))
            .map_err(|e| e.to_string())?;
        let mut map = BTreeMap::new();
        for (old, state) in conns {
            let (remote, uid, groups) = {
                let s = self.state.borrow();
                let c = &s.conns[&old];
                let groups: Vec<String> = s
                    .groups
                    .iter()
                    .filter(|(_, m)| m.contains(&old))
                    .map(|(g, _)| g.clone())
                    .collect();
                (c.remote, c.uid.clone(), groups)
            };
            let id = {
                let mut s = new.state.borrow_mut();
                let id = s.new_conn(Some(remote), false);
                s.conns.get_mut(&id).unwrap().uid = uid;
                for g in groups {
                    s.groups.entry(g).or_default().insert(id);
                }
                id
            };
            let kept = new.call(|p, ctx| p.on_import_conn(ctx, ConnId(id), &from, &state));
            if kept {
                map.insert(ConnId(old), ConnId(id));
            } else {
                let mut s = new.state.borrow_mut();
                s.forget_groups(id);
                s.conns.remove(&id);
            }
        }
        // Moved connections leave the old worker without `on_close`.
        let mut s = self.state.borrow_mut();
        for old in map.keys() {
            s.forget_groups(old.0);
            s.conns.remove(&old.0);
        }
        drop(s);
        Ok((new, map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Request;

    #[derive(Default)]
    struct Probe {
        closed: Vec<ConnId>,
        published: Vec<(String, Vec<u8>)>,
        timer: Option<TimerId>,
        ticks: u32,
    }

    impl Plugin for Probe {
        fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), crate::StartError> {
            if ctx.option("fail").is_some() {
                return Err("asked to fail".into());
            }
            self.timer = Some(ctx.add_timer(Duration::from_secs(1), true));
            Ok(())
        }
        fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
            match data {
                b"close" => {
                    ctx.close_with(conn, "bye");
                }
                b"pub" => ctx.publish("t", "x"),
                b"uid" => {
                    ctx.bind_uid(conn, "u1");
                    ctx.send_to_uid("u1", "to uid");
                }
                _ => {
                    ctx.send(conn, data);
                }
            }
        }
        fn on_close(&mut self, ctx: &mut Context<'_>, conn: ConnId) {
            assert!(!ctx.conn_info(conn).is_some_and(|i| i.paused));
            self.closed.push(conn);
        }
        fn on_publish(&mut self, _ctx: &mut Context<'_>, topic: &str, data: &[u8]) {
            self.published.push((topic.to_string(), data.to_vec()));
        }
        fn on_timer(&mut self, _ctx: &mut Context<'_>, timer: TimerId) {
            assert_eq!(Some(timer), self.timer);
            self.ticks += 1;
        }
        fn on_error(&mut self, ctx: &mut Context<'_>, _conn: ConnId, code: u32, msg: &str) {
            ctx.warn(format_args!("error {code}: {msg}"));
        }
        fn on_request(&mut self, ctx: &mut Context<'_>, conn: ConnId, req: &Request<'_>) {
            let body = format!("{} {} {:?}", req.method(), req.path(), req.query_param("q"));
            ctx.respond(conn, 201, &[("X-A", "b")], body.as_bytes());
        }
    }

    #[test]
    fn close_with_sends_then_closes_after_the_callback() {
        let mut h = TestHost::new(Probe::default());
        h.start().unwrap();
        let c = h.connect();
        h.message(c, "close");
        assert_eq!(h.recv_text(c), ["bye"]);
        assert!(!h.is_open(c));
        assert_eq!(h.plugin().closed, [c]);
        // A close from the client side after that is a no-op.
        h.disconnect(c);
        assert_eq!(h.plugin().closed, [c]);
    }

    #[test]
    fn publishes_reach_this_worker_after_the_callback() {
        let mut h = TestHost::new(Probe::default());
        let c = h.connect();
        h.message(c, "pub");
        assert_eq!(h.plugin().published, [("t".to_string(), b"x".to_vec())]);
        assert!(h.effects().contains(&Effect::Publish {
            topic: "t".into(),
            data: b"x".to_vec()
        }));
    }

    #[test]
    fn repeating_timers_fire_as_often_as_they_fall_due() {
        let mut h = TestHost::new(Probe::default());
        h.start().unwrap();
        assert_eq!(h.advance(Duration::from_millis(999)), []);
        assert_eq!(h.advance(Duration::from_millis(2001)).len(), 3);
        assert_eq!(h.plugin().ticks, 3);
        assert_eq!(h.now(), Duration::from_secs(3));
    }

    #[test]
    fn start_errors_come_back_as_text() {
        let mut h = Builder::new().option("fail", "1").build(Probe::default());
        assert_eq!(h.start().unwrap_err(), "asked to fail");
    }

    #[test]
    fn websocket_sends_pick_the_frame_kind_like_the_host() {
        let mut h = Builder::new()
            .listen("websocket://127.0.0.1:8080")
            .build(Probe::default());
        let c = h.connect_websocket(&TestRequest::get("/")).unwrap();
        h.message(c, "hi");
        h.binary(c, b"hi");
        h.binary(c, &[0xff]);
        let kinds: Vec<MessageKind> = h.recv(c).iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [MessageKind::Text, MessageKind::Binary, MessageKind::Binary]
        );
    }

    /// Dials whatever it is sent; adds a timer on `"timer"`.
    #[derive(Default)]
    struct Dialer {
        dialed: Vec<Result<ConnId, String>>,
        ticks: u32,
    }

    impl Plugin for Dialer {
        fn on_message(&mut self, ctx: &mut Context<'_>, _conn: ConnId, data: &[u8]) {
            match std::str::from_utf8(data).unwrap() {
                "timer" => {
                    ctx.add_timer(Duration::from_secs(1), true);
                }
                url => self.dialed.push(ctx.connect(url)),
            }
        }
        fn on_timer(&mut self, _ctx: &mut Context<'_>, _timer: TimerId) {
            self.ticks += 1;
        }
    }

    #[test]
    fn connect_takes_the_urls_the_host_takes() {
        let mut h = TestHost::new(Dialer::default());
        let c = h.connect();
        for url in [
            "tcp://127.0.0.1:9",
            "text://localhost:9",
            "frame://[::1]:9",
            "ws://example.com:80/chat",
            "websocket://example.com:80/chat",
        ] {
            h.message(c, url);
            let dialed = h.plugin_mut().dialed.pop().unwrap();
            assert!(dialed.is_ok(), "{url}: {dialed:?}");
        }
        for (url, why) in [
            ("wss://example.com:443", "cannot connect to wss://"),
            ("tcp://example.com", "expected scheme://host:port"),
            ("text://just some text", "expected scheme://host:port"),
            ("tcp://:80", "expected scheme://host:port"),
            ("tcp://h:99999", "expected scheme://host:port"),
        ] {
            h.message(c, url);
            let err = h.plugin_mut().dialed.pop().unwrap().unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn the_clock_stops_at_its_end_instead_of_overflowing() {
        let mut h = TestHost::new(Dialer::default());
        let c = h.connect();
        h.advance(Duration::from_secs(5));
        // Used to overflow (`now + by`, then `now + interval` in the host
        // function, which aborted the test binary).
        assert_eq!(h.advance(Duration::MAX), []);
        assert_eq!(h.now(), Duration::MAX);
        h.message(c, "timer");
        assert_eq!(h.timers().len(), 1);
        assert_eq!(h.advance(Duration::from_secs(10)), []);
        assert_eq!(h.plugin().ticks, 0);

        // A repeating timer whose next time falls past the end stops there.
        let mut h = TestHost::new(Dialer::default());
        let c = h.connect();
        h.advance(Duration::MAX - Duration::from_millis(1500));
        h.message(c, "timer");
        assert_eq!(h.advance(Duration::MAX).len(), 1);
        assert_eq!(h.plugin().ticks, 1);
        assert_eq!(h.timers().len(), 1);
    }

    /// A host function that panics (here: a re-entrant borrow of the
    /// harness's state, which only a broken harness could cause, played
    /// by holding the borrow from the test) fails this test with the
    /// panic's message instead of aborting every test in the binary.
    #[test]
    #[should_panic(expected = "test host: host function `log` panicked")]
    fn a_panic_in_a_host_function_fails_only_its_test() {
        let mut h = TestHost::new(Probe::default());
        let c = h.connect();
        let shared: *const Shared = &*h.state;
        // SAFETY: `h.state` is boxed and outlives this test body.
        let _held = unsafe { &*shared }.borrow_mut();
        // `Probe::on_error` logs: `log` cannot borrow the state.
        h.error(c, 1, "x");
    }

    #[test]
    fn uids_and_http_answers() {
        let mut h = TestHost::new(Probe::default());
        let c = h.connect();
        h.message(c, "uid");
        assert_eq!(h.uid(c).as_deref(), Some("u1"));
        assert_eq!(h.recv_text(c), ["to uid"]);

        let mut h = Builder::new()
            .listen("http://127.0.0.1:8080")
            .build(Probe::default());
        let r = h.call_http(&TestRequest::get("/a?q=1")).unwrap();
        assert_eq!((r.status, r.header("x-a")), (201, Some("b")));
        assert_eq!(r.text(), r#"GET /a Some("1")"#);
    }
}
