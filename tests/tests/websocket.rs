//! websocket:// end to end: a real client library for the happy path, raw
//! frames for what RFC 6455 says a server must do with bad input.
//!
//! The Autobahn TestSuite itself runs with `make autobahn` (Python 2.7 under
//! pyenv). The raw-frame cases below cover its sections 1 (framing),
//! 2 (ping/pong), 3 (reserved bits), 4 (opcodes), 5 (fragmentation),
//! 6.3/6.4 (invalid UTF-8, failing fast), 7 (close handling), 9's size
//! limit and 12/13 (permessage-deflate), in miniature.

use std::io::Write;
use std::net::TcpStream;

use tungstenite::Message;
use wm_e2e::*;

fn server(extra: &str) -> (Server, u16) {
    let port = free_port();
    let s = Server::new(&worker_table(
        "ws",
        &format!("websocket://127.0.0.1:{port}"),
        "test_plugin",
        2,
        extra,
    ));
    s.start();
    (s, port)
}

fn client(port: u16, path: &str) -> tungstenite::WebSocket<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let (ws, _) = tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream).unwrap();
    ws
}

fn read_text(ws: &mut tungstenite::WebSocket<TcpStream>) -> String {
    loop {
        match ws.read().unwrap() {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected text, got {other:?}"),
        }
    }
}

#[test]
fn text_and_binary_round_trip_with_their_kind() {
    let (server, port) = server("");
    let mut ws = client(port, "/room?x=1");
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(read_text(&mut ws), "hello");
    ws.send(Message::text("kind")).unwrap();
    assert_eq!(read_text(&mut ws), "text");
    ws.send(Message::binary(vec![0u8, 159, 146, 150])).unwrap();
    assert_eq!(
        ws.read().unwrap(),
        Message::binary(vec![0u8, 159, 146, 150])
    );
    // Answered with plain `send` while a binary message is handled: binary.
    ws.send(Message::binary(b"kind".to_vec())).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(b"binary".to_vec()));
    ws.send(Message::text("hs")).unwrap();
    assert_eq!(
        read_text(&mut ws),
        "/room?x=1",
        "the plugin saw the handshake"
    );
    let big = "z".repeat(200_000);
    ws.send(Message::text(big.clone())).unwrap();
    assert_eq!(read_text(&mut ws), big);
    ws.close(None).unwrap();
    drop(server);
}

#[test]
fn fragments_and_interleaved_control_frames() {
    let (_server, port) = server("");
    let mut s = ws_raw(port, "/");
    let mut wire = ws_frame(false, 1, b"frag", true);
    wire.extend(ws_frame(true, 9, b"ping!", true));
    wire.extend(ws_frame(false, 0, b"men", true));
    wire.extend(ws_frame(true, 0, b"ted", true));
    // Split the whole thing at odd places.
    for chunk in wire.chunks(5) {
        s.write_all(chunk).unwrap();
    }
    assert_eq!(
        ws_read_frame(&mut s).unwrap(),
        (true, 0xA, b"ping!".to_vec()),
        "pong first"
    );
    assert_eq!(
        ws_read_frame(&mut s).unwrap(),
        (true, 0x1, b"fragmented".to_vec())
    );
}

#[test]
fn close_handshake_echoes_the_code_then_closes() {
    let (_server, port) = server("");
    let mut s = ws_raw(port, "/");
    s.write_all(&ws_frame(true, 8, &1000u16.to_be_bytes(), true))
        .unwrap();
    let (_, op, payload) = ws_read_frame(&mut s).unwrap();
    assert_eq!((op, &payload[..2]), (8, &1000u16.to_be_bytes()[..]));
    assert!(
        ws_read_frame(&mut s).is_err(),
        "TCP closed after the close frame"
    );
}

#[test]
fn server_close_sends_last_message_then_1000() {
    let (_server, port) = server("");
    let mut ws = client(port, "/");
    ws.send(Message::text("close")).unwrap();
    assert_eq!(read_text(&mut ws), "bye");
    match ws.read().unwrap() {
        Message::Close(Some(f)) => assert_eq!(u16::from(f.code), 1000),
        other => panic!("{other:?}"),
    }
}

