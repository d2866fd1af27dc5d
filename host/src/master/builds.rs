//! Plugin builds as the master sees them: bytes with a SHA-256, never code.
//! Workers load a private, read-only, content-addressed copy under
//! `runtime_dir/plugins/`, so rebuilding, overwriting (`cp` in place keeps the
//! inode) or deleting the build output cannot touch what a worker has mapped.
//!
//! A reload's copy runs on a thread (`Installer`): hashing tens of MiB must
//! not stall the master loop, which relays the bus meanwhile. Workers are
//! started by fork+exec, so a helper thread is safe to have (see `process`).

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use mio::Waker;

use sha2::{Digest, Sha256};

use crate::config::TlsFiles;
use crate::tls::TlsMaterial;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// Hex SHA-256 of the file.
    pub hash: String,
    /// The copy workers load.
    pub copy: PathBuf,
    /// ssl listeners: the certificate and key as read and checked with
    /// this build (a reload reads them again), handed to its workers.
    pub tls: Option<Arc<TlsMaterial>>,
}

impl Build {
    /// The first 12 hex digits, as `status` shows them.
    pub fn short(&self) -> &str {
        &self.hash[..12]
    }
}

/// Numbers temporary copies apart within one process.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Copies `from` to `to`, returning the SHA-256 of the bytes written.
fn copy_hashing(from: &Path, to: &Path) -> io::Result<String> {
    // No fsync: copies live only while their master runs, and a starting
    // master clears what an earlier one left (see `prune`).
    hash_through(fs::File::open(from)?, fs::File::create(to)?)
}

/// The SHA-256 of a file, as builds are named (`wm-host check`).
pub fn hash_file(path: &Path) -> io::Result<String> {
    hash_through(fs::File::open(path)?, io::sink())
}

/// Reads `src` to its end, writing every byte to `sink`, and returns the
/// SHA-256 of what was read: one pass.
fn hash_through(mut src: impl Read, mut sink: impl Write) -> io::Result<String> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = src.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        sink.write_all(&buf[..n])?;
    }
    Ok(hex(&h.finalize()))
}

fn dir(runtime_dir: &Path) -> PathBuf {
    runtime_dir.join("plugins")
}

/// Hashes `source` and makes sure its copy exists.
pub fn install(runtime_dir: &Path, source: &Path) -> Result<Build, String> {
    let shown = source.display();
    if !source.exists() {
        return Err(format!("plugin {shown}: file not found"));
    }
    crate::trust::check_plugin(source)?;
    let d = dir(runtime_dir);
    fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    // One pass: the bytes are hashed as they are copied, so the copy is named
    // by exactly what it holds even if the source changes meanwhile. Written
    // under a temporary name, then renamed: a copy is complete or absent.
    let tmp = d.join(format!(
        ".{}.{}.tmp",
        std::process::id(),
        TMP_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let hashed = copy_hashing(source, &tmp);
    let hash = match hashed {
        Ok(h) => h,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(format!(
                "plugin {shown}: cannot copy to {}: {e}",
                d.display()
            ));
        }
    };
    let copy = d.join(format!("{hash}.so"));
    if copy.exists() {
        let _ = fs::remove_file(&tmp);
    } else if let Err(e) = fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444))
        .and_then(|_| fs::rename(&tmp, &copy))
    {
        let _ = fs::remove_file(&tmp);
        return Err(format!(
            "plugin {shown}: cannot copy to {}: {e}",
            copy.display()
        ));
    }
    Ok(Build {
        hash,
        copy,
        tls: None,
    })
}

/// What a group's workers start from: the plugin's copy (`install`) and,
/// for an ssl listener, its certificate and key, read and checked now.
pub fn install_group(
    runtime_dir: &Path,
    source: &Path,
    tls: Option<&TlsFiles>,
) -> Result<Build, String> {
    let tls = match tls {
        Some(files) => Some(Arc::new(TlsMaterial::load(files)?)),
        None => None,
    };
    Ok(Build {
        tls,
        ..install(runtime_dir, source)?
    })
}

/// Removes copies that no worker uses any more.
pub fn prune(runtime_dir: &Path, keep: &HashSet<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir(runtime_dir)) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "so") && !keep.contains(&p) {
            tracing::debug!(copy = %p.display(), "removing unused plugin copy");
            let _ = fs::remove_file(&p);
        }
    }
}

