//! The control socket: CLI clients and the reports gathered for them.
//!
//! Clients are named by ids that are never reused: a reply owed to a client
//! that went away is dropped, and cannot reach a later client (a slab key
//! would be handed to the next one that connects). `status` and
//! `connections` are gathered from every ready worker and sent once all
//! have answered or at the deadline (`STATS_WAIT`; `REOPEN_WAIT` for a log
//! reopen), whichever comes first.

use std::collections::{BTreeMap, HashSet};
use std::io;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};

use super::supervisor::WorkerId;
use crate::ipc::{
    ConnectionsReport, FromWorker, LineBuf, ReopenReport, Request, Response, StatusReport,
    WorkerState,
};

/// How long `status` and `connections` wait for workers to report; a worker
/// that has not answered by then is in a callback: `[busy]`.
pub const STATS_WAIT: Duration = Duration::from_secs(1);

/// How long `reopen-logs` (and SIGHUP) waits for workers to switch to the
/// new log file: longer than [`STATS_WAIT`], as the answer is not a sample
/// and a loaded machine may be slow to give it; the CLI waits 10 s.
pub const REOPEN_WAIT: Duration = Duration::from_secs(5);

/// A request is one short line; anything longer is not a CLI.
pub const MAX_REQUEST: usize = 64 * 1024;

/// A control client, for as long as the master runs; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ClientId(pub u64);

struct Client {
    stream: UnixStream,
    buf: LineBuf,
}

/// Where a gathered report goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Client(ClientId),
    /// Signals (SIGIOT, SIGIO): into the log.
    Log,
    /// The admin listener's requests waiting for a report of this kind
    /// (`admin.rs`): one gathering answers all of them.
    Admin,
    /// The admin listener's periodic sample for the dashboard's history.
    Sample,
}

#[derive(Debug)]
pub enum Gathered {
    Status(StatusReport),
    Connections(ConnectionsReport),
    /// `busy` starts with every worker asked; answers take them out.
    Reopen(ReopenReport),
}

impl Gathered {
    /// A worker answered; `None` for a worker that died meanwhile.
    fn answered(&mut self, pid: u32, msg: Option<FromWorker>) {
        match (self, msg) {
            (Gathered::Status(r), msg) => {
                let Some(row) = r.workers.iter_mut().find(|w| w.pid == pid) else {
                    return;
                };
                match msg {
                    Some(FromWorker::Stats { stats, qps, .. }) => {
                        row.stats = Some(stats);
                        row.qps = Some(qps);
                        row.state = WorkerState::Idle;
                    }
                    None => row.state = WorkerState::Exited,
                    Some(_) => {}
                }
            }
            (Gathered::Connections(r), msg) => {
                r.busy.retain(|&p| p != pid);
                if let Some(FromWorker::Connections { rows, .. }) = msg {
                    r.connections.extend(rows);
                }
            }
            (Gathered::Reopen(r), msg) => {
                r.busy.retain(|&p| p != pid);
                match msg {
                    Some(FromWorker::LogReopened { error: None, .. }) => r.workers += 1,
                    Some(FromWorker::LogReopened { error: Some(e), .. }) => {
                        r.failed.push(format!("pid {pid}: {e}"))
                    }
                    // Gone: it has no log to write any more.
                    _ => {}
                }
            }
        }
    }
}

/// A report being gathered.
struct Gathering {
    to: Sink,
    req: u64,
    /// Workers asked and not answered yet.
    waiting: HashSet<WorkerId>,
    report: Gathered,
    deadline: Instant,
}

pub struct Control {
    listener: UnixListener,
    clients: BTreeMap<ClientId, Client>,
    next_client: u64,
    gatherings: Vec<Gathering>,
    next_req: u64,
    /// Clients dropped since `take_gone`.
    gone: Vec<ClientId>,
}

impl Control {
    pub fn new(listener: UnixListener) -> Control {
        Control {
            listener,
            clients: BTreeMap::new(),
            next_client: 1,
            gatherings: Vec::new(),
            next_req: 0,
            gone: Vec::new(),
        }
    }

    pub fn listener(&mut self) -> &mut UnixListener {
        &mut self.listener
    }

