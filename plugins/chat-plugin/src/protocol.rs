//! The chat's JSON protocol: parsing and validating what clients send, and
//! building what the server sends back.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Longest name, room and message text, in characters, after trimming.
pub const MAX_NAME: usize = 32;
pub const MAX_ROOM: usize = 64;
pub const MAX_TEXT: usize = 2000;

/// A message from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientMsg {
    /// `{"type":"join","room":R,"name":N}`
    Join { room: String, name: String },
    /// `{"type":"say","text":T}`
    Say { text: String },
    /// `{"type":"leave"}`
    Leave,
    /// `{"type":"ping"}`
    Ping,
}

/// Why a client message was refused; its `Display` is the `reason` sent back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    Json,
    NotAnObject,
    NoType,
    UnknownType(String),
    NotAString(&'static str),
    Length {
        field: &'static str,
        max: usize,
    },
    ControlChars(&'static str),
    /// `say` before any `join`.
    NotInRoom,
}

impl fmt::Display for Invalid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Invalid::Json => f.write_str("invalid JSON"),
            Invalid::NotAnObject => f.write_str("a message must be a JSON object"),
            Invalid::NoType => f.write_str("missing \"type\""),
            Invalid::UnknownType(t) => write!(f, "unknown type {t:?}"),
            Invalid::NotAString(field) => write!(f, "{field} must be a string"),
            Invalid::Length { field, max } => write!(f, "{field} must be 1 to {max} characters"),
            Invalid::ControlChars(field) => {
                write!(f, "{field} must not contain control characters")
            }
            Invalid::NotInRoom => f.write_str("join a room first"),
        }
    }
}

impl std::error::Error for Invalid {}

/// A string field, trimmed, with its length checked in characters.
fn field(
    obj: &Map<String, Value>,
    name: &'static str,
    max: usize,
    single_line: bool,
) -> Result<String, Invalid> {
    let s = match obj.get(name) {
        Some(Value::String(s)) => s.trim(),
        _ => return Err(Invalid::NotAString(name)),
    };
    let len = s.chars().count();
    if len == 0 || len > max {
        return Err(Invalid::Length { field: name, max });
    }
    if single_line && s.chars().any(char::is_control) {
        return Err(Invalid::ControlChars(name));
    }
    Ok(s.to_string())
}

/// Parses and validates one client message. Unknown extra fields are ignored.
pub fn parse(data: &[u8]) -> Result<ClientMsg, Invalid> {
    let value: Value = serde_json::from_slice(data).map_err(|_| Invalid::Json)?;
    let Value::Object(obj) = value else {
        return Err(Invalid::NotAnObject);
    };
    let Some(Value::String(kind)) = obj.get("type") else {
        return Err(Invalid::NoType);
    };
    match kind.as_str() {
        "join" => Ok(ClientMsg::Join {
            room: field(&obj, "room", MAX_ROOM, true)?,
            name: field(&obj, "name", MAX_NAME, true)?,
        }),
        "say" => Ok(ClientMsg::Say {
            text: field(&obj, "text", MAX_TEXT, false)?,
        }),
        "leave" => Ok(ClientMsg::Leave),
        "ping" => Ok(ClientMsg::Ping),
        other => Err(Invalid::UnknownType(other.to_string())),
    }
}

/// One chat message: what `say` produces, what history keeps, and the
/// payload published to every worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub room: String,
    pub from: String,
    pub text: String,
    /// Unix time in milliseconds.
    pub ts: u64,
}

impl ChatMessage {
    /// `{"type":"message",...}`: sent to the room and published as is.
    pub fn to_json(&self) -> String {
        encode(&Out::Message(self))
    }

    /// Reads what [`ChatMessage::to_json`] wrote.
    pub fn from_json(data: &[u8]) -> Option<ChatMessage> {
        serde_json::from_slice(data).ok()
    }
}

/// What the server sends.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum Out<'a> {
    Message(&'a ChatMessage),
    History {
        room: &'a str,
        messages: Vec<Out<'a>>,
    },
    Presence {
        room: &'a str,
        online: &'a [String],
    },
    Pong,
    Error {
        reason: &'a str,
    },
}

fn encode(out: &Out<'_>) -> String {
    serde_json::to_string(out).expect("string-keyed JSON always serializes")
}

/// `{"type":"history","room":R,"messages":[...]}`, oldest first.
pub fn history_json<'a>(room: &str, messages: impl IntoIterator<Item = &'a ChatMessage>) -> String {
    encode(&Out::History {
        room,
        messages: messages.into_iter().map(Out::Message).collect(),
    })
}

/// `{"type":"presence","room":R,"online":[...]}`; `online` as given (sorted).
pub fn presence_json(room: &str, online: &[String]) -> String {
    encode(&Out::Presence { room, online })
}

/// `{"type":"pong"}`
pub fn pong_json() -> String {
    encode(&Out::Pong)
}

