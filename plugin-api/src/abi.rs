//! The FFI-safe types that cross between wm-host and a plugin `.so`.
//!
//! Plugin authors never touch this module: they implement [`crate::Plugin`] and
//! call [`crate::export_plugin!`]. The host loads [`PluginModRef`] with
//! abi_stable, which checks the layout of everything reachable from it (and the
//! `plugin-api` version) before any plugin code runs.
//!
//! Both vtables are prefix types, so a later minor version may append functions
//! at the end without breaking plugins built earlier.

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
    Text,
    Binary,
}

/// An HTTP request: a plain `http://` request or a websocket handshake.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct RawRequest<'a> {
    pub method: RStr<'a>,
    pub path: RStr<'a>,
    pub query: RStr<'a>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: RSlice<'a, Tuple2<RStr<'a>, RStr<'a>>>,
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
    pub family: u8,
    pub port: u16,
    pub ip: [u8; 16],
}

/// One connection's counters and addresses.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct RawConnInfo {
    /// False when the connection is unknown or closed (other fields zero).
    pub open: bool,
    pub remote: RawAddr,
    pub local: RawAddr,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Bytes waiting in the send buffer.
    pub send_queue: u64,
    /// Bytes of an incomplete message kept from the socket.
    pub recv_queue: u64,
    pub paused: bool,
}

/// Facts about the worker process, valid for the life of the process.
#[repr(C)]
#[derive(StableAbi, Debug, Clone, Copy)]
pub struct RawWorkerInfo {
    pub name: RStr<'static>,
    pub id: u32,
    pub count: u32,
    pub pid: u32,
    pub listen: RStr<'static>,
    pub options: RSlice<'static, Tuple2<RStr<'static>, RStr<'static>>>,
}

