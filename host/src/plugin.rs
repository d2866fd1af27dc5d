//! Loading a plugin `.so` in a worker process. Only workers ever call this:
//! the master never maps business code.

use std::path::{Path, PathBuf};

use abi_stable::library::{LibraryError, RootModule};
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
        let PluginInstance { state, vt } = match (module.create())().into_option() {
            Some(inst) => inst,
            None => return Err(LoadError::CtorPanicked { path: shown }),
        };
        Ok(LoadedPlugin {
            path: path.to_path_buf(),
            label: format!("{} {}", module.name(), module.version()),
            state,
            vt,
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
