//! The bus across hosts (`[bus] backend = "redis://…"`): what one host's
//! master tells the others through Redis, and how it names their
//! connections. Pure: no sockets, no clock of its own (the Redis threads
//! live in `master/redis.rs`).
//!
//! Every host publishes, on one channel, [`Wire`] messages carrying its
//! random host id. Its workers' bus frames travel as they are; the master of
//! another host renames every gid `(pid, conn)` in them to `(node, conn)`,
//! where `node` is a synthetic number at or above [`SYNTHETIC_BASE`] for
//! that `(host, pid)`: never a real pid, so a worker's `local_of()` never
//! takes a remote connection for one of its own.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[cfg(test)]
use crate::bus;
use crate::bus::{BusMsg, Gid, Registry};

/// Synthetic nodes (remote hosts' worker pids) start here; Linux pids stay
/// below 2^22.
pub const SYNTHETIC_BASE: u32 = 1 << 31;

/// Whether a gid belongs to a connection of this host.
pub fn is_local(g: Gid) -> bool {
    g.0 < SYNTHETIC_BASE
}

/// One message on the Redis channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wire {
    pub host: u64,
    pub body: Body,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Bus frames of that host's workers, in the order its relay read them
    /// (each with its 4-byte length prefix, as `bus::encode` makes them).
    Frames(Vec<u8>),
    /// It is alive (every `heartbeat`).
    Heartbeat,
    /// Replace all that is known of that host by these memberships (after
    /// it reconnected to Redis or fell behind).
    Reset(Vec<BusMsg>),
    /// It stopped: its members are gone.
    Bye,
}

impl Wire {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("wire messages always serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Wire, postcard::Error> {
        postcard::from_bytes(bytes)
    }
}

/// A field of a host's membership hash in Redis (`<ns>:members:<host>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Field {
    /// Value: empty.
    Group(String, Gid),
    /// Value: the uid.
    Uid(Gid),
}

fn field(f: &Field) -> Vec<u8> {
    postcard::to_allocvec(f).expect("fields always serialize")
}

/// A change to this host's membership hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOp {
    Set(Vec<u8>, Vec<u8>),
    Del(Vec<u8>),
}

/// What a local membership message does to this host's hash; `reg` is the
/// registry before the message applies (for what a departure removes).
pub fn hash_ops(reg: &Registry, msg: &BusMsg, out: &mut Vec<HashOp>) {
    let gone = |c: Gid, out: &mut Vec<HashOp>| {
        for g in reg.groups_of(c) {
            out.push(HashOp::Del(field(&Field::Group(g.clone(), c))));
        }
        if reg.uid_of(c).is_some() {
            out.push(HashOp::Del(field(&Field::Uid(c))));
        }
    };
    match msg {
        BusMsg::Join { group, conn } => out.push(HashOp::Set(
            field(&Field::Group(group.clone(), *conn)),
            Vec::new(),
        )),
        BusMsg::Leave { group, conn } => {
            out.push(HashOp::Del(field(&Field::Group(group.clone(), *conn))))
        }
        BusMsg::Bind { uid, conn } => out.push(HashOp::Set(
            field(&Field::Uid(*conn)),
            uid.as_bytes().to_vec(),
        )),
        BusMsg::Gone { conn } => gone(*conn, out),
        BusMsg::NodeGone { node } => {
            for c in reg.conns().filter(|c| c.0 == *node) {
                gone(c, out);
            }
        }
        _ => {}
    }
}

/// The hash of a membership snapshot (`Registry::snapshot`).
pub fn hash_of(msgs: &[BusMsg]) -> Vec<(Vec<u8>, Vec<u8>)> {
    let reg = Registry::default();
    let mut ops = Vec::new();
    for m in msgs {
        hash_ops(&reg, m, &mut ops);
    }
    ops.into_iter()
        .filter_map(|op| match op {
            HashOp::Set(f, v) => Some((f, v)),
            HashOp::Del(_) => None,
        })
        .collect()
}

