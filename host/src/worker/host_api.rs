//! The host vtable handed to plugins. Each function gets back, as `state`,
//! the pointer to the [`Scope`] the worker put into the context of the
//! callback in progress, and reaches the worker's core through it.
//!
//! The plugin can only call these with the context it was handed, during
//! that callback, so every `state` below meets [`core`]'s contract.

use std::ffi::c_void;
use std::time::{Duration, Instant};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use plugin_api::abi::{
    HostVTable, HostVTableRef, RawAddr, RawConnInfo, RawFields, RawKind, RawLevel, RawSendStatus,
    RawWorkerInfo,
};

use super::core::Core;
use wm_proto::{websocket, Kind};

/// What `state` points to while a callback runs: the worker's core, and
/// how the message being handled came (for `message_kind`).
pub struct Scope {
    pub core: *mut Core,
    pub kind: Kind,
    /// The message being handled (`on_message`), by address and length;
    /// null otherwise.
    pub message: (*const u8, usize),
}

impl Scope {
    /// Whether `data` is the message being handled as it came (the same
    /// bytes): a text message was checked to be UTF-8 on arrival.
    #[inline]
    fn is_message(&self, data: &[u8]) -> bool {
        self.message.0 == data.as_ptr() && self.message.1 == data.len()
    }

    /// How a plugin's send goes out on a websocket, the rule documented at
    /// `Context::send`: `send_binary` binary; `send` binary while a binary
    /// message is handled, else the codec's choice for `Kind::Default`
    /// (text when UTF-8, else binary); `send_text` text. `Kind::Text` is
    /// only returned for bytes known to be UTF-8, except for `send_text`
    /// of other bytes (`Err`), which [`Core::send_text`] checks on
    /// websockets only.
    #[inline]
    fn outgoing(&self, data: &[u8], k: RawKind) -> Result<Kind, ()> {
        // Sent back as it came: no second check.
        if self.kind == Kind::Text && k != RawKind::Binary && self.is_message(data) {
            return Ok(Kind::Text);
        }
        match (k, self.kind) {
            (RawKind::Binary, _) | (RawKind::Default, Kind::Binary) => Ok(Kind::Binary),
            (RawKind::Default, _) => Ok(Kind::Default),
            (RawKind::Text, _) => Err(()),
        }
    }

    /// [`outgoing`](Self::outgoing) for a message to many connections:
    /// decided once here, not per recipient. `None`: text that is not UTF-8,
    /// which only the raw ABI can ask for; not sent.
    fn outgoing_to_many(&self, data: &[u8], k: RawKind) -> Option<Kind> {
        match self.outgoing(data, k) {
            Ok(Kind::Default) if websocket::is_utf8(data) => Some(Kind::Text),
            Ok(Kind::Default) => Some(Kind::Binary),
            Ok(kind) => Some(kind),
            Err(()) if websocket::is_utf8(data) => Some(Kind::Text),
            Err(()) => {
                tracing::warn!("a text message that is not UTF-8 was not sent");
                None
            }
        }
    }
}

/// The scope of the callback running now.
///
/// # Safety
/// As for [`core`].
unsafe fn scope<'a>(state: *mut c_void) -> &'a Scope {
    // SAFETY: by this function's contract.
    unsafe { &*(state as *const Scope) }
}

/// The worker's core, from a host function's `state`.
///
/// # Safety
/// `state` must be the pointer the worker put into the context of the
/// callback running now: a live [`Scope`] whose `core` is valid, and to
/// which the worker holds no other reference until the callback returns.
/// The result must not outlive the host function call.
unsafe fn core<'a>(state: *mut c_void) -> &'a mut Core {
    // SAFETY: by this function's contract.
    unsafe { &mut *(*(state as *mut Scope)).core }
}

extern "C" fn worker_info(state: *mut c_void) -> &'static RawWorkerInfo {
    unsafe { core(state) }.info
}

extern "C" fn log(state: *mut c_void, level: RawLevel, msg: RStr<'_>) {
    let plugin = unsafe { core(state) }.info.name.as_str();
    let msg = msg.as_str();
    match level {
        RawLevel::Error => tracing::error!(target: "plugin", plugin, "{msg}"),
        RawLevel::Warn => tracing::warn!(target: "plugin", plugin, "{msg}"),
        RawLevel::Info => tracing::info!(target: "plugin", plugin, "{msg}"),
        RawLevel::Debug => tracing::debug!(target: "plugin", plugin, "{msg}"),
        RawLevel::Trace => tracing::trace!(target: "plugin", plugin, "{msg}"),
    }
}

fn exclude(conn: u64) -> Option<u64> {
    (conn != 0).then_some(conn)
}

extern "C" fn send(
    state: *mut c_void,
    conn: u64,
    data: RSlice<'_, u8>,
    k: RawKind,
) -> RawSendStatus {
    let data = data.as_slice();
    let scope = unsafe { scope(state) };
    // The message being handled, sent back as it came (an echo, the hot
    // path): in its own kind, a text one checked on arrival already.
    let kind = if k == RawKind::Default && scope.is_message(data) {
        scope.kind
    } else {
        match scope.outgoing(data, k) {
            Ok(kind) => kind,
            Err(()) => return unsafe { core(state) }.send_text(conn, data),
        }
    };
    unsafe { core(state) }.send_kind(conn, data, kind)
}

extern "C" fn message_kind(state: *mut c_void) -> RawKind {
    // SAFETY: as for `core`: a live `Scope` while the callback runs.
    let kind = unsafe { (*(state as *const Scope)).kind };
    match kind {
        Kind::Text => RawKind::Text,
        Kind::Binary => RawKind::Binary,
        Kind::Default => RawKind::Default,
    }
}

