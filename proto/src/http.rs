//! HTTP/1.1 server side (RFC 9112): a request decoder and a response encoder.
//! Pure like the other codecs: the worker owns the socket and the buffer, and
//! feeds the decoder the connection's unconsumed input on every read.
//!
//! The decoder never consumes part of a request: `Event::Request` reports the
//! bytes of the whole request (head and body), and until then the caller keeps
//! passing the same input, grown by what it has read since.

use std::io::Write as _;
use std::mem::{self, MaybeUninit};
use std::time::{SystemTime, UNIX_EPOCH};

use abi_stable::std_types::{RStr, Tuple2};
use serde::{Deserialize, Serialize};

pub const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// More header fields than this is answered like an oversize head (431).
const MAX_HEADERS: usize = 128;
/// A chunk-size line longer than this is garbage, not a size with extensions.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Request line and header fields, blank line included; also caps trailers.
    pub max_header_bytes: usize,
    /// Decoded body (the sum of the chunks when chunked).
    pub max_body_bytes: usize,
}

impl Limits {
    pub fn new(max_body_bytes: usize) -> Limits {
        Limits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_body_bytes,
        }
    }
}

impl Default for Limits {
    /// The header default and the config's default `max_package_size`.
    fn default() -> Limits {
        Limits::new(10 * 1024 * 1024)
    }
}

/// A header field as plugins receive it (the ABI's pair of strings), so a
/// request reaches `on_request` without being copied.
pub type Field<'a> = Tuple2<RStr<'a>, RStr<'a>>;

/// A request, borrowed from the input it was decoded from and from the
/// [`Scratch`] given to the decoder.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Request<'a> {
    pub method: &'a str,
    /// The request target up to `?`, still percent-encoded. An absolute-form
    /// target (`http://host/p`) is reduced to its path.
    pub path: &'a str,
    /// What follows `?`, without it; empty when there is none.
    pub query: &'a str,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Values without surrounding whitespace; one that was not UTF-8 has
    /// U+FFFD in place of the bad bytes.
    pub headers: &'a [Field<'a>],
    /// Decoded: the chunks joined when chunked.
    pub body: &'a [u8],
    /// Whether the connection may carry another request after this one.
    pub keep_alive: bool,
}

impl<'a> Request<'a> {
    /// The first value of header `name`, compared case-insensitively.
    pub fn header(&self, name: &str) -> Option<&'a str> {
        self.headers
            .iter()
            .find(|f| f.0.as_str().eq_ignore_ascii_case(name))
            .map(|f| f.1.as_str())
    }
}

/// What a decoded [`Request`] borrows besides its input: the header fields,
/// header values that had to be made UTF-8, and a chunked body. Meant to be
/// made afresh for each request, on the stack: only those last two allocate.
pub struct Scratch<'a> {
    /// Left uninitialized: filling 4 KiB for every decode call showed in
    /// profiles. The decoder writes as many as the request has.
    fields: [MaybeUninit<Field<'a>>; MAX_HEADERS],
    /// `None` until needed (rare): the worker makes a scratch for every
    /// decode step of every codec, and `None` costs one store to make and
    /// one test to drop.
    lossy: Option<Vec<String>>,
    body: Option<Vec<u8>>,
}

impl Scratch<'_> {
    pub fn new() -> Self {
        Scratch {
            fields: [MaybeUninit::uninit(); MAX_HEADERS],
            lossy: None,
            body: None,
        }
    }
}

impl Default for Scratch<'_> {
    fn default() -> Self {
        Scratch::new()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event<'a> {
    /// A complete request; `consumed` bytes of input were used.
    Request {
        request: Request<'a>,
        consumed: usize,
    },
    /// The request asked for `Expect: 100-continue` and its body is not all
    /// here: write `HTTP/1.1 100 Continue\r\n\r\n` now. Consumes nothing;
    /// reported at most once per request.
    Continue,
}

/// Why a request was refused. The connection cannot be trusted after any of
/// these: answer `error_response(err.status())` and close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    #[error("request head is over {max} bytes")]
    HeadTooLarge { max: usize },
    #[error("request has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    #[error("request trailers are over {max} bytes")]
    TrailersTooLarge { max: usize },
    #[error("request body of {size} bytes is over the limit ({max})")]
    BodyTooLarge { size: u64, max: usize },
    #[error("malformed request head: {0}")]
    Malformed(String),
    #[error("HTTP/1.1 request without a Host header")]
    MissingHost,
    #[error("request with more than one Host header")]
    DuplicateHost,
    #[error("invalid Content-Length {0:?}")]
    BadContentLength(String),
    #[error("request has both Transfer-Encoding and Content-Length")]
    LengthAndTransferEncoding,
    #[error("Transfer-Encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    #[error("unsupported Transfer-Encoding {0:?}")]
    UnsupportedTransferEncoding(String),
    #[error("malformed chunked body: {0}")]
    BadChunk(&'static str),
}

impl HttpError {
    pub fn status(&self) -> u16 {
        match self {
            HttpError::HeadTooLarge { .. }
            | HttpError::TooManyHeaders
            | HttpError::TrailersTooLarge { .. } => 431,
            HttpError::BodyTooLarge { .. } => 413,
            HttpError::UnsupportedTransferEncoding(_) => 501,
            HttpError::Malformed(_)
            | HttpError::MissingHost
            | HttpError::DuplicateHost
            | HttpError::BadContentLength(_)
            | HttpError::LengthAndTransferEncoding
            | HttpError::TransferEncodingInHttp10
            | HttpError::BadChunk(_) => 400,
        }
    }
}

/// Per-connection decoder. After an error its state is meaningless: close.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct HttpDecoder {
    state: State,
}

#[derive(Debug, Serialize, Deserialize)]
enum State {
    /// `scanned` bytes at the start of the input are known not to end the
    /// head, so a head arriving in many reads is scanned once.
    Head {
        scanned: usize,
    },
    Body(Pending),
}

impl Default for State {
    fn default() -> State {
        State::Head { scanned: 0 }
    }
}

/// A request whose head is checked and whose body is still arriving. Only
/// how its body is framed is kept, not the head: the input still holds it.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    head_len: usize,
    body: Body,
    /// `Expect: 100-continue` not yet answered.
    owe_continue: bool,
}

#[derive(Debug, Serialize, Deserialize)]
enum Body {
    /// `len` bytes right after the head.
    Fixed { len: usize },
    /// `pos`: input bytes already taken into `data` or skipped.
    Chunked {
        pos: usize,
        step: Step,
        trailer_bytes: usize,
        data: Vec<u8>,
    },
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Step {
    Size,
    Data(u64),
    DataEnd,
    Trailers,
}

impl HttpDecoder {
    pub fn new() -> HttpDecoder {
        HttpDecoder::default()
    }

    /// Between requests or within a head; false once a head is complete
    /// and its body is still arriving.
    pub fn reading_head(&self) -> bool {
        matches!(self.state, State::Head { .. })
    }

    /// Looks for the next request at the start of `input`. `Ok(None)` means
    /// more bytes are needed; the caller must then pass the same input again,
    /// with more appended. A request borrows `input` and `scratch`.
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
        limits: &Limits,
        scratch: &'a mut Scratch<'a>,
    ) -> Result<Option<Event<'a>>, HttpError> {
        let Scratch {
            fields,
            lossy,
            body,
        } = scratch;
        let (mut request, consumed) = match &mut self.state {
            State::Head { scanned } => {
                let max = limits.max_header_bytes;
                let Some(head_len) = find_head_end(input, scanned, max)? else {
                    return Ok(None);
                };
                let (request, mut pending) = parse_head(&input[..head_len], limits, fields, lossy)?;
                let done = pending.read_body(input, limits)?;
                self.state = State::Body(pending);
                match done {
                    Some(consumed) => (request, consumed),
                    None => return Ok(self.wait_for_body()),
                }
            }
            State::Body(pending) => match pending.read_body(input, limits)? {
                // The head was checked when it arrived; it is parsed again
                // for the view only now that the request is whole.
                Some(consumed) => {
                    let head = &input[..pending.head_len];
                    (parse_head(head, limits, fields, lossy)?.0, consumed)
                }
                None => return Ok(self.wait_for_body()),
            },
        };
        let State::Body(pending) = mem::take(&mut self.state) else {
            return Ok(None);
        };
        request.body = match pending.body {
            Body::Fixed { len } => &input[pending.head_len..pending.head_len + len],
            Body::Chunked { data, .. } => body.insert(data),
        };
        Ok(Some(Event::Request { request, consumed }))
    }

    fn wait_for_body<'a>(&mut self) -> Option<Event<'a>> {
        match &mut self.state {
            State::Body(p) if p.owe_continue => {
                p.owe_continue = false;
                Some(Event::Continue)
            }
            _ => None,
        }
    }
}

