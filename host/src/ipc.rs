//! Messages between the CLI, the master and the workers: one JSON object per
//! line over unix stream sockets.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Master to worker.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum ToWorker {
    /// Stop accepting and exit: at once (closing connections after flushing)
    /// or, when graceful, once connections have closed by themselves.
    Stop { graceful: bool },
    /// Report counters.
    Stats { req: u64 },
    /// List every connection.
    Connections { req: u64 },
    /// A reload was asked for and this worker is kept: run `on_worker_reload`.
    Reload,
    /// Hand your connections to your replacement over the unix socket sent
    /// with this message (SCM_RIGHTS), at the `Cut` on your bus.
    Handover,
    /// Log to the file sent with this message (SCM_RIGHTS) from now on:
    /// the log file was opened again (`reopen-logs`, SIGHUP).
    ReopenLog { req: u64 },
}

/// Worker to master.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum FromWorker {
    /// Plugin loaded and `on_worker_start` returned: accepting now.
    Ready {
        plugin: String,
        /// Started to take over connections, and its plugin can import
        /// them: it waits for the handover before accepting.
        #[serde(default)]
        handover: bool,
    },
    /// The handover a replacement waited for is over (see `Ready`).
    HandedOver(HandoverReport),
    /// The worker cannot start; it exits right after.
    Failed {
        error: String,
    },
    Stats {
        req: u64,
        stats: WorkerStats,
        /// Messages per second since the previous `Stats` request.
        #[serde(default)]
        qps: f64,
    },
    Connections {
        req: u64,
        rows: Vec<ConnRow>,
    },
    /// The answer to `ReopenLog`.
    LogReopened {
        req: u64,
        error: Option<String>,
    },
}

impl FromWorker {
    /// The request a report answers (0 for other messages).
    pub fn req(&self) -> u64 {
        match self {
            FromWorker::Stats { req, .. }
            | FromWorker::Connections { req, .. }
            | FromWorker::LogReopened { req, .. } => *req,
            FromWorker::Ready { .. } | FromWorker::Failed { .. } | FromWorker::HandedOver(_) => 0,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorkerStats {
    pub connections: u64,
    pub total_messages: u64,
    pub send_fail: u64,
    pub timers: u64,
    /// Bytes read from and written to connections since the worker started
    /// (closed connections included), for `/metrics`.
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub bytes_out: u64,
}

/// CLI to master.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Stop { graceful: bool },
    Status,
    Connections,
    Reload { graceful: bool },
    ReopenLogs,
}

/// Master to CLI.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Response {
    Stopped,
    Status(StatusReport),
    Connections(ConnectionsReport),
    Reloaded(ReloadReport),
    LogsReopened(ReopenReport),
    Error { message: String },
}

/// What `wm-host reopen-logs` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReopenReport {
    /// The log file opened again; `None`: the master logs to its standard
    /// error (foreground), there is nothing to reopen.
    pub path: Option<String>,
    /// Workers now writing to the new file.
    pub workers: u32,
    /// Workers that could not switch: "pid N: why".
    pub failed: Vec<String>,
    /// Workers that had not answered within the wait (in a callback): they
    /// switch when they next read their control socket.
    pub busy: Vec<u32>,
}

/// One handover, as the new worker saw it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HandoverReport {
    /// Connections taken over and accepted by the new build.
    pub moved: u64,
    /// Taken over, but refused by the new build's import: closed cleanly.
    pub refused: u64,
    /// Left with the old worker, which closes them cleanly (outbound
    /// connections, pipes, HTTP requests still owed an answer).
    pub closed: u64,
    /// From the old worker's export to the new one accepting them all.
    pub millis: u64,
}

impl HandoverReport {
    pub fn add(&mut self, o: &HandoverReport) {
        self.moved += o.moved;
        self.refused += o.refused;
        self.closed += o.closed;
        self.millis += o.millis;
    }
}

