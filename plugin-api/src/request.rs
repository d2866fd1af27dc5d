//! HTTP requests as plugins see them: `http://` requests and websocket
//! handshakes. Borrowed from the host for the length of the callback.

use crate::abi::RawRequest;

/// A request, valid during the callback that receives it.
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
