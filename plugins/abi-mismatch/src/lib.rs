//! Test fixture: exports a `wm_plugin` root module whose layout differs from
//! the host's (as a plugin built against another plugin-api would). The host
//! must refuse it with an error, never call into it.

use abi_stable::{
    declare_root_module_statics, export_root_module, library::RootModule, package_version_strings,
    prefix_type::PrefixTypeTrait, sabi_types::VersionStrings, std_types::RStr, StableAbi,
};

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModRef)))]
#[sabi(missing_field(panic))]
pub struct PluginMod {
    pub name: RStr<'static>,
    #[sabi(last_prefix_field)]
    pub create: extern "C" fn(u32) -> u32,
}

impl RootModule for PluginModRef {
    declare_root_module_statics! {PluginModRef}
    const BASE_NAME: &'static str = "wm_plugin";
    const NAME: &'static str = "wm_plugin";
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

extern "C" fn create(x: u32) -> u32 {
    x
}

#[export_root_module]
pub fn root() -> PluginModRef {
    PluginMod {
        name: RStr::from_str("abi-mismatch"),
        create,
    }
    .leak_into_prefix()
}
