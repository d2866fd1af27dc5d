//! `websocket://`: RFC 6455 server side. The handshake is checked here; frames
//! are read by tungstenite's IO-free `WebSocketContext` (fragmentation,
//! control frames, UTF-8, masking, close handshake), fed from the worker's
//! buffers through an in-memory pipe. Outgoing data frames are just a header
//! in front of the payload, so sends go out zero-copy like other protocols.

use std::io::{self, Read, Write};

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::CloseFrame;
use tungstenite::protocol::{Role, WebSocketConfig, WebSocketContext};
use tungstenite::{Error, Message};

/// Bytes tungstenite takes from our buffer at a time, and what an idle
/// connection keeps allocated for it (its default is 128 KiB). Small, so an
/// idle websocket costs under 1 KiB; a larger frame grows it as needed.
const READ_CHUNK: usize = 256;

/// Why a handshake was refused, as an HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    pub reason: &'static str,
}

/// Checks a handshake request and returns the `Sec-WebSocket-Accept` value.
pub fn accept_key<'a>(
    method: &str,
    version: u8,
    header: impl Fn(&str) -> Option<&'a str>,
) -> Result<String, Refusal> {
    let refuse = |status, reason| Err(Refusal { status, reason });
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    if method != "GET" {
        return refuse(400, "websocket handshake must be a GET");
    }
    if version < 1 {
        return refuse(400, "websocket handshake needs HTTP/1.1");
    }
    if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
        return refuse(400, "not a websocket upgrade request");
    }
    if header("sec-websocket-version").map(str::trim) != Some("13") {
        return refuse(426, "unsupported Sec-WebSocket-Version (only 13)");
    }
    match header("sec-websocket-key").map(str::trim) {
        Some(key) if !key.is_empty() => {
            Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
        }
        _ => refuse(400, "missing Sec-WebSocket-Key"),
    }
}

/// The `101 Switching Protocols` answer.
pub fn switching_protocols(accept: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\nServer: wm-host\r\n\r\n"
    )
    .into_bytes()
}

/// The header of an unmasked, final server frame (opcode 1 text, 2 binary).
pub fn frame_header(len: usize, binary: bool) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x80 | if binary { 0x2 } else { 0x1 };
    let n = if len < 126 {
        h[1] = len as u8;
        2
    } else if len <= u16::MAX as usize {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    (h, n)
}

/// An empty ping from the server.
pub const PING: [u8; 2] = [0x89, 0];

/// A close frame with a status code, as the server sends it.
pub fn close_frame(code: u16) -> [u8; 4] {
    let c = code.to_be_bytes();
    [0x88, 2, c[0], c[1]]
}

/// What reading produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Event {
    Message {
        binary: bool,
        data: Vec<u8>,
    },
    /// The close handshake finished (or the peer started it and we answered):
    /// close the socket once the output is written.
    Closed,
    /// The peer broke the protocol: the close frame with `code` is in the
    /// output; close the socket after it.
    Failed {
        code: u16,
        reason: String,
    },
}

/// Per-connection frame reader.
pub struct WsReader {
    ctx: WebSocketContext,
    /// A close frame was sent (in reply or on error): send no other.
    closing: bool,
}

/// tungstenite reads from `input` and writes control replies to `out`.
struct Pipe<'a> {
    input: &'a [u8],
    out: &'a mut Vec<u8>,
}

impl Read for Pipe<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.input.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Ok(n)
    }
}

impl Write for Pipe<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl WsReader {
    /// The reader of a connection we accepted.
    pub fn new(max_message: usize) -> WsReader {
        WsReader::with_role(Role::Server, max_message)
    }

    /// The reader of our own outbound websocket (server frames unmasked).
    pub fn client(max_message: usize) -> WsReader {
        WsReader::with_role(Role::Client, max_message)
    }

