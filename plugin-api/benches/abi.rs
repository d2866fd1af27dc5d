//! ABI overhead per callback: a plugin object built by
//! `plugin_api::adapter::create` (what `export_plugin!` runs, here in-process,
//! no dlopen) called through its FFI vtable, as the host does, against the
//! same `Plugin::on_message` called through a `&mut dyn Plugin`.
//!
//!     cargo bench -p plugin-api --bench abi -- --warm-up-time 1 --measurement-time 3
//!
//! Groups (ns per call in `target/criterion/<group>/<id>/new/estimates.json`):
//! - `on_message`: a callback with a trivial body; `abi` vs `direct`.
//! - `on_message_spilled`: the same, each message slice stored to memory
//!   (`black_box`) right before the call. When `Outcome` carried strings it
//!   was returned through a hidden pointer, the `RSlice` went on the stack and
//!   this case cost +6.9 ns (a store-forwarding stall); now it is in registers.
//! - `echo`: a callback that calls `ctx.send` once. `abi` crosses the boundary
//!   twice (host → plugin `on_message`, plugin → host `send`); `direct` calls
//!   `on_message` through `&mut dyn Plugin` but `ctx.send` still goes through
//!   the host vtable (a `Context` has no other way); `native` is the same
//!   logic with no ABI at all: a `&mut dyn` plugin calling a `&mut dyn` host.
//!
//! The host table is the real `HostVTable` filled with minimal functions:
//! `send` adds the length to a counter in the host state, the rest do nothing.

use std::ffi::c_void;
use std::hint::black_box;
use std::time::Instant;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use criterion::{criterion_group, criterion_main, Criterion};
use plugin_api::abi::{
    HostCtx, HostVTable, Outcome, PluginInstance, RawAddr, RawConnInfo, RawFields, RawKind,
    RawLevel, RawSendStatus, RawWorkerInfo,
};
use plugin_api::{adapter, ConnId, Context, Plugin, SendStatus};

/// The bench's host state, behind `HostCtx::state`.
struct BenchHost {
    info: RawWorkerInfo,
    sent_bytes: u64,
    sends: u64,
}

/// # Safety
/// `state` is the leaked `BenchHost` made in `host_ctx`, used on one thread.
unsafe fn host<'a>(state: *mut c_void) -> &'a mut BenchHost {
    &mut *(state as *mut BenchHost)
}

