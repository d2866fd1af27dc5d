//! Drives a [`Codec`] the way the worker does, checking invariants at each
//! step, and the framers `custom://` tests lend it. Shared by the property
//! tests here and the fuzz targets (`fuzz/src/lib.rs` includes this file),
//! so both check the same things.
#![allow(dead_code)]

use std::borrow::Cow;
use std::mem::discriminant;

use wm_proto::http::{self, HttpDecoder, Limits};
use wm_proto::websocket::Role;
use wm_proto::{Codec, DecodeCx, Error, Framer, Kind, ProtocolError, Step};

/// A step, owned, for comparing runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Msg(Kind, Vec<u8>),
    Request(Req),
    Upgrade(String),
    Connected,
    Closed,
    Failed(Error),
}

/// A decoded HTTP request, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Req {
    pub method: String,
    pub path: String,
    pub query: String,
    pub version: u8,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub keep_alive: bool,
}

impl Req {
    fn new(r: &http::Request<'_>) -> Req {
        Req {
            method: r.method.into(),
            path: r.path.into(),
            query: r.query.into(),
            version: r.version,
            headers: r
                .headers
                .iter()
                .map(|f| (f.0.as_str().into(), f.1.as_str().into()))
                .collect(),
            body: r.body.to_vec(),
            keep_alive: r.keep_alive,
        }
    }
}

/// What the application answers to a websocket upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUpgrade {
    Accept,
    Refuse(u16),
}

/// The steps of one connection and the bytes it wrote back.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub events: Vec<Ev>,
    pub replies: Vec<u8>,
}

/// An error as far as it must not depend on how the input was cut into
/// reads: which error it is, not the sizes or texts it reports (an oversize
/// line is refused when `max` bytes are buffered without its end, or when
/// its end arrives, whichever comes first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrClass {
    TooLarge,
    BadFrameLength(u32),
    Custom,
    Http(std::mem::Discriminant<http::HttpError>, u16),
    Refused(u16),
    Websocket(u16),
    Rejected,
}

pub fn class(e: &Error) -> ErrClass {
    match e {
        Error::Framing(ProtocolError::TooLarge { .. }) => ErrClass::TooLarge,
        Error::Framing(ProtocolError::BadFrameLength(n)) => ErrClass::BadFrameLength(*n),
        Error::Framing(ProtocolError::Custom(_)) => ErrClass::Custom,
        Error::Http(h) => ErrClass::Http(discriminant(h), h.status()),
        Error::Refused { status, .. } => ErrClass::Refused(*status),
        Error::Websocket { code, .. } => ErrClass::Websocket(*code),
        Error::Rejected(_) => ErrClass::Rejected,
    }
}

/// An event with its error reduced to its [`ErrClass`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Norm {
    Ev(Ev),
    Failed(ErrClass),
}

impl Run {
    pub fn normalized(&self) -> Vec<Norm> {
        self.events
            .iter()
            .map(|e| match e {
                Ev::Failed(e) => Norm::Failed(class(e)),
                e => Norm::Ev(e.clone()),
            })
            .collect()
    }

    /// The messages, or the first error's class.
    pub fn messages(&self) -> Vec<(Kind, Vec<u8>)> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Ev::Msg(k, m) => Some((*k, m.clone())),
                _ => None,
            })
            .collect()
    }

    pub fn failed(&self) -> Option<&Error> {
        match self.events.last() {
            Some(Ev::Failed(e)) => Some(e),
            _ => None,
        }
    }
}

/// What a connection speaks, for the checks that depend on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavour {
    Plain,
    Ws,
    Http,
}

fn flavour(codec: &Codec) -> Flavour {
    match codec {
        Codec::Websocket(_) => Flavour::Ws,
        Codec::Http(_) => Flavour::Http,
        _ => Flavour::Plain,
    }
}

