//! Property tests of every codec through its public API, driven as the
//! worker drives it (`common::drive`, which also checks the step invariants:
//! nothing consumed beyond the input, progress, messages within `max`):
//!
//! - arbitrary input never panics, and any cut of it into reads gives the
//!   same steps (errors by class) and replies as the input whole;
//! - encode then decode is the identity, for each codec and both websocket
//!   roles; an HTTP request built from parts parses back to those parts.

mod common;

use common::*;
use proptest::prelude::*;
use proptest::sample::Index;
use wm_proto::deflate::{Params, Side};
use wm_proto::http::Limits;
use wm_proto::websocket::{Role, WsCodec};
use wm_proto::{Codec, Framer, Kind, Scheme, Wire};

/// 64 cases each keeps the suite within seconds; `PROPTEST_CASES=N` for more.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(64);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// `max_package_size`: tiny, at the websocket length boundaries, or roomy.
fn max_s() -> impl Strategy<Value = usize> {
    prop_oneof![
        0usize..=8,
        Just(125usize),
        Just(126usize),
        9usize..600,
        Just(1usize << 20),
    ]
}

/// Where to cut the input into reads.
fn cuts_s() -> impl Strategy<Value = Vec<Index>> {
    prop::collection::vec(any::<Index>(), 0..12)
}

fn cuts_of(input: &[u8], cuts: &[Index]) -> Vec<usize> {
    cuts.iter().map(|i| i.index(input.len() + 1)).collect()
}

/// Bytes from a small alphabet that matters to the codec, or any bytes.
fn noise_s(alphabet: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(prop::sample::select(alphabet), 0..40),
        prop::collection::vec(any::<u8>(), 0..40),
    ]
}

/// A stream of valid pieces (made by `valid`) with noise among them.
fn stream_s<S: Strategy<Value = Vec<u8>>>(
    valid: S,
    alphabet: &'static [u8],
) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(prop_oneof![4 => valid, 1 => noise_s(alphabet)], 0..8)
        .prop_map(|v| v.concat())
}

fn split_check(
    new: impl Fn() -> Codec,
    input: &[u8],
    cuts: &[Index],
    max: usize,
    framer: Option<&dyn Framer>,
) -> Run {
    let chunks = cut(input, &cuts_of(input, cuts));
    assert_split_invariant(new, input, &chunks, max, framer, OnUpgrade::Accept)
}

fn encoded(codec: &Codec, data: &[u8], kind: Kind, framer: Option<&dyn Framer>) -> Vec<u8> {
    let mut w = Wire::default();
    codec.encode(data, kind, framer, &mut w).unwrap().concat()
}

// ---------------------------------------------------------------- text

fn text_line_s() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![
            Just(b'a'),
            Just(b'\r'),
            any::<u8>().prop_filter("no newline", |b| *b != b'\n')
        ],
        0..30,
    )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn text_any_cut_gives_the_same_steps(
        input in stream_s(text_line_s().prop_map(|mut l| { l.push(b'\n'); l }), b"ab\r\n"),
        cuts in cuts_s(),
        max in max_s(),
    ) {
        split_check(|| Codec::new(Scheme::Text), &input, &cuts, max, None);
    }

    #[test]
    fn text_encode_then_decode_is_the_identity(
        lines in prop::collection::vec(text_line_s(), 0..10),
        cuts in cuts_s(),
    ) {
        let c = Codec::new(Scheme::Text);
        let wire: Vec<u8> = lines.iter().flat_map(|l| encoded(&c, l, Kind::Default, None)).collect();
        let run = split_check(|| Codec::new(Scheme::Text), &wire, &cuts, 64, None);
        // A `\r` ending a line is part of its delimiter (`\r\n`): dropped.
        let want: Vec<(Kind, Vec<u8>)> = lines
            .iter()
            .map(|l| (Kind::Default, l.strip_suffix(b"\r").unwrap_or(l).to_vec()))
            .collect();
        prop_assert_eq!(run.messages(), want);
        prop_assert!(run.failed().is_none());
    }
}

