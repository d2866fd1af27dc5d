//! The benchmark's plugin: answers every HTTP request with `Hello, world!`
//! and sends every other message back unchanged (like `echo-plugin`).

use plugin_api::{export_plugin, ConnId, Context, Plugin, Request};

/// The body both the plugin and `wm-baseline` answer HTTP requests with.
pub const BODY: &[u8] = b"Hello, world!";

#[derive(Default)]
pub struct Hello;

impl Plugin for Hello {
    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
        ctx.send(conn, data);
    }

    fn on_request(&mut self, ctx: &mut Context<'_>, conn: ConnId, _req: &Request<'_>) {
        ctx.respond(conn, 200, &[("Content-Type", "text/plain")], BODY);
    }
}

export_plugin!(Hello);
