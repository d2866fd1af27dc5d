//! The master process: binds listeners, starts workers by fork+exec, watches
//! them, answers the control socket and signals. It never loads plugin code.

mod backoff;
pub mod builds;
mod listen;
pub mod roll;
mod spawn;
mod watch;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{UnixListener, UnixStream};
use mio::{Events, Interest, Poll, Token};
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use signal_hook::consts::signal::*;
use signal_hook_mio::v1_0::Signals;
use slab::Slab;

use self::backoff::Backoff;
use self::builds::Build;
use self::roll::{Action, Plan, Roll};
use self::watch::{Trigger, Watch};
use crate::bus::{self, BusBuf, BusMsg, Registry};
use crate::config::{Config, WorkerConfig};
use crate::ipc::{
    ConnectionsReport, ExitRow, FromWorker, GroupRow, LineBuf, Request, Response, StatusReport,
    ToWorker, WorkerRow, WorkerState,
};
use crate::runtime::PidLock;

const SIGNALS: Token = Token(0);
const CONTROL: Token = Token(1);
const WAKER: Token = Token(2);
const WORKER_BASE: usize = 1 << 20;
const BUS_BASE: usize = 1 << 25;
const CLIENT_BASE: usize = 1 << 30;
/// How long `status` and `connections` wait for workers to report; a worker
/// that has not answered by then is in a callback: `[busy]`.
const STATS_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Lock(String),
    #[error(transparent)]
    Bind(#[from] listen::BindError),
    #[error("{0}")]
    Io(String),
    #[error("worker {name}#{id} failed to start: {error}")]
    Worker {
        name: String,
        id: u32,
        error: String,
    },
    #[error("workers not ready within start_timeout ({0:?})")]
    Timeout(Duration),
    #[error("stopped by a signal before all workers were ready")]
    Interrupted,
    #[error("{0}")]
    Plugin(String),
}

/// Where to tell the CLI that start-up finished (daemon mode).
pub enum Readiness {
    /// Foreground: print the startup table.
    Terminal,
    /// Daemon: write the outcome to the CLI's pipe, then close it.
    Pipe(Option<File>),
}

struct Group {
    cfg: WorkerConfig,
    sockets: Vec<OwnedFd>,
    backoff: Vec<Backoff>,
    /// Respawn due per id.
    respawn_at: Vec<Option<Instant>>,
    /// The build each id runs (they differ only during a roll).
    builds: Vec<Build>,
}

/// Where a worker stands in its slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Serving,
    /// Started by a roll; serving once ready.
    Replacement,
    /// Replaced: told to stop, not respawned.
    Retiring,
}

struct WorkerProc {
    group: usize,
    id: u32,
    pid: Pid,
    ctl: UnixStream,
    buf: LineBuf,
    bus: UnixStream,
    bus_buf: BusBuf,
    started: Instant,
    ready: bool,
    /// Set when the worker reported why it could not start.
    failure: Option<String>,
    plugin: String,
    build: Build,
    role: Role,
    loaded_at: SystemTime,
}

struct Client {
    stream: UnixStream,
    buf: LineBuf,
}

/// A report gathered from every ready worker: sent once all have answered
/// or at the deadline, whichever comes first.
struct Gathering {
    to: Sink,
    req: u64,
    /// Worker keys asked and not answered yet.
    waiting: HashSet<usize>,
    report: Gathered,
    deadline: Instant,
}

/// Where a gathered report goes.
#[derive(Debug, Clone, Copy)]
enum Sink {
    Client(usize),
    /// Signals (SIGIOT, SIGIO): into the log.
    Log,
}

enum Gathered {
    Status(StatusReport),
    Connections(ConnectionsReport),
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
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting { deadline: Instant },
    Running,
    Stopping { deadline: Instant, killed: bool },
}

pub struct Master {
    cfg: Config,
    exe: PathBuf,
    poll: Poll,
    signals: Signals,
    control: UnixListener,
    groups: Vec<Group>,
    workers: Slab<WorkerProc>,
    clients: Slab<Client>,
    /// Clients waiting for the stop to finish.
    stop_waiters: Vec<usize>,
    gatherings: Vec<Gathering>,
    next_req: u64,
    /// (group, "exit code N" | "signal S") -> deaths of workers that died
    /// unexpectedly or were killed, since start.
    exits: BTreeMap<(String, String), u64>,
    phase: Phase,
    start_error: Option<StartError>,
    started_at: SystemTime,
    /// Group membership across workers, to hand to workers that start.
    registry: Registry,
    roll: Option<Roll>,
    /// When the replacement being waited for must be ready.
    roll_deadline: Option<Instant>,
    /// Clients waiting for the roll's report.
    reload_waiters: Vec<usize>,
    watch: Option<Watch>,
    /// The daemon's log file, handed to workers open.
    worker_log: Option<File>,
    _lock: PidLock,
}

