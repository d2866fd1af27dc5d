//! TLS for ssl listeners (`transport = "ssl"`, `wss://`, `https://`): the
//! certificate, key and client CA as the master read and checked them, and
//! the rustls server configuration a worker builds from them.
//!
//! The master reads the files at `start` and at every reload (a renewed
//! certificate is a `reload`), checks them by building the configuration a
//! worker would (so a bad file fails there, naming it, and a reload fails
//! like a bad build), and hands the bytes it checked to each worker it
//! starts in a memfd: a worker running as another `user` need not be able
//! to read the key, and it gets exactly what was checked even if the files
//! change meanwhile.

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{Error, InconsistentKeys, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::config::TlsFiles;

/// The files of one ssl listener, as read: PEM bytes and where they came from.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsMaterial {
    pub cert_path: String,
    pub key_path: String,
    pub ca_path: Option<String>,
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl fmt::Debug for TlsMaterial {
    /// Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsMaterial")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .field("client_ca", &self.ca_path)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path, key: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{key} {}: {e}", path.display()))
}

/// The crypto every TLS connection uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsMaterial {
    /// Reads the files and checks them: each parses, the key matches the
    /// certificate, the client CA makes a verifier. Errors are one line
    /// naming the key and the file (`tls.key /etc/…/key.pem: …`).
    pub fn load(files: &TlsFiles) -> Result<TlsMaterial, String> {
        let m = TlsMaterial {
            cert_path: files.cert.display().to_string(),
            key_path: files.key.display().to_string(),
            ca_path: files.client_ca.as_ref().map(|p| p.display().to_string()),
            cert: read(&files.cert, "tls.cert")?,
            key: read(&files.key, "tls.key")?,
            client_ca: match &files.client_ca {
                Some(p) => Some(read(p, "tls.client_ca")?),
                None => None,
            },
        };
        m.server_config(false)?;
        Ok(m)
    }

    fn certs(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        parse_certs(&self.cert, "tls.cert", &self.cert_path)
    }

    /// The rustls configuration: TLS 1.2 and 1.3, ALPN `http/1.1` when
    /// `http` (http:// and websocket:// listeners), client certificates
    /// required when there is a client CA.
    pub fn server_config(&self, http: bool) -> Result<Arc<ServerConfig>, String> {
        let provider = provider();
        let certs = self.certs()?;
        let key = PrivateKeyDer::from_pem_slice(&self.key).map_err(|e| {
            let why = match e {
                rustls_pki_types::pem::Error::NoItemsFound => {
                    "no private key in it (expected PEM: BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)".to_string()
                }
                e => format!("not a PEM private key: {e}"),
            };
            format!("tls.key {}: {why}", self.key_path)
        })?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("tls.key {}: unusable key: {e}", self.key_path))?;
        let certified = CertifiedKey::new(certs, signing);
        match certified.keys_match() {
            Ok(()) | Err(Error::InconsistentKeys(InconsistentKeys::Unknown)) => {}
            Err(Error::InconsistentKeys(InconsistentKeys::KeyMismatch)) => {
                return Err(format!(
                    "tls.key {}: does not match the certificate in {}",
                    self.key_path, self.cert_path
                ));
            }
            Err(e) => return Err(format!("tls.cert {}: {e}", self.cert_path)),
        }
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| format!("tls: {e}"))?;
        let builder = match (&self.client_ca, &self.ca_path) {
            (Some(pem), Some(path)) => {
                let mut roots = RootCertStore::empty();
                for c in parse_certs(pem, "tls.client_ca", path)? {
                    roots
                        .add(c)
                        .map_err(|e| format!("tls.client_ca {path}: {e}"))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| format!("tls.client_ca {path}: {e}"))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(certified));
        let mut config = builder.with_cert_resolver(resolver);
        if http {
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
        }
        Ok(Arc::new(config))
    }

    /// The material in an anonymous memory file, for a worker to inherit.
    pub fn to_memfd(&self) -> io::Result<OwnedFd> {
        let bytes = postcard::to_allocvec(self).map_err(io::Error::other)?;
        // SAFETY: a NUL-terminated name and flags; the result is checked.
        let fd = unsafe { libc::memfd_create(c"wm-host-tls".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a descriptor we just opened and own.
        let mut file = unsafe { File::from_raw_fd(fd) };
        file.write_all(&bytes)?;
        file.seek(SeekFrom::Start(0))?;
        Ok(file.into())
    }

    /// The material a worker inherited (see [`TlsMaterial::to_memfd`]).
    pub fn from_fd(fd: OwnedFd) -> io::Result<TlsMaterial> {
        let mut file = File::from(fd);
        file.seek(SeekFrom::Start(0))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        postcard::from_bytes(&bytes).map_err(io::Error::other)
    }
}

fn parse_certs(pem: &[u8], key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{key} {path}: not PEM: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{key} {path}: no certificate in it (expected PEM: BEGIN CERTIFICATE)"
        ));
    }
    Ok(certs)
}
