//! Glue behind [`crate::export_plugin!`]: turns a [`Plugin`] into the FFI
//! vtable, catching every panic on the plugin side of the boundary (abi_stable
//! would otherwise turn it into `exit(1)` of the whole worker).

use std::any::Any;
use std::cell::RefCell;
use std::ffi::c_void;
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

pub use abi_stable::library::{
    __call_root_module_loader as call_root_module_loader, CheckTypeLayout, LibHeader,
    RootModuleResult,
};
pub use abi_stable::std_types::ROption;
use abi_stable::{
    prefix_type::PrefixTypeTrait,
    std_types::{RResult, RSlice, RStr, RString, RVec, Tuple2},
};

use crate::abi::{
    HandoverVTable, HandoverVTableRef, HostCtx, Outcome, PluginInstance, PluginMod, PluginModRef,
    PluginVTable, RawBuild, RawRequest,
};
use crate::{Build, ConnId, Context, Plugin, Protocol, Request, TimerId};

thread_local! {
    // Where the panic hook leaves "message at file:line" for the wrapper to report.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    // The text of the last `Failed` or `Panicked`, until the host takes it.
    static FAILURE: RefCell<String> = const { RefCell::new(String::new()) };
}

extern "C" fn take_failure() -> RString {
    FAILURE.with(|f| RString::from(std::mem::take(&mut *f.borrow_mut())))
}

fn failed(outcome: Outcome, text: String) -> Outcome {
    FAILURE.with(|f| *f.borrow_mut() = text);
    outcome
}

fn install_panic_hook() {
    static ONCE: Once = Once::new();
    // This hook belongs to the plugin's own copy of std, so it sees only plugin
    // panics. It records instead of printing: the host logs the report.
    ONCE.call_once(|| {
        panic::set_hook(Box::new(|info| {
            let msg = payload_text(info.payload());
            let text = match info.location() {
                Some(loc) => format!("{msg} at {}:{}", loc.file(), loc.line()),
                None => msg,
            };
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(text));
        }));
    });
}

fn payload_text(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

fn guard(f: impl FnOnce() -> Result<(), String>) -> Outcome {
    match panic::catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => Outcome::Ok,
        Ok(Err(e)) => failed(Outcome::Failed, e),
        Err(payload) => {
            let text = LAST_PANIC
                .with(|p| p.borrow_mut().take())
                .unwrap_or_else(|| payload_text(&*payload));
            // Dropping a payload could itself panic; forget it to stay on this side.
            std::mem::forget(payload);
            failed(Outcome::Panicked, text)
        }
    }
}

/// # Safety
/// `state` must be the pointer made by `create::<P>`, used on one thread.
unsafe fn plugin<'a, P: Plugin>(state: *mut c_void) -> &'a mut P {
    &mut *(state as *mut P)
}

macro_rules! conn_callback {
    ($name:ident) => {
        extern "C" fn $name<P: Plugin>(state: *mut c_void, ctx: HostCtx, conn: u64) -> Outcome {
            guard(|| {
                // SAFETY: the host passes back the state it got from `create`.
                let p = unsafe { plugin::<P>(state) };
                p.$name(&mut Context::from_raw(ctx), ConnId(conn));
                Ok(())
            })
        }
    };
}

conn_callback!(on_connect);
conn_callback!(on_close);
conn_callback!(on_buffer_full);
conn_callback!(on_buffer_drain);

macro_rules! worker_callback {
    ($name:ident) => {
        extern "C" fn $name<P: Plugin>(state: *mut c_void, ctx: HostCtx) -> Outcome {
            guard(|| {
                // SAFETY: as above.
                let p = unsafe { plugin::<P>(state) };
                p.$name(&mut Context::from_raw(ctx));
                Ok(())
            })
        }
    };
}

worker_callback!(on_worker_stop);
worker_callback!(on_worker_reload);

extern "C" fn on_worker_start<P: Plugin>(state: *mut c_void, ctx: HostCtx) -> Outcome {
    guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        p.on_worker_start(&mut Context::from_raw(ctx))
            .map_err(|e| e.to_string())
    })
}

extern "C" fn on_message<P: Plugin>(
    state: *mut c_void,
    ctx: HostCtx,
    conn: u64,
    data: RSlice<'_, u8>,
) -> Outcome {
    guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        p.on_message(&mut Context::from_raw(ctx), ConnId(conn), data.as_slice());
        Ok(())
    })
}

extern "C" fn on_error<P: Plugin>(
    state: *mut c_void,
    ctx: HostCtx,
    conn: u64,
    code: u32,
    msg: RStr<'_>,
) -> Outcome {
    guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        p.on_error(
            &mut Context::from_raw(ctx),
            ConnId(conn),
            code,
            msg.as_str(),
        );
        Ok(())
    })
}

