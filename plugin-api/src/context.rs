//! The safe handle a plugin callback uses to talk to the host.
//!
//! Everything here is re-exported at the crate root.

use std::fmt;
use std::marker::PhantomData;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use abi_stable::std_types::{ROption, RResult, RSlice, RStr};

use crate::abi::{HostCtx, RawAddr, RawFields, RawKind, RawLevel, RawSendStatus};

/// A connection of this worker (Workerman's `$connection->id`). Ids are not
/// reused within a worker process.
///
/// The id names a connection only in the worker that owns it: to reach
/// connections of other workers use groups, uids or
/// [`Context::send_to_all`]. The inner number is the id the host uses in its
/// logs and in `wm-host connections`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub u64);

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A timer of this worker, as returned by [`Context::add_timer`] and passed to
/// [`crate::Plugin::on_timer`] (Workerman's timer id). The inner number is
/// the host's id for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId(pub u64);

/// What happened to data given to [`Context::send`].
///
/// Workerman's `send` returns `true` (sent), `null` (queued) or `false`
/// (failed): `Sent`, `Queued`, and `Dropped` or `Closed` here. As in
/// Workerman, a failure also calls [`crate::Plugin::on_error`] with
/// [`crate::error_code::SEND_FAILED`] once the current callback has returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendStatus {
    /// Written to the socket at once.
    Sent,
    /// Queued; it goes out when the socket is writable. If this filled the
    /// send buffer, [`crate::Plugin::on_buffer_full`] follows.
    Queued,
    /// Dropped: the send buffer was already at its limit
    /// (`max_send_buffer_size`); `on_error` follows.
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
    /// A text message (opcode 1): the data is UTF-8.
    Text,
    /// A binary message (opcode 2), or a message of a non-websocket protocol.
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

/// Log levels for [`Context::log`], those of `tracing`. The host's `WM_LOG`
/// filter (default `info`) decides which are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Something failed.
    Error,
    /// Something looks wrong but the plugin carries on.
    Warn,
    /// Normal events worth a line in the log.
    Info,
    /// Detail for debugging; hidden by default.
    Debug,
    /// Very verbose detail; hidden by default.
    Trace,
}

/// A connection's addresses and counters, from [`Context::conn_info`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnInfo {
    /// The peer's address (Workerman's `getRemoteAddress()`).
    pub remote: Option<SocketAddr>,
    /// The local address (Workerman's `getLocalAddress()`).
    pub local: Option<SocketAddr>,
    /// Bytes received from the socket so far (Workerman's `bytesRead`).
    pub bytes_read: u64,
    /// Bytes written to the socket so far (Workerman's `bytesWritten`).
    pub bytes_written: u64,
    /// Bytes waiting in the send buffer.
    pub send_queue: u64,
    /// Bytes of an incomplete message kept from the socket.
    pub recv_queue: u64,
    /// Reading is paused by [`Context::pause_recv`] (or by a [`Context::pipe`]
    /// whose destination is full).
    pub paused: bool,
}

