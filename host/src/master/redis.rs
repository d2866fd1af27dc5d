//! The bus across hosts through Redis (`[bus] backend = "redis://…"`).
//!
//! Two threads own the Redis connections; the master's loop never blocks
//! on Redis. It hands what its relay read (`relay::Outgoing`) to the
//! *writer* through a channel bounded in bytes; the writer keeps this
//! host's membership hash and publishes the frames on one channel, in
//! order, with a heartbeat. The *subscriber* reads that channel (and, on
//! each (re)connect, every live host's membership hash first) into an inbox
//! bounded in bytes, and wakes the loop with the mio waker; the loop renames
//! other hosts' gids (`cluster::Remotes`) and injects their frames into the
//! relay as if from a local worker.
//!
//! Redis down: local traffic is untouched; deliveries for other hosts are
//! dropped and counted; both threads reconnect with backoff (100 ms
//! doubling to 5 s); once the writer is back the loop hands it this host's
//! memberships again (`Resync`), which it writes and publishes as a
//! `Reset`; the subscriber re-reads every host's hash. Other hosts not
//! heard of for `host_ttl` are dropped with their members.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::relay::{Outgoing, Relay};
use crate::bus::BusMsg;
use crate::cluster::{self, Body, HashOp, Remotes, Wire};
use crate::config::BusConfig;
use crate::ipc::BusReport;

/// Bytes handed to the writer and not yet written, at most; past it
/// deliveries are dropped (and counted) and memberships sent again later.
pub const MAX_QUEUE: usize = 16 << 20;
/// Bytes read from Redis and not yet taken by the loop, at most; past it the
/// subscriber drops what it reads (counted) and reconnects, re-reading the
/// hashes.
pub const MAX_INBOX: usize = 64 << 20;
/// One PUBLISH carries at most about this much.
const MAX_PUBLISH: usize = 1 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

enum Cmd {
    Frames(Outgoing),
    /// This host's memberships, all of them.
    Resync(Vec<BusMsg>),
    /// Leave the cluster cleanly, then say so.
    Stop(Sender<()>),
}

enum Inbound {
    Wire(Vec<u8>),
    /// Every other live host's memberships, read after subscribing.
    Snapshot(Vec<(u64, Vec<BusMsg>)>),
}

#[derive(Default)]
struct Inbox {
    items: VecDeque<Inbound>,
    bytes: usize,
}

struct Shared {
    inbox: Mutex<Inbox>,
    /// Bytes handed to the writer, not yet written (or dropped).
    queued: AtomicUsize,
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    disconnects: AtomicU64,
    /// Bumped on every writer (re)connect; `writer_up` after it.
    writer_epoch: AtomicU64,
    writer_up: AtomicBool,
    sub_up: AtomicBool,
    /// Why the last (re)connect failed, for `status`; empty once one works.
    last_error: Mutex<String>,
    /// That failure was Redis refusing our credentials.
    auth_failed: AtomicBool,
    stopping: AtomicBool,
    waker: Arc<mio::Waker>,
}

struct Names {
    host: u64,
    channel: String,
    hosts: String,
    ns: String,
}

impl Names {
    fn members(&self, host: u64) -> String {
        format!("{}:members:{host:016x}", self.ns)
    }
    fn alive(&self, host: u64) -> String {
        format!("{}:alive:{host:016x}", self.ns)
    }
}

/// The master's side: the channel to the writer, the inbox, the names of
/// other hosts' nodes.
pub struct RedisBus {
    cfg: BusConfig,
    host: u64,
    tx: Sender<Cmd>,
    shared: Arc<Shared>,
    remotes: Remotes,
    /// The writer epoch this host's memberships were last handed over in.
    synced: Option<u64>,
    next_check: Instant,
}