extern "C" fn respond(
    state: *mut c_void,
    conn: u64,
    status: u16,
    headers: RawFields<'_>,
    body: RSlice<'_, u8>,
) -> RawSendStatus {
    unsafe { core(state) }.respond(conn, status, headers.iter(), body.as_slice())
}

extern "C" fn join_group(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool {
    unsafe { core(state) }.join_group(conn, group.as_str())
}

extern "C" fn leave_group(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool {
    unsafe { core(state) }.leave_group(conn, group.as_str())
}

extern "C" fn send_to_group(
    state: *mut c_void,
    group: RStr<'_>,
    data: RSlice<'_, u8>,
    k: RawKind,
    ex: u64,
) {
    let data = data.as_slice();
    if let Some(kind) = unsafe { scope(state) }.outgoing_to_many(data, k) {
        unsafe { core(state) }.send_to_group(group.as_str(), data, kind, exclude(ex))
    }
}

extern "C" fn send_to_all(state: *mut c_void, data: RSlice<'_, u8>, k: RawKind, ex: u64) {
    let data = data.as_slice();
    if let Some(kind) = unsafe { scope(state) }.outgoing_to_many(data, k) {
        unsafe { core(state) }.send_to_all(data, kind, exclude(ex))
    }
}

extern "C" fn bind_uid(state: *mut c_void, conn: u64, uid: RStr<'_>) -> bool {
    unsafe { core(state) }.bind_uid(conn, uid.as_str())
}

extern "C" fn send_to_uid(state: *mut c_void, uid: RStr<'_>, data: RSlice<'_, u8>, k: RawKind) {
    let data = data.as_slice();
    if let Some(kind) = unsafe { scope(state) }.outgoing_to_many(data, k) {
        unsafe { core(state) }.send_to_uid(uid.as_str(), data, kind)
    }
}

extern "C" fn group_count(state: *mut c_void, group: RStr<'_>) -> u64 {
    unsafe { core(state) }.registry.count(group.as_str()) as u64
}

extern "C" fn group_uids(state: *mut c_void, group: RStr<'_>) -> RVec<RString> {
    unsafe { core(state) }
        .registry
        .group_uids(group.as_str())
        .into_iter()
        .map(RString::from)
        .collect()
}

extern "C" fn publish(state: *mut c_void, topic: RStr<'_>, data: RSlice<'_, u8>) {
    unsafe { core(state) }.publish(topic.as_str(), data.as_slice())
}

extern "C" fn close(state: *mut c_void, conn: u64, last: ROption<RSlice<'_, u8>>) -> bool {
    unsafe { core(state) }.close(conn, last.into_option().map(|s| s.as_slice()))
}

extern "C" fn addr(state: *mut c_void, conn: u64, remote: bool) -> RawAddr {
    let a = unsafe { core(state) }
        .get(conn)
        .and_then(|c| if remote { c.remote } else { c.local });
    plugin_api::to_raw_addr(a)
}

extern "C" fn add_timer(state: *mut c_void, interval_ms: u64, repeat: bool) -> u64 {
    unsafe { core(state) }
        .timers
        .add(Instant::now(), Duration::from_millis(interval_ms), repeat)
}

extern "C" fn del_timer(state: *mut c_void, timer: u64) -> bool {
    unsafe { core(state) }.timers.del(timer)
}

extern "C" fn connection_count(state: *mut c_void) -> u64 {
    unsafe { core(state) }.conns.len() as u64
}

extern "C" fn pause_recv(state: *mut c_void, conn: u64) -> bool {
    unsafe { core(state) }.pause_recv(conn, true)
}

extern "C" fn resume_recv(state: *mut c_void, conn: u64) -> bool {
    unsafe { core(state) }.pause_recv(conn, false)
}

extern "C" fn end(state: *mut c_void, conn: u64) -> bool {
    unsafe { core(state) }.end(conn)
}

extern "C" fn destroy(state: *mut c_void, conn: u64) -> bool {
    let c = unsafe { core(state) };
    let known = c.get(conn).is_some();
    c.destroy(conn);
    known
}

extern "C" fn set_max_send_buffer(state: *mut c_void, conn: u64, bytes: u64) -> bool {
    unsafe { core(state) }.set_max_send_buffer(conn, bytes as usize)
}

extern "C" fn conn_info(state: *mut c_void, conn: u64) -> RawConnInfo {
    unsafe { core(state) }.conn_info(conn)
}

extern "C" fn connections(state: *mut c_void) -> RVec<u64> {
    unsafe { core(state) }.open_ids().into()
}

extern "C" fn del_all_timers(state: *mut c_void) -> u64 {
    unsafe { core(state) }.timers.clear() as u64
}

extern "C" fn connect(state: *mut c_void, url: RStr<'_>, timeout_ms: u64) -> RResult<u64, RString> {
    match unsafe { core(state) }.connect(url.as_str(), Duration::from_millis(timeout_ms)) {
        Ok(id) => RResult::ROk(id),
        Err(e) => RResult::RErr(e.into()),
    }
}

extern "C" fn reconnect(state: *mut c_void, conn: u64, delay_ms: u64) -> bool {
    unsafe { core(state) }.reconnect(conn, Duration::from_millis(delay_ms))
}

extern "C" fn pipe(state: *mut c_void, src: u64, dst: u64) -> bool {
    unsafe { core(state) }.pipe(src, dst)
}

extern "C" fn is_outbound(state: *mut c_void, conn: u64) -> bool {
    unsafe { core(state) }
        .get(conn)
        .is_some_and(|c| c.outbound.is_some())
}

/// Built once per worker process.
pub fn vtable() -> HostVTableRef {
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
}