// ---------------------------------------------------------------- frame

fn frame_piece_s() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..200).prop_map(|p| {
        let mut w = Wire::default();
        Codec::new(Scheme::Frame)
            .encode(&p, Kind::Default, None, &mut w)
            .unwrap()
            .concat()
    })
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn frame_any_cut_gives_the_same_steps(
        input in stream_s(frame_piece_s(), b"\x00\x00\x00\x04\x05\x09"),
        cuts in cuts_s(),
        max in max_s(),
    ) {
        split_check(|| Codec::new(Scheme::Frame), &input, &cuts, max, None);
    }

    #[test]
    fn frame_encode_then_decode_is_the_identity(
        msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
        cuts in cuts_s(),
    ) {
        let c = Codec::new(Scheme::Frame);
        let wire: Vec<u8> = msgs.iter().flat_map(|m| encoded(&c, m, Kind::Default, None)).collect();
        let run = split_check(|| Codec::new(Scheme::Frame), &wire, &cuts, 304, None);
        let want: Vec<_> = msgs.into_iter().map(|m| (Kind::Default, m)).collect();
        prop_assert_eq!(run.messages(), want);
        prop_assert!(run.failed().is_none());
    }
}

// ---------------------------------------------------------------- custom

fn custom_piece_s(f: &'static dyn Framer) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..100).prop_map(move |p| f.encode(&p).unwrap())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn custom_netstring_any_cut_gives_the_same_steps(
        input in stream_s(custom_piece_s(&Netstring), b"0123:,x"),
        cuts in cuts_s(),
        max in max_s(),
    ) {
        split_check(|| Codec::new(Scheme::Custom), &input, &cuts, max, Some(&Netstring));
    }

    #[test]
    fn custom_length_prefix_any_cut_gives_the_same_steps(
        input in stream_s(custom_piece_s(&LengthPrefix), b"\x00\x01\x02\xff"),
        cuts in cuts_s(),
        max in max_s(),
    ) {
        split_check(|| Codec::new(Scheme::Custom), &input, &cuts, max, Some(&LengthPrefix));
    }

    #[test]
    fn custom_encode_then_decode_is_the_identity(
        msgs in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 0..8),
        netstring in any::<bool>(),
        cuts in cuts_s(),
    ) {
        let f: &dyn Framer = if netstring { &Netstring } else { &LengthPrefix };
        let c = Codec::new(Scheme::Custom);
        let wire: Vec<u8> = msgs.iter().flat_map(|m| encoded(&c, m, Kind::Default, Some(f))).collect();
        let run = split_check(|| Codec::new(Scheme::Custom), &wire, &cuts, 400, Some(f));
        let want: Vec<_> = msgs.into_iter().map(|m| (Kind::Default, m)).collect();
        prop_assert_eq!(run.messages(), want);
        prop_assert!(run.failed().is_none());
    }
}

// ---------------------------------------------------------------- websocket

/// One frame as a peer may send it, valid or not: any opcode, reserved
/// bits, fragmentation, masked or not, its length in any of the three forms.
#[derive(Debug, Clone)]
struct RawFrame {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: Vec<u8>,
    /// 0: shortest form; 1: 16-bit; 2: 64-bit.
    len_form: u8,
}

impl RawFrame {
    fn bytes(&self) -> Vec<u8> {
        let mut v = vec![(u8::from(self.fin) << 7) | ((self.rsv & 7) << 4) | (self.opcode & 0xf)];
        let m = if self.mask.is_some() { 0x80 } else { 0 };
        let len = self.payload.len();
        if len < 126 && self.len_form == 0 {
            v.push(m | len as u8);
        } else if len <= 0xffff && self.len_form < 2 {
            v.push(m | 126);
            v.extend_from_slice(&(len as u16).to_be_bytes());
        } else {
            v.push(m | 127);
            v.extend_from_slice(&(len as u64).to_be_bytes());
        }
        match self.mask {
            Some(k) => {
                v.extend_from_slice(&k);
                v.extend(self.payload.iter().enumerate().map(|(i, b)| b ^ k[i % 4]));
            }
            None => v.extend_from_slice(&self.payload),
        }
        v
    }
}

