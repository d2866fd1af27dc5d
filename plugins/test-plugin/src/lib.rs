//! A plugin for the end-to-end tests: each text message is a command, so a
//! test can make a worker panic, report who it is, use timers, and so on.
//!
//! | message          | reply                                          |
//! |------------------|------------------------------------------------|
//! | `whoami`         | `name=<group> id=<id> pid=<pid> count=<count>` |
//! | `build`          | the build tag baked in at compile time         |
//! | `option <key>`   | the `[worker.options]` value, or `<none>`      |
//! | `addr`           | `remote=<addr> local=<addr>`                   |
//! | `timer <ms>`     | `timer fired` after that long (one-shot)       |
//! | `close`          | `bye`, then the server closes                  |
//! | `panic`          | nothing: the callback panics                   |
//! | `kind`           | `text` or `binary`: how the message came (ws)  |
//! | `hs`             | path and query of the websocket handshake      |
//! | `join <g>` / `leave <g>` | `ok`, after joining/leaving group g    |
//! | `gsend <g> <t>`  | sends t to group g (sender included)           |
//! | `gsendx <g> <t>` | sends t to group g except the sender           |
//! | `count <g>`      | members of g across workers                    |
//! | `uid <u>`        | `ok`, after binding the connection to uid u    |
//! | `uids <g>`       | bound uids in g, comma-separated               |
//! | `touid <u> <t>`  | sends t to uid u                               |
//! | `all <t>`        | sends t to every connection                    |
//! | `sub`            | `ok`; then `published <topic> <data>` arrives for each publish |
//! | `publish <t> <d>`| publishes d on topic t to every worker         |
//! | anything else    | the message itself (binary stays binary)       |
//!
//! Websocket handshakes to `/forbidden` are refused with 403, and to any path
//! with `?refuse=N` with status N. On http:// listeners: `/hello` answers
//! `hello <method> <query>`, `/echo` answers the request body, `/bye` answers
//! with `Connection: close`, anything else 404.
//!
//! | `unix-uid`       | the worker process's user id                   |
//! | `reloads`        | how often `on_worker_reload` ran in this worker |
//! | `flood <n> <size>` | sends n messages of size bytes at once (no reply) |
//! | `events`         | `full=F drain=D dropped=X errors=E` for this connection |
//! | `pause <ms>`     | `paused`; stops reading for ms, then `resumed`  |
//! | `every <ms> <n>` | `tick 1`..`tick n` every ms, then `done` (the timer deletes itself) |
//! | `deltimers`      | `deleted N` after deleting every timer          |
//! | `end`            | `ending`, then a half-close                     |
//! | `info`           | `read=R written=W conns=N` for this connection  |
//!
//! | `dial <url> <m>` | connects to url and sends m at once (queued until connected); then relays: `reply <data>`, `error <code>`, `upstream closed` |
//! | `redial <url> <n>` | connects to url; on each close reconnects (50 ms later) up to n times; `connected` once it works |
//!
//! Live handover (this plugin opts in): what these show survives a reload.
//!
//! | `note <text>`    | `ok`, after keeping text for this connection    |
//! | `state`          | `hs=<handshake> sub=<0/1> note=<text> msgs=<n>`: this connection's messages so far, this one included |
//! | `total`          | messages this worker and the builds it took over from handled, this one included |
//! | `imported`       | `from=<version>:<build tag> conns=<n> refused=<r>` of the handover this worker took, or `none` |
//! | `refuse-import`  | `ok`; the next build refuses this connection at the handover |
//!
//! `publish_every_ms = N` publishes `<group> <listen> <n>` on topic `tick`
//! every N ms (for workers without a listener).
//!
//! `on_buffer_drain` also sends `drained`. On `custom://` listeners messages
//! end with `\r\n` (both ways).
//!
//! Options: `fail_start = "error" | "panic"` makes `on_worker_start` fail;
//! `fail_start_file = PATH` makes it panic while that file exists (so a test
//! can make only the workers started later fail); `hold_start_file = PATH`
//! makes `on_worker_start` wait while that file exists (up to a minute), so a
//! test can keep a reload's replacement starting for as long as it needs.
//! Handover: `import_panic_file = PATH` makes `on_import` panic, and
//! `import_error_file = PATH` return an error, while that file exists;
//! `export_panic_file = PATH` makes `on_export` panic while it exists;
//! `import_send = TEXT` makes the new build send TEXT to each connection it
//! imports (from inside `on_import_conn`).

