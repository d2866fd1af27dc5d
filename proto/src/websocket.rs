//! `websocket://`: RFC 6455. The handshake is checked here, and frames are
//! read by a pure state machine over the worker's buffers: tungstenite parses
//! each header, payloads are unmasked in place, so a message reaches the
//! plugin with no copy and no allocation. Outgoing data frames are a header in
//! front of the payload, so sends go out zero-copy like other protocols.

use std::io;

use tungstenite::protocol::frame::coding::CloseCode;
use tungstenite::protocol::frame::FrameHeader;

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

/// Which side of the connection we are: the server expects masked frames
/// and sends unmasked ones, a client the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Server,
    Client,
}

/// What one decoding step found at the start of the input.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole message, unmasked in place at `input[start..end]`.
    Message {
        binary: bool,
        start: usize,
        end: usize,
        consumed: usize,
    },
    /// A final fragment completed a message, joined from its fragments.
    Assembled {
        binary: bool,
        data: Vec<u8>,
        consumed: usize,
    },
    /// A frame with nothing for the plugin: a fragment kept, a ping
    /// answered, a pong.
    Skipped { consumed: usize },
    /// The peer closed and our reply is in the output: close the socket
    /// once it is written.
    Closed { consumed: usize },
    /// The peer broke the protocol: the close frame with `code` is in the
    /// output; close the socket after it.
    Failed { code: u16, reason: String },
}

/// Per-connection frame reader: a pure state machine over the worker's
/// buffers. Frames are unmasked in place, so an unfragmented message reaches
/// the plugin without a copy or an allocation; only a fragmented message is
/// gathered into a buffer of its own.
pub struct WsReader {
    role: Role,
    max: usize,
    /// A fragmented message being joined: whether binary, bytes so far.
    partial: Option<(bool, Vec<u8>)>,
    /// A close frame was sent (in reply or on error): read and send no more.
    closing: bool,
}

/// Opcodes (RFC 6455 §5.2).
const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

impl WsReader {
    /// The reader of a connection we accepted.
    pub fn new(max_message: usize) -> WsReader {
        WsReader::with_role(Role::Server, max_message)
    }

    /// The reader of our own outbound websocket (server frames unmasked).
    pub fn client(max_message: usize) -> WsReader {
        WsReader::with_role(Role::Client, max_message)
    }

    fn with_role(role: Role, max: usize) -> WsReader {
        WsReader {
            role,
            max,
            partial: None,
            closing: false,
        }
    }

    pub fn closing(&self) -> bool {
        self.closing
    }

    /// Decodes the frame at the start of `input`, unmasking its payload in
    /// place. Control replies (pong, close) are appended to `out`.
    /// `None` means the frame is not complete yet; nothing was consumed.
    pub fn decode(&mut self, input: &mut [u8], out: &mut Vec<u8>) -> Option<Decoded> {
        if self.closing {
            // Nothing after our close frame counts; drop it.
            return (!input.is_empty()).then_some(Decoded::Skipped {
                consumed: input.len(),
            });
        }
        let mut cursor = io::Cursor::new(&*input);
        let (header, len) = match FrameHeader::parse(&mut cursor) {
            Ok(Some(h)) => h,
            Ok(None) => return None,
            Err(e) => return Some(self.fail(out, 1002, e.to_string())),
        };
        let head = cursor.position() as usize;
        let opcode = u8::from(header.opcode);
        let control = opcode & 0x8 != 0;
        if header.rsv1 || header.rsv2 || header.rsv3 {
            return Some(self.fail(out, 1002, "reserved bits set without an extension".into()));
        }
        match (self.role, header.mask) {
            (Role::Server, None) => {
                return Some(self.fail(out, 1002, "client frame is not masked".into()))
            }
            (Role::Client, Some(_)) => {
                return Some(self.fail(out, 1002, "server frame is masked".into()))
            }
            _ => {}
        }
        if control && (!header.is_final || len > 125) {
            return Some(self.fail(
                out,
                1002,
                "control frame fragmented or over 125 bytes".into(),
            ));
        }
        let so_far = self.partial.as_ref().map_or(0, |(_, p)| p.len() as u64);
        if !control && len.saturating_add(so_far) > self.max as u64 {
            let size = len.saturating_add(so_far);
            let reason = format!(
                "message of {size} bytes is over max_package_size ({})",
                self.max
            );
            return Some(self.fail(out, 1009, reason));
        }
        let end = head + len as usize;
        if input.len() < end {
            return None;
        }
        let payload = &mut input[head..end];
        if let Some(mask) = header.mask {
            apply_mask(payload, mask);
        }
        let consumed = end;
        match opcode {
            OP_TEXT | OP_BINARY => {
                let binary = opcode == OP_BINARY;
                if self.partial.is_some() {
                    return Some(self.fail(
                        out,
                        1002,
                        "new message before the last one ended".into(),
                    ));
                }
                if !header.is_final {
                    self.partial = Some((binary, payload.to_vec()));
                    return Some(Decoded::Skipped { consumed });
                }
                if !binary && std::str::from_utf8(payload).is_err() {
                    return Some(self.fail(out, 1007, "text message is not valid UTF-8".into()));
                }
                Some(Decoded::Message {
                    binary,
                    start: head,
                    end,
                    consumed,
                })
            }
            OP_CONTINUATION => {
                let Some((binary, mut data)) = self.partial.take() else {
                    return Some(self.fail(
                        out,
                        1002,
                        "continuation frame without a message".into(),
                    ));
                };
                data.extend_from_slice(payload);
                if !header.is_final {
                    self.partial = Some((binary, data));
                    return Some(Decoded::Skipped { consumed });
                }
                if !binary && std::str::from_utf8(&data).is_err() {
                    return Some(self.fail(out, 1007, "text message is not valid UTF-8".into()));
                }
                Some(Decoded::Assembled {
                    binary,
                    data,
                    consumed,
                })
            }
            OP_PING => {
                write_frame(out, OP_PONG, payload, self.mask());
                Some(Decoded::Skipped { consumed })
            }
            OP_PONG => Some(Decoded::Skipped { consumed }),
            OP_CLOSE => Some(self.peer_closed(payload, out, consumed)),
            // FrameHeader::parse refuses the reserved opcodes.
            _ => Some(self.fail(out, 1002, format!("unexpected opcode {opcode}"))),
        }
    }

