//! `wm-bench tls`: wm-host's ssl listeners against `wm-baseline --cert`
//! (a bare mio + rustls loop), in one run, server pinned to one CPU and the
//! client to the other: wss echo, https plaintext (wrk), TLS handshakes per
//! second, and the memory of idle wss connections. Writes its section of
//! `bench/RESULTS.md` between markers, leaving the rest as it is.
//!
//! The client is rustls too (ring, TLS 1.3 as negotiated by default); it does
//! not verify the server's certificate (both sides present the same one).

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use crate::client::{decode, encode, ws_answer, Payload, Proto};
use crate::suite::{free_port, Bins, CpuPool};
use crate::sys;

const BEGIN: &str = "<!-- tls:begin -->";
const END: &str = "<!-- tls:end -->";

#[derive(clap::Args, Debug)]
pub struct TlsOpts {
    /// Markdown file whose TLS section is written (created if missing).
    #[arg(long, default_value = "bench/RESULTS.md")]
    pub out: PathBuf,
    /// Seconds measured per run.
    #[arg(long, default_value_t = 5)]
    pub secs: u64,
    /// Runs per side: rates from the best, per-CPU-second figures over all.
    #[arg(long, default_value_t = 4)]
    pub rounds: usize,
    /// Idle wss connections for the memory figure.
    #[arg(long, default_value_t = 5000)]
    pub idle: usize,
    /// CPU of the servers (the client takes another).
    #[arg(long, default_value_t = 1)]
    pub server_cpu: usize,
}

/// Accepts any certificate: the bench measures, it does not authenticate.
#[derive(Debug)]
struct NoVerify;

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn client_config() -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify))
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(c)
}

#[derive(PartialEq, Eq)]
enum St {
    Upgrading,
    Open,
    Dead,
}

struct Conn {
    tcp: TcpStream,
    tls: ClientConnection,
    id: u32,
    st: St,
    rbuf: Vec<u8>,
    sent: VecDeque<Instant>,
    next_seq: u64,
    recv_seq: u64,
}

impl Conn {
    fn open(poll: &Poll, cfg: &Arc<ClientConfig>, addr: SocketAddr, id: u32) -> io::Result<Conn> {
        let mut tcp = TcpStream::connect(addr)?;
        poll.registry().register(
            &mut tcp,
            Token(id as usize),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from("localhost").expect("name");
        let mut tls = ClientConnection::new(cfg.clone(), name).map_err(io::Error::other)?;
        // 16 messages of 4 KiB are queued at once, some before the handshake.
        tls.set_buffer_limit(None);
        Ok(Conn {
            tcp,
            tls,
            id,
            st: St::Upgrading,
            rbuf: Vec::new(),
            sent: VecDeque::new(),
            next_seq: 0,
            recv_seq: 0,
        })
    }

    /// Writes what rustls holds; false when the socket failed.
    fn push(&mut self) -> bool {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(_) => return false,
            }
        }
        true
    }

    /// Reads and decrypts what arrived into `rbuf`; false when it ended.
    fn pull(&mut self) -> bool {
        let mut buf = [0u8; 16384];
        loop {
            match self.tls.read_tls(&mut self.tcp) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::NotConnected => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
            if self.tls.process_new_packets().is_err() {
                return false;
            }
            loop {
                match self.tls.reader().read(&mut buf) {
                    Ok(0) => return false,
                    Ok(n) => self.rbuf.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => return false,
                }
            }
        }
        true
    }

    fn send_msg(&mut self, p: &mut Payload, scratch: &mut Vec<u8>) {
        scratch.clear();
        encode(Proto::Websocket, self.id, self.next_seq, p, scratch);
        self.next_seq += 1;
        self.sent.push_back(Instant::now());
        let _ = self.tls.writer().write_all(scratch);
    }
}

/// A round's figures into its side's pool: rounds last equally long, so
/// rates stand in for counts.
fn pool_round(pool: &mut CpuPool, rate: f64, per_cpu: f64) {
    if per_cpu > 0.0 {
        pool.add(rate, rate / per_cpu);
    }
}

/// What a wss echo run measured.
#[derive(Default, Clone)]
struct Echo {
    rate: f64,
    /// Messages per CPU-second of the server process: what load on the
    /// shared machine does not move.
    per_cpu: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize] as f64
}

