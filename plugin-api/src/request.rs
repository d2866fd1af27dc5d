//! HTTP requests as plugins see them: `http://` requests and websocket
//! handshakes. Borrowed from the host for the length of the callback.

use crate::abi::RawRequest;

/// A request, valid during the callback that receives it: copy what you
/// need to keep. Passed to [`crate::Plugin::on_request`] and
/// [`crate::Plugin::on_websocket_connect`].
///
/// ```
/// use plugin_api::{ConnId, Context, Plugin, Request};
///
/// struct Api;
///
/// impl Plugin for Api {
///     fn on_request(&mut self, ctx: &mut Context<'_>, conn: ConnId, req: &Request<'_>) {
///         let reply = match (req.method(), req.path()) {
///             ("GET", "/hello") => format!("hello {}\n", req.query_param("name").unwrap_or("you")),
///             ("POST", "/echo") => String::from_utf8_lossy(req.body()).into_owned(),
///             _ => {
///                 ctx.respond(conn, 404, &[], b"not found\n");
///                 return;
///             }
///         };
///         let json = req.header("accept").is_some_and(|a| a.contains("json"));
///         let kind = if json { "application/json" } else { "text/plain" };
///         ctx.respond(conn, 200, &[("Content-Type", kind)], reply.as_bytes());
///     }
/// }
/// ```
#[derive(Clone, Copy)]
pub struct Request<'a> {
    raw: &'a RawRequest<'a>,
}

impl<'a> Request<'a> {
    #[doc(hidden)]
    pub fn from_raw(raw: &'a RawRequest<'a>) -> Self {
        Request { raw }
    }

    /// `GET`, `POST`, …
    pub fn method(&self) -> &'a str {
        self.raw.method.as_str()
    }

    /// The path, still percent-encoded, without the query.
    pub fn path(&self) -> &'a str {
        self.raw.path.as_str()
    }

    /// The query string without `?`; empty when absent.
    pub fn query(&self) -> &'a str {
        self.raw.query.as_str()
    }

    /// A query parameter, not percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<&'a str> {
        self.query()
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub fn version(&self) -> u8 {
        self.raw.version
    }

    /// The first header of that name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// All headers in the order received.
    pub fn headers(&self) -> impl Iterator<Item = (&'a str, &'a str)> {
        self.raw
            .headers
            .as_slice()
            .iter()
            .map(|t| (t.0.as_str(), t.1.as_str()))
    }

    /// The whole body, chunked bodies already joined (the host waits for all
    /// of it, up to the listener's `max_package_size`); empty for a websocket
    /// handshake.
    pub fn body(&self) -> &'a [u8] {
        self.raw.body.as_slice()
    }
}

impl std::fmt::Debug for Request<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("method", &self.method())
            .field("path", &self.path())
            .field("query", &self.query())
            .finish_non_exhaustive()
    }
}
