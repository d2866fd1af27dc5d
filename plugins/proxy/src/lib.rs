//! A TCP proxy: each client gets its own connection to `upstream`, and the
//! two are piped both ways. `pipe` applies back-pressure: a side that cannot
//! keep up pauses reading the other, so nothing piles up in the proxy.
//!
//! ```toml
//! [[worker]]
//! name = "proxy"
//! listen = "tcp://127.0.0.1:8000"
//! plugin = "target/debug/libproxy_plugin.so"
//! [worker.options]
//! upstream = "tcp://127.0.0.1:9000"
//! ```

use plugin_api::{export_plugin, ConnId, Context, Plugin, StartError};

#[derive(Default)]
pub struct Proxy {
    upstream: String,
}

impl Plugin for Proxy {
    fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
        self.upstream = ctx
            .option("upstream")
            .ok_or("option `upstream` is required")?
            .to_string();
        Ok(())
    }

    fn on_connect(&mut self, ctx: &mut Context<'_>, client: ConnId) {
        if ctx.is_outbound(client) {
            return;
        }
        match ctx.connect(&self.upstream) {
            Ok(up) => {
                ctx.pipe(client, up);
                ctx.pipe(up, client);
            }
            Err(e) => {
                ctx.warn(format_args!("cannot reach {}: {e}", self.upstream));
                ctx.close(client);
            }
        }
    }

    fn on_error(&mut self, ctx: &mut Context<'_>, conn: ConnId, code: u32, msg: &str) {
        // A failed upstream closes its client through the pipe.
        ctx.debug(format_args!("connection {conn}: error {code}: {msg}"));
    }
}

export_plugin!(Proxy);
