//! Loading a plugin `.so` in a worker process. Only workers ever call this:
//! the master never maps business code.

use std::path::{Path, PathBuf};

use abi_stable::library::{LibraryError, RootModule};
use abi_stable::std_types::{RResult, RSlice, RVec};
use plugin_api::abi::{HostCtx, Outcome, PluginInstance, PluginModRef, PluginVTableRef};

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
    state: *mut std::ffi::c_void,
    vt: PluginVTableRef,
    /// The plugin's `Protocol` object, if it has one.
    protocol: *mut std::ffi::c_void,
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
        let PluginInstance {
            state,
            protocol,
            vt,
        } = match (module.create())().into_option() {
            Some(inst) => inst,
            None => return Err(LoadError::CtorPanicked { path: shown }),
        };
        Ok(LoadedPlugin {
            path: path.to_path_buf(),
            label: format!("{} {}", module.name(), module.version()),
            state,
            vt,
            protocol,
        })
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

    /// Whether the plugin can import connections on a reload.
    pub fn handover(&self) -> bool {
        false
    }

    /// The plugin crate's name and version.
    pub fn name_version(&self) -> (String, String) {
        let mut parts = self.label.splitn(2, ' ');
        let name = parts.next().unwrap_or_default().to_string();
        (name, parts.next().unwrap_or_default().to_string())
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