/// Returns the length of the head (blank line included) once it is all here.
fn find_head_end(
    input: &[u8],
    scanned: &mut usize,
    max: usize,
) -> Result<Option<usize>, HttpError> {
    // Blank lines before the request line are ignored (RFC 9112 §2.2).
    let start = match input.first() {
        Some(b'\r' | b'\n') => input
            .iter()
            .position(|&b| b != b'\r' && b != b'\n')
            .unwrap_or(input.len()),
        _ => 0,
    };
    let mut i = (*scanned).clamp(start, input.len());
    // The head ends at "\n\n" or "\n\r\n"; httparse accepts bare LF too.
    let end = loop {
        let Some(off) = memchr::memchr(b'\n', &input[i..]) else {
            i = input.len();
            break None;
        };
        let nl = i + off;
        match (input.get(nl + 1), input.get(nl + 2)) {
            (Some(b'\n'), _) => break Some(nl + 2),
            (Some(b'\r'), Some(b'\n')) => break Some(nl + 3),
            // Could still become a terminator: look again from here.
            (None, _) | (Some(b'\r'), None) => {
                i = nl;
                break None;
            }
            _ => i = nl + 1,
        }
    };
    match end {
        Some(end) if end > max => Err(HttpError::HeadTooLarge { max }),
        Some(end) => Ok(Some(end)),
        // Refuse early rather than buffer a head that can never fit.
        None if input.len() > max => Err(HttpError::HeadTooLarge { max }),
        None => {
            *scanned = i;
            Ok(None)
        }
    }
}

/// Header fields `parse_head` notes as it meets them (bits of `seen`).
const CONTENT_LENGTH: u8 = 1;
const TRANSFER_ENCODING: u8 = 2;
const CONNECTION: u8 = 4;
const EXPECT: u8 = 8;

/// Parses and checks a complete head; the request's header fields go into
/// `fields`, and values that are not UTF-8 are made so in `lossy`.
fn parse_head<'a>(
    head: &'a [u8],
    limits: &Limits,
    fields: &'a mut [MaybeUninit<Field<'a>>; MAX_HEADERS],
    lossy: &'a mut Option<Vec<String>>,
) -> Result<(Request<'a>, Pending), HttpError> {
    let mut slots = [MaybeUninit::uninit(); MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut []);
    match parsed.parse_with_uninit_headers(head, &mut slots) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => {}
        Ok(_) => {
            return Err(HttpError::Malformed(
                "head does not end where expected".into(),
            ))
        }
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::TooManyHeaders),
        Err(e) => return Err(HttpError::Malformed(e.to_string())),
    }
    // A complete parse fills all three.
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(HttpError::Malformed("incomplete request line".into()));
    };
    // The fields the decoder reads itself are noted in the one pass that
    // fills `fields`: how many Host fields there are, and which of the
    // others occur (only those are looked at again, by name).
    let mut hosts = 0usize;
    let mut seen = 0u8;
    let mut n = 0;
    for (field, h) in fields.iter_mut().zip(parsed.headers.iter()) {
        let raw = trim_ows(h.value);
        let value = if raw.is_ascii() {
            // SAFETY: ASCII is UTF-8.
            unsafe { std::str::from_utf8_unchecked(raw) }
        } else {
            match std::str::from_utf8(raw) {
                Ok(v) => v,
                Err(_) => {
                    let text = String::from_utf8_lossy(raw).into_owned();
                    lossy.get_or_insert_with(Vec::new).push(text);
                    ""
                }
            }
        };
        let name = h.name;
        match name.len() {
            4 if name.eq_ignore_ascii_case("host") => hosts += 1,
            6 if name.eq_ignore_ascii_case("expect") => seen |= EXPECT,
            10 if name.eq_ignore_ascii_case("connection") => seen |= CONNECTION,
            14 if name.eq_ignore_ascii_case("content-length") => seen |= CONTENT_LENGTH,
            17 if name.eq_ignore_ascii_case("transfer-encoding") => seen |= TRANSFER_ENCODING,
            _ => {}
        }
        field.write(Tuple2(RStr::from_str(name), RStr::from_str(value)));
        n += 1;
    }
    if let Some(lossy) = lossy {
        // Rare: filled in once `lossy` is complete, as it may have moved.
        let lossy: &'a Vec<String> = lossy;
        let mut texts = lossy.iter();
        for (field, h) in fields.iter_mut().zip(parsed.headers.iter()) {
            if std::str::from_utf8(trim_ows(h.value)).is_err() {
                let text = texts.next().map_or("", String::as_str);
                field.write(Tuple2(RStr::from_str(h.name), RStr::from_str(text)));
            }
        }
    }
    let fields: &'a [MaybeUninit<Field<'a>>] = fields;
    // SAFETY: the first `n` fields were written just above.
    let headers: &'a [Field<'a>] =
        unsafe { std::slice::from_raw_parts(fields.as_ptr().cast::<Field<'a>>(), n) };
    let values = |name: &'static str| {
        headers
            .iter()
            .filter(move |f| f.0.as_str().eq_ignore_ascii_case(name))
            .map(|f| f.1.as_str())
    };
    // Comma-separated list elements across all fields of that name.
    let tokens = |name: &'static str| {
        values(name)
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty())
    };
    // Whether one of those elements is `token`: the same answer as
    // `tokens(name).any(..)`, with the list split by hand (a value is
    // usually one element, and `split` costs more than the compare).
    let has_token = |name: &'static str, token: &str| {
        values(name).any(|v| {
            let mut rest = v;
            loop {
                let (t, more) = match rest.bytes().position(|b| b == b',') {
                    Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                    None => (rest, None),
                };
                if t.trim().eq_ignore_ascii_case(token) {
                    return true;
                }
                match more {
                    Some(m) => rest = m,
                    None => return false,
                }
            }
        })
    };

    match hosts {
        0 if version == 1 => return Err(HttpError::MissingHost),
        0 | 1 => {}
        _ => return Err(HttpError::DuplicateHost),
    }

    let mut length: Option<u64> = None;
    if seen & CONTENT_LENGTH != 0 {
        for v in values("content-length") {
            for part in v.split(',').map(str::trim) {
                // `parse` alone would accept "+5"; only digits are a length.
                let n = (!part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| part.parse::<u64>().ok())
                    .flatten()
                    .ok_or_else(|| HttpError::BadContentLength(v.to_owned()))?;
                if length.is_some_and(|l| l != n) {
                    return Err(HttpError::BadContentLength(v.to_owned()));
                }
                length = Some(n);
            }
        }
    }

    let chunked = if seen & TRANSFER_ENCODING != 0 {
        // Both framings at once is how requests get smuggled past proxies.
        if length.is_some() {
            return Err(HttpError::LengthAndTransferEncoding);
        }
        if version == 0 {
            return Err(HttpError::TransferEncodingInHttp10);
        }
        let codings: Vec<&str> = tokens("transfer-encoding").collect();
        if !matches!(codings[..], [c] if c.eq_ignore_ascii_case("chunked")) {
            return Err(HttpError::UnsupportedTransferEncoding(codings.join(", ")));
        }
        true
    } else {
        false
    };

    let max = limits.max_body_bytes;
    let length = length.unwrap_or(0);
    if length > max as u64 {
        return Err(HttpError::BodyTooLarge { size: length, max });
    }

    // Without a Connection field: HTTP/1.1 keeps the connection, 1.0 not.
    let keep_alive = if seen & CONNECTION == 0 {
        version == 1
    } else if version == 1 {
        !has_token("connection", "close")
    } else {
        has_token("connection", "keep-alive")
    };
    // HTTP/1.0 clients do not know 100 Continue (RFC 9110 §10.1.1).
    let owe_continue = version == 1
        && (chunked || length > 0)
        && seen & EXPECT != 0
        && values("expect").any(|v| v.eq_ignore_ascii_case("100-continue"));

    let (path, query) = split_target(target);
    let body = if chunked {
        Body::Chunked {
            pos: head.len(),
            step: Step::Size,
            trailer_bytes: 0,
            data: Vec::new(),
        }
    } else {
        Body::Fixed {
            len: length as usize,
        }
    };
    let request = Request {
        method,
        path,
        query,
        version,
        headers,
        body: &[],
        keep_alive,
    };
    let pending = Pending {
        head_len: head.len(),
        body,
        owe_continue,
    };
    Ok((request, pending))
}

