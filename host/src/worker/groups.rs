//! Groups, uids, broadcasts and publish across worker processes: local
//! delivery at once, and the same message on the bus for the other workers.

use wm_proto::websocket::Role;
use wm_proto::{Codec, Kind};

use super::conn::State;
use super::core::{Core, Deferred};
use crate::bus::{self, BusMsg, Gid};

fn kind_code(kind: Kind) -> u8 {
    match kind {
        Kind::Default => 0,
        Kind::Text => 1,
        Kind::Binary => 2,
    }
}

pub fn kind_from(code: u8) -> Kind {
    match code {
        1 => Kind::Text,
        2 => Kind::Binary,
        _ => Kind::Default,
    }
}

/// Groups, uids and broadcasts: local delivery now, and the same message on
/// the bus for the other workers.
impl Core {
    /// A connection's id on the bus: this worker's pid and its id here,
    /// unless it came from another worker in a handover and kept its gid.
    pub(super) fn gid(&self, conn: u64) -> Gid {
        if self.adopted.is_empty() {
            return (self.node, conn);
        }
        self.adopted
            .get(&conn)
            .copied()
            .unwrap_or((self.node, conn))
    }

    /// The connection here that a gid names, if it is here.
    // Inlined: a broadcast asks it for every member of the group.
    #[inline]
    fn local_of(&self, g: Gid) -> Option<u64> {
        if g.0 == self.node {
            return (!self.skip_adopted || !self.adopted.contains_key(&g.1)).then_some(g.1);
        }
        if self.skip_adopted {
            return None;
        }
        self.adopted_gids.get(&g).copied()
    }

    fn publish_bus(&mut self, msg: &BusMsg) {
        bus::encode(msg, &mut self.bus_buf.outbuf);
        // Written at once, not after the callback: other workers start
        // delivering while this one still writes to its own members.
        self.flush_bus();
    }

    fn member_op(&mut self, conn: u64, msg: BusMsg) -> bool {
        if self.get(conn).is_none_or(|c| c.state != State::Open) {
            return false;
        }
        self.registry.apply(&msg);
        self.publish_bus(&msg);
        true
    }

    pub fn join_group(&mut self, conn: u64, group: &str) -> bool {
        let gid = self.gid(conn);
        self.member_op(
            conn,
            BusMsg::Join {
                group: group.to_string(),
                conn: gid,
            },
        )
    }

    pub fn leave_group(&mut self, conn: u64, group: &str) -> bool {
        let gid = self.gid(conn);
        self.member_op(
            conn,
            BusMsg::Leave {
                group: group.to_string(),
                conn: gid,
            },
        )
    }

    pub fn bind_uid(&mut self, conn: u64, uid: &str) -> bool {
        let gid = self.gid(conn);
        self.member_op(
            conn,
            BusMsg::Bind {
                uid: uid.to_string(),
                conn: gid,
            },
        )
    }

    /// A connection closed: drop its memberships here and everywhere.
    pub fn forget_conn(&mut self, conn: u64) {
        let gid = self.gid(conn);
        if self.adopted.remove(&conn).is_some() {
            self.adopted_gids.remove(&gid);
        }
        let msg = BusMsg::Gone { conn: gid };
        if self.registry.apply(&msg) {
            self.publish_bus(&msg);
        }
    }

    /// Writes queued bus frames to the master, as far as it takes them.
    #[inline]
    pub fn flush_bus(&mut self) {
        // Every turn of the loop: most have nothing for the bus.
        if self.bus_buf.outbuf.is_empty() {
            return;
        }
        if let Some(sock) = self.bus.as_mut() {
            if let Err(e) = self.bus_buf.flush(sock) {
                tracing::debug!("bus write failed: {e}");
            }
        }
    }

    pub fn send_to_group(&mut self, group: &str, data: &[u8], kind: Kind, exclude: Option<u64>) {
        let exclude = exclude.map(|c| self.gid(c));
        self.route(BusMsg::ToGroup {
            group: group.to_string(),
            kind: kind_code(kind),
            exclude,
            data: data.to_vec(),
        });
    }

    pub fn send_to_all(&mut self, data: &[u8], kind: Kind, exclude: Option<u64>) {
        let exclude = exclude.map(|c| self.gid(c));
        self.route(BusMsg::ToAll {
            kind: kind_code(kind),
            exclude,
            data: data.to_vec(),
        });
    }