/// Facts about the worker process running the plugin, from
/// [`Context::worker`] (Workerman's `$worker->name`, `->id`, `->count`).
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
///
/// Every [`crate::Plugin`] callback receives one; it is valid only for that
/// call (it cannot be stored). Through it the plugin sends, closes, manages
/// timers and groups, and logs. Methods that take a [`ConnId`] and return
/// `bool` return false when the connection is unknown or already closed.
///
/// Events caused by a call (`on_error` after a failed send, `on_buffer_full`,
/// `on_publish` in this worker…) are delivered after the current callback
/// returns, never from inside the call.
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

    /// The worker process this callback runs in.
    ///
    /// ```
    /// use plugin_api::{Context, Plugin, StartError};
    ///
    /// struct Sharded;
    ///
    /// impl Plugin for Sharded {
    ///     fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
    ///         let w = ctx.worker();
    ///         ctx.info(format_args!("{} worker {}/{} (pid {})", w.name, w.id, w.count, w.pid));
    ///         Ok(())
    ///     }
    /// }
    /// ```
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

    /// A value from the group's `[worker.options]` table in the config;
    /// `None` if the key is absent.
    ///
    /// ```
    /// use plugin_api::{Context, Plugin, StartError};
    ///
    /// #[derive(Default)]
    /// struct Greeter {
    ///     greeting: String,
    /// }
    ///
    /// impl Plugin for Greeter {
    ///     // With `[worker.options]` holding `greeting = "hello"`.
    ///     fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
    ///         self.greeting = ctx.option("greeting").ok_or("greeting is not set")?.to_string();
    ///         Ok(())
    ///     }
    /// }
    /// ```
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
    /// (`text://` appends `\n`, `frame://` prepends the length, `custom://`
    /// uses the plugin's [`crate::Protocol::encode`]). On `http://` it
    /// answers the pending request with status 200 and `data` as the body.
    ///
    /// On a websocket it picks the frame, and never sends a text frame that
    /// is not UTF-8:
    ///
    /// - in [`Plugin::on_message`](crate::Plugin::on_message) for a binary
    ///   message: binary, so a message sent back comes back in its kind (an
    ///   echo is `ctx.send(conn, data)`);
    /// - otherwise (a text message being handled, or any other callback):
    ///   text when `data` is valid UTF-8, else binary.
    ///
    /// [`Context::send_text`] and [`Context::send_binary`] choose
    /// explicitly. The same rule holds for `send_to_group`, `send_to_all`
    /// and `send_to_uid`.
    ///
    /// Like Workerman's `$connection->send()`, it never blocks: what the
    /// socket does not take at once is queued. The [`SendStatus`] tells which
    /// (Workerman's `true`/`null`/`false`).
    ///
    /// ```
    /// use plugin_api::{ConnId, Context, Plugin, SendStatus};
    ///
    /// struct Upper;
    ///
    /// impl Plugin for Upper {
    ///     fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
    ///         match ctx.send(conn, data.to_ascii_uppercase()) {
    ///             SendStatus::Sent | SendStatus::Queued => {}
    ///             // `on_error` follows with error_code::SEND_FAILED.
    ///             SendStatus::Dropped | SendStatus::Closed => ctx.warn("reply lost"),
    ///         }
    ///     }
    /// }
    /// ```
    pub fn send(&mut self, conn: ConnId, data: impl AsRef<[u8]>) -> SendStatus {
        self.send_raw(conn, data.as_ref(), None)
    }

    /// Sends a websocket text message (opcode 1). On other protocols it is
    /// the same as [`Context::send`]. Bytes that are not UTF-8 (only the
    /// raw ABI can pass them: `text` is a `&str`) are refused on a
    /// websocket: [`SendStatus::Dropped`], and `on_error` with
    /// [`crate::error_code::SEND_FAILED`].
    pub fn send_text(&mut self, conn: ConnId, text: &str) -> SendStatus {
        self.send_raw(conn, text.as_bytes(), Some(MessageKind::Text))
    }

    /// Sends a websocket binary message (opcode 2). On other protocols it is
    /// the same as [`Context::send`].
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
    /// binary; [`MessageKind::Binary`] for other protocols. Use it to answer
    /// in kind:
    ///
    /// ```
    /// use plugin_api::{ConnId, Context, MessageKind, Plugin};
    ///
    /// struct WsEcho;
    ///
    /// impl Plugin for WsEcho {
    ///     fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
    ///         match ctx.message_kind() {
    ///             MessageKind::Text => ctx.send_text(conn, &String::from_utf8_lossy(data)),
    ///             MessageKind::Binary => ctx.send_binary(conn, data),
    ///         };
    ///     }
    /// }
    /// ```
    pub fn message_kind(&self) -> MessageKind {
        match (self.raw.vt.message_kind())(self.raw.state) {
            RawKind::Text => MessageKind::Text,
            _ => MessageKind::Binary,
        }
    }

    /// Answers an HTTP request on an `http://` listener. `Content-Length`,
    /// `Date` and `Connection` are added unless given. Each call answers the
    /// oldest request still waiting on the connection, so the answer may come
    /// after [`crate::Plugin::on_request`] has returned (from a timer, or once
    /// an outbound connection replied). Returns [`SendStatus::Dropped`] when
    /// no request is waiting or the connection is not `http://`.
    ///
    /// ```
    /// use plugin_api::{ConnId, Context, Plugin, Request};
    ///
    /// struct Hello;
    ///
    /// impl Plugin for Hello {
    ///     fn on_request(&mut self, ctx: &mut Context<'_>, conn: ConnId, req: &Request<'_>) {
    ///         let name = req.query_param("name").unwrap_or("world");
    ///         let body = format!("hello {name}\n");
    ///         ctx.respond(conn, 200, &[("Content-Type", "text/plain")], body.as_bytes());
    ///     }
    /// }
    /// ```
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
    /// process of the host (GatewayWorker's `Gateway::joinGroup`). A closed
    /// connection leaves its groups by itself.
    ///
    /// ```
    /// use std::collections::HashMap;
    /// use plugin_api::{ConnId, Context, Plugin};
    ///
    /// /// Lines starting with `/join ` pick a room; other lines go to it.
    /// #[derive(Default)]
    /// struct Rooms {
    ///     room: HashMap<ConnId, String>,
    /// }
    ///
    /// impl Plugin for Rooms {
    ///     fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
    ///         let line = String::from_utf8_lossy(data);
    ///         if let Some(room) = line.strip_prefix("/join ") {
    ///             if let Some(old) = self.room.insert(conn, room.to_string()) {
    ///                 ctx.leave_group(conn, &old);
    ///             }
    ///             ctx.join_group(conn, room);
    ///         } else if let Some(room) = self.room.get(&conn) {
    ///             ctx.send_to_group(room, line.as_bytes(), Some(conn));
    ///         }
    ///     }
    ///
    ///     fn on_close(&mut self, _ctx: &mut Context<'_>, conn: ConnId) {
    ///         self.room.remove(&conn);
    ///     }
    /// }
    /// ```
    pub fn join_group(&mut self, conn: ConnId, group: &str) -> bool {
        (self.raw.vt.join_group())(self.raw.state, conn.0, RStr::from_str(group))
    }

    /// Removes a connection from a group (GatewayWorker's
    /// `Gateway::leaveGroup`).
    pub fn leave_group(&mut self, conn: ConnId, group: &str) -> bool {
        (self.raw.vt.leave_group())(self.raw.state, conn.0, RStr::from_str(group))
    }

    /// Sends to every member of the group, in every worker process, except
    /// `exclude` (a connection of this worker, usually the sender).
    /// Messages from one worker to one group arrive in the order sent.
    /// Each connection frames the message with its own protocol; websocket
    /// connections get the frame [`Context::send`] would pick. (GatewayWorker's
    /// `Gateway::sendToGroup`.)
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

    /// Sends to every connection of every worker process of the host, except
    /// `exclude` (a connection of this worker). GatewayWorker's
    /// `Gateway::sendToAll`.
    pub fn send_to_all(&mut self, data: impl AsRef<[u8]>, exclude: Option<ConnId>) {
        let f = self.raw.vt.send_to_all();
        f(
            self.raw.state,
            RSlice::from_slice(data.as_ref()),
            RawKind::Default,
            exclude.map_or(0, |c| c.0),
        )
    }

    /// Binds a connection to a user id (one user may have several
    /// connections, in any workers). GatewayWorker's `Gateway::bindUid`. A
    /// closed connection is unbound by itself.
    pub fn bind_uid(&mut self, conn: ConnId, uid: &str) -> bool {
        (self.raw.vt.bind_uid())(self.raw.state, conn.0, RStr::from_str(uid))
    }

    /// Sends to every connection bound to `uid`, in any worker
    /// (GatewayWorker's `Gateway::sendToUid`). Nothing happens if none is.
    pub fn send_to_uid(&mut self, uid: &str, data: impl AsRef<[u8]>) {
        let f = self.raw.vt.send_to_uid();
        f(
            self.raw.state,
            RStr::from_str(uid),
            RSlice::from_slice(data.as_ref()),
            RawKind::Default,
        )
    }

    /// Members of a group across all workers, as last known to this worker:
    /// joins made in other workers a moment ago may not be counted yet.
    /// GatewayWorker's `Gateway::getClientCountByGroup`.
    pub fn group_count(&self, group: &str) -> u64 {
        (self.raw.vt.group_count())(self.raw.state, RStr::from_str(group))
    }

    /// The bound uids of a group's members across all workers, sorted and
    /// without duplicates; members without a uid are not listed.
    /// GatewayWorker's `Gateway::getUidListByGroup`.
    pub fn group_uids(&self, group: &str) -> Vec<String> {
        (self.raw.vt.group_uids())(self.raw.state, RStr::from_str(group))
            .into_iter()
            .map(|s| s.into_string())
            .collect()
    }

    /// Delivers `data` to [`crate::Plugin::on_publish`] in every worker of the
    /// host, this one included (after the current callback returns). Like
    /// Workerman's Channel component, for state every worker must see:
    /// configuration changes, cache invalidation.
    ///
    /// ```
    /// use plugin_api::{ConnId, Context, Plugin};
    ///
    /// #[derive(Default)]
    /// struct Motd {
    ///     motd: String,
    /// }
    ///
    /// impl Plugin for Motd {
    ///     fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
    ///         match data.strip_prefix(b"set ") {
    ///             Some(text) => ctx.publish("motd", text),
    ///             None => {
    ///                 ctx.send(conn, &self.motd);
    ///             }
    ///         }
    ///     }
    ///
    ///     fn on_publish(&mut self, _ctx: &mut Context<'_>, topic: &str, data: &[u8]) {
    ///         if topic == "motd" {
    ///             self.motd = String::from_utf8_lossy(data).into_owned();
    ///         }
    ///     }
    /// }
    /// ```
    pub fn publish(&mut self, topic: &str, data: impl AsRef<[u8]>) {
        (self.raw.vt.publish())(
            self.raw.state,
            RStr::from_str(topic),
            RSlice::from_slice(data.as_ref()),
        )
    }

    /// Closes a connection once what is queued for it is written
    /// (Workerman's `$connection->close()`); websocket connections send a
    /// close frame first. [`crate::Plugin::on_close`] follows.
    /// Returns false when the connection was already gone.
    pub fn close(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.close())(self.raw.state, conn.0, ROption::RNone)
    }

    /// Sends a last message, then closes the connection
    /// (Workerman's `$connection->close($data)`).
    pub fn close_with(&mut self, conn: ConnId, last: impl AsRef<[u8]>) -> bool {
        let last = RSlice::from_slice(last.as_ref());
        (self.raw.vt.close())(self.raw.state, conn.0, ROption::RSome(last))
    }

    /// The peer's address; `None` once the connection is gone.
    pub fn remote_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        from_raw_addr((self.raw.vt.addr())(self.raw.state, conn.0, true))
    }

    /// The local address the connection arrived on; `None` once it is gone.
    pub fn local_addr(&self, conn: ConnId) -> Option<SocketAddr> {
        from_raw_addr((self.raw.vt.addr())(self.raw.state, conn.0, false))
    }

    /// Stops reading from a connection (back-pressure): its data waits in
    /// the kernel until [`Context::resume_recv`]. Workerman's `pauseRecv()`.
    pub fn pause_recv(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.pause_recv())(self.raw.state, conn.0)
    }

    /// Reads from a connection paused by [`Context::pause_recv`] again,
    /// including data that arrived meanwhile. Workerman's `resumeRecv()`.
    pub fn resume_recv(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.resume_recv())(self.raw.state, conn.0)
    }

    /// Half-closes after what is queued is written (the peer sees end of
    /// stream), then closes for good after a short linger. Use it to let the
    /// peer read everything before the socket goes away.
    pub fn end(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.end())(self.raw.state, conn.0)
    }

    /// Closes at once, dropping whatever is queued (Workerman's
    /// `$connection->destroy()`). [`crate::Plugin::on_close`] follows.
    pub fn destroy(&mut self, conn: ConnId) -> bool {
        (self.raw.vt.destroy())(self.raw.state, conn.0)
    }

    /// Overrides the listener's `max_send_buffer_size` for one connection
    /// (Workerman's `$connection->maxSendBufferSize`); at least 1 byte.
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

    /// This worker's open connections (for heartbeats, broadcasts within it…),
    /// like Workerman's `$worker->connections`.
    pub fn connections(&self) -> Vec<ConnId> {
        (self.raw.vt.connections())(self.raw.state)
            .into_iter()
            .map(ConnId)
            .collect()
    }

    /// Deletes every timer of this worker; returns how many there were
    /// (Workerman's `Timer::delAll()`).
    pub fn del_all_timers(&mut self) -> u64 {
        (self.raw.vt.del_all_timers())(self.raw.state)
    }

    /// Opens a client connection, driven by this worker's loop: `tcp://`,
    /// `text://`, `frame://` or `ws://host:port/path` (Workerman's
    /// `AsyncTcpConnection`). Its `on_connect` comes once connected (before
    /// that, sends are queued); a failure comes as `on_error` with
    /// [`crate::error_code::CONNECT_FAILED`], then `on_close`. Its messages
    /// arrive in `on_message` like any other; [`Context::is_outbound`] tells
    /// them apart. Connect timeout: 10 s.
    ///
    /// `Err` is returned at once for a URL that cannot be used (bad scheme or
    /// address) or a socket that cannot be opened; network failures come
    /// later, as events.
    ///
    /// ```
    /// use std::time::Duration;
    /// use plugin_api::{ConnId, Context, Plugin, StartError};
    ///
    /// /// Keeps one connection to an upstream server, reconnecting when it drops.
    /// #[derive(Default)]
    /// struct Upstream {
    ///     conn: Option<ConnId>,
    /// }
    ///
    /// impl Plugin for Upstream {
    ///     fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
    ///         self.conn = Some(ctx.connect("text://127.0.0.1:9000")?);
    ///         Ok(())
    ///     }
    ///
    ///     fn on_close(&mut self, ctx: &mut Context<'_>, conn: ConnId) {
    ///         if Some(conn) == self.conn {
    ///             ctx.reconnect(conn, Duration::from_secs(1));
    ///         }
    ///     }
    /// }
    /// ```
    pub fn connect(&mut self, url: &str) -> Result<ConnId, String> {
        self.connect_timeout(url, Duration::from_secs(10))
    }

    /// [`Context::connect`] with another connect timeout (at least 1 ms).
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
    /// (closing it first if open). Call it from `on_close` to retry
    /// (Workerman's `AsyncTcpConnection::reconnect()`). Returns false for an
    /// unknown id or a connection the plugin did not open.
    pub fn reconnect(&mut self, conn: ConnId, delay: Duration) -> bool {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        (self.raw.vt.reconnect())(self.raw.state, conn.0, ms)
    }

    /// Sends everything that arrives on `src` to `dst` as it comes, pausing
    /// `src` while `dst`'s send buffer is full; when either closes, so does
    /// the other. Call it both ways for a proxy (Workerman's
    /// `$connection->pipe($dest)`). Piped data skips `on_message`.
    ///
    /// ```
    /// use plugin_api::{ConnId, Context, Plugin};
    ///
    /// /// A TCP proxy: each client gets its own upstream connection.
    /// struct Proxy;
    ///
    /// impl Plugin for Proxy {
    ///     fn on_connect(&mut self, ctx: &mut Context<'_>, conn: ConnId) {
    ///         if ctx.is_outbound(conn) {
    ///             return;
    ///         }
    ///         match ctx.connect("tcp://127.0.0.1:8080") {
    ///             Ok(upstream) => {
    ///                 ctx.pipe(conn, upstream);
    ///                 ctx.pipe(upstream, conn);
    ///             }
    ///             Err(e) => {
    ///                 ctx.error(format_args!("proxy: {e}"));
    ///                 ctx.destroy(conn);
    ///             }
    ///         }
    ///     }
    /// }
    /// ```
    pub fn pipe(&mut self, src: ConnId, dst: ConnId) -> bool {
        (self.raw.vt.pipe())(self.raw.state, src.0, dst.0)
    }

    /// Whether the plugin opened this connection with [`Context::connect`].
    pub fn is_outbound(&self, conn: ConnId) -> bool {
        (self.raw.vt.is_outbound())(self.raw.state, conn.0)
    }

    /// Number of open connections in this worker
    /// (Workerman's `count($worker->connections)`).
    pub fn connection_count(&self) -> u64 {
        (self.raw.vt.connection_count())(self.raw.state)
    }

    /// Starts a timer that calls [`crate::Plugin::on_timer`] after `interval`,
    /// once or every `interval` (Workerman's `Timer::add($interval, $cb,
    /// [], $persistent)` with `repeat` as `$persistent`). Millisecond
    /// precision; at least 1 ms. Timers belong to this worker process.
    ///
    /// ```
    /// use std::time::Duration;
    /// use plugin_api::{Context, Plugin, StartError, TimerId};
    ///
    /// /// Says "ping" to every connection of this worker every 30 seconds.
    /// #[derive(Default)]
    /// struct Heartbeat {
    ///     timer: Option<TimerId>,
    /// }
    ///
    /// impl Plugin for Heartbeat {
    ///     fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
    ///         self.timer = Some(ctx.add_timer(Duration::from_secs(30), true));
    ///         Ok(())
    ///     }
    ///
    ///     fn on_timer(&mut self, ctx: &mut Context<'_>, timer: TimerId) {
    ///         if Some(timer) == self.timer {
    ///             for conn in ctx.connections() {
    ///                 ctx.send(conn, "ping");
    ///             }
    ///         }
    ///     }
    /// }
    /// ```
    pub fn add_timer(&mut self, interval: Duration, repeat: bool) -> TimerId {
        let ms = u64::try_from(interval.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        TimerId((self.raw.vt.add_timer())(self.raw.state, ms, repeat))
    }

    /// Stops a timer (Workerman's `Timer::del()`). Returns false if it had
    /// already ended or never existed.
    pub fn del_timer(&mut self, timer: TimerId) -> bool {
        (self.raw.vt.del_timer())(self.raw.state, timer.0)
    }

    /// Writes a line into the host's log, tagged with this worker: the
    /// terminal in the foreground, the `log_file` when daemonized. Plugins
    /// cannot use the host's `tracing` subscriber directly (each `.so` has its
    /// own statics), so this is how they log; anything [`fmt::Display`] goes,
    /// `format_args!` included.
    ///
    /// ```
    /// use plugin_api::{ConnId, Context, Level, Plugin};
    ///
    /// struct Logged;
    ///
    /// impl Plugin for Logged {
    ///     fn on_connect(&mut self, ctx: &mut Context<'_>, conn: ConnId) {
    ///         let peer = ctx.remote_addr(conn);
    ///         ctx.log(Level::Info, format_args!("connection {conn} from {peer:?}"));
    ///     }
    /// }
    /// ```
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
