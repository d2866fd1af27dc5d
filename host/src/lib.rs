//! wm-host: Workerman's process model for Rust plugins, as a library.
//!
//! The binary (`main.rs`) only parses the command line; everything else
//! lives here so tests can drive parts of it in-process. Layers, each
//! importing only the ones after it: [`cli`] (and [`check`]) → [`master`] → [`worker`] →
//! protocol codecs (the `wm-proto` crate) → [`config`].

pub mod bus;
pub mod check;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod ipc;
pub mod logging;
pub mod master;
pub mod metrics;
pub mod new;
pub mod plugin;
pub mod report;
pub mod runtime;
pub mod table;
pub mod tls;
pub mod trust;
pub mod worker;