fn assert_closed_with(port: u16, wire: &[u8], code: u16) {
    let mut s = ws_raw(port, "/");
    s.write_all(wire).unwrap();
    let (_, op, payload) = ws_read_frame(&mut s).unwrap();
    assert_eq!(op, 8, "a close frame");
    assert_eq!(u16::from_be_bytes([payload[0], payload[1]]), code);
    assert!(ws_read_frame(&mut s).is_err(), "then the connection ends");
}

#[test]
fn bad_input_closes_with_the_proper_code_and_only_that_connection() {
    let (server, port) = server("max_package_size = 1000");
    let mut bystander = client(port, "/");
    assert_closed_with(port, &ws_frame(true, 1, &[0xc3, 0x28], true), 1007);
    assert_closed_with(port, &ws_frame(true, 2, &[0u8; 1001], true), 1009);
    assert_closed_with(port, &ws_frame(true, 1, b"unmasked", false), 1002);
    assert_closed_with(port, &ws_frame(true, 0, b"stray continuation", true), 1002);
    assert_closed_with(port, &ws_frame(false, 9, b"fragmented ping", true), 1002);
    assert_closed_with(port, &ws_frame(true, 5, b"reserved opcode", true), 1002);
    assert_closed_with(port, &[0xC1, 0x80, 0, 0, 0, 0], 1002); // RSV1 set
    bystander.send(Message::text("still fine")).unwrap();
    assert_eq!(read_text(&mut bystander), "still fine");
    let log = server.log();
    assert!(
        log.contains("closing websocket (1007)") && log.contains("closing websocket (1009)"),
        "{log}"
    );
}

fn handshake(port: u16, req: &str) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    read_http_head(&mut s)
}

