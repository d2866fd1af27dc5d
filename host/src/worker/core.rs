//! The part of a worker that plugin calls reach: its state, and what it
//! does to connections (send, close, pause). Host functions called from
//! inside a plugin callback only change this state and queue follow-up
//! callbacks (`deferred`, `closing`); the loop runs those after the current
//! callback returns, so the plugin is never re-entered. HTTP answers,
//! groups and introspection are in modules of their own.

use std::borrow::Cow;
use std::collections::{HashMap, VecDeque};

use std::time::{Duration, Instant};

use plugin_api::abi::{RawConnInfo, RawSendStatus, RawWorkerInfo};
use plugin_api::error_code;
use slab::Slab;

use super::conn::{Conn, State};
use super::timers::Timers;
use crate::bus::{self, Gid, Registry};
use crate::ipc::WorkerStats;
use crate::plugin::CustomProtocol;
use wm_proto::{http, websocket, Codec, Framer, Kind, ProtocolError, Wire};

/// How long a connection half-closed by `end()` may linger (Workerman: 1 s).
pub const LINGER: Duration = Duration::from_secs(1);

/// Poll tokens of connections start here (below: listener, control, bus,
/// handover).
pub const FIRST_CONN: usize = 4;

/// A plugin callback owed once the current one returns.
#[derive(Debug)]
pub enum Deferred {
    /// An outbound connection is established.
    Connect(u64),
    BufferFull(u64),
    BufferDrain(u64),
    Error(u64, u32, Cow<'static, str>),
    Publish(String, Vec<u8>),
}

pub struct Core {
    pub conns: Slab<Conn>,
    generation: u32,
    pub timers: Timers,
    pub deferred: VecDeque<Deferred>,
    /// Connections to tear down now (flushed, failed or destroyed).
    pub closing: Vec<u64>,
    pub info: &'static RawWorkerInfo,
    pub max_package_size: usize,
    pub max_send_buffer_size: usize,
    pub total_messages: u64,
    pub send_fail: u64,
    /// Bytes read and written by connections that are gone (`remove`):
    /// with the live ones', the worker's totals.
    gone_bytes: (u64, u64),
    /// Incomplete input held across connections (the sum of `Conn::held`),
    /// for `max_buffered_input`.
    pub buffered: usize,
    /// This worker's pid: the node part of connection gids on the bus.
    pub node: u32,
    /// Group and uid membership across all workers.
    pub registry: Registry,
    /// Frames for the master to relay to the other workers.
    pub bus: Option<mio::net::UnixStream>,
    pub bus_buf: bus::BusBuf,
    /// Connections resumed by the plugin: read what waited in the kernel.
    pub resumed: Vec<u64>,
    /// Half-closed connections (`end`) and when to close them for good.
    pub lingering: Vec<(Instant, u64)>,
    /// Total messages at the previous `status`, for qps.
    pub(super) last_sample: Option<(u64, Instant)>,
    /// The plugin's framing, for `custom://` listeners.
    pub custom: Option<CustomProtocol>,
    /// For registering outbound sockets; set once the loop exists.
    pub poll_registry: Option<mio::Registry>,
    /// Outbound connections and when their connect times out.
    pub connect_deadlines: Vec<(Instant, u64)>,
    /// Outbound connections waiting to reconnect, and when.
    pub redials: Vec<(Instant, u64)>,
    /// The reply buffer lent to the connection being read (see `Conn::lend_out`).
    pub spare_out: Vec<u8>,
    /// The last response head `respond` encoded, reused while answers repeat.
    pub(super) heads: http::HeadCache,
    /// The `Date` of answers, read from the clock once per wake-up.
    pub(super) date: http::DateCache,
    /// Connections taken over from another worker, which keep their gid on
    /// the bus: local id -> gid, and back.
    pub adopted: HashMap<u64, Gid>,
    pub adopted_gids: HashMap<Gid, u64>,
    /// While bus frames from before a handover's cut are delivered: the
    /// old worker delivered those to the adopted connections already.
    pub skip_adopted: bool,
    /// The worker is being replaced: HTTP answers say `Connection: close`
    /// and websockets are closed with 1001 (going away).
    pub retiring: bool,
    /// `ws_deflate`: websockets agree to (accepted) or offer (outbound)
    /// permessage-deflate.
    pub ws_deflate: bool,
}

/// Slab index of a connection id: the low 32 bits. The high 32 bits are a
/// generation, so a stale id never reaches a newer connection in the same slot.
pub fn slot(id: u64) -> usize {
    (id & 0xffff_ffff) as usize
}

pub fn lookup(conns: &mut Slab<Conn>, id: u64) -> Option<&mut Conn> {
    conns.get_mut(slot(id)).filter(|c| c.id == id)
}

impl Core {
    pub fn new(
        info: &'static RawWorkerInfo,
        max_package_size: usize,
        max_send_buffer_size: usize,
    ) -> Core {
        Core {
            conns: Slab::new(),
            generation: 0,
            timers: Timers::default(),
            deferred: VecDeque::new(),
            closing: Vec::new(),
            info,
            max_package_size,
            max_send_buffer_size,
            total_messages: 0,
            send_fail: 0,
            gone_bytes: (0, 0),
            buffered: 0,
            node: std::process::id(),
            registry: Registry::default(),
            bus: None,
            bus_buf: bus::BusBuf::default(),
            resumed: Vec::new(),
            lingering: Vec::new(),
            last_sample: None,
            custom: None,
            poll_registry: None,
            connect_deadlines: Vec::new(),
            redials: Vec::new(),
            spare_out: Vec::new(),
            heads: http::HeadCache::default(),
            date: http::DateCache::default(),
            adopted: HashMap::new(),
            adopted_gids: HashMap::new(),
            skip_adopted: false,
            retiring: false,
            ws_deflate: false,
        }
    }

