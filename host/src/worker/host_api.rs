//! The host vtable handed to plugins. Each function gets back the `*mut Core`
//! the worker put into the context of the callback in progress.

use std::ffi::c_void;
use std::time::{Duration, Instant};

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{ROption, RSlice, RStr};
use plugin_api::abi::{HostVTable, HostVTableRef, RawAddr, RawLevel, RawSendStatus, RawWorkerInfo};

use super::core::Core;

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

extern "C" fn send(state: *mut c_void, conn: u64, data: RSlice<'_, u8>) -> RawSendStatus {
    core(state).send(conn, data.as_slice())
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

/// Built once per worker process.
pub fn vtable() -> HostVTableRef {
    HostVTable {
        worker_info,
        log,
        send,
        close,
        addr,
        add_timer,
        del_timer,
        connection_count,
    }
    .leak_into_prefix()
}