/// Without the spaces and tabs around a field value.
fn trim_ows(v: &[u8]) -> &[u8] {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = v.iter().position(|b| !ows(b)).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    &v[start..end]
}

/// Splits a request target into path and query, reducing the absolute form
/// (which servers must accept, RFC 9112 §3.2.2) to its path.
fn split_target(target: &str) -> (&str, &str) {
    // Origin form, what nearly every request has: no scheme to look for.
    if target.starts_with('/') {
        return match memchr::memchr(b'?', target.as_bytes()) {
            Some(i) => (&target[..i], &target[i + 1..]),
            None => (target, ""),
        };
    }
    let has_scheme = |p: &str| {
        target
            .get(..p.len())
            .is_some_and(|t| t.eq_ignore_ascii_case(p))
    };
    let origin = if has_scheme("http://") || has_scheme("https://") {
        let after_scheme = &target[target.find("//").map_or(0, |i| i + 2)..];
        match after_scheme.find(['/', '?']) {
            Some(i) if after_scheme[i..].starts_with('/') => &after_scheme[i..],
            Some(i) => return ("/", &after_scheme[i + 1..]),
            None => "/",
        }
    } else {
        target
    };
    match origin.split_once('?') {
        Some((p, q)) => (p, q),
        None => (origin, ""),
    }
}

impl Pending {
    /// Takes what body bytes `input` has; returns the request's total length
    /// once the body is complete.
    fn read_body(&mut self, input: &[u8], limits: &Limits) -> Result<Option<usize>, HttpError> {
        match &mut self.body {
            Body::Fixed { len } => {
                let end = self.head_len + *len;
                Ok((input.len() >= end).then_some(end))
            }
            Body::Chunked {
                pos,
                step,
                trailer_bytes,
                data,
            } => read_chunks(input, pos, step, trailer_bytes, data, limits),
        }
    }
}

fn read_chunks(
    input: &[u8],
    pos: &mut usize,
    step: &mut Step,
    trailer_bytes: &mut usize,
    body: &mut Vec<u8>,
    limits: &Limits,
) -> Result<Option<usize>, HttpError> {
    loop {
        match *step {
            Step::Size => {
                let start = *pos;
                let line = take_line(input, pos);
                // The same limit whether the line came whole or in pieces
                // (bytes before its `\n`), so the outcome never depends on
                // how the input was cut into reads.
                let before_newline = line.map_or(input.len(), |_| *pos - 1) - start;
                if before_newline > MAX_CHUNK_LINE {
                    return Err(HttpError::BadChunk("chunk size line too long"));
                }
                let Some(line) = line else {
                    return Ok(None);
                };
                let size = chunk_size(line)?;
                if size == 0 {
                    *step = Step::Trailers;
                    continue;
                }
                let max = limits.max_body_bytes;
                let total = (body.len() as u64).saturating_add(size);
                if total > max as u64 {
                    return Err(HttpError::BodyTooLarge { size: total, max });
                }
                *step = Step::Data(size);
            }
            Step::Data(left) => {
                let avail = &input[*pos..];
                let n = (avail.len() as u64).min(left) as usize;
                body.extend_from_slice(&avail[..n]);
                *pos += n;
                if (n as u64) < left {
                    *step = Step::Data(left - n as u64);
                    return Ok(None);
                }
                *step = Step::DataEnd;
            }
            Step::DataEnd => {
                // Checked byte by byte so junk fails now, not after a line's worth.
                match input[*pos..] {
                    [] | [b'\r'] => return Ok(None),
                    [b'\n', ..] => *pos += 1,
                    [b'\r', b'\n', ..] => *pos += 2,
                    _ => return Err(HttpError::BadChunk("chunk data not followed by CRLF")),
                }
                *step = Step::Size;
            }
            Step::Trailers => {
                let max = limits.max_header_bytes;
                let Some(line) = take_line(input, pos) else {
                    if *trailer_bytes + (input.len() - *pos) > max {
                        return Err(HttpError::TrailersTooLarge { max });
                    }
                    return Ok(None);
                };
                if line.is_empty() {
                    return Ok(Some(*pos));
                }
                // Trailer fields are dropped: nothing here acts on them.
                *trailer_bytes += line.len() + 2;
                if *trailer_bytes > max {
                    return Err(HttpError::TrailersTooLarge { max });
                }
            }
        }
    }
}

/// The line at `pos` without its `\n` or `\r\n`, advancing past it.
fn take_line<'a>(input: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = &input[*pos..];
    let nl = rest.iter().position(|&b| b == b'\n')?;
    *pos += nl + 1;
    let line = &rest[..nl];
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