use std::collections::HashMap;
use std::time::Duration;

use std::collections::HashSet;

use plugin_api::{
    export_plugin, Build, ConnId, Context, MessageKind, Plugin, Protocol, Request, StartError,
    TimerId,
};

/// Set `WM_TEST_BUILD` when building to tell two builds apart.
const BUILD: &str = match option_env!("WM_TEST_BUILD") {
    Some(b) => b,
    None => "default",
};

#[derive(Default)]
pub struct TestPlugin {
    timers: HashMap<TimerId, ConnId>,
    handshakes: HashMap<ConnId, String>,
    subscribers: HashSet<ConnId>,
    reloads: u32,
    events: HashMap<ConnId, Events>,
    /// Repeating timers of `every`: connection, ticks sent, ticks wanted.
    tickers: HashMap<TimerId, (ConnId, u32, u32)>,
    resumes: HashMap<TimerId, ConnId>,
    /// Outbound connection -> (the client that asked, reconnects left).
    dials: HashMap<ConnId, (ConnId, u32)>,
    /// What `note`, `state` and `refuse-import` keep per connection.
    conns: HashMap<ConnId, ConnState>,
    /// Messages handled here and by the builds this worker took over from.
    total: u64,
    /// The handover this worker took: `from=… conns=… refused=…`.
    imported: Option<Imported>,
    /// `publish_every_ms`: the timer, and how many ticks went out.
    publisher: Option<TimerId>,
    published: u64,
}

#[derive(Default, Debug, PartialEq)]
struct ConnState {
    note: String,
    msgs: u64,
    refuse_import: bool,
}

struct Imported {
    from: String,
    conns: u32,
    refused: u32,
}

#[derive(Default)]
struct Events {
    full: u32,
    drain: u32,
    dropped: u32,
    errors: u32,
}

/// `custom://` framing for the tests: messages end with `\r\n`.
struct CrLf;

impl Protocol for CrLf {
    fn input(&mut self, buf: &[u8]) -> Result<Option<usize>, String> {
        Ok(buf.windows(2).position(|w| w == b"\r\n").map(|i| i + 2))
    }
    fn decode<'a>(&mut self, packet: &'a [u8]) -> &'a [u8] {
        &packet[..packet.len() - 2]
    }
    fn encode(&mut self, data: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(data);
        out.extend_from_slice(b"\r\n");
    }
}

