//! sshd's StrictModes for what the master trusts: the runtime dir (pid file,
//! control socket, the plugin copies workers load) and the plugin files. A
//! master running as root must not write through, or run code from, files
//! another user could have planted or can still change.
//!
//! The rules, per `stat` (the pure part is [`judge`]):
//! - everything must be owned by root or by the master's user;
//! - the runtime dir and plugin files must not be writable by anyone else:
//!   not by the world, and not by their group unless the group holds no one
//!   but the owner (Debian's user private groups, as Debian's sshd allows);
//! - every folder above them likewise, except that a sticky folder (`/tmp`)
//!   may be open to all: others can add names there but not replace ours.
//!
//! Folders are checked along the path as written and as resolved, so neither a
//! symlink's folder nor its target's can be swapped. `[host] strict_modes =
//! false` turns the checks off for development.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// What the checks need from a `stat`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub kind: Kind,
    /// Permission bits with setuid/setgid/sticky (`st_mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// The file's group holds no user but its owner; only looked up (and only
    /// matters) when the file is group-writable and not world-writable.
    pub group_private: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Other,
}

/// What a checked path is to the master.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The runtime dir itself: its contents are trusted.
    RuntimeDir,
    /// A plugin file: its code runs in workers.
    Plugin,
    /// A folder above either.
    Parent,
}

/// What is wrong with a path; all false when it is safe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Faults {
    /// A folder where a file is expected or the other way round.
    pub wrong_kind: bool,
    /// Another user (not root, not us) owns it.
    pub foreign: bool,
    /// Someone other than the owner may write to it.
    pub writable: bool,
}

impl Faults {
    pub fn ok(&self) -> bool {
        *self == Faults::default()
    }
}

const STICKY: u32 = 0o1000;
const GROUP_W: u32 = 0o020;
const OTHER_W: u32 = 0o002;

/// Judges one `stat` for `role`, `me` being the master's effective uid.
pub fn judge(m: &Meta, role: Role, me: u32) -> Faults {
    let wrong_kind = match role {
        Role::RuntimeDir | Role::Parent => m.kind != Kind::Dir,
        Role::Plugin => m.kind != Kind::File,
    };
    let open_to_others = m.mode & OTHER_W != 0 || (m.mode & GROUP_W != 0 && !m.group_private);
    let sticky_parent = role == Role::Parent && m.mode & STICKY != 0;
    Faults {
        wrong_kind,
        foreign: m.uid != 0 && m.uid != me,
        writable: open_to_others && !sticky_parent,
    }
}

/// The one-line refusal for `path`, shown as `what` ("runtime_dir /x",
/// "/x (a parent of plugin /x/lib.so)"), with the commands that fix it.
pub fn describe(what: &str, path: &Path, m: &Meta, f: Faults, role: Role, me_name: &str) -> String {
    let p = path.display();
    let how = if f.wrong_kind {
        match role {
            Role::Plugin => "is not a regular file".to_string(),
            _ => "is not a directory".to_string(),
        }
    } else if f.writable {
        format!(
            "is writable by others (mode {:04o}, owner uid {})",
            m.mode, m.uid
        )
    } else {
        format!("is owned by uid {} (mode {:04o})", m.uid, m.mode)
    };
    let mut fix = Vec::new();
    if f.foreign {
        fix.push(format!("chown {me_name} {p}"));
    }
    if f.writable || role == Role::RuntimeDir {
        fix.push(match role {
            Role::RuntimeDir => format!("chmod 0711 {p}"),
            _ => format!("chmod go-w {p}"),
        });
    }
    let fix = if f.wrong_kind {
        format!("remove or replace {p}")
    } else {
        fix.join(" && ")
    };
    format!("{what} {how}: {fix}, or set [host] strict_modes = false for development")
}

/// Checks on or off for this process (see `[host] strict_modes`). Set by the
/// master before it takes the runtime dir; the plugin check at each reload
/// reads it.
static STRICT: AtomicBool = AtomicBool::new(true);

pub fn set_strict(on: bool) {
    STRICT.store(on, Ordering::Relaxed);
}

pub fn strict() -> bool {
    STRICT.load(Ordering::Relaxed)
}

fn me() -> u32 {
    nix::unistd::geteuid().as_raw()
}

fn me_name() -> String {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(u)) => u.name,
        _ => uid.to_string(),
    }
}

