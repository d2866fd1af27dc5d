//! The last messages of each room, kept by every worker.

use std::collections::{HashMap, VecDeque};

use crate::protocol::ChatMessage;

/// Messages kept per room.
pub const HISTORY_LEN: usize = 50;
/// Rooms kept; past this, the room that has been quiet longest is forgotten.
pub const MAX_ROOMS: usize = 1000;

/// A ring of the last messages per room, fed in publish order, so every
/// worker holds the same rooms and messages.
#[derive(Debug)]
pub struct History {
    rooms: HashMap<String, Room>,
    per_room: usize,
    max_rooms: usize,
    /// Counts pushes; a room remembers the last one it got.
    clock: u64,
}

#[derive(Debug)]
struct Room {
    messages: VecDeque<ChatMessage>,
    touched: u64,
}

impl Default for History {
    fn default() -> Self {
        History::new(HISTORY_LEN, MAX_ROOMS)
    }
}

impl History {
    pub fn new(per_room: usize, max_rooms: usize) -> History {
        History {
            rooms: HashMap::new(),
            per_room: per_room.max(1),
            max_rooms: max_rooms.max(1),
            clock: 0,
        }
    }

    /// Appends a message to its room, dropping the room's oldest if full.
    pub fn push(&mut self, msg: ChatMessage) {
        self.clock += 1;
        if !self.rooms.contains_key(&msg.room) && self.rooms.len() >= self.max_rooms {
            self.evict_quietest();
        }
        let room = self.rooms.entry(msg.room.clone()).or_insert_with(|| Room {
            messages: VecDeque::with_capacity(self.per_room),
            touched: 0,
        });
        if room.messages.len() == self.per_room {
            room.messages.pop_front();
        }
        room.messages.push_back(msg);
        room.touched = self.clock;
    }

    fn evict_quietest(&mut self) {
        let quietest = self
            .rooms
            .iter()
            .min_by_key(|(_, r)| r.touched)
            .map(|(name, _)| name.clone());
        if let Some(name) = quietest {
            self.rooms.remove(&name);
        }
    }

    /// The room's kept messages, oldest first.
    pub fn recent(&self, room: &str) -> impl Iterator<Item = &ChatMessage> {
        self.rooms
            .get(room)
            .into_iter()
            .flat_map(|r| r.messages.iter())
    }

    /// Number of rooms with history.
    pub fn rooms(&self) -> usize {
        self.rooms.len()
    }

    /// Every kept message, the quietest room first, each room oldest
    /// first: pushed in this order into an empty history, they rebuild
    /// this one (rooms and their eviction order).
    pub fn by_age(&self) -> Vec<ChatMessage> {
        let mut rooms: Vec<&Room> = self.rooms.values().collect();
        rooms.sort_by_key(|r| r.touched);
        rooms
            .into_iter()
            .flat_map(|r| r.messages.iter().cloned())
            .collect()
    }

    /// Puts `older` (a [`History::by_age`] of a worker that saw the same
    /// publishes up to some point) before what this history holds. Both may
    /// hold the messages published in between: each is kept once.
    pub fn merge_older(&mut self, older: Vec<ChatMessage>) {
        let mine = self.by_age();
        let mut merged = History::new(self.per_room, self.max_rooms);
        for msg in older {
            merged.push(msg);
        }
        for msg in mine {
            if !merged.recent(&msg.room).any(|m| *m == msg) {
                merged.push(msg);
            }
        }
        *self = merged;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(room: &str, n: u64) -> ChatMessage {
        ChatMessage {
            room: room.into(),
            from: "ann".into(),
            text: format!("m{n}"),
            ts: n,
        }
    }

    fn texts(h: &History, room: &str) -> Vec<String> {
        h.recent(room).map(|m| m.text.clone()).collect()
    }

    #[test]
    fn keeps_the_last_fifty_per_room_oldest_first() {
        let mut h = History::default();
        for n in 0..120 {
            h.push(msg("lobby", n));
        }
        h.push(msg("other", 0));
        let want: Vec<String> = (70..120).map(|n| format!("m{n}")).collect();
        assert_eq!(texts(&h, "lobby"), want);
        assert_eq!(texts(&h, "other"), vec!["m0"]);
        assert_eq!(h.recent("nowhere").count(), 0);
    }

    #[test]
    fn a_short_room_keeps_everything() {
        let mut h = History::new(3, 10);
        h.push(msg("r", 1));
        h.push(msg("r", 2));
        assert_eq!(texts(&h, "r"), vec!["m1", "m2"]);
        h.push(msg("r", 3));
        h.push(msg("r", 4));
        assert_eq!(texts(&h, "r"), vec!["m2", "m3", "m4"]);
    }

    #[test]
    fn by_age_rebuilds_the_same_history() {
        let mut h = History::new(3, 2);
        for (room, n) in [("a", 1), ("b", 2), ("a", 3), ("a", 4), ("a", 5)] {
            h.push(msg(room, n));
        }
        let mut copy = History::new(3, 2);
        for m in h.by_age() {
            copy.push(m);
        }
        assert_eq!(copy.by_age(), h.by_age());
        assert_eq!(texts(&copy, "a"), vec!["m3", "m4", "m5"]);
        // "b" is still the quietest: a new room evicts it, not "a".
        copy.push(msg("c", 6));
        assert_eq!(copy.recent("b").count(), 0);
        assert_eq!(texts(&copy, "a"), vec!["m3", "m4", "m5"]);
    }

    #[test]
    fn merging_an_older_history_keeps_each_message_once() {
        let mut old = History::default();
        let mut new = History::default();
        for n in 0..4 {
            old.push(msg("r", n));
        }
        // The new worker saw the last two publishes too, then one more.
        for n in 2..5 {
            new.push(msg("r", n));
        }
        new.push(msg("s", 9));
        new.merge_older(old.by_age());
        assert_eq!(texts(&new, "r"), vec!["m0", "m1", "m2", "m3", "m4"]);
        assert_eq!(texts(&new, "s"), vec!["m9"]);
        // Into an empty history: the older one as it was.
        let mut empty = History::default();
        empty.merge_older(old.by_age());
        assert_eq!(empty.by_age(), old.by_age());
    }

    #[test]
    fn too_many_rooms_forgets_the_quietest() {
        let mut h = History::new(5, 2);
        h.push(msg("a", 1));
        h.push(msg("b", 2));
        h.push(msg("a", 3));
        h.push(msg("c", 4));
        assert_eq!(h.rooms(), 2);
        assert_eq!(h.recent("b").count(), 0);
        assert_eq!(texts(&h, "a"), vec!["m1", "m3"]);
        assert_eq!(texts(&h, "c"), vec!["m4"]);
    }
}