/// A field and value of another host's hash, as the message that made it.
pub fn msg_of(field: &[u8], value: &[u8]) -> Option<BusMsg> {
    match postcard::from_bytes::<Field>(field).ok()? {
        Field::Group(group, conn) => Some(BusMsg::Join { group, conn }),
        Field::Uid(conn) => Some(BusMsg::Bind {
            uid: String::from_utf8(value.to_vec()).ok()?,
            conn,
        }),
    }
}

/// Splits concatenated bus frames (length prefix included).
pub fn split_frames(mut bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while let Some(head) = bytes.first_chunk::<4>() {
        let len = u32::from_be_bytes(*head) as usize + 4;
        if bytes.len() < len {
            break;
        }
        out.push(&bytes[..len]);
        bytes = &bytes[len..];
    }
    out
}

struct Host {
    /// Its pids, by synthetic node.
    nodes: Vec<u32>,
    last_seen: Instant,
}

/// The other hosts: when each was last heard of, and their pids under
/// synthetic node numbers.
#[derive(Default)]
pub struct Remotes {
    nodes: HashMap<(u64, u32), u32>,
    hosts: HashMap<u64, Host>,
    next: u32,
}

impl Remotes {
    pub fn hosts(&self) -> usize {
        self.hosts.len()
    }

    /// Heard of `host` now.
    pub fn seen(&mut self, host: u64, now: Instant) {
        self.hosts
            .entry(host)
            .or_insert_with(|| Host {
                nodes: Vec::new(),
                last_seen: now,
            })
            .last_seen = now;
    }

    fn node(&mut self, host: u64, pid: u32) -> u32 {
        if let Some(&n) = self.nodes.get(&(host, pid)) {
            return n;
        }
        if self.next < SYNTHETIC_BASE || self.next == u32::MAX {
            self.next = SYNTHETIC_BASE;
        }
        let n = self.next;
        self.next += 1;
        self.nodes.insert((host, pid), n);
        if let Some(h) = self.hosts.get_mut(&host) {
            h.nodes.push(pid);
        }
        n
    }

    /// A message from `host`, with its gids renamed for this host's workers.
    pub fn translate(&mut self, host: u64, msg: BusMsg) -> BusMsg {
        let mut g = |c: Gid| (self.node(host, c.0), c.1);
        match msg {
            BusMsg::Join { group, conn } => BusMsg::Join {
                group,
                conn: g(conn),
            },
            BusMsg::Leave { group, conn } => BusMsg::Leave {
                group,
                conn: g(conn),
            },
            BusMsg::Bind { uid, conn } => BusMsg::Bind { uid, conn: g(conn) },
            BusMsg::Gone { conn } => BusMsg::Gone { conn: g(conn) },
            BusMsg::NodeGone { node } => match self.nodes.remove(&(host, node)) {
                Some(n) => {
                    if let Some(h) = self.hosts.get_mut(&host) {
                        h.nodes.retain(|&p| p != node);
                    }
                    BusMsg::NodeGone { node: n }
                }
                // Never named: nothing of it is known here.
                None => BusMsg::NodeGone { node: 0 },
            },
            BusMsg::ToGroup {
                group,
                kind,
                exclude,
                data,
            } => BusMsg::ToGroup {
                group,
                kind,
                exclude: exclude.map(g),
                data,
            },
            BusMsg::ToAll {
                kind,
                exclude,
                data,
            } => BusMsg::ToAll {
                kind,
                exclude: exclude.map(g),
                data,
            },
            m => m,
        }
    }

    /// Everything of `host` is gone: the messages that say so to workers.
    pub fn drop_host(&mut self, host: u64) -> Vec<BusMsg> {
        let Some(h) = self.hosts.remove(&host) else {
            return Vec::new();
        };
        h.nodes
            .into_iter()
            .filter_map(|pid| self.nodes.remove(&(host, pid)))
            .map(|node| BusMsg::NodeGone { node })
            .collect()
    }

    /// The remote hosts not heard of for `ttl`.
    pub fn expired(&self, now: Instant, ttl: Duration) -> Vec<u64> {
        self.hosts
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.last_seen) > ttl)
            .map(|(&k, _)| k)
            .collect()
    }

    pub fn known(&self) -> Vec<u64> {
        self.hosts.keys().copied().collect()
    }
}

