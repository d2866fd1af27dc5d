//! Application protocols as pure codecs: bytes in, steps out, no sockets
//! inside. The worker owns buffers and IO; every codec answers the same
//! question, [`Codec::decode`]: what the start of the input holds (a
//! [`Step`]), and [`Codec::encode`]: what to write for an outgoing message.

mod custom;
pub mod deflate;
mod frame;
pub mod http;
mod scheme;
pub mod static_files;
mod text;
pub mod websocket;

use std::borrow::Cow;

use serde::{Deserialize, Serialize};

pub use scheme::Scheme;

/// Where one complete message sits in the input (text and frame framing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Message {
    /// The payload is `input[start..end]`.
    pub start: usize,
    pub end: usize,
    /// Bytes of input the message used up, framing included.
    pub consumed: usize,
}

impl Message {
    // Inlined into `Codec::decode`, which the worker inlines: once per message.
    #[inline]
    fn step(self, input: &[u8], kind: Kind) -> Step<'_> {
        Step::Message {
            data: Cow::Borrowed(&input[self.start..self.end]),
            kind,
            consumed: self.consumed,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message of {size} bytes is over max_package_size ({max})")]
    TooLarge { size: usize, max: usize },
    #[error("frame length {0} is below the 4-byte header it must count")]
    BadFrameLength(u32),
    /// The plugin's framing (`custom://`) refused the input or the message.
    #[error("{0}")]
    Custom(String),
}

/// The framing of a message: how an incoming one came, or how to send one
/// where the protocol has a choice. Sending on a websocket, `Default` is
/// text when the data is UTF-8 and binary otherwise; `Text` is the
/// caller's word that it is UTF-8 (see [`websocket::WsCodec::encode`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    Default,
    Text,
    Binary,
}

/// Framing supplied from outside the codec: a `custom://` plugin's
/// `Protocol`. It is plugin code, so it lives in the worker, which lends it
/// to each decode and encode.
pub trait Framer {
    /// Length of the first packet of `input`; `Ok(None)`: more bytes needed.
    fn packet_len(&self, input: &[u8]) -> Result<Option<usize>, String>;
    /// Where the message sits inside a whole packet, as offsets.
    fn message(&self, packet: &[u8]) -> (usize, usize);
    /// The packet for an outgoing message; `None` when encoding failed.
    fn encode(&self, data: &[u8]) -> Option<Vec<u8>>;
}

/// What a decode step may use besides its input.
pub struct DecodeCx<'c> {
    /// `max_package_size`: the largest message (or HTTP body) accepted.
    pub max: usize,
    /// Bytes for the peer that the step produced (a pong, a close frame,
    /// `100 Continue`, an error response). Appended to; the caller writes
    /// them before acting on the step, then clears the buffer.
    pub replies: &'c mut Vec<u8>,
    /// The plugin's framing, for `custom://`.
    pub framer: Option<&'c dyn Framer>,
}

/// What the start of the input holds. Steps that consume bytes say how
/// many; the caller passes the rest (with more appended) next time.
#[derive(Debug)]
pub enum Step<'a> {
    /// More bytes are needed; nothing was consumed.
    NeedMore,
    /// Bytes with nothing for the application: a fragment kept, a ping
    /// answered (see `replies`), a pong, `100 Continue` (consumes 0).
    Skip { consumed: usize },
    /// One message: borrowed from the input (websocket payloads unmasked in
    /// place), or joined from fragments. The kind travels with it.
    Message {
        data: Cow<'a, [u8]>,
        kind: Kind,
        consumed: usize,
    },
    /// A whole HTTP request, borrowed from the input and the scratch. The
    /// codec now owes it an answer ([`HttpConn::pending`]).
    Request {
        request: http::Request<'a>,
        consumed: usize,
    },
    /// A valid websocket upgrade request (server side): the application
    /// decides, then calls [`websocket::WsCodec::accept`] or `refuse`.
    Upgrade {
        request: http::Request<'a>,
        consumed: usize,
    },
    /// The server accepted our websocket handshake (client side).
    Connected { consumed: usize },
    /// The peer closed cleanly; our answer is in `replies`: write it, then
    /// close.
    Closed,
}