    fn with_role(role: Role, max_message: usize) -> WsReader {
        let config = WebSocketConfig::default()
            .read_buffer_size(READ_CHUNK)
            .write_buffer_size(0)
            .max_message_size(Some(max_message))
            .max_frame_size(Some(max_message));
        WsReader {
            ctx: WebSocketContext::new(role, Some(config)),
            closing: false,
        }
    }

    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Consumes all of `input`. Complete messages and the end of the
    /// connection come out as events; pongs and close replies go to `out`.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>, events: &mut Vec<Event>) {
        let mut pipe = Pipe { input, out };
        loop {
            match self.ctx.read(&mut pipe) {
                Ok(Message::Text(t)) => events.push(Event::Message {
                    binary: false,
                    data: t.as_bytes().to_vec(),
                }),
                Ok(Message::Binary(b)) => events.push(Event::Message {
                    binary: true,
                    data: b.to_vec(),
                }),
                // Pings are answered by tungstenite; pongs need nothing.
                Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                Ok(Message::Close(_)) => {
                    // Our close reply is queued; flushing it ends the session.
                    let _ = self.ctx.flush(&mut pipe);
                    self.closing = true;
                    events.push(Event::Closed);
                    return;
                }
                Err(Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(Error::ConnectionClosed | Error::AlreadyClosed) => {
                    self.closing = true;
                    events.push(Event::Closed);
                    return;
                }
                Err(e) => {
                    let code = match &e {
                        Error::Utf8(_) => CloseCode::Invalid,
                        Error::Capacity(_) => CloseCode::Size,
                        _ => CloseCode::Protocol,
                    };
                    let reason = e.to_string();
                    let frame = CloseFrame {
                        code,
                        reason: "".into(),
                    };
                    let _ = self.ctx.close(&mut pipe, Some(frame));
                    self.closing = true;
                    events.push(Event::Failed {
                        code: code.into(),
                        reason,
                    });
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A masked client frame.
    fn client_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
        let mask = [0x12, 0x34, 0x56, 0x78];
        let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
        let len = payload.len();
        if len < 126 {
            v.push(0x80 | len as u8);
        } else if len <= 0xffff {
            v.push(0x80 | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(0x80 | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        v
    }

    fn feed_all(r: &mut WsReader, chunks: &[&[u8]]) -> (Vec<Event>, Vec<u8>) {
        let mut out = Vec::new();
        let mut ev = Vec::new();
        for c in chunks {
            r.feed(c, &mut out, &mut ev);
        }
        (ev, out)
    }

    fn text(s: &str) -> Event {
        Event::Message {
            binary: false,
            data: s.as_bytes().to_vec(),
        }
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        let h = |n: &str| match n {
            "upgrade" => Some("websocket"),
            "connection" => Some("keep-alive, Upgrade"),
            "sec-websocket-version" => Some("13"),
            "sec-websocket-key" => Some("dGhlIHNhbXBsZSBub25jZQ=="),
            _ => None,
        };
        assert_eq!(
            accept_key("GET", 1, h).unwrap(),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        assert_eq!(accept_key("POST", 1, h).unwrap_err().status, 400);
    }

    #[test]
    fn bad_handshakes_get_400_or_426() {
        let base =
            |v: Option<&'static str>, key: Option<&'static str>, up: Option<&'static str>| {
                move |n: &str| match n {
                    "upgrade" => up,
                    "connection" => Some("Upgrade"),
                    "sec-websocket-version" => v,
                    "sec-websocket-key" => key,
                    _ => None,
                }
            };
        let ok = accept_key("GET", 1, base(Some("13"), Some("k"), Some("websocket")));
        assert!(ok.is_ok());
        assert_eq!(
            accept_key("GET", 1, base(Some("8"), Some("k"), Some("websocket")))
                .unwrap_err()
                .status,
            426
        );
        assert_eq!(
            accept_key("GET", 1, base(Some("13"), None, Some("websocket")))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            accept_key("GET", 1, base(Some("13"), Some("k"), None))
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            accept_key("GET", 0, base(Some("13"), Some("k"), Some("websocket")))
                .unwrap_err()
                .status,
            400
        );
    }

    #[test]
    fn text_binary_and_split_input() {
        let mut r = WsReader::new(1 << 20);
        let mut wire = client_frame(true, 1, b"hello");
        wire.extend(client_frame(true, 2, &[0, 1, 2]));
        let chunks: Vec<&[u8]> = wire.chunks(3).collect();
        let (ev, out) = feed_all(&mut r, &chunks);
        assert_eq!(
            ev,
            vec![
                text("hello"),
                Event::Message {
                    binary: true,
                    data: vec![0, 1, 2]
                }
            ]
        );
        assert!(out.is_empty());
    }

    #[test]
    fn fragments_with_interleaved_ping_are_joined_and_ping_answered() {
        let mut r = WsReader::new(1 << 20);
        let mut wire = client_frame(false, 1, b"frag");
        wire.extend(client_frame(true, 9, b"p"));
        wire.extend(client_frame(false, 0, b"men"));
        wire.extend(client_frame(true, 0, b"ted"));
        let (ev, out) = feed_all(&mut r, &[&wire]);
        assert_eq!(ev, vec![text("fragmented")]);
        assert_eq!(out, vec![0x8a, 1, b'p'], "pong with the ping's payload");
    }

    #[test]
    fn close_is_answered_with_the_same_code() {
        let mut r = WsReader::new(1 << 20);
        let (ev, out) = feed_all(&mut r, &[&client_frame(true, 8, &1000u16.to_be_bytes())]);
        assert_eq!(ev, vec![Event::Closed]);
        assert_eq!(out, vec![0x88, 2, 0x03, 0xe8]);
    }

    #[test]
    fn protocol_errors_close_with_proper_codes() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            (client_frame(true, 1, &[0xff, 0xfe]), 1007), // bad UTF-8
            (client_frame(true, 2, &vec![0u8; 2000]), 1009), // over the limit
            (vec![0x81, 0x02, b'h', b'i'], 1002),         // unmasked
            (client_frame(true, 0, b"x"), 1002),          // stray continuation
            (client_frame(false, 9, b"x"), 1002),         // fragmented ping
            (client_frame(true, 3, b"x"), 1002),          // reserved opcode
        ];
        for (wire, code) in cases {
            let mut r = WsReader::new(1000);
            let (ev, out) = feed_all(&mut r, &[&wire]);
            match &ev[..] {
                [Event::Failed { code: c, .. }] => assert_eq!(*c, code, "{wire:?}"),
                other => panic!("{wire:?}: {other:?}"),
            }
            assert_eq!(&out[..4], &close_frame(code), "close frame sent");
        }
    }

    #[test]
    fn server_frame_headers() {
        assert_eq!(
            frame_header(5, false),
            ([0x81, 5, 0, 0, 0, 0, 0, 0, 0, 0], 2)
        );
        let (h, n) = frame_header(300, true);
        assert_eq!(&h[..n], &[0x82, 126, 1, 44]);
        let (h, n) = frame_header(70_000, false);
        assert_eq!(&h[..n], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0x11, 0x70]);
    }
}