/// `{"type":"error","reason":...}`
pub fn error_json(reason: &str) -> String {
    encode(&Out::Error { reason })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn reason(data: &str) -> String {
        parse(data.as_bytes()).unwrap_err().to_string()
    }

    #[test]
    fn parses_every_client_message() {
        assert_eq!(
            parse(br#"{"type":"join","room":" lobby ","name":"ann","extra":1}"#),
            Ok(ClientMsg::Join {
                room: "lobby".into(),
                name: "ann".into()
            })
        );
        assert_eq!(
            parse(br#"{"type":"say","text":"  hi\nthere "}"#),
            Ok(ClientMsg::Say {
                text: "hi\nthere".into()
            })
        );
        assert_eq!(parse(br#"{"type":"leave"}"#), Ok(ClientMsg::Leave));
        assert_eq!(parse(br#" {"type":"ping"} "#), Ok(ClientMsg::Ping));
    }

    #[test]
    fn refuses_malformed_messages_with_a_reason() {
        assert_eq!(reason("{nope"), "invalid JSON");
        assert_eq!(reason(""), "invalid JSON");
        assert_eq!(reason("[1,2]"), "a message must be a JSON object");
        assert_eq!(reason(r#"{"room":"x"}"#), "missing \"type\"");
        assert_eq!(reason(r#"{"type":3}"#), "missing \"type\"");
        assert_eq!(reason(r#"{"type":"shout"}"#), "unknown type \"shout\"");
        assert_eq!(
            reason(r#"{"type":"join","room":"x"}"#),
            "name must be a string"
        );
        assert_eq!(
            reason(r#"{"type":"join","room":"x","name":7}"#),
            "name must be a string"
        );
        assert_eq!(reason(r#"{"type":"say"}"#), "text must be a string");
        assert!(parse(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn lengths_are_checked_in_characters_after_trimming() {
        let join = |room: &str, name: &str| {
            parse(
                json!({"type":"join","room":room,"name":name})
                    .to_string()
                    .as_bytes(),
            )
        };
        let say = |text: &str| parse(json!({"type":"say","text":text}).to_string().as_bytes());

        assert!(join("r", &"n".repeat(MAX_NAME)).is_ok());
        // Multi-byte characters count once each.
        assert!(join("r", &"é".repeat(MAX_NAME)).is_ok());
        assert_eq!(
            join("r", &"n".repeat(MAX_NAME + 1))
                .unwrap_err()
                .to_string(),
            "name must be 1 to 32 characters"
        );
        assert_eq!(
            join("r", "   ").unwrap_err().to_string(),
            "name must be 1 to 32 characters"
        );
        assert!(join(&"r".repeat(MAX_ROOM), "n").is_ok());
        assert_eq!(
            join(&"r".repeat(MAX_ROOM + 1), "n")
                .unwrap_err()
                .to_string(),
            "room must be 1 to 64 characters"
        );
        assert_eq!(
            join("", "n").unwrap_err(),
            Invalid::Length {
                field: "room",
                max: MAX_ROOM
            }
        );
        assert_eq!(
            join("r", "a\u{7}b").unwrap_err().to_string(),
            "name must not contain control characters"
        );

        assert!(say(&"t".repeat(MAX_TEXT)).is_ok());
        assert!(say(&format!("  {}  ", "t".repeat(MAX_TEXT))).is_ok());
        assert_eq!(
            say(&"t".repeat(MAX_TEXT + 1)).unwrap_err().to_string(),
            "text must be 1 to 2000 characters"
        );
        assert_eq!(
            say("\n\t ").unwrap_err().to_string(),
            "text must be 1 to 2000 characters"
        );
    }

    fn value(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    fn msg(text: &str, ts: u64) -> ChatMessage {
        ChatMessage {
            room: "lobby".into(),
            from: "ann".into(),
            text: text.into(),
            ts,
        }
    }

    #[test]
    fn server_messages_have_the_documented_shapes() {
        let m = msg("hi \"there\" <b>", 1_700_000_000_123);
        assert_eq!(
            value(&m.to_json()),
            json!({"type":"message","room":"lobby","from":"ann","text":"hi \"there\" <b>","ts":1_700_000_000_123u64})
        );
        assert!(m.to_json().starts_with(r#"{"type":"message","#));
        assert_eq!(
            value(&history_json("lobby", [&msg("a", 1), &msg("b", 2)])),
            json!({"type":"history","room":"lobby","messages":[
                {"type":"message","room":"lobby","from":"ann","text":"a","ts":1},
                {"type":"message","room":"lobby","from":"ann","text":"b","ts":2},
            ]})
        );
        assert_eq!(
            value(&history_json("empty", [])),
            json!({"type":"history","room":"empty","messages":[]})
        );
        assert_eq!(
            value(&presence_json("lobby", &["ann".into(), "bob".into()])),
            json!({"type":"presence","room":"lobby","online":["ann","bob"]})
        );
        assert_eq!(value(&pong_json()), json!({"type":"pong"}));
        assert_eq!(
            value(&error_json("join a room first")),
            json!({"type":"error","reason":"join a room first"})
        );
    }

    #[test]
    fn published_messages_round_trip() {
        let m = msg("ünïcode ✓", 42);
        assert_eq!(ChatMessage::from_json(m.to_json().as_bytes()), Some(m));
        assert_eq!(ChatMessage::from_json(b"{\"type\":\"message\"}"), None);
        assert_eq!(ChatMessage::from_json(b"garbage"), None);
    }
}
