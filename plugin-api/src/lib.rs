//! Write wm-host plugins in safe Rust.
//!
//! New here? The [`guide`] goes from a first plugin (`wm-host new`) to
//! state, timers, groups, HTTP, custom protocols and live reloads, and
//! [`testing`] tests a plugin without a server.
//!
//! A plugin is a type implementing [`Plugin`], exported with
//! [`export_plugin!`] from a `cdylib` crate. wm-host creates one plugin object
//! per worker process and keeps it for the life of that process, so fields of
//! the plugin are Workerman's "persistent objects".
//!
//! ```
//! use plugin_api::{export_plugin, ConnId, Context, Plugin};
//!
//! #[derive(Default)]
//! struct Echo;
//!
//! impl Plugin for Echo {
//!     fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
//!         ctx.send(conn, data);
//!     }
//! }
//!
//! export_plugin!(Echo);
//! # fn main() {}
//! ```
//!
//! A panic in any callback is caught inside the plugin and reported to the
//! host, which logs it and closes the connection concerned; the worker keeps
//! serving everyone else.
//!
//! # Life of a plugin
//!
//! Each worker process loads the plugin, builds one object with the
//! constructor given to [`export_plugin!`], and calls
//! [`Plugin::on_worker_start`]. It then calls the other [`Plugin`] methods as
//! events arrive, one at a time on the worker's single thread, each with a
//! [`Context`] for talking back to the host. When the worker stops it calls
//! [`Plugin::on_worker_stop`] and drops the object.
//!
//! A reload starts new workers on the new build and stops the old ones. By
//! default the old worker finishes with its connections and the new one
//! starts empty, so state that must survive a reload belongs outside the
//! process. A plugin that opts in with [`Plugin::handover`] keeps its
//! clients instead: the old worker hands its live connections (sockets,
//! buffers, framing state) to its replacement, and the plugin carries its
//! own state across as bytes ([`Plugin::on_export`],
//! [`Plugin::on_export_conn`] in the old build; [`Plugin::on_import`],
//! [`Plugin::on_import_conn`] in the new one). Clients see nothing.
//!
//! # Coming from Workerman
//!
//! | Workerman | here |
//! |---|---|
//! | `onWorkerStart`, `onConnect`, `onMessage`, `onClose`… | the [`Plugin`] methods of the same name |
//! | `$connection` | a [`ConnId`] plus the [`Context`] of the callback |
//! | `$connection->send($data)` (`true`/`null`/`false`) | [`Context::send`] ([`SendStatus`]) |
//! | `$connection->close()`, `destroy()`, `pauseRecv()`, `pipe()` | [`Context::close`], [`Context::destroy`], [`Context::pause_recv`], [`Context::pipe`] |
//! | `Timer::add`, `Timer::del` | [`Context::add_timer`], [`Context::del_timer`] |
//! | `AsyncTcpConnection` | [`Context::connect`] |
//! | protocol classes (`input`/`decode`/`encode`) | [`Protocol`] on a `custom://` listener |
//! | GatewayWorker's `joinGroup`, `sendToGroup`, `bindUid`… | [`Context::join_group`], [`Context::send_to_group`], [`Context::bind_uid`]… |
//! | `echo`/`Worker::log` | [`Context::log`] |

#![deny(missing_docs)]

pub mod abi;
#[doc(hidden)]
pub mod adapter;
mod context;
mod request;
pub mod testing;
#[doc(hidden)]
pub mod url;

#[doc = include_str!("guide.md")]
pub mod guide {}

#[doc(hidden)]
pub use context::to_raw_addr;
pub use context::{ConnId, ConnInfo, Context, Level, MessageKind, SendStatus, TimerId, WorkerInfo};
pub use request::Request;

/// The error type `on_worker_start` may return: anything that converts into a
/// boxed error, so `?` works on most results (and on `&str`/`String` with
/// `.ok_or("…")?` or `Err("…".into())`). Its text is reported by `wm-host
/// start` and written to the log.
pub type StartError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The build a handover comes from, passed to [`Plugin::on_import`] and
/// [`Plugin::on_import_conn`]: enough to migrate state from an older format,
/// or to refuse a build you do not trust.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Build<'a> {
    /// The plugin crate's name (`CARGO_PKG_NAME` of the old build).
    pub name: &'a str,
    /// The plugin crate's version (`CARGO_PKG_VERSION` of the old build).
    pub version: &'a str,
    /// The host's SHA-256 of the old build's `.so`, in lowercase hex: tells
    /// apart two builds of one version.
    pub hash: &'a str,
}

