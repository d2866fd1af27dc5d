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
    //! The plugin driven through `plugin_api::testing`: one worker in-process,
    //! its callbacks fired as the host would, its sends read back.

    use plugin_api::testing::{Builder, TestHost, TestRequest};
    use plugin_api::Level;
    use serde_json::{json, Value};

    use super::*;

    fn ws_host(options: &[(&str, &str)]) -> TestHost<Chat> {
        let mut b = Builder::new()
            .name("chat")
            .listen("websocket://127.0.0.1:7272")
            .crate_info(env!("CARGO_PKG_NAME"), env!("CARGO_PKG_VERSION"));
        for (k, v) in options {
            b = b.option(k, v);
        }
        let mut host = b.build(Chat::default());
        host.start().unwrap();
        host
    }

    fn client(host: &mut TestHost<Chat>) -> ConnId {
        host.connect_websocket(&TestRequest::get("/")).unwrap()
    }

    /// What `conn` was sent since last asked, as JSON.
    fn got(host: &mut TestHost<Chat>, conn: ConnId) -> Vec<Value> {
        host.recv(conn)
            .iter()
            .map(|m| serde_json::from_slice(&m.data).unwrap())
            .collect()
    }

    fn send(host: &mut TestHost<Chat>, conn: ConnId, msg: Value) {
        host.message(conn, msg.to_string());
    }

    fn join(host: &mut TestHost<Chat>, conn: ConnId, room: &str, name: &str) {
        send(
            host,
            conn,
            json!({"type": "join", "room": room, "name": name}),
        );
    }

    /// Lets the presence batch go out.
    fn flush_presence(host: &mut TestHost<Chat>) {
        host.advance(PRESENCE_BATCH);
    }

    #[test]
    fn join_answers_history_then_everyone_gets_one_presence() {
        let mut host = ws_host(&[]);
        let (alice, bob) = (client(&mut host), client(&mut host));
        join(&mut host, alice, "lobby", "alice");
        join(&mut host, bob, "lobby", "bob");
        assert_eq!(host.groups(alice), ["lobby"]);
        assert_eq!(host.uid(bob).as_deref(), Some("bob"));
        let history = json!({"type": "history", "room": "lobby", "messages": []});
        for c in [alice, bob] {
            assert_eq!(got(&mut host, c), std::slice::from_ref(&history));
        }
        // Two joins within the batch: one list each, with both names.
        flush_presence(&mut host);
        let presence = json!({"type": "presence", "room": "lobby", "online": ["alice", "bob"]});
        for c in [alice, bob] {
            assert_eq!(got(&mut host, c), std::slice::from_ref(&presence));
        }
    }

    #[test]
    fn say_reaches_the_room_only_and_becomes_history() {
        let mut host = ws_host(&[]);
        let (alice, bob, carol) = (client(&mut host), client(&mut host), client(&mut host));
        join(&mut host, alice, "lobby", "alice");
        join(&mut host, bob, "lobby", "bob");
        join(&mut host, carol, "elsewhere", "carol");
        flush_presence(&mut host);
        for c in [alice, bob, carol] {
            host.recv(c);
        }
        send(
            &mut host,
            alice,
            json!({"type": "say", "text": "  hi all "}),
        );
        for c in [alice, bob] {
            let msgs = got(&mut host, c);
            assert_eq!(msgs.len(), 1, "{msgs:?}");
            assert_eq!(msgs[0]["type"], "message");
            assert_eq!(msgs[0]["from"], "alice");
            assert_eq!(msgs[0]["text"], "hi all");
        }
        assert!(host.recv(carol).is_empty());
        // The say was published; every worker (this one too) keeps it.
        let dave = client(&mut host);
        join(&mut host, dave, "lobby", "dave");
        let history = &got(&mut host, dave)[0];
        assert_eq!(history["messages"][0]["text"], "hi all");
    }

    #[test]
    fn history_comes_from_every_workers_publishes() {
        let mut host = ws_host(&[]);
        let other_worker = ChatMessage {
            room: "lobby".into(),
            from: "zed".into(),
            text: "from worker 1".into(),
            ts: 1,
        };
        host.publish(TOPIC, other_worker.to_json());
        host.publish(TOPIC, "not json");
        assert!(host.logged(Level::Warn, "malformed chat message"));
        let c = client(&mut host);
        join(&mut host, c, "lobby", "amy");
        assert_eq!(got(&mut host, c)[0]["messages"][0]["from"], "zed");
    }

    #[test]
    fn bad_messages_get_an_error_and_the_connection_stays() {
        let mut host = ws_host(&[]);
        let c = client(&mut host);
        host.message(c, "{");
        send(&mut host, c, json!({"type": "say", "text": "hi"}));
        send(&mut host, c, json!({"type": "shout"}));
        send(
            &mut host,
            c,
            json!({"type": "join", "room": "r", "name": ""}),
        );
        let reasons: Vec<Value> = got(&mut host, c)
            .into_iter()
            .map(|m| m["reason"].clone())
            .collect();
        assert_eq!(
            reasons,
            [
                "invalid JSON",
                "join a room first",
                "unknown type \"shout\"",
                "name must be 1 to 32 characters"
            ]
        );
        assert!(host.is_open(c));
        send(&mut host, c, json!({"type": "ping"}));
        assert_eq!(got(&mut host, c), [json!({"type": "pong"})]);
    }

    #[test]
    fn leaving_and_closing_update_the_others_presence() {
        let mut host = ws_host(&[]);
        let (alice, bob, carol) = (client(&mut host), client(&mut host), client(&mut host));
        join(&mut host, alice, "lobby", "alice");
        join(&mut host, bob, "lobby", "bob");
        join(&mut host, carol, "lobby", "carol");
        flush_presence(&mut host);
        host.recv(alice);
        host.recv(bob);
        send(&mut host, bob, json!({"type": "leave"}));
        assert!(host.groups(bob).is_empty());
        flush_presence(&mut host);
        let online = |names: &[&str]| json!({"type": "presence", "room": "lobby", "online": names});
        assert_eq!(got(&mut host, alice), [online(&["alice", "carol"])]);
        host.disconnect(carol);
        flush_presence(&mut host);
        assert_eq!(got(&mut host, alice), [online(&["alice"])]);
        // Bob left the room: no more lists for it.
        assert!(got(&mut host, bob).iter().all(|m| m["type"] != "presence"));
    }

    #[test]
    fn idle_connections_are_closed_by_the_sweep_timer() {
        let mut host = ws_host(&[("idle_timeout_ms", "1")]);
        assert_eq!(host.timers().len(), 1, "one sweep timer");
        let c = client(&mut host);
        // The idle clock is real time: let one millisecond pass.
        let t = Instant::now();
        while t.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        host.advance(Duration::from_millis(1));
        assert!(!host.is_open(c));
        // The default timeout keeps a fresh connection, and sweeps every 5 s.
        let mut host = ws_host(&[]);
        assert_eq!(host.timers()[0].1, Duration::from_secs(5));
        let c = client(&mut host);
        host.advance(Duration::from_secs(5));
        assert!(host.is_open(c));
    }

    #[test]
    fn a_bad_idle_timeout_fails_the_start_naming_the_option() {
        let mut host = Builder::new()
            .listen("websocket://127.0.0.1:7272")
            .option("idle_timeout_ms", "soon")
            .build(Chat::default());
        let err = host.start().unwrap_err();
        assert!(
            err.contains("idle_timeout_ms") && err.contains("soon"),
            "{err}"
        );
        let mut host = ws_host(&[("idle_timeout_ms", "0")]);
        assert!(host.timers().is_empty(), "0 turns the sweep off");
        let c = client(&mut host);
        host.advance(Duration::from_secs(3600));
        assert!(host.is_open(c));
    }

    #[test]
    fn the_http_group_answers_config_json() {
        let web = |ws_port: Option<&str>| {
            let mut b = Builder::new().name("web").listen("http://127.0.0.1:8080");
            if let Some(p) = ws_port {
                b = b.option("ws_port", p);
            }
            let mut host = b.build(Chat::default());
            host.start().unwrap();
            host
        };
        let mut host = web(Some("7272"));
        let r = host.call_http(&TestRequest::get("/config.json")).unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.text(), r#"{"ws_port":7272}"#);
        let r = host.call_http(&TestRequest::post("/config.json")).unwrap();
        assert_eq!(r.status, 404);
        assert_eq!(host.call_http(&TestRequest::get("/x")).unwrap().status, 404);

        for bad in [None, Some("http"), Some("0")] {
            let mut host = web(bad);
            assert!(host.logged(Level::Warn, "/config.json will answer 500"));
            let r = host.call_http(&TestRequest::get("/config.json")).unwrap();
            assert_eq!(r.status, 500);
            let v: Value = serde_json::from_slice(&r.body).unwrap();
            assert!(v["error"].is_string(), "{v}");
        }
    }

    #[test]
    fn handover_keeps_rooms_names_and_history_without_presence() {
        let mut old = ws_host(&[]);
        let (alice, bob) = (client(&mut old), client(&mut old));
        join(&mut old, alice, "lobby", "alice");
        join(&mut old, bob, "lobby", "bob");
        flush_presence(&mut old);
        send(&mut old, alice, json!({"type": "say", "text": "before"}));
        let (mut new, ids) = old.handover(Chat::default()).unwrap();
        let (alice, bob) = (ids[&alice], ids[&bob]);
        assert!(new.recv(alice).is_empty(), "no join or leave to announce");
        assert_eq!(new.members("lobby"), [alice, bob]);
        // Names and rooms came along: bob can talk at once.
        send(&mut new, bob, json!({"type": "say", "text": "after"}));
        assert_eq!(got(&mut new, alice)[0]["from"], "bob");
        let carol = client(&mut new);
        join(&mut new, carol, "lobby", "carol");
        let texts: Vec<Value> = got(&mut new, carol)[0]["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["text"].clone())
            .collect();
        assert_eq!(texts, ["before", "after"]);
        assert!(old.connections().is_empty(), "moved, not closed");
    }

    #[test]
    fn handover_from_another_plugin_refuses_its_connections() {
        let mut old = Builder::new()
            .listen("websocket://127.0.0.1:7272")
            .crate_info("echo-plugin", "0.1.0")
            .build(Chat::default());
        let c = client(&mut old);
        let (new, ids) = old.handover(Chat::default()).unwrap();
        assert!(ids.is_empty() && new.connections().is_empty());
        assert!(new.logged(Level::Warn, "not a chat build"));
        assert!(old.connections() == [c], "the old worker closes it itself");
    }

    #[test]
    fn handover_state_of_an_unknown_version_aborts() {
        struct Future;
        impl Plugin for Future {
            fn on_export(&mut self, _ctx: &mut Context<'_>) -> Vec<u8> {
                br#"{"v":99,"history":[]}"#.to_vec()
            }
        }
        let mut old = Builder::new()
            .crate_info(env!("CARGO_PKG_NAME"), "9.0.0")
            .build(Future);
        let err = old.handover(Chat::default()).err().unwrap();
        assert!(err.contains("v99") && err.contains("9.0.0"), "{err}");
    }
}