#[test]
fn bad_handshakes_get_http_errors() {
    let (_server, port) = server("");
    let base = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let v8 = handshake(
        port,
        &format!("GET / HTTP/1.1\r\n{base}Sec-WebSocket-Version: 8\r\n\r\n"),
    );
    assert!(
        v8.starts_with("HTTP/1.1 426") && v8.contains("Sec-WebSocket-Version: 13"),
        "{v8}"
    );
    let nokey = handshake(port, "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n\r\n");
    assert!(nokey.starts_with("HTTP/1.1 400"), "{nokey}");
    let post = handshake(
        port,
        &format!("POST / HTTP/1.1\r\n{base}Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n"),
    );
    assert!(post.starts_with("HTTP/1.1 400"), "{post}");
    let plain = handshake(port, "GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(plain.starts_with("HTTP/1.1 400"), "{plain}");
    let junk = handshake(port, "\x16\x03\x01 not http at all\r\n\r\n");
    assert!(junk.starts_with("HTTP/1.1 400"), "{junk}");
}

#[test]
fn plugin_may_refuse_a_handshake_with_a_status() {
    let (_server, port) = server("");
    let key = "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";
    let up = "Host: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n";
    let r = handshake(port, &format!("GET /forbidden HTTP/1.1\r\n{up}{key}\r\n"));
    assert!(r.starts_with("HTTP/1.1 403"), "{r}");
    let r = handshake(
        port,
        &format!("GET /x?refuse=401 HTTP/1.1\r\n{up}{key}\r\n"),
    );
    assert!(r.starts_with("HTTP/1.1 401"), "{r}");
    let mut ok = client(port, "/fine");
    ok.send(Message::text("hs")).unwrap();
    assert_eq!(read_text(&mut ok), "/fine?");
}

#[test]
fn frames_right_behind_the_handshake_are_not_lost() {
    let (_server, port) = server("");
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut wire = String::from(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .into_bytes();
    wire.extend(ws_frame(true, 1, b"early", true));
    s.write_all(&wire).unwrap();
    assert!(read_http_head(&mut s).starts_with("HTTP/1.1 101"));
    assert_eq!(ws_read_frame(&mut s).unwrap(), (true, 1, b"early".to_vec()));
}

/// A websocket:// listener of `lib` with one worker.
fn listener(lib: &str, extra: &str) -> (Server, u16) {
    let port = free_port();
    let s = Server::new(&worker_table(
        "ws",
        &format!("websocket://127.0.0.1:{port}"),
        lib,
        1,
        extra,
    ));
    s.start();
    (s, port)
}

#[test]
fn the_echo_example_answers_in_kind() {
    let (_server, port) = listener("echo_plugin", "");
    let mut ws = client(port, "/");
    // Binary bytes that happen to be UTF-8 too, and some that are not.
    for msg in [
        Message::binary(b"abc".to_vec()),
        Message::binary(vec![0xff, 0, 0x80]),
        Message::text("héllo"),
        Message::text(""),
        Message::binary(Vec::new()),
    ] {
        ws.send(msg.clone()).unwrap();
        assert_eq!(ws.read().unwrap(), msg);
    }
}

#[test]
fn send_never_makes_a_text_frame_of_bad_utf8() {
    let (_server, port) = server("");
    let mut s = ws_raw(port, "/");
    // From a text message: bytes that are not UTF-8 go out binary, the
    // others text.
    for (hex, op, bytes) in [
        ("ff00c3", 2, vec![0xff, 0x00, 0xc3]),
        ("e282", 2, vec![0xe2, 0x82]),
        ("6869", 1, b"hi".to_vec()),
        ("c3a9", 1, "é".as_bytes().to_vec()),
    ] {
        s.write_all(&ws_frame(true, 1, format!("bytes {hex}").as_bytes(), true))
            .unwrap();
        assert_eq!(ws_read_frame(&mut s).unwrap(), (true, op, bytes), "{hex}");
    }
    // From a binary message, binary whatever the bytes.
    s.write_all(&ws_frame(true, 2, b"bytes 6869", true))
        .unwrap();
    assert_eq!(ws_read_frame(&mut s).unwrap(), (true, 2, b"hi".to_vec()));
}

#[test]
fn bad_utf8_in_a_fragmented_message_closes_before_its_end() {
    let (_server, port) = server("");
    let mut s = ws_raw(port, "/");
    // Autobahn 6.4.1: a valid first fragment, then one above U+10FFFF; the
    // last is never sent, yet the close comes.
    let mut wire = ws_frame(false, 1, "κόσμε".as_bytes(), true);
    wire.extend(ws_frame(false, 0, &[0xf4, 0x90, 0x80, 0x80], true));
    s.write_all(&wire).unwrap();
    let (_, op, payload) = ws_read_frame(&mut s).unwrap();
    assert_eq!((op, &payload[..]), (8, &1007u16.to_be_bytes()[..]));
    // 6.4.3: one frame whose bad bytes arrive before its end.
    let mut s = ws_raw(port, "/");
    let mut payload = "κόσμε".as_bytes().to_vec();
    payload.extend([0xf4, 0x90, 0x80, 0x80]);
    payload.extend(b"edited");
    let frame = ws_frame(true, 1, &payload, true);
    s.write_all(&frame[..frame.len() - 6]).unwrap();
    let (_, op, payload) = ws_read_frame(&mut s).unwrap();
    assert_eq!((op, &payload[..]), (8, &1007u16.to_be_bytes()[..]));
}

#[test]
fn permessage_deflate_is_agreed_only_when_configured() {
    let offer = "permessage-deflate; client_no_context_takeover; client_max_window_bits";
    let (_plain, port) = listener("echo_plugin", "");
    let (_, head) = ws_offering(port, offer);
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
    let (_server, port) = listener(
        "echo_plugin",
        "ws_deflate = true\nmax_package_size = 100000",
    );
    let (mut s, head) = ws_offering(port, offer);
    assert!(
        head.contains(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; \
             client_no_context_takeover\r\n"
        ),
        "{head}"
    );
    // Compressed in, compressed out, each in its kind; uncompressed still
    // allowed.
    let json = "{\"user\":\"wörld\",\"text\":\"hello hello hello\"}".repeat(20);
    s.write_all(&ws_deflated_frame(1, json.as_bytes())).unwrap();
    assert_eq!(ws_read_message(&mut s), (true, 1, json.as_bytes().to_vec()));
    s.write_all(&ws_deflated_frame(2, &[9u8; 5000])).unwrap();
    let (compressed, op, data) = ws_read_message(&mut s);
    assert_eq!((compressed, op, data.len()), (true, 2, 5000));
    s.write_all(&ws_frame(true, 1, b"plain", true)).unwrap();
    assert_eq!(ws_read_message(&mut s), (true, 1, b"plain".to_vec()));
    // A bomb: a small frame that inflates past max_package_size.
    s.write_all(&ws_deflated_frame(2, &vec![0u8; 1 << 20]))
        .unwrap();
    let (_, op, payload) = ws_read_frame(&mut s).unwrap();
    assert_eq!((op, &payload[..]), (8, &1009u16.to_be_bytes()[..]));
    // An offer it cannot take (bad window size): no compression, still open.
    let (mut s, head) = ws_offering(port, "permessage-deflate; server_max_window_bits=16");
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
    s.write_all(&ws_frame(true, 1, b"hi", true)).unwrap();
    assert_eq!(ws_read_message(&mut s), (false, 1, b"hi".to_vec()));
}

#[test]
fn ctx_connect_offers_and_uses_permessage_deflate() {
    use std::io::Read;
    // A server made by hand, so the test sees the wire: it takes the offer,
    // reads a compressed message and answers with one.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_port = upstream.local_addr().unwrap().port();
    let port = free_port();
    let server = Server::new(&worker_table(
        "dialer",
        &format!("text://127.0.0.1:{port}"),
        "test_plugin",
        1,
        "ws_deflate = true",
    ));
    server.start();
    let mut c = TextClient::connect(port);
    c.send(&format!(
        "dial ws://127.0.0.1:{up_port}/x compress me compress me"
    ));
    let (mut s, _) = upstream.accept().unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let req = read_http_head(&mut s);
    let key = req
        .lines()
        .find_map(|l| l.strip_prefix("Sec-WebSocket-Key: "))
        .unwrap();
    assert!(
        req.contains(&format!(
            "Sec-WebSocket-Extensions: {}\r\n",
            wm_proto::deflate::CLIENT_OFFER
        )),
        "{req}"
    );
    let accept = tungstenite::handshake::derive_accept_key(key.trim().as_bytes());
    s.write_all(&wm_proto::websocket::switching_protocols_with(
        &accept,
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover"),
    ))
    .unwrap();
    // The client's frame: masked. It was sent before the handshake ended,
    // so it went out uncompressed (RSV1 clear), as RFC 7692 allows.
    let mut h = [0u8; 2];
    s.read_exact(&mut h).unwrap();
    assert_eq!(h[0], 0x80 | 1, "final, uncompressed, text");
    assert_eq!(h[1] & 0x80, 0x80, "masked");
    let len = (h[1] & 0x7f) as usize;
    let mut rest = vec![0u8; 4 + len];
    s.read_exact(&mut rest).unwrap();
    let (mask, payload) = rest.split_at_mut(4);
    for (i, b) in payload.iter_mut().enumerate() {
        *b ^= mask[i % 4];
    }
    assert_eq!(payload, b"compress me compress me");
    // Our answer, compressed (server frames are not masked).
    let mut z = Vec::new();
    wm_proto::deflate::Deflate::new(ws_deflate_params()).deflate(b"squeezed", &mut z);
    let mut f = vec![0x80 | 0x40 | 1, z.len() as u8];
    f.extend(z);
    s.write_all(&f).unwrap();
    assert_eq!(c.recv().as_deref(), Some("connected"));
    assert_eq!(c.recv().as_deref(), Some("reply squeezed"));
}
