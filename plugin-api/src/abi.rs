//! The FFI-safe types that cross between wm-host and a plugin `.so`.
//!
//! Plugin authors never touch this module: they implement [`crate::Plugin`] and
//! call [`crate::export_plugin!`]. The host loads [`PluginModRef`] with
//! abi_stable, which checks the layout of everything reachable from it (and the
//! `plugin-api` version) before any plugin code runs.
//!
//! Both vtables are prefix types. That lets a plugin built against a version
//! with more fields load in an older host, but not the other way round:
//! abi_stable refuses a plugin whose prefix types have fewer fields than the
//! host's. So new plugin callbacks come as a module of their own under a new
//! symbol ([`HandoverVTable`]), which older plugins simply lack.
//!
//! How the pieces fit together:
//!
//! 1. The host loads the `.so` and reads its root module, [`PluginMod`]
//!    (through [`PluginModRef`]), after abi_stable has checked the layouts and
//!    the version.
//! 2. In each worker process it calls [`PluginMod::create`] once, which returns
//!    a [`PluginInstance`]: the plugin object plus its [`PluginVTable`].
//! 3. For each event the host calls a function of the [`PluginVTable`], passing
//!    a [`HostCtx`] through which the plugin calls back into the
//!    [`HostVTable`]; [`crate::Context`] is the safe wrapper around it.
//!
//! Connections and timers cross as plain `u64` ids ([`crate::ConnId`] and
//! [`crate::TimerId`] on the safe side). Everything here is `#[repr(C)]` or
//! `#[repr(u8)]`: changing a type, a field or the order of fields breaks the
//! plugin ABI, and abi_stable refuses to load plugins built against the other
//! layout.

use std::ffi::c_void;
use std::marker::PhantomData;

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings,
    sabi_types::VersionStrings,
    std_types::{ROption, RResult, RSlice, RStr, RString, RVec, Tuple2},
    StableAbi,
};

/// What a plugin callback reports back to the host. Four bytes, so it comes
/// back in a register and every callback's arguments fit in registers too
/// (a larger return value takes a hidden pointer argument, which pushed the
/// message slice of `on_message` onto the stack). The text of a failure or
/// panic is fetched separately, with `PluginVTable::take_failure`.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The callback returned normally.
    Ok,
    /// The callback returned an error (only `on_worker_start` can).
    Failed,
    /// The callback panicked; the panic was caught inside the plugin.
    Panicked,
    /// `on_websocket_connect` refused the handshake with this HTTP status.
    Refused(u16),
}

/// How a message is framed on a websocket (other protocols use `Default`).
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawKind {
    /// The listener's natural framing (websocket: text).
    Default,
    /// A websocket text message (opcode 1).
    Text,
    /// A websocket binary message (opcode 2).
    Binary,
}

/// An HTTP request: a plain `http://` request or a websocket handshake.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct RawRequest<'a> {
    /// The request method, e.g. `GET`.
    pub method: RStr<'a>,
    /// The path, still percent-encoded, without the query.
    pub path: RStr<'a>,
    /// The query string without `?`; empty when absent.
    pub query: RStr<'a>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Header names and values in the order received.
    pub headers: RSlice<'a, Tuple2<RStr<'a>, RStr<'a>>>,
    /// The body (empty for a websocket handshake).
    pub body: RSlice<'a, u8>,
}

/// The header fields of an answer, read in place from the plugin's
/// `&[(&str, &str)]`. A Rust tuple has no stable layout, so the plugin passes
/// with the slice a function, compiled with the plugin, that reads one entry.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct RawFields<'a> {
    data: *const c_void,
    len: usize,
    get: extern "C" fn(data: *const c_void, i: usize) -> Tuple2<RStr<'a>, RStr<'a>>,
    _fields: PhantomData<&'a ()>,
}

impl<'a> RawFields<'a> {
    /// Called on the plugin's side of the boundary.
    pub fn from_slice(fields: &'a [(&'a str, &'a str)]) -> RawFields<'a> {
        extern "C" fn get<'a>(data: *const c_void, i: usize) -> Tuple2<RStr<'a>, RStr<'a>> {
            // SAFETY: `data` is the slice given to `from_slice`, and `iter`
            // asks only for entries below its length.
            let (k, v) = unsafe { *(data as *const (&'a str, &'a str)).add(i) };
            Tuple2(RStr::from_str(k), RStr::from_str(v))
        }
        RawFields {
            data: fields.as_ptr() as *const c_void,
            len: fields.len(),
            get,
            _fields: PhantomData,
        }
    }

