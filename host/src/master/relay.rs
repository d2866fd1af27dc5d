//! The bus relay: every frame a worker sends (group and uid changes,
//! broadcasts, publishes) goes, in order, to every other worker; membership
//! changes also update the master's registry, which a worker that starts
//! receives first.
//!
//! A worker that does not read its bus cannot make the master hold without
//! bound what is owed to it: past `MAX_PENDING` bytes waiting for one
//! worker, further frames for it are dropped and counted (per worker and per
//! group, for `status`). A ready worker that has taken nothing of its backlog
//! for its group's `stuck_timeout` is reported stuck (once per episode); the
//! supervisor decides what to do with it. A worker that sends a frame over
//! `bus::MAX_FRAME` has its bus closed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mio::net::UnixStream;
use mio::{Interest, Registry, Token};

use super::supervisor::WorkerId;
use crate::bus::{self, BusBuf, BusMsg};
use crate::cluster::{self, HashOp};

/// Bytes that may wait for one worker before frames for it are dropped.
pub const MAX_PENDING: usize = 64 << 20;

struct Peer {
    stream: UnixStream,
    buf: BusBuf,
    pid: u32,
    group: usize,
    stuck_timeout: Duration,
    /// It reads its bus from now on (before, it may be in `on_worker_start`,
    /// which `start_timeout` covers).
    ready: bool,
    /// Bytes have waited since then without the worker taking any.
    waiting_since: Option<Instant>,
    /// Reported stuck; not again until it takes something.
    reported: bool,
    /// Frames dropped because this worker's buffer was full.
    dropped: u64,
    /// Dropped since its buffer was last below the bound (one log line each way).
    dropping: u64,
    /// Nothing more is queued for it: it sent a frame over the limit, or its
    /// socket failed (it is dying; its exit is reaped soon).
    closed: bool,
    /// The nodes (gid pids) whose connections it holds: its own, and those
    /// of workers that handed their connections over to it.
    nodes: Vec<u32>,
}

impl Peer {
    /// Queues a whole frame, or drops it at the bound (never part of one:
    /// the worker would lose the framing). True if it was dropped.
    fn push(&mut self, frame: &[u8]) -> bool {
        if self.closed {
            return false;
        }
        if self.buf.outbuf.len() + frame.len() > MAX_PENDING {
            self.dropped += 1;
            self.dropping += 1;
            if self.dropping == 1 {
                tracing::warn!(
                    pid = self.pid,
                    "bus: worker is not reading; {} bytes wait for it, further messages for it are dropped",
                    self.buf.outbuf.len()
                );
            }
            return true;
        }
        self.buf.outbuf.extend_from_slice(frame);
        false
    }

    fn flush(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        let before = self.buf.outbuf.len();
        if let Err(e) = self.buf.flush(&mut self.stream) {
            tracing::debug!(
                pid = self.pid,
                "bus write failed: {e}; nothing more is queued for it"
            );
            self.close();
            return;
        }
        let after = self.buf.outbuf.len();
        if after == 0 {
            self.waiting_since = None;
            self.reported = false;
        } else if after < before {
            self.waiting_since = Some(now);
            self.reported = false;
        } else if self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
        if after == 0 && self.dropping > 0 {
            tracing::info!(
                pid = self.pid,
                "bus: worker reads again; {} messages for it were dropped",
                self.dropping
            );
            self.dropping = 0;
        }
    }

    fn close(&mut self) {
        self.closed = true;
        self.buf.outbuf = Vec::new();
        self.waiting_since = None;
    }

    /// When it counts as stuck, if nothing changes.
    fn stuck_at(&self) -> Option<Instant> {
        if !self.ready || self.closed || self.reported {
            return None;
        }
        Some(self.waiting_since? + self.stuck_timeout)
    }
}

/// A handover between two workers, from the cut until the new one says
/// it is over.
struct Handover {
    from: WorkerId,
    to: WorkerId,
    /// The old worker's `Exported` marker came: its later sends are for
    /// the new one to deliver too.
    exported: bool,
}

