//! `websocket://`: RFC 6455, both sides, as one sans-IO codec. [`WsCodec`]
//! reads the handshake (the upgrade request as a server, the 101 as a
//! client), then frames: tungstenite parses each header and payloads are
//! unmasked in place, so a message reaches the plugin with no copy and no
//! allocation. Outgoing server frames are a header in front of the payload
//! (sent zero-copy); client frames are masked, so their payload is copied.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use tungstenite::protocol::frame::coding::CloseCode;

use crate::deflate::{self, Deflate, InflateError, Params};
use crate::{http, DecodeCx, Error, Kind, Step, Wire};

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
    switching_protocols_with(accept, None)
}

/// The `101 Switching Protocols` answer, with the extensions agreed.
pub fn switching_protocols_with(accept: &str, extensions: Option<&str>) -> Vec<u8> {
    let ext = match extensions {
        Some(e) => format!("Sec-WebSocket-Extensions: {e}\r\n"),
        None => String::new(),
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n{ext}Server: wm-host\r\n\r\n"
    )
    .into_bytes()
}

/// The HTTP answer refusing a handshake with `status`.
pub fn refusal(status: u16, out: &mut Vec<u8>) {
    let mut resp = http::error_response(status);
    if status == 426 {
        resp.headers
            .push(("Sec-WebSocket-Version".into(), "13".into()));
    }
    http::encode_response(&resp, false, false, out);
}

/// The header of an unmasked, final server frame (opcode 1 text, 2 binary).
#[inline]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Server,
    Client,
}

/// Opcodes (RFC 6455 §5.2).
const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xa;

/// RSV1: a compressed message (permessage-deflate), on its first frame.
const RSV1: u8 = 0x40;

/// A client's answer longer than this without its end is refused.
const MAX_ANSWER: usize = 16 * 1024;

/// One websocket connection, either side: handshake, then frames.
#[derive(Serialize, Deserialize)]
pub struct WsCodec {
    role: Role,
    stage: Stage,
    /// permessage-deflate, once agreed. Here rather than in [`Open`]: each
    /// outgoing message asks, and a field is cheaper to test than a variant.
    deflate: Option<Box<Deflate>>,
}

// A plain tag byte: the frame path tests for `Open` once per frame, and
// a niche-encoded discriminant cost several instructions more.
#[derive(Serialize, Deserialize)]
#[repr(u8)]
enum Stage {
    /// Server: waiting for the upgrade request; `deflate`: permessage-deflate
    /// is agreed to when the client offers it.
    Request { deflate: bool },
    /// Server: the request was valid and the application decides. Boxed:
    /// it lasts one callback, and keeps the codec small.
    Upgrading(Box<Upgrading>),
    /// Client: our request is out (see [`WsCodec::client_request`]);
    /// waiting for the 101. Holds our `Sec-WebSocket-Key`; `deflate`: the
    /// request offers permessage-deflate.
    Answer { deflate: bool, key: String },
    /// Frames.
    Open(Open),
}

#[derive(Serialize, Deserialize)]
struct Upgrading {
    /// The `Sec-WebSocket-Accept` value for the 101.
    accept: String,
    /// The permessage-deflate parameters agreed, with our answer's
    /// `Sec-WebSocket-Extensions` value, if any.
    deflate: Option<(Params, String)>,
}

#[derive(Default, Serialize, Deserialize)]
struct Open {
    /// A fragmented message being joined.
    partial: Option<Box<Partial>>,
    /// The UTF-8 check of the text message being read, across its frames
    /// and the reads of each frame, so a bad byte fails it on arrival.
    utf8: Utf8,
    /// Bytes of the payload of the (incomplete) frame at the start of the
    /// input that are unmasked in place and checked already.
    ahead: u32,
    /// A close frame was sent (in reply or on error): read no more.
    closing: bool,
}

/// A message whose first frames came.
#[derive(Serialize, Deserialize)]
struct Partial {
    kind: Kind,
    /// RSV1 was set on its first frame: `data` is what it inflated to.
    compressed: bool,
    /// Bytes so far.
    data: Vec<u8>,
}

impl WsCodec {
    /// A connection we accepted: waits for the upgrade request.
    pub fn server() -> WsCodec {
        WsCodec {
            role: Role::Server,
            stage: Stage::Request { deflate: false },
            deflate: None,
        }
    }

    /// Our outbound connection, with a fresh key: send
    /// [`client_request`](Self::client_request) first.
    pub fn client() -> WsCodec {
        WsCodec {
            role: Role::Client,
            stage: Stage::Answer {
                key: tungstenite::handshake::client::generate_key(),
                deflate: false,
            },
            deflate: None,
        }
    }

    /// Before the handshake: agree to permessage-deflate when the client
    /// offers it (server), or offer it (client; before `client_request`).
    pub fn set_deflate(&mut self, on: bool) {
        match &mut self.stage {
            Stage::Request { deflate } | Stage::Answer { deflate, .. } => *deflate = on,
            _ => {}
        }
    }

    /// A codec past its handshake (for tests and benchmarks of frames).
    pub fn open(role: Role) -> WsCodec {
        WsCodec {
            role,
            stage: Stage::Open(Open::default()),
            deflate: None,
        }
    }