impl Plugin for TestPlugin {
    fn on_worker_start(&mut self, ctx: &mut Context<'_>) -> Result<(), StartError> {
        match ctx.option("fail_start") {
            Some("error") => Err("fail_start is set".into()),
            Some("panic") => panic!("fail_start is set to panic"),
            _ if ctx
                .option("fail_start_file")
                .is_some_and(|p| std::path::Path::new(p).exists()) =>
            {
                panic!("fail_start_file exists")
            }
            _ => {
                if let Some(p) = ctx.option("hold_start_file") {
                    let end = std::time::Instant::now() + Duration::from_secs(60);
                    while std::path::Path::new(p).exists() && std::time::Instant::now() < end {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
                ctx.info(format_args!("test plugin build {BUILD} started"));
                if let Some(ms) = ctx.option("publish_every_ms") {
                    let ms: u64 = ms.parse().map_err(|_| "publish_every_ms: not a number")?;
                    self.publisher = Some(ctx.add_timer(Duration::from_millis(ms), true));
                }
                Ok(())
            }
        }
    }

    fn on_connect(&mut self, ctx: &mut Context<'_>, conn: ConnId) {
        if let Some(&(client, _)) = self.dials.get(&conn) {
            ctx.send(client, "connected");
        }
    }

    fn on_message(&mut self, ctx: &mut Context<'_>, conn: ConnId, data: &[u8]) {
        if let Some(&(client, _)) = self.dials.get(&conn) {
            let reply = format!("reply {}", String::from_utf8_lossy(data));
            ctx.send(client, reply);
            return;
        }
        self.total += 1;
        self.conns.entry(conn).or_default().msgs += 1;
        let text = String::from_utf8_lossy(data);
        let (cmd, arg) = text.split_once(' ').unwrap_or((&text, ""));
        match cmd {
            "note" => {
                // One line: the export format is line-based.
                self.conns.entry(conn).or_default().note = arg.replace('\n', " ");
                ctx.send(conn, "ok");
            }
            "state" => {
                let c = &self.conns[&conn];
                let reply = format!(
                    "hs={} sub={} note={} msgs={}",
                    self.handshakes.get(&conn).map_or("", |h| h),
                    u8::from(self.subscribers.contains(&conn)),
                    c.note,
                    c.msgs
                );
                ctx.send(conn, reply);
            }
            "total" => {
                ctx.send(conn, self.total.to_string());
            }
            "imported" => {
                let reply = match &self.imported {
                    Some(i) => format!("from={} conns={} refused={}", i.from, i.conns, i.refused),
                    None => "none".to_string(),
                };
                ctx.send(conn, reply);
            }
            "refuse-import" => {
                self.conns.entry(conn).or_default().refuse_import = true;
                ctx.send(conn, "ok");
            }
            "whoami" => {
                let w = ctx.worker();
                let reply = format!(
                    "name={} id={} pid={} count={}",
                    w.name, w.id, w.pid, w.count
                );
                ctx.send(conn, reply);
            }
            "build" => {
                ctx.send(conn, BUILD);
            }
            "option" => {
                let v = ctx.option(arg).unwrap_or("<none>");
                ctx.send(conn, v);
            }
            "addr" => {
                let show =
                    |a: Option<std::net::SocketAddr>| a.map_or("?".to_string(), |a| a.to_string());
                let reply = format!(
                    "remote={} local={}",
                    show(ctx.remote_addr(conn)),
                    show(ctx.local_addr(conn))
                );
                ctx.send(conn, reply);
            }
            "timer" => {
                let ms = arg.parse().unwrap_or(10);
                let t = ctx.add_timer(Duration::from_millis(ms), false);
                self.timers.insert(t, conn);
            }
            "close" => {
                ctx.close_with(conn, "bye");
            }
            "panic" => panic!("panic requested by the client"),
            "flood" => {
                let (n, size) = arg.split_once(' ').unwrap_or(("1", "1"));
                let chunk = vec![b'x'; size.parse().unwrap_or(1)];
                for _ in 0..n.parse::<u32>().unwrap_or(1) {
                    if ctx.send(conn, &chunk) == plugin_api::SendStatus::Dropped {
                        self.events.entry(conn).or_default().dropped += 1;
                    }
                }
            }
            "events" => {
                let e = self.events.entry(conn).or_default();
                let reply = format!(
                    "full={} drain={} dropped={} errors={}",
                    e.full, e.drain, e.dropped, e.errors
                );
                ctx.send(conn, reply);
            }
            "pause" => {
                ctx.pause_recv(conn);
                ctx.send(conn, "paused");
                let t = ctx.add_timer(Duration::from_millis(arg.parse().unwrap_or(100)), false);
                self.resumes.insert(t, conn);
            }
            "every" => {
                let (ms, n) = arg.split_once(' ').unwrap_or(("10", "3"));
                let t = ctx.add_timer(Duration::from_millis(ms.parse().unwrap_or(10)), true);
                self.tickers.insert(t, (conn, 0, n.parse().unwrap_or(3)));
            }
            "deltimers" => {
                let n = ctx.del_all_timers();
                self.tickers.clear();
                self.timers.clear();
                ctx.send(conn, format!("deleted {n}"));
            }
            "end" => {
                ctx.send(conn, "ending");
                ctx.end(conn);
            }
            "info" => {
                let i = ctx.conn_info(conn).expect("open");
                let n = ctx.connections().len();
                ctx.send(
                    conn,
                    format!(
                        "read={} written={} conns={n}",
                        i.bytes_read, i.bytes_written
                    ),
                );
            }
            "dial" | "redial" => {
                let (url, rest) = arg.split_once(' ').unwrap_or((arg, ""));
                match ctx.connect(url) {
                    Ok(up) => {
                        let retries = if cmd == "redial" {
                            rest.parse().unwrap_or(0)
                        } else {
                            0
                        };
                        self.dials.insert(up, (conn, retries));
                        if cmd == "dial" {
                            ctx.send(up, rest);
                        }
                    }
                    Err(e) => {
                        ctx.send(conn, format!("dial error: {e}"));
                    }
                }
            }
            "unix-uid" => {
                use std::os::unix::fs::MetadataExt;
                let uid = std::fs::metadata("/proc/self")
                    .map(|m| m.uid())
                    .unwrap_or(u32::MAX);
                ctx.send(conn, uid.to_string());
            }
            "reloads" => {
                let n = self.reloads.to_string();
                ctx.send(conn, n);
            }
            "bytes" => {
                // `bytes <hex>`: those bytes through plain `send` (on a
                // websocket: text only if they are UTF-8).
                let bytes: Vec<u8> = (0..arg.len() / 2)
                    .filter_map(|i| u8::from_str_radix(&arg[2 * i..2 * i + 2], 16).ok())
                    .collect();
                ctx.send(conn, bytes);
            }
            "kind" => {
                let k = match ctx.message_kind() {
                    MessageKind::Text => "text",
                    MessageKind::Binary => "binary",
                };
                ctx.send(conn, k);
            }
            "hs" => {
                let hs = self.handshakes.get(&conn).cloned().unwrap_or_default();
                ctx.send(conn, hs);
            }
            "join" | "leave" | "uid" => {
                let ok = match cmd {
                    "join" => ctx.join_group(conn, arg),
                    "leave" => ctx.leave_group(conn, arg),
                    _ => ctx.bind_uid(conn, arg),
                };
                ctx.send(conn, if ok { "ok" } else { "failed" });
            }
            "gsend" | "gsendx" | "touid" => {
                let (target, text) = arg.split_once(' ').unwrap_or((arg, ""));
                match cmd {
                    "gsend" => ctx.send_to_group(target, text, None),
                    "gsendx" => ctx.send_to_group(target, text, Some(conn)),
                    _ => ctx.send_to_uid(target, text),
                }
            }
            "count" => {
                let n = ctx.group_count(arg);
                ctx.send(conn, n.to_string());
            }
            "uids" => {
                let uids = ctx.group_uids(arg).join(",");
                ctx.send(conn, uids);
            }
            "all" => ctx.send_to_all(arg, None),
            "sub" => {
                self.subscribers.insert(conn);
                ctx.send(conn, "ok");
            }
            "publish" => {
                let (topic, data) = arg.split_once(' ').unwrap_or((arg, ""));
                ctx.publish(topic, data);
            }
            _ if ctx.message_kind() == MessageKind::Binary
                && ctx.worker().listen.starts_with("websocket") =>
            {
                ctx.send_binary(conn, data);
            }
            _ => {
                ctx.send(conn, data);
            }
        }
    }

    fn on_websocket_connect(
        &mut self,
        _ctx: &mut Context<'_>,
        conn: ConnId,
        req: &Request<'_>,
    ) -> Result<(), u16> {
        if req.path() == "/forbidden" {
            return Err(403);
        }
        if let Some(status) = req.query_param("refuse").and_then(|s| s.parse().ok()) {
            return Err(status);
        }
        self.handshakes
            .insert(conn, format!("{}?{}", req.path(), req.query()));
        Ok(())
    }

    fn on_request(&mut self, ctx: &mut Context<'_>, conn: ConnId, req: &Request<'_>) {
        match req.path() {
            "/hello" => {
                let body = format!("hello {} {}", req.method(), req.query());
                ctx.respond(
                    conn,
                    200,
                    &[("Content-Type", "text/plain")],
                    body.as_bytes(),
                );
            }
            "/echo" => {
                ctx.respond(conn, 200, &[], req.body());
            }
            "/bye" => {
                ctx.respond(conn, 200, &[("Connection", "close")], b"bye");
            }
            _ => {
                ctx.respond(conn, 404, &[], b"not here");
            }
        }
    }

    fn on_publish(&mut self, ctx: &mut Context<'_>, topic: &str, data: &[u8]) {
        let text = format!("published {topic} {}", String::from_utf8_lossy(data));
        for conn in self.subscribers.clone() {
            ctx.send(conn, &text);
        }
    }

    fn on_worker_reload(&mut self, ctx: &mut Context<'_>) {
        self.reloads += 1;
        ctx.info("on_worker_reload ran");
    }

    fn on_timer(&mut self, ctx: &mut Context<'_>, timer: TimerId) {
        if Some(timer) == self.publisher {
            self.published += 1;
            let w = ctx.worker();
            let data = format!("{} {} {}", w.name, w.listen, self.published);
            ctx.publish("tick", data.as_bytes());
        }
        if let Some(conn) = self.timers.remove(&timer) {
            ctx.send(conn, "timer fired");
        }
        if let Some(conn) = self.resumes.remove(&timer) {
            ctx.resume_recv(conn);
            ctx.send(conn, "resumed");
        }
        if let Some((conn, sent, wanted)) = self.tickers.get_mut(&timer) {
            *sent += 1;
            let (conn, sent, wanted) = (*conn, *sent, *wanted);
            ctx.send(conn, format!("tick {sent}"));
            if sent == wanted {
                // A repeating timer deleting itself from its own callback.
                ctx.del_timer(timer);
                self.tickers.remove(&timer);
                ctx.send(conn, "done");
            }
        }
    }

    fn on_buffer_full(&mut self, _ctx: &mut Context<'_>, conn: ConnId) {
        self.events.entry(conn).or_default().full += 1;
    }

    fn on_buffer_drain(&mut self, ctx: &mut Context<'_>, conn: ConnId) {
        self.events.entry(conn).or_default().drain += 1;
        ctx.send(conn, "drained");
    }

    fn on_error(&mut self, ctx: &mut Context<'_>, conn: ConnId, code: u32, _msg: &str) {
        self.events.entry(conn).or_default().errors += 1;
        if let Some(&(client, _)) = self.dials.get(&conn) {
            ctx.send(client, format!("error {code}"));
        }
    }

    fn on_close(&mut self, ctx: &mut Context<'_>, conn: ConnId) {
        if let Some((client, left)) = self.dials.get_mut(&conn) {
            let client = *client;
            if *left > 0 {
                *left -= 1;
                ctx.reconnect(conn, Duration::from_millis(50));
            } else {
                self.dials.remove(&conn);
                ctx.send(client, "upstream closed");
            }
        }
        self.timers.retain(|_, c| *c != conn);
        self.handshakes.remove(&conn);
        self.subscribers.remove(&conn);
        self.events.remove(&conn);
        self.tickers.retain(|_, t| t.0 != conn);
        self.resumes.retain(|_, c| *c != conn);
        self.conns.remove(&conn);
    }

    /// On `custom://` listeners: messages end with `\r\n`.
    fn protocol(&mut self) -> Option<Box<dyn Protocol>> {
        Some(Box::new(CrLf))
    }

    fn handover(&self) -> bool {
        true
    }

    fn on_export(&mut self, ctx: &mut Context<'_>) -> Vec<u8> {
        if file_exists(ctx, "export_panic_file") {
            panic!("export_panic_file exists");
        }
        encode(&[("build", BUILD), ("total", &self.total.to_string())])
    }

    // Timers, pauses and dials stay behind: they belong to the old worker.
    fn on_export_conn(&mut self, _ctx: &mut Context<'_>, conn: ConnId) -> Vec<u8> {
        let c = self.conns.get(&conn);
        let e = self.events.get(&conn);
        let events = e.map_or("0,0,0,0".to_string(), |e| {
            format!("{},{},{},{}", e.full, e.drain, e.dropped, e.errors)
        });
        encode(&[
            ("hs", self.handshakes.get(&conn).map_or("", |h| h)),
            (
                "sub",
                if self.subscribers.contains(&conn) {
                    "1"
                } else {
                    "0"
                },
            ),
            ("note", c.map_or("", |c| &c.note)),
            ("msgs", &c.map_or(0, |c| c.msgs).to_string()),
            (
                "refuse",
                if c.is_some_and(|c| c.refuse_import) {
                    "1"
                } else {
                    "0"
                },
            ),
            ("events", &events),
        ])
    }

    fn on_import(
        &mut self,
        ctx: &mut Context<'_>,
        from: &Build<'_>,
        state: &[u8],
    ) -> Result<(), StartError> {
        if file_exists(ctx, "import_panic_file") {
            panic!("import_panic_file exists");
        }
        if file_exists(ctx, "import_error_file") {
            return Err("import_error_file exists".into());
        }
        let f = decode(state).ok_or("unknown worker state format")?;
        self.total += f
            .get("total")
            .and_then(|t| t.parse::<u64>().ok())
            .unwrap_or(0);
        let tag = f.get("build").copied().unwrap_or("?");
        self.imported = Some(Imported {
            from: format!("{}:{tag}", from.version),
            conns: 0,
            refused: 0,
        });
        ctx.info(format_args!(
            "imported from {} {} ({tag})",
            from.name, from.version
        ));
        Ok(())
    }

    fn on_import_conn(
        &mut self,
        ctx: &mut Context<'_>,
        conn: ConnId,
        _from: &Build<'_>,
        state: &[u8],
    ) -> bool {
        let imported = self.imported.get_or_insert(Imported {
            from: "?".to_string(),
            conns: 0,
            refused: 0,
        });
        let Some(f) = decode(state).filter(|f| f.get("refuse") != Some(&"1")) else {
            imported.refused += 1;
            return false;
        };
        imported.conns += 1;
        let field = |k: &str| f.get(k).copied().unwrap_or("");
        if !field("hs").is_empty() {
            self.handshakes.insert(conn, field("hs").to_string());
        }
        if field("sub") == "1" {
            self.subscribers.insert(conn);
        }
        let mut ev = field("events").split(',').map(|n| n.parse().unwrap_or(0));
        let mut next = || ev.next().unwrap_or(0);
        self.events.insert(
            conn,
            Events {
                full: next(),
                drain: next(),
                dropped: next(),
                errors: next(),
            },
        );
        self.conns.insert(
            conn,
            ConnState {
                note: field("note").to_string(),
                msgs: field("msgs").parse().unwrap_or(0),
                refuse_import: false,
            },
        );
        if let Some(text) = ctx.option("import_send") {
            ctx.send(conn, text);
        }
        true
    }
}

fn file_exists(ctx: &Context<'_>, option: &str) -> bool {
    ctx.option(option)
        .is_some_and(|p| std::path::Path::new(p).exists())
}

/// Handover state: `v1`, then one `key=value` line per field (values hold
/// no newline).
fn encode(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = String::from("v1\n");
    for (k, v) in fields {
        out.push_str(&format!("{k}={v}\n"));
    }
    out.into_bytes()
}

/// `None` for anything but the `v1` format.
fn decode(state: &[u8]) -> Option<HashMap<&str, &str>> {
    let text = std::str::from_utf8(state).ok()?;
    let mut lines = text.lines();
    (lines.next()? == "v1").then_some(())?;
    Some(lines.filter_map(|l| l.split_once('=')).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_unknown_formats_are_refused() {
        let bytes = encode(&[("note", "a=b c"), ("msgs", "3")]);
        let f = decode(&bytes).unwrap();
        assert_eq!(f["note"], "a=b c");
        assert_eq!(f["msgs"], "3");
        assert!(decode(b"v2\nnote=x\n").is_none());
        assert!(decode(b"").is_none());
        assert!(decode(&[0xff, 0xfe]).is_none());
    }
}

export_plugin!(TestPlugin);
