//! The application protocol a listener speaks, as named in `listen`.

use serde::{Deserialize, Serialize};

/// Application protocols a listener can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Tcp,
    Text,
    Frame,
    Websocket,
    Http,
    /// Framing supplied by the plugin (`Plugin::protocol`).
    Custom,
}

impl Scheme {
    /// The scheme named in a `listen` address (`ws` is short for `websocket`).
    pub fn parse(s: &str) -> Option<Scheme> {
        Some(match s {
            "tcp" => Scheme::Tcp,
            "text" => Scheme::Text,
            "frame" => Scheme::Frame,
            "websocket" | "ws" => Scheme::Websocket,
            "http" => Scheme::Http,
            "custom" => Scheme::Custom,
            _ => return None,
        })
    }

    /// The name as written in `listen` and shown by `status`.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Text => "text",
            Scheme::Frame => "frame",
            Scheme::Websocket => "websocket",
            Scheme::Http => "http",
            Scheme::Custom => "custom",
        }
    }
}