impl RedisBus {
    /// Starts the two threads (they connect on their own, with backoff).
    pub fn start(cfg: &BusConfig, waker: Arc<mio::Waker>) -> std::io::Result<RedisBus> {
        let url = cfg.redis.clone().expect("a redis backend");
        let client = client(cfg).map_err(std::io::Error::other)?;
        let host = cluster::random_host_id();
        let shared = Arc::new(Shared {
            inbox: Mutex::default(),
            queued: AtomicUsize::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            writer_epoch: AtomicU64::new(0),
            writer_up: AtomicBool::new(false),
            sub_up: AtomicBool::new(false),
            last_error: Mutex::default(),
            auth_failed: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            waker,
        });
        let names = || Names {
            host,
            channel: format!("{}:bus", cfg.namespace),
            hosts: format!("{}:hosts", cfg.namespace),
            ns: cfg.namespace.clone(),
        };
        let (tx, rx) = mpsc::channel();
        let (c, s, n, b) = (client.clone(), shared.clone(), names(), cfg.clone());
        std::thread::Builder::new()
            .name("redis-writer".into())
            .spawn(move || writer(c, rx, s, n, b))?;
        let (c, s, n, b) = (client, shared.clone(), names(), cfg.clone());
        std::thread::Builder::new()
            .name("redis-subscriber".into())
            .spawn(move || subscriber(c, s, n, b))?;
        tracing::info!(
            backend = %cluster::redact(&url),
            host = format!("{host:016x}"),
            "bus: redis backend"
        );
        Ok(RedisBus {
            cfg: cfg.clone(),
            host,
            tx,
            shared,
            remotes: Remotes::default(),
            synced: None,
            next_check: Instant::now() + cfg.heartbeat,
        })
    }

    /// What the relay read, for the other hosts: to the writer, unless
    /// Redis is down or too far behind (deliveries are then dropped and
    /// counted; memberships are handed over whole once it is back).
    pub fn forward(&mut self, out: Outgoing) {
        let epoch = self.shared.writer_epoch.load(SeqCst);
        let up = self.shared.writer_up.load(SeqCst) && self.synced == Some(epoch);
        let len = out.bytes.len();
        if !up || self.shared.queued.load(SeqCst) + len > MAX_QUEUE {
            self.shared.dropped.fetch_add(out.deliveries, SeqCst);
            self.synced = None;
            return;
        }
        self.shared.queued.fetch_add(len, SeqCst);
        let _ = self.tx.send(Cmd::Frames(out));
    }

    /// Hands this host's memberships to a writer that (re)connected or
    /// caught up.
    fn maintain(&mut self, relay: &Relay) {
        if !self.shared.writer_up.load(SeqCst) {
            self.synced = None;
            return;
        }
        let epoch = self.shared.writer_epoch.load(SeqCst);
        if self.synced == Some(epoch) || self.shared.queued.load(SeqCst) > MAX_QUEUE / 2 {
            return;
        }
        self.synced = Some(epoch);
        let _ = self.tx.send(Cmd::Resync(relay.local_snapshot()));
    }

    /// The waker: what the subscriber read goes to the workers.
    pub fn on_wake(&mut self, relay: &mut Relay, now: Instant) {
        let items = {
            let mut inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
            inbox.bytes = 0;
            std::mem::take(&mut inbox.items)
        };
        let mut msgs = Vec::new();
        for item in items {
            match item {
                Inbound::Wire(bytes) => self.on_wire(&bytes, now, &mut msgs),
                Inbound::Snapshot(hosts) => {
                    for h in self.remotes.known() {
                        if !hosts.iter().any(|(k, _)| *k == h) {
                            msgs.extend(self.remotes.drop_host(h));
                        }
                    }
                    for (h, members) in hosts {
                        msgs.extend(self.remotes.drop_host(h));
                        self.remotes.seen(h, now);
                        for m in members {
                            msgs.push(self.remotes.translate(h, m));
                        }
                    }
                }
            }
        }
        relay.inject(&msgs, now);
        self.maintain(relay);
    }