/// Frames as a client (`masked`) or a server sends them, mostly valid.
fn ws_frame_s(masked: bool) -> impl Strategy<Value = RawFrame> {
    let opcode = prop_oneof![
        4 => Just(1u8), 4 => Just(2u8), 2 => Just(0u8), 1 => Just(8u8),
        2 => Just(9u8), 1 => Just(10u8), 1 => 0u8..16,
    ];
    let payload = prop_oneof![
        "[a-zé€😀 ]{0,20}".prop_map(String::into_bytes),
        prop::collection::vec(any::<u8>(), 0..140),
        Just(1000u16.to_be_bytes().to_vec()),
    ];
    (
        prop::bool::weighted(0.8),
        prop_oneof![10 => Just(0u8), 1 => 0u8..8],
        opcode,
        prop::bool::weighted(0.95),
        any::<[u8; 4]>(),
        payload,
        prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
    )
        .prop_map(
            move |(fin, rsv, opcode, right_mask, key, payload, len_form)| RawFrame {
                fin,
                rsv,
                opcode,
                mask: (masked == right_mask).then_some(key),
                payload,
                len_form,
            },
        )
}

fn frames_s(masked: bool) -> impl Strategy<Value = Vec<u8>> {
    stream_s(
        ws_frame_s(masked).prop_map(|f| f.bytes()),
        b"\x81\x82\x88\x89\x00\x7e\x7f",
    )
}

const UPGRADE: &str = "GET /chat?room=1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
                       Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\
                       Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// An upgrade request, usually valid, sometimes with one line spoiled.
fn upgrade_s() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => Just(UPGRADE.as_bytes().to_vec()),
        1 => (any::<Index>(), noise_s(b"GET /\r\n:")).prop_map(|(at, noise)| {
            let u = UPGRADE.as_bytes();
            let at = at.index(u.len());
            [&u[..at], &noise[..], &u[at..]].concat()
        }),
    ]
}

/// An answer to our handshake: `$ACCEPT` stands for the right accept value.
const ANSWER: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
                      Connection: Upgrade\r\nSec-WebSocket-Accept: $ACCEPT\r\n\r\n";

fn answer_s() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        6 => Just(ANSWER.as_bytes().to_vec()),
        1 => (any::<Index>(), noise_s(b"HTTP/1.1 101\r\n:")).prop_map(|(at, noise)| {
            let u = ANSWER.as_bytes();
            let at = at.index(u.len());
            [&u[..at], &noise[..], &u[at..]].concat()
        }),
    ]
}