/// Feeds `chunks` one at a time, as reads would, keeping what a step did
/// not consume, as the worker does, until a step ends the connection. Checks
/// at every step that the codec never claims more than it was given, never
/// loops without progress, and keeps messages within `max`; panics if not.
pub fn drive(
    codec: &mut Codec,
    chunks: &[&[u8]],
    max: usize,
    framer: Option<&dyn Framer>,
    on_upgrade: OnUpgrade,
) -> Run {
    let flavour = flavour(codec);
    let mut run = Run::default();
    let mut buf: Vec<u8> = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        let mut pos = 0;
        // Steps in a row that consumed nothing: only `100 Continue` may.
        let mut idle = 0;
        loop {
            let rest_len = buf.len() - pos;
            let rest_ptr = buf[pos..].as_ptr() as usize;
            let mut scratch = http::Scratch::new();
            let mut cx = DecodeCx {
                max,
                replies: &mut run.replies,
                framer,
            };
            let step = codec.decode(&mut buf[pos..], &mut scratch, &mut cx);
            let (ev, used) = match step {
                Ok(Step::NeedMore) => break,
                Ok(Step::Skip { consumed }) => (None, consumed),
                Ok(Step::Message {
                    data,
                    kind,
                    consumed,
                }) => {
                    assert!(consumed > 0, "a message consumed nothing");
                    assert!(
                        data.len() <= max,
                        "message of {} bytes over max {max}",
                        data.len()
                    );
                    if let Cow::Borrowed(d) = &data {
                        let at = d.as_ptr() as usize;
                        assert!(
                            at >= rest_ptr && at + d.len() <= rest_ptr + consumed,
                            "a borrowed message lies outside the bytes it consumed"
                        );
                    }
                    match flavour {
                        Flavour::Ws => {
                            assert_ne!(kind, Kind::Default, "websocket message without a kind");
                            if kind == Kind::Text {
                                assert!(std::str::from_utf8(&data).is_ok(), "text not UTF-8");
                            }
                        }
                        _ => assert_eq!(kind, Kind::Default),
                    }
                    (Some(Ev::Msg(kind, data.into_owned())), consumed)
                }
                Ok(Step::Request { request, consumed }) => {
                    assert_eq!(flavour, Flavour::Http, "a request from a non-HTTP codec");
                    assert!(consumed > 0, "a request consumed nothing");
                    assert!(request.body.len() <= max, "body over max");
                    assert!(!request.method.is_empty(), "request without a method");
                    (Some(Ev::Request(Req::new(&request))), consumed)
                }
                Ok(Step::Upgrade { request, consumed }) => {
                    assert!(consumed > 0, "an upgrade consumed nothing");
                    assert_eq!(request.method, "GET");
                    let path = request.path.to_string();
                    let Codec::Websocket(ws) = &mut *codec else {
                        panic!("upgrade from {}", codec.name())
                    };
                    assert_eq!(ws.role(), Role::Server, "upgrade on a client");
                    assert!(!ws.is_open() && !ws.sendable());
                    run.events.push(Ev::Upgrade(path));
                    match on_upgrade {
                        OnUpgrade::Accept => {
                            ws.accept(&mut run.replies);
                            assert!(ws.is_open());
                        }
                        OnUpgrade::Refuse(status) => {
                            ws.refuse(status, &mut run.replies);
                            // The worker closes after the refusal.
                            return run;
                        }
                    }
                    (None, consumed)
                }
                Ok(Step::Connected { consumed }) => {
                    assert!(consumed > 0, "an answer consumed nothing");
                    assert!(codec.established());
                    (Some(Ev::Connected), consumed)
                }
                Ok(Step::Closed) => {
                    assert_eq!(flavour, Flavour::Ws, "closed by a non-websocket codec");
                    run.events.push(Ev::Closed);
                    return run;
                }
                Err(e) => {
                    check_error_reply(&e, &run.replies);
                    run.events.push(Ev::Failed(e));
                    return run;
                }
            };
            assert!(
                used <= rest_len,
                "consumed {used} of {rest_len} bytes ({})",
                codec.name()
            );
            if used == 0 {
                idle += 1;
                assert!(idle < 2, "no progress: {} steps consumed nothing", idle);
            } else {
                idle = 0;
            }
            run.events.extend(ev);
            pos += used;
        }
        buf.drain(..pos);
    }
    run
}