extern "C" fn worker_info(state: *mut c_void) -> &'static RawWorkerInfo {
    // SAFETY: see `host`; the state is leaked, so 'static.
    unsafe { &host(state).info }
}
extern "C" fn log(_: *mut c_void, _: RawLevel, _: RStr<'_>) {}
extern "C" fn send(state: *mut c_void, _: u64, data: RSlice<'_, u8>, _: RawKind) -> RawSendStatus {
    // SAFETY: see `host`.
    let h = unsafe { host(state) };
    h.sent_bytes += data.len() as u64;
    h.sends += 1;
    RawSendStatus::Sent
}
extern "C" fn message_kind(_: *mut c_void) -> RawKind {
    RawKind::Text
}
extern "C" fn respond(
    _: *mut c_void,
    _: u64,
    _: u16,
    _: RawFields<'_>,
    _: RSlice<'_, u8>,
) -> RawSendStatus {
    RawSendStatus::Sent
}
extern "C" fn conn_str(_: *mut c_void, _: u64, _: RStr<'_>) -> bool {
    true
}
extern "C" fn send_to_group(_: *mut c_void, _: RStr<'_>, _: RSlice<'_, u8>, _: RawKind, _: u64) {}
extern "C" fn send_to_all(_: *mut c_void, _: RSlice<'_, u8>, _: RawKind, _: u64) {}
extern "C" fn send_to_uid(_: *mut c_void, _: RStr<'_>, _: RSlice<'_, u8>, _: RawKind) {}
extern "C" fn group_count(_: *mut c_void, _: RStr<'_>) -> u64 {
    0
}
extern "C" fn group_uids(_: *mut c_void, _: RStr<'_>) -> RVec<RString> {
    RVec::new()
}
extern "C" fn publish(_: *mut c_void, _: RStr<'_>, _: RSlice<'_, u8>) {}
extern "C" fn close(_: *mut c_void, _: u64, _: ROption<RSlice<'_, u8>>) -> bool {
    true
}
extern "C" fn addr(_: *mut c_void, _: u64, _: bool) -> RawAddr {
    RawAddr {
        family: 0,
        port: 0,
        ip: [0; 16],
    }
}
extern "C" fn add_timer(_: *mut c_void, _: u64, _: bool) -> u64 {
    1
}
extern "C" fn conn_op(_: *mut c_void, _: u64) -> bool {
    true
}
extern "C" fn count(_: *mut c_void) -> u64 {
    0
}
extern "C" fn set_max_send_buffer(_: *mut c_void, _: u64, _: u64) -> bool {
    true
}
extern "C" fn conn_info(_: *mut c_void, _: u64) -> RawConnInfo {
    RawConnInfo {
        open: false,
        remote: addr(std::ptr::null_mut(), 0, true),
        local: addr(std::ptr::null_mut(), 0, false),
        bytes_read: 0,
        bytes_written: 0,
        send_queue: 0,
        recv_queue: 0,
        paused: false,
    }
}
extern "C" fn connections(_: *mut c_void) -> RVec<u64> {
    RVec::new()
}
extern "C" fn connect(_: *mut c_void, _: RStr<'_>, _: u64) -> RResult<u64, RString> {
    RResult::RErr(RString::from("no network in the bench"))
}
extern "C" fn reconnect(_: *mut c_void, _: u64, _: u64) -> bool {
    false
}
extern "C" fn pipe(_: *mut c_void, _: u64, _: u64) -> bool {
    false
}

/// A `HostCtx` over a leaked `BenchHost` and a leaked minimal host table.
fn host_ctx() -> HostCtx {
    let state: &'static mut BenchHost = Box::leak(Box::new(BenchHost {
        info: RawWorkerInfo {
            name: RStr::from_str("bench"),
            id: 0,
            count: 1,
            pid: std::process::id(),
            listen: RStr::from_str("text://127.0.0.1:0"),
            options: RSlice::from_slice(&[]),
        },
        sent_bytes: 0,
        sends: 0,
    }));
    let vt = HostVTable {
        worker_info,
        log,
        send,
        message_kind,
        respond,
        join_group: conn_str,
        leave_group: conn_str,
        send_to_group,
        send_to_all,
        bind_uid: conn_str,
        send_to_uid,
        group_count,
        group_uids,
        publish,
        close,
        addr,
        add_timer,
        del_timer: conn_op,
        connection_count: count,
        pause_recv: conn_op,
        resume_recv: conn_op,
        end: conn_op,
        destroy: conn_op,
        set_max_send_buffer,
        conn_info,
        connections,
        del_all_timers: count,
        connect,
        reconnect,
        pipe,
        is_outbound: conn_op,
    }
    .leak_into_prefix();
    HostCtx {
        state: state as *mut BenchHost as *mut c_void,
        vt,
    }
}

/// A callback with a trivial body.
#[derive(Default)]
struct Noop {
    bytes: u64,
}

impl Plugin for Noop {
    fn on_message(&mut self, _ctx: &mut Context<'_>, _conn: ConnId, data: &[u8]) {
        self.bytes += data.len() as u64;
    }
}

/// Workerman's echo: one `ctx.send` per message.
#[derive(Default)]
struct Echo;

impl Plugin for Echo {
    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
        ctx.send(conn, data);
    }
}

/// The host side of the no-ABI reference.
trait NativeHost {
    fn send(&mut self, conn: ConnId, data: &[u8]) -> SendStatus;
}

trait NativePlugin {
    fn on_message(&mut self, host: &mut dyn NativeHost, conn: ConnId, data: &[u8]);
}

#[derive(Default)]
struct NativeCounter {
    sent_bytes: u64,
    sends: u64,
}

impl NativeHost for NativeCounter {
    fn send(&mut self, _conn: ConnId, data: &[u8]) -> SendStatus {
        self.sent_bytes += data.len() as u64;
        self.sends += 1;
        SendStatus::Sent
    }
}

struct NativeEcho;

impl NativePlugin for NativeEcho {
    fn on_message(&mut self, host: &mut dyn NativeHost, conn: ConnId, data: &[u8]) {
        host.send(conn, data);
    }
}

/// The plugin object as the host gets it from a `.so`.
fn instance<P: Plugin + Default>() -> PluginInstance {
    adapter::create::<P>(P::default)
        .into_option()
        .expect("constructor")
}