fn meta_of(md: &std::fs::Metadata) -> Meta {
    let ft = md.file_type();
    let kind = if ft.is_dir() {
        Kind::Dir
    } else if ft.is_file() {
        Kind::File
    } else {
        Kind::Other
    };
    let mode = md.mode() & 0o7777;
    Meta {
        kind,
        mode,
        uid: md.uid(),
        gid: md.gid(),
        // Looked up only where it can matter: a world-writable folder
        // (`/tmp`) is judged by that alone, and the lookup reads the whole
        // user database (NSS) at every start.
        group_private: mode & GROUP_W != 0
            && mode & OTHER_W == 0
            && group_is_private(md.uid(), md.gid()),
    }
}

/// Debian's rule for group-writable files: the group has exactly one member,
/// the file's owner, counting users whose primary group it is and its listed
/// members.
fn group_is_private(owner: u32, gid: u32) -> bool {
    let Ok(Some(group)) = nix::unistd::Group::from_gid(gid.into()) else {
        return false;
    };
    let Ok(Some(user)) = nix::unistd::User::from_uid(owner.into()) else {
        return false;
    };
    let mut primary = Vec::new();
    // SAFETY: getpwent's static buffer is read before the next call; the
    // master runs this before it starts any thread that looks up users.
    unsafe {
        libc::setpwent();
        loop {
            let pw = libc::getpwent();
            if pw.is_null() {
                break;
            }
            if (*pw).pw_gid == gid {
                primary.push((*pw).pw_uid);
            }
        }
        libc::endpwent();
    }
    let members = primary.len() + group.mem.len();
    let found = primary.contains(&owner) || group.mem.contains(&user.name);
    members == 1 && found
}

/// Every folder above `path`, as written and as resolved, nearest first.
fn parents(path: &Path) -> Vec<PathBuf> {
    let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let real = std::fs::canonicalize(&abs).ok();
    for p in [Some(abs), real].into_iter().flatten() {
        for a in p.ancestors().skip(1) {
            if seen.insert(a.to_path_buf()) {
                out.push(a.to_path_buf());
            }
        }
    }
    out
}

/// Checks `path` as `role` (shown as `label path`) and every folder above it.
fn check_chain(label: &str, path: &Path, role: Role) -> Result<(), String> {
    let (me, shown) = (me(), path.display());
    for dir in parents(path) {
        let md =
            std::fs::metadata(&dir).map_err(|e| format!("cannot stat {}: {e}", dir.display()))?;
        let m = meta_of(&md);
        let f = judge(&m, Role::Parent, me);
        if !f.ok() {
            let what = format!("{} (a parent of {label} {shown})", dir.display());
            return Err(describe(&what, &dir, &m, f, Role::Parent, &me_name()));
        }
    }
    let md = std::fs::metadata(path).map_err(|e| format!("{label} {shown}: {e}"))?;
    let m = meta_of(&md);
    let f = judge(&m, role, me);
    if !f.ok() {
        return Err(describe(
            &format!("{label} {shown}"),
            path,
            &m,
            f,
            role,
            &me_name(),
        ));
    }
    Ok(())
}

/// The runtime dir and the folders above it (all must exist).
pub fn check_runtime_dir(dir: &Path) -> Result<(), String> {
    check_chain("runtime_dir", dir, Role::RuntimeDir)
}

/// The folders above a runtime dir not created yet, checked before creating it.
pub fn check_runtime_dir_parent(existing: &Path, dir: &Path) -> Result<(), String> {
    let me = me();
    for d in std::iter::once(existing.to_path_buf()).chain(parents(existing)) {
        let md = std::fs::metadata(&d).map_err(|e| format!("cannot stat {}: {e}", d.display()))?;
        let m = meta_of(&md);
        let f = judge(&m, Role::Parent, me);
        if !f.ok() {
            let what = format!(
                "{} (a parent of runtime_dir {})",
                d.display(),
                dir.display()
            );
            return Err(describe(&what, &d, &m, f, Role::Parent, &me_name()));
        }
    }
    Ok(())
}

/// A plugin file about to be copied for workers, when checks are on. A
/// missing file passes: copying it reports that.
pub fn check_plugin(path: &Path) -> Result<(), String> {
    if !strict() || !path.exists() {
        return Ok(());
    }
    check_chain("plugin", path, Role::Plugin)
}

