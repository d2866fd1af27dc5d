//! wm-host's command line: parses arguments and hands each command to
//! [`wm_host::cli`].

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use wm_host::cli;

#[derive(Parser)]
#[command(
    name = "wm-host",
    version,
    about = "Multi-process socket server hosting hot-reloadable Rust plugins"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct ConfigArg {
    /// The config file.
    #[arg(short, long, default_value = "wm.toml")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the master and its workers.
    Start {
        /// Run in the background; returns once every worker is ready.
        #[arg(short = 'd', long)]
        daemon: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Stop the master and its workers.
    Stop {
        /// Let connections end by themselves (up to stop_timeout).
        #[arg(short = 'g', long)]
        graceful: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Roll workers one by one onto the current plugin build.
    Reload {
        /// Old workers keep their connections until those end (up to stop_timeout).
        #[arg(short = 'g', long)]
        graceful: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Stop, then start again.
    Restart {
        #[arg(short = 'd', long)]
        daemon: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show every worker process.
    Status {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// List every connection of every worker.
    Connections {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Open the log file again, in the master and every worker (after
    /// logrotate moved it; SIGHUP does the same).
    ReopenLogs {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Test the config: listeners, certificates, plugins (like `nginx -t`).
    Check {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Internal: loads one plugin for `check`, prints a JSON line.
    #[command(hide = true)]
    CheckPlugin { plugin: PathBuf },
    /// Write a new plugin crate and a wm.toml for it, ready to build and start.
    New(wm_host::new::Args),
    /// Internal: a worker process, started by the master.
    #[command(hide = true)]
    Worker,
    /// Internal: a daemonized master, started by `start -d`.
    #[command(hide = true)]
    Master {
        #[command(flatten)]
        config: ConfigArg,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Worker => return ExitCode::from(cli::worker() as u8),
        Cmd::Check { config } => return wm_host::check::run(&config.config),
        Cmd::CheckPlugin { plugin } => return wm_host::check::plugin_child(&plugin),
        Cmd::Master { config } => cli::daemon_master(&config.config),
        Cmd::Start { daemon, config } => cli::start(&config.config, daemon),
        Cmd::Stop { graceful, config } => cli::stop(&config.config, graceful),
        Cmd::Restart { daemon, config } => cli::restart(&config.config, daemon),
        Cmd::Reload { graceful, config } => cli::reload(&config.config, graceful),
        Cmd::Status { json, config } => cli::status(&config.config, json),
        Cmd::Connections { json, config } => cli::connections(&config.config, json),
        Cmd::ReopenLogs { config } => cli::reopen_logs(&config.config),
        Cmd::New(args) => wm_host::new::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the cause chain joined.
            let msg = e
                .chain()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(": ");
            eprintln!("wm-host: {msg}");
            ExitCode::FAILURE
        }
    }
}