/// A random host id (from the kernel's generator; the clock and pid if it
/// cannot be read).
pub fn random_host_id() -> u64 {
    use std::io::Read;
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok()
    {
        return u64::from_ne_bytes(b);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    t.as_nanos() as u64 ^ (u64::from(std::process::id()) << 40)
}

/// A Redis URL for logs and status: the password replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some(p) => p,
        None => return url.to_string(),
    };
    let user = auth.split_once(':').map_or("", |(u, _)| u);
    format!("{scheme}://{user}:***@{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(g: &str, conn: Gid) -> BusMsg {
        BusMsg::Join {
            group: g.into(),
            conn,
        }
    }

    #[test]
    fn remote_gids_become_synthetic_nodes_and_vanish_with_their_host() {
        let mut r = Remotes::default();
        let now = Instant::now();
        r.seen(7, now);
        let a = r.translate(7, join("room", (1234, 5)));
        let BusMsg::Join { conn, .. } = a else {
            panic!()
        };
        assert!(conn.0 >= SYNTHETIC_BASE && conn.1 == 5 && !is_local(conn));
        // Same host and pid: same node; another host with that pid: another.
        assert_eq!(r.translate(7, BusMsg::Gone { conn: (1234, 9) }), {
            BusMsg::Gone { conn: (conn.0, 9) }
        });
        r.seen(8, now);
        let BusMsg::Join { conn: other, .. } = r.translate(8, join("room", (1234, 5))) else {
            panic!()
        };
        assert_ne!(other.0, conn.0);
        assert_eq!(
            r.translate(7, BusMsg::NodeGone { node: 1234 }),
            BusMsg::NodeGone { node: conn.0 }
        );
        assert_eq!(r.expired(now, Duration::from_secs(1)), Vec::<u64>::new());
        assert_eq!(
            r.expired(now + Duration::from_secs(2), Duration::from_secs(1))
                .len(),
            2
        );
        assert_eq!(r.drop_host(8), vec![BusMsg::NodeGone { node: other.0 }]);
        assert_eq!(r.drop_host(7), vec![]);
        assert_eq!(r.hosts(), 0);
    }

    #[test]
    fn the_hash_follows_membership_and_reads_back_as_messages() {
        let mut reg = Registry::default();
        let mut ops = Vec::new();
        let msgs = [
            join("a", (1, 1)),
            join("b", (1, 1)),
            BusMsg::Bind {
                uid: "ann".into(),
                conn: (1, 1),
            },
        ];
        for m in &msgs {
            hash_ops(&reg, m, &mut ops);
            reg.apply(m);
        }
        assert!(ops.iter().all(|o| matches!(o, HashOp::Set(..))));
        let back: Vec<BusMsg> = hash_of(&msgs)
            .iter()
            .map(|(f, v)| msg_of(f, v).unwrap())
            .collect();
        assert_eq!(back, msgs);
        ops.clear();
        hash_ops(&reg, &BusMsg::NodeGone { node: 1 }, &mut ops);
        assert_eq!(ops.len(), 3);
        assert!(ops.iter().all(|o| matches!(o, HashOp::Del(..))));
    }

    #[test]
    fn wire_round_trips_and_frames_split() {
        let mut bytes = Vec::new();
        bus::encode(&join("g", (1, 2)), &mut bytes);
        bus::encode(&BusMsg::Gone { conn: (1, 2) }, &mut bytes);
        let w = Wire {
            host: 42,
            body: Body::Frames(bytes.clone()),
        };
        assert_eq!(Wire::decode(&w.encode()).unwrap(), w);
        let frames = split_frames(&bytes);
        assert_eq!(frames.len(), 2);
        assert_eq!(
            bus::decode(frames[1]).unwrap(),
            BusMsg::Gone { conn: (1, 2) }
        );
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("redis://:secret@10.0.0.1:6379/0"),
            "redis://:***@10.0.0.1:6379/0"
        );
        assert_eq!(redact("rediss://me:pw@h:1/2"), "rediss://me:***@h:1/2");
        assert_eq!(redact("redis://h:1"), "redis://h:1");
    }
}
