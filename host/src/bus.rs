//! Messages between worker processes (groups, users, broadcasts, publish),
//! relayed by the master over one socket per worker, and the membership
//! registry every worker (and the master) keeps a copy of.
//!
//! Each worker sends its events to the master, which applies membership
//! changes to its own registry and forwards the bytes, in order, to every
//! other worker. A worker that starts gets the master's registry first, so
//! counts and member lists are answered locally without a round trip. A
//! Redis backend (`cluster.rs`, `master/redis.rs`) carries the same
//! `BusMsg`s between machines.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// A connection anywhere on the host: worker pid and connection id.
pub type Gid = (u32, u64);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BusMsg {
    Join {
        group: String,
        conn: Gid,
    },
    Leave {
        group: String,
        conn: Gid,
    },
    Bind {
        uid: String,
        conn: Gid,
    },
    /// The connection closed: it leaves every group and uid.
    Gone {
        conn: Gid,
    },
    /// Every connection of that worker is gone (it exited).
    NodeGone {
        node: u32,
    },
    ToGroup {
        group: String,
        kind: u8,
        exclude: Option<Gid>,
        data: Vec<u8>,
    },
    ToUid {
        uid: String,
        kind: u8,
        data: Vec<u8>,
    },
    ToAll {
        kind: u8,
        exclude: Option<Gid>,
        data: Vec<u8>,
    },
    Publish {
        topic: String,
        data: Vec<u8>,
    },
    /// Master to the two workers of a handover, at the same point of the
    /// relay's order: the old worker exports its connections here; the new
    /// one delivers to them what comes after it (see `worker/handover.rs`).
    Cut,
    /// Old worker to master, right after its export: the end of what it
    /// delivered itself (the master stops holding back its sends from the
    /// new worker here). Never relayed.
    Exported,
}

/// Who is in which group, and which connections carry which uid.
#[derive(Debug, Default)]
pub struct Registry {
    groups: HashMap<String, HashSet<Gid>>,
    uids: HashMap<String, HashSet<Gid>>,
    /// Reverse indexes, for cleanup when a connection or worker goes.
    conn_groups: HashMap<Gid, HashSet<String>>,
    conn_uid: HashMap<Gid, String>,
}

impl Registry {
    /// Applies a membership message; others are ignored. True if it changed anything.
    pub fn apply(&mut self, msg: &BusMsg) -> bool {
        match msg {
            BusMsg::Join { group, conn } => {
                self.conn_groups
                    .entry(*conn)
                    .or_default()
                    .insert(group.clone());
                self.groups.entry(group.clone()).or_default().insert(*conn)
            }
            BusMsg::Leave { group, conn } => self.leave(group, *conn),
            BusMsg::Bind { uid, conn } => {
                self.unbind(*conn);
                self.conn_uid.insert(*conn, uid.clone());
                self.uids.entry(uid.clone()).or_default().insert(*conn)
            }
            BusMsg::Gone { conn } => self.forget(*conn),
            BusMsg::NodeGone { node } => {
                let conns: Vec<Gid> = self
                    .conn_groups
                    .keys()
                    .chain(self.conn_uid.keys())
                    .filter(|c| c.0 == *node)
                    .copied()
                    .collect();
                let mut changed = false;
                for c in conns {
                    changed |= self.forget(c);
                }
                changed
            }
            _ => false,
        }
    }

    fn leave(&mut self, group: &str, conn: Gid) -> bool {
        if let Some(gs) = self.conn_groups.get_mut(&conn) {
            gs.remove(group);
            if gs.is_empty() {
                self.conn_groups.remove(&conn);
            }
        }
        let Some(members) = self.groups.get_mut(group) else {
            return false;
        };
        let removed = members.remove(&conn);
        if members.is_empty() {
            self.groups.remove(group);
        }
        removed
    }

    fn unbind(&mut self, conn: Gid) -> bool {
        let Some(uid) = self.conn_uid.remove(&conn) else {
            return false;
        };
        if let Some(set) = self.uids.get_mut(&uid) {
            set.remove(&conn);
            if set.is_empty() {
                self.uids.remove(&uid);
            }
        }
        true
    }