    /// Accepts every waiting client, registering each under `token(id)`.
    pub fn accept(&mut self, registry: &Registry, token: impl Fn(ClientId) -> Token) {
        loop {
            match self.listener.accept() {
                Ok((mut stream, _)) => {
                    let id = ClientId(self.next_client);
                    self.next_client += 1;
                    if registry
                        .register(
                            &mut stream,
                            token(id),
                            Interest::READABLE | Interest::WRITABLE,
                        )
                        .is_ok()
                    {
                        let buf = LineBuf::with_limit(MAX_REQUEST);
                        self.clients.insert(id, Client { stream, buf });
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!("control accept failed: {e}");
                    return;
                }
            }
        }
    }

    /// The requests a client sent; a client that closed, failed or sent a
    /// line over the limit is dropped (after the requests it completed).
    pub fn read(&mut self, id: ClientId, registry: &Registry) -> Vec<Result<Request, String>> {
        let Some(c) = self.clients.get_mut(&id) else {
            return Vec::new();
        };
        let (mut msgs, closed) = c.buf.read_from::<Request>(&mut c.stream);
        if c.buf.overflowed() {
            tracing::warn!("control client sent a request over {MAX_REQUEST} bytes; closing it");
            msgs.pop();
            self.drop_client(id, registry);
        } else if c.buf.flush(&mut c.stream).is_err() || (closed && msgs.is_empty()) {
            self.drop_client(id, registry);
        }
        msgs
    }

    pub fn reply(&mut self, id: ClientId, resp: &Response, registry: &Registry) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.buf.queue(resp);
            if c.buf.flush(&mut c.stream).is_err() {
                self.drop_client(id, registry);
            }
        }
    }

    pub fn drop_client(&mut self, id: ClientId, registry: &Registry) {
        if let Some(mut c) = self.clients.remove(&id) {
            let _ = registry.deregister(&mut c.stream);
            self.gatherings.retain(|g| g.to != Sink::Client(id));
            self.gone.push(id);
        }
    }

    /// Clients dropped since the last call: nothing is owed to them any more.
    pub fn take_gone(&mut self) -> Vec<ClientId> {
        std::mem::take(&mut self.gone)
    }

    /// A fresh request number, to match workers' answers to a gathering.
    pub fn next_req(&mut self) -> u64 {
        self.next_req += 1;
        self.next_req
    }

    pub fn gather(
        &mut self,
        to: Sink,
        req: u64,
        waiting: HashSet<WorkerId>,
        report: Gathered,
        now: Instant,
    ) {
        self.gatherings.push(Gathering {
            to,
            req,
            waiting,
            deadline: now
                + match report {
                    Gathered::Reopen(_) => REOPEN_WAIT,
                    _ => STATS_WAIT,
                },
            report,
        });
    }

    /// A worker's answer to a `Stats` or `Connections` request.
    pub fn answered(&mut self, worker: WorkerId, pid: u32, msg: FromWorker) {
        let req = msg.req();
        if let Some(g) = self.gatherings.iter_mut().find(|g| g.req == req) {
            if g.waiting.remove(&worker) {
                g.report.answered(pid, Some(msg));
            }
        }
    }

    /// The worker died: it will not answer.
    pub fn worker_gone(&mut self, worker: WorkerId, pid: u32) {
        for g in &mut self.gatherings {
            if g.waiting.remove(&worker) {
                g.report.answered(pid, None);
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.gatherings.iter().map(|g| g.deadline).min()
    }

    /// Reports that are complete or due, in the order asked.
    pub fn take_done(&mut self, now: Instant) -> Vec<(Sink, Gathered)> {
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.gatherings)
            .into_iter()
            .partition(|g| g.waiting.is_empty() || g.deadline <= now);
        self.gatherings = keep;
        done.into_iter()
            .map(|mut g| {
                if let Gathered::Connections(r) = &mut g.report {
                    r.connections
                        .sort_by(|a, b| (&a.worker, a.pid, a.id).cmp(&(&b.worker, b.pid, b.id)));
                    r.busy.sort_unstable();
                }
                (g.to, g.report)
            })
            .collect()
    }

    /// Hands finished reports to whoever asked; returns those for the
    /// admin listener (`Sink::Admin`, `Sink::Sample`), which takes them itself.
    pub fn deliver_due(&mut self, now: Instant, registry: &Registry) -> Vec<(Sink, Gathered)> {
        let mut admin = Vec::new();
        for (to, report) in self.take_done(now) {
            match (to, report) {
                (to @ (Sink::Admin | Sink::Sample), r) => admin.push((to, r)),
                (Sink::Client(c), Gathered::Status(r)) => {
                    self.reply(c, &Response::Status(r), registry)
                }
                (Sink::Client(c), Gathered::Connections(r)) => {
                    self.reply(c, &Response::Connections(r), registry)
                }
                (Sink::Client(c), Gathered::Reopen(r)) => {
                    self.reply(c, &Response::LogsReopened(r), registry)
                }
                (Sink::Log, Gathered::Reopen(r)) => {
                    if !r.failed.is_empty() {
                        tracing::error!("workers could not reopen the log: {:?}", r.failed);
                    }
                    tracing::info!(
                        workers = r.workers,
                        busy = r.busy.len(),
                        "SIGHUP: log file reopened"
                    );
                }
                (Sink::Log, Gathered::Status(r)) => {
                    tracing::info!("SIGIOT: status");
                    for line in crate::report::render_status(&r).lines() {
                        tracing::info!("status: {line}");
                    }
                }
                (Sink::Log, Gathered::Connections(r)) => {
                    tracing::info!("SIGIO: {} connections", r.connections.len());
                    for line in crate::report::render_connections(&r).lines() {
                        tracing::info!("connections: {line}");
                    }
                }
            }
        }
        admin
    }
}

