//! What a chat worker hands to its replacement on reload: the history it
//! kept, and each connection's name, room and idle clock. Rooms and names
//! live in the host's groups and uid bindings, which move with the
//! connections, so nobody sees a leave or a join.
//!
//! The format is JSON with a version `v`. Fields may be added (with serde
//! defaults) without a new version: older builds ignore them. A version
//! this build does not know is refused, which aborts the handover: the old
//! build keeps its connections and the reload reports why.

use serde::{Deserialize, Serialize};

use crate::protocol::ChatMessage;

/// The handover format this build writes and reads.
pub const VERSION: u32 = 1;

/// A worker's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerState {
    pub v: u32,
    /// Every kept message, the quietest room first, each room oldest first:
    /// pushed back in this order they make the same history.
    pub history: Vec<ChatMessage>,
    /// Rooms whose online list was still to be sent.
    #[serde(default)]
    pub presence_due: Vec<String>,
}

/// One connection's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnState {
    pub v: u32,
    /// The name of the last `join`.
    pub name: Option<String>,
    pub room: Option<String>,
    /// Milliseconds since the connection last sent something.
    pub quiet_ms: u64,
}

#[derive(Deserialize)]
struct Versioned {
    v: u32,
}

/// Reads `data` as a `T` of format [`VERSION`]; the error says why not.
fn decode<'a, T: Deserialize<'a>>(data: &'a [u8]) -> Result<T, String> {
    let Versioned { v } =
        serde_json::from_slice(data).map_err(|e| format!("unreadable chat handover state: {e}"))?;
    if v != VERSION {
        return Err(format!(
            "chat handover state has format v{v}; this build reads v{VERSION}"
        ));
    }
    serde_json::from_slice(data).map_err(|e| format!("bad chat handover state v{v}: {e}"))
}

impl WorkerState {
    pub fn new(history: Vec<ChatMessage>) -> WorkerState {
        WorkerState {
            v: VERSION,
            history,
            presence_due: Vec::new(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain structs serialize")
    }

    pub fn decode(data: &[u8]) -> Result<WorkerState, String> {
        decode(data)
    }
}

impl ConnState {
    pub fn new(name: Option<String>, room: Option<String>, quiet_ms: u64) -> ConnState {
        ConnState {
            v: VERSION,
            name,
            room,
            quiet_ms,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain structs serialize")
    }

    pub fn decode(data: &[u8]) -> Result<ConnState, String> {
        decode(data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(room: &str, text: &str) -> ChatMessage {
        ChatMessage {
            room: room.into(),
            from: "ann".into(),
            text: text.into(),
            ts: 7,
        }
    }

    #[test]
    fn states_round_trip() {
        let w = WorkerState::new(vec![msg("a", "1"), msg("b", "ünï\n\"2\"")]);
        assert_eq!(WorkerState::decode(&w.encode()), Ok(w));
        let c = ConnState::new(Some("ann".into()), Some("lobby".into()), 1500);
        assert_eq!(ConnState::decode(&c.encode()), Ok(c));
        let fresh = ConnState::new(None, None, 0);
        assert_eq!(ConnState::decode(&fresh.encode()), Ok(fresh));
    }

    #[test]
    fn added_fields_are_ignored_and_other_versions_refused() {
        // A later build that only added a field keeps v1: still readable.
        let later = br#"{"v":1,"name":"ann","room":"r","quiet_ms":5,"mood":"happy"}"#;
        assert_eq!(
            ConnState::decode(later),
            Ok(ConnState::new(Some("ann".into()), Some("r".into()), 5))
        );
        let future = br#"{"v":2,"rooms":{}}"#;
        assert_eq!(
            WorkerState::decode(future),
            Err("chat handover state has format v2; this build reads v1".into())
        );
        assert!(ConnState::decode(br#"{"v":0}"#).is_err());
        assert!(WorkerState::decode(br#"{"v":1}"#)
            .unwrap_err()
            .starts_with("bad chat handover state v1"));
        for junk in [
            &b""[..],
            b"null",
            b"[\"x\"]",
            b"{\"history\":[]}",
            &[0xff, 0xfe],
        ] {
            let e = WorkerState::decode(junk).unwrap_err();
            assert!(e.starts_with("unreadable"), "{e}");
        }
    }
}
