//! Serving a directory: maps a request path to a file under a root, and never
//! to anything outside it, whatever the encoding, `..` or symlink tricks.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use percent_encoding::percent_decode_str;

use crate::http::{http_date, Response};

#[derive(Debug, Clone)]
pub struct StaticDir {
    /// Canonical, so a canonical file path can be checked against it by prefix.
    root: PathBuf,
}

impl StaticDir {
    pub fn new(root: &Path) -> io::Result<StaticDir> {
        let root = root.canonicalize()?;
        if !root.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a directory", root.display()),
            ));
        }
        Ok(StaticDir { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Answers a GET/HEAD for `url_path` (the raw path from the request line,
    /// still percent-encoded, no query). `if_modified_since` is the raw header
    /// value if present. `None` when no file matches, so the caller can fall
    /// through to the plugin or answer 404.
    pub fn serve(&self, url_path: &str, if_modified_since: Option<&str>) -> Option<Response> {
        let path = self.resolve(url_path)?;
        // Length and mtime come from the opened file, so they match its content.
        let mut file = File::open(&path).ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        let mtime = meta.modified().ok();
        let mut resp = Response::new(200, Vec::new());
        if let Some(t) = mtime {
            resp.headers.push(("Last-Modified".into(), http_date(t)));
        }
        if let (Some(t), Some(since)) = (mtime, if_modified_since) {
            if not_modified(t, since) {
                resp.status = 304;
                return Some(resp);
            }
        }
        let mut body = Vec::with_capacity(meta.len() as usize);
        if let Err(e) = file.read_to_end(&mut body) {
            tracing::warn!(path = %path.display(), "reading static file: {e}");
            return None;
        }
        resp.body = body;
        resp.headers
            .insert(0, ("Content-Type".into(), content_type(&path)));
        Some(resp)
    }

    /// The canonical path of the file `url_path` names, if it lies under root.
    fn resolve(&self, url_path: &str) -> Option<PathBuf> {
        let raw = url_path.strip_prefix('/')?;
        let decoded: Vec<u8> = percent_decode_str(raw).collect();
        // Both forms: `..` may hide behind `%2e`, a separator behind `%2f`.
        if !plain(raw.as_bytes()) || !plain(&decoded) {
            return None;
        }
        let mut path = self.root.clone();
        for seg in decoded.split(|&b| b == b'/') {
            if !seg.is_empty() && seg != b"." {
                path.push(OsStr::from_bytes(seg));
            }
        }
        // Canonicalizing resolves symlinks, so the prefix check also catches
        // links that point out of the root. A link swapped in between this
        // check and the open is not guarded against.
        let mut real = path.canonicalize().ok()?;
        if real.is_dir() {
            real = real.join("index.html").canonicalize().ok()?;
        } else if decoded.ends_with(b"/") {
            // "/file/" names a directory, and this is not one.
            return None;
        }
        real.starts_with(&self.root).then_some(real)
    }
}

/// No NUL, no backslash (a separator to some), no `..` segment.
fn plain(path: &[u8]) -> bool {
    !path.contains(&0)
        && !path.contains(&b'\\')
        && !path.split(|&b| b == b'/').any(|seg| seg == b"..")
}

fn content_type(path: &Path) -> String {
    let mime = mime_guess::from_path(path).first_or_octet_stream();
    match mime.essence_str() {
        m @ ("text/html"
        | "text/css"
        | "text/plain"
        | "text/javascript"
        | "application/javascript") => format!("{m}; charset=utf-8"),
        m => m.to_owned(),
    }
}

/// HTTP dates have whole seconds, so compare in seconds; an unparsable date
/// is ignored (RFC 9110 §13.1.3).
fn not_modified(mtime: SystemTime, since: &str) -> bool {
    let Ok(since) = httpdate::parse_http_date(since.trim()) else {
        return false;
    };
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    secs(mtime) <= secs(since)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::symlink;

    /// `tmp/secret` beside `tmp/root`, which holds a few files.
    fn setup() -> (tempfile::TempDir, StaticDir) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        fs::create_dir_all(root.join("sub/deeper")).unwrap();
        fs::write(tmp.path().join("secret"), "top secret").unwrap();
        fs::write(root.join("index.html"), "<h1>home</h1>").unwrap();
        fs::write(root.join("style.css"), "body{}").unwrap();
        fs::write(root.join("app.js"), "1").unwrap();
        fs::write(root.join("logo.png"), [0x89, b'P', b'N', b'G']).unwrap();
        fs::write(root.join("a b.txt"), "spaced").unwrap();
        fs::write(root.join("sub/index.html"), "sub home").unwrap();
        fs::write(root.join("sub/deeper/file.txt"), "deep").unwrap();
        let dir = StaticDir::new(&root).unwrap();
        (tmp, dir)
    }

    fn ctype(r: &Response) -> &str {
        r.header("content-type").unwrap()
    }

    #[test]
    fn serves_files_with_the_right_type() {
        let (_tmp, dir) = setup();
        let r = dir.serve("/style.css", None).unwrap();
        assert_eq!((r.status, r.body.as_slice()), (200, &b"body{}"[..]));
        assert_eq!(ctype(&r), "text/css; charset=utf-8");
        assert!(r.header("last-modified").unwrap().ends_with(" GMT"));
        assert_eq!(ctype(&dir.serve("/logo.png", None).unwrap()), "image/png");
        assert!(ctype(&dir.serve("/app.js", None).unwrap()).ends_with("javascript; charset=utf-8"));
        let r = dir.serve("/sub/deeper/file.txt", None).unwrap();
        assert_eq!(
            (ctype(&r), r.body.as_slice()),
            ("text/plain; charset=utf-8", &b"deep"[..])
        );
    }

    #[test]
    fn percent_encoded_names_are_decoded() {
        let (_tmp, dir) = setup();
        assert_eq!(dir.serve("/a%20b.txt", None).unwrap().body, b"spaced");
        assert_eq!(
            dir.serve("/sub%2Fdeeper/file.txt", None).unwrap().body,
            b"deep"
        );
    }

    #[test]
    fn directories_serve_their_index() {
        let (_tmp, dir) = setup();
        let r = dir.serve("/", None).unwrap();
        assert_eq!(
            (ctype(&r), r.body.as_slice()),
            ("text/html; charset=utf-8", &b"<h1>home</h1>"[..])
        );
        assert_eq!(dir.serve("/sub", None).unwrap().body, b"sub home");
        assert_eq!(dir.serve("/sub/", None).unwrap().body, b"sub home");
        // No index.html there.
        assert!(dir.serve("/sub/deeper/", None).is_none());
    }

    #[test]
    fn missing_files_are_none() {
        let (_tmp, dir) = setup();
        assert!(dir.serve("/nope.txt", None).is_none());
        assert!(dir.serve("/sub/nope/", None).is_none());
        assert!(dir.serve("/style.css/", None).is_none());
        assert!(dir.serve("style.css", None).is_none());
        assert!(dir.serve("*", None).is_none());
    }

    #[test]
    fn traversal_attempts_are_none() {
        let (tmp, dir) = setup();
        assert!(tmp.path().join("secret").exists());
        for path in [
            "/../secret",
            "/%2e%2e/secret",
            "/%2E%2E%2Fsecret",
            "/a/..%2f..%2fsecret",
            "/sub/%2e%2e/%2e%2e/secret",
            "/..\\secret",
            "/%5c..%5csecret",
            "/.%2e/secret",
            "/style.css%00.png",
        ] {
            assert!(dir.serve(path, None).is_none(), "{path}");
        }
    }

    #[test]
    fn symlinks_must_stay_inside_the_root() {
        let (tmp, dir) = setup();
        symlink(tmp.path().join("secret"), dir.root().join("out")).unwrap();
        symlink(tmp.path(), dir.root().join("outdir")).unwrap();
        assert!(dir.serve("/out", None).is_none());
        assert!(dir.serve("/outdir/secret", None).is_none());
        symlink(
            dir.root().join("sub/deeper/file.txt"),
            dir.root().join("in.txt"),
        )
        .unwrap();
        assert_eq!(dir.serve("/in.txt", None).unwrap().body, b"deep");
        // An index.html that is a link out of the root is refused too.
        fs::create_dir(dir.root().join("trap")).unwrap();
        symlink(
            tmp.path().join("secret"),
            dir.root().join("trap/index.html"),
        )
        .unwrap();
        assert!(dir.serve("/trap/", None).is_none());
    }

    #[test]
    fn if_modified_since_gives_304() {
        let (_tmp, dir) = setup();
        let first = dir.serve("/style.css", None).unwrap();
        let lm = first.header("last-modified").unwrap().to_owned();
        let r = dir.serve("/style.css", Some(&lm)).unwrap();
        assert_eq!((r.status, r.body.len()), (304, 0));
        assert_eq!(r.header("last-modified"), Some(lm.as_str()));
        let later = http_date(SystemTime::now() + std::time::Duration::from_secs(3600));
        assert_eq!(dir.serve("/style.css", Some(&later)).unwrap().status, 304);
    }

    #[test]
    fn older_or_bad_if_modified_since_gives_200() {
        let (_tmp, dir) = setup();
        for since in ["Thu, 01 Jan 2015 00:00:00 GMT", "not a date"] {
            let r = dir.serve("/style.css", Some(since)).unwrap();
            assert_eq!(
                (r.status, r.body.as_slice()),
                (200, &b"body{}"[..]),
                "{since}"
            );
        }
    }

    #[test]
    fn root_must_be_a_directory() {
        let (_tmp, dir) = setup();
        assert!(StaticDir::new(&dir.root().join("style.css")).is_err());
        assert!(StaticDir::new(&dir.root().join("missing")).is_err());
    }
}
