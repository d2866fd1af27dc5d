//! permessage-deflate (RFC 7692) for `websocket://`: the negotiation of its
//! parameters in the handshake, and the compression of whole messages.
//!
//! Memory is the point of the design. A deflate context is large (zlib-rs:
//! about 200–330 KiB to compress, 40 KiB to inflate with a 32 KiB window),
//! and idle websocket connections cost a few hundred bytes, so:
//!
//! - We never keep a compression context of our own between messages: as a
//!   server we answer `server_no_context_takeover` (RFC 7692 §7.1.1.1 lets a
//!   server add it unasked), as a client we offer
//!   `client_no_context_takeover`. Each outgoing message is compressed by a
//!   compressor the thread lends (one per worker thread and window size,
//!   reset between messages), so no connection holds one.
//! - The peer's context (our decompressor) is kept between messages only
//!   when the peer uses context takeover, which it may insist on; otherwise
//!   the thread lends one for the message too. Within a fragmented
//!   compressed message the connection holds it until the last fragment.
//!
//! The contexts are not serialized: a connection holding the peer's context
//! cannot move to another process ([`crate::websocket::WsCodec::movable`]).

use std::cell::RefCell;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use serde::{Deserialize, Serialize};

/// The extension's name in `Sec-WebSocket-Extensions`.
pub const NAME: &str = "permessage-deflate";

/// Our offer as a client.
pub const CLIENT_OFFER: &str =
    "permessage-deflate; client_no_context_takeover; client_max_window_bits";

/// What the deflate stream ends each message with, removed by the sender
/// and put back by the receiver (RFC 7692 §7.2.1, §7.2.2).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// One direction of the connection's compressed data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Side {
    /// The compressor starts afresh with each message.
    pub no_context_takeover: bool,
    /// Its LZ77 window: 2^bits bytes (8..=15).
    pub max_window_bits: u8,
}

/// The parameters agreed in the handshake, as we see them: what we send
/// (`ours`) and what the peer sends (`theirs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Params {
    pub ours: Side,
    pub theirs: Side,
}

/// One `name[=value]` of an extension; `None` when it has no value.
type Param<'a> = (&'a str, Option<&'a str>);

/// The elements of `Sec-WebSocket-Extensions` values: each extension's name
/// and its parameters, values unquoted. `None` for a value that is not
/// well-formed enough to read.
fn extensions<'a>(
    values: impl IntoIterator<Item = &'a str>,
) -> impl Iterator<Item = Option<(&'a str, Vec<Param<'a>>)>> {
    values
        .into_iter()
        .flat_map(|v| v.split(','))
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let mut parts = e.split(';').map(str::trim);
            let name = parts.next().filter(|n| is_token(n))?;
            let mut params = Vec::new();
            for p in parts {
                let (k, v) = match p.split_once('=') {
                    Some((k, v)) => (k.trim(), Some(unquote(v.trim())?)),
                    None => (p, None),
                };
                if !is_token(k) {
                    return None;
                }
                params.push((k, v));
            }
            Some((name, params))
        })
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A parameter value: a token, or a quoted string holding one.
fn unquote(v: &str) -> Option<&str> {
    let v = match v.strip_prefix('"') {
        Some(rest) => rest.strip_suffix('"')?,
        None => v,
    };
    is_token(v).then_some(v)
}

/// A window size: a decimal 8..=15 without leading zeros (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    match v.as_bytes() {
        [b'8'] => Some(8),
        [b'9'] => Some(9),
        [b'1', d @ b'0'..=b'5'] => Some(10 + d - b'0'),
        _ => None,
    }
}

/// A client's offer, read: `None` when it breaks RFC 7692 §7.1 (an unknown
/// or repeated parameter, a value where none belongs, a window size out of
/// range), so the server declines that offer.
#[derive(Default, Debug, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// Present, with its value if it has one.
    client_max_window_bits: Option<Option<u8>>,
}

