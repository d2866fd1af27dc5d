//! Loading a plugin `.so` in a worker process. Only workers ever call this:
//! the master never maps business code.

use std::path::{Path, PathBuf};

use abi_stable::library::{AbiHeaderRef, LibraryError, RawLibrary, RootModule};
use abi_stable::std_types::{RResult, RSlice, RStr, RVec};
use plugin_api::abi::{
    HandoverVTableRef, HostCtx, Outcome, PluginInstance, PluginModRef, PluginVTableRef, RawBuild,
    HANDOVER_SYMBOL,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("plugin {path}: file not found")]
    Missing { path: String },
    #[error("plugin {path}: incompatible plugin-api: {detail}")]
    Incompatible { path: String, detail: String },
    #[error("plugin {path}: not a wm-host plugin: {detail}")]
    NotAPlugin { path: String, detail: String },
    #[error("plugin {path}: constructor panicked")]
    CtorPanicked { path: String },
}

pub struct LoadedPlugin {
    pub path: PathBuf,
    /// `crate-name version` as the plugin reports it.
    pub label: String,
    /// The plugin crate's name, as it reports it.
    pub name: String,
    /// The plugin crate's version, as it reports it.
    pub version: String,
    state: *mut std::ffi::c_void,
    vt: PluginVTableRef,
    /// The plugin's `Protocol` object, if it has one.
    protocol: *mut std::ffi::c_void,
    /// The handover callbacks; `None` for a plugin built before them.
    handover_vt: Option<HandoverVTableRef>,
    /// What the plugin's `handover()` answered when it was built.
    handover: bool,
}

/// A plugin build as the other side of a handover sees it (`Build` for
/// the plugin): crate name and version, and the SHA-256 of the `.so`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildInfo {
    pub name: String,
    pub version: String,
    pub hash: String,
}

impl BuildInfo {
    /// The form passed to the plugin.
    pub fn raw(&self) -> RawBuild<'_> {
        RawBuild {
            name: RStr::from_str(&self.name),
            version: RStr::from_str(&self.version),
            hash: RStr::from_str(&self.hash),
        }
    }
}

/// A plugin's framing for `custom://`, callable while a plugin callback runs
/// (it is a separate object from the plugin).
#[derive(Clone, Copy)]
pub struct CustomProtocol {
    vt: PluginVTableRef,
    proto: *mut std::ffi::c_void,
}

impl wm_proto::Framer for CustomProtocol {
    fn packet_len(&self, buf: &[u8]) -> Result<Option<usize>, String> {
        match (self.vt.protocol_input())(self.proto, RSlice::from_slice(buf)) {
            RResult::ROk(n) => Ok(n.into_option().map(|n| n as usize)),
            RResult::RErr(e) => Err(e.into_string()),
        }
    }

    fn message(&self, packet: &[u8]) -> (usize, usize) {
        let r = (self.vt.protocol_decode())(self.proto, RSlice::from_slice(packet));
        (r.0 as usize, r.1 as usize)
    }

    fn encode(&self, data: &[u8]) -> Option<Vec<u8>> {
        let mut out = RVec::new();
        (self.vt.protocol_encode())(self.proto, RSlice::from_slice(data), &mut out)
            .then(|| out.into_vec())
    }
}

impl LoadedPlugin {
    /// Loads `path`; errors name `shown` (the file the user configured, where
    /// `path` is its private copy).
    pub fn load(path: &Path, shown: &Path) -> Result<LoadedPlugin, LoadError> {
        let shown = shown.display().to_string();
        if !path.exists() {
            return Err(LoadError::Missing { path: shown });
        }
        let module = PluginModRef::load_from_file(path).map_err(|e| classify(shown.clone(), e))?;
        let handover_vt = load_handover(path).map_err(|e| classify(shown.clone(), e))?;
        let PluginInstance {
            state,
            protocol,
            vt,
        } = match (module.create())().into_option() {
            Some(inst) => inst,
            None => return Err(LoadError::CtorPanicked { path: shown }),
        };
        let handover = handover_vt.is_some_and(|h| (h.handover())(state));
        Ok(LoadedPlugin {
            path: path.to_path_buf(),
            label: format!("{} {}", module.name(), module.version()),
            name: module.name().to_string(),
            version: module.version().to_string(),
            state,
            vt,
            protocol,
            handover_vt,
            handover,
        })
    }

