//! Runs plugin callbacks. Every callback goes through [`Runner::invoke`],
//! which also runs what the callback queued (buffer events, errors, the
//! `on_close` of connections it tore down), so no call site can forget to.

use std::cell::RefCell;
use std::ffi::c_void;
use std::time::Instant;

use abi_stable::std_types::{RSlice, RStr, RVec};
use plugin_api::abi::{HostCtx, HostVTableRef, Outcome, RawRequest};

use super::conn::State;
use super::core::{Core, Deferred};
use super::host_api::{self, Scope};
use crate::plugin::{BuildInfo, LoadedPlugin};
use wm_proto::Kind;

/// A plugin callback, with its arguments.
// The handover variants wait for the worker's handover (issue 11).
#[cfg_attr(not(test), allow(dead_code))]
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
    /// Handover, old build: the worker's state, appended to the vector.
    Export(&'a mut Vec<u8>),
    /// Handover, old build: one connection's state, appended to the vector.
    ExportConn(u64, &'a mut Vec<u8>),
    /// Handover, new build: the old build and what its `Export` gave.
    Import(&'a BuildInfo, &'a [u8]),
    /// Handover, new build: a connection under its new id, with what the
    /// old build's `ExportConn` gave; `Refused(0)` when the plugin refuses it.
    ImportConn(u64, &'a BuildInfo, &'a [u8]),
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

    /// The connection a panic closes. Not those of the handover calls:
    /// their caller decides (a failed export keeps the connection with the
    /// old build, a failed import refuses it).
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
    #[inline]
    pub fn invoke(&self, core: &mut Core, call: Call<'_>) -> Outcome {
        let outcome = match call {
            // The one that runs per message: without `call`'s frame.
            Call::Message(c, d, kind) => self.message(core, c, d, kind),
            call => self.call(core, call),
        };
        self.settle(core);
        outcome
    }

    /// `call` for `Call::Message`: the same, with the handover variants'
    /// dispatch and the panic handling out of the way.
    #[inline]
    fn message(&self, core: &mut Core, c: u64, d: &[u8], kind: Kind) -> Outcome {
        let mut scope = Scope {
            core: core as *mut Core,
            kind,
            message: (d.as_ptr(), d.len()),
        };
        // As in `call`: host functions reach the core through `scope`.
        let ctx = HostCtx {
            state: &mut scope as *mut Scope as *mut c_void,
            vt: self.vt,
        };
        let outcome = self.plugin.call(ctx, |vt, st, ctx| {
            (vt.on_message())(st, ctx, c, RSlice::from_slice(d))
        });
        if outcome == Outcome::Panicked {
            self.panicked(core, &Call::Message(c, d, kind));
        }
        outcome
    }

    fn call(&self, core: &mut Core, mut call: Call<'_>) -> Outcome {
        let mut scope = Scope {
            core: core as *mut Core,
            kind: Kind::Default,
            message: (std::ptr::null(), 0),
        };
        if let Call::Message(_, data, kind) = call {
            scope.kind = kind;
            scope.message = (data.as_ptr(), data.len());
        }
        // Host functions reach `scope` (and through it the core) by this
        // pointer while the callback runs; `core` is not used meanwhile.
        let ctx = HostCtx {
            state: &mut scope as *mut Scope as *mut c_void,
            vt: self.vt,
        };
        let outcome = match &mut call {
            Call::Export(out) => self.plugin.call_handover(ctx, |h, st, ctx| {
                let mut buf = RVec::new();
                let outcome = (h.on_export())(st, ctx, &mut buf);
                out.extend_from_slice(&buf);
                outcome
            }),
            Call::ExportConn(c, out) => self.plugin.call_handover(ctx, |h, st, ctx| {
                let mut buf = RVec::new();
                let outcome = (h.on_export_conn())(st, ctx, *c, &mut buf);
                out.extend_from_slice(&buf);
                outcome
            }),
            Call::Import(from, d) => self.plugin.call_handover(ctx, |h, st, ctx| {
                (h.on_import())(st, ctx, &from.raw(), RSlice::from_slice(d))
            }),
            Call::ImportConn(c, from, d) => self.plugin.call_handover(ctx, |h, st, ctx| {
                (h.on_import_conn())(st, ctx, *c, &from.raw(), RSlice::from_slice(d))
            }),
            _ => self.plain(ctx, &call),
        };
        if outcome == Outcome::Panicked {
            self.panicked(core, &call);
        }
        outcome
    }

    /// A callback panicked: log it, keep its text, and close the
    /// connection it was about.
    #[inline(never)]
    fn panicked(&self, core: &mut Core, call: &Call<'_>) {
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

    /// The callbacks of the main vtable, present in every plugin.
    #[inline]
    fn plain(&self, ctx: HostCtx, call: &Call<'_>) -> Outcome {
        self.plugin.call(ctx, |vt, st, ctx| match *call {
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
            Call::Export(_) | Call::ExportConn(..) | Call::Import(..) | Call::ImportConn(..) => {
                unreachable!("handover calls go through call_handover")
            }
        })
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
                let mut conn = core.remove(id);
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
                    let known = conn.established() && !conn.unknown;
                    let partners = [conn.pipe_to, conn.pipe_from];
                    // Dropping the socket closes it and takes it out of epoll.
                    let held = core.remove(id).held;
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

#[cfg(test)]
mod tests {
    //! The handover calls against real plugins, with a worker core but no
    //! loop. abi_stable keeps one plugin per process, so these load the
    //! test plugin, and the old-API plugin is checked in a child process.

    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;

    use abi_stable::std_types::{RSlice, RStr, Tuple2};
    use plugin_api::abi::{Outcome, RawWorkerInfo};

    use super::{Call, Runner};
    use crate::plugin::{BuildInfo, LoadedPlugin};
    use crate::worker::core::Core;

    /// Set in the child process that loads the old-API plugin.
    const OLD_PLUGIN_ENV: &str = "WM_RUNNER_TEST_OLD_PLUGIN";

    /// `target/`, from this test binary's path (`target/debug/deps/…`).
    fn target() -> PathBuf {
        let exe = std::env::current_exe().unwrap();
        exe.ancestors().nth(3).unwrap().to_path_buf()
    }

    fn cargo(args: &[&str]) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let status = Command::new(env!("CARGO"))
            .args(args)
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", target())
            .status()
            .expect("run cargo");
        assert!(status.success(), "cargo {args:?} failed");
    }

    /// The test plugin, built if needed, copied once (cargo replaces the
    /// build output; the loaded copy must not change).
    fn test_plugin() -> &'static Path {
        static COPY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
        &COPY
            .get_or_init(|| {
                cargo(&["build", "-q", "-p", "test-plugin"]);
                let dir = tempfile::tempdir().unwrap();
                let copy = dir.path().join("libtest_plugin.so");
                std::fs::copy(target().join("debug/libtest_plugin.so"), &copy).unwrap();
                (dir, copy)
            })
            .1
    }

    fn runner(lib: &Path, options: &[(&str, &str)]) -> (Core, Runner) {
        let leak = |s: &str| RStr::from_str(Box::leak(s.to_string().into_boxed_str()));
        let options: Vec<_> = options
            .iter()
            .map(|(k, v)| Tuple2(leak(k), leak(v)))
            .collect();
        let info = Box::leak(Box::new(RawWorkerInfo {
            name: leak("t"),
            id: 0,
            count: 1,
            pid: std::process::id(),
            listen: leak("text://127.0.0.1:1"),
            options: RSlice::from_slice(Box::leak(options.into_boxed_slice())),
        }));
        let plugin = LoadedPlugin::load(lib, lib).unwrap();
        (Core::new(info, 1 << 20, 1 << 20), Runner::new(plugin))
    }

    fn old_build() -> BuildInfo {
        BuildInfo {
            name: "test-plugin".into(),
            version: "0.0.9".into(),
            hash: "ab".repeat(32),
        }
    }

    #[test]
    fn the_test_plugin_exports_and_imports() {
        let (mut core, r) = runner(test_plugin(), &[]);
        assert!(r.plugin.handover());
        assert_eq!(
            (&*r.plugin.name, &*r.plugin.version),
            ("test-plugin", "0.1.0")
        );
        assert_eq!(r.plugin.build_info("h").hash, "h");

        let mut worker = Vec::new();
        assert_eq!(r.invoke(&mut core, Call::Export(&mut worker)), Outcome::Ok);
        let text = String::from_utf8(worker.clone()).unwrap();
        assert!(text.starts_with("v1\nbuild=default\ntotal=0\n"), "{text}");
        let mut conn = Vec::new();
        assert_eq!(
            r.invoke(&mut core, Call::ExportConn(7, &mut conn)),
            Outcome::Ok
        );
        assert!(
            conn.starts_with(b"v1\nhs=\n"),
            "{:?}",
            String::from_utf8_lossy(&conn)
        );

        let from = old_build();
        assert_eq!(
            r.invoke(&mut core, Call::Import(&from, &worker)),
            Outcome::Ok
        );
        assert_eq!(
            r.invoke(&mut core, Call::ImportConn(8, &from, &conn)),
            Outcome::Ok
        );
        let refused = b"v1\nrefuse=1\n";
        assert_eq!(
            r.invoke(&mut core, Call::ImportConn(9, &from, refused)),
            Outcome::Refused(0)
        );
        assert_eq!(
            r.invoke(&mut core, Call::ImportConn(10, &from, b"v2\n")),
            Outcome::Refused(0)
        );
        // What the new build kept shows in its next export.
        let mut again = Vec::new();
        r.invoke(&mut core, Call::ExportConn(8, &mut again));
        assert_eq!(again, conn);
    }

    #[test]
    fn a_failed_or_panicking_import_reports_why() {
        let (mut core, r) = runner(test_plugin(), &[]);
        let o = r.invoke(&mut core, Call::Import(&old_build(), b"v7\n"));
        assert_eq!(o, Outcome::Failed);
        assert_eq!(r.failure(o), "unknown worker state format");

        let flag = tempfile::NamedTempFile::new().unwrap();
        let path = flag.path().to_str().unwrap();
        let (mut core, r) = runner(test_plugin(), &[("import_panic_file", path)]);
        let o = r.invoke(&mut core, Call::Import(&old_build(), b"v1\n"));
        assert_eq!(o, Outcome::Panicked);
        assert!(r.failure(o).starts_with("import_panic_file exists at "));
    }

    /// A plugin built from plugin-api before handover (fixtures/old-api):
    /// it loads, has no handover, and the handover calls do nothing.
    #[test]
    fn a_plugin_built_before_handover_has_none() {
        let Some(lib) = std::env::var_os(OLD_PLUGIN_ENV) else {
            let manifest =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/old-api/Cargo.toml");
            let manifest = manifest.to_str().unwrap();
            // `--offline`: the main build fetched everything the fixture uses.
            cargo(&[
                "build",
                "-q",
                "--locked",
                "--offline",
                "--manifest-path",
                manifest,
                "-p",
                "old-api-echo",
            ]);
            let name = module_path!().split_once("::").unwrap().1;
            let out = Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    &format!("{name}::a_plugin_built_before_handover_has_none"),
                ])
                .env(OLD_PLUGIN_ENV, target().join("debug/libold_api_echo.so"))
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "the child process failed: {text}");
            assert!(text.contains("1 passed"), "the child ran nothing: {text}");
            return;
        };
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("old.so");
        std::fs::copy(lib, &copy).unwrap();
        let (mut core, r) = runner(&copy, &[]);
        assert!(!r.plugin.handover());
        assert_eq!(r.plugin.name, "old-api-echo");
        let mut out = Vec::new();
        assert_eq!(r.invoke(&mut core, Call::Export(&mut out)), Outcome::Ok);
        assert_eq!(
            r.invoke(&mut core, Call::ExportConn(1, &mut out)),
            Outcome::Ok
        );
        assert!(out.is_empty());
        let from = old_build();
        assert_eq!(r.invoke(&mut core, Call::Import(&from, b"x")), Outcome::Ok);
        assert_eq!(
            r.invoke(&mut core, Call::ImportConn(1, &from, b"x")),
            Outcome::Ok
        );
    }
}