    /// [`open`](Self::open), with permessage-deflate agreed on `params`.
    pub fn open_deflate(role: Role, params: Params) -> WsCodec {
        WsCodec {
            role,
            stage: Stage::Open(Open::default()),
            deflate: Some(Box::new(Deflate::new(params))),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// Past the handshake: the application knows the connection.
    pub fn is_open(&self) -> bool {
        matches!(self.stage, Stage::Open(_))
    }

    /// Whether the application may send: a server only once open; a client
    /// right behind its request.
    pub fn sendable(&self) -> bool {
        self.role == Role::Client || self.is_open()
    }

    /// A close frame was sent: nothing more is read.
    pub fn closing(&self) -> bool {
        matches!(&self.stage, Stage::Open(o) if o.closing)
    }

    /// The permessage-deflate parameters agreed, if any.
    pub fn deflate(&self) -> Option<Params> {
        self.deflate.as_ref().map(|d| d.params)
    }

    /// Whether a copy made through serde carries on where this one is: not
    /// while it holds the peer's compression context (permessage-deflate
    /// with the peer's context takeover, or a compressed message half
    /// read), which is not serialized.
    pub fn movable(&self) -> bool {
        match &self.stage {
            Stage::Open(o) => {
                !o.closing && !self.deflate.as_ref().is_some_and(|d| d.holds_context())
            }
            _ => true,
        }
    }

    /// Bytes of a fragmented message joined so far (0 between messages).
    pub fn partial_len(&self) -> usize {
        match &self.stage {
            Stage::Open(Open {
                partial: Some(p), ..
            }) => p.data.len(),
            _ => 0,
        }
    }

    fn open_and_not_closing(&self) -> bool {
        matches!(&self.stage, Stage::Open(o) if !o.closing)
    }

    /// The close frame a server sends when it closes an open connection
    /// itself (1000: normal); none once a close frame went out.
    pub fn goodbye(&self) -> Option<[u8; 4]> {
        (self.role == Role::Server && self.open_and_not_closing()).then(|| close_frame(1000))
    }

    /// Like [`goodbye`](Self::goodbye), for a server going away (a worker
    /// replaced by a reload): 1001 "going away", so the client knows to
    /// reconnect.
    pub fn going_away(&self) -> Option<[u8; 14]> {
        (self.role == Role::Server && self.open_and_not_closing()).then(|| {
            let mut f = [0u8; 14];
            f[..4].copy_from_slice(&[0x88, 12, 0x03, 0xe9]);
            f[4..].copy_from_slice(b"going away");
            f
        })
    }

    /// The client's handshake request, with this codec's key (and our
    /// permessage-deflate offer when [`set_deflate`](Self::set_deflate)).
    pub fn client_request(&self, host: &str, path: &str) -> Vec<u8> {
        let (key, deflate) = match &self.stage {
            Stage::Answer { key, deflate } => (key.as_str(), *deflate),
            _ => ("", false),
        };
        let ext = if deflate {
            format!("Sec-WebSocket-Extensions: {}\r\n", deflate::CLIENT_OFFER)
        } else {
            String::new()
        };
        format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
        )
        .into_bytes()
    }

    /// After [`Step::Upgrade`]: the application took the connection. The
    /// 101 goes into `out`, and frames follow.
    pub fn accept(&mut self, out: &mut Vec<u8>) {
        if let Stage::Upgrading(u) = &mut self.stage {
            let deflate = u.deflate.take();
            let ext = deflate.as_ref().map(|d| d.1.as_str());
            out.extend_from_slice(&switching_protocols_with(&u.accept, ext));
            self.deflate = deflate.map(|d| Box::new(Deflate::new(d.0)));
            self.stage = Stage::Open(Open::default());
        }
    }

    /// After [`Step::Upgrade`]: the application refused with `status`; the
    /// answer goes into `out`. Close the connection after it.
    pub fn refuse(&mut self, status: u16, out: &mut Vec<u8>) {
        self.stage = Stage::Request { deflate: false };
        refusal(status, out);
    }

    /// Decodes what the start of `input` holds: the handshake, or a frame
    /// whose payload is unmasked in place. Control replies (pong, close, a
    /// refusal) go to `cx.replies`. A frame not all there yet may have the
    /// part that is unmasked in place already (a text payload is checked
    /// as it arrives): pass the bytes back as they are left.
    // Inlined into the worker's decode loop: once per frame.
    #[inline]
    pub fn decode<'a>(
        &mut self,
        input: &'a mut [u8],
        scratch: &'a mut http::Scratch<'a>,
        cx: &mut DecodeCx<'_>,
    ) -> Result<Step<'a>, Error> {
        match &self.stage {
            Stage::Request { .. } => self.upgrade_request(input, scratch, cx.replies),
            Stage::Answer { .. } => self.server_answer(input),
            // Only the application's verdict moves this on.
            Stage::Upgrading(_) => Ok(Step::NeedMore),
            Stage::Open(_) => self.frame(input, cx.max, cx.replies),
        }
    }

    /// Server: the upgrade request, checked.
    // Once per connection: kept out of the frame path.
    #[inline(never)]
    fn upgrade_request<'a>(
        &mut self,
        input: &'a [u8],
        scratch: &'a mut http::Scratch<'a>,
        out: &mut Vec<u8>,
    ) -> Result<Step<'a>, Error> {
        let limits = http::Limits::new(0);
        let refuse = |status: u16, reason: Cow<'static, str>, out: &mut Vec<u8>| {
            refusal(status, out);
            Err(Error::Refused { status, reason })
        };
        let offered = matches!(self.stage, Stage::Request { deflate: true });
        match http::HttpDecoder::new().decode(input, &limits, scratch) {
            Ok(Some(http::Event::Request { request, consumed })) => {
                match accept_key(request.method, request.version, |h| request.header(h)) {
                    Ok(accept) => {
                        let deflate = if offered {
                            let values = (request.headers.iter())
                                .filter(|f| f.0.as_str().eq_ignore_ascii_case(EXTENSIONS))
                                .map(|f| f.1.as_str());
                            deflate::negotiate(values)
                        } else {
                            None
                        };
                        self.stage = Stage::Upgrading(Box::new(Upgrading { accept, deflate }));
                        Ok(Step::Upgrade { request, consumed })
                    }
                    Err(r) => refuse(r.status, r.reason.into(), out),
                }
            }
            Ok(Some(http::Event::Continue)) | Ok(None) => Ok(Step::NeedMore),
            Err(e) => refuse(e.status(), e.to_string().into(), out),
        }
    }

    /// Client: the server's answer to our request.
    #[inline(never)]
    fn server_answer<'a>(&mut self, input: &'a [u8]) -> Result<Step<'a>, Error> {
        let Stage::Answer { key, deflate } = &self.stage else {
            return Ok(Step::NeedMore);
        };
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut headers);
        let consumed = match resp.parse(input) {
            // The same limit for an answer that came whole as for one in
            // pieces, so the outcome never depends on how it was cut.
            Ok(httparse::Status::Complete(n)) if n <= MAX_ANSWER => n,
            Ok(httparse::Status::Partial) if input.len() < MAX_ANSWER => return Ok(Step::NeedMore),
            _ => return Err(Error::Rejected("bad websocket handshake answer".into())),
        };
        let accept = resp
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-accept"))
            .map(|h| h.value);
        let code = resp.code.unwrap_or(0);
        let expected = tungstenite::handshake::derive_accept_key(key.as_bytes());
        if code != 101 || accept != Some(expected.as_bytes()) {
            return Err(Error::Rejected(format!(
                "websocket handshake refused (HTTP {code})"
            )));
        }
        // A value that is not UTF-8 reads as a malformed extension.
        let extensions = (resp.headers.iter())
            .filter(|h| h.name.eq_ignore_ascii_case(EXTENSIONS))
            .map(|h| std::str::from_utf8(h.value).unwrap_or("\0"));
        let params = if *deflate {
            deflate::accepted(extensions).map_err(Error::Rejected)?
        } else if extensions.into_iter().any(|v| !v.trim().is_empty()) {
            return Err(Error::Rejected(
                "the server answered with an extension we did not offer".into(),
            ));
        } else {
            None
        };
        self.deflate = params.map(|p| Box::new(Deflate::new(p)));
        self.stage = Stage::Open(Open::default());
        Ok(Step::Connected { consumed })
    }

    /// Decodes the frame at the start of `input`, unmasking its payload in
    /// place, so a whole message is a slice of `input`.
    #[inline(always)]
    fn frame<'a>(
        &mut self,
        input: &'a mut [u8],
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Step<'a>, Error> {
        let role = self.role;
        let deflating = self.deflate.is_some();
        let Stage::Open(open) = &mut self.stage else {
            return Ok(Step::NeedMore);
        };
        if open.closing {
            // Nothing after our close frame counts; drop it.
            return Ok(match input.len() {
                0 => Step::NeedMore,
                consumed => Step::Skip { consumed },
            });
        }
        let Some(header) = FrameHead::parse(input) else {
            return Ok(Step::NeedMore);
        };
        let (head, len, opcode) = (header.size, header.len, header.opcode);
        if matches!(opcode, 3..=7 | 11..=15) {
            return Err(self.fail(out, 1002, invalid_opcode(opcode)));
        }
        let control = opcode & 0x8 != 0;
        // RSV1 only on the first frame of a data message, and only with
        // permessage-deflate; RSV2 and RSV3 never.
        let mut compressed = false;
        if header.rsv != 0 {
            compressed = header.rsv == RSV1 && deflating && matches!(opcode, OP_TEXT | OP_BINARY);
            if !compressed {
                let reason = "reserved bits set without an extension";
                return Err(self.fail(out, 1002, reason.into()));
            }
        }
        match (role, header.mask) {
            (Role::Server, None) => {
                return Err(self.fail(out, 1002, "client frame is not masked".into()))
            }
            (Role::Client, Some(_)) => {
                return Err(self.fail(out, 1002, "server frame is masked".into()))
            }
            _ => {}
        }
        if control && (!header.is_final || len > 125) {
            let reason = "control frame fragmented or over 125 bytes";
            return Err(self.fail(out, 1002, reason.into()));
        }
        // What the header says about the message is checked before its
        // payload arrives.
        if !control && (opcode == OP_CONTINUATION) != open.partial.is_some() {
            let reason = if opcode == OP_CONTINUATION {
                "continuation frame without a message"
            } else {
                "new message before the last one ended"
            };
            return Err(self.fail(out, 1002, reason.into()));
        }
        let so_far = open.partial.as_ref().map_or(0, |p| p.data.len() as u64);
        if !control && len.saturating_add(so_far) > max as u64 {
            let size = len.saturating_add(so_far);
            let reason = format!("message of {size} bytes is over max_package_size ({max})");
            return Err(self.fail(out, 1009, reason));
        }
        let end = head + len as usize;
        let ahead = open.ahead as usize;
        if input.len() < end {
            // Fail fast: the part of a text payload that is here is
            // checked now (compressed ones once inflated, frame by frame).
            let text = match (opcode, &open.partial) {
                (OP_TEXT, _) => !compressed,
                (OP_CONTINUATION, Some(p)) => p.kind == Kind::Text && !p.compressed,
                _ => false,
            };
            if text && input.len() > head + ahead {
                let upto = (input.len() - head).min(u32::MAX as usize);
                let fresh = &mut input[head + ahead..head + upto];
                if let Some(mask) = header.mask {
                    apply_mask_at(fresh, mask, ahead);
                }
                open.ahead = upto as u32;
                if open.utf8.feed(fresh).is_err() {
                    return Err(self.fail(out, 1007, NOT_UTF8.into()));
                }
            }
            return Ok(Step::NeedMore);
        }
        let payload = &mut input[head..end];
        if ahead != 0 {
            open.ahead = 0;
        }
        if let Some(mask) = header.mask {
            if ahead == 0 {
                apply_mask(payload, mask);
            } else {
                apply_mask_at(&mut payload[ahead..], mask, ahead);
            }
        }
        let skip = Step::Skip { consumed: end };
        let fin = header.is_final;
        if compressed {
            let kind = if opcode == OP_BINARY {
                Kind::Binary
            } else {
                Kind::Text
            };
            return self.inflated(kind, payload, fin, end, max, out);
        }
        Ok(match opcode {
            OP_TEXT | OP_BINARY => {
                let kind = if opcode == OP_BINARY {
                    Kind::Binary
                } else {
                    Kind::Text
                };
                if kind == Kind::Text {
                    // A whole message in one frame that came in one piece
                    // (the usual case) is checked at once.
                    let ok = if fin && ahead == 0 {
                        is_utf8(payload)
                    } else {
                        open.utf8.feed(&payload[ahead..]).is_ok() && (!fin || open.utf8.end())
                    };
                    if !ok {
                        return Err(self.fail(out, 1007, NOT_UTF8.into()));
                    }
                }
                if fin {
                    let input: &'a [u8] = input;
                    Step::Message {
                        data: Cow::Borrowed(&input[head..end]),
                        kind,
                        consumed: end,
                    }
                } else {
                    open.partial = Some(Box::new(Partial {
                        kind,
                        compressed: false,
                        data: payload.to_vec(),
                    }));
                    skip
                }
            }
            OP_CONTINUATION => {
                let Some(p) = open.partial.as_mut() else {
                    // Refused above.
                    return Ok(skip);
                };
                if p.compressed {
                    let kind = p.kind;
                    return self.inflated(kind, payload, fin, end, max, out);
                }
                if p.kind == Kind::Text
                    && (open.utf8.feed(&payload[ahead..]).is_err() || (fin && !open.utf8.end()))
                {
                    return Err(self.fail(out, 1007, NOT_UTF8.into()));
                }
                p.data.extend_from_slice(payload);
                if !fin {
                    skip
                } else {
                    let p = open.partial.take().map(|p| *p);
                    let Some(Partial { kind, data, .. }) = p else {
                        return Ok(skip);
                    };
                    Step::Message {
                        data: Cow::Owned(data),
                        kind,
                        consumed: end,
                    }
                }
            }
            OP_PING => {
                write_frame(out, OP_PONG, payload, self.mask());
                skip
            }
            OP_PONG => skip,
            OP_CLOSE => self.peer_closed(payload, out)?,
            // Reserved opcodes were refused above.
            _ => return Err(self.fail(out, 1002, format!("unexpected opcode {opcode}"))),
        })
    }

    /// A whole frame of a compressed message (permessage-deflate): inflated
    /// onto what the message inflated to so far, text checked as it comes.
    #[inline(never)]
    fn inflated(
        &mut self,
        kind: Kind,
        payload: &[u8],
        fin: bool,
        consumed: usize,
        max: usize,
        out: &mut Vec<u8>,
    ) -> Result<Step<'static>, Error> {
        let Stage::Open(open) = &mut self.stage else {
            return Ok(Step::NeedMore);
        };
        let Some(deflate) = self.deflate.as_mut() else {
            return Ok(Step::NeedMore);
        };
        let mut data = open.partial.take().map(|p| p.data).unwrap_or_default();
        let before = data.len();
        let failed = match deflate.inflate(payload, fin, &mut data, max) {
            Err(InflateError::TooLarge) => Some((
                1009,
                format!("message inflates to over max_package_size ({max})"),
            )),
            Err(InflateError::Corrupt) => {
                Some((1007, "compressed message is not valid deflate data".into()))
            }
            Ok(())
                if kind == Kind::Text
                    && (open.utf8.feed(&data[before..]).is_err() || (fin && !open.utf8.end())) =>
            {
                Some((1007, NOT_UTF8.into()))
            }
            Ok(()) => None,
        };
        if let Some((code, reason)) = failed {
            return Err(self.fail(out, code, reason));
        }
        if fin {
            Ok(Step::Message {
                data: Cow::Owned(data),
                kind,
                consumed,
            })
        } else {
            open.partial = Some(Box::new(Partial {
                kind,
                compressed: true,
                data,
            }));
            Ok(Step::Skip { consumed })
        }
    }

    /// Answers the peer's close frame, echoing its status code.
    #[cold]
    fn peer_closed(&mut self, payload: &[u8], out: &mut Vec<u8>) -> Result<Step<'static>, Error> {
        let code = match payload {
            [] => None,
            [_] => return Err(self.fail(out, 1002, "close frame with a 1-byte payload".into())),
            [a, b, reason @ ..] => {
                let code = u16::from_be_bytes([*a, *b]);
                if !CloseCode::from(code).is_allowed() {
                    return Err(self.fail(out, 1002, format!("close code {code} is not allowed")));
                }
                if std::str::from_utf8(reason).is_err() {
                    return Err(self.fail(out, 1007, "close reason is not valid UTF-8".into()));
                }
                Some(code.to_be_bytes())
            }
        };
        let mask = self.mask();
        write_frame(out, OP_CLOSE, code.as_ref().map_or(&[], |c| &c[..]), mask);
        self.close_down();
        Ok(Step::Closed)
    }

    /// No more reading: a close frame went out. What was half read goes.
    fn close_down(&mut self) {
        match &mut self.stage {
            Stage::Open(o) => {
                o.closing = true;
                o.partial = None;
                o.ahead = 0;
                o.utf8 = Utf8::default();
            }
            stage => {
                *stage = Stage::Open(Open {
                    closing: true,
                    ..Open::default()
                })
            }
        }
    }

    /// The peer broke the protocol: a close frame with `code` goes out.
    #[cold]
    fn fail(&mut self, out: &mut Vec<u8>, code: u16, reason: String) -> Error {
        if !self.closing() {
            write_frame(out, OP_CLOSE, &code.to_be_bytes(), self.mask());
        }
        self.close_down();
        Error::Websocket { code, reason }
    }

    /// One outgoing data message as parts to write. A server frame is a
    /// header before the payload itself; a client frame's payload is masked
    /// into `wire`; a compressed one (permessage-deflate) is compressed into
    /// `wire`.
    ///
    /// `Kind::Default` is text when `data` is UTF-8, else binary: never a
    /// text frame that is not UTF-8. `Kind::Text` is the caller's word that
    /// `data` is UTF-8 (checked in debug builds only): the host checks what
    /// plugins send once, before framing it for any number of connections.
    #[inline]
    pub fn encode<'d>(&self, data: &'d [u8], kind: Kind, wire: &'d mut Wire) -> [&'d [u8]; 3] {
        debug_assert!(kind != Kind::Text || is_utf8(data), "Kind::Text, not UTF-8");
        let binary = if kind == Kind::Default {
            !is_utf8(data)
        } else {
            kind == Kind::Binary
        };
        if let Some(d) = &self.deflate {
            return self.encode_deflated(d, data, binary, wire);
        }
        let (mut h, n) = frame_header(data.len(), binary);
        match self.role {
            Role::Server => {
                wire.set_head(h, n);
                [wire.head(), data, &[]]
            }
            Role::Client => {
                let mask = random_mask();
                h[1] |= 0x80;
                let mut head = [0u8; 14];
                head[..10].copy_from_slice(&h);
                head[n..n + 4].copy_from_slice(&mask);
                wire.set_head(head, n + 4);
                wire.body.clear();
                wire.body.extend_from_slice(data);
                apply_mask(&mut wire.body, mask);
                [wire.head(), &wire.body, &[]]
            }
        }
    }

    /// As a server: appends one outgoing data message, framed, to `out`
    /// (the bytes of [`WsCodec::encode`]'s parts, joined). `false` as a
    /// client, whose frames are masked: use `encode`.
    // Always: part of `Codec::encode_into`, the host's per-message send.
    #[inline(always)]
    pub fn encode_into(&self, data: &[u8], kind: Kind, out: &mut Vec<u8>) -> bool {
        if self.role != Role::Server || self.deflate.is_some() {
            return false;
        }
        // The same rule as `encode`: never a text frame of bad UTF-8.
        let binary = if kind == Kind::Default {
            !is_utf8(data)
        } else {
            kind == Kind::Binary
        };
        let (h, n) = frame_header(data.len(), binary);
        out.reserve(n + data.len());
        out.extend_from_slice(&h[..n]);
        out.extend_from_slice(data);
        true
    }

    /// [`encode`](Self::encode) with permessage-deflate: one frame, RSV1 set.
    #[inline(never)]
    fn encode_deflated<'d>(
        &self,
        d: &Deflate,
        data: &[u8],
        binary: bool,
        wire: &'d mut Wire,
    ) -> [&'d [u8]; 3] {
        d.deflate(data, &mut wire.body);
        let (mut h, n) = frame_header(wire.body.len(), binary);
        h[0] |= RSV1;
        if self.role == Role::Client {
            let mask = random_mask();
            h[1] |= 0x80;
            let mut head = [0u8; 14];
            head[..10].copy_from_slice(&h);
            head[n..n + 4].copy_from_slice(&mask);
            wire.set_head(head, n + 4);
            apply_mask(&mut wire.body, mask);
        } else {
            wire.set_head(h, n);
        }
        [wire.head(), &wire.body, &[]]
    }

    /// A fresh mask for frames we send as a client; none as a server.
    fn mask(&self) -> Option<[u8; 4]> {
        (self.role == Role::Client).then(random_mask)
    }
}

