//! custom:// listeners: framing supplied by the plugin (netstrings here),
//! buffers, limits and IO by the host.

use std::io::{Read, Write};
use std::net::TcpStream;

use wm_e2e::*;

fn server() -> (Server, u16) {
    let port = free_port();
    let s = Server::new(&worker_table(
        "ns",
        &format!("custom://127.0.0.1:{port}"),
        "netstring_plugin",
        1,
        "max_package_size = 1000",
    ));
    s.start();
    (s, port)
}

fn connect(port: u16) -> TcpStream {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(DEADLINE)).unwrap();
    c
}

fn read_exactly(c: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    c.read_exact(&mut v).unwrap();
    v
}

fn closed(c: &mut TcpStream) -> bool {
    matches!(c.read(&mut [0u8; 16]), Ok(0) | Err(_))
}

#[test]
fn partial_and_coalesced_packets_round_trip() {
    let (s, port) = server();
    let mut c = connect(port);
    // One byte at a time.
    for b in b"5:hello," {
        c.write_all(&[*b]).unwrap();
        c.flush().unwrap();
    }
    assert_eq!(read_exactly(&mut c, 8), b"5:hello,");
    // Three packets (one empty) in one write.
    c.write_all(b"3:abc,0:,4:wxyz,").unwrap();
    assert_eq!(read_exactly(&mut c, 16), b"3:abc,0:,4:wxyz,");
    let st = s.status();
    assert_eq!(
        st["workers"][0]["stats"]["total_messages"].as_u64(),
        Some(4)
    );
    s.stop();
}

#[test]
fn invalid_and_oversize_input_close_only_that_connection() {
    let (s, port) = server();
    let mut good = connect(port);
    for bad in [&b"abc:"[..], b"3:abc;", b"2000:", b":x,"] {
        let mut c = connect(port);
        c.write_all(bad).unwrap();
        assert!(
            closed(&mut c),
            "{:?} closes the connection",
            String::from_utf8_lossy(bad)
        );
    }
    good.write_all(b"2:ok,").unwrap();
    assert_eq!(read_exactly(&mut good, 5), b"2:ok,");
    let log = s.log();
    assert!(
        log.contains("netstring must end with ','") && log.contains("over max_package_size"),
        "{log}"
    );
    s.stop();
}

#[test]
fn custom_listener_needs_a_plugin_with_a_protocol() {
    let port = free_port();
    let s = Server::new(&worker_table(
        "x",
        &format!("custom://127.0.0.1:{port}"),
        "echo_plugin",
        1,
        "",
    ));
    let out = s.cli(&["start", "-d"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("needs a plugin that provides a protocol"),
        "{err}"
    );
}