    pub fn next_id(&mut self, slot: usize) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        (u64::from(self.generation) << 32) | slot as u64
    }

    pub fn registry(&self) -> &mio::Registry {
        self.poll_registry
            .as_ref()
            .expect("the registry is set before any callback")
    }

    pub fn get(&mut self, id: u64) -> Option<&mut Conn> {
        lookup(&mut self.conns, id)
    }

    pub fn stats(&self) -> WorkerStats {
        WorkerStats {
            connections: self.conns.len() as u64,
            total_messages: self.total_messages,
            send_fail: self.send_fail,
            timers: self.timers.len() as u64,
            bytes_in: (self.conns.iter().map(|(_, c)| c.bytes_read))
                .fold(self.gone_bytes.0, u64::wrapping_add),
            bytes_out: (self.conns.iter().map(|(_, c)| c.bytes_written))
                .fold(self.gone_bytes.1, u64::wrapping_add),
        }
    }

    /// Takes a connection out of the slab (closed, or moved to another
    /// worker), keeping its byte counts in the worker's totals.
    pub fn remove(&mut self, id: u64) -> Conn {
        let conn = self.conns.remove(slot(id));
        self.gone_bytes.0 = self.gone_bytes.0.wrapping_add(conn.bytes_read);
        self.gone_bytes.1 = self.gone_bytes.1.wrapping_add(conn.bytes_written);
        conn
    }

    /// A connection taken over arrives with the counts of its old worker:
    /// they are that worker's traffic, not ours. Taken off in advance
    /// (wrapping), so the sum with the live connections' counts comes out right.
    pub fn adopted_bytes(&mut self, read: u64, written: u64) {
        self.gone_bytes.0 = self.gone_bytes.0.wrapping_sub(read);
        self.gone_bytes.1 = self.gone_bytes.1.wrapping_sub(written);
    }

    pub(super) fn send_failed(&mut self, id: u64, why: &'static str) {
        self.send_fail += 1;
        self.deferred.push_back(Deferred::Error(
            id,
            error_code::SEND_FAILED,
            Cow::Borrowed(why),
        ));
    }

    /// Frames and sends one message (Workerman's `$connection->send`).
    pub fn send(&mut self, id: u64, data: &[u8]) -> RawSendStatus {
        self.send_kind(id, data, Kind::Default)
    }

    /// Writes bytes that are already framed (handshake answers, control frames).
    pub fn send_raw(&mut self, id: u64, bytes: &[u8]) {
        let Some(conn) = lookup(&mut self.conns, id) else {
            return;
        };
        if let Err(e) = conn.write_parts(&[bytes]) {
            tracing::debug!(conn = id, "send failed: {e}");
            self.destroy(id);
        }
    }

    /// A plugin's `send_text` of bytes not known to be UTF-8: refused on a
    /// websocket when they are not (never a text frame that is not UTF-8;
    /// `on_error` follows), as `send` on other protocols.
    #[inline(never)]
    pub fn send_text(&mut self, id: u64, data: &[u8]) -> RawSendStatus {
        let ws = matches!(self.get(id).map(|c| &c.codec), Some(Codec::Websocket(_)));
        if ws && !websocket::is_utf8(data) {
            self.send_failed(id, "text message is not valid UTF-8");
            return RawSendStatus::Dropped;
        }
        self.send_kind(id, data, Kind::Text)
    }