/// The header that carries extensions, either way.
const EXTENSIONS: &str = "sec-websocket-extensions";

const NOT_UTF8: &str = "text message is not valid UTF-8";

/// A UTF-8 check fed a piece at a time, pieces cut anywhere: the bytes of
/// a code point cut at the end of one piece wait for the next. A byte that
/// no continuation can make valid fails the piece it is in.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Utf8 {
    carry: [u8; 3],
    len: u8,
}

impl Utf8 {
    fn feed(&mut self, mut piece: &[u8]) -> Result<(), ()> {
        if self.len > 0 {
            // Complete the code point cut last time, a byte at a time.
            let mut buf = [0u8; 4];
            let have = self.len as usize;
            buf[..have].copy_from_slice(&self.carry[..have]);
            let mut n = have;
            while n < 4 && !piece.is_empty() {
                buf[n] = piece[0];
                piece = &piece[1..];
                n += 1;
                match std::str::from_utf8(&buf[..n]) {
                    Ok(_) => break,
                    Err(e) if e.error_len().is_some() => return Err(()),
                    Err(_) => {}
                }
            }
            if std::str::from_utf8(&buf[..n]).is_err() {
                // Still cut (the piece ran out): keep waiting.
                self.carry[..n].copy_from_slice(&buf[..n]);
                self.len = n as u8;
                return Ok(());
            }
            self.len = 0;
        }
        if piece.is_ascii() {
            return Ok(());
        }
        match std::str::from_utf8(piece) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_none() => {
                let rest = &piece[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                self.len = rest.len() as u8;
                Ok(())
            }
            Err(_) => Err(()),
        }
    }