#[derive(Default)]
pub struct Relay {
    peers: BTreeMap<WorkerId, Peer>,
    handovers: Vec<Handover>,
    /// Group membership across workers, to hand to workers that start.
    registry: bus::Registry,
    /// Frames dropped per group since start, workers gone included.
    group_dropped: BTreeMap<usize, u64>,
    /// With a Redis bus: what goes to the other hosts (see `Outgoing`).
    forward: Option<Outgoing>,
}

/// What the relay read from its workers (and the departures it made)
/// since last taken, for the other hosts.
#[derive(Debug, Default)]
pub struct Outgoing {
    /// Bus frames, in order.
    pub bytes: Vec<u8>,
    pub frames: u64,
    /// Of them, deliveries and publishes (what counts as dropped when they
    /// cannot be sent).
    pub deliveries: u64,
    /// The changes they make to this host's membership hash.
    pub ops: Vec<HashOp>,
}

/// A worker's end of the bus, as the relay is told of it.
pub struct Attach {
    pub worker: WorkerId,
    pub group: usize,
    pub pid: u32,
    pub stream: UnixStream,
    pub token: Token,
    /// A ready worker that takes nothing of its backlog for this long is stuck.
    pub stuck_timeout: Duration,
}

impl Relay {
    /// A worker started: it learns who is in which group before anything else.
    pub fn add(&mut self, a: Attach, registry: &Registry, now: Instant) -> std::io::Result<()> {
        let Attach {
            worker,
            group,
            pid,
            mut stream,
            token,
            stuck_timeout,
        } = a;
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let mut peer = Peer {
            stream,
            buf: BusBuf::default(),
            pid,
            group,
            stuck_timeout,
            ready: false,
            waiting_since: None,
            reported: false,
            dropped: 0,
            dropping: 0,
            closed: false,
            nodes: vec![pid],
        };
        // Not bounded: without it the worker's view of the groups is wrong.
        for msg in self.registry.snapshot() {
            bus::encode(&msg, &mut peer.buf.outbuf);
        }
        peer.flush(now);
        self.peers.insert(worker, peer);
        Ok(())
    }

    /// The worker is ready: from now on it reads its bus, and a backlog it
    /// does not take counts towards `stuck_timeout`.
    pub fn ready(&mut self, worker: WorkerId, now: Instant) {
        if let Some(p) = self.peers.get_mut(&worker) {
            p.ready = true;
            if p.waiting_since.is_some() {
                p.waiting_since = Some(now);
            }
        }
    }

    /// The worker exited: the others learn its connections are gone.
    pub fn remove(&mut self, worker: WorkerId, registry: &Registry, now: Instant) {
        let Some(mut peer) = self.peers.remove(&worker) else {
            return;
        };
        // Already deregistered if its bus was closed for an oversize frame.
        let _ = registry.deregister(&mut peer.stream);
        self.handovers
            .retain(|h| h.from != worker && h.to != worker);
        let mut frame = Vec::new();
        for node in peer.nodes {
            let msg = BusMsg::NodeGone { node };
            if let Some(out) = self.forward.as_mut() {
                cluster::hash_ops(&self.registry, &msg, &mut out.ops);
                bus::encode(&msg, &mut out.bytes);
                out.frames += 1;
            }
            self.registry.apply(&msg);
            bus::encode(&msg, &mut frame);
        }
        if frame.is_empty() {
            return;
        }
        for p in self.peers.values_mut() {
            if p.push(&frame) {
                *self.group_dropped.entry(p.group).or_default() += 1;
            }
            p.flush(now);
        }
    }

    /// A handover begins: both workers get a `Cut` at this point of the
    /// order. Until the old one's `Exported`, its deliveries and publishes
    /// are not relayed to the new one: it delivered them to the exported
    /// connections itself, and its exported state has its publishes.
    pub fn cut(&mut self, from: WorkerId, to: WorkerId, now: Instant) {
        let mut frame = Vec::new();
        bus::encode(&BusMsg::Cut, &mut frame);
        for w in [from, to] {
            if let Some(p) = self.peers.get_mut(&w) {
                // Never dropped: without it the handover would hang.
                p.buf.outbuf.extend_from_slice(&frame);
                p.flush(now);
            }
        }
        self.handovers.retain(|h| h.to != to);
        self.handovers.push(Handover {
            from,
            to,
            exported: false,
        });
    }

