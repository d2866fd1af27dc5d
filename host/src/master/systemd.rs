//! systemd's service notifications (sd_notify(3)): with `Type=notify` the
//! foreground master says `READY=1` once every worker of every group is
//! ready, `RELOADING=1` (with `MONOTONIC_USEC`, which systemd 253+ wants for
//! `Type=notify-reload`) and `READY=1` around a reload, `STOPPING=1`, and its
//! `MAINPID`.
//!
//! A few lines of our own rather than the `sd-notify` crate: its 0.5 treats
//! `NOTIFY_SOCKET` as a path only, and a manager may hand out an abstract
//! socket (`@name`), which std reaches with `SocketAddr::from_abstract_name`.

use std::ffi::OsStr;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable a service manager sets when it wants notifications.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// Where notifications go.
pub struct Notifier {
    sock: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `NOTIFY_SOCKET`; `None` when it is unset or empty.
    pub fn from_env() -> Option<io::Result<Notifier>> {
        let value = std::env::var_os(NOTIFY_SOCKET)?;
        (!value.is_empty()).then(|| Notifier::new(&value))
    }

    /// `target` is a socket path, or `@name` for an abstract socket.
    pub fn new(target: &OsStr) -> io::Result<Notifier> {
        let bytes = target.as_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(target)?,
        };
        // Sent from the master's event loop: a manager that does not read
        // must not stall it (the notification is dropped, with a warning).
        let sock = UnixDatagram::unbound()?;
        sock.set_nonblocking(true)?;
        Ok(Notifier { sock, addr })
    }

    /// One datagram of `KEY=value` lines.
    pub fn send(&self, lines: &str) -> io::Result<()> {
        let n = self.sock.send_to_addr(lines.as_bytes(), &self.addr)?;
        if n < lines.len() {
            return Err(io::Error::other("notification cut short"));
        }
        Ok(())
    }
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC` wants it.
pub fn monotonic_usec() -> u64 {
    use nix::time::{clock_gettime, ClockId};
    clock_gettime(ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000
    })
}

/// What the service manager is told the master is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Ready,
    Reloading,
    Stopping,
}

/// The notification for going from `from` to `to`; `None` when nothing is
/// owed (no change, or back to starting, which cannot happen).
pub fn message(from: State, to: State, status: &str) -> Option<String> {
    let pid = std::process::id();
    match (from, to) {
        (a, b) if a == b => None,
        // MAINPID: the process systemd started, in the foreground. Under
        // `start -d` the forked master is not, and NotifyAccess=main (the
        // default for Type=notify) ignores it: run it in the foreground.
        (State::Starting, State::Ready) => {
            Some(format!("READY=1\nMAINPID={pid}\nSTATUS={status}\n"))
        }
        (_, State::Ready) => Some(format!("READY=1\nSTATUS={status}\n")),
        (_, State::Reloading) => Some(format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS={status}\n",
            monotonic_usec()
        )),
        (_, State::Stopping) => Some(format!("STOPPING=1\nSTATUS={status}\n")),
        (_, State::Starting) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_path_and_an_abstract_socket_both_get_the_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        Notifier::new(path.as_os_str())
            .unwrap()
            .send("READY=1\n")
            .unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\n");

        let name = format!("wm-host-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        Notifier::new(OsStr::new(&format!("@{name}")))
            .unwrap()
            .send("STOPPING=1\n")
            .unwrap();
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1\n");
    }

    #[test]
    fn a_full_socket_is_would_block_not_a_stall() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let _listener = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.as_os_str()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        // Nobody reads: sends fill the queue, then must fail, not block.
        std::thread::spawn(move || {
            let end = (0..1_000_000)
                .map(|_| n.send("STATUS=filling\n"))
                .find_map(Result::err);
            let _ = tx.send(end.map(|e| e.kind()));
        });
        let end = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("send blocked on a full socket");
        assert_eq!(end, Some(io::ErrorKind::WouldBlock));
    }

    #[test]
    fn messages_follow_the_state() {
        assert_eq!(message(State::Ready, State::Ready, "x"), None);
        let first = message(State::Starting, State::Ready, "up").unwrap();
        assert!(first.starts_with("READY=1\nMAINPID="), "{first}");
        assert!(first.ends_with("STATUS=up\n"), "{first}");
        let reload = message(State::Ready, State::Reloading, "r").unwrap();
        let usec: u64 = reload
            .lines()
            .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0 && usec <= monotonic_usec());
        assert!(reload.starts_with("RELOADING=1\n"));
        let back = message(State::Reloading, State::Ready, "up").unwrap();
        assert!(!back.contains("MAINPID"), "{back}");
        let stop = message(State::Ready, State::Stopping, "bye").unwrap();
        assert!(stop.starts_with("STOPPING=1\n"));
    }
}
