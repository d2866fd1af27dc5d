//! The host vtable handed to plugins. Each function gets back the `*mut Core`
//! the worker put into the context of the callback in progress.

use std::ffi::c_void;
use std::time::{Duration, Instant};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use plugin_api::abi::{
    HostVTable, HostVTableRef, RawAddr, RawConnInfo, RawFields, RawKind, RawLevel, RawSendStatus,
    RawWorkerInfo,
};

use super::core::Core;
use wm_proto::Kind;

/// # Safety
/// Only called from host functions, with the pointer the worker passed in the
/// context of the callback currently running; the worker holds no other
/// reference to the core while a callback runs.
fn core<'a>(state: *mut c_void) -> &'a mut Core {
    unsafe { &mut *(state as *mut Core) }
}

extern "C" fn worker_info(state: *mut c_void) -> &'static RawWorkerInfo {
    core(state).info
}

extern "C" fn log(state: *mut c_void, level: RawLevel, msg: RStr<'_>) {
    let plugin = core(state).info.name.as_str();
    let msg = msg.as_str();
    match level {
        RawLevel::Error => tracing::error!(target: "plugin", plugin, "{msg}"),
        RawLevel::Warn => tracing::warn!(target: "plugin", plugin, "{msg}"),
        RawLevel::Info => tracing::info!(target: "plugin", plugin, "{msg}"),
        RawLevel::Debug => tracing::debug!(target: "plugin", plugin, "{msg}"),
        RawLevel::Trace => tracing::trace!(target: "plugin", plugin, "{msg}"),
    }
}

fn kind(k: RawKind) -> Kind {
    match k {
        RawKind::Default => Kind::Default,
        RawKind::Text => Kind::Text,
        RawKind::Binary => Kind::Binary,
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
    core(state).send_kind(conn, data.as_slice(), kind(k))
}

extern "C" fn message_kind(state: *mut c_void) -> RawKind {
    match core(state).current_kind {
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
    core(state).respond(conn, status, headers.iter(), body.as_slice())
}

extern "C" fn join_group(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool {
    core(state).join_group(conn, group.as_str())
}

extern "C" fn leave_group(state: *mut c_void, conn: u64, group: RStr<'_>) -> bool {
    core(state).leave_group(conn, group.as_str())
}

extern "C" fn send_to_group(
    state: *mut c_void,
    group: RStr<'_>,
    data: RSlice<'_, u8>,
    k: RawKind,
    ex: u64,
) {
    core(state).send_to_group(group.as_str(), data.as_slice(), kind(k), exclude(ex))
}

extern "C" fn send_to_all(state: *mut c_void, data: RSlice<'_, u8>, k: RawKind, ex: u64) {
    core(state).send_to_all(data.as_slice(), kind(k), exclude(ex))
}

extern "C" fn bind_uid(state: *mut c_void, conn: u64, uid: RStr<'_>) -> bool {
    core(state).bind_uid(conn, uid.as_str())
}

extern "C" fn send_to_uid(state: *mut c_void, uid: RStr<'_>, data: RSlice<'_, u8>, k: RawKind) {
    core(state).send_to_uid(uid.as_str(), data.as_slice(), kind(k))
}

extern "C" fn group_count(state: *mut c_void, group: RStr<'_>) -> u64 {
    core(state).registry.count(group.as_str()) as u64
}

extern "C" fn group_uids(state: *mut c_void, group: RStr<'_>) -> RVec<RString> {
    core(state)
        .registry
        .group_uids(group.as_str())
        .into_iter()
        .map(RString::from)
        .collect()
}

extern "C" fn publish(state: *mut c_void, topic: RStr<'_>, data: RSlice<'_, u8>) {
    core(state).publish(topic.as_str(), data.as_slice())
}

extern "C" fn close(state: *mut c_void, conn: u64, last: ROption<RSlice<'_, u8>>) -> bool {
    core(state).close(conn, last.into_option().map(|s| s.as_slice()))
}

extern "C" fn addr(state: *mut c_void, conn: u64, remote: bool) -> RawAddr {
    let a = core(state)
        .get(conn)
        .and_then(|c| if remote { c.remote } else { c.local });
    plugin_api::to_raw_addr(a)
}

extern "C" fn add_timer(state: *mut c_void, interval_ms: u64, repeat: bool) -> u64 {
    core(state)
        .timers
        .add(Instant::now(), Duration::from_millis(interval_ms), repeat)
}

extern "C" fn del_timer(state: *mut c_void, timer: u64) -> bool {
    core(state).timers.del(timer)
}

extern "C" fn connection_count(state: *mut c_void) -> u64 {
    core(state).conns.len() as u64
}

extern "C" fn pause_recv(state: *mut c_void, conn: u64) -> bool {
    core(state).pause_recv(conn, true)
}

extern "C" fn resume_recv(state: *mut c_void, conn: u64) -> bool {
    core(state).pause_recv(conn, false)
}

extern "C" fn end(state: *mut c_void, conn: u64) -> bool {
    core(state).end(conn)
}

extern "C" fn destroy(state: *mut c_void, conn: u64) -> bool {
    let c = core(state);
    let known = c.get(conn).is_some();
    c.destroy(conn);
    known
}

extern "C" fn set_max_send_buffer(state: *mut c_void, conn: u64, bytes: u64) -> bool {
    core(state).set_max_send_buffer(conn, bytes as usize)
}

extern "C" fn conn_info(state: *mut c_void, conn: u64) -> RawConnInfo {
    core(state).conn_info(conn)
}

extern "C" fn connections(state: *mut c_void) -> RVec<u64> {
    core(state).open_ids().into()
}

extern "C" fn del_all_timers(state: *mut c_void) -> u64 {
    core(state).timers.clear() as u64
}

extern "C" fn connect(state: *mut c_void, url: RStr<'_>, timeout_ms: u64) -> RResult<u64, RString> {
    match core(state).connect(url.as_str(), Duration::from_millis(timeout_ms)) {
        Ok(id) => RResult::ROk(id),
        Err(e) => RResult::RErr(e.into()),
    }
}

extern "C" fn reconnect(state: *mut c_void, conn: u64, delay_ms: u64) -> bool {
    core(state).reconnect(conn, Duration::from_millis(delay_ms))
}

extern "C" fn pipe(state: *mut c_void, src: u64, dst: u64) -> bool {
    core(state).pipe(src, dst)
}

extern "C" fn is_outbound(state: *mut c_void, conn: u64) -> bool {
    core(state).get(conn).is_some_and(|c| c.outbound.is_some())
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