/// A message of exactly `len` bytes: text (multi-byte characters included)
/// or binary, varied by `seed`.
fn message(kind: Kind, len: usize, seed: u8) -> Vec<u8> {
    if kind == Kind::Binary {
        return (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect();
    }
    let mut s = String::with_capacity(len);
    let chars = ['a', 'é', '€', '😀', ' ', 'z'];
    let mut i = seed as usize;
    while s.len() + 4 <= len {
        s.push(chars[i % chars.len()]);
        i += 1;
    }
    while s.len() < len {
        s.push('x');
    }
    s.into_bytes()
}

/// Sizes around the 7-, 16- and 64-bit length forms, and small ones.
fn ws_size_s() -> impl Strategy<Value = usize> {
    prop_oneof![
        prop::sample::select(vec![0usize, 1, 124, 125, 126, 127, 65535, 65536, 65537]),
        0usize..300,
    ]
}

fn ws_messages_s() -> impl Strategy<Value = Vec<(Kind, Vec<u8>)>> {
    prop::collection::vec(
        (any::<bool>(), ws_size_s(), any::<u8>()).prop_map(|(bin, len, seed)| {
            let kind = if bin { Kind::Binary } else { Kind::Text };
            (kind, message(kind, len, seed))
        }),
        1..5,
    )
}

fn open(role: Role) -> Codec {
    Codec::Websocket(Box::new(WsCodec::open(role)))
}

/// Open with permessage-deflate; `nct`: the peer drops its context after
/// each message (else we keep it).
fn open_deflate(role: Role, nct: bool) -> Codec {
    let side = |no_context_takeover| Side {
        no_context_takeover,
        max_window_bits: 15,
    };
    let params = Params {
        ours: side(true),
        theirs: side(nct),
    };
    Codec::Websocket(Box::new(WsCodec::open_deflate(role, params)))
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn ws_server_any_cut_gives_the_same_steps(
        upgrade in upgrade_s(),
        frames in frames_s(true),
        cuts in cuts_s(),
        max in max_s(),
    ) {
        let input = [upgrade, frames].concat();
        split_check(|| Codec::new(Scheme::Websocket), &input, &cuts, max, None);
    }

    #[test]
    fn ws_client_any_cut_gives_the_same_steps(
        answer in answer_s(),
        frames in frames_s(false),
        cuts in cuts_s(),
        max in max_s(),
    ) {
        // Each client has a fresh key: each run gets its own right answer,
        // of the same length, so the cuts fall alike.
        let template = [answer, frames].concat();
        let (mut a, accept_a) = ws_client();
        let (mut b, accept_b) = ws_client();
        let input_a = replace_first(&template, b"$ACCEPT", accept_a.as_bytes());
        let input_b = replace_first(&template, b"$ACCEPT", accept_b.as_bytes());
        let chunks = cut(&input_b, &cuts_of(&input_b, &cuts));
        let whole = drive(&mut a, &[&input_a], max, None, OnUpgrade::Accept);
        let split = drive(&mut b, &chunks, max, None, OnUpgrade::Accept);
        prop_assert_eq!(whole.normalized(), split.normalized());
        if whole.failed().is_none() {
            prop_assert_eq!(whole.replies.len(), split.replies.len());
        }
    }

    #[test]
    fn ws_open_frames_any_cut_either_role(
        client_frames in frames_s(true),
        server_frames in frames_s(false),
        cuts in cuts_s(),
        max in max_s(),
    ) {
        split_check(|| open(Role::Server), &client_frames, &cuts, max, None);
        split_check(|| open(Role::Client), &server_frames, &cuts, max, None);
    }

    #[test]
    fn ws_encode_then_decode_is_the_identity_both_ways(
        msgs in ws_messages_s(),
        cuts in cuts_s(),
    ) {
        for (from, to) in [(Role::Server, Role::Client), (Role::Client, Role::Server)] {
            let enc = open(from);
            let wire: Vec<u8> = msgs.iter().flat_map(|(k, m)| encoded(&enc, m, *k, None)).collect();
            let run = split_check(|| open(to), &wire, &cuts, 65537, None);
            prop_assert!(run.failed().is_none(), "{:?} to {:?}: {:?}", from, to, run.failed());
            prop_assert!(run.messages() == msgs, "{:?} to {:?}", from, to);
            prop_assert!(run.replies.is_empty());
        }
    }

    #[test]
    fn ws_deflate_frames_any_cut_either_role(
        client_frames in frames_s(true),
        server_frames in frames_s(false),
        cuts in cuts_s(),
        max in max_s(),
        nct in any::<bool>(),
    ) {
        // RSV1 on random frames mostly makes corrupt deflate data: it must
        // fail the same way however the input is cut.
        split_check(|| open_deflate(Role::Server, nct), &client_frames, &cuts, max, None);
        split_check(|| open_deflate(Role::Client, nct), &server_frames, &cuts, max, None);
    }

    #[test]
    fn ws_deflate_encode_then_decode_is_the_identity_both_ways(
        msgs in ws_messages_s(),
        cuts in cuts_s(),
        nct in any::<bool>(),
    ) {
        for (from, to) in [(Role::Server, Role::Client), (Role::Client, Role::Server)] {
            let enc = open_deflate(from, true);
            let wire: Vec<u8> = msgs.iter().flat_map(|(k, m)| encoded(&enc, m, *k, None)).collect();
            let run = split_check(|| open_deflate(to, nct), &wire, &cuts, 65537, None);
            prop_assert!(run.failed().is_none(), "{:?} to {:?}: {:?}", from, to, run.failed());
            prop_assert!(run.messages() == msgs, "{:?} to {:?}", from, to);
            prop_assert!(run.replies.is_empty());
        }
    }

    #[test]
    fn ws_handshake_both_roles_then_frames(
        path in "/[a-z0-9]{0,8}(/[a-z0-9._~-]{1,8}){0,3}",
        query in prop::option::of("[a-z0-9=&]{0,12}"),
        msgs in ws_messages_s(),
        cuts in cuts_s(),
    ) {
        let target = match &query {
            Some(q) => format!("{path}?{q}"),
            None => path.clone(),
        };
        let mut client = Codec::client(Scheme::Websocket);
        let Codec::Websocket(ws) = &client else { unreachable!() };
        prop_assert!(client.sendable() && !client.established());
        let request = ws.client_request("example.test:80", &target);
        // The client may send right behind its request.
        let mut to_server = request.clone();
        for (k, m) in &msgs {
            to_server.extend(encoded(&client, m, *k, None));
        }
        let chunks = cut(&to_server, &cuts_of(&to_server, &cuts));
        let mut server = Codec::new(Scheme::Websocket);
        let run = drive(&mut server, &chunks, 65537, None, OnUpgrade::Accept);
        let mut want = vec![Ev::Upgrade(path.clone())];
        want.extend(msgs.iter().map(|(k, m)| Ev::Msg(*k, m.clone())));
        prop_assert_eq!(run.events, want);
        prop_assert!(server.established());
        // The server's 101, then its frames, back to the client.
        let mut to_client = run.replies.clone();
        for (k, m) in &msgs {
            to_client.extend(encoded(&server, m, *k, None));
        }
        let back = drive(&mut client, &cut(&to_client, &cuts_of(&to_client, &cuts)), 65537, None, OnUpgrade::Accept);
        let mut want = vec![Ev::Connected];
        want.extend(msgs.iter().map(|(k, m)| Ev::Msg(*k, m.clone())));
        prop_assert_eq!(back.events, want);
        prop_assert!(client.established());
    }
}

// ---------------------------------------------------------------- http

/// A request as parts, and its bytes.
#[derive(Debug, Clone)]
struct Parts {
    req: Req,
    wire: Vec<u8>,
}

fn http_request_s(max_body: usize) -> impl Strategy<Value = Parts> {
    let method = prop_oneof![
        prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD"
        ])
        .prop_map(String::from),
        "[A-Z]{1,8}",
    ];
    let path = prop_oneof![
        Just("/".to_string()),
        "/[a-zA-Z0-9._~%-]{1,10}(/[a-zA-Z0-9._~-]{0,10}){0,3}",
    ];
    let query = prop::option::of("[a-zA-Z0-9=&%+]{0,16}");
    let header = (
        "[A-Za-z][A-Za-z0-9-]{0,12}".prop_filter("framing headers are chosen apart", |n| {
            let n = n.to_ascii_lowercase();
            ![
                "host",
                "content-length",
                "transfer-encoding",
                "connection",
                "expect",
            ]
            .contains(&n.as_str())
        }),
        // Visible ASCII with inner spaces; no whitespace around it.
        prop_oneof!["", "[!-~]([ !-~]{0,20}[!-~])?"],
    );
    let headers = prop::collection::vec(header, 0..6);
    let body = prop::collection::vec(any::<u8>(), 0..=max_body.min(300));
    (
        method,
        path,
        query,
        any::<bool>(),
        headers,
        body,
        prop_oneof![Just(None), Just(Some("close")), Just(Some("keep-alive"))],
        any::<bool>(),
        prop::collection::vec(any::<Index>(), 0..4),
        any::<bool>(),
    )
        .prop_map(
            |(method, path, query, http11, mut headers, body, conn, chunked, chunk_cuts, host)| {
                let version = u8::from(http11);
                let chunked = chunked && http11;
                let target = match &query {
                    Some(q) => format!("{path}?{q}"),
                    None => path.clone(),
                };
                if http11 || host {
                    headers.insert(0, ("Host".into(), "example.test".into()));
                }
                if let Some(c) = conn {
                    headers.push(("Connection".into(), c.into()));
                }
                if chunked {
                    headers.push(("Transfer-Encoding".into(), "chunked".into()));
                } else if !body.is_empty() || host {
                    headers.push(("Content-Length".into(), body.len().to_string()));
                }
                let mut wire = format!("{method} {target} HTTP/1.{version}\r\n").into_bytes();
                for (n, v) in &headers {
                    wire.extend(format!("{n}: {v}\r\n").bytes());
                }
                wire.extend(b"\r\n");
                if chunked {
                    let pieces = cut(&body, &cuts_of(&body, &chunk_cuts));
                    for p in pieces.iter().filter(|p| !p.is_empty()) {
                        wire.extend(format!("{:x}\r\n", p.len()).bytes());
                        wire.extend_from_slice(p);
                        wire.extend(b"\r\n");
                    }
                    wire.extend(b"0\r\n\r\n");
                } else {
                    wire.extend_from_slice(&body);
                }
                let keep_alive = if http11 {
                    conn != Some("close")
                } else {
                    conn == Some("keep-alive")
                };
                Parts {
                    req: Req {
                        method,
                        path,
                        query: query.unwrap_or_default(),
                        version,
                        headers,
                        body,
                        keep_alive,
                    },
                    wire,
                }
            },
        )
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn http_request_from_parts_parses_back_to_them(
        reqs in prop::collection::vec(http_request_s(300), 1..4),
        cuts in cuts_s(),
    ) {
        let wire: Vec<u8> = reqs.iter().flat_map(|p| p.wire.clone()).collect();
        let run = split_check(|| Codec::new(Scheme::Http), &wire, &cuts, 300, None);
        let want: Vec<Ev> = reqs.iter().map(|p| Ev::Request(p.req.clone())).collect();
        prop_assert_eq!(run.events, want);
        prop_assert!(run.replies.is_empty());
    }

    #[test]
    fn http_any_cut_gives_the_same_steps(
        input in stream_s(
            http_request_s(40).prop_map(|p| p.wire),
            b"GET / HTTP/1.1\r\n:0aTransfer-Encoding chunked Content-Length Expect: 100-continue",
        ),
        cuts in cuts_s(),
        max in max_s(),
    ) {
        split_check(|| Codec::new(Scheme::Http), &input, &cuts, max, None);
    }

    #[test]
    fn http_decoder_with_small_header_limits_any_cut(
        input in stream_s(
            http_request_s(40).prop_map(|p| p.wire),
            b"GET / HTTP/1.1\r\n:0a;",
        ),
        cuts in cuts_s(),
        max_header_bytes in prop_oneof![0usize..40, 40usize..300],
        max_body_bytes in max_s(),
    ) {
        let limits = Limits { max_header_bytes, max_body_bytes };
        let chunks = cut(&input, &cuts_of(&input, &cuts));
        let whole = drive_http(&[&input], &limits);
        let split = drive_http(&chunks, &limits);
        prop_assert_eq!(whole, split);
    }

    #[test]
    fn http_expect_continue_is_answered_only_while_the_body_is_missing(
        body in prop::collection::vec(any::<u8>(), 1..50),
        at in any::<Index>(),
    ) {
        let mut wire = format!(
            "POST /u HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        let head = wire.len();
        wire.extend_from_slice(&body);
        let cut_at = head + at.index(body.len());
        let run = drive(
            &mut Codec::new(Scheme::Http),
            &[&wire[..cut_at], &wire[cut_at..]],
            100,
            None,
            OnUpgrade::Accept,
        );
        prop_assert_eq!(run.replies, b"HTTP/1.1 100 Continue\r\n\r\n".to_vec());
        prop_assert!(matches!(&run.events[..], [Ev::Request(r)] if r.body == body));
    }
}
