//! The safe handle a plugin callback uses to talk to the host.

use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use abi_stable::std_types::{ROption, RSlice, RStr};

use crate::abi::{HostCtx, RawAddr, RawLevel, RawSendStatus};

/// A connection of this worker. Ids are not reused within a worker process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A timer of this worker, as returned by [`Context::add_timer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(pub u64);

/// What happened to data given to [`Context::send`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStatus {
    /// Written to the socket at once.
    Sent,
    /// Queued; it goes out when the socket is writable.
    Queued,
    /// Dropped because the send buffer is full (`on_error` follows).
    Dropped,
    /// The connection is closed or unknown.
    Closed,
}

impl SendStatus {
    /// Sent or queued: the data will go out unless the connection dies.
    pub fn is_ok(self) -> bool {
        matches!(self, SendStatus::Sent | SendStatus::Queued)
    }
}

/// Log levels for [`Context::log`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// Facts about the worker process running the plugin.
#[derive(Debug, Clone, Copy)]
pub struct WorkerInfo {
    /// The `name` of the `[[worker]]` group.
    pub name: &'static str,
    /// 0..count-1 within the group; a replacement keeps the id.
    pub id: u32,
    /// Number of processes in the group.
    pub count: u32,
    /// Operating-system process id.
    pub pid: u32,
    /// The listen address as written in the config, e.g. `text://127.0.0.1:2347`.
    pub listen: &'static str,
}

/// The plugin's view of the host during one callback.
pub struct Context<'a> {
    raw: HostCtx,
    _borrow: PhantomData<&'a mut ()>,
}

impl Context<'_> {
    #[doc(hidden)]
    pub fn from_raw(raw: HostCtx) -> Self {
        Context {
            raw,
            _borrow: PhantomData,
        }
    }

    /// The worker this callback runs in.
    pub fn worker(&self) -> WorkerInfo {
        let info = (self.raw.vt.worker_info())(self.raw.state);
        WorkerInfo {
            name: info.name.as_str(),
            id: info.id,
            count: info.count,
            pid: info.pid,
            listen: info.listen.as_str(),
        }
    }

    /// A value from the group's `[worker.options]` table in the config.
    pub fn option(&self, key: &str) -> Option<&'static str> {
        self.options().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    /// All of the group's `[worker.options]`, in key order.
    pub fn options(&self) -> impl Iterator<Item = (&'static str, &'static str)> {
        let info = (self.raw.vt.worker_info())(self.raw.state);
        info.options
            .as_slice()
            .iter()
            .map(|t| (t.0.as_str(), t.1.as_str()))
    }

    /// Sends a message on a connection, framed by the listener's protocol
    /// (`text://` appends `\n`, `frame://` prepends the length).
    pub fn send(&mut self, conn: ConnId, data: impl AsRef<[u8]>) -> SendStatus {
        let status =
            (self.raw.vt.send())(self.raw.state, conn.0, RSlice::from_slice(data.as_ref()));
        match status {
            RawSendStatus::Sent => SendStatus::Sent,
            RawSendStatus::Queued => SendStatus::Queued,
            RawSendStatus::Dropped => SendStatus::Dropped,
            RawSendStatus::Closed => SendStatus::Closed,
        }
    }

    /// Closes a connection once what is queued for it is written.
    /// Returns false when the connection was already gone.
    pub fn close(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.close())(self.raw.state, conn.0, ROption::RNone)
    }

    /// Sends a last message, then closes the connection.
    pub fn close_with(&mut self, conn: ConnId, last: impl AsRef<[u8]>) -> bool {
        let last = RSlice::from_slice(last.as_ref());
        (self.raw.vt.close())(self.raw.state, conn.0, ROption::RSome(last))
    }

    /// The peer's address.
    pub fn remote_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        from_raw_addr((self.raw.vt.addr())(self.raw.state, conn.0, true))
    }

    /// The local address the connection arrived on.
    pub fn local_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        from_raw_addr((self.raw.vt.addr())(self.raw.state, conn.0, false))
    }

    /// Number of open connections in this worker.
    pub fn connection_count(&self) -> u64 {
        (self.raw.vt.connection_count())(self.raw.state)
    }

    /// Starts a timer that calls [`crate::Plugin::on_timer`] after `interval`,
    /// once or every `interval`. Millisecond precision; at least 1 ms.
    pub fn add_timer(&mut self, interval: Duration, repeat: bool) -> TimerId {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        TimerId((self.raw.vt.add_timer())(self.raw.state, ms, repeat))
    }

    /// Stops a timer. Returns false if it had already ended or never existed.
    pub fn del_timer(&mut self, timer: TimerId) -> bool {
        (self.raw.vt.del_timer())(self.raw.state, timer.0)
    }

    /// Writes a line into the host's log, tagged with this worker.
    pub fn log(&self, level: Level, msg: impl fmt::Display) {
        let raw = match level {
            Level::Error => RawLevel::Error,
            Level::Warn => RawLevel::Warn,
            Level::Info => RawLevel::Info,
            Level::Debug => RawLevel::Debug,
            Level::Trace => RawLevel::Trace,
        };
        let text = msg.to_string();
        (self.raw.vt.log())(self.raw.state, raw, RStr::from_str(&text));
    }

    /// `log(Level::Info, …)`.
    pub fn info(&self, msg: impl fmt::Display) {
        self.log(Level::Info, msg)
    }
    /// `log(Level::Warn, …)`.
    pub fn warn(&self, msg: impl fmt::Display) {
        self.log(Level::Warn, msg)
    }
    /// `log(Level::Error, …)`.
    pub fn error(&self, msg: impl fmt::Display) {
        self.log(Level::Error, msg)
    }
    /// `log(Level::Debug, …)`.
    pub fn debug(&self, msg: impl fmt::Display) {
        self.log(Level::Debug, msg)
    }
}

fn from_raw_addr(raw: RawAddr) -> Option<SocketAddr> {
    let ip = match raw.family {
        4 => IpAddr::V4(Ipv4Addr::new(raw.ip[0], raw.ip[1], raw.ip[2], raw.ip[3])),
        6 => IpAddr::V6(Ipv6Addr::from(raw.ip)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, raw.port))
}

/// Encodes an address for [`RawAddr`]; used by the host.
pub fn to_raw_addr(addr: Option<SocketAddr>) -> RawAddr {
    let mut raw = RawAddr {
        family: 0,
        port: 0,
        ip: [0; 16],
    };
    match addr {
        Some(SocketAddr::V4(a)) => {
            raw.family = 4;
            raw.port = a.port();
            raw.ip[..4].copy_from_slice(&a.ip().octets());
        }
        Some(SocketAddr::V6(a)) => {
            raw.family = 6;
            raw.port = a.port();
            raw.ip = a.ip().octets();
        }
        None => {}
    }
    raw
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_through_raw_form() {
        for a in ["127.0.0.1:80", "[::1]:65535", "10.1.2.3:0"] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(from_raw_addr(to_raw_addr(Some(addr))), Some(addr));
        }
        assert_eq!(from_raw_addr(to_raw_addr(None)), None);
    }
}
