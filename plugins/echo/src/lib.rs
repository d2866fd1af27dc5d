//! Sends every message back unchanged, on any protocol. On a websocket it
//! comes back in the kind it came in: `send` answers a binary message with
//! a binary frame and a text message (valid UTF-8) with a text frame (see
//! `Context::send`), so this is an echo a strict client accepts.

use plugin_api::{export_plugin, ConnId, Context, Plugin};

#[derive(Default)]
pub struct Echo;

impl Plugin for Echo {
    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
        ctx.send(conn, data);
    }
}

export_plugin!(Echo);