    pub fn send_to_uid(&mut self, uid: &str, data: &[u8], kind: Kind) {
        self.route(BusMsg::ToUid {
            uid: uid.to_string(),
            kind: kind_code(kind),
            data: data.to_vec(),
        });
    }

    /// Sends a routed message: to the other workers first (they deliver in
    /// parallel with us), then to this worker's own connections.
    fn route(&mut self, msg: BusMsg) {
        self.publish_bus(&msg);
        self.deliver(&msg);
    }

    pub fn publish(&mut self, topic: &str, data: &[u8]) {
        self.deferred
            .push_back(Deferred::Publish(topic.to_string(), data.to_vec()));
        self.publish_bus(&BusMsg::Publish {
            topic: topic.to_string(),
            data: data.to_vec(),
        });
    }

    /// Sends a routed message to this worker's connections it targets.
    pub fn deliver(&mut self, msg: &BusMsg) {
        let (targets, kind, data): (Vec<u64>, u8, &[u8]) = match msg {
            BusMsg::ToGroup {
                group,
                kind,
                exclude,
                data,
            } => {
                // Every worker walks the whole group: a plain loop, with
                // `local_of` inlined, costs a third of the adapters' chain.
                let mut ids = Vec::new();
                for g in self.registry.members(group) {
                    if Some(g) != *exclude {
                        if let Some(id) = self.local_of(g) {
                            ids.push(id);
                        }
                    }
                }
                // In slab order rather than the set's: each member's
                // connection (and its codec, allocated at accept) is then
                // read in memory order, which the cache prefetches; in
                // hash order nearly every member was two cache misses.
                ids.sort_unstable_by_key(|&id| super::core::slot(id));
                (ids, *kind, data)
            }
            BusMsg::ToUid { uid, kind, data } => (
                self.registry
                    .uid_conns(uid)
                    .filter_map(|g| self.local_of(g))
                    .collect(),
                *kind,
                data,
            ),
            BusMsg::ToAll {
                kind,
                exclude,
                data,
            } => (
                self.conns
                    .iter()
                    .filter(|(_, c)| c.state == State::Open && c.established())
                    .map(|(_, c)| c.id)
                    .filter(|id| !(self.skip_adopted && self.adopted.contains_key(id)))
                    .filter(|id| Some(self.gid(*id)) != *exclude)
                    .collect(),
                *kind,
                data,
            ),
            _ => return,
        };
        let kind = kind_from(kind);
        // Framed once for the members whose codec frames alike (those of
        // this worker's listener): bytes, and which codec framed them. The
        // buffer is kept between deliveries, so framing allocates nothing.
        thread_local! {
            static FRAMED: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
        }
        let mut framed = FRAMED.take();
        let mut framed_by = None;
        for id in targets {
            match self.get(id) {
                Some(c) if c.state == State::Open && c.established() => {
                    let by = (
                        std::mem::discriminant(&c.codec),
                        matches!(&c.codec, Codec::Websocket(ws) if ws.role() == Role::Client),
                    );
                    if framed_by != Some(by) {
                        framed.clear();
                        framed_by = match c.codec.encode_into(data, kind, &mut framed) {
                            Some(Ok(())) => Some(by),
                            _ => None,
                        };
                    }
                    if framed_by.is_some() {
                        self.send_framed(id, &framed);
                    } else {
                        // HTTP, custom://, websocket clients, too large.
                        self.send_kind(id, data, kind);
                    }
                }
                // A member that is gone is counted, not an error.
                _ => self.send_fail += 1,
            }
        }
        framed.clear();
        FRAMED.set(framed);
    }

    /// A frame relayed from another worker.
    pub fn on_bus_frame(&mut self, frame: &[u8]) {
        let msg = match bus::decode(frame) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("bad bus frame: {e}");
                return;
            }
        };
        match &msg {
            BusMsg::ToGroup { .. } | BusMsg::ToUid { .. } | BusMsg::ToAll { .. } => {
                self.deliver(&msg)
            }
            BusMsg::Publish { topic, data } => self
                .deferred
                .push_back(Deferred::Publish(topic.clone(), data.clone())),
            _ => {
                self.registry.apply(&msg);
            }
        }
    }
}
