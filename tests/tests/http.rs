//! http:// end to end: keep-alive, pipelining, bodies, limits, static files.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use wm_e2e::*;

/// A server with a static folder holding `index.html`, `app.js`, a `sub/`
/// folder, a `secret.txt` outside the root and symlinks in and out of it.
fn server(extra: &str) -> (Server, u16) {
    let port = free_port();
    let s = Server::new(&worker_table(
        "web",
        &format!("http://127.0.0.1:{port}"),
        "test_plugin",
        1,
        &format!("static_dir = \"public\"\n{extra}"),
    ));
    let root = s.dir.path().join("public");
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
    std::fs::write(root.join("app.js"), "console.log(1)").unwrap();
    std::fs::write(root.join("sub/index.html"), "sub home").unwrap();
    std::fs::write(s.dir.path().join("secret.txt"), "top secret").unwrap();
    std::os::unix::fs::symlink(s.dir.path().join("secret.txt"), root.join("leak.txt")).unwrap();
    std::os::unix::fs::symlink(root.join("app.js"), root.join("alias.js")).unwrap();
    s.start();
    (s, port)
}

struct Resp {
    status: u16,
    head: String,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }
}

/// Reads one response (Content-Length bodies; none for 1xx/204/304/HEAD).
fn read_resp(s: &mut TcpStream, head_only: bool) -> Resp {
    let head = read_http_head(s);
    assert!(!head.is_empty(), "connection closed before a response");
    let status = head[9..12].parse().unwrap();
    let mut r = Resp {
        status,
        head,
        body: Vec::new(),
    };
    let len: usize = r.header("content-length").map_or(0, |v| v.parse().unwrap());
    if !head_only && status != 304 && status >= 200 {
        r.body = vec![0u8; len];
        s.read_exact(&mut r.body).unwrap();
    }
    r
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s
}

fn get(port: u16, path: &str, extra: &str) -> Resp {
    let mut s = connect(port);
    write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\n{extra}\r\n").unwrap();
    read_resp(&mut s, false)
}

fn closed(s: &mut TcpStream) -> bool {
    matches!(s.read(&mut [0u8; 1]), Ok(0) | Err(_))
}

#[test]
fn keep_alive_and_pipelined_requests_are_answered_in_order() {
    let (_s, port) = server("");
    let mut c = connect(port);
    write!(c, "GET /hello?a=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let r = read_resp(&mut c, false);
    assert_eq!((r.status, &r.body[..]), (200, &b"hello GET a=1"[..]));
    assert_eq!(r.header("connection").as_deref(), Some("keep-alive"));
    assert!(r.header("date").is_some());
    // Three requests in one write, including a static file and a 404.
    write!(c, "GET /hello?n=1 HTTP/1.1\r\nHost: x\r\n\r\nGET /app.js HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let a = read_resp(&mut c, false);
    let b = read_resp(&mut c, false);
    let d = read_resp(&mut c, false);
    assert_eq!(a.body, b"hello GET n=1");
    assert_eq!((b.status, &b.body[..]), (200, &b"console.log(1)"[..]));
    assert_eq!(d.status, 404);
    // Still open for more.
    write!(c, "HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let h = read_resp(&mut c, true);
    assert_eq!(h.status, 200);
    // The body it would have sent: "hello HEAD " (empty query).
    assert_eq!(h.header("content-length").as_deref(), Some("11"));
}

#[test]
fn bodies_with_length_chunked_and_expect_continue() {
    let (_s, port) = server("");
    let mut c = connect(port);
    write!(
        c,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhel"
    )
    .unwrap();
    c.flush().unwrap();
    write!(c, "lo").unwrap();
    assert_eq!(read_resp(&mut c, false).body, b"hello");
    write!(c, "POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nTrailer: x\r\n\r\n").unwrap();
    assert_eq!(read_resp(&mut c, false).body, b"Wikipedia");
    write!(
        c,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
    )
    .unwrap();
    let cont = read_http_head(&mut c);
    assert!(cont.starts_with("HTTP/1.1 100"), "{cont}");
    write!(c, "body").unwrap();
    assert_eq!(read_resp(&mut c, false).body, b"body");
}

#[test]
fn limits_and_malformed_requests() {
    let (s, port) = server("max_package_size = 1000");
    let big_head = get(
        port,
        "/hello",
        &format!("X-Big: {}\r\n", "a".repeat(20_000)),
    );
    assert_eq!(big_head.status, 431);
    let mut c = connect(port);
    write!(
        c,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n"
    )
    .unwrap();
    assert_eq!(read_resp(&mut c, false).status, 413);
    assert!(closed(&mut c), "the connection closes after an error");
    let mut c = connect(port);
    c.write_all(b"this is not http\r\n\r\n").unwrap();
    assert_eq!(read_resp(&mut c, false).status, 400);
    let mut c = connect(port);
    c.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    assert_eq!(
        read_resp(&mut c, false).status,
        400,
        "HTTP/1.1 without Host"
    );
    assert!(s.log().contains("bad http request"), "{}", s.log());
}

#[test]
fn connection_close_and_http10() {
    let (_s, port) = server("");
    let mut c = connect(port);
    write!(c, "GET /hello HTTP/1.0\r\n\r\n").unwrap();
    let r = read_resp(&mut c, false);
    assert_eq!(
        (r.status, r.header("connection").as_deref()),
        (200, Some("close"))
    );
    assert!(closed(&mut c));
    let mut c = connect(port);
    write!(c, "GET /bye HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert_eq!(read_resp(&mut c, false).body, b"bye");
    assert!(closed(&mut c), "the plugin asked to close");
}

#[test]
fn static_files_types_conditional_get_and_no_escape() {
    let (_s, port) = server("");
    let home = get(port, "/", "");
    assert_eq!((home.status, &home.body[..]), (200, &b"<h1>home</h1>"[..]));
    assert!(home
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let js = get(port, "/app.js", "");
    assert!(js.header("content-type").unwrap().contains("javascript"));
    assert_eq!(get(port, "/sub/", "").body, b"sub home");
    assert_eq!(
        get(port, "/alias.js", "").body,
        b"console.log(1)",
        "a link inside the root is fine"
    );
    let lm = js.header("last-modified").unwrap();
    assert_eq!(
        get(port, "/app.js", &format!("If-Modified-Since: {lm}\r\n")).status,
        304
    );
    assert_eq!(
        get(
            port,
            "/app.js",
            "If-Modified-Since: Mon, 01 Jan 2001 00:00:00 GMT\r\n"
        )
        .status,
        200
    );
    for evil in [
        "/../secret.txt",
        "/%2e%2e/secret.txt",
        "/%2E%2E%2Fsecret.txt",
        "/sub/..%2f..%2fsecret.txt",
        "/leak.txt",
        "/..%5csecret.txt",
    ] {
        let r = get(port, evil, "");
        assert_eq!(r.status, 404, "{evil}");
        assert!(
            !String::from_utf8_lossy(&r.body).contains("top secret"),
            "{evil}"
        );
    }
}

#[test]
fn slow_clients_do_not_block_others() {
    let (_s, port) = server("");
    let mut slow = connect(port);
    write!(slow, "GET /hello HTTP/1.1\r\nHo").unwrap();
    slow.flush().unwrap();
    let quick = get(port, "/hello", "");
    assert_eq!(quick.status, 200);
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(slow, "st: x\r\n\r\n").unwrap();
    assert_eq!(read_resp(&mut slow, false).status, 200);
}