    /// The message ends here: nothing may be left cut. Resets for the next.
    fn end(&mut self) -> bool {
        std::mem::take(self).len == 0
    }
}

/// [`apply_mask`] for the part of a payload from byte `offset` on.
#[inline]
fn apply_mask_at(data: &mut [u8], mask: [u8; 4], offset: usize) {
    // The mask as it stands `offset` bytes in: rotated left by that many.
    let shift = 8 * (offset % 4) as u32;
    let m = u32::from_le_bytes(mask).rotate_right(shift).to_le_bytes();
    apply_mask(data, m);
}

/// A frame header (RFC 6455 §5.2), read as tungstenite's
/// `FrameHeader::parse` reads it, without its `io::Read` cursor: a
/// header is at most 14 bytes and every frame of every message has one.
struct FrameHead {
    is_final: bool,
    /// The three reserved bits (RSV1 is 0x40).
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    /// Payload length, as the header says.
    len: u64,
    /// Bytes of header.
    size: usize,
}

impl FrameHead {
    /// `None`: the header is not all there yet.
    #[inline(always)]
    fn parse(input: &[u8]) -> Option<FrameHead> {
        let [first, second, ..] = *input else {
            return None;
        };
        let (len, mut size) = match second & 0x7f {
            126 => {
                let b = input.get(2..4)?;
                (u64::from(u16::from_be_bytes([b[0], b[1]])), 4)
            }
            127 => {
                let b: [u8; 8] = input.get(2..10)?.try_into().ok()?;
                (u64::from_be_bytes(b), 10)
            }
            n => (u64::from(n), 2),
        };
        let mask = if second & 0x80 != 0 {
            let m = input.get(size..size + 4)?;
            size += 4;
            Some([m[0], m[1], m[2], m[3]])
        } else {
            None
        };
        Some(FrameHead {
            is_final: first & 0x80 != 0,
            rsv: first & 0x70,
            opcode: first & 0x0f,
            mask,
            len,
            size,
        })
    }
}

/// The reason given for a reserved opcode: tungstenite's words, as before.
#[cold]
fn invalid_opcode(opcode: u8) -> String {
    use tungstenite::error::{Error, ProtocolError};
    Error::Protocol(ProtocolError::InvalidOpcode(opcode)).to_string()
}