    /// The fields as name/value pairs; what the host reads.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a str)> + Clone {
        let RawFields { data, get, .. } = *self;
        (0..self.len).map(move |i| {
            let f = get(data, i);
            (f.0.as_str(), f.1.as_str())
        })
    }
}

/// What happened to data handed to `send`.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawSendStatus {
    /// Written to the socket at once.
    Sent,
    /// Queued in the connection's send buffer.
    Queued,
    /// Dropped: the send buffer is over its limit.
    Dropped,
    /// The connection is closed or unknown.
    Closed,
}

/// A socket address as plain bytes (`family` 0 = none, 4 or 6).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawAddr {
    /// 0 when there is no address, 4 for IPv4, 6 for IPv6.
    pub family: u8,
    /// The port, in host byte order.
    pub port: u16,
    /// The address octets: the first 4 for IPv4, all 16 for IPv6.
    pub ip: [u8; 16],
}

/// One connection's counters and addresses.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct RawConnInfo {
    /// False when the connection is unknown or closed (other fields zero).
    pub open: bool,
    /// The peer's address.
    pub remote: RawAddr,
    /// The local address the connection arrived on (or left from).
    pub local: RawAddr,
    /// Bytes received from the socket so far.
    pub bytes_read: u64,
    /// Bytes written to the socket so far.
    pub bytes_written: u64,
    /// Bytes waiting in the send buffer.
    pub send_queue: u64,
    /// Bytes of an incomplete message kept from the socket.
    pub recv_queue: u64,
    /// Reading is paused (`pause_recv`).
    pub paused: bool,
}

/// Facts about the worker process, valid for the life of the process.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct RawWorkerInfo {
    /// The `name` of the `[[worker]]` group.
    pub name: RStr<'static>,
    /// This process's number within its group, `0..count`.
    pub id: u32,
    /// Number of processes in the group.
    pub count: u32,
    /// Operating-system process id.
    pub pid: u32,
    /// The listen address as written in the config.
    pub listen: RStr<'static>,
    /// The group's `[worker.options]`, sorted by key.
    pub options: RSlice<'static, Tuple2<RStr<'static>, RStr<'static>>>,
}

/// The build a handover comes from ([`crate::Build`] on the safe side).
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct RawBuild<'a> {
    /// The plugin crate's name.
    pub name: RStr<'a>,
    /// The plugin crate's version.
    pub version: RStr<'a>,
    /// The host's SHA-256 of the `.so`, in lowercase hex.
    pub hash: RStr<'a>,
}

/// Log levels, in `tracing` order.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RawLevel {
    /// `tracing::Level::ERROR`.
    Error = 1,
    /// `tracing::Level::WARN`.
    Warn = 2,
    /// `tracing::Level::INFO`.
    Info = 3,
    /// `tracing::Level::DEBUG`.
    Debug = 4,
    /// `tracing::Level::TRACE`.
    Trace = 5,
}

