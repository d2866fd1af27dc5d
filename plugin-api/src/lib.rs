//! Write wm-host plugins in safe Rust.
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

pub mod abi;
#[doc(hidden)]
pub mod adapter;
mod context;
mod request;

#[doc(hidden)]
pub use context::to_raw_addr;
pub use context::{ConnId, ConnInfo, Context, Level, MessageKind, SendStatus, TimerId, WorkerInfo};
pub use request::Request;

/// The error type `on_worker_start` may return: anything that converts into a
/// boxed error, so `?` works on most results.
pub type StartError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Error codes passed to [`Plugin::on_error`], as in Workerman.
pub mod error_code {
    /// An outbound connection could not be established.
    pub const CONNECT_FAILED: u32 = 1;
    /// Data could not be sent (connection closed, or send buffer full).
    pub const SEND_FAILED: u32 = 2;
}

/// Framing for `custom://` listeners (Workerman's protocol classes): the host
/// keeps buffers, limits and IO, and asks this object where messages are.
pub trait Protocol: 'static {
    /// `Ok(Some(n))`: the first packet is `buf[..n]`; `Ok(None)`: more bytes
    /// are needed; `Err(reason)`: bad input (the connection is closed and the
    /// reason logged). Packets over `max_package_size` are refused by the host.
    fn input(&mut self, buf: &[u8]) -> Result<Option<usize>, String>;
    /// The message inside a complete packet, as a part of it. Default: all.
    fn decode<'a>(&mut self, packet: &'a [u8]) -> &'a [u8] {
        packet
    }
    /// Appends the bytes to write for an outgoing message.
    fn encode(&mut self, data: &[u8], out: &mut Vec<u8>);
}

/// Business logic run by wm-host workers. Every method has a no-op default;
/// implement only what you need.
#[allow(unused_variables)]
pub trait Plugin: 'static {
    /// The worker process started. Connections are accepted only after this
    /// returns; returning an error (or panicking) fails the worker's start.
    fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
        Ok(())
    }
    /// The worker is stopping, after its connections were closed.
    fn on_worker_stop(&mut self, ctx: &mut Context<'_>) {}
    /// A reload was asked for and this worker is not reloadable: it keeps
    /// running the code it has.
    fn on_worker_reload(&mut self, ctx: &mut Context<'_>) {}
    /// A client connected.
    fn on_connect(&mut self, ctx: &mut Context<'_>, conn: ConnId) {}
    /// One complete message arrived, as framed by the listener's protocol.
    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {}
    /// The connection closed, by either side. `conn` is no longer usable.
    fn on_close(&mut self, ctx: &mut Context<'_>, conn: ConnId) {}
    /// The connection's send buffer reached its limit.
    fn on_buffer_full(&mut self, ctx: &mut Context<'_>, conn: ConnId) {}
    /// The connection's send buffer was emptied.
    fn on_buffer_drain(&mut self, ctx: &mut Context<'_>, conn: ConnId) {}
    /// Something failed on the connection; `code` is one of [`error_code`].
    fn on_error(&mut self, ctx: &mut Context<'_>, conn: ConnId, code: u32, msg: &str) {}
    /// A timer made with [`Context::add_timer`] fired.
    fn on_timer(&mut self, ctx: &mut Context<'_>, timer: TimerId) {}
    /// A websocket client sent its handshake (Workerman's onWebSocketConnect),
    /// before `on_connect`. Return `Err(status)` to refuse it with that HTTP
    /// status (e.g. 403).
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
    /// The framing for `custom://` listeners; asked once per worker.
    fn protocol(&mut self) -> Option<Box<dyn Protocol>> {
        None
    }
    /// A message published with [`Context::publish`] by any worker of the
    /// host, this one included, in the order each worker published them.
    fn on_publish(&mut self, ctx: &mut Context<'_>, topic: &str, data: &[u8]) {}
}

/// Exports a [`Plugin`] type from a `cdylib` crate.
///
/// `export_plugin!(MyPlugin)` builds it with `Default::default()`;
/// `export_plugin!(MyPlugin, MyPlugin::new)` with any `fn() -> MyPlugin`.
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
    };
}
