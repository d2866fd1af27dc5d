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