extern "C" fn on_timer<P: Plugin>(state: *mut c_void, ctx: HostCtx, timer: u64) -> Outcome {
    guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        p.on_timer(&mut Context::from_raw(ctx), TimerId(timer));
        Ok(())
    })
}

extern "C" fn on_websocket_connect<P: Plugin>(
    state: *mut c_void,
    ctx: HostCtx,
    conn: u64,
    req: &RawRequest<'_>,
) -> Outcome {
    let mut refused = None;
    let outcome = guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        refused = p
            .on_websocket_connect(
                &mut Context::from_raw(ctx),
                ConnId(conn),
                &Request::from_raw(req),
            )
            .err();
        Ok(())
    });
    match (outcome, refused) {
        (Outcome::Ok, Some(status)) => Outcome::Refused(status),
        (outcome, _) => outcome,
    }
}

extern "C" fn on_request<P: Plugin>(
    state: *mut c_void,
    ctx: HostCtx,
    conn: u64,
    req: &RawRequest<'_>,
) -> Outcome {
    guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        p.on_request(
            &mut Context::from_raw(ctx),
            ConnId(conn),
            &Request::from_raw(req),
        );
        Ok(())
    })
}

extern "C" fn on_publish<P: Plugin>(
    state: *mut c_void,
    ctx: HostCtx,
    topic: RStr<'_>,
    data: RSlice<'_, u8>,
) -> Outcome {
    guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        p.on_publish(&mut Context::from_raw(ctx), topic.as_str(), data.as_slice());
        Ok(())
    })
}

extern "C" fn handover<P: Plugin>(state: *mut c_void) -> bool {
    panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: as above.
        unsafe { plugin::<P>(state) }.handover()
    }))
    .unwrap_or_else(|payload| {
        std::mem::forget(payload);
        false
    })
}

extern "C" fn on_export<P: Plugin>(
    state: *mut c_void,
    ctx: HostCtx,
    out: &mut RVec<u8>,
) -> Outcome {
    guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        out.extend_from_slice(&p.on_export(&mut Context::from_raw(ctx)));
        Ok(())
    })
}

extern "C" fn on_export_conn<P: Plugin>(
    state: *mut c_void,
    ctx: HostCtx,
    conn: u64,
    out: &mut RVec<u8>,
) -> Outcome {
    guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        out.extend_from_slice(&p.on_export_conn(&mut Context::from_raw(ctx), ConnId(conn)));
        Ok(())
    })
}

fn build<'a>(raw: &'a RawBuild<'_>) -> Build<'a> {
    Build {
        name: raw.name.as_str(),
        version: raw.version.as_str(),
        hash: raw.hash.as_str(),
    }
}

extern "C" fn on_import<P: Plugin>(
    state: *mut c_void,
    ctx: HostCtx,
    from: &RawBuild<'_>,
    data: RSlice<'_, u8>,
) -> Outcome {
    guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        p.on_import(&mut Context::from_raw(ctx), &build(from), data.as_slice())
            .map_err(|e| e.to_string())
    })
}

extern "C" fn on_import_conn<P: Plugin>(
    state: *mut c_void,
    ctx: HostCtx,
    conn: u64,
    from: &RawBuild<'_>,
    data: RSlice<'_, u8>,
) -> Outcome {
    let mut kept = true;
    let outcome = guard(|| {
        // SAFETY: as above.
        let p = unsafe { plugin::<P>(state) };
        kept = p.on_import_conn(
            &mut Context::from_raw(ctx),
            ConnId(conn),
            &build(from),
            data.as_slice(),
        );
        Ok(())
    });
    match (outcome, kept) {
        (Outcome::Ok, false) => Outcome::Refused(0),
        (outcome, _) => outcome,
    }
}

type ProtoBox = Box<dyn Protocol>;

/// # Safety
/// `proto` is the pointer made in `create`, used on one thread.
unsafe fn proto<'a>(p: *mut c_void) -> &'a mut ProtoBox {
    &mut *(p as *mut ProtoBox)
}

extern "C" fn protocol_input(
    p: *mut c_void,
    buf: RSlice<'_, u8>,
) -> RResult<ROption<u64>, RString> {
    // SAFETY: the host passes back the pointer from `create`.
    let r = panic::catch_unwind(AssertUnwindSafe(|| {
        unsafe { proto(p) }.input(buf.as_slice())
    }));
    match r {
        Ok(Ok(n)) => RResult::ROk(n.map(|n| n as u64).into()),
        Ok(Err(e)) => RResult::RErr(e.into()),
        Err(payload) => {
            let text = LAST_PANIC
                .with(|l| l.borrow_mut().take())
                .unwrap_or_else(|| payload_text(&*payload));
            std::mem::forget(payload);
            RResult::RErr(format!("protocol input panicked: {text}").into())
        }
    }
}