    fn forget(&mut self, conn: Gid) -> bool {
        let mut changed = self.unbind(conn);
        for g in self.conn_groups.remove(&conn).unwrap_or_default() {
            if let Some(members) = self.groups.get_mut(&g) {
                changed |= members.remove(&conn);
                if members.is_empty() {
                    self.groups.remove(&g);
                }
            }
        }
        changed
    }

    pub fn members(&self, group: &str) -> impl Iterator<Item = Gid> + '_ {
        self.groups.get(group).into_iter().flatten().copied()
    }

    pub fn count(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, HashSet::len)
    }

    /// Bound uids in a group, sorted and unique.
    pub fn group_uids(&self, group: &str) -> Vec<String> {
        let set: BTreeSet<&String> = self
            .members(group)
            .filter_map(|c| self.conn_uid.get(&c))
            .collect();
        set.into_iter().cloned().collect()
    }

    pub fn uid_conns(&self, uid: &str) -> impl Iterator<Item = Gid> + '_ {
        self.uids.get(uid).into_iter().flatten().copied()
    }

    /// The groups a connection is in.
    pub fn groups_of(&self, conn: Gid) -> impl Iterator<Item = &String> + '_ {
        self.conn_groups.get(&conn).into_iter().flatten()
    }

    /// The uid a connection is bound to.
    pub fn uid_of(&self, conn: Gid) -> Option<&String> {
        self.conn_uid.get(&conn)
    }

    /// Every connection in a group or bound to a uid.
    pub fn conns(&self) -> impl Iterator<Item = Gid> + '_ {
        let bound = self
            .conn_uid
            .keys()
            .filter(|c| !self.conn_groups.contains_key(c));
        self.conn_groups.keys().chain(bound).copied()
    }

    /// The registry as messages that rebuild it, for a worker that starts.
    pub fn snapshot(&self) -> Vec<BusMsg> {
        let mut out = Vec::new();
        for (group, members) in &self.groups {
            for c in members {
                out.push(BusMsg::Join {
                    group: group.clone(),
                    conn: *c,
                });
            }
        }
        for (c, uid) in &self.conn_uid {
            out.push(BusMsg::Bind {
                uid: uid.clone(),
                conn: *c,
            });
        }
        out
    }
}

/// Frames a message: 4-byte big-endian length, then postcard.
pub fn encode(msg: &BusMsg, out: &mut Vec<u8>) {
    let body = postcard::to_allocvec(msg).expect("bus messages always serialize");
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
}

/// The largest frame (length prefix included) a [`BusBuf`] reads by default.
/// The master queues at most this much for one worker anyway (see the relay).
pub const MAX_FRAME: usize = 64 << 20;

/// A non-blocking framed bus connection (master or worker side). A frame
/// whose header claims more than its limit ends the connection: the reader
/// reports it (`overflowed`) and sees it as closed, and nothing of that
/// frame is buffered.
#[derive(Debug)]
pub struct BusBuf {
    inbuf: Vec<u8>,
    pub outbuf: Vec<u8>,
    limit: usize,
    /// The size the frame over the limit claimed.
    overflow: Option<usize>,
    /// What each read lands in first; kept, so a read does not zero 16 KiB
    /// (every broadcast is one read in every worker and in the master).
    chunk: Vec<u8>,
}

impl Default for BusBuf {
    fn default() -> Self {
        BusBuf::with_limit(MAX_FRAME)
    }
}

impl BusBuf {
    pub fn with_limit(limit: usize) -> BusBuf {
        BusBuf {
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            limit,
            overflow: None,
            chunk: Vec::new(),
        }
    }