/// Whether a text payload is UTF-8; ASCII (the usual case) is checked a
/// word at a time before the full validation.
#[inline]
pub fn is_utf8(bytes: &[u8]) -> bool {
    bytes.is_ascii() || std::str::from_utf8(bytes).is_ok()
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
    use crate::tests::{run, same_at_every_split, Ev as T};
    use crate::{Codec, Scheme};

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

    /// A codec past its handshake, and the message size limit.
    struct R {
        codec: Codec,
        max: usize,
    }

    fn server(max: usize) -> R {
        R {
            codec: Codec::Websocket(Box::new(WsCodec::open(Role::Server))),
            max,
        }
    }

    fn server_with(ws: WsCodec, max: usize) -> R {
        R {
            codec: Codec::Websocket(Box::new(ws)),
            max,
        }
    }

    fn client(max: usize) -> R {
        R {
            codec: Codec::Websocket(Box::new(WsCodec::open(Role::Client))),
            max,
        }
    }

    impl R {
        fn closing(&self) -> bool {
            matches!(&self.codec, Codec::Websocket(ws) if ws.closing())
        }
    }

    /// Feeds `chunks` as reads would arrive, keeping unconsumed bytes.
    fn feed_all(r: &mut R, chunks: &[&[u8]]) -> (Vec<Ev>, Vec<u8>) {
        let (steps, out) = run(&mut r.codec, chunks, r.max, None);
        let ev = steps
            .into_iter()
            .map(|s| match s {
                T::Msg(kind, data) => Ev::Msg(kind == Kind::Binary, data),
                T::Closed => Ev::Closed,
                T::Failed(Error::Websocket { code, .. }) => Ev::Failed(code),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
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
        let mut r = server(1 << 20);
        let mut wire = client_frame(true, 1, b"hello");
        wire.extend(client_frame(true, 2, &[0, 1, 2]));
        let chunks: Vec<&[u8]> = wire.chunks(3).collect();
        let (ev, out) = feed_all(&mut r, &chunks);
        assert_eq!(ev, vec![text("hello"), Ev::Msg(true, vec![0, 1, 2])]);
        assert!(out.is_empty());
    }

    #[test]
    fn fragments_with_interleaved_ping_are_joined_and_ping_answered() {
        let mut r = server(1 << 20);
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
        let mut r = server(1 << 20);
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
            let mut r = server(1000);
            let (ev, out) = feed_all(&mut r, &[&wire]);
            match &ev[..] {
                [Ev::Failed(c)] => assert_eq!(*c, code, "{wire:?}"),
                other => panic!("{wire:?}: {other:?}"),
            }
            assert_eq!(&out[..4], &close_frame(code), "close frame sent");
        }
    }

    #[test]
    fn header_parse_matches_tungstenite() {
        use tungstenite::protocol::frame::FrameHeader;
        let mut cases = vec![vec![], vec![0x81], vec![0x81, 0x85, 1, 2, 3]];
        for first in [0x00, 0x01, 0x82, 0x83, 0x88, 0x8b, 0xc1, 0x21, 0x91] {
            for len in [0u8, 5, 125, 126, 127, 0x80 | 5, 0x80 | 126, 0x80 | 127] {
                let mut v = vec![first, len];
                v.extend(1..=12u8);
                cases.extend((0..=v.len()).map(|n| v[..n].to_vec()));
            }
        }
        for wire in cases {
            let theirs = FrameHeader::parse(&mut std::io::Cursor::new(&wire[..]));
            let ours = FrameHead::parse(&wire);
            match (theirs, ours) {
                (Ok(None), None) => {}
                (Err(e), Some(h)) => {
                    assert!(matches!(h.opcode, 3..=7 | 11..=15), "{wire:?}");
                    assert_eq!(e.to_string(), invalid_opcode(h.opcode));
                }
                (Ok(Some((t, len))), Some(h)) => {
                    let rsv = t.rsv1 || t.rsv2 || t.rsv3;
                    assert_eq!(
                        (t.is_final, rsv, u8::from(t.opcode), t.mask, len),
                        (h.is_final, h.rsv != 0, h.opcode, h.mask, h.len),
                        "{wire:?}"
                    );
                    assert!(!matches!(h.opcode, 3..=7 | 11..=15));
                    let size = 2
                        + [0, 2, 8][usize::from((len > 125) as u8 + (len > 0xffff) as u8)]
                        + 4 * usize::from(t.mask.is_some());
                    assert_eq!(h.size, size, "{wire:?}");
                }
                (t, o) => panic!("{wire:?}: {t:?} vs {:?}", o.map(|h| h.len)),
            }
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
            let mut r = server(1 << 20);
            let (ev, out) = feed_all(&mut r, &[&wire[..cut], &wire[cut..]]);
            assert_eq!(ev, want, "split at {cut}");
            assert!(out.is_empty());
        }
    }

    #[test]
    fn close_without_code_or_with_a_bad_one() {
        let mut r = server(100);
        let (ev, out) = feed_all(&mut r, &[&client_frame(true, 8, b"")]);
        assert_eq!((ev, out), (vec![Ev::Closed], vec![0x88, 0]));
        // 1005 may not be sent on the wire; a 1-byte payload is malformed.
        for payload in [&1005u16.to_be_bytes()[..], &[3]] {
            let mut r = server(100);
            let (ev, out) = feed_all(&mut r, &[&client_frame(true, 8, payload)]);
            assert_eq!(ev, vec![Ev::Failed(1002)]);
            assert_eq!(out, close_frame(1002));
        }
        let mut r = server(100);
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
            let mut r = server(100);
            let (ev, _) = feed_all(&mut r, &[&wire]);
            assert_eq!(ev, vec![Ev::Failed(code)], "{wire:?}");
        }
        let mut r = server(100);
        let wire = [
            client_frame(false, 1, &[0xc3]),
            client_frame(true, 0, &[0xa9]),
        ]
        .concat();
        assert_eq!(feed_all(&mut r, &[&wire]).0, vec![text("é")]);
    }

    #[test]
    fn nothing_is_read_after_a_close() {
        let mut r = server(100);
        let wire = [client_frame(true, 8, b""), client_frame(true, 1, b"late")].concat();
        let (ev, _) = feed_all(&mut r, &[&wire]);
        assert_eq!(ev, vec![Ev::Closed]);
        assert!(r.closing());
    }

    #[test]
    fn client_role_wants_unmasked_frames_and_masks_its_replies() {
        let mut r = client(100);
        let (ev, out) = feed_all(&mut r, &[&[0x81, 2, b'h', b'i', 0x89, 1, b'p']]);
        assert_eq!(ev, vec![text("hi")]);
        assert_eq!(out.len(), 2 + 4 + 1, "masked pong");
        assert_eq!((out[0], out[1]), (0x8a, 0x81));
        assert_eq!(out[6] ^ out[2], b'p');
        let mut r = client(100);
        let (ev, _) = feed_all(&mut r, &[&client_frame(true, 1, b"hi")]);
        assert_eq!(ev, vec![Ev::Failed(1002)]);
    }

    /// A connection handed to another process mid-message (reload): the
    /// codec's state goes through serde and the new copy finishes it.
    #[test]
    fn a_fragmented_message_survives_serialization() {
        let mut codec = Codec::Websocket(Box::new(WsCodec::open(Role::Server)));
        let first = client_frame(false, OP_TEXT, b"hel");
        let (ev, _) = run(&mut codec, &[&first], 1 << 20, None);
        assert!(ev.is_empty(), "{ev:?}");
        let saved = postcard::to_allocvec(&codec).unwrap();
        drop(codec);
        let mut moved: Codec = postcard::from_bytes(&saved).unwrap();
        let last = client_frame(true, OP_CONTINUATION, b"lo");
        let (ev, _) = run(&mut moved, &[&last], 1 << 20, None);
        assert_eq!(ev, [T::Msg(Kind::Text, b"hello".to_vec())]);
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

    const UPGRADE: &str = "GET /chat?room=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                           Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                           Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

    #[test]
    fn server_handshake_then_frames_at_every_split() {
        // Frames may follow the request in the same read.
        let mut wire = UPGRADE.as_bytes().to_vec();
        wire.extend(client_frame(true, 1, b"hi"));
        wire.extend(client_frame(true, 2, &[1, 2]));
        wire.extend(client_frame(true, 8, &1000u16.to_be_bytes()));
        let (ev, replies) =
            same_at_every_split(|| Codec::new(Scheme::Websocket), &wire, 1 << 20, None);
        assert_eq!(
            ev,
            vec![
                T::Upgrade("/chat".into()),
                T::Msg(Kind::Text, b"hi".to_vec()),
                T::Msg(Kind::Binary, vec![1, 2]),
                T::Closed,
            ]
        );
        let answer = String::from_utf8_lossy(&replies);
        assert!(answer.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(answer.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(replies.ends_with(&[0x88, 2, 0x03, 0xe8]), "close answered");
    }

    #[test]
    fn server_refuses_bad_requests_and_on_request_of_the_application() {
        for (req, status) in [
            ("POST / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
            ("\x16\x03\x01 not http at all\r\n\r\n", 400),
            (
                "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Version: 8\r\nSec-WebSocket-Key: k\r\n\r\n",
                426,
            ),
        ] {
            let mut c = Codec::new(Scheme::Websocket);
            let (ev, replies) = run(&mut c, &[req.as_bytes()], 100, None);
            assert!(
                matches!(&ev[..], [T::Failed(Error::Refused { status: s, .. })] if *s == status),
                "{req:?}: {ev:?}"
            );
            let answer = String::from_utf8_lossy(&replies);
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status} ")),
                "{answer}"
            );
            assert_eq!(answer.contains("Sec-WebSocket-Version: 13"), status == 426);
            assert!(!c.established());
        }
        // The application's refusal, after a valid request.
        let mut ws = WsCodec::server();
        let (mut out, mut scratch) = (Vec::new(), crate::http::Scratch::new());
        let mut input = UPGRADE.as_bytes().to_vec();
        let mut cx = DecodeCx {
            max: 100,
            replies: &mut out,
            framer: None,
        };
        let step = ws.decode(&mut input, &mut scratch, &mut cx).unwrap();
        assert!(matches!(step, Step::Upgrade { consumed, .. } if consumed == UPGRADE.len()));
        assert!(!ws.sendable() && !ws.is_open());
        ws.refuse(403, &mut out);
        assert!(out.starts_with(b"HTTP/1.1 403 "));
        assert!(!ws.is_open());
    }

    /// The server's answer to `c`'s request.
    fn answer_for(c: &WsCodec) -> String {
        let req = String::from_utf8(c.client_request("h:1", "/p")).unwrap();
        let key = req
            .lines()
            .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
            .unwrap();
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        String::from_utf8(switching_protocols(&accept)).unwrap()
    }

    #[test]
    fn client_handshake_then_frames_at_every_split() {
        let first = WsCodec::client();
        let req = String::from_utf8(first.client_request("h:1", "/p?q")).unwrap();
        assert!(
            req.starts_with("GET /p?q HTTP/1.1\r\nHost: h:1\r\n"),
            "{req}"
        );
        assert!(first.sendable() && !first.is_open());
        let mut wire = answer_for(&first).into_bytes();
        wire.extend([0x81, 2, b'h', b'i', 0x89, 1, b'p', 0x82, 1, 7]);
        let new = || {
            // Each run needs the same key: copy the first codec's.
            let Stage::Answer { key, .. } = &first.stage else {
                unreachable!()
            };
            Codec::Websocket(Box::new(WsCodec {
                role: Role::Client,
                deflate: None,
                stage: Stage::Answer {
                    key: key.clone(),
                    deflate: false,
                },
            }))
        };
        let (ev, replies) = same_at_every_split(new, &wire, 100, None);
        assert_eq!(
            ev,
            vec![
                T::Connected,
                T::Msg(Kind::Text, b"hi".to_vec()),
                T::Msg(Kind::Binary, vec![7]),
            ]
        );
        assert_eq!((replies[0], replies[1]), (0x8a, 0x81), "masked pong");
    }

    #[test]
    fn client_refuses_an_overlong_answer_even_when_whole() {
        // Found by fuzzing: refused in pieces, accepted whole.
        let c = WsCodec::client();
        let answer = answer_for(&c);
        let padded = answer.replacen(
            "\r\n\r\n",
            &format!("\r\nX-Pad: {}\r\n\r\n", "y".repeat(17000)),
            1,
        );
        let Stage::Answer { key, .. } = &c.stage else {
            unreachable!()
        };
        let mut codec = Codec::Websocket(Box::new(WsCodec {
            role: Role::Client,
            deflate: None,
            stage: Stage::Answer {
                key: key.clone(),
                deflate: false,
            },
        }));
        let (ev, _) = run(&mut codec, &[padded.as_bytes()], 100, None);
        assert!(matches!(&ev[..], [T::Failed(Error::Rejected(_))]), "{ev:?}");
    }

    #[test]
    fn client_rejects_a_wrong_answer() {
        let c = WsCodec::client();
        let other = answer_for(&WsCodec::client());
        for answer in [
            other.as_str(),
            "HTTP/1.1 403 Forbidden\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            let mut codec = Codec::Websocket(Box::new(WsCodec {
                role: Role::Client,
                deflate: None,
                stage: Stage::Answer {
                    deflate: false,
                    key: match &c.stage {
                        Stage::Answer { key, .. } => key.clone(),
                        _ => unreachable!(),
                    },
                },
            }));
            let (ev, _) = run(&mut codec, &[answer.as_bytes()], 100, None);
            assert!(matches!(&ev[..], [T::Failed(Error::Rejected(_))]), "{ev:?}");
        }
    }

    #[test]
    fn encode_server_unmasked_and_client_masked() {
        let mut w = Wire::default();
        let s = WsCodec::open(Role::Server);
        let parts = s.encode(b"hello", Kind::Text, &mut w);
        assert_eq!(parts[0], [0x81, 5]);
        assert_eq!(parts[1].as_ptr(), b"hello".as_ptr(), "payload not copied");
        let parts = s.encode(&[0; 300], Kind::Binary, &mut w);
        assert_eq!(parts[0], [0x82, 126, 1, 44]);
        // What a client encodes, a server decodes back (and the reverse).
        for (from, to) in [(Role::Client, Role::Server), (Role::Server, Role::Client)] {
            let mut wire = Vec::new();
            for (data, kind) in [(&b"text"[..], Kind::Text), (&[0u8; 200][..], Kind::Binary)] {
                let mut w = Wire::default();
                wire.extend(WsCodec::open(from).encode(data, kind, &mut w).concat());
            }
            let mut codec = Codec::Websocket(Box::new(WsCodec::open(to)));
            let (ev, _) = run(&mut codec, &[&wire], 1000, None);
            assert_eq!(
                ev,
                vec![
                    T::Msg(Kind::Text, b"text".to_vec()),
                    T::Msg(Kind::Binary, vec![0; 200])
                ],
                "{from:?} to {to:?}"
            );
        }
    }

    #[test]
    fn goodbye_only_from_an_open_server() {
        assert_eq!(
            WsCodec::open(Role::Server).goodbye(),
            Some(close_frame(1000))
        );
        assert_eq!(WsCodec::open(Role::Client).goodbye(), None);
        assert_eq!(WsCodec::server().goodbye(), None);
    }

    /// The opcode and payload of each unmasked frame in `wire`.
    fn server_frames(wire: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut c = Codec::Websocket(Box::new(WsCodec::open(Role::Client)));
        let (ev, _) = run(&mut c, &[wire], 1 << 20, None);
        ev.into_iter()
            .map(|e| match e {
                T::Msg(Kind::Text, d) => (OP_TEXT, d),
                T::Msg(Kind::Binary, d) => (OP_BINARY, d),
                other => panic!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn default_kind_is_text_only_for_utf8() {
        let s = WsCodec::open(Role::Server);
        for (data, kind, op) in [
            (&b"plain"[..], Kind::Default, OP_TEXT),
            ("héllo".as_bytes(), Kind::Default, OP_TEXT),
            (&[0xff, 0xfe, b'a'][..], Kind::Default, OP_BINARY),
            // A code point cut short is not UTF-8 either.
            (&[b'a', 0xc3][..], Kind::Default, OP_BINARY),
            (&b"plain"[..], Kind::Binary, OP_BINARY),
            (&b"plain"[..], Kind::Text, OP_TEXT),
        ] {
            let mut w = Wire::default();
            let wire = s.encode(data, kind, &mut w).concat();
            assert_eq!(wire[0] & 0x0f, op, "{data:?} {kind:?}");
            assert_eq!(server_frames(&wire), vec![(op, data.to_vec())]);
        }
        // The client role too (masked frames).
        let c = WsCodec::open(Role::Client);
        let mut w = Wire::default();
        let wire = c.encode(&[0x80], Kind::Default, &mut w).concat();
        assert_eq!(wire[0], 0x80 | OP_BINARY);
    }

    #[test]
    fn bad_utf8_in_a_fragment_fails_before_the_message_ends() {
        // Autobahn 6.4.1: the second of three fragments holds a code point
        // above U+10FFFF; the third never needs to come.
        let wire = [
            client_frame(false, OP_TEXT, "κόσμε".as_bytes()),
            client_frame(false, OP_CONTINUATION, &[0xf4, 0x90, 0x80, 0x80]),
        ]
        .concat();
        let mut r = server(1 << 20);
        let (ev, out) = feed_all(&mut r, &[&wire]);
        assert_eq!(ev, vec![Ev::Failed(1007)]);
        assert_eq!(out, close_frame(1007));
        // 6.4.2: the bad sequence's first bytes are enough (F4 90 cannot
        // start anything valid).
        let wire = [
            client_frame(false, OP_TEXT, "κόσμε".as_bytes()),
            client_frame(false, OP_CONTINUATION, &[0xf4]),
            client_frame(false, OP_CONTINUATION, &[0x90]),
        ]
        .concat();
        assert_eq!(
            feed_all(&mut server(100), &[&wire]).0,
            vec![Ev::Failed(1007)]
        );
    }

    #[test]
    fn bad_utf8_fails_while_its_frame_is_still_arriving() {
        // Autobahn 6.4.3/6.4.4: one frame, sent in three reads.
        let mut payload = "κόσμε".as_bytes().to_vec();
        payload.extend([0xf4, 0x90, 0x80, 0x80]);
        payload.extend(b"edited");
        let wire = client_frame(true, OP_TEXT, &payload);
        let head = 6;
        for bad_end in [head + 11 + 4, head + 11 + 2] {
            // The first read is all good: nothing yet.
            let mut r = server(1 << 20);
            assert_eq!(feed_all(&mut r, &[&wire[..head + 11]]).0, vec![]);
            // The second brings the bad bytes, not the frame's end.
            let mut r = server(1 << 20);
            let chunks = [&wire[..head + 11], &wire[head + 11..bad_end]];
            let (ev, out) = feed_all(&mut r, &chunks);
            assert_eq!(ev, vec![Ev::Failed(1007)], "cut at {bad_end}");
            assert_eq!(out, close_frame(1007));
        }
        // Good text cut anywhere, inside code points too, still arrives.
        let s = "héllo wörld ✓ 😀".repeat(3);
        let wire = [
            client_frame(false, OP_TEXT, &s.as_bytes()[..7]),
            client_frame(true, OP_CONTINUATION, &s.as_bytes()[7..]),
        ]
        .concat();
        for cut in 0..=wire.len() {
            let chunks: Vec<&[u8]> = vec![&wire[..cut], &wire[cut..]];
            let mut r = server(1 << 20);
            assert_eq!(feed_all(&mut r, &chunks).0, vec![text(&s)], "cut {cut}");
        }
        // A byte at a time.
        let chunks: Vec<&[u8]> = wire.chunks(1).collect();
        assert_eq!(feed_all(&mut server(1 << 20), &chunks).0, vec![text(&s)]);
    }

    #[test]
    fn utf8_fed_in_pieces_matches_the_whole() {
        let samples: Vec<Vec<u8>> = vec![
            "aé€😀".as_bytes().to_vec(),
            vec![0xf4, 0x8f, 0xbf, 0xbf],
            vec![0xf4, 0x90, 0x80, 0x80],
            vec![0xed, 0xa0, 0x80],
            vec![0xe0, 0x80, 0x80],
            vec![0xc0, 0xaf],
            vec![0xe2, 0x82],
            vec![0x80],
        ];
        for s in &samples {
            let whole = std::str::from_utf8(s).is_ok();
            for cut in 0..=s.len() {
                for cut2 in cut..=s.len() {
                    let mut u = Utf8::default();
                    let ok = u.feed(&s[..cut]).is_ok()
                        && u.feed(&s[cut..cut2]).is_ok()
                        && u.feed(&s[cut2..]).is_ok()
                        && u.end();
                    assert_eq!(ok, whole, "{s:x?} cut {cut} {cut2}");
                }
            }
        }
    }

    fn params(theirs_nct: bool) -> Params {
        let side = |nct| deflate::Side {
            no_context_takeover: nct,
            max_window_bits: 15,
        };
        Params {
            ours: side(true),
            theirs: side(theirs_nct),
        }
    }

    /// A client's compressed frames for `msg`, cut into `frames` fragments.
    fn compressed_client_frames(msg: &[u8], opcode: u8, frames: usize) -> Vec<u8> {
        let mut z = Vec::new();
        Deflate::new(params(true)).deflate(msg, &mut z);
        let step = z.len().div_ceil(frames).max(1);
        let parts: Vec<&[u8]> = z.chunks(step).collect();
        let mut wire = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let op = if i == 0 { opcode } else { OP_CONTINUATION };
            let mut f = client_frame(i + 1 == parts.len(), op, p);
            if i == 0 {
                f[0] |= RSV1;
            }
            wire.extend(f);
        }
        wire
    }

    #[test]
    fn the_server_agrees_to_deflate_only_when_set_and_offered() {
        let offer = UPGRADE.replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
        );
        for (set, req, agreed) in [
            (true, offer.as_str(), true),
            (false, offer.as_str(), false),
            (true, UPGRADE, false),
        ] {
            let mut ws = WsCodec::server();
            ws.set_deflate(set);
            let mut codec = Codec::Websocket(Box::new(ws));
            let (ev, replies) = run(&mut codec, &[req.as_bytes()], 1 << 20, None);
            assert_eq!(ev, vec![T::Upgrade("/chat".into())]);
            let answer = String::from_utf8(replies).unwrap();
            assert_eq!(
                answer.contains(
                    "\r\nSec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
                ),
                agreed,
                "{answer}"
            );
            let Codec::Websocket(ws) = &codec else {
                unreachable!()
            };
            assert_eq!(ws.deflate().is_some(), agreed);
        }
    }

    #[test]
    fn compressed_messages_whole_fragmented_and_cut() {
        let text_msg = "{\"hello\": \"wörld\"} ".repeat(40);
        let mut wire = compressed_client_frames(text_msg.as_bytes(), OP_TEXT, 1);
        wire.extend(compressed_client_frames(&[7u8; 3000], OP_BINARY, 3));
        // An uncompressed message in between is fine (RSV1 clear).
        wire.extend(client_frame(true, OP_TEXT, b"plain"));
        wire.extend(compressed_client_frames(b"", OP_TEXT, 1));
        let want = vec![
            T::Msg(Kind::Text, text_msg.as_bytes().to_vec()),
            T::Msg(Kind::Binary, vec![7u8; 3000]),
            T::Msg(Kind::Text, b"plain".to_vec()),
            T::Msg(Kind::Text, vec![]),
        ];
        for nct in [true, false] {
            let new =
                || Codec::Websocket(Box::new(WsCodec::open_deflate(Role::Server, params(nct))));
            let (ev, replies) = same_at_every_split(new, &wire, 1 << 20, None);
            assert_eq!(ev, want);
            assert!(replies.is_empty());
            let mut c = new();
            run(&mut c, &[&wire], 1 << 20, None);
            let Codec::Websocket(ws) = &c else {
                unreachable!()
            };
            // The peer's context is kept only when it takes it over.
            assert_eq!(ws.movable(), nct);
        }
    }

    #[test]
    fn compressed_frames_break_the_rules_or_the_limit() {
        let deflating = || server_with(WsCodec::open_deflate(Role::Server, params(true)), 1000);
        // RSV1 without the extension, on a continuation, on a control frame.
        let mut rsv1_text = client_frame(true, OP_TEXT, b"x");
        rsv1_text[0] |= RSV1;
        let mut rsv1_cont = client_frame(true, OP_CONTINUATION, b"x");
        rsv1_cont[0] |= RSV1;
        let mut rsv1_ping = client_frame(true, OP_PING, b"x");
        rsv1_ping[0] |= RSV1;
        let mut rsv2 = client_frame(true, OP_TEXT, b"x");
        rsv2[0] |= 0x20;
        assert_eq!(
            feed_all(&mut server(100), &[&rsv1_text]).0,
            vec![Ev::Failed(1002)]
        );
        for wire in [
            [client_frame(false, OP_TEXT, b"a"), rsv1_cont].concat(),
            rsv1_ping,
            rsv2,
        ] {
            assert_eq!(
                feed_all(&mut deflating(), &[&wire]).0,
                vec![Ev::Failed(1002)]
            );
        }
        // A bomb: a few hundred bytes that inflate past max_package_size.
        let bomb = compressed_client_frames(&[0u8; 100_000], OP_BINARY, 1);
        assert!(bomb.len() < 1000);
        let (ev, out) = feed_all(&mut deflating(), &[&bomb]);
        assert_eq!(ev, vec![Ev::Failed(1009)]);
        assert_eq!(out, close_frame(1009));
        // Garbage, and text that inflates to bad UTF-8.
        let mut junk = client_frame(true, OP_BINARY, &[0xff; 10]);
        junk[0] |= RSV1;
        assert_eq!(
            feed_all(&mut deflating(), &[&junk]).0,
            vec![Ev::Failed(1007)]
        );
        let bad_text = compressed_client_frames(&[b'a', 0xff, b'b'], OP_TEXT, 1);
        assert_eq!(
            feed_all(&mut deflating(), &[&bad_text]).0,
            vec![Ev::Failed(1007)]
        );
    }

    #[test]
    fn deflate_round_trips_between_our_two_roles() {
        let p = params(true);
        for (from, to) in [(Role::Client, Role::Server), (Role::Server, Role::Client)] {
            let sender = WsCodec::open_deflate(from, p);
            let mut wire = Vec::new();
            let big = "abc".repeat(1000);
            for (data, kind) in [
                (big.as_bytes(), Kind::Text),
                (&[1u8, 2, 3][..], Kind::Binary),
                (&[0xffu8, 0][..], Kind::Default),
            ] {
                let mut w = Wire::default();
                let frame = sender.encode(data, kind, &mut w).concat();
                assert_eq!(frame[0] & RSV1, RSV1, "compressed");
                wire.extend(frame);
            }
            assert!(wire.len() < 200, "{}", wire.len());
            let mut codec = Codec::Websocket(Box::new(WsCodec::open_deflate(to, p)));
            let (ev, _) = run(&mut codec, &[&wire], 1 << 20, None);
            assert_eq!(
                ev,
                vec![
                    T::Msg(Kind::Text, big.as_bytes().to_vec()),
                    T::Msg(Kind::Binary, vec![1, 2, 3]),
                    T::Msg(Kind::Binary, vec![0xff, 0]),
                ],
                "{from:?} to {to:?}"
            );
        }
    }

    #[test]
    fn the_client_offers_deflate_and_reads_the_answer() {
        let mut c = WsCodec::client();
        c.set_deflate(true);
        let req = String::from_utf8(c.client_request("h", "/")).unwrap();
        assert!(req.contains(&format!(
            "\r\nSec-WebSocket-Extensions: {}\r\n",
            deflate::CLIENT_OFFER
        )));
        let key = match &c.stage {
            Stage::Answer { key, .. } => key.clone(),
            _ => unreachable!(),
        };
        let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
        let client = |deflate| {
            Codec::Websocket(Box::new(WsCodec {
                role: Role::Client,
                deflate: None,
                stage: Stage::Answer {
                    key: key.clone(),
                    deflate,
                },
            }))
        };
        let ok = switching_protocols_with(
            &accept,
            Some("permessage-deflate; server_max_window_bits=10; client_no_context_takeover"),
        );
        let mut codec = client(true);
        let (ev, _) = run(&mut codec, &[&ok], 100, None);
        assert_eq!(ev, vec![T::Connected]);
        let Codec::Websocket(ws) = &codec else {
            unreachable!()
        };
        let p = ws.deflate().unwrap();
        assert_eq!(
            (p.theirs.max_window_bits, p.theirs.no_context_takeover),
            (10, false)
        );
        // Declined: no compression. Not offered, or broken: refused.
        let (ev, _) = run(
            &mut client(true),
            &[&switching_protocols(&accept)],
            100,
            None,
        );
        assert_eq!(ev, vec![T::Connected]);
        for (offered, ext) in [
            (false, "permessage-deflate"),
            (true, "permessage-deflate; client_max_window_bits"),
            (true, "x-foo"),
        ] {
            let answer = switching_protocols_with(&accept, Some(ext));
            let (ev, _) = run(&mut client(offered), &[&answer], 100, None);
            assert!(
                matches!(&ev[..], [T::Failed(Error::Rejected(_))]),
                "{ext}: {ev:?}"
            );
        }
    }

    #[test]
    fn a_deflate_codec_moves_between_messages_without_context() {
        let mut codec =
            Codec::Websocket(Box::new(WsCodec::open_deflate(Role::Server, params(true))));
        let (ev, _) = run(
            &mut codec,
            &[&compressed_client_frames(b"one", OP_TEXT, 1)],
            1 << 20,
            None,
        );
        assert_eq!(ev, [T::Msg(Kind::Text, b"one".to_vec())]);
        let saved = postcard::to_allocvec(&codec).unwrap();
        let mut moved: Codec = postcard::from_bytes(&saved).unwrap();
        let (ev, _) = run(
            &mut moved,
            &[&compressed_client_frames(b"two", OP_TEXT, 1)],
            1 << 20,
            None,
        );
        assert_eq!(ev, [T::Msg(Kind::Text, b"two".to_vec())]);
        // Half-way through a compressed message it holds the context.
        let wire = compressed_client_frames(&[5u8; 500], OP_BINARY, 2);
        let first_len = 6 + (wire[1] & 0x7f) as usize;
        run(&mut moved, &[&wire[..first_len]], 1 << 20, None);
        let Codec::Websocket(ws) = &moved else {
            unreachable!()
        };
        assert!(!ws.movable());
    }

    #[test]
    fn codec_stays_small() {
        // One per idle connection: keep it within a 48-byte allocation.
        assert!(std::mem::size_of::<WsCodec>() <= 48);
    }
}
