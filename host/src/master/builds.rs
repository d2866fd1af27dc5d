//! Plugin builds as the master sees them: bytes with a SHA-256, never code.
//! Workers load a private, read-only, content-addressed copy under
//! `runtime_dir/plugins/`, so rebuilding, overwriting (`cp` in place keeps the
//! inode) or deleting the build output cannot touch what a worker has mapped.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// Hex SHA-256 of the file.
    pub hash: String,
    /// The copy workers load.
    pub copy: PathBuf,
}

impl Build {
    /// The first 12 hex digits, as `status` shows them.
    pub fn short(&self) -> &str {
        &self.hash[..12]
    }
}

pub fn hash_file(path: &Path) -> io::Result<String> {
    let mut f = fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
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
    let hash = hash_file(source).map_err(|e| format!("plugin {shown}: cannot read: {e}"))?;
    let d = dir(runtime_dir);
    fs::create_dir_all(&d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    let copy = d.join(format!("{hash}.so"));
    if !copy.exists() {
        // Copy under a temporary name, then rename: a copy either is complete
        // or does not exist.
        let tmp = d.join(format!(".{hash}.{}.tmp", std::process::id()));
        let result = fs::copy(source, &tmp)
            .and_then(|_| fs::set_permissions(&tmp, fs::Permissions::from_mode(0o444)))
            .and_then(|_| fs::rename(&tmp, &copy));
        if let Err(e) = result {
            let _ = fs::remove_file(&tmp);
            return Err(format!(
                "plugin {shown}: cannot copy to {}: {e}",
                copy.display()
            ));
        }
        // The source may have changed while we copied it: check what we have.
        let copied =
            hash_file(&copy).map_err(|e| format!("cannot read {}: {e}", copy.display()))?;
        if copied != hash {
            let _ = fs::remove_file(&copy);
            return Err(format!(
                "plugin {shown} changed while being copied; try again"
            ));
        }
    }
    Ok(Build { hash, copy })
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
        assert!(install(rt.path(), &src).unwrap_err().contains("not found"));
    }
}