/// `conns` wss connections, `inflight` messages of `size` bytes each.
fn wss_echo(
    addr: SocketAddr,
    pid: u32,
    conns: usize,
    inflight: usize,
    size: usize,
    secs: u64,
) -> Echo {
    let cfg = client_config();
    let mut poll = Poll::new().expect("poll");
    let mut cs: Vec<Conn> = Vec::new();
    let mut errors = 0;
    for id in 0..conns {
        match Conn::open(&poll, &cfg, addr, id as u32) {
            Ok(mut c) => {
                let _ = write!(
                    c.tls.writer(),
                    "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                );
                cs.push(c);
            }
            Err(_) => errors += 1,
        }
    }
    let mut p = Payload::new(size);
    let mut scratch = Vec::new();
    let mut events = Events::with_capacity(1024);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(1);
    let end = measure_from + Duration::from_secs(secs);
    let mut msgs = 0u64;
    let mut lat: Vec<u32> = Vec::new();
    let mut cpu0 = None;
    while Instant::now() < end {
        if cpu0.is_none() && Instant::now() >= measure_from {
            cpu0 = sys::cpu_seconds(pid);
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .expect("poll");
        for ev in events.iter() {
            let c = &mut cs[ev.token().0];
            if c.st == St::Dead {
                continue;
            }
            let mut ok = c.push() && c.pull();
            if c.st == St::Upgrading {
                match ws_answer(&c.rbuf) {
                    Ok(Some(n)) => {
                        c.rbuf.drain(..n);
                        c.st = St::Open;
                        for _ in 0..inflight {
                            c.send_msg(&mut p, &mut scratch);
                        }
                    }
                    Ok(None) => {}
                    Err(_) => ok = false,
                }
            }
            if c.st == St::Open {
                let mut used = 0;
                while let Ok(Some((s, e, n))) = decode(Proto::Websocket, &c.rbuf[used..]) {
                    let good = p.matches(c.id, c.recv_seq, &c.rbuf[used + s..used + e]);
                    if !good {
                        ok = false;
                        break;
                    }
                    c.recv_seq += 1;
                    used += n;
                    let now = Instant::now();
                    if let Some(t) = c.sent.pop_front() {
                        if now >= measure_from && now < end {
                            msgs += 1;
                            lat.push(now.duration_since(t).as_micros() as u32);
                        }
                    }
                    c.send_msg(&mut p, &mut scratch);
                }
                c.rbuf.drain(..used);
            }
            if !(ok && c.push()) {
                c.st = St::Dead;
                errors += 1;
            }
        }
    }
    let cpu = sys::cpu_seconds(pid).unwrap_or(0.0) - cpu0.unwrap_or(0.0);
    lat.sort_unstable();
    Echo {
        rate: msgs as f64 / secs as f64,
        per_cpu: if cpu > 0.0 { msgs as f64 / cpu } else { 0.0 },
        p50_us: percentile(&lat, 0.5),
        p99_us: percentile(&lat, 0.99),
        errors,
    }
}

/// New TLS connections per second, `conc` at a time: connect, handshake
/// (the client's Finished sent), close.
/// Returns (per second, per server CPU-second, errors).
fn handshakes(addr: SocketAddr, pid: u32, conc: usize, secs: u64) -> (f64, f64, u64) {
    let cfg = client_config();
    let mut poll = Poll::new().expect("poll");
    let mut slots: Vec<Option<Conn>> = (0..conc).map(|_| None).collect();
    let mut events = Events::with_capacity(1024);
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(1);
    let end = measure_from + Duration::from_secs(secs);
    let (mut done, mut errors) = (0u64, 0u64);
    let mut fresh: Vec<usize> = (0..conc).collect();
    let mut cpu0 = None;
    while Instant::now() < end {
        if cpu0.is_none() && Instant::now() >= measure_from {
            cpu0 = sys::cpu_seconds(pid);
        }
        for i in fresh.drain(..) {
            match Conn::open(&poll, &cfg, addr, i as u32) {
                Ok(mut c) => {
                    c.push();
                    slots[i] = Some(c);
                }
                Err(_) => errors += 1,
            }
        }
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .expect("poll");
        for ev in events.iter() {
            let i = ev.token().0;
            let Some(c) = slots[i].as_mut() else { continue };
            let ok = c.push() && c.pull() && c.push();
            if !ok {
                errors += 1;
            } else if c.tls.is_handshaking() {
                continue;
            } else if Instant::now() >= measure_from {
                done += 1;
            }
            if let Some(mut c) = slots[i].take() {
                let _ = poll.registry().deregister(&mut c.tcp);
            }
            fresh.push(i);
        }
    }
    let cpu = sys::cpu_seconds(pid).unwrap_or(0.0) - cpu0.unwrap_or(0.0);
    let per_cpu = if cpu > 0.0 { done as f64 / cpu } else { 0.0 };
    (done as f64 / secs as f64, per_cpu, errors)
}

/// Opens `n` wss connections (handshake, upgrade, one echo each); returns
/// how many are open, keeping them until the result is dropped.
fn idle_wss(addr: SocketAddr, n: usize) -> (usize, Vec<Conn>) {
    let cfg = client_config();
    let mut poll = Poll::new().expect("poll");
    let mut cs = Vec::new();
    for id in 0..n {
        if let Ok(mut c) = Conn::open(&poll, &cfg, addr, id as u32) {
            let _ = write!(
                c.tls.writer(),
                "GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            cs.push(c);
        }
    }
    let mut p = Payload::new(32);
    let mut scratch = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut echoed = 0;
    let end = Instant::now() + Duration::from_secs(60);
    while echoed < cs.len() && Instant::now() < end {
        poll.poll(&mut events, Some(Duration::from_millis(100)))
            .expect("poll");
        for ev in events.iter() {
            let c = &mut cs[ev.token().0];
            if c.st == St::Dead {
                continue;
            }
            if !(c.push() && c.pull()) {
                c.st = St::Dead;
                continue;
            }
            if c.st == St::Upgrading {
                if let Ok(Some(k)) = ws_answer(&c.rbuf) {
                    c.rbuf.drain(..k);
                    c.st = St::Open;
                    c.send_msg(&mut p, &mut scratch);
                }
            } else if c.st == St::Open && !c.sent.is_empty() {
                if let Ok(Some((_, _, k))) = decode(Proto::Websocket, &c.rbuf) {
                    c.rbuf.drain(..k);
                    c.sent.clear();
                    echoed += 1;
                }
            }
            c.push();
        }
    }
    (echoed, cs)
}

/// A server under test, stopped on drop.
enum Server {
    Wm {
        host: PathBuf,
        config: PathBuf,
        pid: u32,
    },
    Base(std::process::Child),
}

impl Server {
    fn pid(&self) -> u32 {
        match self {
            Server::Wm { pid, .. } => *pid,
            Server::Base(c) => c.id(),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        match self {
            Server::Wm { host, config, .. } => {
                let _ = Command::new(&*host)
                    .args(["stop", "-c"])
                    .arg(&*config)
                    .stdin(Stdio::null())
                    .output();
            }
            Server::Base(child) => {
                // SAFETY: signals our own child.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let _ = child.wait();
            }
        }
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Side {
    Wm,
    Base,
}

/// `listen` is `wss`, `https` or `ssl-text` (text:// with transport ssl).
fn start(
    side: Side,
    listen: &str,
    bins: &Bins,
    dir: &Path,
    cpu: usize,
) -> Result<(Server, SocketAddr), String> {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let cpu = cpu.to_string();
    let server = match side {
        Side::Wm => {
            let (scheme, plugin, extra) = match listen {
                "wss" => ("wss", &bins.echo_plugin, ""),
                "https" => ("https", &bins.hello_plugin, ""),
                _ => ("text", &bins.echo_plugin, "transport = \"ssl\"\n"),
            };
            let config = dir.join(format!("wm-{port}.toml"));
            let text = format!(
                "[host]\nruntime_dir = \"run-{port}\"\nstop_timeout = \"2s\"\n\n\
                 [[worker]]\nname = \"bench\"\nlisten = \"{scheme}://{addr}\"\ncount = 1\n\
                 plugin = \"{}\"\n{extra}[worker.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
                plugin.display(),
                cert.display(),
                key.display()
            );
            std::fs::write(&config, text).map_err(|e| e.to_string())?;
            let out = Command::new("taskset")
                .args(["-c", &cpu])
                .arg(&bins.host)
                .args(["start", "-d", "-c"])
                .arg(&config)
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("taskset: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "wm-host start: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            let status = Command::new(&bins.host)
                .args(["status", "--json", "-c"])
                .arg(&config)
                .output()
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value =
                serde_json::from_slice(&status.stdout).map_err(|e| e.to_string())?;
            let pid = v["workers"][0]["pid"].as_u64().ok_or("no worker pid")? as u32;
            Server::Wm {
                host: bins.host.clone(),
                config,
                pid,
            }
        }
        Side::Base => {
            let proto = match listen {
                "wss" => "websocket",
                "https" => "http",
                _ => "text",
            };
            let child = Command::new("taskset")
                .args(["-c", &cpu])
                .arg(&bins.baseline)
                .args(["--proto", proto, "--listen", &addr.to_string()])
                .arg("--cert")
                .arg(&cert)
                .arg("--key")
                .arg(&key)
                .stdin(Stdio::null())
                .spawn()
                .map_err(|e| format!("taskset: {e}"))?;
            let end = Instant::now() + Duration::from_secs(10);
            while std::net::TcpStream::connect(addr).is_err() {
                if Instant::now() > end {
                    return Err("wm-baseline did not listen".into());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Server::Base(child)
        }
    };
    Ok((server, addr))
}

/// A blocking TLS client on a connected socket (for `allocs`).
pub(crate) fn blocking_client(
    s: std::net::TcpStream,
) -> Result<rustls::StreamOwned<ClientConnection, std::net::TcpStream>, String> {
    let name = ServerName::try_from("localhost").expect("name");
    let conn = ClientConnection::new(client_config(), name).map_err(|e| e.to_string())?;
    Ok(rustls::StreamOwned::new(conn, s))
}

/// A certificate for localhost (ECDSA P-256), by the openssl command.
pub(crate) fn make_cert(dir: &Path) -> Result<(), String> {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .arg("-keyout")
        .arg(dir.join("key.pem"))
        .arg("-out")
        .arg(dir.join("cert.pem"))
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl req: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(())
}

fn wrk_https(addr: SocketAddr, client_cpu: usize, secs: u64) -> Result<(f64, f64), String> {
    let out = Command::new("taskset")
        .args(["-c", &client_cpu.to_string()])
        .args(["wrk", "-t1", "-c100", "--latency"])
        .arg(format!("-d{secs}s"))
        .arg(format!("https://localhost:{}/plaintext", addr.port()))
        .output()
        .map_err(|e| format!("wrk: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut rate = 0.0;
    let mut p99 = 0.0;
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        match t.as_slice() {
            ["Requests/sec:", r] => rate = r.parse().unwrap_or(0.0),
            ["99%", v] => p99 = wrk_us(v),
            ["Non-2xx", ..] | ["Socket", "errors:", ..] => {
                return Err(format!("wrk: {line}"));
            }
            _ => {}
        }
    }
    if rate == 0.0 {
        return Err(format!("wrk said: {text}"));
    }
    Ok((rate, p99))
}

fn wrk_us(v: &str) -> f64 {
    let (num, mult) = if let Some(n) = v.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = v.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = v.strip_suffix('s') {
        (n, 1e6)
    } else {
        (v, 1.0)
    };
    num.parse::<f64>().unwrap_or(0.0) * mult
}

fn ratio(wm: f64, base: f64) -> String {
    if base > 0.0 {
        format!("{:.2}×", wm / base)
    } else {
        "-".into()
    }
}

pub fn run(opts: TlsOpts) -> Result<(), String> {
    let bins = Bins::find()?;
    let load_before = loadavg();
    sys::raise_nofile(opts.idle as u64 + 4096);
    let client_cpu = if opts.server_cpu == 0 { 1 } else { 0 };
    sys::pin_to_cpu(client_cpu).map_err(|e| e.to_string())?;
    let dir = std::env::temp_dir().join(format!("wm-bench-tls-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    make_cert(&dir)?;
    let mut rows: Vec<String> = Vec::new();
    let sides = [Side::Wm, Side::Base];
    // wss echo.
    for size in [32usize, 4096] {
        let mut best = [Echo::default(), Echo::default()];
        let mut pool = [CpuPool::default(); 2];
        for _ in 0..opts.rounds {
            for (i, &side) in sides.iter().enumerate() {
                let (server, addr) = start(side, "wss", &bins, &dir, opts.server_cpu)?;
                let r = wss_echo(addr, server.pid(), 100, 16, size, opts.secs);
                eprintln!(
                    "wss echo {size} B {}: {:.0} msgs/s, {:.0} per server CPU-s, p99 {:.0} µs ({} errors)",
                    name(side),
                    r.rate,
                    r.per_cpu,
                    r.p99_us,
                    r.errors
                );
                pool_round(&mut pool[i], r.rate, r.per_cpu);
                if r.rate > best[i].rate {
                    best[i] = r;
                }
                drop(server);
            }
        }
        let [w, b] = &best;
        let [pw, pb] = pool.map(|p| p.per_cpu_s().unwrap_or(0.0));
        let size_s = if size >= 1024 {
            format!("{} KiB", size / 1024)
        } else {
            format!("{size} B")
        };
        rows.push(format!(
            "| wss echo, 100 conns × 16 in flight × {size_s} | {:.0} msgs/s ({:.0} per CPU-s), p50 {:.0} µs, p99 {:.0} µs | {:.0} msgs/s ({:.0} per CPU-s), p50 {:.0} µs, p99 {:.0} µs | {} ({} per CPU-s) | {} |",
            w.rate, pw, w.p50_us, w.p99_us, b.rate, pb, b.p50_us, b.p99_us,
            ratio(w.rate, b.rate),
            ratio(pw, pb),
            w.errors + b.errors,
        ));
    }
    // https plaintext with wrk.
    let mut best = [(0.0, 0.0, 0.0), (0.0, 0.0, 0.0)];
    let mut pool = [CpuPool::default(); 2];
    for _ in 0..opts.rounds {
        for (i, &side) in sides.iter().enumerate() {
            let (server, addr) = start(side, "https", &bins, &dir, opts.server_cpu)?;
            let cpu0 = sys::cpu_seconds(server.pid()).unwrap_or(0.0);
            let (rate, p99) = wrk_https(addr, client_cpu, opts.secs)?;
            let cpu = sys::cpu_seconds(server.pid()).unwrap_or(0.0) - cpu0;
            let per_cpu = if cpu > 0.0 {
                rate * opts.secs as f64 / cpu
            } else {
                0.0
            };
            eprintln!(
                "https plaintext {}: {rate:.0} req/s, {per_cpu:.0} per server CPU-s, p99 {p99:.0} µs",
                name(side)
            );
            pool_round(&mut pool[i], rate, per_cpu);
            if rate > best[i].0 {
                best[i] = (rate, p99, per_cpu);
            }
            drop(server);
        }
    }
    for (b, p) in best.iter_mut().zip(&pool) {
        b.2 = p.per_cpu_s().unwrap_or(0.0);
    }
    rows.push(format!(
        "| https plaintext keep-alive, wrk 1 thread × 100 conns | {:.0} req/s ({:.0} per CPU-s), p99 {:.0} µs | {:.0} req/s ({:.0} per CPU-s), p99 {:.0} µs | {} ({} per CPU-s) | 0 |",
        best[0].0, best[0].2, best[0].1, best[1].0, best[1].2, best[1].1,
        ratio(best[0].0, best[1].0), ratio(best[0].2, best[1].2)
    ));
    // Handshakes.
    let mut best = [(0.0, 0.0, 0u64), (0.0, 0.0, 0u64)];
    let mut pool = [CpuPool::default(); 2];
    for _ in 0..opts.rounds {
        for (i, &side) in sides.iter().enumerate() {
            let (server, addr) = start(side, "ssl-text", &bins, &dir, opts.server_cpu)?;
            let r = handshakes(addr, server.pid(), 32, opts.secs);
            eprintln!(
                "TLS handshakes {}: {:.0}/s, {:.0} per server CPU-s ({} errors)",
                name(side),
                r.0,
                r.1,
                r.2
            );
            pool_round(&mut pool[i], r.0, r.1);
            if r.0 > best[i].0 {
                best[i] = r;
            }
            drop(server);
        }
    }
    for (b, p) in best.iter_mut().zip(&pool) {
        b.1 = p.per_cpu_s().unwrap_or(0.0);
    }
    rows.push(format!(
        "| new TLS 1.3 connections (ECDSA P-256, X25519), 32 at a time | {:.0} handshakes/s ({:.0} per CPU-s) | {:.0} handshakes/s ({:.0} per CPU-s) | {} ({} per CPU-s) | {} |",
        best[0].0, best[0].1, best[1].0, best[1].1,
        ratio(best[0].0, best[1].0), ratio(best[0].1, best[1].1), best[0].2 + best[1].2
    ));
    // Idle memory.
    let mut per = [0.0f64; 2];
    for (i, &side) in sides.iter().enumerate() {
        let (server, addr) = start(side, "wss", &bins, &dir, opts.server_cpu)?;
        std::thread::sleep(Duration::from_millis(300));
        let before = sys::rss_bytes(server.pid()).unwrap_or(0);
        let (open, held) = idle_wss(addr, opts.idle);
        std::thread::sleep(Duration::from_millis(500));
        let after = sys::rss_bytes(server.pid()).unwrap_or(0);
        per[i] = after.saturating_sub(before) as f64 / open.max(1) as f64;
        eprintln!(
            "idle wss {}: {open} open, RSS {:.1} → {:.1} MiB, {:.0} B per connection",
            name(side),
            before as f64 / 1048576.0,
            after as f64 / 1048576.0,
            per[i]
        );
        drop(held);
        drop(server);
    }
    rows.push(format!(
        "| idle wss connections × {} (handshake, upgrade, one echo) | {:.0} B of RSS per connection | {:.0} B per connection | {} | - |",
        opts.idle, per[0], per[1], ratio(per[0], per[1])
    ));
    // Heap allocations per echoed message (valgrind's dhat, as the suite).
    if crate::allocs::valgrind_installed() {
        let mut per = Vec::new();
        for side in sides {
            let r = crate::allocs::measure(
                crate::allocs::Service::Wss,
                2000,
                side == Side::Base,
                &bins,
                opts.server_cpu,
            )?;
            eprintln!(
                "allocations per wss echo {}: {:.2} ({:.0} B)",
                name(side),
                r.blocks_per_msg,
                r.bytes_per_msg
            );
            per.push(format!(
                "{:.2} allocations, {:.0} B",
                r.blocks_per_msg, r.bytes_per_msg
            ));
        }
        rows.push(format!(
            "| heap allocations per echoed wss message, 1 conn × 1 in flight × 32 B (dhat) | {} | {} | - | - |",
            per[0], per[1]
        ));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let load = format!("{load_before} at the start, {} at the end", loadavg());
    write_section(&opts, &rows, &load)
}

fn name(s: Side) -> &'static str {
    match s {
        Side::Wm => "wm-host",
        Side::Base => "baseline",
    }
}

/// The 1-minute load average.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(String::from))
        .unwrap_or_else(|| "?".into())
}

fn write_section(opts: &TlsOpts, rows: &[String], load: &str) -> Result<(), String> {
    let mut md = format!(
        "{BEGIN}\n## TLS (`wm-bench tls`)\n\n\
         wm-host's ssl listeners (`wss://`, `https://`, `transport = \"ssl\"`; one worker) against \
         `wm-baseline --cert --key` (a bare mio loop with the same rustls 0.23 and ring), in the \
         same run, server pinned to CPU {}, client (rustls, TLS 1.3; wrk with OpenSSL) on the other. \
         {} runs of {} s per side. Plugins: echo (wss, ssl text), bench-hello (`GET /plaintext`). \
         Load average {load} (other work on the machine): the rates follow the CPU share each \
         server got; \"per CPU-s\" (messages per CPU-second of the serving process, over all \
         runs of a side) does not, and is the figure to compare; rates and latencies are the \
         best run's.\n\n\
         | scenario | wm-host | baseline | wm ÷ base | errors |\n|---|---|---|---|---|\n",
        opts.server_cpu, opts.rounds, opts.secs
    );
    for r in rows {
        md.push_str(r);
        md.push('\n');
    }
    md.push_str(END);
    md.push('\n');
    let old = std::fs::read_to_string(&opts.out).unwrap_or_default();
    let new = match (old.find(BEGIN), old.find(END)) {
        (Some(a), Some(b)) if a < b => {
            format!(
                "{}{md}{}",
                &old[..a],
                old[b + END.len()..].trim_start_matches('\n')
            )
        }
        _ if old.is_empty() => md,
        _ => format!("{}\n{md}", old.trim_end_matches('\n').to_string() + "\n"),
    };
    std::fs::write(&opts.out, new).map_err(|e| format!("{}: {e}", opts.out.display()))?;
    println!("{}", rows.join("\n"));
    Ok(())
}