impl Offer {
    fn read(params: &[Param<'_>]) -> Option<Offer> {
        let mut o = Offer::default();
        let mut seen = Vec::with_capacity(params.len());
        for &(k, v) in params {
            if seen.contains(&k) {
                return None;
            }
            seen.push(k);
            match (k, v) {
                ("server_no_context_takeover", None) => o.server_no_context_takeover = true,
                ("client_no_context_takeover", None) => o.client_no_context_takeover = true,
                ("server_max_window_bits", Some(v)) => {
                    o.server_max_window_bits = Some(window_bits(v)?)
                }
                ("client_max_window_bits", None) => o.client_max_window_bits = Some(None),
                ("client_max_window_bits", Some(v)) => {
                    o.client_max_window_bits = Some(Some(window_bits(v)?))
                }
                _ => return None,
            }
        }
        Some(o)
    }
}

/// Server: the first acceptable permessage-deflate offer among the
/// request's `Sec-WebSocket-Extensions` values, as the parameters to use and
/// the value of our answer's `Sec-WebSocket-Extensions`. `None`: no offer
/// we can take; the connection goes on uncompressed.
pub fn negotiate<'a>(values: impl IntoIterator<Item = &'a str>) -> Option<(Params, String)> {
    extensions(values).find_map(|ext| {
        let (name, params) = ext?;
        if !name.eq_ignore_ascii_case(NAME) {
            return None;
        }
        let offer = Offer::read(&params)?;
        // Our own context never outlives a message (see the module doc).
        let mut answer = String::from("permessage-deflate; server_no_context_takeover");
        let ours = Side {
            no_context_takeover: true,
            max_window_bits: offer.server_max_window_bits.unwrap_or(15),
        };
        if let Some(bits) = offer.server_max_window_bits {
            answer.push_str(&format!("; server_max_window_bits={bits}"));
        }
        // The client's hint that it drops its context: take it, so we need
        // not keep ours of its stream.
        if offer.client_no_context_takeover {
            answer.push_str("; client_no_context_takeover");
        }
        // A client that offers `client_max_window_bits` with a value uses
        // at most that window whatever we answer; without a value, 15.
        let client_bits = offer.client_max_window_bits.flatten();
        if let Some(bits) = client_bits {
            answer.push_str(&format!("; client_max_window_bits={bits}"));
        }
        let theirs = Side {
            no_context_takeover: offer.client_no_context_takeover,
            max_window_bits: client_bits.unwrap_or(15),
        };
        Some((Params { ours, theirs }, answer))
    })
}

/// Client: the server's answer to [`CLIENT_OFFER`] (its
/// `Sec-WebSocket-Extensions` values). `Ok(None)`: it declined, no
/// compression; `Err`: an answer we must fail the connection for (an
/// extension we did not offer, a parameter it may not send).
pub fn accepted<'a>(values: impl IntoIterator<Item = &'a str>) -> Result<Option<Params>, String> {
    let mut found = None;
    for ext in extensions(values) {
        let Some((name, params)) = ext else {
            return Err("malformed Sec-WebSocket-Extensions".into());
        };
        if !name.eq_ignore_ascii_case(NAME) || found.is_some() {
            return Err(format!(
                "the server accepted an extension not offered: {name}"
            ));
        }
        let mut ours = Side {
            no_context_takeover: true,
            max_window_bits: 15,
        };
        let mut theirs = Side {
            no_context_takeover: false,
            max_window_bits: 15,
        };
        let mut seen = Vec::new();
        for &(k, v) in &params {
            if seen.contains(&k) {
                return Err(format!("{k} repeated in the server's permessage-deflate"));
            }
            seen.push(k);
            let bad = || format!("bad {k} in the server's permessage-deflate");
            match (k, v) {
                ("server_no_context_takeover", None) => theirs.no_context_takeover = true,
                ("client_no_context_takeover", None) => ours.no_context_takeover = true,
                ("server_max_window_bits", Some(v)) => {
                    theirs.max_window_bits = window_bits(v).ok_or_else(bad)?
                }
                ("client_max_window_bits", Some(v)) => {
                    ours.max_window_bits = window_bits(v).ok_or_else(bad)?
                }
                _ => return Err(bad()),
            }
        }
        found = Some(Params { ours, theirs });
    }
    Ok(found)
}

/// Why a compressed message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflateError {
    /// Inflated past `max_package_size`.
    TooLarge,
    /// Not a valid deflate stream.
    Corrupt,
}

/// A connection's permessage-deflate state: the parameters, and the peer's
/// context while it must be kept.
#[derive(Serialize, Deserialize)]
pub struct Deflate {
    pub params: Params,
    /// Not serialized: see [`Deflate::holds_context`].
    #[serde(skip)]
    inflater: Option<Box<Decompress>>,
}

impl Deflate {
    pub fn new(params: Params) -> Deflate {
        Deflate {
            params,
            inflater: None,
        }
    }

    /// Whether it holds the peer's context (it uses context takeover and
    /// sent a compressed message, or a compressed message is half read),
    /// which a copy made by serde would lack.
    pub fn holds_context(&self) -> bool {
        self.inflater.is_some()
    }

