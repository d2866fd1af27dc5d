//! The safe handle a plugin callback uses to talk to the host.

use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use abi_stable::std_types::{ROption, RResult, RSlice, RStr};

use crate::abi::{HostCtx, RawAddr, RawFields, RawKind, RawLevel, RawSendStatus};

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

/// How a websocket message is framed. Other protocols report `Binary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Text,
    Binary,
}

fn raw_kind(kind: Option<MessageKind>) -> RawKind {
    match kind {
        None => RawKind::Default,
        Some(MessageKind::Text) => RawKind::Text,
        Some(MessageKind::Binary) => RawKind::Binary,
    }
}

fn send_status(s: RawSendStatus) -> SendStatus {
    match s {
        RawSendStatus::Sent => SendStatus::Sent,
        RawSendStatus::Queued => SendStatus::Queued,
        RawSendStatus::Dropped => SendStatus::Dropped,
        RawSendStatus::Closed => SendStatus::Closed,
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

/// A connection's addresses and counters, from [`Context::conn_info`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Bytes waiting in the send buffer.
    pub send_queue: u64,
    /// Bytes of an incomplete message kept from the socket.
    pub recv_queue: u64,
    pub paused: bool,
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
    /// On websocket listeners it sends a text message.
    pub fn send(&mut self, conn: ConnId, data: impl AsRef<[u8]>) -> SendStatus {
        self.send_raw(conn, data.as_ref(), None)
    }

    /// Sends a websocket text message.
    pub fn send_text(&mut self, conn: ConnId, text: &str) -> SendStatus {
        self.send_raw(conn, text.as_bytes(), Some(MessageKind::Text))
    }

    /// Sends a websocket binary message.
    pub fn send_binary(&mut self, conn: ConnId, data: &[u8]) -> SendStatus {
        self.send_raw(conn, data, Some(MessageKind::Binary))
    }

    fn send_raw(&mut self, conn: ConnId, data: &[u8], kind: Option<MessageKind>) -> SendStatus {
        let send = self.raw.vt.send();
        send_status(send(
            self.raw.state,
            conn.0,
            RSlice::from_slice(data),
            raw_kind(kind),
        ))
    }

    /// Whether the message being handled in `on_message` is websocket text or
    /// binary.
    pub fn message_kind(&self) -> MessageKind {
        match (self.raw.vt.message_kind())(self.raw.state) {
            RawKind::Text => MessageKind::Text,
            _ => MessageKind::Binary,
        }
    }

    /// Answers an HTTP request on an `http://` listener. `Content-Length`,
    /// `Date` and `Connection` are added unless given.
    pub fn respond(
        &mut self,
        conn: ConnId,
        status: u16,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> SendStatus {
        let respond = self.raw.vt.respond();
        send_status(respond(
            self.raw.state,
            conn.0,
            status,
            RawFields::from_slice(headers),
            RSlice::from_slice(body),
        ))
    }

    /// Adds a connection of this worker to a group that spans every worker
    /// process of the host.
    pub fn join_group(&mut self, conn: ConnId, group: &str) -> bool {
        (self.raw.vt.join_group())(self.raw.state, conn.0, RStr::from_str(group))
    }

    pub fn leave_group(&mut self, conn: ConnId, group: &str) -> bool {
        (self.raw.vt.leave_group())(self.raw.state, conn.0, RStr::from_str(group))
    }

    /// Sends to every member of the group, in every worker process, except
    /// `exclude` (a connection of this worker, usually the sender).
    /// Messages from one worker to one group arrive in the order sent.
    pub fn send_to_group(&mut self, group: &str, data: impl AsRef<[u8]>, exclude: Option<ConnId>) {
        let f = self.raw.vt.send_to_group();
        let data = RSlice::from_slice(data.as_ref());
        f(
            self.raw.state,
            RStr::from_str(group),
            data,
            RawKind::Default,
            exclude.map_or(0, |c| c.0),
        )
    }

    /// Sends to every connection of every worker process of the host.
    pub fn send_to_all(&mut self, data: impl AsRef<[u8]>, exclude: Option<ConnId>) {
        let f = self.raw.vt.send_to_all();
        f(
            self.raw.state,
            RSlice::from_slice(data.as_ref()),
            RawKind::Default,
            exclude.map_or(0, |c| c.0),
        )
    }

    /// Binds a connection to a user id (one user may have several).
    pub fn bind_uid(&mut self, conn: ConnId, uid: &str) -> bool {
        (self.raw.vt.bind_uid())(self.raw.state, conn.0, RStr::from_str(uid))
    }

    /// Sends to every connection bound to `uid`, in any worker.
    pub fn send_to_uid(&mut self, uid: &str, data: impl AsRef<[u8]>) {
        let f = self.raw.vt.send_to_uid();
        f(
            self.raw.state,
            RStr::from_str(uid),
            RSlice::from_slice(data.as_ref()),
            RawKind::Default,
        )
    }

    /// Members of a group across all workers, as last known to this worker.
    pub fn group_count(&self, group: &str) -> u64 {
        (self.raw.vt.group_count())(self.raw.state, RStr::from_str(group))
    }

    /// The bound uids of a group's members across all workers, sorted.
    pub fn group_uids(&self, group: &str) -> Vec<String> {
        (self.raw.vt.group_uids())(self.raw.state, RStr::from_str(group))
            .into_iter()
            .map(|s| s.into_string())
            .collect()
    }

    /// Delivers `data` to `on_publish` in every worker of the host (this one
    /// included).
    pub fn publish(&mut self, topic: &str, data: impl AsRef<[u8]>) {
        (self.raw.vt.publish())(
            self.raw.state,
            RStr::from_str(topic),
            RSlice::from_slice(data.as_ref()),
        )
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

    /// Stops reading from a connection (back-pressure): its data waits in
    /// the kernel until [`Context::resume_recv`].
    pub fn pause_recv(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.pause_recv())(self.raw.state, conn.0)
    }

    pub fn resume_recv(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.resume_recv())(self.raw.state, conn.0)
    }

    /// Half-closes after what is queued is written (the peer sees end of
    /// stream), then closes for good after a short linger.
    pub fn end(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.end())(self.raw.state, conn.0)
    }

    /// Closes at once, dropping whatever is queued.
    pub fn destroy(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.destroy())(self.raw.state, conn.0)
    }

    /// Overrides the listener's `max_send_buffer_size` for one connection.
    pub fn set_max_send_buffer(&mut self, conn: ConnId, bytes: usize) -> bool {
        (self.raw.vt.set_max_send_buffer())(self.raw.state, conn.0, bytes as u64)
    }

    /// Counters and addresses of a connection; `None` once it is closed.
    pub fn conn_info(&self, conn: ConnId) -> Option<ConnInfo> {
        let raw = (self.raw.vt.conn_info())(self.raw.state, conn.0);
        raw.open.then(|| ConnInfo {
            remote: from_raw_addr(raw.remote),
            local: from_raw_addr(raw.local),
            bytes_read: raw.bytes_read,
            bytes_written: raw.bytes_written,
            send_queue: raw.send_queue,
            recv_queue: raw.recv_queue,
            paused: raw.paused,
        })
    }

    /// This worker's open connections (for heartbeats, broadcasts within it…).
    pub fn connections(&self) -> Vec<ConnId> {
        (self.raw.vt.connections())(self.raw.state)
            .into_iter()
            .map(ConnId)
            .collect()
    }

    /// Deletes every timer of this worker; returns how many there were.
    pub fn del_all_timers(&mut self) -> u64 {
        (self.raw.vt.del_all_timers())(self.raw.state)
    }

    /// Opens a client connection, driven by this worker's loop: `tcp://`,
    /// `text://`, `frame://` or `ws://host:port/path`. Its `on_connect` comes
    /// once connected (before that, sends are queued); a failure comes as
    /// `on_error` with [`crate::error_code::CONNECT_FAILED`], then `on_close`.
    /// Connect timeout: 10 s.
    pub fn connect(&mut self, url: &str) -> Result<ConnId, String> {
        self.connect_timeout(url, Duration::from_secs(10))
    }

    pub fn connect_timeout(&mut self, url: &str, timeout: Duration) -> Result<ConnId, String> {
        let ms = u64::try_from(timeout.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        match (self.raw.vt.connect())(self.raw.state, RStr::from_str(url), ms) {
            RResult::ROk(id) => Ok(ConnId(id)),
            RResult::RErr(e) => Err(e.into_string()),
        }
    }

    /// Connects an outbound connection again after `delay`, keeping its id
    /// (closing it first if open). Call it from `on_close` to retry.
    pub fn reconnect(&mut self, conn: ConnId, delay: Duration) -> bool {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        (self.raw.vt.reconnect())(self.raw.state, conn.0, ms)
    }

    /// Sends everything that arrives on `src` to `dst` as it comes, pausing
    /// `src` while `dst`'s send buffer is full; when either closes, so does
    /// the other. Call it both ways for a proxy.
    pub fn pipe(&mut self, src: ConnId, dst: ConnId) -> bool {
        (self.raw.vt.pipe())(self.raw.state, src.0, dst.0)
    }

    /// Whether the plugin opened this connection with [`Context::connect`].
    pub fn is_outbound(&self, conn: ConnId) -> bool {
        (self.raw.vt.is_outbound())(self.raw.state, conn.0)
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