    /// Reads what is available; returns raw frames (length prefix included,
    /// so the master can forward them as they are) and whether the peer closed
    /// (or sent a frame over the limit: see `overflowed`).
    pub fn read_frames(&mut self, r: &mut impl Read) -> (Vec<Vec<u8>>, bool) {
        let mut frames = Vec::new();
        if self.overflow.is_some() {
            return (frames, true);
        }
        let mut chunk = std::mem::take(&mut self.chunk);
        chunk.resize(16 * 1024, 0);
        // Frames are taken out after each read, so a header over the limit
        // is caught before its body is buffered.
        let closed = loop {
            match r.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    self.take_frames(&mut frames);
                    if self.overflow.is_some() {
                        self.inbuf = Vec::new();
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        self.chunk = chunk;
        (frames, closed)
    }

    fn take_frames(&mut self, frames: &mut Vec<Vec<u8>>) {
        let mut pos = 0;
        while let Some(head) = self.inbuf[pos..].first_chunk::<4>() {
            let len = u32::from_be_bytes(*head) as usize + 4;
            if len > self.limit {
                self.overflow = Some(len);
                return;
            }
            if self.inbuf.len() - pos < len {
                break;
            }
            frames.push(self.inbuf[pos..pos + len].to_vec());
            pos += len;
        }
        self.inbuf.drain(..pos);
    }

    /// The size a frame over the limit claimed; nothing more is read then.
    pub fn overflowed(&self) -> Option<usize> {
        self.overflow
    }

    pub fn flush(&mut self, w: &mut impl Write) -> io::Result<()> {
        crate::ipc::flush_buf(&mut self.outbuf, w)
    }
}

/// Whether a frame made by [`encode`] carries a membership change (what
/// [`Registry::apply`] uses), told from its first byte without decoding the
/// rest: the relay need not decode the payload of every broadcast.
pub fn is_membership(frame: &[u8]) -> bool {
    // postcard writes the variant index first, as a varint: one byte for
    // Join (0) through NodeGone (4).
    frame.get(4).is_some_and(|&v| v <= 4)
}

/// Whether a frame is a delivery to connections (group, uid, everyone).
pub fn is_delivery(frame: &[u8]) -> bool {
    frame.get(4).is_some_and(|&v| (5..=7).contains(&v))
}

/// Whether a frame is a `Publish`.
pub fn is_publish(frame: &[u8]) -> bool {
    frame.get(4) == Some(&8)
}

/// Whether a frame is the handover marker `Cut`.
pub fn is_cut(frame: &[u8]) -> bool {
    frame.get(4) == Some(&9) && frame.len() == 5
}

/// Whether a frame is the old worker's `Exported` marker.
pub fn is_exported(frame: &[u8]) -> bool {
    frame.get(4) == Some(&10) && frame.len() == 5
}

/// Decodes a frame made by [`encode`].
pub fn decode(frame: &[u8]) -> Result<BusMsg, postcard::Error> {
    postcard::from_bytes(&frame[4.min(frame.len())..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::tests::Pending;

    #[test]
    fn frames_are_told_apart_by_their_first_byte() {
        let f = |m: &BusMsg| {
            let mut v = Vec::new();
            encode(m, &mut v);
            v
        };
        let group = f(&BusMsg::ToGroup {
            group: "g".into(),
            kind: 0,
            exclude: None,
            data: vec![9],
        });
        let uid = f(&BusMsg::ToUid {
            uid: "u".into(),
            kind: 0,
            data: vec![],
        });
        let all = f(&BusMsg::ToAll {
            kind: 0,
            exclude: None,
            data: vec![],
        });
        for d in [&group, &uid, &all] {
            assert!(is_delivery(d) && !is_membership(d) && !is_cut(d));
        }
        let join = f(&BusMsg::Join {
            group: "g".into(),
            conn: (1, 1),
        });
        assert!(is_membership(&join) && !is_delivery(&join));
        let publish = f(&BusMsg::Publish {
            topic: "t".into(),
            data: vec![],
        });
        assert!(!is_delivery(&publish) && !is_membership(&publish) && is_publish(&publish));
        assert!(is_cut(&f(&BusMsg::Cut)) && !is_exported(&f(&BusMsg::Cut)));
        assert!(is_exported(&f(&BusMsg::Exported)));
    }

    #[test]
    fn membership_follows_joins_leaves_binds_and_departures() {
        let mut r = Registry::default();
        let (a, b, c) = ((1, 1), (1, 2), (2, 1));
        for (g, conn) in [("room", a), ("room", b), ("room", c), ("other", a)] {
            r.apply(&BusMsg::Join {
                group: g.into(),
                conn,
            });
        }
        r.apply(&BusMsg::Bind {
            uid: "ann".into(),
            conn: a,
        });
        r.apply(&BusMsg::Bind {
            uid: "cat".into(),
            conn: c,
        });
        assert_eq!(r.count("room"), 3);
        assert_eq!(r.group_uids("room"), vec!["ann", "cat"]);
        r.apply(&BusMsg::Leave {
            group: "room".into(),
            conn: b,
        });
        assert_eq!(r.count("room"), 2);
        r.apply(&BusMsg::Gone { conn: a });
        assert_eq!(r.count("other"), 0);
        assert_eq!(r.group_uids("room"), vec!["cat"]);
        assert_eq!(r.uid_conns("ann").count(), 0);
        r.apply(&BusMsg::NodeGone { node: 2 });
        assert_eq!(r.count("room"), 0);
        assert!(r.snapshot().is_empty());
    }

    #[test]
    fn snapshot_rebuilds_the_registry() {
        let mut r = Registry::default();
        r.apply(&BusMsg::Join {
            group: "g".into(),
            conn: (7, 1),
        });
        r.apply(&BusMsg::Bind {
            uid: "u".into(),
            conn: (7, 1),
        });
        let mut copy = Registry::default();
        for m in r.snapshot() {
            copy.apply(&m);
        }
        assert_eq!(copy.group_uids("g"), vec!["u"]);
    }

    #[test]
    fn membership_frames_are_told_apart_without_decoding() {
        let conn = (1, 2);
        let membership = [
            BusMsg::Join {
                group: "g".into(),
                conn,
            },
            BusMsg::Leave {
                group: "g".into(),
                conn,
            },
            BusMsg::Bind {
                uid: "u".into(),
                conn,
            },
            BusMsg::Gone { conn },
            BusMsg::NodeGone { node: 1 },
        ];
        let others = [
            BusMsg::ToGroup {
                group: "g".into(),
                kind: 0,
                exclude: None,
                data: vec![1],
            },
            BusMsg::ToUid {
                uid: "u".into(),
                kind: 0,
                data: vec![],
            },
            BusMsg::ToAll {
                kind: 0,
                exclude: None,
                data: vec![],
            },
            BusMsg::Publish {
                topic: "t".into(),
                data: vec![],
            },
        ];
        for (msgs, want) in [(&membership[..], true), (&others[..], false)] {
            for m in msgs {
                let mut f = Vec::new();
                encode(m, &mut f);
                assert_eq!(is_membership(&f), want, "{m:?}");
            }
        }
    }

    #[test]
    fn frames_survive_splitting() {
        let msgs = vec![
            BusMsg::ToGroup {
                group: "g".into(),
                kind: 0,
                exclude: Some((1, 2)),
                data: vec![1, 2, 3],
            },
            BusMsg::Publish {
                topic: "t".into(),
                data: vec![0; 100],
            },
        ];
        let mut wire = Vec::new();
        for m in &msgs {
            encode(m, &mut wire);
        }
        let mut b = BusBuf::default();
        let mut got = Vec::new();
        for chunk in wire.chunks(5) {
            let (frames, _) = b.read_frames(&mut &chunk[..]);
            got.extend(frames.iter().map(|f| decode(f).unwrap()));
        }
        assert_eq!(got, msgs);
    }

    #[test]
    fn a_frame_over_the_limit_ends_the_reading() {
        let small = BusMsg::Gone { conn: (1, 1) };
        let mut wire = Vec::new();
        encode(&small, &mut wire);
        // A header that claims 1 MiB, and only the start of its body.
        wire.extend_from_slice(&(1u32 << 20).to_be_bytes());
        wire.extend_from_slice(&[0; 100]);
        let mut b = BusBuf::with_limit(1024);
        let (frames, closed) = b.read_frames(&mut Pending(&wire));
        assert!(closed, "seen as closed");
        assert_eq!(frames.len(), 1, "the frame before still counts");
        assert_eq!(decode(&frames[0]).unwrap(), small);
        assert_eq!(b.overflowed(), Some((1 << 20) + 4));
        assert!(b.inbuf.is_empty(), "nothing of it is kept");
        let (more, closed) = b.read_frames(&mut Pending(&wire));
        assert!(more.is_empty() && closed, "nothing more is read");
        // Under the limit, a frame split across reads is kept whole.
        let mut ok = BusBuf::with_limit(1024);
        let mut one = Vec::new();
        encode(&small, &mut one);
        let (none, closed) = ok.read_frames(&mut Pending(&one[..3]));
        assert!(none.is_empty() && !closed);
        let (got, _) = ok.read_frames(&mut Pending(&one[3..]));
        assert_eq!(got, vec![one]);
        assert_eq!(ok.overflowed(), None);
    }
}
