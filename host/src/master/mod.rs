//! The master process's event loop: it binds listeners, then wires the
//! parts together. The `supervisor` decides (which worker to start, retire
//! or kill); `process` starts and reaps workers; `control` answers the CLI;
//! `relay` carries the bus between workers; `builds` installs plugin copies
//! off the loop; `watch` notices changed files. It never loads plugin code.

mod admin;
pub mod builds;
mod control;
mod listen;
mod process;
mod redis;
mod relay;
pub mod supervisor;
mod systemd;
mod watch;

// For `wm-host check`: the same bind and Redis client the master uses.
pub use self::listen::{probe as probe_listener, BindError};
pub use self::redis::client as redis_client;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use nix::unistd::Pid;
use signal_hook::consts::signal::*;
use signal_hook_mio::v1_0::Signals;

use self::builds::Installer;
use self::control::{ClientId, Control, Gathered, Sink};
use self::redis::RedisBus;
use self::relay::{Attach, Relay};
use self::supervisor::{Action, Event, GroupSpec, StartFailure, Supervisor, Timeouts, WorkerId};
use self::watch::Watch;
use crate::config::Config;
use crate::ipc::{
    ConnectionsReport, ExitRow, FromWorker, GroupRow, LineBuf, ReloadRecord, ReopenReport, Request,
    Response, StatusReport, ToWorker, WorkerRow, WorkerState,
};
use crate::logging::{self, WorkerLog};
use crate::runtime::PidLock;

/// A token is `id << 2 | kind`: worker and client ids are never reused, so
/// an event for something already gone cannot reach a newcomer.
const KIND_FIXED: usize = 0;
const KIND_WORKER: usize = 1;
const KIND_BUS: usize = 2;
const KIND_CLIENT: usize = 3;
const SIGNALS: Token = Token(KIND_FIXED);
const CONTROL: Token = Token(1 << 2 | KIND_FIXED);
const WAKER: Token = Token(2 << 2 | KIND_FIXED);
const ADMIN: Token = Token(3 << 2 | KIND_FIXED);
/// Admin connections are fixed-kind tokens from this id on.
const ADMIN_CONN_BASE: usize = 16;

/// How often workers of groups with `max_requests` or `max_memory` are
/// asked for their request count and have their memory read.
const USAGE_POLL: Duration = Duration::from_secs(1);

fn worker_token(w: WorkerId) -> Token {
    Token((w.0 as usize) << 2 | KIND_WORKER)
}

fn bus_token(w: WorkerId) -> Token {
    Token((w.0 as usize) << 2 | KIND_BUS)
}

fn client_token(c: ClientId) -> Token {
    Token((c.0 as usize) << 2 | KIND_CLIENT)
}

