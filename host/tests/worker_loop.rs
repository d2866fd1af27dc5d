//! The worker loop in-process, against the test plugin: `worker::serve` on a
//! thread, with a real listener on loopback and socketpairs standing in for
//! the master's control and bus sockets. No master, no fork+exec.
//!
//! abi_stable keeps the first plugin module it loads for the whole process,
//! so every test here loads the same build of `test-plugin`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::thread::JoinHandle;
use std::time::Duration;

use tungstenite::{Message, WebSocket};
use wm_host::config::Config;
use wm_host::ipc::{self, FromWorker, ToWorker};
use wm_host::worker::{self, Spec};

/// Generous: the machine is shared and slow.
const DEADLINE: Duration = Duration::from_secs(20);

/// The test plugin, built if needed, copied once for this process (cargo
/// replaces the build output; the loaded copy must not change).
fn plugin() -> &'static Path {
    static COPY: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &COPY
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let status = std::process::Command::new(env!("CARGO"))
                .args(["build", "-q", "-p", "test-plugin"])
                .current_dir(&root)
                .status()
                .expect("run cargo");
            assert!(status.success(), "cargo build -p test-plugin failed");
            // target/debug/deps/<this test> → target/debug
            let exe = std::env::current_exe().unwrap();
            let built = exe.parent().and_then(Path::parent).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let copy = dir.path().join("libtest_plugin.so");
            std::fs::copy(built.join("libtest_plugin.so"), &copy).unwrap();
            (dir, copy)
        })
        .1
}

/// One worker running in this process.
struct Worker {
    port: u16,
    ctl: BufReader<UnixStream>,
    /// The master's end of the bus: kept open, never read.
    _bus: UnixStream,
    thread: Option<JoinHandle<i32>>,
}

impl Worker {
    /// Starts a worker listening with `scheme` and waits until it is ready.
    fn start(scheme: &str) -> Worker {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let text = format!(
            "[[worker]]\nname = \"t\"\nlisten = \"{scheme}://127.0.0.1:{port}\"\nplugin = {:?}\n",
            plugin().display()
        );
        let config = Config::parse(&text, Path::new("/nonexistent/wm.toml")).unwrap();
        let spec = Spec {
            worker: config.workers[0].clone(),
            id: 0,
            load_from: plugin().to_path_buf(),
            handover: false,
            tls: false,
            build: "test".into(),
        };
        let (ctl, ctl_worker) = UnixStream::pair().unwrap();
        let (bus, bus_worker) = UnixStream::pair().unwrap();
        let thread = std::thread::spawn(move || {
            worker::serve(spec, ctl_worker, Some(listener.into()), bus_worker)
        });
        ctl.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut ctl = BufReader::new(ctl);
        let mut line = String::new();
        ctl.read_line(&mut line).expect("the worker reports");
        let msg: FromWorker = serde_json::from_str(&line).unwrap();
        assert!(matches!(msg, FromWorker::Ready { .. }), "{msg:?}");
        Worker {
            port,
            ctl,
            _bus: bus,
            thread: Some(thread),
        }
    }

    fn connect(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        s
    }

    fn websocket(&self, path: &str) -> WebSocket<TcpStream> {
        let url = format!("ws://127.0.0.1:{}{path}", self.port);
        tungstenite::client(url, self.connect()).unwrap().0
    }
}

impl Drop for Worker {
    /// Stops the worker as the master would, and checks it exits cleanly.
    fn drop(&mut self) {
        let stop = ipc::encode(&ToWorker::Stop { graceful: false });
        let _ = self.ctl.get_mut().write_all(&stop);
        if let Some(t) = self.thread.take() {
            let code = t.join().expect("the worker thread");
            if !std::thread::panicking() {
                assert_eq!(code, 0, "worker exit code");
            }
        }
    }
}

/// Reads until `want` bytes arrived.
fn read_exact(s: &mut TcpStream, want: usize) -> Vec<u8> {
    let mut buf = vec![0; want];
    s.read_exact(&mut buf).unwrap();
    buf
}

#[test]
fn text_lines_are_echoed_in_order_however_they_arrive() {
    let w = Worker::start("text");
    let mut s = w.connect();
    // Several lines in one write, and one line across writes.
    s.write_all(b"one\ntwo\r\nthr").unwrap();
    assert_eq!(read_exact(&mut s, 8), b"one\ntwo\n");
    s.write_all(b"ee\n").unwrap();
    assert_eq!(read_exact(&mut s, 6), b"three\n");
    s.write_all(b"build\n").unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "default\n");
}

#[test]
fn frame_messages_are_echoed() {
    let w = Worker::start("frame");
    let mut s = w.connect();
    let wire = b"\x00\x00\x00\x09jhdxr\x00\x00\x00\x06hi";
    // Byte by byte: every split point of the input.
    for b in wire {
        s.write_all(&[*b]).unwrap();
    }
    assert_eq!(read_exact(&mut s, wire.len()), wire);
}

#[test]
fn websocket_handshake_echo_and_message_kind() {
    let w = Worker::start("websocket");
    let mut ws = w.websocket("/room?x=1");
    ws.send(Message::text("hs")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("/room?x=1"));
    ws.send(Message::text("hello")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("hello"));
    // The kind travels with each message: ask in both.
    // (Plain `send` while a binary message is handled: a binary frame.)
    ws.send(Message::binary(&b"kind"[..])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(&b"binary"[..]));
    ws.send(Message::text("kind")).unwrap();
    assert_eq!(ws.read().unwrap(), Message::text("text"));
    ws.send(Message::binary(vec![0u8, 1, 2])).unwrap();
    assert_eq!(ws.read().unwrap(), Message::binary(vec![0u8, 1, 2]));
    ws.close(None).unwrap();
    // The server answers the close; then the stream ends.
    while ws.read().is_ok() {}
}

#[test]
fn websocket_frames_right_behind_the_handshake_and_refusals() {
    let w = Worker::start("websocket");
    let mut s = w.connect();
    let req = "GET /a HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
               Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    // A masked "hi" in the same write as the request.
    let mut wire = req.as_bytes().to_vec();
    wire.extend([0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2]);
    s.write_all(&wire).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    while !got.ends_with(&[0x81, 2, b'h', b'i']) {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 101 Switching Protocols\r\n"));

    // Refused by the plugin, and refused for a bad request.
    for (req, status) in [
        (req.replace("GET /a", "GET /forbidden"), "403"),
        (req.replace("Version: 13", "Version: 8"), "426"),
    ] {
        let mut s = w.connect();
        s.write_all(req.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status} ")),
            "{answer}"
        );
    }
}

#[test]
fn http_keep_alive_and_pipelined_requests() {
    let w = Worker::start("http");
    let mut s = w.connect();
    let get = "GET /hello?a=1 HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(format!("{get}{get}").as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    for _ in 0..2 {
        let mut status = String::new();
        r.read_line(&mut status).unwrap();
        assert_eq!(status, "HTTP/1.1 200 OK\r\n");
        let mut len = 0;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h == "\r\n" {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length: ") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        assert_eq!(body, b"hello GET a=1");
    }
}

#[test]
fn outbound_websocket_client_through_the_same_codec() {
    // A websocket worker to dial, and a text worker whose plugin dials it.
    let server = Worker::start("websocket");
    let w = Worker::start("text");
    let mut s = w.connect();
    let cmd = format!("dial ws://127.0.0.1:{}/up hi\n", server.port);
    s.write_all(cmd.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "connected\n");
    line.clear();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "reply hi\n");
}