    /// Frames and sends one message. `Kind::Text` must be UTF-8 (see
    /// `host_api::Scope::outgoing`); `Kind::Default` lets the codec choose.
    // Always inlined: left as a hint, whether LLVM followed it changed with
    // unrelated code (how the crate splits into codegen units), and a call
    // here cost the echo path about 40 instructions per message.
    #[inline(always)]
    pub fn send_kind(&mut self, id: u64, data: &[u8], kind: Kind) -> RawSendStatus {
        // The per-message path: a reply during a read (the connection is
        // corked), framed straight into the send buffer. Kept small so the
        // caller need not save and restore what the rest of this would use.
        if let Some(conn) = lookup(&mut self.conns, id) {
            if refusal(conn).is_none() {
                match conn.queue_message(data, kind) {
                    Some(Ok(())) => {
                        if conn.pending() == 0 {
                            return RawSendStatus::Sent;
                        }
                        if conn.note_full() {
                            self.deferred.push_back(Deferred::BufferFull(id));
                        }
                        return RawSendStatus::Queued;
                    }
                    Some(Err(_)) => return self.too_large(id),
                    // Not corked; HTTP, `custom://`, a websocket client: below.
                    None => {}
                }
            }
        }
        self.send_kind_rest(id, data, kind)
    }

    #[cold]
    #[inline(never)]
    fn too_large(&mut self, id: u64) -> RawSendStatus {
        self.send_failed(id, "message too large for the protocol");
        RawSendStatus::Dropped
    }

    /// `send_kind` off its per-message path: not during a read, closed or
    /// full connections, and codecs that frame through `Codec::encode`.
    #[inline(never)]
    fn send_kind_rest(&mut self, id: u64, data: &[u8], kind: Kind) -> RawSendStatus {
        let Some(conn) = lookup(&mut self.conns, id) else {
            self.send_failed(id, "client closed");
            return RawSendStatus::Closed;
        };
        if let Some((status, why)) = refusal(conn) {
            self.send_failed(id, why);
            return status;
        }
        // On http:// a plain send is a 200 answer with that body (as in Workerman).
        if let Codec::Http(_) = conn.codec {
            return self.respond(id, 200, [], data);
        }
        // Not corked, or a codec `encode_into` cannot do: `send_kind` tried.
        let framer = self.custom.as_ref().map(|p| p as &dyn Framer);
        let mut wire = Wire::default();
        let parts = match conn.codec.encode(data, kind, framer, &mut wire) {
            Ok(parts) => parts,
            Err(ProtocolError::Custom(_)) => {
                self.send_failed(id, "the plugin's protocol failed to encode");
                return RawSendStatus::Dropped;
            }
            Err(_) => return self.too_large(id),
        };
        let queued = conn.write_parts(&parts);
        let newly_full = matches!(queued, Ok(false)) && conn.note_full();
        self.sent(id, queued, newly_full)
    }

    /// `send_kind` of bytes already framed for this connection's codec (a
    /// broadcast framed once for all its members): the same checks and
    /// outcomes, without the encoding.
    pub fn send_framed(&mut self, id: u64, framed: &[u8]) -> RawSendStatus {
        let Some(conn) = lookup(&mut self.conns, id) else {
            self.send_failed(id, "client closed");
            return RawSendStatus::Closed;
        };
        if let Some((status, why)) = refusal(conn) {
            self.send_failed(id, why);
            return status;
        }
        let queued = conn.write_parts(&[framed]);
        let newly_full = matches!(queued, Ok(false)) && conn.note_full();
        self.sent(id, queued, newly_full)
    }

    /// What a write to `id` came to; `newly_full`: its send buffer just
    /// reached `max_send_buffer_size` (`on_buffer_full` follows).
    #[inline(always)]
    fn sent(&mut self, id: u64, queued: std::io::Result<bool>, newly_full: bool) -> RawSendStatus {
        match queued {
            Ok(true) => RawSendStatus::Sent,
            Ok(false) => {
                if newly_full {
                    self.deferred.push_back(Deferred::BufferFull(id));
                }
                RawSendStatus::Queued
            }
            Err(e) => {
                tracing::debug!(conn = id, "send failed: {e}");
                self.destroy(id);
                RawSendStatus::Closed
            }
        }
    }

    /// Closes after flushing, optionally sending a last message first.
    pub fn close(&mut self, id: u64, last: Option<&[u8]>) -> bool {
        match self.get(id) {
            // TLS before its handshake is done: nothing can be sent on it.
            Some(c) if c.state == State::Open && c.sock.handshaking() => {
                self.destroy(id);
                return true;
            }
            Some(c) if c.state == State::Open => {}
            // Nothing to flush to yet: closing a connect attempt ends it.
            Some(c) if c.state == State::Connecting => {
                self.destroy(id);
                return true;
            }
            _ => return false,
        }
        if let Some(last) = last {
            self.send(id, last);
        }
        let retiring = self.retiring;
        let Some(conn) = self.get(id) else {
            return true;
        };
        if conn.state == State::Open {
            // A websocket says goodbye with a close frame (1000: normal).
            if let Some(bye) = match &conn.codec {
                Codec::Websocket(ws) if retiring => ws.going_away().map(|f| f.to_vec()),
                Codec::Websocket(ws) => ws.goodbye().map(|f| f.to_vec()),
                _ => None,
            } {
                let _ = conn.write_parts(&[&bye]);
            }
            conn.state = State::Closing;
            conn.close_notify_when_flushed();
            if conn.pending() == 0 {
                self.finish_close(id);
            }
        }
        true
    }