    /// Answers the peer's close frame, echoing its status code.
    fn peer_closed(&mut self, payload: &[u8], out: &mut Vec<u8>, consumed: usize) -> Decoded {
        match payload {
            [] => {
                self.closing = true;
                write_frame(out, OP_CLOSE, &[], self.mask());
                Decoded::Closed { consumed }
            }
            [_] => self.fail(out, 1002, "close frame with a 1-byte payload".into()),
            [a, b, reason @ ..] => {
                let code = u16::from_be_bytes([*a, *b]);
                if !CloseCode::from(code).is_allowed() {
                    return self.fail(out, 1002, format!("close code {code} is not allowed"));
                }
                if std::str::from_utf8(reason).is_err() {
                    return self.fail(out, 1007, "close reason is not valid UTF-8".into());
                }
                self.closing = true;
                write_frame(out, OP_CLOSE, &code.to_be_bytes(), self.mask());
                Decoded::Closed { consumed }
            }
        }
    }

    fn fail(&mut self, out: &mut Vec<u8>, code: u16, reason: String) -> Decoded {
        self.partial = None;
        if !self.closing {
            self.closing = true;
            write_frame(out, OP_CLOSE, &code.to_be_bytes(), self.mask());
        }
        Decoded::Failed { code, reason }
    }

    /// A fresh mask for frames we send as a client; none as a server.
    fn mask(&self) -> Option<[u8; 4]> {
        (self.role == Role::Client).then(random_mask)
    }
}

/// A key for one client frame: RFC 6455 wants it unpredictable.
pub fn random_mask() -> [u8; 4] {
    let mut mask = [0u8; 4];
    if getrandom::fill(&mut mask).is_err() {
        // No entropy source at all is not a state to keep running in quietly.
        tracing::error!("getrandom failed; using a time-derived mask");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        mask = (t.subsec_nanos() ^ 0x9e37_79b9).to_be_bytes();
    }
    mask
}

/// Appends one final frame; with a mask the payload is masked as it is copied.
pub fn write_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let (mut h, n) = frame_header(payload.len(), false);
    h[0] = 0x80 | opcode;
    out.extend_from_slice(&h[..n]);
    match mask {
        None => out.extend_from_slice(payload),
        Some(mask) => {
            let len_byte = out.len() - n + 1;
            out[len_byte] |= 0x80;
            out.extend_from_slice(&mask);
            let at = out.len();
            out.extend_from_slice(payload);
            apply_mask(&mut out[at..], mask);
        }
    }
}