/// One `on_message` through the FFI vtable, as `host/src/worker` calls it.
#[inline(always)]
fn call_abi(inst: &PluginInstance, ctx: HostCtx, conn: u64, data: &[u8]) {
    let outcome = (inst.vt.on_message())(inst.state, ctx, conn, RSlice::from_slice(data));
    if outcome == Outcome::Panicked {
        panic!("plugin panicked: {}", (inst.vt.take_failure())());
    }
}

/// Messages per timed round: the host calls `on_message` for each message
/// parsed out of one read, every one a different slice of its read buffer.
const BATCH: usize = 16;

/// `BATCH` messages of 32 to 47 bytes at different places in one buffer.
fn messages(buf: &[u8]) -> Vec<&[u8]> {
    let mut at = 0;
    (0..BATCH)
        .map(|i| {
            let len = 32 + i;
            let m = &buf[at..at + len];
            at += len + 1;
            m
        })
        .collect()
}

/// Times `iters` rounds of `BATCH` calls; criterion sees the time per call.
fn per_call(b: &mut criterion::Bencher<'_>, msgs: &[&[u8]], mut call: impl FnMut(u64, &[u8])) {
    b.iter_custom(|iters| {
        let start = Instant::now();
        for _ in 0..iters {
            for (i, m) in black_box(msgs).iter().enumerate() {
                call(i as u64 + 1, m);
            }
        }
        start.elapsed() / BATCH as u32
    })
}

fn bench_abi(c: &mut Criterion) {
    let ctx = host_ctx();
    let buf: Vec<u8> = (0..4096u32).map(|i| b'a' + (i % 26) as u8).collect();
    let msgs = messages(&buf);
    let msgs = msgs.as_slice();

    let mut g = c.benchmark_group("on_message");
    let inst = instance::<Noop>();
    g.bench_function("abi", |b| {
        per_call(b, msgs, |conn, m| call_abi(&inst, black_box(ctx), conn, m))
    });
    let mut noop = Noop::default();
    let p: &mut dyn Plugin = black_box(&mut noop as &mut dyn Plugin);
    g.bench_function("direct", |b| {
        per_call(b, msgs, |conn, m| {
            p.on_message(&mut Context::from_raw(black_box(ctx)), ConnId(conn), m)
        })
    });
    g.finish();
    (inst.vt.drop())(inst.state);

    // The same with each slice passed through `black_box`, i.e. stored to
    // memory right before the call. Were the 16-byte `RSlice` passed on the
    // stack, copying it whole from two fresh 8-byte stores would defeat
    // store-to-load forwarding; this case watches that it stays in registers.
    let mut g = c.benchmark_group("on_message_spilled");
    let inst = instance::<Noop>();
    g.bench_function("abi", |b| {
        per_call(b, msgs, |conn, m| {
            call_abi(&inst, black_box(ctx), black_box(conn), black_box(m))
        })
    });
    let mut noop = Noop::default();
    let p: &mut dyn Plugin = black_box(&mut noop as &mut dyn Plugin);
    g.bench_function("direct", |b| {
        per_call(b, msgs, |conn, m| {
            p.on_message(
                &mut Context::from_raw(black_box(ctx)),
                ConnId(black_box(conn)),
                black_box(m),
            )
        })
    });
    g.finish();
    (inst.vt.drop())(inst.state);

    let mut g = c.benchmark_group("echo");
    let inst = instance::<Echo>();
    g.bench_function("abi", |b| {
        per_call(b, msgs, |conn, m| call_abi(&inst, black_box(ctx), conn, m))
    });
    let mut echo = Echo;
    let p: &mut dyn Plugin = black_box(&mut echo as &mut dyn Plugin);
    g.bench_function("direct", |b| {
        per_call(b, msgs, |conn, m| {
            p.on_message(&mut Context::from_raw(black_box(ctx)), ConnId(conn), m)
        })
    });
    let mut native_host = NativeCounter::default();
    let mut native_echo = NativeEcho;
    let h: &mut dyn NativeHost = black_box(&mut native_host as &mut dyn NativeHost);
    let p: &mut dyn NativePlugin = black_box(&mut native_echo as &mut dyn NativePlugin);
    g.bench_function("native", |b| {
        per_call(b, msgs, |conn, m| p.on_message(h, ConnId(conn), m))
    });
    g.finish();
    (inst.vt.drop())(inst.state);

    // Every send reached a host: nothing was optimized away.
    // SAFETY: no callback runs any more.
    let counts = unsafe { host(ctx.state) };
    black_box((counts.sends, counts.sent_bytes, native_host.sends));
}

criterion_group!(benches, bench_abi);
criterion_main!(benches);
