//! A multi-room chat over websockets, spread over many worker processes.
//!
//! One plugin serves two listeners of one host:
//! - a `websocket://` group speaks the JSON protocol of [`protocol`] (see the
//!   crate's README.md). Rooms are host groups, names are bound uids, so
//!   delivery and presence span every worker. Each `say` is also published
//!   to every worker, which keeps the last messages of each room
//!   ([`history`]), so a newcomer gets the same history wherever it lands.
//!   Presence is published too, see [`PRESENCE_TOPIC`].
//! - an `http://` group answers `GET /config.json` with the websocket port;
//!   the page itself is served by the host from `static_dir`.
//!
//! On reload each worker hands its connections to its replacement
//! ([`handover`]): pages stay connected, with history and presence intact,
//! and nobody sees a leave or a join.
//!
//! Options: `idle_timeout_ms` (websocket group, default 55000, 0 = never)
//! closes connections that sent nothing for that long; `ws_port` (http group)
//! is the port the page connects to.

pub mod handover;
pub mod history;
pub mod protocol;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use plugin_api::{export_plugin, Build, ConnId, Context, Plugin, Request, StartError, TimerId};

use crate::handover::{ConnState, WorkerState};
use crate::history::History;
use crate::protocol::{ChatMessage, ClientMsg, Invalid};

/// The publish topic that carries chat messages to every worker.
pub const TOPIC: &str = "chat";
/// The publish topic that says "the members of this room changed" (the data
/// is the room). Each worker then sends the room's online list, as its own
/// registry has it, to its own members of the room.
///
/// Computing the list once, in the worker where the change happened, and
/// sending it with `send_to_group` goes wrong when two workers change a room
/// at the same moment: each list misses the other's change, and both rooms'
/// members are left with a stale list. A worker handles a publish only after
/// the membership changes that the publishing worker made before it, so the
/// last list each worker sends is complete.
pub const PRESENCE_TOPIC: &str = "chat.presence";
/// Default for the `idle_timeout_ms` option.
pub const DEFAULT_IDLE_MS: u64 = 55_000;
/// The idle check runs at least this often.
const MAX_SWEEP: Duration = Duration::from_millis(5_000);
/// Online lists go out at most this often per worker.
pub const PRESENCE_BATCH: Duration = Duration::from_millis(100);

/// Reads `idle_timeout_ms`: `None` when the timeout is off (`0`).
pub fn idle_timeout(option: Option<&str>) -> Result<Option<Duration>, String> {
    let ms = match option {
        None => DEFAULT_IDLE_MS,
        Some(v) => v.trim().parse::<u64>().map_err(|_| {
            format!("option idle_timeout_ms: {v:?} is not a whole number of milliseconds")
        })?,
    };
    Ok((ms > 0).then(|| Duration::from_millis(ms)))
}

/// How often to look for idle connections: min(5 s, idle / 4).
pub fn sweep_interval(idle: Duration) -> Duration {
    (idle / 4).clamp(Duration::from_millis(1), MAX_SWEEP)
}

