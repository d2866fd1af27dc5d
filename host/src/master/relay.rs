//! The bus relay: every frame a worker sends (group and uid changes,
//! broadcasts, publishes) goes, in order, to every other worker; membership
//! changes also update the master's registry, which a worker that starts
//! receives first.
//!
//! A worker that does not read its bus cannot make the master hold without
//! bound what is owed to it: past `MAX_PENDING` bytes waiting for one
//! worker, further frames for it are dropped and counted.

use std::collections::BTreeMap;

use mio::net::UnixStream;
use mio::{Interest, Registry, Token};

use super::supervisor::WorkerId;
use crate::bus::{self, BusBuf, BusMsg};

/// Bytes that may wait for one worker before frames for it are dropped.
pub const MAX_PENDING: usize = 64 << 20;

struct Peer {
    stream: UnixStream,
    buf: BusBuf,
    pid: u32,
    /// Frames dropped because this worker's buffer was full.
    dropped: u64,
}

impl Peer {
    /// Queues a whole frame, or drops it at the bound (never part of one:
    /// the worker would lose the framing).
    fn push(&mut self, frame: &[u8]) {
        if self.buf.outbuf.len() + frame.len() > MAX_PENDING {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!(
                    pid = self.pid,
                    "bus: worker is not reading; {} messages for it dropped so far",
                    self.dropped
                );
            }
            return;
        }
        self.buf.outbuf.extend_from_slice(frame);
    }

    fn flush(&mut self) {
        if let Err(e) = self.buf.flush(&mut self.stream) {
            tracing::debug!(pid = self.pid, "bus write failed: {e}");
        }
    }
}

#[derive(Default)]
pub struct Relay {
    peers: BTreeMap<WorkerId, Peer>,
    /// Group membership across workers, to hand to workers that start.
    registry: bus::Registry,
}

impl Relay {
    /// A worker started: it learns who is in which group before anything else.
    pub fn add(
        &mut self,
        worker: WorkerId,
        pid: u32,
        mut stream: UnixStream,
        registry: &Registry,
        token: Token,
    ) -> std::io::Result<()> {
        registry.register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)?;
        let mut peer = Peer {
            stream,
            buf: BusBuf::default(),
            pid,
            dropped: 0,
        };
        // Not bounded: without it the worker's view of the groups is wrong.
        for msg in self.registry.snapshot() {
            bus::encode(&msg, &mut peer.buf.outbuf);
        }
        peer.flush();
        self.peers.insert(worker, peer);
        Ok(())
    }

    /// The worker exited: the others learn its connections are gone.
    pub fn remove(&mut self, worker: WorkerId, registry: &Registry) {
        let Some(mut peer) = self.peers.remove(&worker) else {
            return;
        };
        let _ = registry.deregister(&mut peer.stream);
        let msg = BusMsg::NodeGone { node: peer.pid };
        self.registry.apply(&msg);
        let mut frame = Vec::new();
        bus::encode(&msg, &mut frame);
        for p in self.peers.values_mut() {
            p.push(&frame);
            p.flush();
        }
    }

    /// The worker's bus socket is readable or writable: relays what it sent,
    /// in order, to every other worker, and writes what is owed to it.
    pub fn on_event(&mut self, worker: WorkerId) {
        let Some(p) = self.peers.get_mut(&worker) else {
            return;
        };
        let (frames, _closed) = p.buf.read_frames(&mut p.stream);
        p.flush();
        if frames.is_empty() {
            return;
        }
        for f in &frames {
            // Only membership changes matter to the master's registry.
            if let Ok(msg) = bus::decode(f) {
                self.registry.apply(&msg);
            }
        }
        for (&k, other) in &mut self.peers {
            if k == worker {
                continue;
            }
            for f in &frames {
                other.push(f);
            }
            other.flush();
        }
    }

    /// Frames dropped for a worker so far.
    #[cfg(test)]
    fn dropped(&self, worker: WorkerId) -> u64 {
        self.peers.get(&worker).map_or(0, |p| p.dropped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream as StdStream;
    use std::time::Duration;

    use mio::Poll;

    fn pair() -> (UnixStream, StdStream) {
        let (ours, theirs) = StdStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (UnixStream::from_std(ours), theirs)
    }

    fn frame(msg: &BusMsg) -> Vec<u8> {
        let mut v = Vec::new();
        bus::encode(msg, &mut v);
        v
    }

    #[test]
    fn frames_reach_the_others_and_a_newcomer_gets_the_registry() {
        let poll = Poll::new().unwrap();
        let mut relay = Relay::default();
        let (a, mut a_end) = pair();
        let (b, mut b_end) = pair();
        relay
            .add(WorkerId(1), 100, a, poll.registry(), Token(1))
            .unwrap();
        relay
            .add(WorkerId(2), 200, b, poll.registry(), Token(2))
            .unwrap();
        let join = BusMsg::Join {
            group: "room".into(),
            conn: (100, 1),
        };
        std::io::Write::write_all(&mut a_end, &frame(&join)).unwrap();
        relay.on_event(WorkerId(1));
        let mut got = vec![0u8; frame(&join).len()];
        b_end
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        b_end.read_exact(&mut got).unwrap();
        assert_eq!(bus::decode(&got).unwrap(), join);
        // A worker that starts later is told at once.
        let (c, mut c_end) = pair();
        relay
            .add(WorkerId(3), 300, c, poll.registry(), Token(3))
            .unwrap();
        c_end
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        c_end.read_exact(&mut got).unwrap();
        assert_eq!(bus::decode(&got).unwrap(), join);
        // When the first one exits, the others hear its connections are gone.
        relay.remove(WorkerId(1), poll.registry());
        let gone = frame(&BusMsg::NodeGone { node: 100 });
        let mut got = vec![0u8; gone.len()];
        b_end.read_exact(&mut got).unwrap();
        assert_eq!(got, gone);
    }

    #[test]
    fn a_worker_that_does_not_read_has_frames_dropped_at_the_bound() {
        let poll = Poll::new().unwrap();
        let mut relay = Relay::default();
        let (a, mut a_end) = pair();
        // b never reads.
        let (b, _b_end) = pair();
        relay
            .add(WorkerId(1), 100, a, poll.registry(), Token(1))
            .unwrap();
        relay
            .add(WorkerId(2), 200, b, poll.registry(), Token(2))
            .unwrap();
        let big = frame(&BusMsg::Publish {
            topic: "t".into(),
            data: vec![7; 1 << 20],
        });
        a_end.set_nonblocking(true).unwrap();
        let mut sent = 0;
        while relay.dropped(WorkerId(2)) == 0 {
            // The relay reads as it goes, so writing never blocks for long.
            let mut rest = &big[..];
            while !rest.is_empty() {
                match std::io::Write::write(&mut a_end, rest) {
                    Ok(n) => rest = &rest[n..],
                    Err(_) => relay.on_event(WorkerId(1)),
                }
            }
            relay.on_event(WorkerId(1));
            sent += 1;
            assert!(sent < 200, "the bound was never reached");
        }
        let pending = relay.peers[&WorkerId(2)].buf.outbuf.len();
        assert!(pending <= MAX_PENDING, "{pending}");
        assert!(
            sent >= MAX_PENDING >> 20,
            "dropped only at the bound: {sent}"
        );
    }
}