    fn on_wire(&mut self, bytes: &[u8], now: Instant, msgs: &mut Vec<BusMsg>) {
        let wire = match Wire::decode(bytes) {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("bus: bad message from redis: {e}");
                return;
            }
        };
        if wire.host == self.host {
            return;
        }
        let host = wire.host;
        if wire.body == Body::Bye {
            msgs.extend(self.remotes.drop_host(host));
            return;
        }
        self.remotes.seen(host, now);
        match wire.body {
            Body::Frames(frames) => {
                for f in cluster::split_frames(&frames) {
                    match crate::bus::decode(f) {
                        Ok(m) => msgs.push(self.remotes.translate(host, m)),
                        Err(e) => tracing::warn!("bus: bad frame from host {host:016x}: {e}"),
                    }
                    self.shared.received.fetch_add(1, SeqCst);
                }
            }
            Body::Reset(members) => {
                msgs.extend(self.remotes.drop_host(host));
                self.remotes.seen(host, now);
                for m in members {
                    msgs.push(self.remotes.translate(host, m));
                }
            }
            Body::Heartbeat | Body::Bye => {}
        }
    }

    /// Every `heartbeat`: hosts not heard of for `host_ttl` are gone.
    pub fn on_time(&mut self, relay: &mut Relay, now: Instant) {
        if now < self.next_check {
            return;
        }
        self.next_check = now + self.cfg.heartbeat;
        let mut msgs = Vec::new();
        for h in self.remotes.expired(now, self.cfg.host_ttl) {
            tracing::info!(
                "bus: host {h:016x} not heard of for {:?}: its members are gone",
                self.cfg.host_ttl
            );
            msgs.extend(self.remotes.drop_host(h));
        }
        relay.inject(&msgs, now);
        self.maintain(relay);
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        Some(self.next_check)
    }

    pub fn report(&self) -> BusReport {
        let s = &self.shared;
        let up = s.writer_up.load(SeqCst) && s.sub_up.load(SeqCst);
        let state = match (up, s.auth_failed.load(SeqCst)) {
            (true, _) => "connected",
            (false, true) => "auth failed",
            (false, false) => "reconnecting",
        };
        let error = match up {
            true => String::new(),
            false => s
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        };
        BusReport {
            backend: cluster::redact(self.cfg.redis.as_deref().unwrap_or("")),
            state: state.to_string(),
            error,
            host_id: format!("{:016x}", self.host),
            peers: self.remotes.hosts() as u64,
            sent: s.sent.load(SeqCst),
            received: s.received.load(SeqCst),
            dropped: s.dropped.load(SeqCst),
            disconnects: s.disconnects.load(SeqCst),
            backlog_bytes: s.queued.load(SeqCst) as u64,
        }
    }

    /// Leaves the cluster: the writer removes this host's keys and says
    /// `Bye` (waits a second at most: Redis may be down).
    pub fn stop(&mut self) {
        self.shared.stopping.store(true, SeqCst);
        let (ack, done) = mpsc::channel();
        if self.tx.send(Cmd::Stop(ack)).is_ok() {
            let _ = done.recv_timeout(Duration::from_secs(1));
        }
    }
}

/// The Redis client of `[bus]`: the URL, and for `rediss://` the CA,
/// certificate and key files if given (read now: an unreadable one is an
/// error naming its key and file, at start and in `wm-host check`).
pub fn client(cfg: &BusConfig) -> Result<redis::Client, String> {
    let url = cfg.redis.as_deref().unwrap_or_default();
    let bad = |e: redis::RedisError| format!("[bus] backend {}: {e}", cluster::redact(url));
    let t = &cfg.tls;
    if t.ca.is_none() && t.cert.is_none() {
        return redis::Client::open(url).map_err(bad);
    }
    #[cfg(feature = "redis-tls")]
    {
        let read = |key: &str, p: &std::path::Path| {
            std::fs::read(p).map_err(|e| format!("[bus] {key} {}: {e}", p.display()))
        };
        let root_cert = match &t.ca {
            Some(p) => Some(read("ca", p)?),
            None => None,
        };
        let client_tls = match (&t.cert, &t.key) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: read("cert", c)?,
                client_key: read("key", k)?,
            }),
            _ => None,
        };
        let certs = redis::TlsCertificates {
            client_tls,
            root_cert,
        };
        redis::Client::build_with_tls(url, certs).map_err(bad)
    }
    #[cfg(not(feature = "redis-tls"))]
    Err("[bus] ca, cert, key: this wm-host was built without the `redis-tls` feature".to_string())
}

fn connect(client: &redis::Client) -> redis::RedisResult<redis::Connection> {
    let mut con = client.get_connection_with_timeout(CONNECT_TIMEOUT)?;
    con.set_read_timeout(Some(IO_TIMEOUT))?;
    con.set_write_timeout(Some(IO_TIMEOUT))?;
    // A Redis with `requirepass` accepts a connection without a password
    // and refuses every command after: find out now, not at the first
    // PUBLISH.
    redis::cmd("PING").query::<()>(&mut con)?;
    Ok(con)
}

/// Keeps why a (re)connect failed for `status`.
fn note_error(shared: &Shared, e: &redis::RedisError) {
    let auth = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS"));
    shared.auth_failed.store(auth, SeqCst);
    *shared.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e.to_string();
}

/// Sleeps `d` unless stopping; false if stopping.
fn pause(shared: &Shared, d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if shared.stopping.load(SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20).min(d));
    }
    !shared.stopping.load(SeqCst)
}

