//! Harness for end-to-end tests: runs the real `wm-host` binary with a config
//! written into a temporary folder, and talks to it over real sockets.
//!
//! The binary and plugins must be built first (`make test` does it).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub use serde_json::Value;

pub mod redis;
pub mod webdriver;

/// Generous: CI machines are shared and slow.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// `target/debug`, found from the test binary's own path.
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/debug/deps/<test> → target/debug
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

pub fn host_bin() -> PathBuf {
    let p = target_dir().join("wm-host");
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` (or `make test`) first",
        p.display()
    );
    p
}

/// Path of a plugin built in this workspace, e.g. `plugin("echo_plugin")`.
pub fn plugin(lib: &str) -> PathBuf {
    let p = target_dir().join(format!("lib{lib}.so"));
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` first",
        p.display()
    );
    p
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    wait_for_within(what, DEADLINE, f)
}

/// [`wait_for`] with a deadline of its own, for what takes longer.
pub fn wait_for_within<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    let r = unsafe { libc::kill(pid as i32, 0) };
    // A zombie still "exists"; look at its state too.
    r == 0
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
}

/// One wm-host installation: a temp folder with `wm.toml` and its runtime dir.
pub struct Server {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    foreground: Option<Child>,
}

impl Server {
    /// `workers` is the `[[worker]]` part of the config; `[host]` is filled in.
    pub fn new(workers: &str) -> Server {
        Server::with_host("", workers)
    }