    /// A closing connection has nothing left to send: close it, or for
    /// `end()` half-close it and close after the linger.
    fn finish_close(&mut self, id: u64) {
        let Some(conn) = lookup(&mut self.conns, id) else {
            return;
        };
        if conn.ending {
            conn.ending = false;
            let _ = conn.sock.shutdown(std::net::Shutdown::Write);
            self.lingering.push((Instant::now() + LINGER, id));
        } else {
            self.closing.push(id);
        }
    }

    /// Half-close after flushing, then close after [`LINGER`].
    pub fn end(&mut self, id: u64) -> bool {
        match self.get(id) {
            Some(c) if c.state == State::Open => c.ending = true,
            _ => return false,
        }
        self.close(id, None)
    }

    pub fn pause_recv(&mut self, id: u64, paused: bool) -> bool {
        let Some(conn) = self.get(id) else {
            return false;
        };
        if conn.state != State::Open {
            return false;
        }
        let was = std::mem::replace(&mut conn.paused, paused);
        if was && !paused {
            // Edge-triggered: nothing wakes us for data that already waited.
            self.resumed.push(id);
        }
        true
    }

    pub fn set_max_send_buffer(&mut self, id: u64, bytes: usize) -> bool {
        match self.get(id) {
            Some(c) => {
                c.max_send = bytes.max(1);
                true
            }
            None => false,
        }
    }

    /// The peer's address for log lines ("" when unknown).
    pub fn peer(&mut self, id: u64) -> String {
        self.get(id)
            .and_then(|c| c.remote)
            .map(|a| a.to_string())
            .unwrap_or_default()
    }

    pub fn conn_info(&mut self, id: u64) -> RawConnInfo {
        let none = plugin_api::to_raw_addr(None);
        match self.get(id) {
            Some(c) if c.state == State::Open => RawConnInfo {
                open: true,
                remote: plugin_api::to_raw_addr(c.remote),
                local: plugin_api::to_raw_addr(c.local),
                bytes_read: c.bytes_read,
                bytes_written: c.bytes_written,
                send_queue: c.pending() as u64,
                recv_queue: c.inbuf.len() as u64,
                paused: c.paused,
            },
            _ => RawConnInfo {
                open: false,
                remote: none,
                local: none,
                bytes_read: 0,
                bytes_written: 0,
                send_queue: 0,
                recv_queue: 0,
                paused: false,
            },
        }
    }

    /// Open connections the plugin knows (websocket handshakes done).
    pub fn open_ids(&self) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.state == State::Open && c.established())
            .map(|(_, c)| c.id)
            .collect()
    }

    /// Closes at once, dropping whatever is queued.
    pub fn destroy(&mut self, id: u64) {
        if let Some(conn) = self.get(id) {
            if conn.state == State::Dead {
                return;
            }
            // Not yet queued for teardown unless it was closing with nothing left.
            let first = conn.state != State::Closing || conn.pending() > 0;
            conn.state = State::Closing;
            conn.discard_output();
            if first {
                self.closing.push(id);
            }
        }
    }

    /// Flushes a connection's send buffer after a writable event.
    pub fn flush(&mut self, id: u64) {
        let Some(conn) = lookup(&mut self.conns, id) else {
            return;
        };
        if conn.frozen {
            return;
        }
        match conn.flush() {
            Ok(true) => {
                if conn.full {
                    conn.full = false;
                    self.deferred.push_back(Deferred::BufferDrain(id));
                }
                if conn.state == State::Closing {
                    self.finish_close(id);
                }
                self.pipe_drained(id);
            }
            Ok(false) => {}
            Err(e) => {
                tracing::debug!(conn = id, "write failed: {e}");
                self.destroy(id);
            }
        }
    }
}

/// Why a send to `conn` is refused before any encoding, if it is: closed
/// (outbound connections take sends while they connect), or its send
/// buffer at `max_send_buffer_size`.
#[inline(always)]
fn refusal(conn: &Conn) -> Option<(RawSendStatus, &'static str)> {
    let open = matches!(conn.state, State::Open | State::Connecting);
    if !open || !conn.codec.sendable() {
        return Some((RawSendStatus::Closed, "client closed"));
    }
    if conn.pending() >= conn.max_send {
        return Some((RawSendStatus::Dropped, "send buffer full and drop package"));
    }
    None
}