/// What the peer must have been told when a step fails.
fn check_error_reply(e: &Error, replies: &[u8]) {
    match e {
        Error::Http(h) => {
            let status = format!("HTTP/1.1 {} ", h.status());
            assert!(
                find(replies, status.as_bytes()).is_some(),
                "no {status} reply"
            );
        }
        Error::Refused { status, .. } => {
            let status = format!("HTTP/1.1 {status} ");
            assert!(
                find(replies, status.as_bytes()).is_some(),
                "no {status} reply"
            );
        }
        Error::Websocket { code, .. } => {
            // The close frame is the last thing written: unmasked from a
            // server, masked (and so four bytes longer) from a client.
            let c = code.to_be_bytes();
            let tail_ok = replies.ends_with(&[0x88, 2, c[0], c[1]])
                || (replies.len() >= 8 && {
                    let t = &replies[replies.len() - 8..];
                    t[0] == 0x88 && t[1] == 0x82 && [t[6] ^ t[2], t[7] ^ t[3]] == c
                });
            assert!(tail_ok, "no close frame with code {code} last");
        }
        Error::Framing(_) | Error::Rejected(_) => {}
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Replies as far as they must not depend on how the input was cut: a
/// `100 Continue` is only owed while a body is incomplete, and client frames
/// carry a fresh mask each, so only their length is compared.
pub fn same_replies(codec: &Codec, a: &[u8], b: &[u8]) -> bool {
    const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";
    match codec {
        Codec::Http(_) => strip_all(a, CONTINUE) == strip_all(b, CONTINUE),
        Codec::Websocket(ws) if ws.role() == Role::Client => a.len() == b.len(),
        _ => a == b,
    }
}

fn strip_all(mut s: &[u8], pat: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(i) = find(s, pat) {
        out.extend_from_slice(&s[..i]);
        s = &s[i + pat.len()..];
    }
    out.extend_from_slice(s);
    out
}

/// Cuts `input` into pieces at `cuts` (offsets, any order, clamped).
pub fn cut<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut at: Vec<usize> = cuts.iter().map(|&c| c.min(input.len())).collect();
    at.push(0);
    at.push(input.len());
    at.sort_unstable();
    at.dedup();
    let mut out: Vec<&[u8]> = at.windows(2).map(|w| &input[w[0]..w[1]]).collect();
    if out.is_empty() {
        out.push(input);
    }
    out
}

/// Runs `new()` on `input` whole and in `chunks`, asserting both give the
/// same steps (errors by class) and replies; returns the whole run.
pub fn assert_split_invariant(
    new: impl Fn() -> Codec,
    input: &[u8],
    chunks: &[&[u8]],
    max: usize,
    framer: Option<&dyn Framer>,
    on_upgrade: OnUpgrade,
) -> Run {
    let mut a = new();
    let whole = drive(&mut a, &[input], max, framer, on_upgrade);
    let mut b = new();
    let split = drive(&mut b, chunks, max, framer, on_upgrade);
    assert_eq!(
        whole.normalized(),
        split.normalized(),
        "steps differ whole and in {} reads",
        chunks.len()
    );
    // After an error its details may differ (a reply says so); compare the
    // replies of runs that ended well.
    if whole.failed().is_none() {
        assert!(
            same_replies(&a, &whole.replies, &split.replies),
            "replies differ whole and in {} reads:\n{:?}\n{:?}",
            chunks.len(),
            String::from_utf8_lossy(&whole.replies),
            String::from_utf8_lossy(&split.replies)
        );
    }
    whole
}

/// Drives an [`HttpDecoder`] with its own `limits` (the codec always uses
/// the default header limit), as the worker would: the same input, grown,
/// until a request is whole. Checks the same invariants as [`drive`].
pub fn drive_http(chunks: &[&[u8]], limits: &Limits) -> Vec<Result<Req, ErrClass>> {
    let mut dec = HttpDecoder::new();
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        let mut pos = 0;
        let mut idle = 0;
        loop {
            let rest = &buf[pos..];
            let mut scratch = http::Scratch::new();
            let used = match dec.decode(rest, limits, &mut scratch) {
                Ok(None) => break,
                Ok(Some(http::Event::Continue)) => {
                    idle += 1;
                    assert!(idle < 2, "Continue reported twice in a row");
                    continue;
                }
                Ok(Some(http::Event::Request { request, consumed })) => {
                    assert!(consumed > 0 && consumed <= rest.len());
                    assert!(request.body.len() <= limits.max_body_bytes);
                    let body_at = request.body.as_ptr() as usize;
                    let in_input = body_at >= rest.as_ptr() as usize
                        && body_at + request.body.len() <= rest.as_ptr() as usize + consumed;
                    if in_input && !request.body.is_empty() {
                        // A fixed-length body follows its head.
                        let head = body_at - rest.as_ptr() as usize;
                        assert!(head <= limits.max_header_bytes, "head over the limit");
                    }
                    out.push(Ok(Req::new(&request)));
                    consumed
                }
                Err(e) => {
                    out.push(Err(ErrClass::Http(discriminant(&e), e.status())));
                    return out;
                }
            };
            idle = 0;
            pos += used;
        }
        buf.drain(..pos);
    }
    out
}