/// `chunk-size [ chunk-ext ]`; extensions are ignored.
fn chunk_size(line: &[u8]) -> Result<u64, HttpError> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(HttpError::BadChunk("chunk size is not hexadecimal"));
    }
    let mut size: u64 = 0;
    for &b in &line[..digits] {
        let d = (b as char).to_digit(16).unwrap_or(0) as u64;
        size = size
            .checked_mul(16)
            .and_then(|s| s.checked_add(d))
            .ok_or(HttpError::BadChunk("chunk size overflows"))?;
    }
    let rest = &line[digits..];
    let rest = &rest[rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count()..];
    if !rest.is_empty() && rest[0] != b';' {
        return Err(HttpError::BadChunk("junk after chunk size"));
    }
    Ok(size)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body: body.into(),
        }
    }

    #[cfg(test)]
    pub fn header(&self, name: &str) -> Option<&str> {
        self.fields()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The header fields as string pairs, for [`encode_head`].
    pub fn fields(&self) -> impl Iterator<Item = (&str, &str)> + Clone {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        417 => "Expectation Failed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}

/// A plain-text response such as "431 Request Header Fields Too Large".
pub fn error_response(status: u16) -> Response {
    let mut resp = Response::new(status, format!("{status} {}", reason(status)).trim_end());
    resp.headers
        .push(("Content-Type".into(), "text/plain; charset=utf-8".into()));
    resp
}

/// Serializes `resp`, adding what the caller left out: see [`encode_head`].
/// `head_only` (a HEAD request) keeps the real Content-Length but drops the body.
pub fn encode_response(resp: &Response, keep_alive: bool, head_only: bool, out: &mut Vec<u8>) {
    encode_response_at(resp, keep_alive, head_only, SystemTime::now(), out)
}

/// `encode_response` with the clock given, for tests.
pub fn encode_response_at(
    resp: &Response,
    keep_alive: bool,
    head_only: bool,
    now: SystemTime,
    out: &mut Vec<u8>,
) {
    let mut date = DateCache::default();
    let head = ResponseHead {
        status: resp.status,
        body_len: resp.body.len(),
        keep_alive,
        head_only,
    };
    if encode_head(&head, resp.fields(), date.at(now), out) {
        out.extend_from_slice(&resp.body);
    }
}

/// What [`encode_head`] needs to know besides the header fields.
#[derive(Debug, Clone, Copy)]
pub struct ResponseHead {
    pub status: u16,
    pub body_len: usize,
    /// Written as the Connection header (one in the fields is replaced).
    pub keep_alive: bool,
    /// A HEAD request: the real Content-Length, but no body.
    pub head_only: bool,
}

/// Appends a response head to `out`, adding what the caller left out:
/// `Server`, `Date` (`date`) and `Content-Length` unless given, and always
/// `Connection`. Returns whether the body follows.
pub fn encode_head<'h, F>(head: &ResponseHead, fields: F, date: &str, out: &mut Vec<u8>) -> bool
where
    F: IntoIterator<Item = (&'h str, &'h str)>,
{
    write_head(head, fields, date, false, out, None).with_body
}

/// What [`write_head`] wrote.
#[derive(Debug, Clone, Copy)]
struct Written {
    with_body: bool,
    keep_alive: bool,
    /// Where the `Date` value is in the output, if it added one.
    date_at: Option<usize>,
    /// Where the plugin's fields start in the output.
    fields_at: usize,
    /// Every field was written as given (none dropped, none a Connection).
    verbatim: bool,
}

/// Whether a name or value would let a plugin forge headers or responses.
fn has_line_break(s: &str) -> bool {
    // No early exit, so that it compiles to a vector loop.
    s.bytes()
        .fold(false, |bad, b| bad | matches!(b, b'\r' | b'\n' | 0))
}

/// [`encode_head`] in one pass over `fields`. With `fold_close`, a
/// `Connection: close` among them ends keep-alive. With `lens`, the name and
/// value lengths of the fields written are pushed there.
fn write_head<'h, F>(
    head: &ResponseHead,
    fields: F,
    date: &str,
    fold_close: bool,
    out: &mut Vec<u8>,
    mut lens: Option<&mut Vec<(usize, usize)>>,
) -> Written
where
    F: IntoIterator<Item = (&'h str, &'h str)>,
{
    const SERVER: &[u8] = b"Server: wm-host\r\n";
    // 1xx, 204 and 304 never have a body, nor a length (RFC 9110 §8.6).
    let bodiless = matches!(head.status, 100..=199 | 204 | 304);
    out.extend_from_slice(b"HTTP/1.1 ");
    push_decimal(out, u64::from(head.status));
    out.push(b' ');
    out.extend_from_slice(reason(head.status).as_bytes());
    out.extend_from_slice(b"\r\n");
    // Server and Date come before the fields; written now and taken out
    // again in the rare case the fields have their own.
    let added = out.len();
    out.extend_from_slice(SERVER);
    out.extend_from_slice(b"Date: ");
    let mut date_at = Some(out.len());
    out.extend_from_slice(date.as_bytes());
    out.extend_from_slice(b"\r\n");
    let fields_at = out.len();
    let (mut server, mut dated, mut framed, mut close) = (false, false, false, false);
    let mut verbatim = true;
    for (k, v) in fields {
        // Lengths first: most names are none of these.
        let connection = match k.len() {
            4 => {
                dated |= k.eq_ignore_ascii_case("date");
                false
            }
            6 => {
                server |= k.eq_ignore_ascii_case("server");
                false
            }
            10 => k.eq_ignore_ascii_case("connection"),
            14 => {
                framed |= k.eq_ignore_ascii_case("content-length");
                false
            }
            17 => {
                framed |= k.eq_ignore_ascii_case("transfer-encoding");
                false
            }
            _ => false,
        };
        if connection {
            close |= v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"));
        }
        if k.is_empty() || has_line_break(k) || has_line_break(v) {
            tracing::warn!(header = %k.escape_debug(), "dropping response header with CR, LF or NUL");
            verbatim = false;
            continue;
        }
        if connection {
            verbatim = false;
            continue;
        }
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let Some(lens) = lens.as_deref_mut() {
            lens.push((k.len(), v.len()));
        }
    }
    let mut fields_at = fields_at;
    if server || dated {
        let (from, to) = match (server, dated) {
            (true, true) => (added, fields_at),
            (true, false) => (added, added + SERVER.len()),
            _ => (added + SERVER.len(), fields_at),
        };
        out.drain(from..to);
        fields_at -= to - from;
        date_at = match date_at {
            _ if dated => None,
            Some(at) => Some(at - SERVER.len()),
            None => None,
        };
    }
    if !bodiless && !framed {
        out.extend_from_slice(b"Content-Length: ");
        push_decimal(out, head.body_len as u64);
        out.extend_from_slice(b"\r\n");
    }
    let keep_alive = head.keep_alive && !(fold_close && close);
    out.extend_from_slice(if keep_alive {
        b"Connection: keep-alive\r\n\r\n"
    } else {
        b"Connection: close\r\n\r\n"
    });
    Written {
        with_body: !head.head_only && !bodiless,
        keep_alive,
        date_at,
        fields_at,
        verbatim,
    }
}

/// Appends `n` in decimal.
fn push_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&buf[i..]);
}

/// Whether header fields say `Connection: close`. [`encode_head`] writes its
/// own Connection header, so the caller folds this into `keep_alive`.
pub fn asks_close<'h>(fields: impl IntoIterator<Item = (&'h str, &'h str)>) -> bool {
    fields.into_iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("connection")
            && v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close"))
    })
}

/// The last head [`HeadCache::encode`] wrote, reused while answers repeat:
/// same status, body length, keep-alive, HEAD and the same header fields
/// (compared by content, as a plugin's array can reuse an address), with
/// only the `Date` written again.
#[derive(Debug, Default)]
pub struct HeadCache {
    head: Vec<u8>,
    /// What `head` answers; `None` when it is not to be reused.
    key: Option<HeadKey>,
    /// Name and value lengths of the fields in `head`, in order.
    lens: Vec<(usize, usize)>,
    fields_at: usize,
    date_at: Option<usize>,
    with_body: bool,
    keep_alive: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HeadKey {
    status: u16,
    body_len: usize,
    keep_alive: bool,
    head_only: bool,
    date_len: usize,
}

impl HeadCache {
    /// The head of an answer, as [`encode_head`] writes it, but for the
    /// request's keep-alive in `head.keep_alive`, which a
    /// `Connection: close` among `fields` ends. Returns the head, whether
    /// the body follows and whether the connection stays open.
    // Inlined: the hit (every answer but the first of its shape) is a few
    // compares and the Date copy; the miss is out of line.
    #[inline]
    pub fn encode<'h, F>(
        &mut self,
        head: &ResponseHead,
        fields: F,
        date: &str,
    ) -> (&[u8], bool, bool)
    where
        F: IntoIterator<Item = (&'h str, &'h str)>,
        F::IntoIter: Clone,
    {
        let fields = fields.into_iter();
        let key = HeadKey {
            status: head.status,
            body_len: head.body_len,
            keep_alive: head.keep_alive,
            head_only: head.head_only,
            date_len: date.len(),
        };
        if self.key == Some(key) && self.same_fields(fields.clone()) {
            if let Some(at) = self.date_at {
                let date = date.as_bytes();
                // Always 29 bytes from DateCache: a copy of known length
                // is a few moves, not a `memcpy` call.
                if date.len() == 29 {
                    self.head[at..at + 29].copy_from_slice(&date[..29]);
                } else {
                    self.head[at..at + date.len()].copy_from_slice(date);
                }
            }
            return (&self.head, self.with_body, self.keep_alive);
        }
        self.write(head, fields, date, key)
    }