/// What `wm-host reload` prints, per group.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupReport {
    pub name: String,
    pub old: String,
    pub new: String,
    pub rolled: u32,
    pub count: u32,
    pub millis: u64,
    /// `reloadable = false`: workers kept, `on_worker_reload` run.
    pub kept: bool,
    pub error: Option<String>,
    /// Connections handed to the new build, summed over the group's
    /// workers; `None` when the group drained instead.
    #[serde(default)]
    pub handover: Option<HandoverReport>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub groups: Vec<GroupReport>,
}

impl ReloadReport {
    pub fn ok(&self) -> bool {
        self.groups.iter().all(|g| g.error.is_none())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub master_pid: u32,
    /// Unix seconds.
    pub start_time: u64,
    pub uptime_secs: u64,
    pub load_average: String,
    /// Configured groups with their processes now.
    #[serde(default)]
    pub groups: Vec<GroupRow>,
    /// Deaths since start of workers that died unexpectedly or were killed.
    #[serde(default)]
    pub exits: Vec<ExitRow>,
    pub workers: Vec<WorkerRow>,
    /// The bus between hosts (`[bus]`).
    #[serde(default)]
    pub bus: Box<BusReport>,
    /// The last reloads, oldest first (at most `RELOAD_HISTORY`).
    #[serde(default)]
    pub reloads: Vec<ReloadRecord>,
}

/// How many reloads the master remembers for `status` and the dashboard.
pub const RELOAD_HISTORY: usize = 20;

/// One finished reload: when, how long, and its report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadRecord {
    /// Unix milliseconds when it was asked for.
    pub started_ms: u64,
    /// From the request to the last worker rolled (or the failure).
    pub millis: u64,
    /// Every group rolled or kept without an error.
    pub ok: bool,
    pub groups: Vec<GroupReport>,
}

/// `[bus]` in `status`: the backend and, for Redis, its state and counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusReport {
    /// `local`, or the Redis URL with its password hidden.
    pub backend: String,
    /// `local`, `connected`, `reconnecting` or `auth failed` (Redis
    /// refused the password).
    pub state: String,
    /// Why the last connection attempt failed, while not connected.
    #[serde(default)]
    pub error: String,
    /// This host's id on the bus (hex), empty for `local`.
    #[serde(default)]
    pub host_id: String,
    /// Other hosts heard of within `host_ttl`.
    #[serde(default)]
    pub peers: u64,
    /// Bus messages published for other hosts.
    pub sent: u64,
    /// Bus messages received from other hosts.
    pub received: u64,
    /// Messages for other hosts not sent (Redis down or too far behind),
    /// and messages from them lost when this host fell too far behind.
    pub dropped: u64,
    /// Times the connection to Redis was lost.
    #[serde(default)]
    pub disconnects: u64,
    /// Bytes handed to the Redis writer and not yet written.
    #[serde(default)]
    pub backlog_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupRow {
    pub name: String,
    pub listen: String,
    /// `count` in the config.
    pub count: u32,
    /// Processes alive now (more than `count` while a reload rolls).
    pub processes: u32,
    /// Bus messages dropped for this group's workers since start (a worker
    /// that did not read its bus; see `WorkerRow::bus_dropped`).
    #[serde(default)]
    pub bus_dropped: u64,
    /// Workers replaced since start, by cause: `died`, `stuck`,
    /// `max_requests`, `max_memory`.
    #[serde(default)]
    pub restarts: BTreeMap<String, u64>,
    /// What the last reload that handed connections over did.
    #[serde(default)]
    pub last_handover: Option<HandoverReport>,
    /// Reloads of this group since start, by outcome: `ok`, `failed`,
    /// `kept` (not reloadable: `on_worker_reload` run).
    #[serde(default)]
    pub reloads: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExitRow {
    pub group: String,
    /// `exit code N` or `signal SIGNAME`.
    pub status: String,
    pub count: u64,
}

/// What a worker was doing when `status` asked.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Answered between callbacks.
    Idle,
    /// Did not answer in time: inside a callback (or stopped).
    #[default]
    Busy,
    /// Not ready yet (loading the plugin, in `on_worker_start`); not asked.
    Starting,
    /// Died while the report was being gathered.
    Exited,
}