/// Writes one whole control line to a worker with `fd` attached
/// (SCM_RIGHTS); the line is short, so a full socket is an error.
pub fn send_with_fd(
    sock: &mio::net::UnixStream,
    line: &[u8],
    fd: std::os::fd::BorrowedFd<'_>,
) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    use std::os::fd::AsRawFd;
    let fds = [fd.as_raw_fd()];
    let n = sendmsg::<()>(
        sock.as_raw_fd(),
        &[std::io::IoSlice::new(line)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
        None,
    )?;
    if n < line.len() {
        return Err(std::io::Error::other("control line cut short"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixStream as StdStream;

    use mio::{Events, Poll};

    use crate::ipc::{self, ConnRow, WorkerStats};

    struct Fixture {
        _dir: tempfile::TempDir,
        path: std::path::PathBuf,
        poll: Poll,
        control: Control,
    }

    fn token(id: ClientId) -> Token {
        Token(id.0 as usize)
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let listener = UnixListener::bind(&path).unwrap();
        Fixture {
            _dir: dir,
            path,
            poll: Poll::new().unwrap(),
            control: Control::new(listener),
        }
    }

    impl Fixture {
        /// A CLI connects and the master accepts it.
        fn connect(&mut self) -> (StdStream, ClientId) {
            let s = StdStream::connect(&self.path).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let before: HashSet<ClientId> = self.control.clients.keys().copied().collect();
            self.control.accept(self.poll.registry(), token);
            let id = *self
                .control
                .clients
                .keys()
                .find(|k| !before.contains(k))
                .expect("accepted");
            (s, id)
        }

        /// Reads until the client's bytes are in (or it closed).
        fn read(&mut self, id: ClientId) -> Vec<Result<Request, String>> {
            let mut events = Events::with_capacity(8);
            let end = Instant::now() + Duration::from_secs(5);
            loop {
                let msgs = self.control.read(id, self.poll.registry());
                if !msgs.is_empty() || !self.control.clients.contains_key(&id) {
                    return msgs;
                }
                assert!(Instant::now() < end, "client {id:?} sent nothing");
                self.poll
                    .poll(&mut events, Some(Duration::from_millis(50)))
                    .unwrap();
            }
        }
    }

    fn line(s: &StdStream) -> String {
        let mut l = String::new();
        BufReader::new(s).read_line(&mut l).unwrap();
        l
    }

    #[test]
    fn ids_are_not_reused_so_a_reply_to_a_gone_client_goes_nowhere() {
        let mut f = fixture();
        let (a, a_id) = f.connect();
        drop(a);
        assert!(f.read(a_id).is_empty());
        assert_eq!(f.control.take_gone(), vec![a_id]);
        // The next client gets another id, even though the first one is free.
        let (mut b, b_id) = f.connect();
        assert_ne!(a_id, b_id);
        // What was owed to the first client (say, a reload report) is dropped.
        let reg = f.poll.registry().try_clone().unwrap();
        f.control.reply(
            a_id,
            &Response::Error {
                message: "for a".into(),
            },
            &reg,
        );
        b.write_all(&ipc::encode(&Request::Status)).unwrap();
        assert!(matches!(f.read(b_id)[..], [Ok(Request::Status)]));
        f.control.reply(
            b_id,
            &Response::Error {
                message: "for b".into(),
            },
            &reg,
        );
        assert!(line(&b).contains("for b"), "b gets only its own reply");
    }

    #[test]
    fn an_overlong_request_closes_that_client() {
        let mut f = fixture();
        let (mut a, a_id) = f.connect();
        let big = vec![b'x'; MAX_REQUEST + 10];
        // The master reads as it arrives; a write this big may block first.
        let writer = std::thread::spawn(move || {
            let _ = a.write_all(&big);
            a
        });
        let msgs = f.read(a_id);
        assert!(msgs.is_empty(), "the partial line is not a request");
        assert!(!f.control.clients.contains_key(&a_id), "closed");
        assert_eq!(f.control.take_gone(), vec![a_id]);
        drop(writer.join().unwrap());
    }

    fn status_row(pid: u32) -> crate::ipc::WorkerRow {
        crate::ipc::WorkerRow {
            pid,
            group: "g".into(),
            id: 0,
            listen: String::new(),
            rss_bytes: 0,
            plugin: String::new(),
            build: String::new(),
            loaded_at: 0,
            bus_dropped: 0,
            bus_backlog_bytes: 0,
            stats: None,
            qps: None,
            state: WorkerState::Busy,
        }
    }

    fn status(pids: &[u32]) -> Gathered {
        Gathered::Status(StatusReport {
            version: String::new(),
            master_pid: 1,
            start_time: 0,
            uptime_secs: 0,
            load_average: String::new(),
            groups: Vec::new(),
            exits: Vec::new(),
            workers: pids.iter().map(|&p| status_row(p)).collect(),
            bus: Default::default(),
            reloads: Vec::new(),
        })
    }

    #[test]
    fn a_gathering_ends_when_all_answered_or_at_the_deadline() {
        let mut f = fixture();
        let t = Instant::now();
        let (w1, w2, w3) = (WorkerId(1), WorkerId(2), WorkerId(3));
        let req = f.control.next_req();
        f.control.gather(
            Sink::Log,
            req,
            HashSet::from([w1, w2]),
            status(&[11, 12]),
            t,
        );
        let stats = |req| FromWorker::Stats {
            req,
            stats: WorkerStats::default(),
            qps: 0.0,
        };
        f.control.answered(w1, 11, stats(req));
        f.control.answered(w3, 13, stats(req)); // not asked: ignored
        assert!(f.control.take_done(t).is_empty(), "w2 has not answered");
        f.control.worker_gone(w2, 12);
        let done = f.control.take_done(t);
        let [(Sink::Log, Gathered::Status(r))] = &done[..] else {
            panic!("one status report");
        };
        assert_eq!(r.workers[0].state, WorkerState::Idle);
        assert_eq!(r.workers[1].state, WorkerState::Exited);

        // A worker that never answers is left busy at the deadline.
        let req = f.control.next_req();
        let busy = Gathered::Connections(ConnectionsReport {
            connections: Vec::new(),
            busy: vec![11, 12],
        });
        f.control
            .gather(Sink::Log, req, HashSet::from([w1, w2]), busy, t);
        let row = ConnRow {
            pid: 11,
            worker: "g".into(),
            id: 1,
            transport: "tcp".into(),
            protocol: "text".into(),
            local: String::new(),
            remote: String::new(),
            recv_q: 0,
            send_q: 0,
            bytes_read: 0,
            bytes_written: 0,
            state: "ESTABLISHED".into(),
        };
        f.control.answered(
            w1,
            11,
            FromWorker::Connections {
                req,
                rows: vec![row],
            },
        );
        assert_eq!(f.control.next_deadline(), Some(t + STATS_WAIT));
        assert!(f.control.take_done(t).is_empty());
        let done = f.control.take_done(t + STATS_WAIT);
        let [(_, Gathered::Connections(r))] = &done[..] else {
            panic!("one connections report");
        };
        assert_eq!((r.connections.len(), &r.busy[..]), (1, &[12][..]));
    }

    #[test]
    fn a_reopen_waits_longer_than_a_sample() {
        let mut f = fixture();
        let req = f.control.next_req();
        let t = Instant::now();
        let report = Gathered::Reopen(ReopenReport::default());
        f.control
            .gather(Sink::Log, req, HashSet::from([WorkerId(1)]), report, t);
        assert_eq!(f.control.next_deadline(), Some(t + REOPEN_WAIT));
        assert!(f.control.take_done(t + STATS_WAIT).is_empty());
        assert_eq!(f.control.take_done(t + REOPEN_WAIT).len(), 1);
    }

    #[test]
    fn a_gone_client_loses_its_gatherings() {
        let mut f = fixture();
        let (a, a_id) = f.connect();
        let req = f.control.next_req();
        let t = Instant::now();
        f.control.gather(
            Sink::Client(a_id),
            req,
            HashSet::from([WorkerId(1)]),
            status(&[1]),
            t,
        );
        drop(a);
        f.read(a_id);
        assert!(f.control.take_done(t + STATS_WAIT).is_empty());
    }
}