/// Functions the host offers to plugin callbacks. `state` is the host's own
/// per-worker data, opaque to the plugin.
///
/// Each function is valid only during the plugin callback that received the
/// [`HostCtx`], and only on that thread. `conn` arguments are connection ids
/// of this worker; functions returning `bool` return false when the
/// connection is unknown or already closed, unless stated otherwise. The
/// matching [`crate::Context`] method documents each one for plugin authors.
///
/// Fields after `connection_count`, the last prefix field, were appended in
/// later versions: a vtable from an older build may lack them, and with
/// `missing_field(panic)` their accessors on [`HostVTableRef`] panic then.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostVTableRef)))]
#[sabi(missing_field(panic))]
pub struct HostVTable {
    /// Facts about this worker process ([`crate::Context::worker`]).
    pub worker_info: extern "C" fn(state: *mut c_void) -> &'static RawWorkerInfo,
    /// Writes `msg` into the host's log at `level`, tagged with the worker
    /// ([`crate::Context::log`]).
    pub log: extern "C" fn(state: *mut c_void, level: RawLevel, msg: RStr<'_>),
    /// Frames and sends a message on a connection ([`crate::Context::send`]);
    /// `kind` picks the websocket opcode.
    pub send: extern "C" fn(
        state: *mut c_void,
        conn: u64,
        data: RSlice<'_, u8>,
        kind: RawKind,
    ) -> RawSendStatus,
    /// The framing of the message being handled by `on_message`.
    pub message_kind: extern "C" fn(state: *mut c_void) -> RawKind,
    /// Answers an HTTP request ([`crate::Context::respond`]).
    pub respond: extern "C" fn(
        state: *mut c_void,
        conn: u64,
        status: u16,
        headers: RawFields<'_>,
        body: RSlice<'_, u8>,
    ) -> RawSendStatus,
    /// Adds a connection to a host-wide group ([`crate::Context::join_group`]).
    pub join_group: extern "C" fn(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool,
    /// Removes a connection from a group ([`crate::Context::leave_group`]).
    pub leave_group: extern "C" fn(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool,
    /// Sends to every member of a group in every worker
    /// ([`crate::Context::send_to_group`]). `exclude` is a connection of this
    /// worker to skip, or 0.
    pub send_to_group: extern "C" fn(
        state: *mut c_void,
        group: RStr<'_>,
        data: RSlice<'_, u8>,
        kind: RawKind,
        exclude: u64,
    ),
    /// Sends to every connection of every worker, except `exclude` (or 0)
    /// ([`crate::Context::send_to_all`]).
    pub send_to_all:
        extern "C" fn(state: *mut c_void, data: RSlice<'_, u8>, kind: RawKind, exclude: u64),
    /// Binds a connection to a user id ([`crate::Context::bind_uid`]).
    pub bind_uid: extern "C" fn(state: *mut c_void, conn: u64, uid: RStr<'_>) -> bool,
    /// Sends to every connection bound to `uid`, in any worker
    /// ([`crate::Context::send_to_uid`]).
    pub send_to_uid:
        extern "C" fn(state: *mut c_void, uid: RStr<'_>, data: RSlice<'_, u8>, kind: RawKind),
    /// Members of a group across all workers, as known to this worker
    /// ([`crate::Context::group_count`]).
    pub group_count: extern "C" fn(state: *mut c_void, group: RStr<'_>) -> u64,
    /// Bound uids of the group's members across all workers, sorted, unique.
    pub group_uids: extern "C" fn(state: *mut c_void, group: RStr<'_>) -> RVec<RString>,
    /// Delivers `data` to `on_publish` in every worker, this one included
    /// ([`crate::Context::publish`]).
    pub publish: extern "C" fn(state: *mut c_void, topic: RStr<'_>, data: RSlice<'_, u8>),
    /// Closes once what is queued is written, after sending `last` if given
    /// ([`crate::Context::close`], [`crate::Context::close_with`]).
    pub close: extern "C" fn(state: *mut c_void, conn: u64, last: ROption<RSlice<'_, u8>>) -> bool,
    /// The peer's address if `remote`, else the local one; `family` 0 when
    /// unknown ([`crate::Context::remote_addr`], [`crate::Context::local_addr`]).
    pub addr: extern "C" fn(state: *mut c_void, conn: u64, remote: bool) -> RawAddr,
    /// Starts a timer firing `on_timer` after `interval_ms`, once or every
    /// `interval_ms` if `repeat`; returns its id ([`crate::Context::add_timer`]).
    pub add_timer: extern "C" fn(state: *mut c_void, interval_ms: u64, repeat: bool) -> u64,
    /// Stops a timer; false if it had already ended or never existed
    /// ([`crate::Context::del_timer`]).
    pub del_timer: extern "C" fn(state: *mut c_void, timer: u64) -> bool,
    /// Number of open connections in this worker
    /// ([`crate::Context::connection_count`]). The last prefix field: every
    /// field up to here is present in every version.
    #[sabi(last_prefix_field)]
    pub connection_count: extern "C" fn(state: *mut c_void) -> u64,
    /// Stops reading from a connection ([`crate::Context::pause_recv`]).
    pub pause_recv: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
    /// Reads from a paused connection again ([`crate::Context::resume_recv`]).
    pub resume_recv: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
    /// Half-close after flushing; close for good after a short linger.
    pub end: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
    /// Close now, dropping what is queued.
    pub destroy: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
    /// Sets one connection's send-buffer limit in bytes
    /// ([`crate::Context::set_max_send_buffer`]).
    pub set_max_send_buffer: extern "C" fn(state: *mut c_void, conn: u64, bytes: u64) -> bool,
    /// A connection's addresses and counters; `open` false when it is closed
    /// or unknown ([`crate::Context::conn_info`]).
    pub conn_info: extern "C" fn(state: *mut c_void, conn: u64) -> RawConnInfo,
    /// Ids of this worker's open connections.
    pub connections: extern "C" fn(state: *mut c_void) -> RVec<u64>,
    /// Deletes every timer of this worker; returns how many there were.
    pub del_all_timers: extern "C" fn(state: *mut c_void) -> u64,
    /// Opens an outbound connection (`tcp://`, `text://`, `frame://`, `ws://`).
    pub connect:
        extern "C" fn(state: *mut c_void, url: RStr<'_>, timeout_ms: u64) -> RResult<u64, RString>,
    /// Connects an outbound connection again after `delay_ms`, keeping its id
    /// ([`crate::Context::reconnect`]).
    pub reconnect: extern "C" fn(state: *mut c_void, conn: u64, delay_ms: u64) -> bool,
    /// Forwards everything arriving on `src` to `dst` ([`crate::Context::pipe`]).
    pub pipe: extern "C" fn(state: *mut c_void, src: u64, dst: u64) -> bool,
    /// Whether the plugin opened the connection with `connect`
    /// ([`crate::Context::is_outbound`]).
    pub is_outbound: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
}

/// The handle a callback receives: host state plus the host's vtable.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct HostCtx {
    /// The host's per-worker state, passed back as `state` to every function
    /// of `vt`.
    pub state: *mut c_void,
    /// The host's functions.
    pub vt: HostVTableRef,
}

/// Callbacks a plugin instance offers. `state` is the plugin object, opaque to
/// the host. Every function catches panics on the plugin side.
///
/// Each `on_*` function runs the [`crate::Plugin`] method of the same name and
/// reports how it went as an [`Outcome`]. All are called from the worker's
/// single thread. As in [`HostVTable`], the fields after `drop` (the last
/// prefix field) were appended later.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginVTableRef)))]
#[sabi(missing_field(panic))]
pub struct PluginVTable {
    /// [`crate::Plugin::on_worker_start`]; `Failed` carries its error.
    pub on_worker_start: extern "C" fn(state: *mut c_void, ctx: HostCtx) -> Outcome,
    /// [`crate::Plugin::on_worker_stop`].
    pub on_worker_stop: extern "C" fn(state: *mut c_void, ctx: HostCtx) -> Outcome,
    /// [`crate::Plugin::on_worker_reload`].
    pub on_worker_reload: extern "C" fn(state: *mut c_void, ctx: HostCtx) -> Outcome,
    /// [`crate::Plugin::on_connect`].
    pub on_connect: extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64) -> Outcome,
    /// [`crate::Plugin::on_message`].
    pub on_message:
        extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64, data: RSlice<'_, u8>) -> Outcome,
    /// [`crate::Plugin::on_close`].
    pub on_close: extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64) -> Outcome,
    /// [`crate::Plugin::on_buffer_full`].
    pub on_buffer_full: extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64) -> Outcome,
    /// [`crate::Plugin::on_buffer_drain`].
    pub on_buffer_drain: extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64) -> Outcome,
    /// [`crate::Plugin::on_error`]; `code` is one of [`crate::error_code`].
    pub on_error: extern "C" fn(
        state: *mut c_void,
        ctx: HostCtx,
        conn: u64,
        code: u32,
        msg: RStr<'_>,
    ) -> Outcome,
    /// [`crate::Plugin::on_timer`].
    pub on_timer: extern "C" fn(state: *mut c_void, ctx: HostCtx, timer: u64) -> Outcome,
    /// [`crate::Plugin::on_websocket_connect`]; a refusal comes back as
    /// [`Outcome::Refused`].
    pub on_websocket_connect:
        extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64, req: &RawRequest<'_>) -> Outcome,
    /// [`crate::Plugin::on_request`].
    pub on_request:
        extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64, req: &RawRequest<'_>) -> Outcome,
    /// [`crate::Plugin::on_publish`].
    pub on_publish: extern "C" fn(
        state: *mut c_void,
        ctx: HostCtx,
        topic: RStr<'_>,
        data: RSlice<'_, u8>,
    ) -> Outcome,
    /// Frees the plugin object. Called once, last.
    #[sabi(last_prefix_field)]
    pub drop: extern "C" fn(state: *mut c_void),
    /// `custom://` framing, on the protocol object (never the plugin object,
    /// so the host may encode while a plugin callback runs).
    /// Ok(Some(n)): a packet of n bytes; Ok(None): need more; Err: bad input.
    pub protocol_input:
        extern "C" fn(proto: *mut c_void, buf: RSlice<'_, u8>) -> RResult<ROption<u64>, RString>,
    /// The message inside a packet, as (start, end) offsets.
    pub protocol_decode:
        extern "C" fn(proto: *mut c_void, packet: RSlice<'_, u8>) -> Tuple2<u64, u64>,
    /// Appends the bytes for an outgoing message; false if the encoder failed.
    pub protocol_encode:
        extern "C" fn(proto: *mut c_void, data: RSlice<'_, u8>, out: &mut RVec<u8>) -> bool,
    /// What the last `Failed` or `Panicked` outcome was about; taking it
    /// leaves an empty string.
    pub take_failure: extern "C" fn() -> RString,
}

/// One plugin object and its callbacks.
#[repr(C)]
#[derive(StableAbi)]
pub struct PluginInstance {
    /// The plugin object, passed back as `state` to every callback of `vt`;
    /// freed by `vt.drop`.
    pub state: *mut c_void,
    /// The plugin's [`crate::Protocol`] for `custom://` listeners, or null.
    pub protocol: *mut c_void,
    /// The plugin's callbacks.
    pub vt: PluginVTableRef,
}

/// The root module every plugin `.so` exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin crate's name, for logs and `status`.
    pub name: RStr<'static>,
    /// The plugin crate's version, for logs and `status`.
    pub version: RStr<'static>,
    /// Builds the plugin object. Called once per worker process.
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn() -> ROption<PluginInstance>,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "wm_plugin";
    const NAME: &'static str = "wm_plugin";
    // Compatibility is judged on plugin-api's own version: a different minor
    // (0.x) or major version is refused at load time with a clear error.
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// Where the export macro puts the [`HandoverVTable`] module (NUL-terminated).
pub const HANDOVER_SYMBOL: &[u8] = b"wm_plugin_handover\0";

/// The live-handover callbacks (see [`crate::Plugin::handover`]): a second
/// root module, exported under [`HANDOVER_SYMBOL`] next to [`PluginMod`].
///
/// Not a part of [`PluginVTable`]: abi_stable refuses a library whose prefix
/// types have fewer fields than the loader's (measured: "too many fields
/// Expected: 23 Found: 18"), so appending there would lock out every plugin
/// built before. Plugins built before this module lack the symbol, and have
/// no handover; their [`PluginMod`] is unchanged. abi_stable checks this
/// module's layout when the host loads it, like the main one.
///
/// `state` and `ctx` are those of [`PluginVTable`]; the same [`Outcome`]s
/// come back, with their text from `PluginVTable::take_failure`.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HandoverVTableRef)))]
pub struct HandoverVTable {
    /// [`crate::Plugin::handover`]; false if it panicked.
    pub handover: extern "C" fn(state: *mut c_void) -> bool,
    /// [`crate::Plugin::on_export`]: appends the worker's state to `out`.
    pub on_export: extern "C" fn(state: *mut c_void, ctx: HostCtx, out: &mut RVec<u8>) -> Outcome,
    /// [`crate::Plugin::on_export_conn`]: appends one connection's state to
    /// `out`.
    pub on_export_conn:
        extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64, out: &mut RVec<u8>) -> Outcome,
    /// [`crate::Plugin::on_import`]; `Failed` carries its error.
    pub on_import: extern "C" fn(
        state: *mut c_void,
        ctx: HostCtx,
        from: &RawBuild<'_>,
        data: RSlice<'_, u8>,
    ) -> Outcome,
    /// [`crate::Plugin::on_import_conn`]; `Refused(0)` when the plugin
    /// refuses the connection.
    ///
    /// The last prefix field. Appending fields would lock out plugins built
    /// before, as above: extend with another module under a new symbol.
    #[sabi(last_prefix_field)]
    pub on_import_conn: extern "C" fn(
        state: *mut c_void,
        ctx: HostCtx,
        conn: u64,
        from: &RawBuild<'_>,
        data: RSlice<'_, u8>,
    ) -> Outcome,
}

impl RootModule for HandoverVTableRef {
    declare_root_module_statics! {HandoverVTableRef}
    const BASE_NAME: &'static str = "wm_plugin_handover";
    const NAME: &'static str = "wm_plugin_handover";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_in_place() {
        let fields = [("Content-Type", "text/plain"), ("X-Empty", "")];
        let raw = RawFields::from_slice(&fields);
        assert!(raw.iter().eq(fields));
        assert_eq!(RawFields::from_slice(&[]).iter().count(), 0);
    }
}