/// Log levels, in `tracing` order.
#[repr(u8)]
#[derive(StableAbi, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RawLevel {
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// Functions the host offers to plugin callbacks. `state` is the host's own
/// per-worker data, opaque to the plugin.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = HostVTableRef)))]
#[sabi(missing_field(panic))]
pub struct HostVTable {
    pub worker_info: extern "C" fn(state: *mut c_void) -> &'static RawWorkerInfo,
    pub log: extern "C" fn(state: *mut c_void, level: RawLevel, msg: RStr<'_>),
    pub send: extern "C" fn(
        state: *mut c_void,
        conn: u64,
        data: RSlice<'_, u8>,
        kind: RawKind,
    ) -> RawSendStatus,
    /// The framing of the message being handled by `on_message`.
    pub message_kind: extern "C" fn(state: *mut c_void) -> RawKind,
    pub respond: extern "C" fn(
        state: *mut c_void,
        conn: u64,
        status: u16,
        headers: RawFields<'_>,
        body: RSlice<'_, u8>,
    ) -> RawSendStatus,
    pub join_group: extern "C" fn(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool,
    pub leave_group: extern "C" fn(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool,
    /// `exclude` is a connection of this worker to skip, or 0.
    pub send_to_group: extern "C" fn(
        state: *mut c_void,
        group: RStr<'_>,
        data: RSlice<'_, u8>,
        kind: RawKind,
        exclude: u64,
    ),
    pub send_to_all:
        extern "C" fn(state: *mut c_void, data: RSlice<'_, u8>, kind: RawKind, exclude: u64),
    pub bind_uid: extern "C" fn(state: *mut c_void, conn: u64, uid: RStr<'_>) -> bool,
    pub send_to_uid:
        extern "C" fn(state: *mut c_void, uid: RStr<'_>, data: RSlice<'_, u8>, kind: RawKind),
    pub group_count: extern "C" fn(state: *mut c_void, group: RStr<'_>) -> u64,
    /// Bound uids of the group's members across all workers, sorted, unique.
    pub group_uids: extern "C" fn(state: *mut c_void, group: RStr<'_>) -> RVec<RString>,
    pub publish: extern "C" fn(state: *mut c_void, topic: RStr<'_>, data: RSlice<'_, u8>),
    pub close: extern "C" fn(state: *mut c_void, conn: u64, last: ROption<RSlice<'_, u8>>) -> bool,
    pub addr: extern "C" fn(state: *mut c_void, conn: u64, remote: bool) -> RawAddr,
    pub add_timer: extern "C" fn(state: *mut c_void, interval_ms: u64, repeat: bool) -> u64,
    pub del_timer: extern "C" fn(state: *mut c_void, timer: u64) -> bool,
    #[sabi(last_prefix_field)]
    pub connection_count: extern "C" fn(state: *mut c_void) -> u64,
    pub pause_recv: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
    pub resume_recv: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
    /// Half-close after flushing; close for good after a short linger.
    pub end: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
    /// Close now, dropping what is queued.
    pub destroy: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
    pub set_max_send_buffer: extern "C" fn(state: *mut c_void, conn: u64, bytes: u64) -> bool,
    pub conn_info: extern "C" fn(state: *mut c_void, conn: u64) -> RawConnInfo,
    /// Ids of this worker's open connections.
    pub connections: extern "C" fn(state: *mut c_void) -> RVec<u64>,
    /// Deletes every timer of this worker; returns how many there were.
    pub del_all_timers: extern "C" fn(state: *mut c_void) -> u64,
    /// Opens an outbound connection (`tcp://`, `text://`, `frame://`, `ws://`).
    pub connect:
        extern "C" fn(state: *mut c_void, url: RStr<'_>, timeout_ms: u64) -> RResult<u64, RString>,
    pub reconnect: extern "C" fn(state: *mut c_void, conn: u64, delay_ms: u64) -> bool,
    pub pipe: extern "C" fn(state: *mut c_void, src: u64, dst: u64) -> bool,
    pub is_outbound: extern "C" fn(state: *mut c_void, conn: u64) -> bool,
}

/// The handle a callback receives: host state plus the host's vtable.
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct HostCtx {
    pub state: *mut c_void,
    pub vt: HostVTableRef,
}

/// Callbacks a plugin instance offers. `state` is the plugin object, opaque to
/// the host. Every function catches panics on the plugin side.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginVTableRef)))]
#[sabi(missing_field(panic))]
pub struct PluginVTable {
    pub on_worker_start: extern "C" fn(state: *mut c_void, ctx: HostCtx) -> Outcome,
    pub on_worker_stop: extern "C" fn(state: *mut c_void, ctx: HostCtx) -> Outcome,
    pub on_worker_reload: extern "C" fn(state: *mut c_void, ctx: HostCtx) -> Outcome,
    pub on_connect: extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64) -> Outcome,
    pub on_message:
        extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64, data: RSlice<'_, u8>) -> Outcome,
    pub on_close: extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64) -> Outcome,
    pub on_buffer_full: extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64) -> Outcome,
    pub on_buffer_drain: extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64) -> Outcome,
    pub on_error: extern "C" fn(
        state: *mut c_void,
        ctx: HostCtx,
        conn: u64,
        code: u32,
        msg: RStr<'_>,
    ) -> Outcome,
    pub on_timer: extern "C" fn(state: *mut c_void, ctx: HostCtx, timer: u64) -> Outcome,
    pub on_websocket_connect:
        extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64, req: &RawRequest<'_>) -> Outcome,
    pub on_request:
        extern "C" fn(state: *mut c_void, ctx: HostCtx, conn: u64, req: &RawRequest<'_>) -> Outcome,
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
    /// What the last `Failed` or `Panicked` outcome was about.
    pub take_failure: extern "C" fn() -> RString,
}

/// One plugin object and its callbacks.
#[repr(C)]
#[derive(StableAbi)]
pub struct PluginInstance {
    pub state: *mut c_void,
    /// The plugin's [`crate::Protocol`] for `custom://` listeners, or null.
    pub protocol: *mut c_void,
    pub vt: PluginVTableRef,
}

/// The root module every plugin `.so` exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    /// The plugin crate's name and version, for logs and `status`.
    pub name: RStr<'static>,
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