impl WorkerState {
    pub fn name(self) -> &'static str {
        match self {
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Starting => "starting",
            WorkerState::Exited => "exited",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerRow {
    pub pid: u32,
    pub group: String,
    pub id: u32,
    pub listen: String,
    pub rss_bytes: u64,
    pub plugin: String,
    /// First 12 hex digits of the SHA-256 of the plugin file it runs.
    pub build: String,
    /// Unix seconds when it finished loading the plugin.
    pub loaded_at: u64,
    /// Bus messages (group sends, broadcasts, publishes) dropped for it
    /// because it did not read them and the master's bound was reached.
    #[serde(default)]
    pub bus_dropped: u64,
    /// Bus bytes the master holds for it, not yet read by it.
    #[serde(default)]
    pub bus_backlog_bytes: u64,
    /// Absent when the worker did not answer in time.
    pub stats: Option<WorkerStats>,
    /// Messages per second since the previous `status` (absent with `stats`).
    #[serde(default)]
    pub qps: Option<f64>,
    #[serde(default)]
    pub state: WorkerState,
}

/// One connection, as `wm-host connections` lists it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnRow {
    pub pid: u32,
    /// The group (`[[worker]] name`).
    pub worker: String,
    pub id: u64,
    /// Always `tcp`.
    pub transport: String,
    /// The listener's scheme: tcp, text, frame, websocket, http.
    pub protocol: String,
    pub local: String,
    pub remote: String,
    /// Bytes received and not yet consumed (a partial message).
    pub recv_q: u64,
    /// Bytes waiting in the send buffer.
    pub send_q: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// ESTABLISHED, CLOSING, or HANDSHAKE (websocket before its 101).
    pub state: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectionsReport {
    pub connections: Vec<ConnRow>,
    /// Workers that did not answer in time (busy in a callback): their
    /// connections are missing.
    pub busy: Vec<u32>,
}

pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut v = serde_json::to_vec(msg).expect("ipc messages always serialize");
    v.push(b'\n');
    v
}

/// Appends what a non-blocking reader has to `buf`; true once the peer closed.
pub fn read_available(r: &mut impl Read, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match r.read(&mut chunk) {
            Ok(0) => return true,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return true,
        }
    }
}