/// XORs `data` with the 4-byte `mask`, eight bytes at a time.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4]) {
    let m8 = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for c in &mut chunks {
        let v = u64::from_ne_bytes((&*c).try_into().expect("8-byte chunk")) ^ m8;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i % 4];
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

    /// What the worker would do with each step.
    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        Msg(bool, Vec<u8>),
        Closed,
        Failed(u16),
    }

    /// Feeds `chunks` as reads would arrive, keeping unconsumed bytes.
    fn feed_all(r: &mut WsReader, chunks: &[&[u8]]) -> (Vec<Ev>, Vec<u8>) {
        let (mut buf, mut out, mut ev) = (Vec::new(), Vec::new(), Vec::new());
        for c in chunks {
            buf.extend_from_slice(c);
            let mut pos = 0;
            while let Some(d) = r.decode(&mut buf[pos..], &mut out) {
                match d {
                    Decoded::Message {
                        binary,
                        start,
                        end,
                        consumed,
                    } => {
                        ev.push(Ev::Msg(binary, buf[pos + start..pos + end].to_vec()));
                        pos += consumed;
                    }
                    Decoded::Assembled {
                        binary,
                        data,
                        consumed,
                    } => {
                        ev.push(Ev::Msg(binary, data));
                        pos += consumed;
                    }
                    Decoded::Skipped { consumed } => pos += consumed,
                    Decoded::Closed { consumed } => {
                        ev.push(Ev::Closed);
                        pos += consumed;
                    }
                    Decoded::Failed { code, .. } => {
                        ev.push(Ev::Failed(code));
                        pos = buf.len();
                    }
                }
            }
            buf.drain(..pos);
        }
        (ev, out)
    }

    fn text(s: &str) -> Ev {
        Ev::Msg(false, s.as_bytes().to_vec())
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
        assert_eq!(ev, vec![text("hello"), Ev::Msg(true, vec![0, 1, 2])]);
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
        assert_eq!(ev, vec![Ev::Closed]);
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
                [Ev::Failed(c)] => assert_eq!(*c, code, "{wire:?}"),
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

    #[test]
    fn every_split_point_gives_the_same_messages() {
        let mut wire = client_frame(true, 1, "héllo wörld".as_bytes());
        wire.extend(client_frame(true, 2, &[7u8; 300]));
        wire.extend(client_frame(false, 1, b"a"));
        wire.extend(client_frame(true, 0, b"b"));
        let want = vec![
            text("héllo wörld"),
            Ev::Msg(true, vec![7u8; 300]),
            text("ab"),
        ];
        for cut in 0..=wire.len() {
            let mut r = WsReader::new(1 << 20);
            let (ev, out) = feed_all(&mut r, &[&wire[..cut], &wire[cut..]]);
            assert_eq!(ev, want, "split at {cut}");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn close_without_code_or_with_a_bad_one() {
        let mut r = WsReader::new(100);
        let (ev, out) = feed_all(&mut r, &[&client_frame(true, 8, b"")]);
        assert_eq!((ev, out), (vec![Ev::Closed], vec![0x88, 0]));
        // 1005 may not be sent on the wire; a 1-byte payload is malformed.
        for payload in [&1005u16.to_be_bytes()[..], &[3]] {
            let mut r = WsReader::new(100);
            let (ev, out) = feed_all(&mut r, &[&client_frame(true, 8, payload)]);
            assert_eq!(ev, vec![Ev::Failed(1002)]);
            assert_eq!(out, close_frame(1002));
        }
        let mut r = WsReader::new(100);
        let mut bad_reason = 1000u16.to_be_bytes().to_vec();
        bad_reason.push(0xff);
        let (ev, _) = feed_all(&mut r, &[&client_frame(true, 8, &bad_reason)]);
        assert_eq!(ev, vec![Ev::Failed(1007)]);
    }

    #[test]
    fn fragment_rules() {
        let cases: Vec<(Vec<u8>, u16)> = vec![
            // A new message while one is still open.
            (
                [client_frame(false, 1, b"a"), client_frame(true, 1, b"b")].concat(),
                1002,
            ),
            // The pieces together are over the limit, each alone is not.
            (
                [
                    client_frame(false, 2, &[0; 60]),
                    client_frame(true, 0, &[0; 60]),
                ]
                .concat(),
                1009,
            ),
            // A UTF-8 sequence may span fragments, but must end whole.
            (
                [
                    client_frame(false, 1, &[0xc3]),
                    client_frame(true, 0, &[0x28]),
                ]
                .concat(),
                1007,
            ),
            // Control frames carry at most 125 bytes.
            (client_frame(true, 9, &[0; 126]), 1002),
        ];
        for (wire, code) in cases {
            let mut r = WsReader::new(100);
            let (ev, _) = feed_all(&mut r, &[&wire]);
            assert_eq!(ev, vec![Ev::Failed(code)], "{wire:?}");
        }
        let mut r = WsReader::new(100);
        let wire = [
            client_frame(false, 1, &[0xc3]),
            client_frame(true, 0, &[0xa9]),
        ]
        .concat();
        assert_eq!(feed_all(&mut r, &[&wire]).0, vec![text("é")]);
    }

    #[test]
    fn nothing_is_read_after_a_close() {
        let mut r = WsReader::new(100);
        let wire = [client_frame(true, 8, b""), client_frame(true, 1, b"late")].concat();
        let (ev, _) = feed_all(&mut r, &[&wire]);
        assert_eq!(ev, vec![Ev::Closed]);
        assert!(r.closing());
    }

    #[test]
    fn client_role_wants_unmasked_frames_and_masks_its_replies() {
        let mut r = WsReader::client(100);
        let (ev, out) = feed_all(&mut r, &[&[0x81, 2, b'h', b'i', 0x89, 1, b'p']]);
        assert_eq!(ev, vec![text("hi")]);
        assert_eq!(out.len(), 2 + 4 + 1, "masked pong");
        assert_eq!((out[0], out[1]), (0x8a, 0x81));
        assert_eq!(out[6] ^ out[2], b'p');
        let mut r = WsReader::client(100);
        let (ev, _) = feed_all(&mut r, &[&client_frame(true, 1, b"hi")]);
        assert_eq!(ev, vec![Ev::Failed(1002)]);
    }

    #[test]
    fn mask_matches_the_bytewise_definition() {
        let mask = [0xde, 0xad, 0xbe, 0xef];
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mut fast = data.clone();
            apply_mask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow, "length {len}");
        }
    }
}
