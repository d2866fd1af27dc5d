//! Outbound connections (Workerman's AsyncTcpConnection): connect, time out,
//! reconnect, and `pipe` between two connections with back-pressure. Driven
//! by the worker's loop like accepted connections, with the same callbacks.

use std::borrow::Cow;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Interest, Token};
use plugin_api::error_code;

use super::conn::{Conn, State};
use super::core::{Core, Deferred, FIRST_CONN};
use crate::config::Scheme;
use wm_proto::Codec;

/// Where an outbound connection goes, kept for reconnects.
pub struct Outbound {
    pub url: String,
    pub addr: SocketAddr,
    pub scheme: Scheme,
    /// websocket: `Host` and path for the handshake.
    pub ws: Option<WsTarget>,
    pub timeout: Duration,
    /// Set by `reconnect`: start a new attempt at this time once closed.
    pub reconnect_after: Option<Duration>,
}

pub struct WsTarget {
    pub host: String,
    pub path: String,
}

/// Parses `tcp://`, `text://`, `frame://` or `ws://host:port/path`
/// (`websocket://` too): [`plugin_api::url::parse`], shared with the test
/// harness so both take the same URLs; the address is resolved here.
pub fn parse(url: &str, timeout: Duration) -> Result<Outbound, String> {
    let plugin_api::url::Outbound {
        scheme,
        hostport,
        path,
    } = plugin_api::url::parse(url)?;
    let scheme = match scheme {
        "tcp" => Scheme::Tcp,
        "text" => Scheme::Text,
        "frame" => Scheme::Frame,
        "ws" => Scheme::Websocket,
        other => unreachable!("plugin_api::url::parse gave scheme {other:?}"),
    };
    // Resolving a name blocks the worker briefly; addresses do not.
    let addr = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {hostport:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{hostport:?} resolves to nothing"))?;
    let ws = (scheme == Scheme::Websocket).then(|| WsTarget {
        host: hostport.to_string(),
        path: path.to_string(),
    });
    Ok(Outbound {
        url: url.to_string(),
        addr,
        scheme,
        ws,
        timeout,
        reconnect_after: None,
    })
}

impl Core {
    /// Starts a connection; its `on_connect` (or `on_error` + `on_close`)
    /// follows from the loop.
    pub fn connect(&mut self, url: &str, timeout: Duration) -> Result<u64, String> {
        let target = parse(url, timeout)?;
        let entry = self.conns.vacant_entry();
        let slot = entry.key();
        let id = self.next_id(slot);
        let conn = self.open_socket(id, target)?;
        self.conns.insert(conn);
        Ok(id)
    }

    fn open_socket(&mut self, id: u64, target: Outbound) -> Result<Conn, String> {
        let mut sock = TcpStream::connect(target.addr)
            .map_err(|e| format!("connect to {}: {e}", target.url))?;
        let token = Token(super::core::slot(id) + FIRST_CONN);
        self.registry()
            .register(&mut sock, token, Interest::READABLE | Interest::WRITABLE)
            .map_err(|e| format!("register: {e}"))?;
        // A websocket codec comes with a fresh key, on every (re)connect.
        let mut codec = Codec::client(target.scheme);
        codec.set_deflate(self.ws_deflate);
        let mut conn = Conn::new(
            id,
            super::sock::Sock::Tcp(sock),
            codec,
            self.max_send_buffer_size,
        );
        conn.state = State::Connecting;
        conn.remote = Some(target.addr);
        self.connect_deadlines
            .push((Instant::now() + target.timeout, id));
        conn.outbound = Some(Box::new(target));
        Ok(conn)
    }

    /// A writable event on a connecting socket: did it connect?
    pub fn check_connect(&mut self, id: u64) {
        let Some(conn) = self.get(id) else { return };
        if conn.state != State::Connecting {
            return;
        }
        let err = match conn.sock.take_error() {
            Ok(Some(e)) | Err(e) => Some(e.to_string()),
            Ok(None) => match conn.sock.peer_addr() {
                Ok(_) => None,
                // Not yet: a spurious wake-up.
                Err(e) if e.kind() == std::io::ErrorKind::NotConnected => return,
                Err(e) => Some(e.to_string()),
            },
        };
        if let Some(e) = err {
            let url = conn
                .outbound
                .as_ref()
                .map_or("", |o| o.url.as_str())
                .to_string();
            return self.connect_failed(id, format!("connect to {url} failed: {e}"));
        }
        conn.state = State::Open;
        conn.local = conn.sock.local_addr().ok();
        conn.last_active = Instant::now();
        let target = conn.outbound.as_ref().and_then(|o| o.ws.as_ref());
        if let (Some(ws), Codec::Websocket(codec)) = (target, &conn.codec) {
            let req = codec.client_request(&ws.host, &ws.path);
            // Ahead of anything the plugin queued while connecting.
            conn.prepend_output(&req);
        } else {
            self.deferred.push_back(Deferred::Connect(id));
        }
        self.flush(id);
    }

    /// Reports a failed connect: `on_error` (code 1), then `on_close`.
    pub fn connect_failed(&mut self, id: u64, msg: String) {
        tracing::debug!(conn = id, "{msg}");
        self.deferred.push_back(Deferred::Error(
            id,
            error_code::CONNECT_FAILED,
            Cow::Owned(msg),
        ));
        self.destroy(id);
    }

    /// Connections still connecting past their timeout.
    pub fn expire_connects(&mut self, now: Instant) {
        let (due, keep): (Vec<_>, Vec<_>) = self
            .connect_deadlines
            .drain(..)
            .partition(|(t, _)| *t <= now);
        self.connect_deadlines = keep;
        for (_, id) in due {
            if self.get(id).is_some_and(|c| c.state == State::Connecting) {
                let url = self
                    .get(id)
                    .and_then(|c| c.outbound.as_ref().map(|o| o.url.clone()))
                    .unwrap_or_default();
                self.connect_failed(id, format!("connect to {url} timed out"));
            }
        }
    }

    /// `reconnect(conn, delay)`: closes the connection if open, and connects
    /// again to the same place after `delay`, keeping the id.
    pub fn reconnect(&mut self, id: u64, delay: Duration) -> bool {
        let Some(conn) = self.get(id) else {
            return false;
        };
        let Some(out) = conn.outbound.as_mut() else {
            return false;
        };
        out.reconnect_after = Some(delay);
        match conn.state {
            State::Open | State::Connecting => {
                self.close(id, None);
            }
            State::Closing | State::Dead => {}
        }
        true
    }

    /// A new attempt for a connection waiting to reconnect.
    pub fn redial(&mut self, id: u64) {
        let Some(conn) = super::core::lookup(&mut self.conns, id) else {
            return;
        };
        if conn.state != State::Dead {
            return;
        }
        let Some(mut target) = conn.outbound.take() else {
            return;
        };
        if let Some(r) = self.poll_registry.as_ref() {
            let _ = r.deregister(&mut conn.sock);
        }
        target.reconnect_after = None;
        match self.open_socket(id, *target) {
            Ok(fresh) => {
                let slot = super::core::slot(id);
                self.conns[slot] = fresh;
            }
            Err(e) => {
                // Could not even start: report like a failed connect; the
                // slot then closes as an ordinary connection.
                self.deferred.push_back(Deferred::Error(
                    id,
                    error_code::CONNECT_FAILED,
                    Cow::Owned(e),
                ));
                self.closing.push(id);
            }
        }
    }

    /// `pipe(src, dst)`: what arrives on `src` is written to `dst` as it
    /// comes; when `dst` cannot keep up, reading `src` pauses until it drains.
    pub fn pipe(&mut self, src: u64, dst: u64) -> bool {
        if self.get(dst).is_none() {
            return false;
        }
        let Some(s) = self.get(src) else { return false };
        s.pipe_to = Some(dst);
        let pending = std::mem::take(&mut s.inbuf);
        let held = std::mem::take(&mut s.held);
        self.buffered = self.buffered.saturating_sub(held);
        if let Some(d) = self.get(dst) {
            d.pipe_from = Some(src);
        }
        if !pending.is_empty() {
            self.forward(src, dst, &pending);
        }
        true
    }

    /// Writes `bytes` read from `src` to `dst`, pausing `src` when `dst` is full.
    pub fn forward(&mut self, src: u64, dst: u64, bytes: &[u8]) {
        let Some(d) = self.get(dst) else {
            self.close(src, None);
            return;
        };
        if !matches!(d.state, State::Open | State::Connecting) {
            self.close(src, None);
            return;
        }
        match d.write_parts(&[bytes]) {
            Ok(_) => {
                let full = d.pending() >= d.max_send;
                if full {
                    if let Some(s) = self.get(src) {
                        s.paused = true;
                        s.pipe_paused = true;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(conn = dst, "pipe write failed: {e}");
                self.destroy(dst);
                self.close(src, None);
            }
        }
    }

    /// `dst` drained: resume the connection piped into it.
    pub fn pipe_drained(&mut self, dst: u64) {
        let Some(src) = self.get(dst).and_then(|d| d.pipe_from) else {
            return;
        };
        if let Some(s) = self.get(src) {
            if s.pipe_paused {
                s.pipe_paused = false;
                self.pause_recv(src, false);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_for_every_scheme() {
        let t = Duration::from_secs(1);
        assert_eq!(parse("tcp://127.0.0.1:80", t).unwrap().scheme, Scheme::Tcp);
        assert_eq!(
            parse("frame://127.0.0.1:80", t).unwrap().scheme,
            Scheme::Frame
        );
        let ws = parse("ws://127.0.0.1:8080/chat?x=1", t).unwrap();
        let target = ws.ws.unwrap();
        assert_eq!(
            (target.host.as_str(), target.path.as_str()),
            ("127.0.0.1:8080", "/chat?x=1")
        );
        assert!(parse("smtp://127.0.0.1:25", t).is_err());
        assert!(parse("127.0.0.1:25", t).is_err());
    }
}
