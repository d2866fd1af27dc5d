//! Heap allocations per echoed message, counted by `valgrind --tool=dhat`.
//!
//! The server runs under dhat (wm-host with `--trace-children=yes`, so the
//! worker the master fork+execs is traced too, plugin code included). One
//! connection sends N messages, one in flight, each answer checked; then the
//! server is stopped (`wm-host stop`; SIGTERM for the baseline) and dhat
//! writes one file per process. The same is done with 2N messages, and
//! (blocks in the 2N run − blocks in the N run) ÷ N is what each message
//! costs: start-up, the first message's buffers and shutdown cancel out.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::client::{self, Payload, Proto};
use crate::suite::Bins;

/// What is echoed: a protocol of the echo plugin, or HTTP GETs answered by
/// `bench-hello-plugin`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Service {
    Text,
    Frame,
    Websocket,
    Http,
    /// Websocket over TLS (`wss://`; the baseline with `--cert`).
    Wss,
}

impl Service {
    pub fn scheme(self) -> &'static str {
        match self {
            Service::Text => "text",
            Service::Frame => "frame",
            Service::Websocket => "websocket",
            Service::Http => "http",
            Service::Wss => "wss",
        }
    }

    fn proto(self) -> Option<Proto> {
        match self {
            Service::Text => Some(Proto::Text),
            Service::Frame => Some(Proto::Frame),
            Service::Websocket | Service::Wss => Some(Proto::Websocket),
            Service::Http => None,
        }
    }
}

/// Payload bytes of each echoed message.
pub const SIZE: usize = 32;

/// What dhat saw in the serving process over one run.
#[derive(Clone, Debug, Default)]
pub struct Count {
    pub blocks: u64,
    pub bytes: u64,
    /// Blocks per allocation site (its call stack, addresses left out) and
    /// the site's innermost frame in our own code.
    sites: HashMap<String, (u64, String)>,
}

/// Both runs and what one message costs.
#[derive(Clone, Debug)]
pub struct AllocReport {
    pub messages: usize,
    pub single: Count,
    pub double: Count,
    pub blocks_per_msg: f64,
    pub bytes_per_msg: f64,
    /// Sites allocating per message: (blocks per message, innermost frame
    /// in our code), most first.
    pub sites: Vec<(f64, String)>,
}

impl AllocReport {
    /// The per-message sites, most first, at most `max` of them.
    pub fn sites_text(&self, max: usize) -> String {
        let mut v: Vec<String> = self
            .sites
            .iter()
            .take(max)
            .map(|(n, f)| format!("{n:.1} × {f}"))
            .collect();
        if self.sites.len() > max {
            v.push(format!("{} more", self.sites.len() - max));
        }
        v.join("; ")
    }

    /// Both runs' totals of the serving process.
    pub fn totals_text(&self) -> String {
        format!(
            "{} blocks / {} bytes after {} messages, {} / {} after {}",
            self.single.blocks,
            self.single.bytes,
            self.messages,
            self.double.blocks,
            self.double.bytes,
            2 * self.messages
        )
    }
}

