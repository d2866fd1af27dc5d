//! A plugin for the end-to-end tests: each text message is a command, so a
//! test can make a worker panic, report who it is, use timers, and so on.
//!
//! | message          | reply                                          |
//! |------------------|------------------------------------------------|
//! | `whoami`         | `name=<group> id=<id> pid=<pid> count=<count>` |
//! | `build`          | the build tag baked in at compile time         |
//! | `option <key>`   | the `[worker.options]` value, or `<none>`      |
//! | `addr`           | `remote=<addr> local=<addr>`                   |
//! | `timer <ms>`     | `timer fired` after that long (one-shot)       |
//! | `close`          | `bye`, then the server closes                  |
//! | `panic`          | nothing: the callback panics                   |
//! | anything else    | the message itself                             |
//!
//! Options: `fail_start = "error" | "panic"` makes `on_worker_start` fail.

use std::collections::HashMap;
use std::time::Duration;

use plugin_api::{export_plugin, ConnId, Context, Plugin, StartError, TimerId};

/// Set `WM_TEST_BUILD` when building to tell two builds apart.
const BUILD: &str = match option_env!("WM_TEST_BUILD") {
    Some(b) => b,
    None => "default",
};

#[derive(Default)]
pub struct TestPlugin {
    timers: HashMap<TimerId, ConnId>,
}

impl Plugin for TestPlugin {
    fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
        match ctx.option("fail_start") {
            Some("error") => Err("fail_start is set".into()),
            Some("panic") => panic!("fail_start is set to panic"),
            _ => {
                ctx.info(format_args!("test plugin build {BUILD} started"));
                Ok(())
            }
        }
    }

    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
        let text = String::from_utf8_lossy(data);
        let (cmd, arg) = text.split_once(' ').unwrap_or((&text, ""));
        match cmd {
            "whoami" => {
                let w = ctx.worker();
                let reply = format!(
                    "name={} id={} pid={} count={}",
                    w.name, w.id, w.pid, w.count
                );
                ctx.send(conn, reply);
            }
            "build" => {
                ctx.send(conn, BUILD);
            }
            "option" => {
                let v = ctx.option(arg).unwrap_or("<none>");
                ctx.send(conn, v);
            }
            "addr" => {
                let show =
                    |a: Option<std::net::SocketAddr>| a.map_or("?".to_string(), |a| a.to_string());
                let reply = format!(
                    "remote={} local={}",
                    show(ctx.remote_addr(conn)),
                    show(ctx.local_addr(conn))
                );
                ctx.send(conn, reply);
            }
            "timer" => {
                let ms = arg.parse().unwrap_or(10);
                let t = ctx.add_timer(Duration::from_millis(ms), false);
                self.timers.insert(t, conn);
            }
            "close" => {
                ctx.close_with(conn, "bye");
            }
            "panic" => panic!("panic requested by the client"),
            _ => {
                ctx.send(conn, data);
            }
        }
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, timer: TimerId) {
        if let Some(conn) = self.timers.remove(&timer) {
            ctx.send(conn, "timer fired");
        }
    }

    fn on_close(&mut self, _ctx: &mut Context<'_>, conn: ConnId) {
        self.timers.retain(|_, c| *c != conn);
    }
}

export_plugin!(TestPlugin);