/// Why a connection cannot go on. Whatever the peer should still hear (a
/// close frame, an error response) is already in `replies`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Broken text, frame or custom framing: nothing to tell the peer.
    #[error(transparent)]
    Framing(#[from] ProtocolError),
    /// A bad HTTP request; the error response is in `replies`.
    #[error(transparent)]
    Http(#[from] http::HttpError),
    /// A websocket handshake refused with an HTTP status (in `replies`).
    #[error("websocket handshake refused: {status} {reason}")]
    Refused {
        status: u16,
        reason: Cow<'static, str>,
    },
    /// A websocket peer broke the protocol; the close frame with `code` is
    /// in `replies`.
    #[error("websocket protocol error ({code}): {reason}")]
    Websocket { code: u16, reason: String },
    /// The server did not accept our websocket handshake (client side).
    #[error("{0}")]
    Rejected(String),
}

/// Bytes an encoder made for one outgoing message, kept by the caller so
/// the parts it returns can borrow them: a header, and a payload copy only
/// where the payload itself must change (masked client frames, custom).
#[derive(Default)]
pub struct Wire {
    head: [u8; 14],
    head_len: u8,
    body: Vec<u8>,
}

impl Wire {
    /// The first `len` bytes of `h` are the header. Copied whole: a copy of
    /// fixed size compiles to a few moves, a variable one to a `memcpy` call.
    fn set_head<const N: usize>(&mut self, h: [u8; N], len: usize) {
        self.head[..N].copy_from_slice(&h);
        self.head_len = len as u8;
    }

    fn head(&self) -> &[u8] {
        &self.head[..self.head_len as usize]
    }
}

/// Per-connection decoder state. It serializes, so a connection handed to
/// another process on reload carries on mid-message.
#[derive(Serialize, Deserialize)]
pub enum Codec {
    /// Each read is one message.
    Tcp,
    Text(text::TextDecoder),
    Frame,
    /// Either side: handshake, then frames.
    Websocket(Box<websocket::WsCodec>),
    Http(Box<HttpConn>),
    /// Framed by the plugin's `Protocol` (a [`Framer`] the worker lends).
    Custom,
}

/// An HTTP connection: the request decoder and the requests still owed an
/// answer, oldest first (answers go out in request order).
#[derive(Default, Serialize, Deserialize)]
pub struct HttpConn {
    pub decoder: http::HttpDecoder,
    pub pending: std::collections::VecDeque<Pending>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Pending {
    pub keep_alive: bool,
    /// A HEAD request: answer with headers only.
    pub head: bool,
}

impl HttpConn {
    #[inline]
    fn decode<'a>(
        &mut self,
        input: &'a [u8],
        scratch: &'a mut http::Scratch<'a>,
        cx: &mut DecodeCx<'_>,
    ) -> Result<Step<'a>, Error> {
        let limits = http::Limits::new(cx.max);
        match self.decoder.decode(input, &limits, scratch) {
            Ok(Some(http::Event::Continue)) => {
                cx.replies
                    .extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                Ok(Step::Skip { consumed: 0 })
            }
            Ok(Some(http::Event::Request { request, consumed })) => {
                self.pending.push_back(Pending {
                    keep_alive: request.keep_alive,
                    head: request.method == "HEAD",
                });
                Ok(Step::Request { request, consumed })
            }
            Ok(None) => Ok(Step::NeedMore),
            Err(e) => {
                // Answers still owed would follow the error: none will come.
                self.pending.clear();
                let resp = http::error_response(e.status());
                http::encode_response(&resp, false, false, cx.replies);
                Err(e.into())
            }
        }
    }
}