pub fn valgrind_installed() -> bool {
    Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs N and 2N messages against `service` (wm-host, or the baseline when
/// `baseline`), the server pinned to `cpu`.
pub fn measure(
    service: Service,
    messages: usize,
    baseline: bool,
    bins: &Bins,
    cpu: usize,
) -> Result<AllocReport, String> {
    if !valgrind_installed() {
        return Err("valgrind is not installed (apt-get install valgrind)".into());
    }
    let messages = messages.max(1);
    let single = run(service, messages, baseline, bins, cpu)?;
    let double = run(service, 2 * messages, baseline, bins, cpu)?;
    let per = |a: u64, b: u64| (b as f64 - a as f64) / messages as f64;
    // Where the difference comes from: sites whose count grew by at least
    // one block per two messages, merged by the frame that names them.
    let mut by_frame: HashMap<&str, f64> = HashMap::new();
    for (key, (b, frame)) in &double.sites {
        let a = single.sites.get(key).map_or(0, |s| s.0);
        *by_frame.entry(frame).or_default() += per(a, *b);
    }
    let mut sites: Vec<(f64, String)> = by_frame
        .into_iter()
        .filter(|(_, d)| *d >= 0.5)
        .map(|(f, d)| (d, f.to_string()))
        .collect();
    sites.sort_by(|x, y| y.0.total_cmp(&x.0).then_with(|| x.1.cmp(&y.1)));
    Ok(AllocReport {
        messages,
        blocks_per_msg: per(single.blocks, double.blocks),
        bytes_per_msg: per(single.bytes, double.bytes),
        single,
        double,
        sites,
    })
}

/// The server under dhat; killed if still running when dropped.
struct Traced {
    child: Child,
    dir: PathBuf,
}

impl Drop for Traced {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One run: start the server under dhat, echo `n` messages, stop it, read
/// the serving process's totals.
fn run(
    service: Service,
    n: usize,
    baseline: bool,
    bins: &Bins,
    cpu: usize,
) -> Result<Count, String> {
    let port = crate::suite::free_port();
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let dir = std::env::temp_dir().join(format!("wm-bench-dhat-{}-{port}", std::process::id()));
    let out = dir.join("dhat");
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let log = std::fs::File::create(dir.join("valgrind.log")).map_err(|e| e.to_string())?;
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpu.to_string(), "valgrind", "--tool=dhat"])
        .arg(format!("--dhat-out-file={}/dhat.%p", out.display()));
    let config = dir.join("wm.toml");
    let tls = service == Service::Wss;
    if tls {
        crate::tls::make_cert(&dir)?;
    }
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    if baseline {
        let proto = if tls { "websocket" } else { service.scheme() };
        cmd.arg(&bins.baseline)
            .args(["--proto", proto, "--listen"])
            .arg(addr.to_string());
        if tls {
            cmd.arg("--cert").arg(&cert).arg("--key").arg(&key);
        }
    } else {
        let plugin = if service == Service::Http {
            &bins.hello_plugin
        } else {
            &bins.echo_plugin
        };
        // Valgrind slows everything some 20-50 times: generous timeouts so
        // that no worker is killed (a killed process writes no dhat file).
        let text = format!(
            "[host]\nruntime_dir = \"run\"\nstop_timeout = \"60s\"\nstart_timeout = \"120s\"\n\n\
             [[worker]]\nname = \"bench\"\nlisten = \"{}://127.0.0.1:{port}\"\n\
             count = 1\nplugin = \"{}\"\n{}",
            service.scheme(),
            plugin.display(),
            match tls {
                true => format!(
                    "[worker.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                    cert.display(),
                    key.display()
                ),
                false => String::new(),
            }
        );
        std::fs::write(&config, text).map_err(|e| e.to_string())?;
        // The master fork+execs its workers: follow them.
        cmd.arg("--trace-children=yes")
            .arg(&bins.host)
            .args(["start", "-c"])
            .arg(&config);
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("taskset valgrind: {e}"))?;
    let mut traced = Traced { child, dir };
    let log = traced.dir.join("valgrind.log");
    let result = (|| {
        let conn = echo(service, addr, n, &mut traced.child)?;
        // Stopped with the connection still open, the same way in every run.
        let mut stop = None;
        if baseline {
            // SAFETY: signals our own child (valgrind, which taskset exec'd).
            unsafe { libc::kill(traced.child.id() as i32, libc::SIGTERM) };
        } else {
            stop = Some(
                Command::new(&bins.host)
                    .args(["stop", "-c"])
                    .arg(&config)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .map_err(|e| format!("wm-host stop: {e}"))?,
            );
        }
        // The master is our child: reap it while `stop` waits for it to be
        // gone (a zombie still counts as running).
        let end = Instant::now() + Duration::from_secs(60);
        let mut exited = false;
        while !exited || stop.is_some() {
            if Instant::now() > end {
                return Err("the server under valgrind did not exit within 60 s".into());
            }
            exited = exited
                || traced
                    .child
                    .try_wait()
                    .map_err(|e| e.to_string())?
                    .is_some();
            if let Some(st) = &mut stop {
                if st.try_wait().map_err(|e| e.to_string())?.is_some() {
                    let out = stop.take().unwrap().wait_with_output();
                    let out = out.map_err(|e| e.to_string())?;
                    if !out.status.success() {
                        return Err(format!(
                            "wm-host stop failed: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        ));
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        drop(conn);
        serving_totals(&out, baseline)
    })();
    // valgrind's and the server's own words on what went wrong.
    result.map_err(|e| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(4).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{e} (log: {})", tail.join(" / "))
    })
}

/// Connects (retrying while valgrind starts `server`), does the handshake,
/// then echoes `n` messages one at a time; the connection stays open.
fn echo(
    service: Service,
    addr: SocketAddr,
    n: usize,
    server: &mut Child,
) -> Result<Box<dyn std::any::Any>, String> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let s = loop {
        match TcpStream::connect(addr) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => return Err(format!("connect: {e}")),
            Err(e) => {
                if let Ok(Some(st)) = server.try_wait() {
                    return Err(format!("the server exited ({st}) before listening: {e}"));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
    match service {
        Service::Wss => talk(service, crate::tls::blocking_client(s)?, n),
        _ => talk(service, s, n),
    }
}

/// The handshake and `n` echoes on a connected stream, which is returned.
fn talk<S: Read + Write + 'static>(
    service: Service,
    mut s: S,
    n: usize,
) -> Result<Box<dyn std::any::Any>, String> {
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    if service.proto() == Some(Proto::Websocket) {
        s.write_all(
            b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .map_err(|e| format!("handshake: {e}"))?;
        let end = read_until(&mut s, &mut buf, |b| {
            b.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
        })?;
        if !buf.starts_with(b"HTTP/1.1 101") {
            return Err("websocket handshake refused".into());
        }
        buf.drain(..end);
    }
    let mut payload = Payload::new(SIZE);
    let mut msg = Vec::with_capacity(256);
    for seq in 0..n as u64 {
        msg.clear();
        match service.proto() {
            Some(proto) => {
                client::encode(proto, 0, seq, &mut payload, &mut msg);
                s.write_all(&msg)
                    .map_err(|e| format!("message {seq}: {e}"))?;
                let mut range = (0, 0);
                let used = read_until(&mut s, &mut buf, |b| {
                    let (start, end, used) = client::decode(proto, b).ok()??;
                    range = (start, end);
                    Some(used)
                })?;
                if !payload.matches(0, seq, &buf[range.0..range.1]) {
                    return Err(format!("message {seq}: wrong echo"));
                }
                buf.drain(..used);
            }
            None => {
                s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                    .map_err(|e| format!("request {seq}: {e}"))?;
                let used = read_until(&mut s, &mut buf, http_response_len)?;
                if !buf.starts_with(b"HTTP/1.1 200") || !buf[..used].ends_with(b"Hello, world!") {
                    return Err(format!(
                        "request {seq}: unexpected answer {:?}",
                        String::from_utf8_lossy(&buf[..used])
                    ));
                }
                buf.drain(..used);
            }
        }
    }
    Ok(Box::new(s))
}

/// Reads into `buf` until `complete` finds a whole answer; returns its length.
fn read_until(
    s: &mut impl Read,
    buf: &mut Vec<u8>,
    mut complete: impl FnMut(&[u8]) -> Option<usize>,
) -> Result<usize, String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(n) = complete(buf) {
            return Ok(n);
        }
        match s.read(&mut chunk) {
            Ok(0) => return Err("closed by the server".into()),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}

/// Length of the HTTP response at the start of `b` (headers and a
/// Content-Length body), once all of it is there.
pub(crate) fn http_response_len(b: &[u8]) -> Option<usize> {
    let head = b.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let text = std::str::from_utf8(&b[..head]).ok()?;
    let len: usize = text
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    (b.len() >= head + len).then_some(head + len)
}

/// Total blocks and bytes allocated by the serving process: wm-host's worker
/// (the file whose command is `… worker`), or the baseline's only file.
fn serving_totals(out: &Path, baseline: bool) -> Result<Count, String> {
    let mut found: Vec<Count> = Vec::new();
    let mut cmds = Vec::new();
    for entry in std::fs::read_dir(out).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        let text = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let json: Value =
            serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        let cmd = json["cmd"].as_str().unwrap_or("").to_string();
        let worker = cmd.split_whitespace().nth(1) == Some("worker");
        if baseline || worker {
            found.push(totals(&json));
        }
        cmds.push(cmd);
    }
    match found.as_slice() {
        [_] => Ok(found.pop().unwrap()),
        _ => Err(format!(
            "expected one dhat file of the serving process, found {} among: {}",
            found.len(),
            cmds.join("; ")
        )),
    }
}

/// Sums dhat's program points: `tbk` is total blocks, `tb` total bytes.
fn totals(json: &Value) -> Count {
    let pps = json["pps"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let frames = json["ftbl"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let sum = |k: &str| pps.iter().filter_map(|p| p[k].as_u64()).sum();
    let mut sites: HashMap<String, (u64, String)> = HashMap::new();
    for p in pps {
        let stack: Vec<&str> = p["fs"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .filter_map(|i| frames.get(i.as_u64()? as usize)?.as_str())
            // "0x23131B: name (file:line)": the address may differ per run.
            .map(|f| f.split_once(": ").map_or(f, |x| x.1))
            .collect();
        let ours = stack
            .iter()
            .find(|f| OURS.iter().any(|c| f.starts_with(c)))
            .unwrap_or(&"?");
        let e = sites
            .entry(stack.join("\n"))
            .or_insert((0, ours.to_string()));
        e.0 += p["tbk"].as_u64().unwrap_or(0);
    }
    Count {
        blocks: sum("tbk"),
        bytes: sum("tb"),
        sites,
    }
}

/// Crates whose functions name an allocation site (the first frame of one
/// of them on the stack, from the allocation outwards; inlined frames often
/// lack the crate's name, and generic std frames mention ours in brackets).
const OURS: [&str; 5] = [
    "wm_host::",
    "plugin_api::",
    "wm_baseline::",
    "echo_plugin::",
    "bench_hello_plugin::",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_dhat_program_points() {
        let json: Value = serde_json::from_str(
            r#"{"cmd":"wm-host worker","pps":[{"tb":100,"tbk":2,"fs":[0,1]},{"tb":24,"tbk":1,"fs":[0,2]}],
               "ftbl":["0x1: malloc (in vgpreload)","0x2: wm_host::a (x.rs:1)","0x3: plugin_api::b (y.rs:2)"]}"#,
        )
        .unwrap();
        let c = totals(&json);
        assert_eq!((c.blocks, c.bytes), (3, 124));
        let mut sites: Vec<_> = c.sites.values().cloned().collect();
        sites.sort();
        assert_eq!(
            sites,
            vec![
                (1, "plugin_api::b (y.rs:2)".to_string()),
                (2, "wm_host::a (x.rs:1)".to_string())
            ]
        );
    }

    #[test]
    fn finds_the_end_of_an_http_response() {
        let r = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhelloHTTP";
        assert_eq!(http_response_len(r), Some(r.len() - 4));
        assert_eq!(http_response_len(&r[..20]), None);
        assert_eq!(http_response_len(b"HTTP/1.1 204 No\r\n\r\n"), Some(19));
    }
}