/// Error codes passed to [`Plugin::on_error`], as in Workerman.
pub mod error_code {
    /// An outbound connection could not be established (Workerman's
    /// `WORKERMAN_CONNECT_FAIL`); `on_close` follows.
    pub const CONNECT_FAILED: u32 = 1;
    /// Data could not be sent (connection closed, or send buffer full;
    /// Workerman's `WORKERMAN_SEND_FAIL`). The message tells which.
    pub const SEND_FAILED: u32 = 2;
}

/// Framing for `custom://` listeners (Workerman's protocol classes): the host
/// keeps buffers, limits and IO, and asks this object where messages are.
///
/// Return it from [`Plugin::protocol`]; one object serves every connection
/// of the worker, so keep per-connection state out of it.
///
/// ```
/// use plugin_api::{ConnId, Context, Plugin, Protocol};
///
/// /// Messages end with `\r\n` (Workerman's `Text` protocol, with CRLF).
/// struct CrLf;
///
/// impl Protocol for CrLf {
///     fn input(&mut self, buf: &[u8]) -> Result<Option<usize>, String> {
///         Ok(buf.windows(2).position(|w| w == b"\r\n").map(|i| i + 2))
///     }
///     fn decode<'a>(&mut self, packet: &'a [u8]) -> &'a [u8] {
///         &packet[..packet.len() - 2]
///     }
///     fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) {
///         out.extend_from_slice(data);
///         out.extend_from_slice(b"\r\n");
///     }
/// }
///
/// struct Echo;
///
/// impl Plugin for Echo {
///     fn protocol(&mut self) -> Option<Box<dyn Protocol>> {
///         Some(Box::new(CrLf))
///     }
///     fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
///         ctx.send(conn, data); // framed by CrLf::encode
///     }
/// }
///
/// let mut p = CrLf;
/// assert_eq!(p.input(b"ab\r\ncd"), Ok(Some(4)));
/// assert_eq!(p.input(b"ab"), Ok(None));
/// assert_eq!(p.decode(b"ab\r\n"), b"ab");
/// ```
pub trait Protocol: 'static {
    /// Where the first packet in `buf` ends (Workerman's `input()`), called
    /// whenever bytes arrive. `buf` starts at a packet boundary and holds
    /// everything received since.
    ///
    /// `Ok(Some(n))`: the first packet is `buf[..n]`; `Ok(None)`: more bytes
    /// are needed; `Err(reason)`: bad input (the connection is closed and the
    /// reason logged). Packets over `max_package_size` are refused by the host.
    fn input(&mut self, buf: &[u8]) -> Result<Option<usize>, String>;
    /// The message inside a complete packet, as a part of it (Workerman's
    /// `decode()`): what [`Plugin::on_message`] receives. Default: all.
    /// Return a sub-slice of `packet` (e.g. without header or delimiter); a
    /// slice from elsewhere is ignored and the whole packet is used.
    fn decode<'a>(&mut self, packet: &'a [u8]) -> &'a [u8] {
        packet
    }
    /// Appends the bytes to write for an outgoing message to `out` (Workerman's
    /// `encode()`); used by [`Context::send`] and the group and broadcast
    /// sends on `custom://` connections.
    fn encode(&mut self, data: &[u8], out: &mut Vec<u8>);
}