fn admin_token(id: u64) -> Token {
    Token((id as usize + ADMIN_CONN_BASE) << 2 | KIND_FIXED)
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Lock(String),
    #[error(transparent)]
    Bind(#[from] listen::BindError),
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Supervisor(#[from] StartFailure),
    #[error("{0}")]
    Plugin(String),
    /// A certificate or key of the named group.
    #[error("worker {0:?}: {1}")]
    Tls(String, String),
}

/// Where to tell the CLI that start-up finished (daemon mode).
pub enum Readiness {
    /// Foreground: print the startup table.
    Terminal,
    /// Daemon: write the outcome to the CLI's pipe, then close it.
    Pipe(Option<File>),
}

/// A worker process's control channel, and what `status` shows of it.
struct WorkerIo {
    pid: Pid,
    ctl: UnixStream,
    buf: LineBuf,
    plugin: String,
    loaded_at: SystemTime,
    /// A replacement's handover socket, our end: sent to the old worker
    /// when the handover begins.
    handover_end: Option<OwnedFd>,
}

impl WorkerIo {
    /// Sends `msg` with `fd` attached (SCM_RIGHTS). Lines queued before it
    /// must go first, or the descriptor would come with the wrong one.
    fn send_with_fd(&mut self, msg: &ToWorker, fd: BorrowedFd<'_>) -> io::Result<()> {
        self.buf.flush(&mut self.ctl)?;
        if !self.buf.flushed() {
            return Err(io::Error::other("its control channel is full"));
        }
        control::send_with_fd(&self.ctl, &crate::ipc::encode(msg), fd)
    }
}

pub struct Master {
    cfg: Config,
    exe: PathBuf,
    poll: Poll,
    signals: Signals,
    /// Listening sockets per group and worker id, held for the master's life.
    sockets: Vec<Vec<OwnedFd>>,
    sup: Supervisor,
    workers: BTreeMap<WorkerId, WorkerIo>,
    control: Control,
    relay: Relay,
    /// `[bus] backend = "redis://…"`: the bus across hosts.
    redis: Option<RedisBus>,
    /// `[host] admin`: `/metrics`, `/status`, `/connections`, the dashboard.
    admin: Option<admin::Admin>,
    installer: Installer,
    watch: Option<Watch>,
    started_at: SystemTime,
    readiness: Readiness,
    /// The daemon's log file, handed to workers open, and the log format.
    worker_log: WorkerLog,
    /// When workers' usage is next checked (groups with recycling limits).
    usage_due: Option<Instant>,
    /// `NOTIFY_SOCKET` was set: systemd (`Type=notify`) hears of readiness,
    /// reloads and stopping; and what it was last told.
    systemd: Option<systemd::Notifier>,
    told: systemd::State,
    _lock: PidLock,
}

impl Master {
    /// Takes the runtime dir, binds every listener and the control socket.
    pub fn new(cfg: Config) -> Result<Master, StartError> {
        let lock = PidLock::acquire(&cfg).map_err(StartError::Lock)?;
        // Copies an earlier master left (perhaps cut short by a crash) are
        // not trusted: each start copies afresh.
        builds::clear(&cfg.host.runtime_dir);
        let mut groups = Vec::new();
        let mut sockets = Vec::new();
        for w in &cfg.workers {
            let build = builds::install_group(&cfg.host.runtime_dir, &w.plugin, w.tls.as_ref())
                .map_err(|e| match w.tls.is_some() && e.starts_with("tls") {
                    true => StartError::Tls(w.name.clone(), e),
                    false => StartError::Plugin(e),
                })?;
            sockets.push(listen::bind(w)?);
            let spec = GroupSpec {
                name: w.name.clone(),
                count: w.count,
                reloadable: w.reloadable,
                plugin: w.plugin.clone(),
                max_requests: w.max_requests,
                max_memory: w.max_memory,
                handover: w.reload_mode == crate::config::ReloadMode::Handover,
                tls: w.tls.clone(),
            };
            groups.push((spec, build));
        }
        let io_err = |what: &str, e: io::Error| StartError::Io(format!("{what}: {e}"));
        let sock_path = cfg.control_socket();
        let _ = std::fs::remove_file(&sock_path);
        let listener = UnixListener::bind(&sock_path).map_err(|e| {
            io_err(
                &format!("cannot create control socket {}", sock_path.display()),
                e,
            )
        })?;
        crate::runtime::chmod_nofollow(&sock_path, 0o600)
            .map_err(|e| io_err("chmod control socket", e))?;
        let mut control = Control::new(listener);
        let poll = Poll::new().map_err(|e| io_err("epoll", e))?;
        let mut signals = Signals::new([
            SIGINT, SIGTERM, SIGQUIT, SIGUSR1, SIGUSR2, SIGABRT, SIGIO, SIGCHLD, SIGHUP,
        ])
        .map_err(|e| io_err("signals", e))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| io_err("register signals", e))?;
        poll.registry()
            .register(control.listener(), CONTROL, Interest::READABLE)
            .map_err(|e| io_err("register control socket", e))?;
        let mut admin = match &cfg.host.admin {
            Some(a) => Some(
                admin::Admin::bind(a)
                    .map_err(|e| io_err(&format!("cannot listen on admin {}", a.addr), e))?,
            ),
            None => None,
        };
        if let Some(a) = admin.as_mut() {
            poll.registry()
                .register(a.listener(), ADMIN, Interest::READABLE)
                .map_err(|e| io_err("register admin listener", e))?;
            tracing::info!("admin listener on http://{}/", a.addr());
        }
        let exe = std::env::current_exe().map_err(|e| io_err("cannot find own executable", e))?;
        let waker =
            Arc::new(mio::Waker::new(poll.registry(), WAKER).map_err(|e| io_err("waker", e))?);
        let watch = Watch::new(&cfg.workers, waker.clone()).unwrap_or_else(|e| {
            tracing::warn!("cannot watch plugin files: {e}; reload with `wm-host reload`");
            None
        });
        let mut relay = Relay::default();
        let redis = match cfg.bus.redis {
            Some(_) => {
                relay.forward_to_hosts();
                Some(RedisBus::start(&cfg.bus, waker.clone()).map_err(|e| io_err("redis bus", e))?)
            }
            None => None,
        };
        let timeouts = Timeouts {
            start: cfg.host.start_timeout,
            stop: cfg.host.stop_timeout,
        };
        let recycling = cfg
            .workers
            .iter()
            .any(|w| w.max_requests.is_some() || w.max_memory.is_some());
        let log_format = cfg.host.log_format;
        Ok(Master {
            sup: Supervisor::new(groups, timeouts, Instant::now()),
            installer: Installer::new(cfg.host.runtime_dir.clone(), waker),
            cfg,
            exe,
            poll,
            signals,
            sockets,
            workers: BTreeMap::new(),
            control,
            relay,
            redis,
            admin,
            watch,
            started_at: SystemTime::now(),
            readiness: Readiness::Terminal,
            worker_log: WorkerLog {
                file: None,
                format: log_format,
            },
            usage_due: recycling.then(Instant::now),
            systemd: match systemd::Notifier::from_env() {
                Some(Ok(n)) => Some(n),
                Some(Err(e)) => {
                    tracing::warn!("NOTIFY_SOCKET: {e}; systemd will not hear of readiness");
                    None
                }
                None => None,
            },
            told: systemd::State::Starting,
            _lock: lock,
        })
    }

    /// Workers will log to this file (the daemon's log_file).
    pub fn with_worker_log(mut self, file: File) -> Master {
        self.worker_log.file = Some(file);
        self
    }

    /// Starts all workers and supervises them until stopped. Returns an error
    /// only when start-up failed; workers are gone either way.
    pub fn run(mut self, readiness: Readiness) -> Result<(), StartError> {
        tracing::info!(pid = std::process::id(), config = %self.cfg.path.display(), "master starting");
        self.readiness = readiness;
        let actions = self.sup.start(Instant::now());
        self.carry_out(actions);
        let mut events = Events::with_capacity(256);
        while !self.sup.finished() {
            let timeout = [
                self.sup.next_deadline(),
                self.control.next_deadline(),
                self.relay.next_deadline(),
                self.redis.as_ref().and_then(RedisBus::next_deadline),
                self.usage_due,
                self.watch.as_ref().and_then(Watch::due),
                self.admin.as_ref().and_then(admin::Admin::next_deadline),
            ]
            .into_iter()
            .flatten()
            .min()
            .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("poll failed: {e}");
                    self.dispatch(Event::Stop {
                        graceful: false,
                        client: None,
                    });
                }
                continue;
            }
            for ev in events.iter() {
                let Token(t) = ev.token();
                match (t & 3, t >> 2) {
                    (KIND_WORKER, id) => self.on_worker_io(WorkerId(id as u64)),
                    (KIND_BUS, id) => self.relay.on_event(
                        WorkerId(id as u64),
                        self.poll.registry(),
                        Instant::now(),
                    ),
                    (KIND_CLIENT, id) => self.on_client(ClientId(id as u64)),
                    (_, id) => match ev.token() {
                        SIGNALS => self.on_signals(),
                        CONTROL => self.control.accept(self.poll.registry(), client_token),
                        WAKER => self.on_wake(),
                        ADMIN => {
                            if let Some(a) = self.admin.as_mut() {
                                a.accept(self.poll.registry(), admin_token, Instant::now());
                            }
                        }
                        _ if id >= ADMIN_CONN_BASE => self.on_admin((id - ADMIN_CONN_BASE) as u64),
                        _ => {}
                    },
                }
            }
            self.on_time();
            self.forward_to_hosts();
        }
        self.finish();
        let result = match self.sup.take_start_error() {
            Some(e) => Err(StartError::from(e)),
            None => Ok(()),
        };
        if let Err(e) = &result {
            self.readiness.report(Err(e.to_string()));
        }
        result
    }

    /// Hands an event to the supervisor and carries out what it decides.
    fn dispatch(&mut self, event: Event) {
        let actions = self.sup.handle(event, Instant::now());
        self.carry_out(actions);
    }

    /// Carries out actions in order. What they cause (a spawn that failed)
    /// is fed back only after the whole batch, so the supervisor's answer
    /// reaches workers the batch started too.
    fn carry_out(&mut self, actions: Vec<Action>) {
        let mut queue = VecDeque::from(actions);
        let mut feedback = VecDeque::new();
        loop {
            while let Some(a) = queue.pop_front() {
                feedback.extend(self.carry_out_one(a));
            }
            let Some(ev) = feedback.pop_front() else {
                break;
            };
            queue.extend(self.sup.handle(ev, Instant::now()));
        }
        for client in self.control.take_gone() {
            let more = self.sup.handle(Event::ClientGone(client), Instant::now());
            debug_assert!(more.is_empty(), "a gone client causes no actions");
        }
        self.tell_systemd();
    }

    /// Tells systemd what changed since it was last told: ready (every
    /// worker of every group), reloading, ready again, stopping.
    fn tell_systemd(&mut self) {
        let Some(n) = &self.systemd else { return };
        let now = if self.sup.is_stopping() {
            systemd::State::Stopping
        } else if !self.sup.is_running() {
            systemd::State::Starting
        } else if self.sup.reload_busy() {
            systemd::State::Reloading
        } else {
            systemd::State::Ready
        };
        if now == self.told {
            return;
        }
        let workers: u32 = self.cfg.workers.iter().map(|w| w.count).sum();
        let status = match (self.told, now) {
            (_, systemd::State::Ready) => format!(
                "{workers} workers in {} groups ready",
                self.cfg.workers.len()
            ),
            (_, systemd::State::Reloading) => "reloading".to_string(),
            (systemd::State::Starting, _) => {
                "stopping before every worker was ready (see the log)".to_string()
            }
            _ => "stopping".to_string(),
        };
        if let Some(msg) = systemd::message(self.told, now, &status) {
            match n.send(&msg) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => tracing::warn!(
                    "cannot notify systemd: its socket is full; {:?} dropped",
                    msg.lines().next().unwrap_or_default()
                ),
                Err(e) => tracing::warn!("cannot notify systemd: {e}"),
            }
            self.told = now;
        }
    }

    fn carry_out_one(&mut self, action: Action) -> Option<Event> {
        match action {
            Action::Spawn {
                worker,
                group,
                id,
                build,
                handover,
            } => {
                if let Err(e) = self.spawn(worker, group, id, &build, handover) {
                    return Some(Event::SpawnFailed {
                        worker,
                        error: e.to_string(),
                    });
                }
            }
            Action::Stop { worker, graceful } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.buf.queue(&ToWorker::Stop { graceful });
                    if w.buf.flush(&mut w.ctl).is_err() {
                        process::kill_now(w.pid);
                    }
                }
            }
            Action::Kill { worker } => {
                if let Some(w) = self.workers.get(&worker) {
                    process::kill_now(w.pid);
                }
            }
            Action::Handover { from, to } => self.begin_handover(from, to),
            Action::Reload { worker } => {
                if let Some(w) = self.workers.get_mut(&worker) {
                    w.buf.queue(&ToWorker::Reload);
                    let _ = w.buf.flush(&mut w.ctl);
                }
            }
            Action::Install { group, source, tls } => self.installer.start(group, source, tls),
            Action::Reply { client, response } => {
                self.control.reply(client, &response, self.poll.registry())
            }
            Action::Prune { keep } => builds::prune(&self.cfg.host.runtime_dir, &keep),
            Action::Started => {
                // Before the CLI of `start -d` hears it and exits. (Under
                // systemd, run the master in the foreground: with `-d` its
                // messages come from a process that is not the unit's main
                // one, which NotifyAccess=main ignores.)
                self.tell_systemd();
                let table = self.startup_table();
                self.readiness.report(Ok(table));
            }
        }
        None
    }

    fn spawn(
        &mut self,
        worker: WorkerId,
        group: usize,
        id: u32,
        build: &builds::Build,
        handover: bool,
    ) -> io::Result<()> {
        let cfg = &self.cfg.workers[group];
        let pair: Option<(OwnedFd, OwnedFd)> = match handover {
            true => {
                let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
                Some((ours.into(), theirs.into()))
            }
            false => None,
        };
        let child = process::spawn_worker(
            &self.exe,
            cfg,
            id,
            build,
            self.sockets[group].get(id as usize),
            &self.worker_log,
            pair.as_ref().map(|p| &p.1),
        )?;
        // Theirs is the child's now; ours waits for the handover.
        let handover_end = pair.map(|(ours, _theirs)| ours);
        let pid = child.pid;
        let mut ctl = child.ctl;
        let registered = self
            .poll
            .registry()
            .register(
                &mut ctl,
                worker_token(worker),
                Interest::READABLE | Interest::WRITABLE,
            )
            .and_then(|()| {
                let bus = Attach {
                    worker,
                    group,
                    pid: pid.as_raw() as u32,
                    stream: child.bus,
                    token: bus_token(worker),
                    stuck_timeout: cfg.stuck_timeout,
                };
                self.relay.add(bus, self.poll.registry(), Instant::now())
            });
        if let Err(e) = registered {
            // Not watched, it could not be supervised: gone before it starts.
            let _ = self.poll.registry().deregister(&mut ctl);
            process::kill_now(pid);
            return Err(e);
        }
        tracing::debug!(pid = pid.as_raw(), "started worker {}#{id}", cfg.name);
        self.sup.note_pid(worker, pid.as_raw() as u32);
        self.workers.insert(
            worker,
            WorkerIo {
                pid,
                ctl,
                buf: LineBuf::default(),
                plugin: String::new(),
                loaded_at: SystemTime::now(),
                handover_end,
            },
        );
        Ok(())
    }

    /// Sends `to`'s handover socket to `from` with `ToWorker::Handover`,
    /// and marks the cut on both their buses. Without an old worker (or if
    /// it cannot be told), the socket is closed: `to` then starts afresh.
    fn begin_handover(&mut self, from: Option<WorkerId>, to: WorkerId) {
        let Some(end) = self
            .workers
            .get_mut(&to)
            .and_then(|w| w.handover_end.take())
        else {
            return;
        };
        let Some(from) = from else { return };
        let Some(w) = self.workers.get_mut(&from) else {
            return;
        };
        match w.send_with_fd(&ToWorker::Handover, end.as_fd()) {
            Ok(()) => self.relay.cut(from, to, Instant::now()),
            Err(e) => tracing::warn!(
                pid = w.pid.as_raw(),
                "cannot ask the old worker for its connections: {e}; its replacement starts afresh"
            ),
        }
    }

    fn on_time(&mut self) {
        self.dispatch(Event::Tick);
        let now = Instant::now();
        for (worker, reason) in self.relay.stuck(now) {
            self.dispatch(Event::Stuck { worker, reason });
        }
        if let Some(r) = self.redis.as_mut() {
            r.on_time(&mut self.relay, now);
        }
        if self.usage_due.is_some_and(|t| t <= now) {
            self.usage_due = Some(now + USAGE_POLL);
            self.poll_usage();
        }
        if self.sup.is_running() {
            if let Some(watch) = self.watch.as_mut() {
                let triggers = watch.take(now);
                if !triggers.is_empty() {
                    if self.sup.reload_busy() {
                        watch.retry(triggers, now);
                    } else {
                        self.dispatch(Event::Reload {
                            graceful: false,
                            client: None,
                            changed: Some(triggers),
                        });
                    }
                }
            }
        }
        for (to, report) in self.control.deliver_due(now, self.poll.registry()) {
            let registry = self.poll.registry();
            let Some(a) = self.admin.as_mut() else {
                continue;
            };
            match (to, &report) {
                (Sink::Admin, _) => {
                    for kind in a.answer(&report, registry, now) {
                        self.start_admin(kind);
                    }
                }
                (Sink::Sample, Gathered::Status(r)) => a.history.record(r, now, SystemTime::now()),
                _ => {}
            }
        }
        if let Some(a) = self.admin.as_mut() {
            a.expire(now, self.poll.registry());
            if a.sample_due(now) && self.sup.is_running() {
                self.start_status(Sink::Sample);
            }
        }
        for client in self.control.take_gone() {
            self.dispatch(Event::ClientGone(client));
        }
    }

    /// Recycling: asks serving workers of groups with `max_requests` for
    /// their counters (the answer comes back as `Stats`), and reads the
    /// memory of those with `max_memory`.
    fn poll_usage(&mut self) {
        if !self.sup.is_running() {
            return;
        }
        let req = self.control.next_req();
        let mut memory = Vec::new();
        for (&k, w) in &mut self.workers {
            let Some(v) = self.sup.worker(k) else {
                continue;
            };
            if !(v.ready && v.serving) {
                continue;
            }
            let g = &self.cfg.workers[v.group];
            if g.max_requests.is_some() {
                w.buf.queue(&ToWorker::Stats { req });
                let _ = w.buf.flush(&mut w.ctl);
            }
            if g.max_memory.is_some() {
                memory.push((k, process::rss_bytes(w.pid)));
            }
        }
        for (worker, bytes) in memory {
            self.dispatch(Event::Usage {
                worker,
                requests: None,
                memory: Some(bytes),
            });
        }
    }

    /// What the relay read since last time goes to the other hosts.
    fn forward_to_hosts(&mut self) {
        if let Some(r) = self.redis.as_mut() {
            if let Some(out) = self.relay.take_forward() {
                r.forward(out);
            }
        }
    }

    /// The waker: file events, installs that finished, or Redis.
    fn on_wake(&mut self) {
        if let Some(r) = self.redis.as_mut() {
            r.on_wake(&mut self.relay, Instant::now());
        }
        if let Some(w) = self.watch.as_mut() {
            w.drain(Instant::now());
        }
        for (group, result) in self.installer.finished() {
            self.dispatch(Event::Installed { group, result });
        }
    }

    fn on_worker_io(&mut self, worker: WorkerId) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let (msgs, _closed) = w.buf.read_from::<FromWorker>(&mut w.ctl);
        if w.buf.overflowed() {
            // It stops once its control channel closes; the supervisor
            // sees the exit as it would any other.
            tracing::error!(
                pid = w.pid.as_raw(),
                "worker sent a control line over {} bytes; closing its channel",
                crate::ipc::MAX_LINE
            );
            let _ = self.poll.registry().deregister(&mut w.ctl);
            let _ = w.ctl.shutdown(std::net::Shutdown::Both);
        } else {
            let _ = w.buf.flush(&mut w.ctl);
        }
        let pid = w.pid;
        for msg in msgs {
            match msg {
                Ok(FromWorker::Ready { plugin, handover }) => {
                    if let Some(w) = self.workers.get_mut(&worker) {
                        w.plugin = plugin;
                        w.loaded_at = SystemTime::now();
                    }
                    self.relay.ready(worker, Instant::now());
                    self.dispatch(Event::Ready { worker, handover });
                }
                Ok(FromWorker::HandedOver(report)) => {
                    self.relay
                        .handed_over(worker, report.moved + report.refused > 0);
                    self.dispatch(Event::HandedOver { worker, report });
                }
                Ok(FromWorker::Failed { error }) => self.dispatch(Event::Failed { worker, error }),
                Ok(msg @ FromWorker::LogReopened { .. }) => {
                    self.control.answered(worker, pid.as_raw() as u32, msg)
                }
                Ok(msg @ (FromWorker::Stats { .. } | FromWorker::Connections { .. })) => {
                    if let FromWorker::Stats { stats, .. } = &msg {
                        // Any answer (to `status` or to our poll) tells the requests served.
                        let limited = self
                            .sup
                            .worker(worker)
                            .is_some_and(|v| self.cfg.workers[v.group].max_requests.is_some());
                        if limited {
                            self.dispatch(Event::Usage {
                                worker,
                                requests: Some(stats.total_messages),
                                memory: None,
                            });
                        }
                    }
                    self.control.answered(worker, pid.as_raw() as u32, msg)
                }
                Err(e) => tracing::warn!(pid = pid.as_raw(), "bad message from worker: {e}"),
            }
        }
    }

    fn on_client(&mut self, client: ClientId) {
        let msgs = self.control.read(client, self.poll.registry());
        for msg in msgs {
            match msg {
                Ok(Request::Stop { graceful }) => {
                    tracing::info!(graceful, "stop requested");
                    self.dispatch(Event::Stop {
                        graceful,
                        client: Some(client),
                    });
                }
                Ok(Request::Status) => self.start_status(Sink::Client(client)),
                Ok(Request::Connections) => self.start_connections(Sink::Client(client)),
                Ok(Request::ReopenLogs) => self.start_reopen(Sink::Client(client)),
                Ok(Request::Reload { graceful }) => self.dispatch(Event::Reload {
                    graceful,
                    client: Some(client),
                    changed: None,
                }),
                Err(e) => self.control.reply(
                    client,
                    &Response::Error {
                        message: format!("bad request: {e}"),
                    },
                    self.poll.registry(),
                ),
            }
        }
        for client in self.control.take_gone() {
            self.dispatch(Event::ClientGone(client));
        }
    }

    fn on_admin(&mut self, id: u64) {
        let Some(a) = self.admin.as_mut() else {
            return;
        };
        if let Some(kind) = a.on_event(id, self.poll.registry(), Instant::now()) {
            self.start_admin(kind);
        }
    }

    /// Gathers what admin requests wait for, as for the CLI.
    fn start_admin(&mut self, kind: admin::Gather) {
        match kind {
            admin::Gather::Status => self.start_status(Sink::Admin),
            admin::Gather::Connections => self.start_connections(Sink::Admin),
        }
    }

    fn on_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGINT | SIGTERM => {
                    tracing::info!("signal {sig}: stopping");
                    self.dispatch(Event::Stop {
                        graceful: false,
                        client: None,
                    });
                }
                SIGQUIT => {
                    tracing::info!("SIGQUIT: stopping gracefully");
                    self.dispatch(Event::Stop {
                        graceful: true,
                        client: None,
                    });
                }
                SIGCHLD => self.reap(),
                SIGUSR1 | SIGUSR2 => {
                    tracing::info!("signal {sig}: reloading");
                    self.dispatch(Event::Reload {
                        graceful: sig == SIGUSR2,
                        client: None,
                        changed: None,
                    });
                }
                SIGABRT => self.start_status(Sink::Log),
                SIGIO => self.start_connections(Sink::Log),
                SIGHUP => self.start_reopen(Sink::Log),
                _ => {}
            }
        }
    }

    fn reap(&mut self) {
        for exit in process::reap() {
            let Some(worker) = self
                .workers
                .iter()
                .find(|(_, w)| w.pid == exit.pid)
                .map(|(&k, _)| k)
            else {
                continue;
            };
            // What it said just before dying (its reason for failing) may
            // still be unread: the exit can be seen before the message.
            self.on_worker_io(worker);
            if let Some(mut w) = self.workers.remove(&worker) {
                let _ = self.poll.registry().deregister(&mut w.ctl);
            }
            self.relay
                .remove(worker, self.poll.registry(), Instant::now());
            self.control.worker_gone(worker, exit.pid.as_raw() as u32);
            self.dispatch(Event::Exited {
                worker,
                how: exit.how,
                clean: exit.clean,
                by_itself: exit.by_itself,
            });
        }
    }

    /// Sends `msg(req)` to every ready worker; returns the request number and
    /// the workers asked.
    fn ask_workers(&mut self, msg: impl Fn(u64) -> ToWorker) -> (u64, HashSet<WorkerId>) {
        let req = self.control.next_req();
        let mut waiting = HashSet::new();
        for (&k, w) in &mut self.workers {
            if self.sup.worker(k).is_some_and(|v| v.ready) {
                w.buf.queue(&msg(req));
                if w.buf.flush(&mut w.ctl).is_ok() {
                    waiting.insert(k);
                }
            }
        }
        (req, waiting)
    }

    fn start_status(&mut self, to: Sink) {
        let (req, waiting) = self.ask_workers(|req| ToWorker::Stats { req });
        let mut rows = Vec::new();
        for (&k, w) in &self.workers {
            let Some(v) = self.sup.worker(k) else {
                continue;
            };
            let g = &self.cfg.workers[v.group];
            rows.push(WorkerRow {
                pid: w.pid.as_raw() as u32,
                group: g.name.clone(),
                id: v.id,
                listen: g.listen_text().to_string(),
                rss_bytes: process::rss_bytes(w.pid),
                plugin: g.plugin.display().to_string(),
                build: v.build.short().to_string(),
                loaded_at: w
                    .loaded_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
                bus_dropped: self.relay.dropped(k),
                bus_backlog_bytes: self.relay.backlog(k),
                stats: None,
                qps: None,
                // Until it answers; still so at the deadline means busy.
                state: if waiting.contains(&k) {
                    WorkerState::Busy
                } else {
                    WorkerState::Starting
                },
            });
        }
        rows.sort_by(|a, b| (&a.group, a.id).cmp(&(&b.group, b.id)));
        let groups = self
            .cfg
            .workers
            .iter()
            .enumerate()
            .map(|(gi, g)| GroupRow {
                name: g.name.clone(),
                listen: g.listen_text().to_string(),
                count: g.count,
                processes: self.sup.processes(gi),
                bus_dropped: self.relay.group_dropped(gi),
                restarts: self
                    .sup
                    .restarts()
                    .filter(|(group, ..)| *group == g.name)
                    .map(|(_, cause, n)| (cause.name().to_string(), n))
                    .collect(),
                last_handover: self.sup.last_handover(gi),
                reloads: self
                    .sup
                    .reload_outcomes()
                    .filter(|(group, ..)| *group == g.name)
                    .map(|(_, outcome, n)| (outcome.to_string(), n))
                    .collect(),
            })
            .collect();
        let exits = self
            .sup
            .exits()
            .map(|(group, status, count)| ExitRow {
                group: group.to_string(),
                status: status.to_string(),
                count,
            })
            .collect();
        let now = SystemTime::now();
        let mono = Instant::now();
        // The supervisor keeps no wall clock: its instants are dated from now.
        let wall_ms = |t: Instant| {
            (now - mono.saturating_duration_since(t))
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis() as u64
        };
        let reloads = self
            .sup
            .reload_history()
            .map(|(began, ended, report)| ReloadRecord {
                started_ms: wall_ms(*began),
                millis: ended.saturating_duration_since(*began).as_millis() as u64,
                ok: report.ok(),
                groups: report.groups.clone(),
            })
            .collect();
        let start_time = self
            .started_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let report = StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            master_pid: std::process::id(),
            start_time,
            uptime_secs: now
                .duration_since(self.started_at)
                .unwrap_or_default()
                .as_secs(),
            load_average: std::fs::read_to_string("/proc/loadavg")
                .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            groups,
            exits,
            workers: rows,
            bus: Box::new(match &self.redis {
                Some(r) => r.report(),
                None => crate::ipc::BusReport {
                    backend: "local".into(),
                    state: "local".into(),
                    ..Default::default()
                },
            }),
            reloads,
        };
        self.control
            .gather(to, req, waiting, Gathered::Status(report), Instant::now());
    }

    fn start_connections(&mut self, to: Sink) {
        let (req, waiting) = self.ask_workers(|req| ToWorker::Connections { req });
        let busy = waiting
            .iter()
            .filter_map(|k| self.workers.get(k))
            .map(|w| w.pid.as_raw() as u32)
            .collect();
        let report = ConnectionsReport {
            connections: Vec::new(),
            busy,
        };
        self.control.gather(
            to,
            req,
            waiting,
            Gathered::Connections(report),
            Instant::now(),
        );
    }

    /// `reopen-logs` or SIGHUP: opens `log_file` again (logrotate moved
    /// it) and hands the new file to every worker, alive in any state; the
    /// report says how many switched, once all answered or at the deadline.
    fn start_reopen(&mut self, to: Sink) {
        let mut report = ReopenReport::default();
        if self.worker_log.file.is_none() {
            // Foreground: the master and its workers write to its stderr.
            match to {
                Sink::Log => {
                    tracing::info!("SIGHUP: no log file to reopen (logging to standard error)")
                }
                Sink::Client(c) => {
                    let resp = Response::LogsReopened(report);
                    self.control.reply(c, &resp, self.poll.registry());
                }
                // The admin listener and its sampling never ask for a reopen.
                Sink::Admin | Sink::Sample => {}
            }
            return;
        }
        let path = self.cfg.host.log_file.clone();
        tracing::info!(path = %path.display(), "reopening the log file");
        let new = match logging::reopen_master(&path, &self.worker_log) {
            Ok(f) => f,
            Err(e) => {
                let message = format!("cannot reopen log_file {}: {e}", path.display());
                tracing::error!("{message}");
                if let Sink::Client(c) = to {
                    let resp = Response::Error { message };
                    self.control.reply(c, &resp, self.poll.registry());
                }
                return;
            }
        };
        tracing::info!(path = %path.display(), "log file reopened");
        report.path = Some(path.display().to_string());
        let req = self.control.next_req();
        let mut waiting = HashSet::new();
        for (&k, w) in &mut self.workers {
            let sent = w.send_with_fd(&ToWorker::ReopenLog { req }, new.as_fd());
            let pid = w.pid.as_raw() as u32;
            match sent {
                Ok(()) => {
                    waiting.insert(k);
                    report.busy.push(pid);
                }
                Err(e) => report.failed.push(format!("pid {pid}: {e}")),
            }
        }
        self.control
            .gather(to, req, waiting, Gathered::Reopen(report), Instant::now());
    }

    fn startup_table(&self) -> String {
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map_or_else(|| nix::unistd::getuid().to_string(), |u| u.name);
        let rows: Vec<Vec<String>> = self
            .cfg
            .workers
            .iter()
            .map(|g| {
                vec![
                    match &g.listen {
                        Some(l) if l.transport == crate::config::Transport::Ssl => {
                            format!("{} (ssl)", l.scheme.name())
                        }
                        Some(l) if l.transport != crate::config::Transport::Tcp => {
                            format!("{:?}", l.transport).to_lowercase()
                        }
                        Some(l) => l.scheme.name().to_string(),
                        None => "none".to_string(),
                    },
                    g.user.clone().unwrap_or_else(|| user.clone()),
                    g.name.clone(),
                    g.listen_text().to_string(),
                    g.count.to_string(),
                    "[OK]".to_string(),
                ]
            })
            .collect();
        let table = crate::table::render(
            &["proto", "user", "worker", "listen", "count", "state"],
            &rows,
        );
        let admin = (self.admin.as_ref())
            .map(|a| format!("admin: http://{}/\n", a.addr()))
            .unwrap_or_default();
        format!(
            "wm-host {} (master pid {})\n{table}{admin}",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        )
    }

    fn finish(&mut self) {
        let _ = std::fs::remove_file(self.cfg.control_socket());
        listen::remove_unix_files(&self.cfg.workers);
        let actions = self.sup.finish();
        self.carry_out(actions);
        if let Some(r) = self.redis.as_mut() {
            r.stop();
        }
        tracing::info!("master stopped");
    }
}

impl Readiness {
    pub fn fail(&mut self, error: &str) {
        self.report(Err(error.to_string()));
    }

    fn report(&mut self, outcome: Result<String, String>) {
        match (self, outcome) {
            (Readiness::Terminal, Ok(table)) => {
                println!("{table}Press Ctrl+C to stop. Start with -d to run in the background.");
                let _ = io::stdout().flush();
            }
            (Readiness::Terminal, Err(_)) => {}
            (Readiness::Pipe(f), outcome) => {
                let text = match outcome {
                    Ok(table) => format!("ok\n{table}"),
                    Err(e) => format!("error: {e}\n"),
                };
                // Taking the file closes the pipe: the CLI reads to its end.
                if let Some(mut f) = f.take() {
                    let _ = f.write_all(text.as_bytes());
                }
            }
        }
    }
}
