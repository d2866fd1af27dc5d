//! TLS for the baseline (`--cert`/`--key`): the floor wm-host's ssl
//! listeners are compared with. The plain rustls pattern on a bare mio loop:
//! `rustls::ServerConnection` fed from the socket (`read_tls`,
//! `process_new_packets`, `reader`), plaintext encrypted with `writer` and
//! written with `write_tls`; records the socket refuses stay in rustls and go
//! out on the next writable event (`pump`).

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use mio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ServerConfig, ServerConnection};

/// Loads a PEM certificate chain and key; ALPN `http/1.1` when `http`.
pub fn config(cert: &str, key: &str, http: bool) -> io::Result<Arc<ServerConfig>> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| io::Error::other(format!("{cert}: {e}")))?;
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| io::Error::other(format!("{key}: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut c = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(io::Error::other)?;
    if http {
        c.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    Ok(Arc::new(c))
}

/// A connection's socket, plain or TLS.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<(TcpStream, ServerConnection)>),
}

impl Stream {
    pub fn tcp(&mut self) -> &mut TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &mut t.0,
        }
    }

    /// Writes the records rustls holds; call on writable events.
    pub fn pump(&mut self) -> io::Result<()> {
        if let Stream::Tls(t) = self {
            let (tcp, tls) = &mut **t;
            while tls.wants_write() {
                match tls.write_tls(tcp) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }
}

impl Read for Stream {
    /// TLS: plaintext until `buf` is full or the socket is drained.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Stream::Tls(t) = self else {
            let Stream::Plain(s) = self else {
                unreachable!()
            };
            return s.read(buf);
        };
        let (tcp, tls) = &mut **t;
        let mut n = 0;
        loop {
            match tls.reader().read(&mut buf[n..]) {
                Ok(0) => return Ok(n),
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(n),
                Err(e) => return Err(e),
            }
            if n == buf.len() {
                return Ok(n);
            }
            match tls.read_tls(tcp) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return if n > 0 { Ok(n) } else { Err(e) };
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
            tls.process_new_packets().map_err(io::Error::other)?;
            while tls.wants_write() {
                match tls.write_tls(tcp) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    /// TLS: takes what rustls buffers (64 KiB), writes what the socket takes.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = match self {
            Stream::Plain(s) => return s.write_vectored(bufs),
            Stream::Tls(t) => t.1.writer().write_vectored(bufs)?,
        };
        self.pump()?;
        if n == 0 {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.pump()
    }
}