impl Master {
    /// Takes the runtime dir, binds every listener and the control socket.
    pub fn new(cfg: Config) -> Result<Master, StartError> {
        let lock = PidLock::acquire(&cfg).map_err(StartError::Lock)?;
        // Copies an earlier master left (perhaps cut short by a crash) are
        // not trusted: each start copies afresh.
        builds::prune(&cfg.host.runtime_dir, &HashSet::new());
        let mut groups = Vec::new();
        for w in &cfg.workers {
            let build =
                builds::install(&cfg.host.runtime_dir, &w.plugin).map_err(StartError::Plugin)?;
            let sockets = listen::bind(w)?;
            groups.push(Group {
                backoff: vec![Backoff::default(); w.count as usize],
                respawn_at: vec![None; w.count as usize],
                builds: vec![build; w.count as usize],
                cfg: w.clone(),
                sockets,
            });
        }
        let io_err = |what: &str, e: io::Error| StartError::Io(format!("{what}: {e}"));
        let sock_path = cfg.control_socket();
        let _ = std::fs::remove_file(&sock_path);
        let mut control = UnixListener::bind(&sock_path).map_err(|e| {
            io_err(
                &format!("cannot create control socket {}", sock_path.display()),
                e,
            )
        })?;
        crate::runtime::chmod_nofollow(&sock_path, 0o600)
            .map_err(|e| io_err("chmod control socket", e))?;
        let poll = Poll::new().map_err(|e| io_err("epoll", e))?;
        let mut signals = Signals::new([
            SIGINT, SIGTERM, SIGQUIT, SIGUSR1, SIGUSR2, SIGABRT, SIGIO, SIGCHLD, SIGHUP,
        ])
        .map_err(|e| io_err("signals", e))?;
        poll.registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)
            .map_err(|e| io_err("register signals", e))?;
        poll.registry()
            .register(&mut control, CONTROL, Interest::READABLE)
            .map_err(|e| io_err("register control socket", e))?;
        let exe = std::env::current_exe().map_err(|e| io_err("cannot find own executable", e))?;
        let waker = std::sync::Arc::new(
            mio::Waker::new(poll.registry(), WAKER).map_err(|e| io_err("waker", e))?,
        );
        let watch = Watch::new(&cfg.workers, waker).unwrap_or_else(|e| {
            tracing::warn!("cannot watch plugin files: {e}; reload with `wm-host reload`");
            None
        });
        Ok(Master {
            phase: Phase::Starting {
                deadline: Instant::now() + cfg.host.start_timeout,
            },
            cfg,
            exe,
            poll,
            signals,
            control,
            groups,
            workers: Slab::new(),
            clients: Slab::new(),
            stop_waiters: Vec::new(),
            gatherings: Vec::new(),
            next_req: 0,
            exits: BTreeMap::new(),
            start_error: None,
            started_at: SystemTime::now(),
            registry: Registry::default(),
            roll: None,
            roll_deadline: None,
            reload_waiters: Vec::new(),
            watch,
            worker_log: None,
            _lock: lock,
        })
    }

    /// Workers will log to this file (the daemon's log_file).
    pub fn with_worker_log(mut self, file: File) -> Master {
        self.worker_log = Some(file);
        self
    }

    /// Starts all workers and supervises them until stopped. Returns an error
    /// only when start-up failed; workers are gone either way.
    pub fn run(mut self, mut readiness: Readiness) -> Result<(), StartError> {
        tracing::info!(pid = std::process::id(), config = %self.cfg.path.display(), "master starting");
        for g in 0..self.groups.len() {
            for id in 0..self.groups[g].cfg.count {
                if let Err(e) = self.spawn(g, id) {
                    self.fail_start(StartError::Io(format!("cannot start worker: {e}")));
                }
            }
        }
        let mut events = Events::with_capacity(256);
        loop {
            if let Phase::Stopping { .. } = self.phase {
                if self.workers.is_empty() {
                    break;
                }
            }
            let timeout = self
                .next_deadline()
                .map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!("poll failed: {e}");
                    self.begin_stop(false);
                }
                continue;
            }
            for ev in events.iter() {
                match ev.token() {
                    SIGNALS => self.on_signals(),
                    CONTROL => self.accept_clients(),
                    WAKER => {
                        if let Some(w) = self.watch.as_mut() {
                            w.drain(Instant::now());
                        }
                    }
                    Token(t) if t >= CLIENT_BASE => self.on_client(t - CLIENT_BASE),
                    Token(t) if t >= BUS_BASE => self.on_bus(t - BUS_BASE),
                    Token(t) => self.on_worker_io(t - WORKER_BASE),
                }
            }
            self.on_time(&mut readiness);
        }
        self.finish();
        let result = match self.start_error.take() {
            Some(e) => Err(e),
            None => Ok(()),
        };
        if let Err(e) = &result {
            readiness.report(Err(e.to_string()));
        }
        result
    }

    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        match self.phase {
            Phase::Starting { deadline } => consider(deadline),
            Phase::Stopping {
                deadline,
                killed: false,
            } => consider(deadline),
            _ => {}
        }
        for g in &self.groups {
            g.respawn_at.iter().flatten().for_each(|&t| consider(t));
        }
        self.gatherings.iter().for_each(|g| consider(g.deadline));
        if let Some(d) = self.roll_deadline {
            consider(d);
        }
        if let Some(d) = self.watch.as_ref().and_then(Watch::due) {
            consider(d);
        }
        let stop = self.cfg.host.stop_timeout;
        for (_, w) in &self.workers {
            if w.role == Role::Retiring {
                consider(w.started + stop);
            }
        }
        next
    }

    fn on_time(&mut self, readiness: &mut Readiness) {
        let now = Instant::now();
        match self.phase {
            Phase::Starting { deadline } => {
                if self.workers.iter().all(|(_, w)| w.ready) && self.all_slots_filled() {
                    self.phase = Phase::Running;
                    tracing::info!(workers = self.workers.len(), "all workers ready");
                    readiness.report(Ok(self.startup_table()));
                } else if now >= deadline {
                    self.fail_start(StartError::Timeout(self.cfg.host.start_timeout));
                }
            }
            Phase::Stopping {
                deadline,
                killed: false,
            } if now >= deadline => {
                for (_, w) in &self.workers {
                    tracing::warn!(
                        pid = w.pid.as_raw(),
                        "worker {}#{} did not stop within stop_timeout; killing it",
                        self.groups[w.group].cfg.name,
                        w.id
                    );
                    let _ = kill(w.pid, Signal::SIGKILL);
                }
                self.phase = Phase::Stopping {
                    deadline,
                    killed: true,
                };
            }
            _ => {}
        }
        if self.phase == Phase::Running {
            for g in 0..self.groups.len() {
                for id in 0..self.groups[g].respawn_at.len() {
                    if self.groups[g].respawn_at[id].is_some_and(|t| t <= now) {
                        self.groups[g].respawn_at[id] = None;
                        if let Err(e) = self.spawn(g, id as u32) {
                            tracing::error!(
                                "cannot respawn worker {}#{id}: {e}",
                                self.groups[g].cfg.name
                            );
                            let delay = self.groups[g].backoff[id].on_death(Duration::ZERO);
                            self.groups[g].respawn_at[id] = Some(now + delay);
                        }
                    }
                }
            }
        }
        if self.phase == Phase::Running {
            self.on_watch(now);
        }
        let stop = self.cfg.host.stop_timeout;
        for (_, w) in &self.workers {
            if w.role == Role::Retiring && w.started + stop <= now {
                tracing::warn!(
                    pid = w.pid.as_raw(),
                    "replaced worker did not stop within stop_timeout; killing it"
                );
                let _ = kill(w.pid, Signal::SIGKILL);
            }
        }
        if self.roll_deadline.is_some_and(|d| d <= now) {
            if let Some((group, id)) = self.roll.as_ref().and_then(|r| r.waiting()) {
                let t = self.cfg.host.start_timeout;
                self.fail_roll_step(group, id, format!("not ready within start_timeout ({t:?})"));
            }
        }
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.gatherings)
            .into_iter()
            .partition(|g| g.waiting.is_empty() || g.deadline <= now);
        self.gatherings = keep;
        for g in done {
            self.deliver(g);
        }
    }

    fn all_slots_filled(&self) -> bool {
        let expected: u32 = self.groups.iter().map(|g| g.cfg.count).sum();
        self.workers.len() == expected as usize
    }

    fn spawn(&mut self, group: usize, id: u32) -> io::Result<()> {
        let build = self.groups[group].builds[id as usize].clone();
        self.spawn_with(group, id, build, Role::Serving).map(|_| ())
    }

    fn spawn_with(&mut self, group: usize, id: u32, build: Build, role: Role) -> io::Result<usize> {
        let g = &self.groups[group];
        let child = spawn::worker(
            &self.exe,
            &g.cfg,
            id,
            &build.copy,
            &g.sockets[id as usize],
            self.worker_log.as_ref(),
        )?;
        let entry = self.workers.vacant_entry();
        let key = entry.key();
        let mut ctl = child.ctl;
        let mut bus = child.bus;
        self.poll.registry().register(
            &mut ctl,
            Token(WORKER_BASE + key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        self.poll.registry().register(
            &mut bus,
            Token(BUS_BASE + key),
            Interest::READABLE | Interest::WRITABLE,
        )?;
        // The newcomer learns who is in which group before anything else.
        let mut bus_buf = BusBuf::default();
        for msg in self.registry.snapshot() {
            bus::encode(&msg, &mut bus_buf.outbuf);
        }
        let _ = bus_buf.flush(&mut bus);
        tracing::debug!(
            pid = child.pid.as_raw(),
            "started worker {}#{id}",
            g.cfg.name
        );
        entry.insert(WorkerProc {
            group,
            id,
            pid: child.pid,
            ctl,
            buf: LineBuf::default(),
            bus,
            bus_buf,
            started: Instant::now(),
            ready: false,
            failure: None,
            plugin: String::new(),
            build,
            role,
            loaded_at: SystemTime::now(),
        });
        Ok(key)
    }

    fn on_worker_io(&mut self, key: usize) {
        let Some(w) = self.workers.get_mut(key) else {
            return;
        };
        let (msgs, _closed) = w.buf.read_from::<FromWorker>(&mut w.ctl);
        let _ = w.buf.flush(&mut w.ctl);
        let (group, id) = (w.group, w.id);
        for msg in msgs {
            match msg {
                Ok(FromWorker::Ready { plugin }) => {
                    let w = &mut self.workers[key];
                    w.ready = true;
                    w.plugin = plugin;
                    w.loaded_at = SystemTime::now();
                    if w.role == Role::Replacement {
                        self.replacement_ready(key);
                    }
                }
                Ok(FromWorker::Failed { error }) => {
                    let name = self.groups[group].cfg.name.clone();
                    self.workers[key].failure = Some(error.clone());
                    if let Phase::Starting { .. } = self.phase {
                        self.fail_start(StartError::Worker { name, id, error });
                    } else if self.workers[key].role == Role::Replacement {
                        let _ = kill(self.workers[key].pid, Signal::SIGKILL);
                    }
                }
                Ok(msg @ (FromWorker::Stats { .. } | FromWorker::Connections { .. })) => {
                    let req = msg.req();
                    let pid = self.workers[key].pid.as_raw() as u32;
                    if let Some(g) = self.gatherings.iter_mut().find(|g| g.req == req) {
                        if g.waiting.remove(&key) {
                            g.report.answered(pid, Some(msg));
                        }
                    }
                }
                Err(e) => tracing::warn!(
                    "bad message from worker {}#{id}: {e}",
                    self.groups[group].cfg.name
                ),
            }
        }
    }

    /// A watched file settled: roll the groups whose build really changed.
    fn on_watch(&mut self, now: Instant) {
        let Some(watch) = self.watch.as_mut() else {
            return;
        };
        let triggers = watch.take(now);
        if triggers.is_empty() {
            return;
        }
        if self.roll.is_some() {
            watch.retry(triggers, now);
            return;
        }
        let mut groups = HashSet::new();
        for t in triggers {
            match t {
                Trigger::Extra(g) => {
                    groups.insert(g);
                }
                Trigger::Plugin(g) => {
                    let grp = &self.groups[g];
                    match builds::hash_file(&grp.cfg.plugin) {
                        // Same bytes (a touch, or our own copy's events): nothing to do.
                        Ok(h) if grp.builds.iter().all(|b| b.hash == h) => {
                            tracing::info!(
                                "{} changed on disk but not its content: no reload",
                                grp.cfg.plugin.display()
                            );
                        }
                        Ok(_) => {
                            groups.insert(g);
                        }
                        // Missing: mid-replace; the next event brings it back.
                        Err(_) => {}
                    }
                }
            }
        }
        if groups.is_empty() {
            return;
        }
        let names: Vec<&str> = groups
            .iter()
            .map(|&g| self.groups[g].cfg.name.as_str())
            .collect();
        tracing::info!("change detected for {}: reloading", names.join(", "));
        if let Err(e) = self.begin_reload_of(Some(&groups), false, None) {
            tracing::warn!("reload refused: {e}");
        }
    }

    fn begin_reload(&mut self, graceful: bool, client: Option<usize>) -> Result<(), String> {
        self.begin_reload_of(None, graceful, client)
    }

    /// Starts a rolling reload of every reloadable group (or of `only`);
    /// groups with `reloadable = false` only run `on_worker_reload`.
    fn begin_reload_of(
        &mut self,
        only: Option<&HashSet<usize>>,
        graceful: bool,
        client: Option<usize>,
    ) -> Result<(), String> {
        match self.phase {
            Phase::Running => {}
            Phase::Starting { .. } => return Err("still starting".into()),
            Phase::Stopping { .. } => return Err("stopping".into()),
        }
        if self.roll.is_some() {
            return Err("a reload is already in progress".into());
        }
        let mut plans = Vec::new();
        let mut kept = Vec::new();
        let mut errors = Vec::new();
        let picked = |g: usize| only.is_none_or(|set| set.contains(&g));
        for (gi, g) in self.groups.iter().enumerate() {
            if !picked(gi) {
                continue;
            }
            let old = g.builds[0].short().to_string();
            if !g.cfg.reloadable {
                kept.push((g.cfg.name.clone(), old, g.cfg.count));
                continue;
            }
            match builds::install(&self.cfg.host.runtime_dir, &g.cfg.plugin) {
                Ok(new) => plans.push(Plan {
                    group: gi,
                    name: g.cfg.name.clone(),
                    count: g.cfg.count,
                    old,
                    new,
                }),
                Err(e) => errors.push((g.cfg.name.clone(), old, g.cfg.count, e)),
            }
        }
        for (_, w) in &mut self.workers {
            if picked(w.group) && !self.groups[w.group].cfg.reloadable && w.role == Role::Serving {
                w.buf.queue(&ToWorker::Reload);
                let _ = w.buf.flush(&mut w.ctl);
            }
        }
        let mut roll = Roll::new(plans, kept, graceful);
        for (name, old, count, error) in errors {
            tracing::error!("reload of {name} refused: {error}");
            roll.report.groups.push(roll::GroupReport {
                name,
                new: old.clone(),
                old,
                rolled: 0,
                count,
                millis: 0,
                kept: false,
                error: Some(error),
            });
        }
        tracing::info!(graceful, "rolling reload started");
        self.roll = Some(roll);
        self.reload_waiters.extend(client);
        self.drive_roll();
        Ok(())
    }

    /// Carries out the roll's next action.
    fn drive_roll(&mut self) {
        let Some(roll) = self.roll.as_mut() else {
            return;
        };
        match roll.next(Instant::now()) {
            Action::Spawn { group, id, build } => {
                tracing::info!(
                    "reload: starting {}#{id} on build {}",
                    self.groups[group].cfg.name,
                    build.short()
                );
                self.roll_deadline = Some(Instant::now() + self.cfg.host.start_timeout);
                if let Err(e) = self.spawn_with(group, id, build, Role::Replacement) {
                    self.fail_roll_step(group, id, format!("cannot start a worker: {e}"));
                }
            }
            Action::Finished => self.finish_roll(),
            Action::Retire { .. } => unreachable!("next() never retires"),
        }
    }

    fn replacement_ready(&mut self, key: usize) {
        let (group, id) = (self.workers[key].group, self.workers[key].id);
        let Some(Action::Retire { .. }) = self.roll.as_mut().and_then(|r| r.ready(group, id))
        else {
            return;
        };
        self.roll_deadline = None;
        let graceful = self.roll.as_ref().is_some_and(|r| r.graceful);
        self.workers[key].role = Role::Serving;
        self.groups[group].builds[id as usize] = self.workers[key].build.clone();
        for (k, w) in &mut self.workers {
            if k != key && w.group == group && w.id == id && w.role == Role::Serving {
                // Stops accepting at once; its queue stays with the master's socket.
                w.role = Role::Retiring;
                w.buf.queue(&ToWorker::Stop { graceful });
                if w.buf.flush(&mut w.ctl).is_err() {
                    let _ = kill(w.pid, Signal::SIGKILL);
                }
                // Bounded by stop_timeout, as a stop is.
                w.started = Instant::now();
            }
        }
        self.drive_roll();
    }

    /// The replacement for (group, id) failed: the roll stops there.
    fn fail_roll_step(&mut self, group: usize, id: u32, error: String) {
        let Some(roll) = self.roll.as_mut() else {
            return;
        };
        if roll.waiting() != Some((group, id)) {
            return;
        }
        tracing::error!(
            "reload of {}#{id} failed: {error}; keeping the running build",
            self.groups[group].cfg.name
        );
        roll.failed(group, id, error, Instant::now());
        self.roll_deadline = None;
        for (_, w) in &mut self.workers {
            if w.group == group && w.id == id && w.role == Role::Replacement {
                let _ = kill(w.pid, Signal::SIGKILL);
            }
        }
        self.drive_roll();
    }

    fn finish_roll(&mut self) {
        let Some(roll) = self.roll.take() else { return };
        self.roll_deadline = None;
        let report = roll.report;
        for g in &report.groups {
            match &g.error {
                Some(e) => tracing::error!("reload {}: failed: {e}", g.name),
                None if g.kept => {
                    tracing::info!("reload {}: not reloadable; on_worker_reload run", g.name)
                }
                None => tracing::info!(
                    "reload {}: {} -> {}, {}/{} rolled in {} ms",
                    g.name,
                    g.old,
                    g.new,
                    g.rolled,
                    g.count,
                    g.millis
                ),
            }
        }
        for key in std::mem::take(&mut self.reload_waiters) {
            self.reply(key, &Response::Reloaded(report.clone()));
        }
        self.prune_builds();
    }

    /// Removes plugin copies that neither a worker nor a slot uses.
    fn prune_builds(&self) {
        let mut keep: HashSet<PathBuf> = self
            .workers
            .iter()
            .map(|(_, w)| w.build.copy.clone())
            .collect();
        for g in &self.groups {
            keep.extend(g.builds.iter().map(|b| b.copy.clone()));
        }
        builds::prune(&self.cfg.host.runtime_dir, &keep);
    }

    /// Relays a worker's bus frames, in order, to every other worker.
    fn on_bus(&mut self, key: usize) {
        let Some(w) = self.workers.get_mut(key) else {
            return;
        };
        let (frames, _closed) = w.bus_buf.read_frames(&mut w.bus);
        let _ = w.bus_buf.flush(&mut w.bus);
        if frames.is_empty() {
            return;
        }
        for f in &frames {
            // Only membership changes matter to the master's registry.
            if let Ok(msg) = bus::decode(f) {
                self.registry.apply(&msg);
            }
        }
        for (k, other) in &mut self.workers {
            if k == key {
                continue;
            }
            for f in &frames {
                other.bus_buf.outbuf.extend_from_slice(f);
            }
            if let Err(e) = other.bus_buf.flush(&mut other.bus) {
                tracing::debug!(pid = other.pid.as_raw(), "bus write failed: {e}");
            }
        }
    }

    /// Tells every worker that a worker's connections are gone.
    fn node_gone(&mut self, pid: Pid) {
        let msg = BusMsg::NodeGone {
            node: pid.as_raw() as u32,
        };
        self.registry.apply(&msg);
        let mut frame = Vec::new();
        bus::encode(&msg, &mut frame);
        for (_, w) in &mut self.workers {
            w.bus_buf.outbuf.extend_from_slice(&frame);
            let _ = w.bus_buf.flush(&mut w.bus);
        }
    }

    fn on_signals(&mut self) {
        let pending: Vec<i32> = self.signals.pending().collect();
        for sig in pending {
            match sig {
                SIGINT | SIGTERM => {
                    tracing::info!("signal {sig}: stopping");
                    self.begin_stop(false);
                }
                SIGQUIT => {
                    tracing::info!("SIGQUIT: stopping gracefully");
                    self.begin_stop(true);
                }
                SIGCHLD => self.reap(),
                SIGUSR1 | SIGUSR2 => {
                    tracing::info!("signal {sig}: reloading");
                    if let Err(e) = self.begin_reload(sig == SIGUSR2, None) {
                        tracing::warn!("reload refused: {e}");
                    }
                }
                SIGABRT => self.start_status(Sink::Log),
                SIGIO => self.start_connections(Sink::Log),
                _ => {}
            }
        }
    }

    fn reap(&mut self) {
        loop {
            let status = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) | Err(_) => return,
                Ok(s) => s,
            };
            let (pid, how) = match status {
                WaitStatus::Exited(pid, code) => (pid, format!("exit code {code}")),
                WaitStatus::Signaled(pid, sig, _) => (pid, format!("signal {sig}")),
                _ => continue,
            };
            let Some(key) = self
                .workers
                .iter()
                .find(|(_, w)| w.pid == pid)
                .map(|(k, _)| k)
            else {
                continue;
            };
            // What it said just before dying (its reason for failing) may
            // still be unread: the exit can be seen before the message.
            self.on_worker_io(key);
            let mut w = self.workers.remove(key);
            let _ = self.poll.registry().deregister(&mut w.ctl);
            let _ = self.poll.registry().deregister(&mut w.bus);
            self.node_gone(pid);
            let name = self.groups[w.group].cfg.name.clone();
            for g in &mut self.gatherings {
                if g.waiting.remove(&key) {
                    g.report.answered(pid.as_raw() as u32, None);
                }
            }
            // Exit statistics: deaths nobody asked for, and kills. A worker
            // told to stop that exits cleanly is not counted.
            let clean = matches!(status, WaitStatus::Exited(_, 0));
            if self.phase == Phase::Running && !(w.role == Role::Retiring && clean) {
                *self.exits.entry((name.clone(), how.clone())).or_default() += 1;
            }
            if w.role == Role::Retiring {
                tracing::info!(
                    pid = pid.as_raw(),
                    "replaced worker {name}#{} exited ({how})",
                    w.id
                );
                self.prune_builds();
                continue;
            }
            if w.role == Role::Replacement {
                if let Phase::Running = self.phase {
                    let error = w
                        .failure
                        .clone()
                        .unwrap_or_else(|| format!("exited before it was ready ({how})"));
                    self.fail_roll_step(w.group, w.id, error);
                }
                continue;
            }
            match self.phase {
                Phase::Stopping { .. } => {
                    tracing::debug!(pid = pid.as_raw(), "worker {name}#{} exited ({how})", w.id)
                }
                Phase::Starting { .. } => {
                    let error = w
                        .failure
                        .unwrap_or_else(|| format!("exited before it was ready ({how})"));
                    self.fail_start(StartError::Worker {
                        name,
                        id: w.id,
                        error,
                    });
                }
                Phase::Running => {
                    let lived = w.started.elapsed();
                    let delay = self.groups[w.group].backoff[w.id as usize].on_death(lived);
                    tracing::warn!(
                        pid = pid.as_raw(),
                        "worker {name}#{} exited ({how}) after {:.1}s; restarting in {:?}",
                        w.id,
                        lived.as_secs_f64(),
                        delay
                    );
                    self.groups[w.group].respawn_at[w.id as usize] = Some(Instant::now() + delay);
                }
            }
        }
    }

    fn fail_start(&mut self, e: StartError) {
        if self.start_error.is_none() {
            tracing::error!("start failed: {e}");
            self.start_error = Some(e);
        }
        self.begin_stop(false);
    }

    fn begin_stop(&mut self, graceful: bool) {
        if let Phase::Stopping { .. } = self.phase {
            return;
        }
        if let Phase::Starting { .. } = self.phase {
            if self.start_error.is_none() {
                self.start_error = Some(StartError::Interrupted);
            }
        }
        self.phase = Phase::Stopping {
            deadline: Instant::now() + self.cfg.host.stop_timeout,
            killed: false,
        };
        if self.roll.take().is_some() {
            self.roll_deadline = None;
            for key in std::mem::take(&mut self.reload_waiters) {
                self.reply(
                    key,
                    &Response::Error {
                        message: "stopped during the reload".into(),
                    },
                );
            }
        }
        for g in &mut self.groups {
            g.respawn_at.iter_mut().for_each(|r| *r = None);
        }
        for (_, w) in &mut self.workers {
            w.buf.queue(&ToWorker::Stop { graceful });
            if w.buf.flush(&mut w.ctl).is_err() {
                let _ = kill(w.pid, Signal::SIGKILL);
            }
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.control.accept() {
                Ok((mut stream, _)) => {
                    let entry = self.clients.vacant_entry();
                    let token = Token(CLIENT_BASE + entry.key());
                    if self
                        .poll
                        .registry()
                        .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                        .is_ok()
                    {
                        entry.insert(Client {
                            stream,
                            buf: LineBuf::default(),
                        });
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

    fn on_client(&mut self, key: usize) {
        let Some(c) = self.clients.get_mut(key) else {
            return;
        };
        let (msgs, closed) = c.buf.read_from::<Request>(&mut c.stream);
        if c.buf.flush(&mut c.stream).is_err() || (closed && msgs.is_empty()) {
            self.drop_client(key);
            return;
        }
        for msg in msgs {
            match msg {
                Ok(Request::Stop { graceful }) => {
                    tracing::info!(graceful, "stop requested");
                    self.stop_waiters.push(key);
                    self.begin_stop(graceful);
                }
                Ok(Request::Status) => self.start_status(Sink::Client(key)),
                Ok(Request::Connections) => self.start_connections(Sink::Client(key)),
                Ok(Request::Reload { graceful }) => {
                    if let Err(message) = self.begin_reload(graceful, Some(key)) {
                        self.reply(
                            key,
                            &Response::Error {
                                message: format!("cannot reload: {message}"),
                            },
                        );
                    }
                }
                Err(e) => self.reply(
                    key,
                    &Response::Error {
                        message: format!("bad request: {e}"),
                    },
                ),
            }
        }
    }

    fn drop_client(&mut self, key: usize) {
        if self.clients.contains(key) {
            let mut c = self.clients.remove(key);
            let _ = self.poll.registry().deregister(&mut c.stream);
        }
    }

    fn reply(&mut self, key: usize, resp: &Response) {
        if let Some(c) = self.clients.get_mut(key) {
            c.buf.queue(resp);
            if c.buf.flush(&mut c.stream).is_err() {
                self.drop_client(key);
            }
        }
    }

    /// Sends `msg(req)` to every ready worker; returns the request number and
    /// the keys of the workers asked.
    fn ask_workers(&mut self, msg: impl Fn(u64) -> ToWorker) -> (u64, HashSet<usize>) {
        self.next_req += 1;
        let req = self.next_req;
        let mut waiting = HashSet::new();
        for (key, w) in &mut self.workers {
            if w.ready {
                w.buf.queue(&msg(req));
                if w.buf.flush(&mut w.ctl).is_ok() {
                    waiting.insert(key);
                }
            }
        }
        (req, waiting)
    }

    fn gather(&mut self, to: Sink, req: u64, waiting: HashSet<usize>, report: Gathered) {
        self.gatherings.push(Gathering {
            to,
            req,
            waiting,
            report,
            deadline: Instant::now() + STATS_WAIT,
        });
    }

    /// Hands a finished report to whoever asked.
    fn deliver(&mut self, mut g: Gathering) {
        if let Gathered::Connections(r) = &mut g.report {
            r.connections
                .sort_by(|a, b| (&a.worker, a.pid, a.id).cmp(&(&b.worker, b.pid, b.id)));
            r.busy.sort_unstable();
        }
        match (g.to, g.report) {
            (Sink::Client(c), Gathered::Status(r)) => self.reply(c, &Response::Status(r)),
            (Sink::Client(c), Gathered::Connections(r)) => self.reply(c, &Response::Connections(r)),
            (Sink::Log, Gathered::Status(r)) => {
                tracing::info!("SIGIOT: status");
                for line in crate::cli::render_status(&r).lines() {
                    tracing::info!("status: {line}");
                }
            }
            (Sink::Log, Gathered::Connections(r)) => {
                tracing::info!("SIGIO: {} connections", r.connections.len());
                for line in crate::cli::render_connections(&r).lines() {
                    tracing::info!("connections: {line}");
                }
            }
        }
    }

    fn start_status(&mut self, to: Sink) {
        let (req, waiting) = self.ask_workers(|req| ToWorker::Stats { req });
        let mut rows = Vec::new();
        for (key, w) in &self.workers {
            let g = &self.groups[w.group].cfg;
            rows.push(WorkerRow {
                pid: w.pid.as_raw() as u32,
                group: g.name.clone(),
                id: w.id,
                listen: g.listen.text.clone(),
                rss_bytes: rss_bytes(w.pid),
                plugin: g.plugin.display().to_string(),
                build: w.build.short().to_string(),
                loaded_at: w
                    .loaded_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs(),
                stats: None,
                qps: None,
                // Until it answers; still so at the deadline means busy.
                state: if waiting.contains(&key) {
                    WorkerState::Busy
                } else {
                    WorkerState::Starting
                },
            });
        }
        rows.sort_by(|a, b| (&a.group, a.id).cmp(&(&b.group, b.id)));
        let groups = self
            .groups
            .iter()
            .enumerate()
            .map(|(gi, g)| GroupRow {
                name: g.cfg.name.clone(),
                listen: g.cfg.listen.text.clone(),
                count: g.cfg.count,
                processes: self.workers.iter().filter(|(_, w)| w.group == gi).count() as u32,
            })
            .collect();
        let exits = self
            .exits
            .iter()
            .map(|((group, status), &count)| ExitRow {
                group: group.clone(),
                status: status.clone(),
                count,
            })
            .collect();
        let now = SystemTime::now();
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
        };
        self.gather(to, req, waiting, Gathered::Status(report));
    }

    fn start_connections(&mut self, to: Sink) {
        let (req, waiting) = self.ask_workers(|req| ToWorker::Connections { req });
        let busy = waiting
            .iter()
            .map(|&k| self.workers[k].pid.as_raw() as u32)
            .collect();
        let report = ConnectionsReport {
            connections: Vec::new(),
            busy,
        };
        self.gather(to, req, waiting, Gathered::Connections(report));
    }

    fn startup_table(&self) -> String {
        let user = nix::unistd::User::from_uid(nix::unistd::getuid())
            .ok()
            .flatten()
            .map_or_else(|| nix::unistd::getuid().to_string(), |u| u.name);
        let rows: Vec<Vec<String>> = self
            .groups
            .iter()
            .map(|g| {
                vec![
                    g.cfg.listen.scheme.name().to_string(),
                    g.cfg.user.clone().unwrap_or_else(|| user.clone()),
                    g.cfg.name.clone(),
                    g.cfg.listen.text.clone(),
                    g.cfg.count.to_string(),
                    "[OK]".to_string(),
                ]
            })
            .collect();
        let table = crate::table::render(
            &["proto", "user", "worker", "listen", "count", "state"],
            &rows,
        );
        format!(
            "wm-host {} (master pid {})\n{table}",
            env!("CARGO_PKG_VERSION"),
            std::process::id()
        )
    }

    fn finish(&mut self) {
        let _ = std::fs::remove_file(self.cfg.control_socket());
        for key in std::mem::take(&mut self.stop_waiters) {
            self.reply(key, &Response::Stopped);
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

/// Resident memory of a process, from /proc.
pub fn rss_bytes(pid: Pid) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string(format!("/proc/{pid}/statm"))
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page)
}