    pub fn with_host(host_extra: &str, workers: &str) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("wm-e2e-")
            .tempdir()
            .unwrap();
        let config = dir.path().join("wm.toml");
        let text = format!(
            "[host]\nruntime_dir = \"run\"\nstop_timeout = \"3s\"\n{host_extra}\n{workers}"
        );
        std::fs::write(&config, text).unwrap();
        Server {
            dir,
            config,
            foreground: None,
        }
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dir.path().join("run")
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(host_bin())
            .args(args)
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `start -d`, which returns once every worker is ready.
    pub fn start(&self) -> Output {
        let out = self.cli(&["start", "-d"]);
        assert!(
            out.status.success(),
            "start -d failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs the master in the foreground as a child, then waits until
    /// `status` answers with every worker reporting.
    pub fn start_foreground(&mut self, workers: usize) -> &mut Child {
        let child = Command::new(host_bin())
            .args(["start", "-c"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        self.foreground = Some(child);
        wait_for("the foreground master to be ready", || {
            let s = self.try_status()?;
            let ready = s["workers"]
                .as_array()?
                .iter()
                .filter(|w| !w["stats"].is_null())
                .count();
            (ready == workers).then_some(())
        });
        self.foreground.as_mut().unwrap()
    }

    pub fn stop(&self) {
        let out = self.cli(&["stop"]);
        assert!(
            out.status.success(),
            "stop failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = self.cli(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).unwrap())
    }

    pub fn status(&self) -> Value {
        self.try_status().expect("status failed")
    }

    /// `(id, pid)` of every worker of `group`, sorted by id.
    pub fn worker_pids(&self, group: &str) -> Vec<(u64, u32)> {
        let s = self.status();
        let mut v: Vec<(u64, u32)> = s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["group"] == group)
            .map(|w| (w["id"].as_u64().unwrap(), w["pid"].as_u64().unwrap() as u32))
            .collect();
        v.sort();
        v
    }

    pub fn master_pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.runtime_dir().join("wm-host.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// The log file of a daemonized master.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.runtime_dir().join("wm-host.log")).unwrap_or_default()
    }
}

impl Drop for Server {
    /// A failing test must not leave processes behind.
    fn drop(&mut self) {
        if let Some(pid) = self.master_pid() {
            if pid_alive(pid) {
                let _ = self.cli(&["stop"]);
            }
            if pid_alive(pid) {
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        if let Some(mut c) = self.foreground.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A line-oriented client for `text://` listeners.
pub struct TextClient {
    reader: BufReader<TcpStream>,
}

impl TextClient {
    pub fn connect(port: u16) -> TextClient {
        TextClient::from_stream(TcpStream::connect(("127.0.0.1", port)).unwrap())
    }

    pub fn from_stream(s: TcpStream) -> TextClient {
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        TextClient {
            reader: BufReader::new(s),
        }
    }

    pub fn send(&mut self, line: &str) {
        self.reader
            .get_mut()
            .write_all(format!("{line}\n").as_bytes())
            .unwrap();
    }

    /// The next line, without its `\n`; `None` at end of stream.
    pub fn recv(&mut self) -> Option<String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => None,
            Ok(_) => Some(line.trim_end_matches('\n').to_string()),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => None,
            Err(e) => panic!("read failed: {e}"),
        }
    }

    pub fn call(&mut self, line: &str) -> String {
        self.send(line);
        self.recv().expect("connection closed")
    }

    /// True once the server has closed the connection.
    pub fn closed_by_server(&mut self) -> bool {
        let mut buf = [0u8; 64];
        loop {
            match self.reader.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }

    pub fn shutdown(&self) {
        let _ = self.reader.get_ref().shutdown(Shutdown::Both);
    }
}

/// Frames a payload as `frame://` does.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut v = ((payload.len() + 4) as u32).to_be_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

/// Reads one `frame://` message.
pub fn read_frame(s: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = [0u8; 4];
    s.read_exact(&mut head)?;
    let len = u32::from_be_bytes(head) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// A `[[worker]]` table. `extra` lines go inside it (options, limits…).
pub fn worker_table(name: &str, listen: &str, lib: &str, count: u32, extra: &str) -> String {
    format!(
        "[[worker]]\nname = \"{name}\"\nlisten = \"{listen}\"\ncount = {count}\nplugin = \"{}\"\n{extra}\n",
        plugin(lib).display()
    )
}

/// A masked client websocket frame, for tests that must send what a
/// well-behaved client library would not.
pub fn ws_frame(fin: bool, opcode: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut v = vec![(if fin { 0x80 } else { 0 }) | opcode];
    let m = if masked { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        v.push(m | len as u8);
    } else if len <= 0xffff {
        v.push(m | 126);
        v.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        v.push(m | 127);
        v.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if masked {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        v.extend_from_slice(&mask);
        v.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    } else {
        v.extend_from_slice(payload);
    }
    v
}

/// A raw websocket connection after a successful handshake.
pub fn ws_raw(port: u16, path: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    s
}

/// Reads up to the end of an HTTP head, byte by byte (nothing more).
pub fn read_http_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Reads one unmasked server frame: (fin, opcode, payload).
pub fn ws_read_frame(s: &mut TcpStream) -> io::Result<(bool, u8, Vec<u8>)> {
    let mut h = [0u8; 2];
    s.read_exact(&mut h)?;
    let mut len = (h[1] & 0x7f) as u64;
    if len == 126 {
        let mut b = [0u8; 2];
        s.read_exact(&mut b)?;
        len = u16::from_be_bytes(b) as u64;
    } else if len == 127 {
        let mut b = [0u8; 8];
        s.read_exact(&mut b)?;
        len = u64::from_be_bytes(b);
    }
    assert_eq!(h[1] & 0x80, 0, "server frames are not masked");
    let mut payload = vec![0u8; len as usize];
    s.read_exact(&mut payload)?;
    Ok((h[0] & 0x80 != 0, h[0] & 0x0f, payload))
}

/// A raw websocket connection whose upgrade offers `extensions`, and the
/// server's answer (a 101).
pub fn ws_offering(port: u16, extensions: &str) -> (TcpStream, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let req = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Extensions: {extensions}\r\n\r\n"
    );
    s.write_all(req.as_bytes()).unwrap();
    let head = read_http_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (s, head)
}

/// A masked client frame of one message compressed by permessage-deflate
/// (RSV1 set), without context takeover.
pub fn ws_deflated_frame(opcode: u8, data: &[u8]) -> Vec<u8> {
    let mut z = Vec::new();
    wm_proto::deflate::Deflate::new(ws_deflate_params()).deflate(data, &mut z);
    let mut f = ws_frame(true, opcode, &z, true);
    f[0] |= 0x40;
    f
}

pub fn ws_deflate_params() -> wm_proto::deflate::Params {
    let side = wm_proto::deflate::Side {
        no_context_takeover: true,
        max_window_bits: 15,
    };
    wm_proto::deflate::Params {
        ours: side,
        theirs: side,
    }
}

/// Reads one unfragmented server frame and inflates it when RSV1 says so:
/// (compressed, opcode, payload).
pub fn ws_read_message(s: &mut TcpStream) -> (bool, u8, Vec<u8>) {
    let mut first = [0u8; 1];
    s.peek(&mut first).unwrap();
    let (fin, op, payload) = ws_read_frame(s).unwrap();
    assert!(fin);
    if first[0] & 0x40 == 0 {
        return (false, op, payload);
    }
    let mut rx = wm_proto::deflate::Deflate::new(ws_deflate_params());
    let mut out = Vec::new();
    rx.inflate(&payload, true, &mut out, 1 << 24).unwrap();
    (true, op, out)
}

/// A build of the test plugin made by `make test-builds` that answers `build`
/// with `tag` ("a" or "b").
pub fn test_build(tag: &str) -> PathBuf {
    let p = target_dir().join(format!("libtest_plugin_{tag}.so"));
    assert!(
        p.exists(),
        "{} is missing: run `make test-builds` first",
        p.display()
    );
    p
}

/// The echo plugin of `fixtures/old-api`, built against plugin-api as it was
/// before live handover (it answers `build` with `old-api`). Built here,
/// once per test process, into this workspace's target dir, so it reuses
/// the abi_stable already built for the workspace: a few seconds.
pub fn old_api_plugin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let target = target_dir().parent().expect("target").to_path_buf();
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            // `--offline`: the workspace build fetched everything it uses.
            let status = Command::new(cargo)
                .args(["build", "-q", "--locked", "--offline", "-p", "old-api-echo"])
                .arg("--manifest-path")
                .arg(root.join("fixtures/old-api/Cargo.toml"))
                .env("CARGO_TARGET_DIR", &target)
                .status()
                .expect("run cargo");
            assert!(status.success(), "building fixtures/old-api failed");
            plugin("old_api_echo")
        })
        .clone()
}

/// The pid of the worker serving `c` (test-plugin's `whoami`).
pub fn pid_of(c: &mut TextClient) -> u32 {
    let who = c.call("whoami");
    who.split_whitespace()
        .find_map(|f| f.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap()
}

/// Opens clients until every one of the `workers` processes holds one;
/// returns one client per worker pid.
pub fn one_client_per_worker(
    port: u16,
    workers: usize,
) -> std::collections::BTreeMap<u32, TextClient> {
    let mut by_pid = std::collections::BTreeMap::new();
    for _ in 0..500 {
        let mut c = TextClient::connect(port);
        let pid = pid_of(&mut c);
        by_pid.entry(pid).or_insert(c);
        if by_pid.len() == workers {
            return by_pid;
        }
    }
    panic!(
        "connections never reached all {workers} workers: {:?}",
        by_pid.keys()
    );
}