/// Drops what waits in the channel (Redis is down): deliveries counted.
fn discard(rx: &Receiver<Cmd>, shared: &Shared) -> Option<Sender<()>> {
    while let Ok(cmd) = rx.try_recv() {
        match cmd {
            Cmd::Frames(out) => {
                shared.queued.fetch_sub(out.bytes.len(), SeqCst);
                shared.dropped.fetch_add(out.deliveries, SeqCst);
            }
            Cmd::Resync(_) => {}
            Cmd::Stop(ack) => return Some(ack),
        }
    }
    None
}

fn writer(client: redis::Client, rx: Receiver<Cmd>, shared: Arc<Shared>, n: Names, cfg: BusConfig) {
    let ttl_ms = cfg.host_ttl.as_millis() as u64;
    let members = n.members(n.host);
    let alive = n.alive(n.host);
    let hex = format!("{:016x}", n.host);
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        let mut con = match connect(&client) {
            Ok(c) => c,
            Err(e) => {
                note_error(&shared, &e);
                if !failing {
                    tracing::warn!("bus: cannot reach redis: {e}; retrying with backoff");
                    failing = true;
                }
                if let Some(ack) = discard(&rx, &shared) {
                    let _ = ack.send(());
                    return;
                }
                pause(&shared, backoff);
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        if failing {
            tracing::info!("bus: redis reachable again");
        }
        failing = false;
        backoff = BACKOFF_MIN;
        shared.auth_failed.store(false, SeqCst);
        shared
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        shared.writer_epoch.fetch_add(1, SeqCst);
        shared.writer_up.store(true, SeqCst);
        let _ = shared.waker.wake();
        let mut next_beat = Instant::now();
        let lost = loop {
            let wait = next_beat.saturating_duration_since(Instant::now());
            let mut batch = Vec::new();
            match rx.recv_timeout(wait) {
                Ok(cmd) => {
                    batch.push(cmd);
                    while batch.len() < 4096 {
                        match rx.try_recv() {
                            Ok(c) => batch.push(c),
                            Err(_) => break,
                        }
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let mut pipe = redis::pipe();
            let mut chunk = Vec::new();
            let (mut bytes, mut frames, mut deliveries) = (0, 0, 0);
            let mut stop = None;
            let publish = |pipe: &mut redis::Pipeline, body: Body| {
                let w = Wire { host: n.host, body };
                pipe.cmd("PUBLISH").arg(&n.channel).arg(w.encode()).ignore();
            };
            for cmd in batch {
                match cmd {
                    Cmd::Frames(out) => {
                        bytes += out.bytes.len();
                        frames += out.frames;
                        deliveries += out.deliveries;
                        for op in out.ops {
                            match op {
                                HashOp::Set(f, v) => pipe.hset(&members, f, v).ignore(),
                                HashOp::Del(f) => pipe.hdel(&members, f).ignore(),
                            };
                        }
                        chunk.extend_from_slice(&out.bytes);
                        if chunk.len() >= MAX_PUBLISH {
                            publish(&mut pipe, Body::Frames(std::mem::take(&mut chunk)));
                        }
                    }
                    Cmd::Resync(msgs) => {
                        if !chunk.is_empty() {
                            publish(&mut pipe, Body::Frames(std::mem::take(&mut chunk)));
                        }
                        pipe.del(&members).ignore();
                        for part in cluster::hash_of(&msgs).chunks(1000) {
                            pipe.hset_multiple(&members, part).ignore();
                        }
                        pipe.pexpire(&members, ttl_ms as i64).ignore();
                        publish(&mut pipe, Body::Reset(msgs));
                    }
                    Cmd::Stop(ack) => {
                        stop = Some(ack);
                        break;
                    }
                }
            }
            if !chunk.is_empty() {
                publish(&mut pipe, Body::Frames(chunk));
            }
            if let Some(ack) = stop {
                pipe.del(&members).ignore();
                pipe.del(&alive).ignore();
                pipe.srem(&n.hosts, &hex).ignore();
                publish(&mut pipe, Body::Bye);
                let _ = pipe.query::<()>(&mut con);
                let _ = ack.send(());
                return;
            }
            if Instant::now() >= next_beat {
                next_beat = Instant::now() + cfg.heartbeat;
                pipe.cmd("SET")
                    .arg(&alive)
                    .arg(1)
                    .arg("PX")
                    .arg(ttl_ms)
                    .ignore();
                pipe.pexpire(&members, ttl_ms as i64).ignore();
                pipe.sadd(&n.hosts, &hex).ignore();
                publish(&mut pipe, Body::Heartbeat);
            }
            let result = pipe.query::<()>(&mut con);
            shared.queued.fetch_sub(bytes, SeqCst);
            match result {
                Ok(()) => {
                    shared.sent.fetch_add(frames, SeqCst);
                }
                Err(e) => {
                    shared.dropped.fetch_add(deliveries, SeqCst);
                    break e;
                }
            }
        };
        note_error(&shared, &lost);
        tracing::warn!("bus: lost redis (writer): {lost}; reconnecting");
        shared.writer_up.store(false, SeqCst);
        shared.disconnects.fetch_add(1, SeqCst);
        let _ = shared.waker.wake();
        if let Some(ack) = discard(&rx, &shared) {
            let _ = ack.send(());
            return;
        }
        pause(&shared, backoff);
    }
}

/// Reads every other live host's memberships (dead hosts leave the set).
fn read_hosts(
    con: &mut redis::Connection,
    n: &Names,
) -> redis::RedisResult<Vec<(u64, Vec<BusMsg>)>> {
    let hosts: Vec<String> = redis::cmd("SMEMBERS").arg(&n.hosts).query(con)?;
    let mut out = Vec::new();
    for hex in hosts {
        let Ok(h) = u64::from_str_radix(&hex, 16) else {
            continue;
        };
        if h == n.host {
            continue;
        }
        let alive: bool = redis::cmd("EXISTS").arg(n.alive(h)).query(con)?;
        if !alive {
            redis::cmd("SREM")
                .arg(&n.hosts)
                .arg(&hex)
                .query::<()>(con)?;
            continue;
        }
        let fields: HashMap<Vec<u8>, Vec<u8>> =
            redis::cmd("HGETALL").arg(n.members(h)).query(con)?;
        let msgs = fields
            .iter()
            .filter_map(|(f, v)| cluster::msg_of(f, v))
            .collect();
        out.push((h, msgs));
    }
    Ok(out)
}

fn push(shared: &Shared, item: Inbound, len: usize) -> bool {
    let mut inbox = shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
    if inbox.bytes + len > MAX_INBOX {
        return false;
    }
    let was_empty = inbox.items.is_empty();
    inbox.bytes += len;
    inbox.items.push_back(item);
    drop(inbox);
    if was_empty {
        let _ = shared.waker.wake();
    }
    true
}

fn subscriber(client: redis::Client, shared: Arc<Shared>, n: Names, cfg: BusConfig) {
    let mut backoff = BACKOFF_MIN;
    let mut failing = false;
    loop {
        if shared.stopping.load(SeqCst) {
            return;
        }
        let result = (|| -> redis::RedisResult<()> {
            let mut con = connect(&client)?;
            let mut reads = connect(&client)?;
            let mut ps = con.as_pubsub();
            ps.subscribe(&n.channel)?;
            // Our own heartbeat comes every `heartbeat`: silence for
            // `host_ttl` means the connection is dead.
            ps.set_read_timeout(Some(cfg.host_ttl))?;
            // Subscribed first, then read: what changes meanwhile comes
            // again on the channel, after the snapshot.
            let hosts = read_hosts(&mut reads, &n)?;
            drop(reads);
            push(&shared, Inbound::Snapshot(hosts), 0);
            shared.sub_up.store(true, SeqCst);
            backoff = BACKOFF_MIN;
            loop {
                let msg = ps.get_message()?;
                let payload = msg.get_payload_bytes().to_vec();
                let len = payload.len();
                if !push(&shared, Inbound::Wire(payload), len) {
                    shared.dropped.fetch_add(1, SeqCst);
                    tracing::warn!(
                        "bus: more than {MAX_INBOX} bytes from redis wait; resubscribing"
                    );
                    return Ok(());
                }
            }
        })();
        let was_up = shared.sub_up.swap(false, SeqCst);
        if shared.stopping.load(SeqCst) {
            return;
        }
        if let Err(e) = result {
            note_error(&shared, &e);
            // Once per outage (a wrong password would repeat it every 5 s);
            // `status` keeps the latest error.
            if was_up || !failing {
                tracing::warn!("bus: lost redis (subscriber): {e}; reconnecting");
            }
            failing = true;
        }
        let _ = shared.waker.wake();
        if !pause(&shared, backoff) {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