    /// A head unlike the cached one: written, and cached if it can be
    /// compared next time.
    #[inline(never)]
    fn write<'h>(
        &mut self,
        head: &ResponseHead,
        fields: impl Iterator<Item = (&'h str, &'h str)>,
        date: &str,
        key: HeadKey,
    ) -> (&[u8], bool, bool) {
        self.head.clear();
        self.lens.clear();
        let w = write_head(
            head,
            fields,
            date,
            true,
            &mut self.head,
            Some(&mut self.lens),
        );
        // A dropped field or a Connection one is not in `head` to compare.
        self.key = w.verbatim.then_some(key);
        self.fields_at = w.fields_at;
        self.date_at = w.date_at;
        self.with_body = w.with_body;
        self.keep_alive = w.keep_alive;
        (&self.head, w.with_body, w.keep_alive)
    }

    /// Whether `fields` are the ones written in `head`.
    #[inline]
    fn same_fields<'h>(&self, fields: impl Iterator<Item = (&'h str, &'h str)>) -> bool {
        let mut at = self.fields_at;
        let mut lens = self.lens.iter();
        for (k, v) in fields {
            match lens.next() {
                Some(&(kl, vl)) if kl == k.len() && vl == v.len() => {
                    let (Some(name), Some(value)) = (
                        self.head.get(at..at + kl),
                        self.head.get(at + kl + 2..at + kl + 2 + vl),
                    ) else {
                        return false;
                    };
                    if !same_bytes(name, k.as_bytes()) || !same_bytes(value, v.as_bytes()) {
                        return false;
                    }
                    at += kl + vl + 4;
                }
                _ => return false,
            }
        }
        lens.next().is_none()
    }
}

/// `a == b` for slices of the same length, without a `memcmp` call for
/// short ones (header names and values mostly are): two overlapping word
/// loads per side.
#[inline(always)]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    fn word<const W: usize>(s: &[u8], at: usize) -> [u8; W] {
        s[at..at + W].try_into().unwrap_or([0; W])
    }
    match n {
        0 => true,
        1..=3 => a[0] == b[0] && a[n / 2] == b[n / 2] && a[n - 1] == b[n - 1],
        4..=7 => word::<4>(a, 0) == word::<4>(b, 0) && word::<4>(a, n - 4) == word::<4>(b, n - 4),
        8..=16 => word::<8>(a, 0) == word::<8>(b, 0) && word::<8>(a, n - 8) == word::<8>(b, n - 8),
        _ => a == b,
    }
}

/// httpdate panics outside 1970..=9999, so clamp into it.
fn clamp_to_http_dates(t: SystemTime) -> SystemTime {
    const YEAR_10000: u64 = 253_402_300_800;
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .min(YEAR_10000 - 1);
    UNIX_EPOCH + std::time::Duration::from_secs(secs)
}

/// IMF-fixdate, e.g. `Thu, 01 Jan 2015 00:00:00 GMT`.
pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(clamp_to_http_dates(t))
}

/// The `Date` value, formatted when the second changes rather than for every
/// response.
#[derive(Debug, Default)]
pub struct DateCache {
    /// The second `text` is for, once formatted.
    secs: Option<u64>,
    /// An IMF-fixdate is always 29 bytes (the year has four digits).
    text: [u8; 29],
}

impl DateCache {
    pub fn at(&mut self, now: SystemTime) -> &str {
        let now = clamp_to_http_dates(now);
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if self.secs != Some(secs) {
            // Cannot fail: the text fits exactly.
            let _ = write!(&mut self.text[..], "{}", httpdate::HttpDate::from(now));
            if !self.text.is_ascii() {
                // Never so (an IMF-fixdate is ASCII); `text` must stay ASCII.
                self.text = *b"Thu, 01 Jan 1970 00:00:00 GMT";
            }
            self.secs = Some(secs);
        }
        self.text()
    }

    /// `text` as a string, without validating it for every answer.
    fn text(&self) -> &str {
        // SAFETY: `text` is only ever ASCII: its initial zeros, or what
        // `at` wrote, which it checks.
        unsafe { std::str::from_utf8_unchecked(&self.text) }
    }

    pub fn now(&mut self) -> &str {
        self.at(SystemTime::now())
    }

    /// Reads the clock for [`DateCache::current`]: a server calls it once
    /// per wake-up rather than reading the clock for every answer.
    pub fn refresh(&mut self) {
        self.now();
    }

    /// [`DateCache::refresh`], returning how long the text stays current
    /// (the rest of this second), so a caller that reads a monotonic clock
    /// anyway can leave the wall clock alone until then. `None` before 1970.
    pub fn refresh_for(&mut self) -> Option<std::time::Duration> {
        let now = SystemTime::now();
        self.at(now);
        let sub = now.duration_since(UNIX_EPOCH).ok()?.subsec_nanos();
        Some(std::time::Duration::from_nanos(u64::from(
            1_000_000_000 - sub,
        )))
    }