    /// Whether the plugin takes part in live handover: it was built with
    /// the handover callbacks and its `handover()` said yes.
    pub fn handover(&self) -> bool {
        self.handover
    }

    /// This build as a handover's other side sees it; `hash` is the
    /// SHA-256 of the `.so`, which the host knows and the plugin does not.
    pub fn build_info(&self, hash: &str) -> BuildInfo {
        BuildInfo {
            name: self.name.clone(),
            version: self.version.clone(),
            hash: hash.to_string(),
        }
    }

    pub fn protocol(&self) -> Option<CustomProtocol> {
        (!self.protocol.is_null()).then_some(CustomProtocol {
            vt: self.vt,
            proto: self.protocol,
        })
    }

    /// Runs one callback. `f` receives the plugin's state and the context.
    pub fn call(
        &self,
        ctx: HostCtx,
        f: impl FnOnce(PluginVTableRef, *mut std::ffi::c_void, HostCtx) -> Outcome,
    ) -> Outcome {
        f(self.vt, self.state, ctx)
    }

    /// Runs one handover callback; `Outcome::Ok` without calling anything
    /// for a plugin built before them.
    pub fn call_handover(
        &self,
        ctx: HostCtx,
        f: impl FnOnce(HandoverVTableRef, *mut std::ffi::c_void, HostCtx) -> Outcome,
    ) -> Outcome {
        match self.handover_vt {
            Some(h) => f(h, self.state, ctx),
            None => Outcome::Ok,
        }
    }

    /// What the last `Failed` or `Panicked` outcome was about.
    pub fn failure(&self) -> String {
        (self.vt.take_failure())().into_string()
    }
}

impl Drop for LoadedPlugin {
    fn drop(&mut self) {
        (self.vt.drop())(self.state);
    }
}

/// The handover module of the library at `path` (already loaded for its
/// main module), checked by abi_stable like the main one; `None` when the
/// plugin was built before handover existed.
fn load_handover(path: &Path) -> Result<Option<HandoverVTableRef>, LibraryError> {
    let lib = RawLibrary::load_at(path)?;
    // SAFETY: the symbol, when present, is the `LibHeader` static the export
    // macro defines; the library is never unloaded (forgotten below).
    let header = match unsafe { lib.get::<AbiHeaderRef>(HANDOVER_SYMBOL) } {
        Ok(sym) => *sym,
        Err(LibraryError::GetSymbolError { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    std::mem::forget(lib);
    let module = header.upgrade()?.init_root_module::<HandoverVTableRef>()?;
    Ok(Some(module))
}

/// The plugin-api version a plugin was built against (`wm-host check`),
/// read from its abi_stable header without loading the module.
pub fn api_version(path: &Path) -> Result<String, LoadError> {
    let shown = path.display().to_string();
    if !path.exists() {
        return Err(LoadError::Missing { path: shown });
    }
    let header = abi_stable::library::lib_header_from_path(path).map_err(|e| classify(shown, e))?;
    Ok(header.version_strings().version.to_string())
}

fn classify(path: String, e: LibraryError) -> LoadError {
    let full = e
        .to_string()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    tracing::debug!("loading {path}: {full}");
    // Layout errors print both layouts in full; the verdict is at the end.
    let detail = match full.rfind("Error:") {
        Some(i) => full[i + "Error:".len()..].trim().to_string(),
        None => full,
    };
    match e {
        LibraryError::OpenError { .. } | LibraryError::GetSymbolError { .. } => {
            LoadError::NotAPlugin { path, detail }
        }
        _ => LoadError::Incompatible { path, detail },
    }
}