    /// The new worker finished its handover: when it took connections,
    /// it holds the old worker's nodes from now on (their gids live on),
    /// so the old worker's exit does not end them.
    pub fn handed_over(&mut self, to: WorkerId, took_any: bool) {
        let Some(i) = self.handovers.iter().position(|h| h.to == to) else {
            return;
        };
        let h = self.handovers.remove(i);
        if !took_any {
            return;
        }
        let nodes = match self.peers.get_mut(&h.from) {
            Some(p) => std::mem::take(&mut p.nodes),
            None => return,
        };
        if let Some(p) = self.peers.get_mut(&to) {
            p.nodes.extend(nodes);
        }
    }

    /// The worker's bus socket is readable or writable: relays what it sent,
    /// in order, to every other worker, and writes what is owed to it.
    pub fn on_event(&mut self, worker: WorkerId, registry: &Registry, now: Instant) {
        let Some(p) = self.peers.get_mut(&worker) else {
            return;
        };
        if p.closed {
            return;
        }
        let (frames, _closed) = p.buf.read_frames(&mut p.stream);
        if let Some(size) = p.buf.overflowed() {
            // What it sent before still goes out; nothing after.
            tracing::error!(
                pid = p.pid,
                "bus: worker sent a frame of {size} bytes, over the limit of {} bytes; closing its bus",
                bus::MAX_FRAME
            );
            let _ = registry.deregister(&mut p.stream);
            let _ = p.stream.shutdown(std::net::Shutdown::Both);
            p.close();
        } else {
            p.flush(now);
        }
        if frames.is_empty() {
            return;
        }
        // A handover's old worker: deliveries up to its `Exported` are
        // kept from its replacement, the marker itself from everyone.
        let mut held_from = None;
        let mut frames = frames;
        if let Some(h) = self.handovers.iter_mut().find(|h| h.from == worker) {
            if let Some(i) = frames.iter().position(|f| bus::is_exported(f)) {
                frames.remove(i);
                if !h.exported {
                    held_from = Some((h.to, i));
                }
                h.exported = true;
            } else if !h.exported {
                held_from = Some((h.to, frames.len()));
            }
        }
        for f in &frames {
            if let Some(out) = self.forward.as_mut() {
                out.bytes.extend_from_slice(f);
                out.frames += 1;
                if bus::is_delivery(f) || bus::is_publish(f) {
                    out.deliveries += 1;
                }
            }
            // Only membership changes matter to the master's registry; the
            // payload of a broadcast is not decoded.
            if bus::is_membership(f) {
                if let Ok(msg) = bus::decode(f) {
                    if let Some(out) = self.forward.as_mut() {
                        cluster::hash_ops(&self.registry, &msg, &mut out.ops);
                    }
                    self.registry.apply(&msg);
                }
            }
        }
        for (&k, other) in &mut self.peers {
            if k == worker {
                continue;
            }
            let mut dropped = 0;
            for (i, f) in frames.iter().enumerate() {
                let held = held_from.is_some_and(|(to, end)| to == k && i < end);
                // The old worker delivered these and ran their `on_publish`
                // before it exported: the new one has them in what it imports.
                if held && (bus::is_delivery(f) || bus::is_publish(f)) {
                    continue;
                }
                dropped += u64::from(other.push(f));
            }
            if dropped > 0 {
                *self.group_dropped.entry(other.group).or_default() += dropped;
            }
            other.flush(now);
        }
    }

    /// From now on, what workers send is also kept for other hosts.
    pub fn forward_to_hosts(&mut self) {
        self.forward.get_or_insert_with(Outgoing::default);
    }

    /// What to send to other hosts since last taken (none without Redis).
    pub fn take_forward(&mut self) -> Option<Outgoing> {
        let out = self.forward.as_mut()?;
        if out.frames == 0 {
            return None;
        }
        Some(std::mem::take(out))
    }