/// Writes as much of `out` as a non-blocking writer takes; Err on a dead peer.
pub fn flush_buf(out: &mut Vec<u8>, w: &mut impl Write) -> io::Result<()> {
    while !out.is_empty() {
        match w.write(out) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => {
                out.drain(..n);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The longest line a `LineBuf` takes by default. A worker's `connections`
/// report is one line, and a worker may hold tens of thousands of them.
pub const MAX_LINE: usize = 64 << 20;

/// A non-blocking line-framed channel, for mio loops. A line longer than its
/// limit ends the channel: the reader reports it and sees it as closed.
#[derive(Debug)]
pub struct LineBuf {
    inbuf: Vec<u8>,
    outbuf: Vec<u8>,
    limit: usize,
    overflowed: bool,
}

impl Default for LineBuf {
    fn default() -> Self {
        LineBuf::with_limit(MAX_LINE)
    }
}

impl LineBuf {
    pub fn with_limit(limit: usize) -> LineBuf {
        LineBuf {
            inbuf: Vec::new(),
            outbuf: Vec::new(),
            limit,
            overflowed: false,
        }
    }

    /// Reads what is available. Returns the complete messages and whether the
    /// peer has closed (or sent a line over the limit: see `overflowed`).
    pub fn read_from<T: DeserializeOwned>(
        &mut self,
        r: &mut impl Read,
    ) -> (Vec<Result<T, String>>, bool) {
        let mut out = Vec::new();
        if self.overflowed {
            return (out, true);
        }
        let mut chunk = [0u8; 16 * 1024];
        // Lines are taken out after each read, so a peer that floods is
        // caught at the limit rather than after everything it sent.
        let closed = loop {
            match r.read(&mut chunk) {
                Ok(0) => break true,
                Ok(n) => {
                    let start = self.inbuf.len();
                    self.inbuf.extend_from_slice(&chunk[..n]);
                    self.take_lines(start, &mut out);
                    if self.inbuf.len() > self.limit {
                        self.overflowed = true;
                        self.inbuf = Vec::new();
                        out.push(Err(format!("line longer than {} bytes", self.limit)));
                        break true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        (out, closed)
    }

    /// Parses the complete lines; `start`: where new bytes begin (the bytes
    /// before hold no newline).
    fn take_lines<T: DeserializeOwned>(&mut self, start: usize, out: &mut Vec<Result<T, String>>) {
        let mut from = 0;
        let mut scan = start;
        while let Some(i) = self.inbuf[scan..].iter().position(|&b| b == b'\n') {
            let end = scan + i;
            out.push(serde_json::from_slice(&self.inbuf[from..end]).map_err(|e| e.to_string()));
            from = end + 1;
            scan = from;
        }
        self.inbuf.drain(..from);
    }

    /// The peer sent a line over the limit; nothing more is read from it.
    pub fn overflowed(&self) -> bool {
        self.overflowed
    }

    pub fn queue<T: Serialize>(&mut self, msg: &T) {
        self.outbuf.extend_from_slice(&encode(msg));
    }

    /// Writes what it can; Err on a dead peer.
    pub fn flush(&mut self, w: &mut impl Write) -> io::Result<()> {
        flush_buf(&mut self.outbuf, w)
    }

    /// Nothing waits to be written.
    pub fn flushed(&self) -> bool {
        self.outbuf.is_empty()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn split_lines_reassemble() {
        let mut wire = encode(&ToWorker::Stop { graceful: true });
        wire.extend(encode(&ToWorker::Stats { req: 7 }));
        let mut lb = LineBuf::default();
        // A slice reader ends with EOF, so each read reports "closed".
        let (first, _) = lb.read_from::<ToWorker>(&mut &wire[..5]);
        assert!(first.is_empty());
        let (rest, closed) = lb.read_from::<ToWorker>(&mut &wire[5..]);
        assert!(closed);
        let rest: Vec<ToWorker> = rest.into_iter().map(Result::unwrap).collect();
        assert_eq!(
            rest,
            vec![
                ToWorker::Stop { graceful: true },
                ToWorker::Stats { req: 7 }
            ]
        );
    }

    /// A reader that has `data` and then would block, as a socket does.
    pub(crate) struct Pending<'a>(pub(crate) &'a [u8]);

    impl Read for Pending<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.0.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    #[test]
    fn a_line_over_the_limit_ends_the_channel() {
        let mut lb = LineBuf::with_limit(64);
        let mut wire = encode(&ToWorker::Stats { req: 1 });
        wire.extend(vec![b'x'; 200]);
        let (msgs, closed) = lb.read_from::<ToWorker>(&mut Pending(&wire));
        assert!(closed && lb.overflowed());
        assert_eq!(msgs.len(), 2, "the line before still counts");
        assert_eq!(msgs[0], Ok(ToWorker::Stats { req: 1 }));
        assert!(msgs[1]
            .as_ref()
            .unwrap_err()
            .contains("longer than 64 bytes"));
        let (more, closed) = lb.read_from::<ToWorker>(&mut Pending(b"{}\n"));
        assert!(more.is_empty() && closed, "nothing more is read");
        // Under the limit, a line split across reads is kept whole.
        let mut ok = LineBuf::with_limit(64);
        let line = encode(&ToWorker::Reload);
        let (none, closed) = ok.read_from::<ToWorker>(&mut Pending(&line[..4]));
        assert!(none.is_empty() && !closed);
        let (one, _) = ok.read_from::<ToWorker>(&mut Pending(&line[4..]));
        assert_eq!(one, vec![Ok(ToWorker::Reload)]);
    }
}
