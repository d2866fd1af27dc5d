//! The benchmark's plugin: answers `GET /plaintext` as TechEmpower's plaintext
//! test wants it, every other HTTP request with `Hello, world!`, and sends
//! every other message back unchanged (like `echo-plugin`).
//!
//! It opts in to live handover on reload (it has no state to carry), so the
//! suite's handover scenarios can move its connections to a new worker.

use plugin_api::{export_plugin, ConnId, Context, Plugin, Request};

/// The body both the plugin and `wm-baseline` answer HTTP requests with.
pub const BODY: &[u8] = b"Hello, world!";

/// TechEmpower plaintext: the body, and the one header the host does not add
/// (it adds `Server`, `Date`, `Content-Length` and `Connection`).
/// `wm-baseline` sends the same bytes.
pub const PLAINTEXT_BODY: &[u8] = b"Hello, World!";
pub const PLAINTEXT_HEADERS: &[(&str, &str)] = &[("Content-Type", "text/plain")];

#[derive(Default)]
pub struct Hello;

impl Plugin for Hello {
    fn handover(&self) -> bool {
        true
    }

    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
        ctx.send(conn, data);
    }

    fn on_request(&mut self, ctx: &mut Context<'_>, conn: ConnId, req: &Request<'_>) {
        if req.path() == "/plaintext" {
            ctx.respond(conn, 200, PLAINTEXT_HEADERS, PLAINTEXT_BODY);
        } else {
            ctx.respond(conn, 200, &[("Content-Type", "text/plain")], BODY);
        }
    }
}

export_plugin!(Hello);