/// Netstrings (`5:hello,`), as `plugins/netstring` frames them.
pub struct Netstring;

impl Framer for Netstring {
    fn packet_len(&self, input: &[u8]) -> Result<Option<usize>, String> {
        let Some(colon) = input.iter().position(|&b| b == b':') else {
            // Leading zeros are allowed, so any run of digits may still
            // become a length: refusing long ones would depend on the reads.
            if !input.iter().all(u8::is_ascii_digit) {
                return Err("bad length".into());
            }
            return Ok(None);
        };
        let n: usize = std::str::from_utf8(&input[..colon])
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .ok_or("bad length")?;
        let len = n.checked_add(colon + 2).ok_or("length overflows")?;
        match input.get(len - 1) {
            Some(b',') | None => Ok(Some(len)),
            Some(_) => Err("netstring without its comma".into()),
        }
    }

    fn message(&self, packet: &[u8]) -> (usize, usize) {
        let colon = packet.iter().position(|&b| b == b':').unwrap_or(0);
        (colon + 1, packet.len() - 1)
    }

    fn encode(&self, data: &[u8]) -> Option<Vec<u8>> {
        Some([format!("{}:", data.len()).as_bytes(), data, b","].concat())
    }
}

/// A 2-byte big-endian payload length, then the payload; `ffff` is refused.
pub struct LengthPrefix;

impl Framer for LengthPrefix {
    fn packet_len(&self, input: &[u8]) -> Result<Option<usize>, String> {
        match input.first_chunk::<2>().map(|h| u16::from_be_bytes(*h)) {
            None => Ok(None),
            Some(0xffff) => Err("reserved length".into()),
            Some(n) => Ok(Some(2 + n as usize)),
        }
    }

    fn message(&self, packet: &[u8]) -> (usize, usize) {
        (2, packet.len())
    }

    fn encode(&self, data: &[u8]) -> Option<Vec<u8>> {
        let n = u16::try_from(data.len()).ok().filter(|&n| n != 0xffff)?;
        Some([&n.to_be_bytes()[..], data].concat())
    }
}

/// The `Sec-WebSocket-Accept` value the server must answer `request` (a
/// client's handshake request) with.
pub fn accept_for(request: &[u8]) -> String {
    let req = String::from_utf8_lossy(request);
    let key = req
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .expect("a key in the client's request");
    tungstenite::handshake::derive_accept_key(key.trim().as_bytes())
}

/// A client codec and the accept value its server must send.
pub fn ws_client() -> (Codec, String) {
    let codec = Codec::client(wm_proto::Scheme::Websocket);
    let Codec::Websocket(ws) = &codec else {
        unreachable!()
    };
    let accept = accept_for(&ws.client_request("h", "/"));
    (codec, accept)
}

/// `input` with its first `marker` replaced by `with`. The websocket client
/// runs put their accept value in place of a marker so: only the first, as
/// only the answer needs it, and markers in messages then stay the same.
pub fn replace_first(input: &[u8], marker: &[u8], with: &[u8]) -> Vec<u8> {
    match find(input, marker) {
        Some(i) => [&input[..i], with, &input[i + marker.len()..]].concat(),
        None => input.to_vec(),
    }
}