    /// Inflates one frame of a compressed message onto `out`, which holds
    /// what the message inflated to so far; `last`: its final frame. More
    /// than `max` bytes in `out` is [`InflateError::TooLarge`], found before
    /// more than `max + 1` bytes are ever allocated (a small frame may
    /// inflate to gigabytes).
    pub fn inflate(
        &mut self,
        payload: &[u8],
        last: bool,
        out: &mut Vec<u8>,
        max: usize,
    ) -> Result<(), InflateError> {
        let theirs = self.params.theirs;
        let mut d = match self.inflater.take() {
            Some(d) => d,
            None if theirs.no_context_takeover => lend_inflater(),
            // Kept for the connection's life: as small a window as the
            // peer allows (flate2 takes 9..=15; a larger one reads a
            // stream made with a smaller one).
            None => Box::new(Decompress::new_with_window_bits(
                false,
                theirs.max_window_bits.max(9),
            )),
        };
        let mut r = inflate_into(&mut d, payload, out, max);
        if r.is_ok() && last {
            r = inflate_into(&mut d, &TAIL, out, max);
        }
        match r {
            // A broken stream is dropped with the connection.
            Err(e) => Err(e),
            Ok(()) if last && theirs.no_context_takeover => {
                give_back_inflater(d);
                Ok(())
            }
            Ok(()) => {
                self.inflater = Some(d);
                Ok(())
            }
        }
    }

    /// Compresses one whole message into `out` (cleared first), without
    /// the tail RFC 7692 removes.
    pub fn deflate(&self, data: &[u8], out: &mut Vec<u8>) {
        deflate_message(self.params.ours.max_window_bits, data, out)
    }
}

