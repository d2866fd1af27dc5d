//! A private `redis-server` for the cross-host bus tests: its own port and
//! data dir, no persistence, killed when dropped. `make test-deps` installs
//! the Debian package when missing.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, wait_for};

pub struct Redis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    opts: Options,
    /// The TLS port, when `opts.tls` is set (the plain port stays open for
    /// the readiness check).
    pub tls_port: Option<u16>,
}

/// How to run it: `requirepass`, TLS.
#[derive(Default, Clone)]
pub struct Options {
    pub password: Option<String>,
    pub tls: Option<TlsFiles>,
}

/// Redis's `--tls-*` files; `auth_clients`: require a client certificate
/// signed by `ca` (Redis's default).
#[derive(Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
    pub auth_clients: bool,
}

fn bin() -> &'static str {
    for p in ["/usr/bin/redis-server", "/usr/local/bin/redis-server"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!("redis-server is missing: run `make test-deps` (installs the redis-server package)");
}

impl Redis {
    pub fn start() -> Redis {
        Redis::start_with(Options::default())
    }

    pub fn start_with(opts: Options) -> Redis {
        let dir = tempfile::Builder::new()
            .prefix("wm-redis-")
            .tempdir()
            .unwrap();
        let mut r = Redis {
            port: free_port(),
            dir,
            child: None,
            tls_port: opts.tls.as_ref().map(|_| free_port()),
            opts,
        };
        r.restart();
        r
    }

    /// `redis://127.0.0.1:<port>/0`, or `rediss://…:<tls port>/0` with TLS
    /// (no password in it).
    pub fn url(&self) -> String {
        match self.tls_port {
            Some(p) => format!("rediss://127.0.0.1:{p}/0"),
            None => format!("redis://127.0.0.1:{}/0", self.port),
        }
    }

    /// Starts it (again, on the same port) and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let mut cmd = Command::new(bin());
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path());
        if let Some(pw) = &self.opts.password {
            cmd.args(["--requirepass", pw]);
        }
        if let (Some(t), Some(port)) = (&self.opts.tls, self.tls_port) {
            cmd.args(["--tls-port", &port.to_string()])
                .arg("--tls-cert-file")
                .arg(&t.cert)
                .arg("--tls-key-file")
                .arg(&t.key)
                .arg("--tls-ca-cert-file")
                .arg(&t.ca)
                .args([
                    "--tls-auth-clients",
                    if t.auth_clients { "yes" } else { "no" },
                ]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let port = self.port;
        wait_for("redis-server to answer", || {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
            use std::io::{Read, Write};
            s.write_all(b"PING\r\n").ok()?;
            let mut b = [0u8; 7];
            s.read_exact(&mut b).ok()?;
            // With requirepass, a ready server refuses the PING.
            (&b == b"+PONG\r\n" || &b == b"-NOAUTH").then_some(())
        });
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}