/// Business logic run by wm-host workers. Every method has a no-op default;
/// implement only what you need.
///
/// The methods are Workerman's callbacks. They are called one at a time on
/// the worker's thread, so `&mut self` is all the synchronisation needed, and
/// they should not block: the worker serves all its connections from this
/// thread. A panic is caught and logged; it closes only the connection the
/// callback was about.
///
/// # Live handover on reload
///
/// A plugin whose [`Plugin::handover`] returns true keeps its connections
/// across a reload: the old worker hands them to its replacement on the new
/// build (when both builds opt in; otherwise the reload goes as without
/// handover). The plugin's own state travels as bytes it chooses:
///
/// 1. Old build: [`Plugin::on_export`] once, then [`Plugin::on_export_conn`]
///    for each connection that moves. A moved connection is gone from the
///    old worker without [`Plugin::on_close`]. Exporting must leave the
///    plugin able to carry on: if the handover is aborted, the old build
///    keeps every connection and serves on.
/// 2. New build, after [`Plugin::on_worker_start`]: [`Plugin::on_import`]
///    once, then [`Plugin::on_import_conn`] for each connection, under its
///    new [`ConnId`] and before the host reads from it. There is no
///    `on_connect` for these connections. Their groups and uid bindings
///    move by themselves; timers do not (start them again here). Sends made
///    during the import are queued and go out once the handover commits.
///    Publishes and group sends are cut at one point of the host's order:
///    those before it were seen by the old build (and are in what it
///    exported), those after it reach the new one, each exactly once.
///    Outbound connections ([`Context::connect`]) and pipes do not move:
///    the old build closes them when it stops; open new ones here.
///
/// An `Err` or a panic in `on_import`, or a panic in an export, aborts the
/// whole handover: the old build keeps every connection and the reload
/// fails. `on_import_conn` returning false (or panicking) refuses just that
/// connection, which the host closes cleanly.
///
/// The bytes may come from an older build, or a newer one after a
/// rollback: put a version in them, and refuse what you cannot read.
///
/// ```
/// use std::collections::HashMap;
/// use plugin_api::{Build, ConnId, Context, Plugin, StartError};
///
/// /// Counts messages per connection; the counts survive reloads.
/// #[derive(Default)]
/// struct Counts {
///     total: u64,
///     per_conn: HashMap<ConnId, u64>,
/// }
///
/// impl Plugin for Counts {
///     fn handover(&self) -> bool {
///         true
///     }
///     fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, _data: &[u8]) {
///         self.total += 1;
///         let n = self.per_conn.entry(conn).or_default();
///         *n += 1;
///         ctx.send(conn, format!("{n} of {}", self.total));
///     }
///     fn on_close(&mut self, _ctx: &mut Context<'_>, conn: ConnId) {
///         self.per_conn.remove(&conn);
///     }
///     // Format 1: a version byte, then the count (little-endian).
///     fn on_export(&mut self, _ctx: &mut Context<'_>) -> Vec<u8> {
///         [&[1u8][..], &self.total.to_le_bytes()].concat()
///     }
///     fn on_export_conn(&mut self, _ctx: &mut Context<'_>, conn: ConnId) -> Vec<u8> {
///         let n = self.per_conn.get(&conn).copied().unwrap_or(0);
///         [&[1u8][..], &n.to_le_bytes()].concat()
///     }
///     fn on_import(
///         &mut self,
///         _ctx: &mut Context<'_>,
///         from: &Build<'_>,
///         state: &[u8],
///     ) -> Result<(), StartError> {
///         self.total += read_v1(state)
///             .ok_or_else(|| format!("unknown state from {} {}", from.name, from.version))?;
///         Ok(())
///     }
///     fn on_import_conn(
///         &mut self,
///         _ctx: &mut Context<'_>,
///         conn: ConnId,
///         _from: &Build<'_>,
///         state: &[u8],
///     ) -> bool {
///         read_v1(state).map(|n| self.per_conn.insert(conn, n)).is_some()
///     }
/// }
///
/// fn read_v1(state: &[u8]) -> Option<u64> {
///     match state {
///         [1, n @ ..] => Some(u64::from_le_bytes(n.try_into().ok()?)),
///         _ => None,
///     }
/// }
///
/// assert_eq!(read_v1(&[1, 7, 0, 0, 0, 0, 0, 0, 0]), Some(7));
/// assert_eq!(read_v1(&[2, 7]), None);
/// ```
#[allow(unused_variables)]
pub trait Plugin: 'static {
    /// The worker process started (Workerman's `onWorkerStart`): set up
    /// timers, outbound connections, configuration from
    /// [`Context::option`]. Connections are accepted only after this returns;
    /// returning an error (or panicking) fails the worker's start, and
    /// `wm-host start` or `reload` reports it.
    fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
        Ok(())
    }
    /// The worker is stopping, after its connections were closed (Workerman's
    /// `onWorkerStop`). The plugin object is dropped right after.
    fn on_worker_stop(&mut self, ctx: &mut Context<'_>) {}
    /// A reload was asked for and this worker is not reloadable (Workerman's
    /// `onWorkerReload` with `reloadable = false`): it keeps running the code
    /// it has. Reloadable workers are replaced instead and do not see this.
    fn on_worker_reload(&mut self, ctx: &mut Context<'_>) {}
    /// A client connected (Workerman's `onConnect`), or an outbound
    /// connection made with [`Context::connect`] is established. On websocket
    /// listeners it comes after the handshake was accepted.
    fn on_connect(&mut self, ctx: &mut Context<'_>, conn: ConnId) {}
    /// One complete message arrived, as framed by the listener's protocol
    /// (Workerman's `onMessage`): a line without its `\n` on `text://`, a
    /// payload on `frame://` and `ws://`, whatever [`Protocol::decode`] returns
    /// on `custom://`, the bytes as read on `tcp://`. `data` is borrowed for
    /// this call only. For websocket messages see [`Context::message_kind`].
    /// `http://` requests go to [`Plugin::on_request`] instead.
    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {}
    /// The connection closed, by either side (Workerman's `onClose`). `conn` is
    /// no longer usable: forget what you kept about it. Its groups and uid
    /// binding are already gone.
    fn on_close(&mut self, ctx: &mut Context<'_>, conn: ConnId) {}
    /// The connection's send buffer reached its limit (`max_send_buffer_size`;
    /// Workerman's `onBufferFull`): further sends are dropped until
    /// [`Plugin::on_buffer_drain`]. Stop producing for it, e.g. with
    /// [`Context::pause_recv`] on the source.
    fn on_buffer_full(&mut self, ctx: &mut Context<'_>, conn: ConnId) {}
    /// The connection's send buffer was emptied after it had been full
    /// (Workerman's `onBufferDrain`): sending may resume.
    fn on_buffer_drain(&mut self, ctx: &mut Context<'_>, conn: ConnId) {}
    /// Something failed on the connection (Workerman's `onError`); `code` is
    /// one of [`error_code`] and `msg` says what happened, e.g. `"send buffer
    /// full and drop package"`.
    fn on_error(&mut self, ctx: &mut Context<'_>, conn: ConnId, code: u32, msg: &str) {}
    /// A timer made with [`Context::add_timer`] fired. A one-shot timer is
    /// gone by now; a repeating one stays until [`Context::del_timer`].
    fn on_timer(&mut self, ctx: &mut Context<'_>, timer: TimerId) {}
    /// A websocket client sent its handshake (Workerman's onWebSocketConnect),
    /// before `on_connect`. Return `Err(status)` to refuse it with that HTTP
    /// status (e.g. 403); the connection is then closed without
    /// `on_connect`.
    ///
    /// ```
    /// use plugin_api::{ConnId, Context, Plugin, Request};
    ///
    /// struct Guarded;
    ///
    /// impl Plugin for Guarded {
    ///     fn on_websocket_connect(
    ///         &mut self,
    ///         _ctx: &mut Context<'_>,
    ///         _conn: ConnId,
    ///         req: &Request<'_>,
    ///     ) -> Result<(), u16> {
    ///         match req.query_param("token") {
    ///             Some("secret") => Ok(()),
    ///             _ => Err(403),
    ///         }
    ///     }
    /// }
    /// ```
    fn on_websocket_connect(
        &mut self,
        ctx: &mut Context<'_>,
        conn: ConnId,
        req: &Request<'_>,
    ) -> Result<(), u16> {
        Ok(())
    }
    /// A complete request arrived on an `http://` listener. Answer it with
    /// [`Context::respond`]; requests on one connection are answered in order.
    /// The default answers 404.
    fn on_request(&mut self, ctx: &mut Context<'_>, conn: ConnId, req: &Request<'_>) {
        ctx.respond(
            conn,
            404,
            &[("Content-Type", "text/plain")],
            b"404 Not Found\n",
        );
    }
    /// The framing for `custom://` listeners; asked once per worker, right
    /// after the plugin object is built (before `on_worker_start`). `None`
    /// (the default) makes `custom://` listeners refuse to start.
    fn protocol(&mut self) -> Option<Box<dyn Protocol>> {
        None
    }
    /// A message published with [`Context::publish`] by any worker of the
    /// host, this one included, in the order each worker published them.
    /// Every worker gets it, whatever its group, as long as it runs a plugin.
    fn on_publish(&mut self, ctx: &mut Context<'_>, topic: &str, data: &[u8]) {}
    /// Opt in to live handover on reload (see [the trait
    /// docs](Plugin#live-handover-on-reload)); implement the `on_export*`
    /// and `on_import*` methods with it. Asked once, right after the plugin
    /// object is built. Default: false, connections stay with the old build.
    fn handover(&self) -> bool {
        false
    }
    /// Old build, at the start of a handover: the worker-level state to
    /// hand to the new build's [`Plugin::on_import`]. Called once, before
    /// any [`Plugin::on_export_conn`]. Default: nothing.
    fn on_export(&mut self, ctx: &mut Context<'_>) -> Vec<u8> {
        Vec::new()
    }
    /// Old build: the state of one connection that moves to the new build,
    /// for its [`Plugin::on_import_conn`]. The connection then leaves this
    /// worker without [`Plugin::on_close`]. Default: nothing.
    fn on_export_conn(&mut self, ctx: &mut Context<'_>, conn: ConnId) -> Vec<u8> {
        Vec::new()
    }
    /// New build: the old build's [`Plugin::on_export`], after
    /// [`Plugin::on_worker_start`] and before any connection is imported.
    /// `from` names the old build. Returning `Err` (or panicking) aborts the
    /// whole handover: the old build keeps every connection, and the reload
    /// fails with this error.
    fn on_import(
        &mut self,
        ctx: &mut Context<'_>,
        from: &Build<'_>,
        state: &[u8],
    ) -> Result<(), StartError> {
        Ok(())
    }
    /// New build: one connection handed over, under its new id `conn`, with
    /// what the old build's [`Plugin::on_export_conn`] returned for it.
    /// Called before the host reads from it; its groups and uid binding are
    /// already in place. Return false to refuse it: the host closes it
    /// cleanly (and calls no `on_close`). Default: keep it.
    fn on_import_conn(
        &mut self,
        ctx: &mut Context<'_>,
        conn: ConnId,
        from: &Build<'_>,
        state: &[u8],
    ) -> bool {
        true
    }
}

/// Exports a [`Plugin`] type from a `cdylib` crate.
///
/// `export_plugin!(MyPlugin)` builds it with `Default::default()`;
/// `export_plugin!(MyPlugin, MyPlugin::new)` with any `fn() -> MyPlugin`.
/// The constructor runs once per worker process, before
/// [`Plugin::on_worker_start`], which is where work that can fail belongs: a
/// panicking constructor fails the worker with just "constructor panicked".
///
/// Use it once per crate, at the top level. The crate needs
/// `crate-type = ["cdylib"]` in its `Cargo.toml`; its name and version are
/// what `wm-host status` shows.
///
/// ```
/// use plugin_api::{export_plugin, Plugin};
///
/// struct Counter {
///     messages: u64,
/// }
///
/// impl Counter {
///     fn new() -> Counter {
///         Counter { messages: 0 }
///     }
/// }
///
/// impl Plugin for Counter {}
///
/// export_plugin!(Counter, Counter::new);
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty) => {
        $crate::export_plugin!($ty, <$ty as ::core::default::Default>::default);
    };
    ($ty:ty, $ctor:expr) => {
        // What abi_stable's `#[export_root_module]` expands to, spelled out so
        // plugin crates need no direct abi_stable dependency (the attribute
        // names `::abi_stable`). A unit test pins the symbol name.
        #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
        pub static WM_PLUGIN_LIB_HEADER: $crate::adapter::LibHeader = {
            extern "C" fn create() -> $crate::adapter::ROption<$crate::abi::PluginInstance> {
                $crate::adapter::create::<$ty>($ctor)
            }
            fn root() -> $crate::abi::PluginModRef {
                $crate::adapter::module(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"), create)
            }
            extern "C" fn erased() -> $crate::adapter::RootModuleResult {
                $crate::adapter::call_root_module_loader(root)
            }
            // SAFETY: `erased` returns the module type named here.
            unsafe {
                $crate::adapter::LibHeader::from_constructor::<$crate::abi::PluginModRef>(
                    erased,
                    $crate::adapter::CheckTypeLayout::Yes,
                )
            }
        };
        // The handover callbacks, under a symbol of their own (see
        // `abi::HandoverVTable`); `abi::HANDOVER_SYMBOL` without its NUL.
        #[export_name = "wm_plugin_handover"]
        pub static WM_PLUGIN_HANDOVER_HEADER: $crate::adapter::LibHeader = {
            fn root() -> $crate::abi::HandoverVTableRef {
                $crate::adapter::handover_module::<$ty>()
            }
            extern "C" fn erased() -> $crate::adapter::RootModuleResult {
                $crate::adapter::call_root_module_loader(root)
            }
            // SAFETY: `erased` returns the module type named here.
            unsafe {
                $crate::adapter::LibHeader::from_constructor::<$crate::abi::HandoverVTableRef>(
                    erased,
                    $crate::adapter::CheckTypeLayout::Yes,
                )
            }
        };
    };
}