    /// This host's own memberships, as messages that rebuild them.
    pub fn local_snapshot(&self) -> Vec<BusMsg> {
        let mut v = self.registry.snapshot();
        v.retain(|m| match m {
            BusMsg::Join { conn, .. } | BusMsg::Bind { conn, .. } => cluster::is_local(*conn),
            _ => false,
        });
        v
    }

    /// Frames from another host (gids already renamed): every worker gets
    /// them, in order, as from a worker of its own.
    pub fn inject(&mut self, msgs: &[BusMsg], now: Instant) {
        let mut wire = Vec::new();
        for m in msgs {
            if matches!(m, BusMsg::NodeGone { node: 0 }) {
                continue;
            }
            self.registry.apply(m);
            bus::encode(m, &mut wire);
        }
        if wire.is_empty() {
            return;
        }
        let frames = cluster::split_frames(&wire);
        for other in self.peers.values_mut() {
            let mut dropped = 0;
            for f in &frames {
                dropped += u64::from(other.push(f));
            }
            if dropped > 0 {
                *self.group_dropped.entry(other.group).or_default() += dropped;
            }
            other.flush(now);
        }
    }

    /// Ready workers whose backlog has not moved for their `stuck_timeout`,
    /// with why; each is reported once until it takes something again.
    pub fn stuck(&mut self, now: Instant) -> Vec<(WorkerId, String)> {
        let mut out = Vec::new();
        for (&k, p) in &mut self.peers {
            if p.stuck_at().is_some_and(|t| t <= now) {
                p.reported = true;
                out.push((
                    k,
                    format!(
                        "its bus took nothing for {:?} ({} bytes waiting, {} messages dropped)",
                        p.stuck_timeout,
                        p.buf.outbuf.len(),
                        p.dropped
                    ),
                ));
            }
        }
        out
    }