/// The answer to `GET /config.json`: status and JSON body.
pub fn config_response(ws_port: Option<&str>) -> (u16, String) {
    match ws_port.map(|p| p.trim().parse::<u16>()) {
        Some(Ok(port)) if port != 0 => (200, format!("{{\"ws_port\":{port}}}")),
        Some(_) => (500, "{\"error\":\"option ws_port is not a port\"}".into()),
        None => (500, "{\"error\":\"option ws_port is not set\"}".into()),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One websocket connection of this worker.
#[derive(Debug)]
struct Session {
    last_seen: Instant,
    /// The name of the last `join`.
    name: Option<String>,
    room: Option<String>,
    /// Closed for idleness, waiting for `on_close`.
    closing: bool,
}

impl Session {
    fn new(now: Instant) -> Session {
        Session {
            last_seen: now,
            name: None,
            room: None,
            closing: false,
        }
    }
}

/// The plugin object of one worker.
#[derive(Debug, Default)]
pub struct Chat {
    /// True on the `http://` group: only `on_request` matters there.
    web: bool,
    idle: Option<Duration>,
    sweep: Option<TimerId>,
    sessions: HashMap<ConnId, Session>,
    /// This worker's connections in each room.
    local: HashMap<String, HashSet<ConnId>>,
    history: History,
    /// The handover came from another plugin: its connections are refused.
    foreign: bool,
    /// Rooms whose online list changed since it was last sent…
    presence_due: HashSet<String>,
    /// …sent when this fires: a burst of joins costs one list per member,
    /// not one per join (which grows with the square of the room).
    presence_timer: Option<TimerId>,
}

impl Chat {
    /// Asks every worker to tell its members of `room` who is in it now.
    fn presence_changed(ctx: &mut Context<'_>, room: &str) {
        ctx.publish(PRESENCE_TOPIC, room);
    }

    /// Sends `room`'s online list to this worker's members soon (within
    /// [`PRESENCE_BATCH`]), once however often it changes meanwhile.
    fn presence_later(&mut self, ctx: &mut Context<'_>, room: &str) {
        if self.local.contains_key(room) {
            self.presence_due.insert(room.to_string());
        }
        if !self.presence_due.is_empty() && self.presence_timer.is_none() {
            self.presence_timer = Some(ctx.add_timer(PRESENCE_BATCH, false));
        }
    }

    /// Sends the online list to this worker's members of `room`.
    fn send_presence(&self, ctx: &mut Context<'_>, room: &str) {
        let Some(members) = self.local.get(room) else {
            return;
        };
        let json = protocol::presence_json(room, &ctx.group_uids(room));
        for conn in members {
            // Skip connections closed for idleness that have not gone yet.
            if self.sessions.get(conn).is_some_and(|s| !s.closing) {
                ctx.send(*conn, &json);
            }
        }
    }

    fn enter(local: &mut HashMap<String, HashSet<ConnId>>, conn: ConnId, room: &str) {
        local.entry(room.to_string()).or_default().insert(conn);
    }

    fn exit(local: &mut HashMap<String, HashSet<ConnId>>, conn: ConnId, room: &str) {
        if let Some(members) = local.get_mut(room) {
            members.remove(&conn);
            if members.is_empty() {
                local.remove(room);
            }
        }
    }

    fn handle(
        &mut self,
        ctx: &mut Context<'_>,
        conn: ConnId,
        msg: ClientMsg,
    ) -> Result<(), Invalid> {
        let session = self
            .sessions
            .entry(conn)
            .or_insert_with(|| Session::new(Instant::now()));
        match msg {
            ClientMsg::Ping => {
                ctx.send(conn, protocol::pong_json());
            }
            ClientMsg::Join { room, name } => {
                if let Some(old) = session.room.take() {
                    if old != room {
                        ctx.leave_group(conn, &old);
                        Self::exit(&mut self.local, conn, &old);
                        Self::presence_changed(ctx, &old);
                    }
                }
                // Bind first: presence lists bound members only.
                ctx.bind_uid(conn, &name);
                if !ctx.join_group(conn, &room) {
                    return Ok(()); // the connection is already closing
                }
                session.name = Some(name);
                ctx.send(
                    conn,
                    protocol::history_json(&room, self.history.recent(&room)),
                );
                // The presence goes out after this callback, so after the history.
                Self::enter(&mut self.local, conn, &room);
                Self::presence_changed(ctx, &room);
                session.room = Some(room);
            }
            ClientMsg::Say { text } => {
                let (Some(room), Some(name)) = (&session.room, &session.name) else {
                    return Err(Invalid::NotInRoom);
                };
                let json = ChatMessage {
                    room: room.clone(),
                    from: name.clone(),
                    text,
                    ts: now_ms(),
                }
                .to_json();
                ctx.send_to_group(room, &json, None);
                // History is appended in `on_publish`, in every worker alike.
                ctx.publish(TOPIC, &json);
            }
            ClientMsg::Leave => {
                if let Some(old) = session.room.take() {
                    ctx.leave_group(conn, &old);
                    Self::exit(&mut self.local, conn, &old);
                    Self::presence_changed(ctx, &old);
                }
            }
        }
        Ok(())
    }

    fn close_idle(&mut self, ctx: &mut Context<'_>) {
        let Some(idle) = self.idle else { return };
        let now = Instant::now();
        for (conn, s) in &mut self.sessions {
            let quiet = now.saturating_duration_since(s.last_seen);
            if !s.closing && quiet >= idle {
                s.closing = true;
                ctx.debug(format_args!(
                    "closing connection {conn}: nothing received for {} ms",
                    quiet.as_millis()
                ));
                ctx.close(*conn);
            }
        }
    }
}

impl Plugin for Chat {
    fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
        let worker = ctx.worker();
        self.web = worker.listen.starts_with("http://");
        if self.web {
            if let (500, body) = config_response(ctx.option("ws_port")) {
                ctx.warn(format_args!("/config.json will answer 500: {body}"));
            }
            return Ok(());
        }
        self.idle = idle_timeout(ctx.option("idle_timeout_ms"))?;
        if let Some(idle) = self.idle {
            self.sweep = Some(ctx.add_timer(sweep_interval(idle), true));
        }
        ctx.debug(format_args!(
            "chat worker {} ready, idle timeout {:?}",
            worker.id, self.idle
        ));
        Ok(())
    }

    fn on_connect(&mut self, _ctx: &mut Context<'_>, conn: ConnId) {
        if !self.web {
            self.sessions.insert(conn, Session::new(Instant::now()));
        }
    }

    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
        let now = Instant::now();
        self.sessions
            .entry(conn)
            .or_insert_with(|| Session::new(now))
            .last_seen = now;
        let result = protocol::parse(data).and_then(|msg| self.handle(ctx, conn, msg));
        if let Err(e) = result {
            ctx.send(conn, protocol::error_json(&e.to_string()));
        }
    }

    fn on_close(&mut self, ctx: &mut Context<'_>, conn: ConnId) {
        // The host already took the connection out of its groups, everywhere.
        if let Some(room) = self.sessions.remove(&conn).and_then(|s| s.room) {
            Self::exit(&mut self.local, conn, &room);
            Self::presence_changed(ctx, &room);
        }
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, timer: TimerId) {
        if Some(timer) == self.sweep {
            self.close_idle(ctx);
        } else if Some(timer) == self.presence_timer {
            self.presence_timer = None;
            let mut due: Vec<String> = self.presence_due.drain().collect();
            due.sort();
            for room in due {
                self.send_presence(ctx, &room);
            }
        }
    }

    fn on_publish(&mut self, ctx: &mut Context<'_>, topic: &str, data: &[u8]) {
        match topic {
            TOPIC => match ChatMessage::from_json(data) {
                Some(msg) => self.history.push(msg),
                None => ctx.warn("ignoring a malformed chat message on the bus"),
            },
            PRESENCE_TOPIC => match std::str::from_utf8(data) {
                Ok(room) => self.presence_later(ctx, room),
                Err(_) => ctx.warn("ignoring a malformed presence event on the bus"),
            },
            _ => {}
        }
    }

    fn handover(&self) -> bool {
        true
    }

    // Exports only read: if the handover is aborted, this build serves on.
    fn on_export(&mut self, _ctx: &mut Context<'_>) -> Vec<u8> {
        let mut state = WorkerState::new(self.history.by_age());
        state.presence_due = self.presence_due.iter().cloned().collect();
        state.encode()
    }

    fn on_export_conn(&mut self, _ctx: &mut Context<'_>, conn: ConnId) -> Vec<u8> {
        let s = self.sessions.get(&conn);
        let quiet = s.map_or(Duration::ZERO, |s| s.last_seen.elapsed());
        ConnState::new(
            s.and_then(|s| s.name.clone()),
            s.and_then(|s| s.room.clone()),
            u64::try_from(quiet.as_millis()).unwrap_or(u64::MAX),
        )
        .encode()
    }

    fn on_import(
        &mut self,
        ctx: &mut Context<'_>,
        from: &Build<'_>,
        state: &[u8],
    ) -> Result<(), StartError> {
        if from.name != env!("CARGO_PKG_NAME") {
            // Switching plugins: its clients speak something else.
            ctx.warn(format_args!(
                "handover from {} {}: not a chat build, its connections are closed",
                from.name, from.version
            ));
            self.foreign = true;
            return Ok(());
        }
        let old = WorkerState::decode(state)
            .map_err(|e| format!("{e} (from {} {})", from.name, from.version))?;
        // Publishes that reached this worker since it started are in both.
        self.history.merge_older(old.history);
        // Lists the old build owed; sent once the connections are here.
        self.presence_due.extend(old.presence_due);
        if !self.presence_due.is_empty() && self.presence_timer.is_none() {
            self.presence_timer = Some(ctx.add_timer(PRESENCE_BATCH, false));
        }
        Ok(())
    }

    fn on_import_conn(
        &mut self,
        ctx: &mut Context<'_>,
        conn: ConnId,
        _from: &Build<'_>,
        state: &[u8],
    ) -> bool {
        if self.foreign {
            return false;
        }
        if self.web {
            return true;
        }
        let c = match ConnState::decode(state) {
            Ok(c) => c,
            Err(e) => {
                ctx.warn(format_args!("refusing connection {conn}: {e}"));
                return false;
            }
        };
        // Its group and uid came along: no presence to announce.
        if let Some(room) = &c.room {
            Self::enter(&mut self.local, conn, room);
        }
        let now = Instant::now();
        self.sessions.insert(
            conn,
            Session {
                // The idle clock carries on where the old build left it.
                last_seen: now
                    .checked_sub(Duration::from_millis(c.quiet_ms))
                    .unwrap_or(now),
                name: c.name,
                room: c.room,
                closing: false,
            },
        );
        true
    }

    fn on_request(&mut self, ctx: &mut Context<'_>, conn: ConnId, req: &Request<'_>) {
        if req.path() == "/config.json" && matches!(req.method(), "GET" | "HEAD") {
            let (status, body) = config_response(ctx.option("ws_port"));
            ctx.respond(
                conn,
                status,
                &[
                    ("Content-Type", "application/json"),
                    ("Cache-Control", "no-store"),
                ],
                body.as_bytes(),
            );
        } else {
            ctx.respond(
                conn,
                404,
                &[("Content-Type", "text/plain; charset=utf-8")],
                b"404 Not Found\n",
            );
        }
    }
}