/// Removes everything an earlier master left: copies, and the temporary
/// files of installs it did not finish (a stop does not wait for them).
pub fn clear(runtime_dir: &Path) {
    let Ok(entries) = fs::read_dir(dir(runtime_dir)) else {
        return;
    };
    for e in entries.flatten() {
        let _ = fs::remove_file(e.path());
    }
}

/// What an install thread sends back: the group and its build or why not.
pub type Installed = (usize, Result<Build, String>);

/// Runs `install` on threads; results come back through a channel, and the
/// waker makes the master's poll return to collect them.
pub struct Installer {
    runtime_dir: PathBuf,
    waker: Arc<Waker>,
    tx: Sender<Installed>,
    rx: Receiver<Installed>,
}

impl Installer {
    pub fn new(runtime_dir: PathBuf, waker: Arc<Waker>) -> Installer {
        let (tx, rx) = channel();
        Installer {
            runtime_dir,
            waker,
            tx,
            rx,
        }
    }

    /// Installs `source` (and reads `tls`) for `group` in the background.
    pub fn start(&self, group: usize, source: PathBuf, tls: Option<TlsFiles>) {
        let (dir, tx, waker) = (
            self.runtime_dir.clone(),
            self.tx.clone(),
            self.waker.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("install".into())
            .spawn(move || {
                let _ = tx.send((group, install_group(&dir, &source, tls.as_ref())));
                let _ = waker.wake();
            });
        if let Err(e) = spawned {
            let _ = self
                .tx
                .send((group, Err(format!("cannot start an install thread: {e}"))));
            let _ = self.waker.wake();
        }
    }

    /// The installs finished since the last call.
    pub fn finished(&self) -> Vec<Installed> {
        self.rx.try_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_are_content_addressed_read_only_and_pruned() {
        let rt = tempfile::tempdir().unwrap();
        let src = rt.path().join("libx.so");
        fs::write(&src, b"build one").unwrap();
        let a = install(rt.path(), &src).unwrap();
        assert_eq!(a.hash.len(), 64);
        assert_eq!(fs::read(&a.copy).unwrap(), b"build one");
        assert_eq!(
            fs::metadata(&a.copy).unwrap().permissions().mode() & 0o777,
            0o444
        );
        // Same content, same copy.
        assert_eq!(install(rt.path(), &src).unwrap(), a);
        // New content, new copy; the old one stays until pruned.
        fs::write(&src, b"build two").unwrap();
        let b = install(rt.path(), &src).unwrap();
        assert_ne!(a.copy, b.copy);
        fs::remove_file(&src).unwrap();
        assert_eq!(
            fs::read(&a.copy).unwrap(),
            b"build one",
            "deleting the source leaves the copy"
        );
        prune(rt.path(), &HashSet::from([b.copy.clone()]));
        assert!(!a.copy.exists() && b.copy.exists());
        let leftover = dir(rt.path()).join(".1.0.tmp");
        fs::write(&leftover, b"half").unwrap();
        prune(rt.path(), &HashSet::new());
        assert!(leftover.exists(), "an install may be writing it");
        clear(rt.path());
        assert_eq!(fs::read_dir(dir(rt.path())).unwrap().count(), 0);
        assert!(install(rt.path(), &src).unwrap_err().contains("not found"));
    }

    #[test]
    fn installer_reports_back_through_the_waker() {
        let rt = tempfile::tempdir().unwrap();
        let src = rt.path().join("liby.so");
        fs::write(&src, b"some build").unwrap();
        let mut poll = mio::Poll::new().unwrap();
        let waker = Arc::new(Waker::new(poll.registry(), mio::Token(7)).unwrap());
        let inst = Installer::new(rt.path().to_path_buf(), waker);
        inst.start(3, src, None);
        inst.start(4, rt.path().join("missing.so"), None);
        let mut got = Vec::new();
        let mut events = mio::Events::with_capacity(4);
        while got.len() < 2 {
            poll.poll(&mut events, Some(std::time::Duration::from_secs(10)))
                .unwrap();
            assert!(!events.is_empty(), "woken");
            got.extend(inst.finished());
        }
        got.sort_by_key(|g| g.0);
        assert_eq!(got[0].0, 3);
        assert_eq!(
            fs::read(&got[0].1.as_ref().unwrap().copy).unwrap(),
            b"some build"
        );
        assert!(got[1].1.as_ref().unwrap_err().contains("not found"));
    }
}