impl Codec {
    /// The codec of a connection we accepted.
    pub fn new(scheme: Scheme) -> Codec {
        match scheme {
            Scheme::Tcp => Codec::Tcp,
            Scheme::Text => Codec::Text(text::TextDecoder::default()),
            Scheme::Frame => Codec::Frame,
            Scheme::Websocket => Codec::Websocket(Box::new(websocket::WsCodec::server())),
            Scheme::Http => Codec::Http(Box::default()),
            Scheme::Custom => Codec::Custom,
        }
    }

    /// The codec of a connection we opened: a websocket is the client side.
    pub fn client(scheme: Scheme) -> Codec {
        match scheme {
            Scheme::Websocket => Codec::Websocket(Box::new(websocket::WsCodec::client())),
            s => Codec::new(s),
        }
    }

    /// Decodes what the start of `input` holds. Websocket payloads are
    /// unmasked in place, so a message is handed over as a slice of `input`;
    /// an HTTP request borrows `input` and `scratch` (fresh for each call).
    // Inlined into the caller's loop: this is the hot path of every read.
    #[inline]
    pub fn decode<'a>(
        &mut self,
        input: &'a mut [u8],
        scratch: &'a mut http::Scratch<'a>,
        cx: &mut DecodeCx<'_>,
    ) -> Result<Step<'a>, Error> {
        let max = cx.max;
        let found = match self {
            Codec::Tcp if input.is_empty() => None,
            Codec::Tcp => Some(Message {
                start: 0,
                end: input.len(),
                consumed: input.len(),
            }),
            Codec::Text(t) => t.decode(input, max)?,
            Codec::Frame => frame::decode(input, max)?,
            Codec::Custom => custom::decode(cx.framer, input, max)?,
            Codec::Websocket(ws) => return ws.decode(input, scratch, cx),
            Codec::Http(h) => return h.decode(input, scratch, cx),
        };
        Ok(match found {
            Some(m) => m.step(input, Kind::Default),
            None => Step::NeedMore,
        })
    }

    /// The bytes of one outgoing message, as parts to write in order:
    /// usually a header from `wire`, the payload itself, and a trailer.
    #[inline]
    pub fn encode<'d>(
        &self,
        data: &'d [u8],
        kind: Kind,
        framer: Option<&dyn Framer>,
        wire: &'d mut Wire,
    ) -> Result<[&'d [u8]; 3], ProtocolError> {
        match self {
            // HTTP answers are whole responses, built by `http::encode_head`.
            Codec::Tcp | Codec::Http(_) => Ok([&[], data, &[]]),
            Codec::Text(_) => Ok([&[], data, b"\n"]),
            Codec::Frame => {
                wire.set_head(frame::header(data.len())?, 4);
                Ok([wire.head(), data, &[]])
            }
            Codec::Websocket(ws) => Ok(ws.encode(data, kind, wire)),
            Codec::Custom => {
                wire.body = custom::encode(framer, data)?;
                Ok([&[], &wire.body, &[]])
            }
        }
    }

    /// Appends one outgoing message, framed, to `out`: the bytes of
    /// [`Codec::encode`]'s parts, joined, without a [`Wire`] or the parts
    /// in between (a reply gathered while a read is dispatched). `None`
    /// where `encode` must be used: HTTP, `custom://`, a websocket client.
    // Always inlined into the host's per-message send: as a hint, LLVM's
    // choice changed with unrelated code, and the call cost the echo path
    // about 40 instructions per message.
    #[inline(always)]
    pub fn encode_into(
        &self,
        data: &[u8],
        kind: Kind,
        out: &mut Vec<u8>,
    ) -> Option<Result<(), ProtocolError>> {
        match self {
            Codec::Tcp => out.extend_from_slice(data),
            Codec::Text(_) => {
                out.reserve(data.len() + 1);
                out.extend_from_slice(data);
                out.push(b'\n');
            }
            Codec::Frame => {
                let head = match frame::header(data.len()) {
                    Ok(h) => h,
                    Err(e) => return Some(Err(e)),
                };
                out.reserve(head.len() + data.len());
                out.extend_from_slice(&head);
                out.extend_from_slice(data);
            }
            Codec::Websocket(ws) => {
                if !ws.encode_into(data, kind, out) {
                    return None;
                }
            }
            Codec::Http(_) | Codec::Custom => return None,
        }
        Some(Ok(()))
    }

    /// permessage-deflate for a websocket, before its handshake: agreed to
    /// when the client offers it (server), or offered (client). Other
    /// protocols have nothing to compress.
    pub fn set_deflate(&mut self, on: bool) {
        if let Codec::Websocket(ws) = self {
            ws.set_deflate(on);
        }
    }

    /// Whether the connection is past any handshake, so the plugin knows it.
    pub fn established(&self) -> bool {
        match self {
            Codec::Websocket(ws) => ws.is_open(),
            _ => true,
        }
    }

    /// Whether the application may send yet: not on a websocket we accepted
    /// before its handshake is done (a client may send right behind its
    /// request).
    pub fn sendable(&self) -> bool {
        match self {
            Codec::Websocket(ws) => ws.sendable(),
            _ => true,
        }
    }

    /// The protocol's name, as `wm-host connections` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Codec::Tcp => "tcp",
            Codec::Text(_) => "text",
            Codec::Frame => "frame",
            Codec::Websocket(ws) if ws.role() == websocket::Role::Client => "ws-client",
            Codec::Websocket(_) => "websocket",
            Codec::Http(_) => "http",
            Codec::Custom => "custom",
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A step, owned, for comparing.
    #[derive(Debug, PartialEq, Eq)]
    pub(crate) enum Ev {
        Msg(Kind, Vec<u8>),
        /// Method, path and body.
        Request(String, String, Vec<u8>),
        Upgrade(String),
        Connected,
        Closed,
        Failed(Error),
    }

    /// Feeds `chunks` one at a time, as reads would, keeping what a step
    /// did not consume, as the worker does. Upgrades are accepted. Returns
    /// the steps and the replies.
    pub(crate) fn run(
        codec: &mut Codec,
        chunks: &[&[u8]],
        max: usize,
        framer: Option<&dyn Framer>,
    ) -> (Vec<Ev>, Vec<u8>) {
        let (mut buf, mut replies, mut ev) = (Vec::new(), Vec::new(), Vec::new());
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            let mut pos = 0;
            loop {
                let mut scratch = http::Scratch::new();
                let mut cx = DecodeCx {
                    max,
                    replies: &mut replies,
                    framer,
                };
                let (e, used) = match codec.decode(&mut buf[pos..], &mut scratch, &mut cx) {
                    Ok(Step::NeedMore) => break,
                    Ok(Step::Skip { consumed }) => (None, consumed),
                    Ok(Step::Message {
                        data,
                        kind,
                        consumed,
                    }) => (Some(Ev::Msg(kind, data.into_owned())), consumed),
                    Ok(Step::Request { request, consumed }) => {
                        let (m, p) = (request.method.to_string(), request.path.to_string());
                        (Some(Ev::Request(m, p, request.body.to_vec())), consumed)
                    }
                    Ok(Step::Upgrade { request, consumed }) => {
                        let path = request.path.to_string();
                        let Codec::Websocket(ws) = &mut *codec else {
                            panic!("upgrade from {}", codec.name())
                        };
                        ws.accept(&mut replies);
                        (Some(Ev::Upgrade(path)), consumed)
                    }
                    Ok(Step::Connected { consumed }) => (Some(Ev::Connected), consumed),
                    Ok(Step::Closed) => {
                        ev.push(Ev::Closed);
                        return (ev, replies);
                    }
                    Err(e) => {
                        ev.push(Ev::Failed(e));
                        return (ev, replies);
                    }
                };
                ev.extend(e);
                pos += used;
            }
            buf.drain(..pos);
        }
        (ev, replies)
    }

    /// The messages of a framing without replies, or its first error.
    pub(crate) fn feed(
        codec: &mut Codec,
        chunks: &[&[u8]],
        max: usize,
    ) -> Result<Vec<Vec<u8>>, ProtocolError> {
        let mut out = Vec::new();
        for e in run(codec, chunks, max, None).0 {
            match e {
                Ev::Msg(_, m) => out.push(m),
                Ev::Failed(Error::Framing(e)) => return Err(e),
                other => panic!("unexpected {other:?}"),
            }
        }
        Ok(out)
    }

    /// Every way of cutting `wire` in two gives what it gives whole.
    pub(crate) fn same_at_every_split(
        new: impl Fn() -> Codec,
        wire: &[u8],
        max: usize,
        framer: Option<&dyn Framer>,
    ) -> (Vec<Ev>, Vec<u8>) {
        let whole = run(&mut new(), &[wire], max, framer);
        for cut in 0..=wire.len() {
            let split = run(&mut new(), &[&wire[..cut], &wire[cut..]], max, framer);
            assert_eq!(split.0, whole.0, "split at {cut}");
            // Replies that carry a fresh mask differ in their bytes only.
            assert_eq!(split.1.len(), whole.1.len(), "replies, split at {cut}");
        }
        whole
    }

    fn msg(s: &[u8]) -> Ev {
        Ev::Msg(Kind::Default, s.to_vec())
    }

    #[test]
    fn tcp_takes_each_read_whole() {
        let mut c = Codec::new(Scheme::Tcp);
        let got = feed(&mut c, &[b"ab", b"c\n"], 100).unwrap();
        assert_eq!(got, vec![b"ab".to_vec(), b"c\n".to_vec()]);
        let mut w = Wire::default();
        let parts = c.encode(b"abc", Kind::Default, None, &mut w);
        assert_eq!(parts.unwrap(), [&b""[..], b"abc", b""]);
    }

    #[test]
    fn encodings_match_workerman_wire_formats() {
        let mut w = Wire::default();
        let c = Codec::new(Scheme::Text);
        assert_eq!(
            c.encode(b"hello", Kind::Default, None, &mut w)
                .unwrap()
                .concat(),
            b"hello\n"
        );
        let c = Codec::new(Scheme::Frame);
        assert_eq!(
            c.encode(b"jhdxr", Kind::Default, None, &mut w)
                .unwrap()
                .concat(),
            b"\x00\x00\x00\x09jhdxr"
        );
    }

    #[test]
    fn text_and_frame_steps_at_every_split() {
        let (ev, replies) = same_at_every_split(
            || Codec::new(Scheme::Text),
            b"one\r\ntwo\n\nfour\n",
            100,
            None,
        );
        assert_eq!(ev, vec![msg(b"one"), msg(b"two"), msg(b""), msg(b"four")]);
        assert!(replies.is_empty());
        let wire = b"\x00\x00\x00\x09jhdxr\x00\x00\x00\x04\x00\x00\x00\x05!";
        let (ev, _) = same_at_every_split(|| Codec::new(Scheme::Frame), wire, 100, None);
        assert_eq!(ev, vec![msg(b"jhdxr"), msg(b""), msg(b"!")]);
    }

    #[test]
    fn http_steps_at_every_split() {
        let wire = b"GET /a?x HTTP/1.1\r\nHost: h\r\n\r\n\
                     POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyz\
                     PUT /c HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n";
        let new = || Codec::new(Scheme::Http);
        let (ev, replies) = same_at_every_split(new, wire, 1000, None);
        let req = |m: &str, p: &str, b: &[u8]| Ev::Request(m.into(), p.into(), b.to_vec());
        assert_eq!(
            ev,
            vec![
                req("GET", "/a", b""),
                req("POST", "/b", b"xyz"),
                req("PUT", "/c", b"ab")
            ]
        );
        assert!(replies.is_empty());
        // Each request is owed an answer, in order.
        let mut c = new();
        run(&mut c, &[wire], 1000, None);
        let Codec::Http(h) = &c else { unreachable!() };
        assert_eq!(h.pending.len(), 3);
    }

    #[test]
    fn http_continue_and_errors_are_replies() {
        let mut c = Codec::new(Scheme::Http);
        let head =
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n";
        let (ev, replies) = run(&mut c, &[head], 1000, None);
        assert!(ev.is_empty());
        assert_eq!(replies, b"HTTP/1.1 100 Continue\r\n\r\n");
        let (ev, replies) = run(&mut Codec::new(Scheme::Http), &[b"BAD\r\n\r\n"], 1000, None);
        assert!(matches!(&ev[..], [Ev::Failed(Error::Http(e))] if e.status() == 400));
        assert!(replies.starts_with(b"HTTP/1.1 400 "), "{replies:?}");
    }

    /// Netstrings (`5:hello,`), as `plugins/netstring` frames them.
    struct Netstring;

    impl Framer for Netstring {
        fn packet_len(&self, input: &[u8]) -> Result<Option<usize>, String> {
            let Some(colon) = input.iter().position(|&b| b == b':') else {
                return Ok(None);
            };
            let n: usize = std::str::from_utf8(&input[..colon])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or("bad length")?;
            Ok(Some(colon + 1 + n + 1))
        }

        fn message(&self, packet: &[u8]) -> (usize, usize) {
            let colon = packet.iter().position(|&b| b == b':').unwrap_or(0);
            (colon + 1, packet.len() - 1)
        }

        fn encode(&self, data: &[u8]) -> Option<Vec<u8>> {
            Some([format!("{}:", data.len()).as_bytes(), data, b","].concat())
        }
    }

    #[test]
    fn custom_framing_takes_the_same_step() {
        let f: &dyn Framer = &Netstring;
        let (ev, _) = same_at_every_split(
            || Codec::new(Scheme::Custom),
            b"5:hello,0:,3:abc,",
            100,
            Some(f),
        );
        assert_eq!(ev, vec![msg(b"hello"), msg(b""), msg(b"abc")]);
        let c = Codec::new(Scheme::Custom);
        let mut w = Wire::default();
        let parts = c.encode(b"hi", Kind::Default, Some(f), &mut w).unwrap();
        assert_eq!(parts.concat(), b"2:hi,");
        // The host still enforces max_package_size and refuses bad input.
        let (ev, _) = run(&mut Codec::new(Scheme::Custom), &[b"50:"], 10, Some(f));
        assert!(matches!(&ev[..], [Ev::Failed(Error::Framing(_))]), "{ev:?}");
        let (ev, _) = run(&mut Codec::new(Scheme::Custom), &[b"x:"], 10, Some(f));
        assert!(
            matches!(&ev[..], [Ev::Failed(Error::Framing(ProtocolError::Custom(e)))] if e == "bad length")
        );
    }

    /// A framer that places the message outside its packet.
    struct OutOfPacket;

    impl Framer for OutOfPacket {
        fn packet_len(&self, input: &[u8]) -> Result<Option<usize>, String> {
            Ok(Some(input.len()))
        }

        fn message(&self, packet: &[u8]) -> (usize, usize) {
            (0, packet.len() + 10)
        }

        fn encode(&self, data: &[u8]) -> Option<Vec<u8>> {
            Some(data.to_vec())
        }
    }

    #[test]
    fn custom_offsets_outside_the_packet_are_an_error_not_a_panic() {
        let f: &dyn Framer = &OutOfPacket;
        let (ev, _) = run(&mut Codec::new(Scheme::Custom), &[b"abc"], 10, Some(f));
        assert!(
            matches!(
                &ev[..],
                [Ev::Failed(Error::Framing(ProtocolError::Custom(_)))]
            ),
            "{ev:?}"
        );
    }
}