/// Compresses `data` as one message with a window of 2^`bits` bytes.
fn deflate_message(bits: u8, data: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(data.len() / 2 + 64);
    let mut c = lend_compressor(bits);
    let start = c.total_in();
    loop {
        let used = (c.total_in() - start) as usize;
        // Writes only into the spare capacity; never fails on a valid state.
        let _ = c.compress_vec(&data[used..], out, FlushCompress::Sync);
        // A sync flush is complete once it returns with room to spare.
        if (c.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&TAIL) {
        out.truncate(out.len() - TAIL.len());
    }
    give_back_compressor(bits, c);
}

/// Runs `input` through `d` onto `out`, growing it at most to `max + 1`.
fn inflate_into(
    d: &mut Decompress,
    mut input: &[u8],
    out: &mut Vec<u8>,
    max: usize,
) -> Result<(), InflateError> {
    loop {
        if out.len() == out.capacity() {
            let room = max.saturating_add(1).saturating_sub(out.len());
            if room == 0 {
                return Err(InflateError::TooLarge);
            }
            out.reserve_exact(out.capacity().max(input.len() * 2).max(256).min(room));
        }
        let (in_before, out_before) = (d.total_in(), out.len());
        let status = d
            .decompress_vec(input, out, FlushDecompress::Sync)
            .map_err(|_| InflateError::Corrupt)?;
        input = &input[(d.total_in() - in_before) as usize..];
        if out.len() > max {
            return Err(InflateError::TooLarge);
        }
        if status == Status::StreamEnd {
            // A block with BFINAL set ended the stream (allowed, if rare):
            // what follows, if anything, starts a new one.
            d.reset(false);
        }
        if input.is_empty() && out.len() < out.capacity() {
            return Ok(());
        }
        // No progress with input left and room to write: stuck.
        if d.total_in() == in_before && out.len() == out_before && out.len() < out.capacity() {
            return Err(InflateError::Corrupt);
        }
    }
}

thread_local! {
    /// A compressor per thread, lent for one message at a time, with the
    /// window size it was made for.
    static COMPRESSOR: RefCell<Option<(u8, Box<Compress>)>> = const { RefCell::new(None) };
    /// An inflater per thread (32 KiB window: it reads any window size)
    /// for peers without context takeover.
    static INFLATER: RefCell<Option<Box<Decompress>>> = const { RefCell::new(None) };
}

/// Level 1: per message, on a server, speed matters more than the last
/// percent. A window of 2^8 cannot be honoured by zlib (it makes 8 into 9),
/// so for it nothing is matched at all: stored blocks, valid for any window.
fn lend_compressor(bits: u8) -> Box<Compress> {
    match COMPRESSOR.with(|c| c.borrow_mut().take()) {
        Some((b, c)) if b == bits => c,
        _ => {
            let level = if bits < 9 {
                Compression::none()
            } else {
                Compression::fast()
            };
            Box::new(Compress::new_with_window_bits(level, false, bits.max(9)))
        }
    }
}

fn give_back_compressor(bits: u8, mut c: Box<Compress>) {
    c.reset();
    COMPRESSOR.with(|slot| *slot.borrow_mut() = Some((bits, c)));
}

fn lend_inflater() -> Box<Decompress> {
    INFLATER
        .with(|d| d.borrow_mut().take())
        .unwrap_or_else(|| Box::new(Decompress::new_with_window_bits(false, 15)))
}

fn give_back_inflater(mut d: Box<Decompress>) {
    d.reset(false);
    INFLATER.with(|slot| *slot.borrow_mut() = Some(d));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side(no_context_takeover: bool, max_window_bits: u8) -> Side {
        Side {
            no_context_takeover,
            max_window_bits,
        }
    }

    #[test]
    fn the_server_takes_the_first_valid_offer() {
        let (p, answer) = negotiate(["permessage-deflate; client_max_window_bits"]).unwrap();
        assert_eq!(answer, "permessage-deflate; server_no_context_takeover");
        assert_eq!(p.ours, side(true, 15));
        assert_eq!(p.theirs, side(false, 15));
        // Autobahn's default offer.
        let (p, answer) =
            negotiate(["permessage-deflate; client_no_context_takeover; client_max_window_bits"])
                .unwrap();
        assert_eq!(
            answer,
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover"
        );
        assert_eq!(p.theirs, side(true, 15));
        let (p, answer) = negotiate([
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=\"9\", permessage-deflate",
        ])
        .unwrap();
        assert_eq!(
            answer,
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=10; client_max_window_bits=9"
        );
        assert_eq!((p.ours, p.theirs), (side(true, 10), side(false, 9)));
    }

    #[test]
    fn invalid_offers_are_declined() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; client_max_window_bits=0",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; unknown_param",
            "permessage-deflate; server_max_window_bits=10; server_max_window_bits=11",
            "deflate-frame",
            "permessage-deflate; =",
        ] {
            assert_eq!(negotiate([bad]), None, "{bad}");
        }
        // A declined offer does not stop the next one.
        let (_, answer) =
            negotiate(["permessage-deflate; bogus, permessage-deflate; server_max_window_bits=12"])
                .unwrap();
        assert!(answer.ends_with("server_max_window_bits=12"), "{answer}");
    }

    #[test]
    fn the_client_checks_the_answer() {
        assert_eq!(accepted([]), Ok(None));
        let p =
            accepted(["permessage-deflate; server_no_context_takeover; client_max_window_bits=9"])
                .unwrap()
                .unwrap();
        assert_eq!((p.ours, p.theirs), (side(true, 9), side(true, 15)));
        for bad in [
            "permessage-deflate; client_max_window_bits",
            "permessage-deflate; server_max_window_bits=20",
            "permessage-deflate; foo",
            "permessage-deflate, permessage-deflate",
            "x-other",
        ] {
            assert!(accepted([bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn messages_round_trip_with_and_without_context() {
        for (nct, bits) in [(true, 15), (false, 15), (true, 9), (false, 10), (true, 8)] {
            let params = Params {
                ours: side(true, bits),
                theirs: side(nct, bits),
            };
            let (tx, mut rx) = (Deflate::new(params), Deflate::new(params));
            for i in 0..5 {
                let msg = format!("{{\"n\":{i},\"text\":\"{}\"}}", "hello ".repeat(50 * i));
                let mut wire = Vec::new();
                tx.deflate(msg.as_bytes(), &mut wire);
                assert!(!wire.ends_with(&TAIL));
                let mut got = Vec::new();
                rx.inflate(&wire, true, &mut got, 1 << 20).unwrap();
                assert_eq!(got, msg.as_bytes(), "{nct} {bits}");
                assert_eq!(rx.holds_context(), !nct);
            }
        }
    }

    #[test]
    fn a_bomb_stops_at_max() {
        let params = Params {
            ours: side(true, 15),
            theirs: side(true, 15),
        };
        let mut wire = Vec::new();
        Deflate::new(params).deflate(&vec![0u8; 10 << 20], &mut wire);
        assert!(wire.len() < 200_000, "{}", wire.len());
        let mut rx = Deflate::new(params);
        let mut out = Vec::new();
        assert_eq!(
            rx.inflate(&wire, true, &mut out, 1 << 16),
            Err(InflateError::TooLarge)
        );
        assert!(out.capacity() <= (1 << 16) + 1, "{}", out.capacity());
        let mut out = Vec::new();
        assert_eq!(
            Deflate::new(params).inflate(&[0xff, 0xff, 0xff], true, &mut out, 100),
            Err(InflateError::Corrupt)
        );
    }
}