    /// The `Date` of the last [`DateCache::refresh`] (or `at`), reading the
    /// clock only if there was none.
    #[inline]
    pub fn current(&mut self) -> &str {
        if self.secs.is_none() {
            self.refresh();
        }
        self.text()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_header_bytes: 1024,
            max_body_bytes: 100,
        }
    }

    /// A request copied out of the input, to outlive it.
    #[derive(Debug, PartialEq)]
    struct Owned {
        method: String,
        path: String,
        query: String,
        version: u8,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        keep_alive: bool,
    }

    impl Owned {
        fn new(r: &Request<'_>) -> Owned {
            Owned {
                method: r.method.into(),
                path: r.path.into(),
                query: r.query.into(),
                version: r.version,
                headers: (r.headers.iter())
                    .map(|f| (f.0.as_str().into(), f.1.as_str().into()))
                    .collect(),
                body: r.body.into(),
                keep_alive: r.keep_alive,
            }
        }

        fn header(&self, name: &str) -> Option<&str> {
            let (_, v) = self
                .headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))?;
            Some(v)
        }
    }

    /// A request whose body is still arriving when its connection is handed
    /// to another process: the decoder's state travels through serde with
    /// the kept input, and `100 Continue` is not owed twice.
    #[test]
    fn a_request_mid_body_survives_serialization() {
        let mut d = HttpDecoder::new();
        let head =
            b"POST /up HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\nab";
        let mut scratch = Scratch::new();
        let ev = d.decode(head, &limits(), &mut scratch).unwrap();
        assert!(matches!(ev, Some(Event::Continue)));
        let saved = postcard::to_allocvec(&d).unwrap();
        let mut moved: HttpDecoder = postcard::from_bytes(&saved).unwrap();
        let mut input = head.to_vec();
        let mut scratch = Scratch::new();
        assert!(moved
            .decode(&input, &limits(), &mut scratch)
            .unwrap()
            .is_none());
        input.extend_from_slice(b"cde");
        let mut scratch = Scratch::new();
        match moved.decode(&input, &limits(), &mut scratch).unwrap() {
            Some(Event::Request { request, consumed }) => {
                assert_eq!(request.body, b"abcde");
                assert_eq!(consumed, input.len());
            }
            other => panic!("{other:?}"),
        }
    }

    /// Feeds `chunks` one at a time as reads would, answering Continue like a
    /// worker; returns the requests and how many Continues were asked for.
    fn feed(chunks: &[&[u8]], limits: &Limits) -> Result<(Vec<Owned>, usize), HttpError> {
        let mut d = HttpDecoder::new();
        let mut buf = Vec::new();
        let (mut reqs, mut continues) = (Vec::new(), 0);
        for chunk in chunks {
            buf.extend_from_slice(chunk);
            loop {
                let mut scratch = Scratch::new();
                match d.decode(&buf, limits, &mut scratch)? {
                    Some(Event::Request { request, consumed }) => {
                        reqs.push(Owned::new(&request));
                        buf.drain(..consumed);
                    }
                    Some(Event::Continue) => continues += 1,
                    None => break,
                }
            }
        }
        assert!(
            buf.is_empty(),
            "left over: {:?}",
            String::from_utf8_lossy(&buf)
        );
        Ok((reqs, continues))
    }

    fn one(input: &[u8]) -> Result<Owned, HttpError> {
        let (mut reqs, _) = feed(&[input], &limits())?;
        assert_eq!(reqs.len(), 1);
        Ok(reqs.remove(0))
    }

    fn err(input: &[u8]) -> HttpError {
        let mut d = HttpDecoder::new();
        loop {
            match d.decode(input, &limits(), &mut Scratch::new()) {
                Err(e) => return e,
                Ok(Some(Event::Continue)) => continue,
                Ok(other) => panic!("expected an error, got {other:?}"),
            }
        }
    }

    /// Every way of cutting `input` in two must decode like the whole.
    fn assert_split_everywhere(input: &[u8]) -> Vec<Owned> {
        let (whole, _) = feed(&[input], &limits()).unwrap();
        for i in 0..=input.len() {
            let (parts, _) = feed(&[&input[..i], &input[i..]], &limits()).unwrap();
            assert_eq!(parts, whole, "split at {i}");
        }
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(feed(&bytes, &limits()).unwrap().0, whole);
        whole
    }

    const GET: &[u8] = b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: example.com\r\nAccept: */*\r\n\r\n";

    #[test]
    fn simple_get() {
        let r = one(GET).unwrap();
        assert_eq!(r.method, "GET");
        assert_eq!(r.path, "/a/b");
        assert_eq!(r.query, "x=1&y=2");
        assert_eq!(r.version, 1);
        assert_eq!(r.header("HOST"), Some("example.com"));
        assert_eq!(r.header("accept"), Some("*/*"));
        assert_eq!(r.header("missing"), None);
        assert!(r.body.is_empty());
        assert!(r.keep_alive);
    }

    #[test]
    fn values_are_trimmed_and_made_utf8() {
        let input = b"POST / HTTP/1.1\r\nHost: h\r\nX-A: \t a b\t \r\nX-Latin: caf\xe9 \r\n\
X-B: \xff\r\nX-C: \xc3\xa9\r\nContent-Length: 2\r\n\r\nok";
        let reqs = assert_split_everywhere(input);
        let r = &reqs[0];
        assert_eq!(r.header("x-a"), Some("a b"));
        assert_eq!(r.header("x-latin"), Some("caf\u{fffd}"));
        assert_eq!(r.header("x-b"), Some("\u{fffd}"));
        assert_eq!(r.header("x-c"), Some("\u{e9}"));
        assert_eq!(r.body, b"ok");
    }

    #[test]
    fn consumed_is_the_whole_request() {
        let mut input = GET.to_vec();
        input.extend_from_slice(b"GET /next");
        let mut scratch = Scratch::new();
        let ev = HttpDecoder::new().decode(&input, &limits(), &mut scratch);
        assert!(matches!(ev, Ok(Some(Event::Request { consumed, .. })) if consumed == GET.len()));
    }

    #[test]
    fn get_split_at_every_byte() {
        assert_split_everywhere(GET);
    }

    #[test]
    fn leading_blank_lines_and_bare_lf_are_accepted() {
        let r = one(b"\r\n\nGET / HTTP/1.1\nHost: h\n\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/"));
        assert_split_everywhere(b"\r\nGET / HTTP/1.1\nHost: h\r\n\n");
    }

    #[test]
    fn absolute_form_target_is_reduced_to_its_path() {
        let r = one(b"GET http://h:80/p/q?z HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert_eq!((r.path.as_str(), r.query.as_str()), ("/p/q", "z"));
        let r = one(b"GET HTTP://h?z HTTP/1.1\r\nHost: h\r\n\r\n").unwrap();
        assert_eq!((r.path.as_str(), r.query.as_str()), ("/", "z"));
    }

    #[test]
    fn three_pipelined_requests() {
        let input = b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n\
POST /2 HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc\
GET /3 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n";
        let reqs = assert_split_everywhere(input);
        let paths: Vec<&str> = reqs.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(paths, ["/1", "/2", "/3"]);
        assert_eq!(reqs[1].body, b"abc");
        assert!(!reqs[2].keep_alive);
    }

    #[test]
    fn post_with_content_length_split() {
        let input = b"POST /form HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n\r\nhello world";
        let reqs = assert_split_everywhere(input);
        assert_eq!(reqs[0].body, b"hello world");
        let r = one(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n").unwrap();
        assert!(r.body.is_empty());
    }

    #[test]
    fn equal_duplicate_content_lengths_are_one() {
        let r = one(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2, 2\r\nContent-Length: 2\r\n\r\nok",
        );
        assert_eq!(r.unwrap().body, b"ok");
    }

    const CHUNKED: &[u8] = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\
5;name=value\r\nhello\r\n\
1 ; x\r\n \r\n\
A\r\n0123456789\r\n\
0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n";

    #[test]
    fn chunked_with_extensions_and_trailers_split_everywhere() {
        let reqs = assert_split_everywhere(CHUNKED);
        assert_eq!(reqs[0].body, b"hello 0123456789");
        assert_eq!(reqs[0].header("x-trailer"), None);
    }

    #[test]
    fn chunked_then_pipelined_request() {
        let mut input = CHUNKED.to_vec();
        input.extend_from_slice(GET);
        let reqs = assert_split_everywhere(&input);
        assert_eq!(reqs.len(), 2);
        assert_eq!(reqs[1].path, "/a/b");
    }

    #[test]
    fn chunked_coding_name_is_case_insensitive() {
        let r = one(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n");
        assert!(r.unwrap().body.is_empty());
    }

    #[test]
    fn expect_continue_is_reported_once_then_the_request() {
        let head =
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n";
        let mut d = HttpDecoder::new();
        let mut buf = head.to_vec();
        assert_eq!(
            d.decode(&buf, &limits(), &mut Scratch::new()),
            Ok(Some(Event::Continue))
        );
        assert_eq!(d.decode(&buf, &limits(), &mut Scratch::new()), Ok(None));
        buf.extend_from_slice(b"da");
        assert_eq!(d.decode(&buf, &limits(), &mut Scratch::new()), Ok(None));
        buf.extend_from_slice(b"ta");
        match d.decode(&buf, &limits(), &mut Scratch::new()) {
            Ok(Some(Event::Request { request, consumed })) => {
                assert_eq!(request.body, b"data");
                assert_eq!(consumed, buf.len());
            }
            other => panic!("{other:?}"),
        }
        // Split anywhere, still exactly one Continue per request.
        for i in head.len()..=buf.len() {
            let (reqs, continues) = feed(&[&buf[..i], &buf[i..]], &limits()).unwrap();
            assert_eq!((reqs.len(), continues), (1, usize::from(i < buf.len())));
        }
    }

    #[test]
    fn expect_continue_not_reported_when_not_needed() {
        // Body already here, no body, or HTTP/1.0.
        let cases: [&[u8]; 3] = [
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
            b"GET / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n\r\n",
            b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
        ];
        for input in cases {
            let (reqs, continues) = feed(&[input], &limits()).unwrap();
            assert_eq!((reqs.len(), continues), (1, 0));
        }
    }

    #[test]
    fn expect_continue_with_chunked_body() {
        let head = b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (reqs, continues) = feed(&[head, b"2\r\nok\r\n0\r\n\r\n"], &limits()).unwrap();
        assert_eq!((reqs[0].body.as_slice(), continues), (&b"ok"[..], 1));
    }

    #[test]
    fn oversize_body_refused_before_continue() {
        let input =
            b"POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 101\r\n\r\n";
        assert_eq!(err(input).status(), 413);
    }

    #[test]
    fn huge_header_is_431_complete_or_not() {
        let mut input = b"GET / HTTP/1.1\r\nHost: h\r\nX-Big: ".to_vec();
        input.resize(2000, b'a');
        // Incomplete: refused without waiting for the end of the head.
        assert_eq!(err(&input), HttpError::HeadTooLarge { max: 1024 });
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(err(&input).status(), 431);
        // Incomplete but still under the limit: wait.
        let mut d = HttpDecoder::new();
        assert_eq!(
            d.decode(&input[..1000], &limits(), &mut Scratch::new()),
            Ok(None)
        );
    }

    #[test]
    fn head_exactly_at_the_limit_is_accepted() {
        let mut input = b"GET / HTTP/1.1\r\nHost: h\r\nX: ".to_vec();
        input.resize(1024 - 4, b'a');
        input.extend_from_slice(b"\r\n\r\n");
        assert_eq!(input.len(), 1024);
        assert!(one(&input).is_ok());
        input.insert(30, b'a');
        assert_eq!(err(&input).status(), 431);
    }

    #[test]
    fn too_many_headers_is_431() {
        let mut input = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            input.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        input.extend_from_slice(b"\r\n");
        let big = Limits {
            max_header_bytes: 1 << 20,
            max_body_bytes: 0,
        };
        let e = HttpDecoder::new()
            .decode(&input, &big, &mut Scratch::new())
            .unwrap_err();
        assert_eq!((e.clone(), e.status()), (HttpError::TooManyHeaders, 431));
    }

    #[test]
    fn big_content_length_is_413_before_the_body() {
        let e = err(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n");
        assert_eq!(
            e,
            HttpError::BodyTooLarge {
                size: 101,
                max: 100
            }
        );
        assert_eq!(e.status(), 413);
        let mut at_limit = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n".to_vec();
        at_limit.resize(at_limit.len() + 100, b'a');
        assert_eq!(one(&at_limit).unwrap().body.len(), 100);
    }

    #[test]
    fn big_chunked_total_is_413() {
        let mut input =
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        input.extend_from_slice(b"32\r\n");
        input.extend_from_slice(&[b'a'; 50]);
        input.extend_from_slice(b"\r\n33\r\n");
        // 50 + 51 > 100, refused as soon as the second size is read.
        assert_eq!(
            err(&input),
            HttpError::BodyTooLarge {
                size: 101,
                max: 100
            }
        );
        let e = err(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\n",
        );
        assert_eq!(e.status(), 413);
    }

    #[test]
    fn bad_requests_are_400() {
        let cases: &[&[u8]] = &[
            b"GET / HTTP/1.1\r\nHost: h\r\nBad Header: x\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
            b"GET / FTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3x\r\n\r\nabc",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3, 4\r\n\r\nabcd",
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 x\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabc\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000000001x\r\n",
        ];
        for input in cases {
            let e = err(input);
            assert_eq!(e.status(), 400, "{:?}: {e}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn endless_chunk_size_line_is_400() {
        let mut input =
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
        input.resize(input.len() + MAX_CHUNK_LINE + 1, b'x');
        assert_eq!(err(&input).status(), 400);
    }

    #[test]
    fn long_chunk_size_line_is_400_even_when_whole() {
        // Found by fuzzing: refused when cut into reads, accepted whole.
        let mut input =
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1;".to_vec();
        input.resize(input.len() + 5000, b'x');
        input.extend_from_slice(b"\r\na\r\n0\r\n\r\n");
        assert_eq!(err(&input).status(), 400);
    }

    #[test]
    fn oversize_trailers_are_431() {
        let mut input =
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: ".to_vec();
        input.resize(input.len() + 1100, b'x');
        assert_eq!(err(&input).status(), 431);
    }

    #[test]
    fn unsupported_transfer_encodings_are_501() {
        for te in ["gzip", "gzip, chunked", "chunked, chunked", "identity"] {
            let input = format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: {te}\r\n\r\n");
            let e = err(input.as_bytes());
            assert_eq!(e.status(), 501, "{te}");
        }
        let e = err(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(e.status(), 501);
    }

    #[test]
    fn keep_alive_rules() {
        let ka = |input: &[u8]| one(input).unwrap().keep_alive;
        assert!(ka(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n"));
        assert!(!ka(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Close\r\n\r\n"
        ));
        assert!(!ka(
            b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade, close\r\n\r\n"
        ));
        assert!(!ka(b"GET / HTTP/1.0\r\n\r\n"));
        assert!(ka(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n"));
        assert!(!ka(b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n"));
        let r = one(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert_eq!(r.version, 0);
    }

    #[test]
    fn error_statuses_and_messages() {
        assert_eq!(HttpError::MissingHost.status(), 400);
        assert_eq!(
            HttpError::BodyTooLarge { size: 5, max: 4 }.to_string(),
            "request body of 5 bytes is over the limit (4)"
        );
        assert_eq!(
            HttpError::UnsupportedTransferEncoding("gzip".into()).to_string(),
            "unsupported Transfer-Encoding \"gzip\""
        );
    }

    fn fixed_now() -> SystemTime {
        UNIX_EPOCH + std::time::Duration::from_secs(1_420_070_400)
    }

    fn encoded(resp: &Response, keep_alive: bool, head_only: bool) -> String {
        let mut out = Vec::new();
        encode_response_at(resp, keep_alive, head_only, fixed_now(), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn encode_response_exact_bytes() {
        let mut resp = Response::new(200, "hello");
        resp.headers
            .push(("Content-Type".into(), "text/plain".into()));
        assert_eq!(
            encoded(&resp, true, false),
            "HTTP/1.1 200 OK\r\nServer: wm-host\r\nDate: Thu, 01 Jan 2015 00:00:00 GMT\r\n\
Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
        );
        assert_eq!(
            encoded(&Response::new(404, ""), false, false),
            "HTTP/1.1 404 Not Found\r\nServer: wm-host\r\nDate: Thu, 01 Jan 2015 00:00:00 GMT\r\n\
Content-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn encode_response_keeps_given_headers() {
        let mut resp = Response::new(200, "abc");
        for (k, v) in [
            ("server", "other"),
            ("date", "x"),
            ("content-length", "3"),
            ("Connection", "close"),
        ] {
            resp.headers.push((k.into(), v.into()));
        }
        assert!(asks_close(resp.fields()));
        assert_eq!(
            encoded(&resp, false, false),
            "HTTP/1.1 200 OK\r\nserver: other\r\ndate: x\r\ncontent-length: 3\r\nConnection: close\r\n\r\nabc"
        );
    }

    #[test]
    fn encode_response_drops_headers_with_newlines() {
        let mut resp = Response::new(200, "");
        resp.headers
            .push(("X-A".into(), "1\r\nSet-Cookie: evil".into()));
        resp.headers.push(("X-B\n".into(), "2".into()));
        let s = encoded(&resp, true, false);
        assert!(
            !s.contains("evil") && !s.contains("X-B") && !s.contains("X-A"),
            "{s}"
        );
    }

    #[test]
    fn head_response_has_length_but_no_body() {
        let s = encoded(&Response::new(200, "hello"), true, true);
        assert!(
            s.ends_with("Content-Length: 5\r\nConnection: keep-alive\r\n\r\n"),
            "{s}"
        );
    }

    #[test]
    fn bodiless_statuses_get_no_length_nor_body() {
        for status in [204, 304] {
            let s = encoded(&Response::new(status, "x"), true, false);
            assert!(
                !s.contains("Content-Length") && s.ends_with("\r\n\r\n"),
                "{s}"
            );
        }
    }

    #[test]
    fn error_response_body_names_the_status() {
        let r = error_response(431);
        assert_eq!(r.body, b"431 Request Header Fields Too Large");
        assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
        assert_eq!(error_response(599).body, b"599");
    }

    /// `encode_head` as it was written with `core::fmt` and three passes, to
    /// check the one-pass version byte for byte.
    fn reference_head(
        head: &ResponseHead,
        fields: &[(&str, &str)],
        date: &str,
        fold_close: bool,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let keep_alive = head.keep_alive && !(fold_close && asks_close(fields.iter().copied()));
        let bodiless = matches!(head.status, 100..=199 | 204 | 304);
        let (mut server, mut dated, mut framed) = (false, false, false);
        for (k, _) in fields {
            server |= k.eq_ignore_ascii_case("server");
            dated |= k.eq_ignore_ascii_case("date");
            framed |= k.eq_ignore_ascii_case("content-length")
                || k.eq_ignore_ascii_case("transfer-encoding");
        }
        let _ = write!(out, "HTTP/1.1 {} {}\r\n", head.status, reason(head.status));
        if !server {
            out.extend_from_slice(b"Server: wm-host\r\n");
        }
        if !dated {
            let _ = write!(out, "Date: {date}\r\n");
        }
        for (k, v) in fields {
            let bad = |s: &str| s.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0));
            if k.is_empty() || bad(k) || bad(v) || k.eq_ignore_ascii_case("connection") {
                continue;
            }
            let _ = write!(out, "{k}: {v}\r\n");
        }
        if !bodiless && !framed {
            let _ = write!(out, "Content-Length: {}\r\n", head.body_len);
        }
        let conn = if keep_alive { "keep-alive" } else { "close" };
        let _ = write!(out, "Connection: {conn}\r\n\r\n");
        out
    }

    /// Field lists that cover what `write_head` treats apart.
    fn field_cases() -> Vec<Vec<(&'static str, &'static str)>> {
        let one: &[(&str, &str)] = &[
            ("Content-Type", "text/plain"),
            ("server", "other"),
            ("DATE", "x"),
            ("Content-Length", "3"),
            ("transfer-encoding", "chunked"),
            ("Connection", "keep-alive, Close"),
            ("connection", "upgrade"),
            ("X-A", "1\r\nSet-Cookie: evil"),
            ("X-B\n", "2"),
            ("", "empty name"),
            ("X-Nul", "a\0b"),
            ("Server: x", "y"),
            ("Dates", "z"),
        ];
        let mut cases = vec![vec![]];
        for a in one {
            cases.push(vec![*a]);
            for b in one {
                cases.push(vec![*a, *b]);
            }
        }
        cases.push(one.to_vec());
        cases
    }

    #[test]
    fn one_pass_head_matches_the_reference() {
        let date = "Thu, 01 Jan 2015 00:00:00 GMT";
        for fields in field_cases() {
            for status in [200, 101, 204, 304, 404, 599, 7, 65535] {
                for (keep_alive, head_only, body_len) in [
                    (true, false, 13),
                    (false, true, 0),
                    (true, true, 123_456_789),
                ] {
                    let head = ResponseHead {
                        status,
                        body_len,
                        keep_alive,
                        head_only,
                    };
                    let mut out = b"prefix".to_vec();
                    let with_body = encode_head(&head, fields.iter().copied(), date, &mut out);
                    let want = reference_head(&head, &fields, date, false);
                    assert_eq!(out[6..], want[..], "{fields:?} {status}");
                    let bodiless = matches!(status, 100..=199 | 204 | 304);
                    assert_eq!(with_body, !head_only && !bodiless);
                }
            }
        }
    }

    #[test]
    fn head_cache_answers_like_encode_head() {
        let dates = [
            "Thu, 01 Jan 2015 00:00:00 GMT",
            "Thu, 01 Jan 2015 00:00:01 GMT",
        ];
        let mut cache = HeadCache::default();
        let cases = field_cases();
        // Each case twice in a row (reused), then the next one (replaced).
        for (i, fields) in cases.iter().chain(cases.iter().rev()).enumerate() {
            for (status, body_len) in [(200, 13), (200, 13), (200, 14), (404, 14)] {
                for (keep_alive, head_only) in [(true, false), (true, false), (false, true)] {
                    let date = dates[i % 2];
                    let head = ResponseHead {
                        status,
                        body_len,
                        keep_alive,
                        head_only,
                    };
                    let (got, with_body, open) = cache.encode(&head, fields.iter().copied(), date);
                    let got = got.to_vec();
                    let want = reference_head(&head, fields, date, true);
                    assert_eq!(got, want, "{fields:?} {status}");
                    assert_eq!(open, want.ends_with(b"keep-alive\r\n\r\n"));
                    assert_eq!(with_body, !head_only);
                }
            }
        }
        // Same lengths, other contents: not the cached head.
        let head = ResponseHead {
            status: 200,
            body_len: 1,
            keep_alive: true,
            head_only: false,
        };
        let (a, _, _) = cache.encode(&head, [("X-A", "1")], dates[0]);
        assert!(a.windows(8).any(|w| w == b"X-A: 1\r\n"));
        let (b, _, _) = cache.encode(&head, [("X-A", "2")], dates[0]);
        assert!(b.windows(8).any(|w| w == b"X-A: 2\r\n"));
        let (c, _, _) = cache.encode(&head, [("X-B", "2")], dates[0]);
        assert!(c.windows(8).any(|w| w == b"X-B: 2\r\n"));
        let (d, _, _) = cache.encode(&head, [("X-B", "2"), ("X-C", "3")], dates[0]);
        assert!(d.windows(8).any(|w| w == b"X-C: 3\r\n"));
        let (e, _, _) = cache.encode(&head, [("X-B", "2")], dates[0]);
        assert!(!e.windows(3).any(|w| w == b"X-C"));
    }

    #[test]
    fn same_bytes_is_slice_equality() {
        for n in 0..40usize {
            let a: Vec<u8> = (0..n as u8).map(|b| b.wrapping_mul(7)).collect();
            assert!(same_bytes(&a, &a.clone()));
            for i in 0..n {
                let mut b = a.clone();
                b[i] ^= 0x20;
                assert!(!same_bytes(&a, &b), "length {n}, byte {i}");
            }
            assert!(!same_bytes(&a, &[a.as_slice(), b"x"].concat()));
        }
    }

    #[test]
    fn date_cache_current_reads_the_clock_once() {
        let mut c = DateCache::default();
        assert_eq!(c.current().len(), 29);
        c.at(fixed_now());
        assert_eq!(c.current(), "Thu, 01 Jan 2015 00:00:00 GMT");
        c.refresh();
        assert_ne!(c.current(), "Thu, 01 Jan 2015 00:00:00 GMT");
    }

    #[test]
    fn date_cache_refresh_for_lasts_until_the_next_second() {
        let mut c = DateCache::default();
        let before = SystemTime::now();
        let left = c.refresh_for().expect("after 1970");
        let after = SystemTime::now();
        assert!(left > std::time::Duration::ZERO);
        assert!(left <= std::time::Duration::from_secs(1));
        assert!(c.current() == http_date(before) || c.current() == http_date(after));
        // The clock was read between `before` and `after`: `left` later is
        // a whole second.
        let nanos = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_nanos();
        let (lo, hi) = (nanos(before + left), nanos(after + left));
        assert!(hi - hi % 1_000_000_000 >= lo, "{lo} {hi}");
    }

    #[test]
    fn date_cache_follows_the_clock_by_the_second() {
        let second = std::time::Duration::from_secs(1);
        let mut c = DateCache::default();
        assert_eq!(c.at(fixed_now()), "Thu, 01 Jan 2015 00:00:00 GMT");
        let later = fixed_now() + std::time::Duration::from_millis(999);
        assert_eq!(c.at(later), "Thu, 01 Jan 2015 00:00:00 GMT");
        assert_eq!(c.at(fixed_now() + second), "Thu, 01 Jan 2015 00:00:01 GMT");
        assert_eq!(c.at(UNIX_EPOCH - second), "Thu, 01 Jan 1970 00:00:00 GMT");
        let far = UNIX_EPOCH + std::time::Duration::from_secs(300_000_000_000);
        assert_eq!(c.at(far), http_date(far));
    }

    #[test]
    fn http_date_clamps_instead_of_panicking() {
        assert_eq!(http_date(fixed_now()), "Thu, 01 Jan 2015 00:00:00 GMT");
        assert_eq!(
            http_date(UNIX_EPOCH - std::time::Duration::from_secs(5)),
            "Thu, 01 Jan 1970 00:00:00 GMT"
        );
    }
}
