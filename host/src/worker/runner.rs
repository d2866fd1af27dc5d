//! Runs plugin callbacks. Every callback goes through [`Runner::invoke`],
//! which also runs what the callback queued (buffer events, errors, the
//! `on_close` of connections it tore down), so no call site can forget to.

use std::cell::RefCell;
use std::ffi::c_void;
use std::time::Instant;

use abi_stable::std_types::{RSlice, RStr};
use plugin_api::abi::{HostCtx, HostVTableRef, Outcome, RawRequest};

use super::conn::State;
use super::core::{slot, Core, Deferred};
use super::host_api::{self, Scope};
use crate::plugin::LoadedPlugin;
use wm_proto::Kind;

/// A plugin callback, with its arguments.
pub enum Call<'a> {
    WorkerStart,
    WorkerStop,
    WorkerReload,
    Connect(u64),
    /// A message and how it came (`ctx.message_kind()` answers with it).
    Message(u64, &'a [u8], Kind),
    Close(u64),
    BufferFull(u64),
    BufferDrain(u64),
    Error(u64, u32, &'a str),
    Timer(u64),
    WebsocketConnect(u64, &'a RawRequest<'a>),
    Request(u64, &'a RawRequest<'a>),
    Publish(&'a str, &'a [u8]),
    Export(&'a mut Vec<u8>),
    ExportConn(u64, &'a mut Vec<u8>),
    Import(&'a super::handover::BuildInfo, &'a [u8]),
    ImportConn(u64, &'a super::handover::BuildInfo, &'a [u8]),
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
            Call::Export(_) => "on_export",
            Call::ExportConn(..) => "on_export_conn",
            Call::Import(..) => "on_import",
            Call::ImportConn(..) => "on_import_conn",
        }
    }

    fn conn(&self) -> Option<u64> {
        match *self {
            Call::Connect(c)
            | Call::Message(c, ..)
            | Call::Close(c)
            | Call::BufferFull(c)
            | Call::BufferDrain(c)
            | Call::Error(c, ..)
            | Call::WebsocketConnect(c, _)
            | Call::Request(c, _) => Some(c),
            _ => None,
        }
    }

    /// The kind of the message this call hands over; `Default` otherwise.
    fn kind(&self) -> Kind {
        match *self {
            Call::Message(_, _, kind) => kind,
            _ => Kind::Default,
        }
    }
}

/// The plugin with the host vtable: runs callbacks and handles their outcome.
pub struct Runner {
    pub plugin: LoadedPlugin,
    vt: HostVTableRef,
    /// What the last panic said: taking it from the plugin to log it
    /// leaves nothing there for a caller that reports it too.
    panic_text: RefCell<String>,
}

impl Runner {
    pub fn new(plugin: LoadedPlugin) -> Runner {
        Runner {
            plugin,
            vt: host_api::vtable(),
            panic_text: RefCell::new(String::new()),
        }
    }

    /// Runs one callback, then everything it queued.
    pub fn invoke(&self, core: &mut Core, call: Call<'_>) -> Outcome {
        let outcome = self.call(core, call);
        self.settle(core);
        outcome
    }

    fn call(&self, core: &mut Core, call: Call<'_>) -> Outcome {
        let mut scope = Scope {
            core: core as *mut Core,
            kind: call.kind(),
        };
        // Host functions reach `scope` (and through it the core) by this
        // pointer while the callback runs; `core` is not used meanwhile.
        let ctx = HostCtx {
            state: &mut scope as *mut Scope as *mut c_void,
            vt: self.vt,
        };
        let outcome = self.plugin.call(ctx, |vt, st, ctx| match call {
            Call::WorkerStart => (vt.on_worker_start())(st, ctx),
            Call::WorkerStop => (vt.on_worker_stop())(st, ctx),
            Call::WorkerReload => (vt.on_worker_reload())(st, ctx),
            Call::Connect(c) => (vt.on_connect())(st, ctx, c),
            Call::Message(c, d, _) => (vt.on_message())(st, ctx, c, RSlice::from_slice(d)),
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
            // Wired to the plugin once the ABI has them.
            Call::Export(_) | Call::ExportConn(..) | Call::Import(..) | Call::ImportConn(..) => {
                Outcome::Ok
            }
        });
        if outcome == Outcome::Panicked {
            let msg = self.plugin.failure();
            self.panic_text.replace(msg.clone());
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

    /// What a `Failed` or `Panicked` outcome of the last callback was about.
    pub fn failure(&self, outcome: Outcome) -> String {
        match outcome {
            Outcome::Panicked => self.panic_text.take(),
            _ => self.plugin.failure(),
        }
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
        let held = std::mem::take(&mut conn.held);
        let partners = [conn.pipe_to.take(), conn.pipe_from.take()];
        core.buffered = core.buffered.saturating_sub(held);
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

    /// Runs what host work queued, in a callback or outside one (a read, a
    /// bus frame, a timer sweep): buffer events, errors, and the `on_close`
    /// of connections torn down, until nothing is left.
    #[inline]
    pub fn settle(&self, core: &mut Core) {
        // Most callbacks queue nothing: skip the loop on the hot path.
        if core.deferred.is_empty() && core.closing.is_empty() {
            return;
        }
        self.settle_queued(core);
    }

    #[inline(never)]
    fn settle_queued(&self, core: &mut Core) {
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
                    let known = conn.codec.established() && !conn.unknown;
                    let partners = [conn.pipe_to, conn.pipe_from];
                    // Dropping the socket closes it and takes it out of epoll.
                    let held = core.conns.remove(slot(id)).held;
                    core.buffered = core.buffered.saturating_sub(held);
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
