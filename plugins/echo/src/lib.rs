//! Sends every message back unchanged, on any protocol.

use plugin_api::{export_plugin, ConnId, Context, Plugin};

#[derive(Default)]
pub struct Echo;

impl Plugin for Echo {
    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
        ctx.send(conn, data);
    }
}

export_plugin!(Echo);