/// A path name as a C string, for the `*at` calls.
pub fn c_path(path: &Path) -> std::io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| std::io::Error::other(format!("{} holds a NUL byte", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: u32 = 1000;

    fn dir(mode: u32, uid: u32) -> Meta {
        Meta {
            kind: Kind::Dir,
            mode,
            uid,
            gid: uid,
            group_private: false,
        }
    }

    fn file(mode: u32, uid: u32) -> Meta {
        Meta {
            kind: Kind::File,
            ..dir(mode, uid)
        }
    }

    fn ok(m: Meta, role: Role) -> bool {
        judge(&m, role, ME).ok()
    }

    #[test]
    fn ours_or_roots_and_closed_is_safe() {
        for uid in [0, ME] {
            assert!(ok(dir(0o711, uid), Role::RuntimeDir));
            assert!(ok(dir(0o700, uid), Role::RuntimeDir));
            assert!(ok(dir(0o755, uid), Role::Parent));
            assert!(ok(file(0o755, uid), Role::Plugin));
            assert!(ok(file(0o444, uid), Role::Plugin));
        }
    }

    #[test]
    fn another_users_files_are_refused_whatever_their_mode() {
        let f = judge(&dir(0o700, 65534), Role::RuntimeDir, ME);
        assert!(f.foreign && !f.writable);
        assert!(!ok(dir(0o755, 65534), Role::Parent));
        assert!(!ok(file(0o444, 65534), Role::Plugin));
        // Root running the master: only root's own files.
        assert!(!judge(&file(0o644, ME), Role::Plugin, 0).ok());
        assert!(judge(&file(0o644, 0), Role::Plugin, 0).ok());
    }

    #[test]
    fn world_or_shared_group_write_is_refused() {
        let f = judge(&dir(0o777, 1000), Role::RuntimeDir, 0);
        assert_eq!(
            f,
            Faults {
                wrong_kind: false,
                foreign: true,
                writable: true
            }
        );
        assert!(!ok(dir(0o777, 0), Role::RuntimeDir));
        assert!(!ok(dir(0o773, 0), Role::RuntimeDir));
        assert!(
            !ok(dir(0o775, 0), Role::RuntimeDir),
            "group with others in it"
        );
        assert!(!ok(file(0o666, 0), Role::Plugin));
        assert!(!ok(file(0o664, ME), Role::Plugin));
        assert!(!ok(dir(0o757, ME), Role::Parent));
        // A group that holds only the owner (user private groups, umask 002).
        let private = |m: Meta| Meta {
            group_private: true,
            ..m
        };
        assert!(ok(private(dir(0o775, ME)), Role::RuntimeDir));
        assert!(ok(private(file(0o664, 0)), Role::Plugin));
        assert!(ok(private(dir(0o775, 0)), Role::Parent));
        assert!(!ok(private(file(0o666, 0)), Role::Plugin), "world still");
    }

    #[test]
    fn sticky_folders_are_fine_above_but_not_as_the_runtime_dir() {
        assert!(ok(dir(0o1777, 0), Role::Parent), "/tmp");
        assert!(!ok(dir(0o1777, 0), Role::RuntimeDir));
        assert!(!ok(dir(0o1777, 65534), Role::Parent), "someone else's");
        assert!(!ok(file(0o1666, 0), Role::Plugin));
    }

    #[test]
    fn kinds_are_checked() {
        assert!(judge(&file(0o700, 0), Role::RuntimeDir, ME).wrong_kind);
        assert!(judge(&dir(0o755, 0), Role::Plugin, ME).wrong_kind);
        let other = Meta {
            kind: Kind::Other,
            ..file(0o644, 0)
        };
        assert!(judge(&other, Role::Plugin, ME).wrong_kind);
        assert!(judge(&other, Role::Parent, ME).wrong_kind);
    }

    #[test]
    fn messages_name_the_path_the_modes_and_the_fix() {
        let p = Path::new("/x");
        let m = dir(0o777, 1000);
        let f = judge(&m, Role::RuntimeDir, 0);
        assert_eq!(
            describe("runtime_dir /x", p, &m, f, Role::RuntimeDir, "root"),
            "runtime_dir /x is writable by others (mode 0777, owner uid 1000): \
             chown root /x && chmod 0711 /x, or set [host] strict_modes = false for development"
        );
        let m = dir(0o700, 1000);
        let f = judge(&m, Role::RuntimeDir, 0);
        assert_eq!(
            describe("runtime_dir /x", p, &m, f, Role::RuntimeDir, "root"),
            "runtime_dir /x is owned by uid 1000 (mode 0700): \
             chown root /x && chmod 0711 /x, or set [host] strict_modes = false for development"
        );
        let m = file(0o666, 0);
        let f = judge(&m, Role::Plugin, 0);
        let text = describe("plugin /x", p, &m, f, Role::Plugin, "root");
        assert!(
            text.starts_with(
                "plugin /x is writable by others (mode 0666, owner uid 0): chmod go-w /x, or set"
            ),
            "{text}"
        );
        assert!(!text.contains('\n'));
    }
}
