//! websocket:// end to end: a real client library for the happy path, raw
//! frames for what RFC 6455 says a server must do with bad input.
//!
//! Not run: the Autobahn suite itself (it needs Python 2 / Docker, neither
//! available here). The raw-frame cases below cover its sections 1 (framing),
//! 2 (ping/pong), 3 (reserved bits), 4 (opcodes), 5 (fragmentation),
//! 6.3 (invalid UTF-8), 7 (close handling) and 9's size limit, in miniature.

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
    ws.send(Message::binary(b"kind".to_vec())).unwrap();
    assert_eq!(read_text(&mut ws), "binary");
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