export_plugin!(Chat);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_timeout_option() {
        assert_eq!(idle_timeout(None), Ok(Some(Duration::from_millis(55_000))));
        assert_eq!(
            idle_timeout(Some("1500")),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert_eq!(idle_timeout(Some("0")), Ok(None));
        assert!(idle_timeout(Some("soon")).unwrap_err().contains("soon"));
        assert!(idle_timeout(Some("-5")).is_err());
    }

    #[test]
    fn sweeps_every_quarter_of_the_timeout_up_to_five_seconds() {
        let ms = Duration::from_millis;
        assert_eq!(sweep_interval(ms(55_000)), ms(5_000));
        assert_eq!(sweep_interval(ms(20_000)), ms(5_000));
        assert_eq!(sweep_interval(ms(2_000)), ms(500));
        assert_eq!(sweep_interval(ms(2)), ms(1));
    }

    #[test]
    fn config_json() {
        assert_eq!(
            config_response(Some("7272")),
            (200, r#"{"ws_port":7272}"#.to_string())
        );
        assert_eq!(config_response(None).0, 500);
        assert_eq!(config_response(Some("http")).0, 500);
        assert_eq!(config_response(Some("0")).0, 500);
        let v: serde_json::Value = serde_json::from_str(&config_response(None).1).unwrap();
        assert!(v["error"].is_string());
    }
}