extern "C" fn protocol_decode(p: *mut c_void, packet: RSlice<'_, u8>) -> Tuple2<u64, u64> {
    let whole = Tuple2(0, packet.len() as u64);
    let r = panic::catch_unwind(AssertUnwindSafe(|| {
        let packet = packet.as_slice();
        // SAFETY: as above.
        let msg = unsafe { proto(p) }.decode(packet);
        let start = (msg.as_ptr() as usize).wrapping_sub(packet.as_ptr() as usize);
        // Only a part of the packet can be handed back without a copy.
        if start <= packet.len() && start + msg.len() <= packet.len() {
            Tuple2(start as u64, (start + msg.len()) as u64)
        } else {
            whole
        }
    }));
    r.unwrap_or(whole)
}

extern "C" fn protocol_encode(p: *mut c_void, data: RSlice<'_, u8>, out: &mut RVec<u8>) -> bool {
    let r = panic::catch_unwind(AssertUnwindSafe(|| {
        let mut v = Vec::new();
        // SAFETY: as above.
        unsafe { proto(p) }.encode(data.as_slice(), &mut v);
        v
    }));
    match r {
        Ok(v) => {
            out.extend_from_slice(&v);
            true
        }
        Err(payload) => {
            std::mem::forget(payload);
            false
        }
    }
}

extern "C" fn drop_plugin<P: Plugin>(state: *mut c_void) {
    let _ = panic::catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: `state` came from `Box::into_raw` in `create` and is dropped once.
        drop(unsafe { Box::from_raw(state as *mut P) });
    }));
}

/// Builds the plugin object; `None` if the constructor panicked.
pub fn create<P: Plugin>(ctor: fn() -> P) -> ROption<PluginInstance> {
    install_panic_hook();
    let Ok(object) = panic::catch_unwind(ctor) else {
        return ROption::RNone;
    };
    let vt = PluginVTable {
        on_worker_start: on_worker_start::<P>,
        on_worker_stop: on_worker_stop::<P>,
        on_worker_reload: on_worker_reload::<P>,
        on_connect: on_connect::<P>,
        on_message: on_message::<P>,
        on_close: on_close::<P>,
        on_buffer_full: on_buffer_full::<P>,
        on_buffer_drain: on_buffer_drain::<P>,
        on_error: on_error::<P>,
        on_timer: on_timer::<P>,
        on_websocket_connect: on_websocket_connect::<P>,
        on_request: on_request::<P>,
        on_publish: on_publish::<P>,
        drop: drop_plugin::<P>,
        protocol_input,
        protocol_decode,
        protocol_encode,
        take_failure,
    };
    let mut object = object;
    let protocol = match panic::catch_unwind(AssertUnwindSafe(|| object.protocol())) {
        // Lives as long as the worker: never freed.
        Ok(Some(p)) => Box::into_raw(Box::new(p)) as *mut c_void,
        _ => std::ptr::null_mut(),
    };
    ROption::RSome(PluginInstance {
        state: Box::into_raw(Box::new(object)) as *mut c_void,
        protocol,
        // Called once per worker process, so leaking one vtable is fine.
        vt: vt.leak_into_prefix(),
    })
}

/// Builds the root module. Called once, when the host loads the library.
pub fn module(
    name: &'static str,
    version: &'static str,
    create: extern "C" fn() -> ROption<PluginInstance>,
) -> PluginModRef {
    PluginMod {
        name: RStr::from_str(name),
        version: RStr::from_str(version),
        create,
    }
    .leak_into_prefix()
}

/// Builds the handover module. Called once, when the host loads the
/// library.
pub fn handover_module<P: Plugin>() -> HandoverVTableRef {
    HandoverVTable {
        handover: handover::<P>,
        on_export: on_export::<P>,
        on_export_conn: on_export_conn::<P>,
        on_import: on_import::<P>,
        on_import_conn: on_import_conn::<P>,
    }
    .leak_into_prefix()
}

#[cfg(test)]
mod tests {
    #[test]
    fn export_macro_uses_abi_stables_symbol_name() {
        assert_eq!(
            abi_stable::library::ROOT_MODULE_LOADER_NAME,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }

    #[test]
    fn handover_symbol_is_the_one_the_macro_exports() {
        // The macro needs a literal; this pins it to the constant.
        assert_eq!(crate::abi::HANDOVER_SYMBOL, b"wm_plugin_handover\0");
    }
}