    /// When `stuck` may next have something to report.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.peers.values().filter_map(Peer::stuck_at).min()
    }

    /// Frames dropped for a worker so far.
    pub fn dropped(&self, worker: WorkerId) -> u64 {
        self.peers.get(&worker).map_or(0, |p| p.dropped)
    }

    /// Bus bytes waiting for a worker to read them.
    pub fn backlog(&self, worker: WorkerId) -> u64 {
        self.peers
            .get(&worker)
            .map_or(0, |p| p.buf.outbuf.len() as u64)
    }

    /// Frames dropped for a group's workers since start.
    pub fn group_dropped(&self, group: usize) -> u64 {
        self.group_dropped.get(&group).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream as StdStream;

    use mio::Poll;

    const STUCK: Duration = Duration::from_secs(10);

    fn pair() -> (UnixStream, StdStream) {
        let (ours, theirs) = StdStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        theirs
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (UnixStream::from_std(ours), theirs)
    }

    fn frame(msg: &BusMsg) -> Vec<u8> {
        let mut v = Vec::new();
        bus::encode(msg, &mut v);
        v
    }

    struct F {
        poll: Poll,
        relay: Relay,
        now: Instant,
    }

    impl F {
        fn new() -> F {
            F {
                poll: Poll::new().unwrap(),
                relay: Relay::default(),
                now: Instant::now(),
            }
        }

        /// Worker `n` of `group` (pid `n * 100`); returns its end of the bus.
        fn add(&mut self, n: u64, group: usize) -> StdStream {
            let (ours, theirs) = pair();
            let a = Attach {
                worker: WorkerId(n),
                group,
                pid: n as u32 * 100,
                stream: ours,
                token: Token(n as usize),
                stuck_timeout: STUCK,
            };
            self.relay.add(a, self.poll.registry(), self.now).unwrap();
            theirs
        }

        fn event(&mut self, n: u64) {
            self.relay
                .on_event(WorkerId(n), self.poll.registry(), self.now);
        }

        /// Worker `from` sends `data` (the relay reads as it goes, so
        /// writing never blocks for long).
        fn send(&mut self, from: u64, end: &mut StdStream, data: &[u8]) {
            end.set_nonblocking(true).unwrap();
            let mut rest = data;
            while !rest.is_empty() {
                match end.write(rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(_) => self.event(from),
                }
            }
            self.event(from);
        }
    }

    /// Reads `n` frames from a worker's end of the bus.
    fn read_frames(end: &mut StdStream, n: usize) -> Vec<BusMsg> {
        (0..n)
            .map(|_| {
                let mut len = [0u8; 4];
                end.read_exact(&mut len).unwrap();
                let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
                end.read_exact(&mut body).unwrap();
                postcard::from_bytes(&body).unwrap()
            })
            .collect()
    }

    #[test]
    fn a_handover_keeps_the_old_workers_own_sends_from_its_replacement_until_exported() {
        let mut f = F::new();
        let mut old = f.add(1, 0);
        let mut new = f.add(2, 0);
        let mut other = f.add(3, 0);
        f.relay.cut(WorkerId(1), WorkerId(2), f.now);
        assert_eq!(read_frames(&mut old, 1), [BusMsg::Cut]);
        assert_eq!(read_frames(&mut new, 1), [BusMsg::Cut]);
        let say = |t: &str| BusMsg::ToGroup {
            group: "g".into(),
            kind: 0,
            exclude: None,
            data: t.as_bytes().to_vec(),
        };
        let join = BusMsg::Join {
            group: "g".into(),
            conn: (100, 9),
        };
        let publish = BusMsg::Publish {
            topic: "t".into(),
            data: vec![1],
        };
        // Sent before the old worker reached its cut, read by the master after.
        let mut wire = Vec::new();
        for m in [
            say("before"),
            join.clone(),
            publish.clone(),
            BusMsg::Exported,
            say("after"),
        ] {
            bus::encode(&m, &mut wire);
        }
        f.send(1, &mut old, &wire);
        // The replacement gets the membership change, then only what came
        // after the export; the marker itself goes nowhere.
        assert_eq!(read_frames(&mut new, 2), [join.clone(), say("after")]);
        assert_eq!(
            read_frames(&mut other, 4),
            [say("before"), join, publish, say("after")]
        );
        // Once over, the old worker's nodes belong to the replacement: its
        // exit does not end the connections it handed over.
        f.relay.handed_over(WorkerId(2), true);
        f.relay.remove(WorkerId(1), f.poll.registry(), f.now);
        f.relay.remove(WorkerId(2), f.poll.registry(), f.now);
        assert_eq!(
            read_frames(&mut other, 2),
            [
                BusMsg::NodeGone { node: 200 },
                BusMsg::NodeGone { node: 100 }
            ]
        );
    }

    #[test]
    fn frames_reach_the_others_and_a_newcomer_gets_the_registry() {
        let mut f = F::new();
        let mut a_end = f.add(1, 0);
        let mut b_end = f.add(2, 0);
        let join = BusMsg::Join {
            group: "room".into(),
            conn: (100, 1),
        };
        a_end.write_all(&frame(&join)).unwrap();
        f.event(1);
        let mut got = vec![0u8; frame(&join).len()];
        b_end.read_exact(&mut got).unwrap();
        assert_eq!(bus::decode(&got).unwrap(), join);
        // A worker that starts later is told at once.
        let mut c_end = f.add(3, 0);
        c_end.read_exact(&mut got).unwrap();
        assert_eq!(bus::decode(&got).unwrap(), join);
        // When the first one exits, the others hear its connections are gone.
        f.relay.remove(WorkerId(1), f.poll.registry(), f.now);
        let gone = frame(&BusMsg::NodeGone { node: 100 });
        let mut got = vec![0u8; gone.len()];
        b_end.read_exact(&mut got).unwrap();
        assert_eq!(got, gone);
    }

    fn big() -> Vec<u8> {
        frame(&BusMsg::Publish {
            topic: "t".into(),
            data: vec![7; 1 << 20],
        })
    }

    #[test]
    fn a_worker_that_does_not_read_has_frames_dropped_at_the_bound_and_counted() {
        let mut f = F::new();
        let mut a_end = f.add(1, 0);
        // b never reads.
        let _b_end = f.add(2, 1);
        let big = big();
        let mut sent = 0;
        while f.relay.dropped(WorkerId(2)) == 0 {
            f.send(1, &mut a_end, &big);
            sent += 1;
            assert!(sent < 200, "the bound was never reached");
        }
        let pending = f.relay.peers[&WorkerId(2)].buf.outbuf.len();
        assert!(pending <= MAX_PENDING, "{pending}");
        assert!(
            sent >= MAX_PENDING >> 20,
            "dropped only at the bound: {sent}"
        );
        for _ in 0..3 {
            f.send(1, &mut a_end, &big);
        }
        assert_eq!(f.relay.dropped(WorkerId(2)), 4);
        assert_eq!((f.relay.group_dropped(1), f.relay.group_dropped(0)), (4, 0));
        // The group keeps its count once the worker is gone.
        f.relay.remove(WorkerId(2), f.poll.registry(), f.now);
        assert_eq!(f.relay.dropped(WorkerId(2)), 0);
        assert_eq!(f.relay.group_dropped(1), 4);
    }

    #[test]
    fn a_ready_worker_whose_backlog_does_not_move_is_reported_stuck_once() {
        let mut f = F::new();
        let mut a_end = f.add(1, 0);
        let mut b_end = f.add(2, 0);
        // Enough to fill b's socket: some bytes wait in the master.
        let big = big();
        for _ in 0..4 {
            f.send(1, &mut a_end, &big);
        }
        assert!(!f.relay.peers[&WorkerId(2)].buf.outbuf.is_empty());
        // Not ready yet (in on_worker_start): start_timeout covers it.
        assert_eq!(f.relay.next_deadline(), None);
        f.now += 2 * STUCK;
        assert!(f.relay.stuck(f.now).is_empty());
        // Ready: the clock starts now.
        f.relay.ready(WorkerId(2), f.now);
        f.relay.ready(WorkerId(1), f.now);
        assert_eq!(f.relay.next_deadline(), Some(f.now + STUCK));
        f.now += STUCK - Duration::from_millis(1);
        assert!(f.relay.stuck(f.now).is_empty());
        // It takes a little: the clock starts again.
        let mut buf = vec![0u8; 64 << 10];
        b_end.read_exact(&mut buf).unwrap();
        f.event(2);
        assert_eq!(f.relay.next_deadline(), Some(f.now + STUCK));
        f.now += STUCK;
        let stuck = f.relay.stuck(f.now);
        assert_eq!(stuck.len(), 1, "{stuck:?}");
        assert_eq!(stuck[0].0, WorkerId(2));
        assert!(
            stuck[0].1.contains("took nothing for 10s"),
            "{}",
            stuck[0].1
        );
        // Once per episode.
        assert!(f.relay.stuck(f.now + STUCK).is_empty());
        assert_eq!(f.relay.next_deadline(), None);
        // A worker with nothing waiting is never stuck, however long.
        assert!(f.relay.peers[&WorkerId(1)].buf.outbuf.is_empty());
    }

    #[test]
    fn a_frame_over_the_limit_closes_that_workers_bus() {
        let mut f = F::new();
        let mut a_end = f.add(1, 0);
        let mut b_end = f.add(2, 0);
        let ok = frame(&BusMsg::Gone { conn: (100, 1) });
        let mut wire = ok.clone();
        wire.extend_from_slice(&(u32::MAX).to_be_bytes());
        wire.extend_from_slice(&[0; 64]);
        a_end.write_all(&wire).unwrap();
        f.event(1);
        assert!(f.relay.peers[&WorkerId(1)].closed);
        // What came before still reaches the others.
        let mut got = vec![0u8; ok.len()];
        b_end.read_exact(&mut got).unwrap();
        assert_eq!(got, ok);
        // The worker sees its bus closed, and nothing more is sent to it.
        let mut rest = Vec::new();
        a_end.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        b_end.write_all(&ok).unwrap();
        f.event(2);
        assert!(f.relay.peers[&WorkerId(1)].buf.outbuf.is_empty());
    }
}
