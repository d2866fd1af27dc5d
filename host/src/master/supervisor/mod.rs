//! Every decision about worker processes, as a pure state machine: which
//! slots to fill, when to respawn (with backoff), how a reload rolls, when
//! start-up is done or has failed, what to kill once it outlived its timeout.
//!
//! It makes no system calls and reads no clock: the event loop hands it
//! events with the time they happened and carries out the actions it
//! returns, so every path can be driven by unit tests.
//!
//! A group has one slot per worker id. The slot holds the build its worker
//! runs and a respawn gets, and, during a roll, the replacement starting on
//! the new build. Each worker is in exactly one role (serving its slot, a
//! replacement, retiring, or a failed replacement being killed).
//!
//! Recycling (`max_requests`, `max_memory`) replaces one worker the way a
//! roll does, on the same build: its replacement starts first and the old
//! worker is told to stop once the new one is ready. One recycle runs at a
//! time, and none while a reload is in progress; a roll that reaches a slot
//! whose recycle is starting takes it over.

mod backoff;
pub mod roll;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashSet, VecDeque};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use self::backoff::Backoff;
use self::roll::{Plan, Roll, Step};
use super::builds::Build;
use super::control::ClientId;
use super::watch::Trigger;
use crate::ipc::{GroupReport, HandoverReport, ReloadReport, Response, RELOAD_HISTORY};

/// A worker process as the supervisor knows it; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerId(pub u64);

/// What the supervisor needs of a `[[worker]]` table.
#[derive(Debug, Clone)]
pub struct GroupSpec {
    pub name: String,
    pub count: u32,
    pub reloadable: bool,
    /// The plugin file a reload installs.
    pub plugin: PathBuf,
    /// Recycle a worker once it served this many requests…
    pub max_requests: Option<u64>,
    /// …or once its resident memory is over this many bytes.
    pub max_memory: Option<u64>,
    /// Replacements take over the old worker's connections (`reload_mode`).
    pub handover: bool,
    /// ssl listeners: the certificate files a reload reads again.
    pub tls: Option<crate::config::TlsFiles>,
}

/// After a recycle's replacement failed, the slot is not recycled again
/// before this much time: the old worker keeps serving meanwhile.
pub const RECYCLE_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long a worker may take to be ready (at start and in a roll).
    pub start: Duration,
    /// How long a worker told to stop may take to exit before it is killed.
    pub stop: Duration,
}

/// Why start-up failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartFailure {
    #[error("worker {name}#{id} failed to start: {error}")]
    Worker {
        name: String,
        id: u32,
        error: String,
    },
    #[error("cannot start worker: {0}")]
    Spawn(String),
    #[error("workers not ready within start_timeout ({0:?})")]
    Timeout(Duration),
    #[error("stopped by a signal before all workers were ready")]
    Interrupted,
}

/// What happened, as the event loop saw it.
#[derive(Debug, Clone)]
pub enum Event {
    /// The worker loaded its plugin and is accepting, or (`handover`) is
    /// a replacement waiting to take over its predecessor's connections.
    Ready { worker: WorkerId, handover: bool },
    /// The replacement's handover is over (it is accepting now).
    HandedOver {
        worker: WorkerId,
        report: HandoverReport,
    },
    /// The worker said why it cannot start (it exits right after).
    Failed { worker: WorkerId, error: String },
    /// A `Spawn` action could not start the process.
    SpawnFailed { worker: WorkerId, error: String },
    /// The process is gone (reaped). `clean`: exit code 0. `by_itself`: an
    /// exit code or a crash signal (SIGSEGV, SIGABRT…), not a signal sent
    /// from outside (SIGKILL, SIGTERM…).
    Exited {
        worker: WorkerId,
        how: String,
        clean: bool,
        by_itself: bool,
    },
    /// Time passed: deadlines are checked.
    Tick,
    /// Roll every group (`changed: None`) or those whose files changed.
    Reload {
        graceful: bool,
        client: Option<ClientId>,
        changed: Option<Vec<Trigger>>,
    },
    Stop {
        graceful: bool,
        client: Option<ClientId>,
    },
    /// An `Install` action finished.
    Installed {
        group: usize,
        result: Result<Build, String>,
    },
    /// A control client went away: nothing is owed to it any more.
    ClientGone(ClientId),
    /// The worker has taken nothing of its bus backlog for its
    /// `stuck_timeout` (stopped, or a plugin stuck in a loop).
    Stuck { worker: WorkerId, reason: String },
    /// What the worker has used so far: requests served (its stats) or
    /// resident bytes; checked against `max_requests` / `max_memory`.
    Usage {
        worker: WorkerId,
        requests: Option<u64>,
        memory: Option<u64>,
    },
}

/// Why a worker was replaced, as `status` counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cause {
    /// It died without being asked (exit statistics say how).
    Died,
    /// Killed: it did not read its bus for `stuck_timeout`.
    Stuck,
    /// Recycled past `max_requests`.
    MaxRequests,
    /// Recycled past `max_memory`.
    MaxMemory,
}

impl Cause {
    pub fn name(self) -> &'static str {
        match self {
            Cause::Died => "died",
            Cause::Stuck => "stuck",
            Cause::MaxRequests => "max_requests",
            Cause::MaxMemory => "max_memory",
        }
    }
}

/// What the event loop must do.
#[derive(Debug, Clone)]
pub enum Action {
    /// Start a worker process for slot `id` of `group`, loading `build`.
    Spawn {
        worker: WorkerId,
        group: usize,
        id: u32,
        build: Build,
        /// A replacement that may take over its predecessor's connections.
        handover: bool,
    },
    /// Ask `from` to hand its connections to `to` (`None`: there is no
    /// worker to take them from; `to` starts afresh).
    Handover {
        from: Option<WorkerId>,
        to: WorkerId,
    },
    /// Tell the worker to stop (kill it if it cannot be told).
    Stop { worker: WorkerId, graceful: bool },
    /// SIGKILL.
    Kill { worker: WorkerId },
    /// The worker is kept by a reload: run `on_worker_reload`.
    Reload { worker: WorkerId },
    /// Copy and hash `source` (and read the certificate files `tls`) off
    /// the loop; report back with `Installed`.
    Install {
        group: usize,
        source: PathBuf,
        tls: Option<crate::config::TlsFiles>,
    },
    Reply {
        client: ClientId,
        response: Response,
    },
    /// Remove plugin copies other than these.
    Prune { keep: HashSet<PathBuf> },
    /// Every worker is ready: start-up succeeded.
    Started,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting { deadline: Instant },
    Running,
    Stopping { deadline: Instant, killed: bool },
}

#[derive(Debug)]
enum Role {
    /// Serves its slot, on the slot's build.
    Serving,
    /// Started by the roll on the slot's `replacement` build; serving once ready.
    Replacement,
    /// Replaced and told to stop at `since`; killed at `since + stop`.
    Retiring {
        build: Build,
        since: Instant,
        killed: bool,
    },
    /// A replacement that failed: killed, never serving.
    Discarded { build: Build },
}

#[derive(Debug)]
struct Worker {
    group: usize,
    id: u32,
    /// For log lines only.
    pid: Option<u32>,
    /// When it was spawned, for log lines.
    started: Instant,
    ready: bool,
    /// When it became ready: how long it served decides the backoff.
    ready_at: Option<Instant>,
    /// What it said before dying, when it could not start.
    failure: Option<String>,
    /// Why the supervisor killed it (stuck), for its exit line.
    killed_for: Option<String>,
    role: Role,
}

#[derive(Debug)]
struct Slot {
    /// What the serving worker runs and a respawn gets.
    build: Build,
    backoff: Backoff,
    respawn_at: Option<Instant>,
    /// The replacement for this id (a roll's or a recycle's), while it starts.
    replacement: Option<Replacement>,
    /// A recycle's replacement failed: not recycled again before then.
    recycle_retry_at: Option<Instant>,
}

#[derive(Debug)]
struct Replacement {
    worker: WorkerId,
    build: Build,
    /// Ready by then, or the roll (or recycle) fails.
    deadline: Instant,
    /// Started to recycle the slot's worker, not by a roll.
    recycle: Option<Recycle>,
    /// Ready, and taking over its predecessor's connections.
    handing_over: bool,
}

#[derive(Debug, Clone)]
struct Recycle {
    cause: Cause,
    /// For log lines: what went over which limit.
    reason: String,
}

struct Group {
    spec: GroupSpec,
    slots: Vec<Slot>,
}

/// A reload from request to report.
struct Reload {
    graceful: bool,
    /// When it was asked for, for its duration in the history.
    began: Instant,
    /// Clients waiting for the report.
    waiters: Vec<ClientId>,
    stage: Stage,
}

enum Stage {
    /// Plugin files being copied and hashed off the loop.
    Installing {
        picked: BTreeSet<usize>,
        /// Groups whose only trigger is their plugin file: rolled only if
        /// its content changed (a touch, or a rewrite with the same bytes, is not).
        if_changed: BTreeSet<usize>,
        /// From the watcher: nothing to report if nothing changed.
        from_watch: bool,
        pending: BTreeSet<usize>,
        installed: BTreeMap<usize, Result<Build, String>>,
    },
    Rolling(Roll),
}

/// A worker as `status` shows it.
pub struct WorkerView<'a> {
    pub group: usize,
    pub id: u32,
    pub ready: bool,
    /// Serves its slot (not a replacement still starting, nor retiring).
    pub serving: bool,
    pub build: &'a Build,
}

pub struct Supervisor {
    timeouts: Timeouts,
    groups: Vec<Group>,
    workers: BTreeMap<WorkerId, Worker>,
    next_worker: u64,
    phase: Phase,
    start_error: Option<StartFailure>,
    /// (group, "exit code N" | "signal S") -> deaths of workers that died
    /// unexpectedly or were killed, since start.
    exits: BTreeMap<(String, String), u64>,
    /// (group, cause) -> workers replaced since start.
    restarts: BTreeMap<(String, Cause), u64>,
    reload: Option<Reload>,
    /// Workers over a limit, waiting for their turn to be recycled.
    recycles: VecDeque<(WorkerId, Recycle)>,
    /// Clients waiting for the stop to finish.
    stop_waiters: Vec<ClientId>,
    /// Per group, what the last reload with a handover did (for `status`).
    last_handover: BTreeMap<usize, HandoverReport>,
    /// The last reloads (at most `RELOAD_HISTORY`): when they were asked
    /// for, when they ended, and their report.
    history: VecDeque<(Instant, Instant, ReloadReport)>,
    /// (group, outcome) -> reloads since start (for `status` and `/metrics`).
    reload_outcomes: BTreeMap<(String, &'static str), u64>,
    /// Actions of the event being handled.
    out: Vec<Action>,
}

impl Supervisor {
    /// `groups` pairs each group with the build it starts on.
    pub fn new(groups: Vec<(GroupSpec, Build)>, timeouts: Timeouts, now: Instant) -> Supervisor {
        let groups = groups
            .into_iter()
            .map(|(spec, build)| Group {
                slots: (0..spec.count)
                    .map(|_| Slot {
                        build: build.clone(),
                        backoff: Backoff::default(),
                        respawn_at: None,
                        replacement: None,
                        recycle_retry_at: None,
                    })
                    .collect(),
                spec,
            })
            .collect();
        Supervisor {
            timeouts,
            groups,
            workers: BTreeMap::new(),
            next_worker: 1,
            phase: Phase::Starting {
                deadline: now + timeouts.start,
            },
            start_error: None,
            exits: BTreeMap::new(),
            restarts: BTreeMap::new(),
            reload: None,
            recycles: VecDeque::new(),
            stop_waiters: Vec::new(),
            last_handover: BTreeMap::new(),
            history: VecDeque::new(),
            reload_outcomes: BTreeMap::new(),
            out: Vec::new(),
        }
    }

    /// Starts a worker in every slot.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        for g in 0..self.groups.len() {
            for id in 0..self.groups[g].spec.count {
                self.spawn_serving(g, id, now);
            }
        }
        std::mem::take(&mut self.out)
    }

    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match event {
            Event::Ready { worker, handover } => self.ready(worker, handover, now),
            Event::HandedOver { worker, report } => self.handed_over(worker, report, now),
            Event::Failed { worker, error } => self.failed(worker, error, now),
            Event::SpawnFailed { worker, error } => self.spawn_failed(worker, error, now),
            Event::Exited {
                worker,
                how,
                clean,
                by_itself,
            } => self.exited(worker, how, clean, by_itself, now),
            Event::Tick => self.tick(now),
            Event::Reload {
                graceful,
                client,
                changed,
            } => self.reload(graceful, client, changed, now),
            Event::Stop { graceful, client } => self.stop(graceful, client, now),
            Event::Installed { group, result } => self.installed(group, result, now),
            Event::ClientGone(client) => {
                self.stop_waiters.retain(|&c| c != client);
                if let Some(r) = &mut self.reload {
                    r.waiters.retain(|&c| c != client);
                }
            }
            Event::Stuck { worker, reason } => self.stuck(worker, reason),
            Event::Usage {
                worker,
                requests,
                memory,
            } => self.usage(worker, requests, memory),
        }
        // Whatever the event, a recycle waiting for its turn may start now.
        self.drive_recycle(now);
        std::mem::take(&mut self.out)
    }

    /// Once stopped: the replies owed to `stop` clients.
    pub fn finish(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.stop_waiters)
            .into_iter()
            .map(|client| Action::Reply {
                client,
                response: Response::Stopped,
            })
            .collect()
    }

    /// Stopping, and every worker has exited.
    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. }) && self.workers.is_empty()
    }

    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// Stopping (asked to, or start-up failed), workers still exiting or not.
    pub fn is_stopping(&self) -> bool {
        matches!(self.phase, Phase::Stopping { .. })
    }

    /// A reload is being installed or rolled.
    pub fn reload_busy(&self) -> bool {
        self.reload.is_some()
    }

    /// What the last reload with a handover did for this group.
    pub fn last_handover(&self, group: usize) -> Option<HandoverReport> {
        self.last_handover.get(&group).copied()
    }

    pub fn take_start_error(&mut self) -> Option<StartFailure> {
        self.start_error.take()
    }

    /// For log lines: the process behind a worker.
    pub fn note_pid(&mut self, worker: WorkerId, pid: u32) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.pid = Some(pid);
        }
    }

    pub fn worker(&self, worker: WorkerId) -> Option<WorkerView<'_>> {
        let w = self.workers.get(&worker)?;
        Some(WorkerView {
            group: w.group,
            id: w.id,
            ready: w.ready,
            serving: matches!(w.role, Role::Serving),
            build: self.build_of(worker, w),
        })
    }

    /// Worker processes of a group now (more than `count` while rolling).
    pub fn processes(&self, group: usize) -> u32 {
        self.workers.values().filter(|w| w.group == group).count() as u32
    }

    /// (group, status, count) of unexpected deaths and kills.
    pub fn exits(&self) -> impl Iterator<Item = (&str, &str, u64)> {
        self.exits
            .iter()
            .map(|((g, s), &n)| (g.as_str(), s.as_str(), n))
    }

    /// The last reloads, oldest first: asked at, ended at, report.
    pub fn reload_history(&self) -> impl Iterator<Item = &(Instant, Instant, ReloadReport)> {
        self.history.iter()
    }

    /// (group, outcome, count) of reloads since start: `ok`, `failed`, `kept`.
    pub fn reload_outcomes(&self) -> impl Iterator<Item = (&str, &'static str, u64)> {
        self.reload_outcomes
            .iter()
            .map(|((g, o), &n)| (g.as_str(), *o, n))
    }

    /// (group, cause, count) of workers replaced since start.
    pub fn restarts(&self) -> impl Iterator<Item = (&str, Cause, u64)> {
        self.restarts.iter().map(|((g, c), &n)| (g.as_str(), *c, n))
    }

    fn count_restart(&mut self, group: usize, cause: Cause) {
        let name = self.name(group).to_string();
        *self.restarts.entry((name, cause)).or_default() += 1;
    }

    /// The earliest time a `Tick` has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        match self.phase {
            Phase::Starting { deadline }
            | Phase::Stopping {
                deadline,
                killed: false,
            } => consider(deadline),
            _ => {}
        }
        for slot in self.groups.iter().flat_map(|g| &g.slots) {
            slot.respawn_at.into_iter().for_each(&mut consider);
            if let Some(r) = &slot.replacement {
                consider(r.deadline);
            }
        }
        for w in self.workers.values() {
            if let Role::Retiring {
                since,
                killed: false,
                ..
            } = w.role
            {
                consider(since + self.timeouts.stop);
            }
        }
        next
    }

    fn build_of<'a>(&'a self, worker: WorkerId, w: &'a Worker) -> &'a Build {
        let slot = &self.groups[w.group].slots[w.id as usize];
        match &w.role {
            Role::Retiring { build, .. } | Role::Discarded { build } => build,
            Role::Replacement => match &slot.replacement {
                Some(r) if r.worker == worker => &r.build,
                _ => &slot.build,
            },
            Role::Serving => &slot.build,
        }
    }

    fn name(&self, group: usize) -> &str {
        &self.groups[group].spec.name
    }

    /// Records a worker about to be spawned, under a new id.
    fn add_worker(&mut self, group: usize, id: u32, role: Role, now: Instant) -> WorkerId {
        let worker = WorkerId(self.next_worker);
        self.next_worker += 1;
        self.workers.insert(
            worker,
            Worker {
                group,
                id,
                pid: None,
                started: now,
                ready: false,
                ready_at: None,
                failure: None,
                killed_for: None,
                role,
            },
        );
        worker
    }

    fn spawn_serving(&mut self, group: usize, id: u32, now: Instant) {
        let worker = self.add_worker(group, id, Role::Serving, now);
        let build = self.groups[group].slots[id as usize].build.clone();
        self.out.push(Action::Spawn {
            worker,
            group,
            id,
            build,
            handover: false,
        });
    }

    fn ready(&mut self, worker: WorkerId, handover: bool, now: Instant) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.ready = true;
        w.ready_at.get_or_insert(now);
        let (group, id) = (w.group, w.id);
        if !matches!(w.role, Role::Replacement) {
            return;
        }
        if handover {
            // It takes over the worker serving its slot, if there is one,
            // and has until the deadline (again) to be done.
            let from = (self.workers.iter())
                .find(|(_, o)| {
                    o.group == group && o.id == id && o.ready && matches!(o.role, Role::Serving)
                })
                .map(|(&k, _)| k);
            let slot = &mut self.groups[group].slots[id as usize];
            if let Some(rep) = slot.replacement.as_mut().filter(|r| r.worker == worker) {
                rep.deadline = now + self.timeouts.start;
                rep.handing_over = true;
            }
            self.out.push(Action::Handover { from, to: worker });
            return;
        }
        self.replacement_ready(worker, group, id, now);
    }

    /// A replacement took over its predecessor's connections.
    fn handed_over(&mut self, worker: WorkerId, report: HandoverReport, now: Instant) {
        let Some(w) = self.workers.get(&worker) else {
            return;
        };
        let (group, id) = (w.group, w.id);
        let slot = &mut self.groups[group].slots[id as usize];
        let Some(rep) = slot.replacement.as_mut().filter(|r| r.worker == worker) else {
            return;
        };
        rep.handing_over = false;
        if let Some(Reload {
            stage: Stage::Rolling(roll),
            ..
        }) = &mut self.reload
        {
            roll.handed_over(group, id, &report);
        }
        self.replacement_ready(worker, group, id, now);
    }

    /// A replacement is ready and has what it takes over: it serves the
    /// slot, and the worker it replaces goes.
    fn replacement_ready(&mut self, worker: WorkerId, group: usize, id: u32, now: Instant) {
        let slot = &mut self.groups[group].slots[id as usize];
        if slot
            .replacement
            .as_ref()
            .is_some_and(|r| r.worker == worker && r.recycle.is_some())
        {
            let rep = slot.replacement.take().expect("checked");
            let recycle = rep.recycle.expect("checked");
            tracing::info!(
                pid = self.workers[&worker].pid.unwrap_or(0),
                "{}#{id} recycled ({}): its replacement is ready",
                self.name(group),
                recycle.reason
            );
            self.count_restart(group, recycle.cause);
            self.promote(worker, group, id, rep.build, false, now);
            return;
        }
        let Some(Reload {
            graceful,
            stage: Stage::Rolling(roll),
            ..
        }) = &mut self.reload
        else {
            return;
        };
        if !roll.ready(group, id) {
            return;
        }
        let graceful = *graceful;
        let slot = &mut self.groups[group].slots[id as usize];
        let Some(rep) = slot.replacement.take() else {
            return;
        };
        self.promote(worker, group, id, rep.build, graceful, now);
        self.drive_roll(now);
    }

    /// The replacement `worker` on `build` is ready: it serves the slot, and
    /// the worker it replaces is told to stop.
    fn promote(
        &mut self,
        worker: WorkerId,
        group: usize,
        id: u32,
        build: Build,
        graceful: bool,
        now: Instant,
    ) {
        let slot = &mut self.groups[group].slots[id as usize];
        let old = std::mem::replace(&mut slot.build, build);
        // The replacement fills the slot, even if its old worker died meanwhile.
        slot.respawn_at = None;
        for (&k, w) in &mut self.workers {
            if k == worker {
                w.role = Role::Serving;
            } else if w.group == group && w.id == id && matches!(w.role, Role::Serving) {
                // It stops accepting at once; its queue stays with the master's socket.
                w.role = Role::Retiring {
                    build: old.clone(),
                    since: now,
                    killed: false,
                };
                self.out.push(Action::Stop {
                    worker: k,
                    graceful,
                });
            }
        }
    }

    fn failed(&mut self, worker: WorkerId, error: String, now: Instant) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        w.failure = Some(error.clone());
        let (group, id) = (w.group, w.id);
        if let Phase::Starting { .. } = self.phase {
            let name = self.name(group).to_string();
            self.fail_start(StartFailure::Worker { name, id, error }, now);
        } else if matches!(w.role, Role::Replacement) {
            // It exits by itself; killing makes sure, and its exit fails the step.
            self.out.push(Action::Kill { worker });
        }
    }

    fn spawn_failed(&mut self, worker: WorkerId, error: String, now: Instant) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        match (w.role, self.phase) {
            (Role::Replacement, _) => self.fail_replacement(
                w.group,
                w.id,
                format!("cannot start a worker: {error}"),
                now,
            ),
            (Role::Serving, Phase::Starting { .. }) => {
                self.fail_start(StartFailure::Spawn(error), now)
            }
            (Role::Serving, Phase::Running) => {
                tracing::error!(
                    "cannot respawn worker {}#{}: {error}",
                    self.name(w.group),
                    w.id
                );
                let slot = &mut self.groups[w.group].slots[w.id as usize];
                let delay = slot.backoff.failure();
                slot.respawn_at = Some(now + delay);
            }
            _ => {}
        }
    }

    fn exited(
        &mut self,
        worker: WorkerId,
        how: String,
        clean: bool,
        by_itself: bool,
        now: Instant,
    ) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        let name = self.name(w.group).to_string();
        let pid = w.pid.unwrap_or(0);
        // Exit statistics: deaths nobody asked for, and kills. A worker told
        // to stop that exits cleanly is not counted.
        let retiring = matches!(w.role, Role::Retiring { .. });
        if self.phase == Phase::Running && !(retiring && clean) {
            *self.exits.entry((name.clone(), how.clone())).or_default() += 1;
        }
        match w.role {
            Role::Retiring { .. } => {
                tracing::info!(pid, "replaced worker {name}#{} exited ({how})", w.id);
                self.prune();
            }
            Role::Discarded { .. } => {}
            Role::Replacement => {
                if self.phase == Phase::Running {
                    let error = w
                        .failure
                        .unwrap_or_else(|| format!("exited before it was ready ({how})"));
                    self.fail_replacement(w.group, w.id, error, now);
                }
            }
            Role::Serving => match self.phase {
                Phase::Stopping { .. } => {
                    tracing::debug!(pid, "worker {name}#{} exited ({how})", w.id)
                }
                Phase::Starting { .. } => {
                    let error = w
                        .failure
                        .unwrap_or_else(|| format!("exited before it was ready ({how})"));
                    self.fail_start(
                        StartFailure::Worker {
                            name,
                            id: w.id,
                            error,
                        },
                        now,
                    );
                }
                Phase::Running => {
                    let lived = now.saturating_duration_since(w.started);
                    let slot = &mut self.groups[w.group].slots[w.id as usize];
                    // A crash loop backs off; a worker that was serving and
                    // was killed from outside (or by us, stuck) is replaced
                    // at once, however often (see `backoff`).
                    let served = w.ready_at.map(|t| now.saturating_duration_since(t));
                    let delay = match served {
                        _ if w.killed_for.is_some() => slot.backoff.reset(),
                        None => slot.backoff.failure(),
                        Some(d) if by_itself && d < backoff::QUICK_DEATH => slot.backoff.failure(),
                        Some(_) => slot.backoff.reset(),
                    };
                    // What it said before dying, or why we killed it.
                    let said = match (w.failure, &w.killed_for) {
                        (Some(f), _) => format!(": {f}"),
                        (None, Some(k)) => format!(": killed, {k}"),
                        (None, None) => String::new(),
                    };
                    let cause = if w.killed_for.is_some() {
                        Cause::Stuck
                    } else {
                        Cause::Died
                    };
                    let when = if delay.is_zero() {
                        "at once".to_string()
                    } else {
                        format!("in {delay:?}")
                    };
                    tracing::warn!(
                        pid,
                        "worker {name}#{} exited ({how}) after {:.1}s{said}; restarting {when}",
                        w.id,
                        lived.as_secs_f64(),
                    );
                    slot.respawn_at = Some(now + delay);
                    self.count_restart(w.group, cause);
                }
            },
        }
    }

    /// A ready worker does not read its bus: it serves nobody and would
    /// hold the master's memory, so it is killed and respawned at once.
    /// While starting or stopping, the start and stop timeouts decide.
    fn stuck(&mut self, worker: WorkerId, reason: String) {
        if self.phase != Phase::Running {
            return;
        }
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let name = &self.groups[w.group].spec.name;
        let pid = w.pid.unwrap_or(0);
        match &mut w.role {
            Role::Serving if w.ready && w.killed_for.is_none() => {
                tracing::warn!(pid, "worker {name}#{} is stuck: {reason}; killing it", w.id);
                w.killed_for = Some(format!("stuck: {reason}"));
            }
            Role::Retiring { killed, .. } if !*killed => {
                tracing::warn!(
                    pid,
                    "replaced worker {name}#{} is stuck: {reason}; killing it",
                    w.id
                );
                *killed = true;
            }
            _ => return,
        }
        self.out.push(Action::Kill { worker });
    }

    fn tick(&mut self, now: Instant) {
        match self.phase {
            Phase::Starting { deadline } => {
                let expected: u32 = self.groups.iter().map(|g| g.spec.count).sum();
                let filled = self.workers.len() == expected as usize;
                if filled && self.workers.values().all(|w| w.ready) {
                    self.phase = Phase::Running;
                    tracing::info!(workers = self.workers.len(), "all workers ready");
                    self.out.push(Action::Started);
                } else if now >= deadline {
                    self.fail_start(StartFailure::Timeout(self.timeouts.start), now);
                }
            }
            Phase::Stopping {
                deadline,
                killed: false,
            } if now >= deadline => {
                for (&worker, w) in &self.workers {
                    tracing::warn!(
                        pid = w.pid.unwrap_or(0),
                        "worker {}#{} did not stop within stop_timeout; killing it",
                        self.groups[w.group].spec.name,
                        w.id
                    );
                    self.out.push(Action::Kill { worker });
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
                for id in 0..self.groups[g].slots.len() {
                    let slot = &mut self.groups[g].slots[id];
                    if slot.respawn_at.is_some_and(|t| t <= now) {
                        slot.respawn_at = None;
                        self.spawn_serving(g, id as u32, now);
                    }
                }
            }
        }
        let stop = self.timeouts.stop;
        for (&worker, w) in &mut self.workers {
            if let Role::Retiring { since, killed, .. } = &mut w.role {
                if !*killed && *since + stop <= now {
                    tracing::warn!(
                        pid = w.pid.unwrap_or(0),
                        "replaced worker did not stop within stop_timeout; killing it"
                    );
                    *killed = true;
                    self.out.push(Action::Kill { worker });
                }
            }
        }
        let late = self.groups.iter().enumerate().find_map(|(g, grp)| {
            grp.slots.iter().enumerate().find_map(|(id, s)| {
                s.replacement
                    .as_ref()
                    .is_some_and(|r| r.deadline <= now)
                    .then_some((g, id as u32))
            })
        });
        if let Some((g, id)) = late {
            let t = self.timeouts.start;
            self.fail_replacement(
                g,
                id,
                format!("not ready within start_timeout ({t:?})"),
                now,
            );
        }
    }

    fn fail_start(&mut self, e: StartFailure, now: Instant) {
        if self.start_error.is_none() {
            tracing::error!("start failed: {e}");
            self.start_error = Some(e);
        }
        self.stop(false, None, now);
    }

    fn stop(&mut self, graceful: bool, client: Option<ClientId>, now: Instant) {
        self.stop_waiters.extend(client);
        match self.phase {
            Phase::Stopping { .. } => return,
            Phase::Starting { .. } => {
                self.start_error.get_or_insert(StartFailure::Interrupted);
            }
            Phase::Running => {}
        }
        self.phase = Phase::Stopping {
            deadline: now + self.timeouts.stop,
            killed: false,
        };
        if let Some(r) = self.reload.take() {
            for client in r.waiters {
                self.out.push(Action::Reply {
                    client,
                    response: Response::Error {
                        message: "stopped during the reload".into(),
                    },
                });
            }
        }
        self.recycles.clear();
        for slot in self.groups.iter_mut().flat_map(|g| &mut g.slots) {
            slot.respawn_at = None;
            if let Some(rep) = slot.replacement.take() {
                if let Some(w) = self.workers.get_mut(&rep.worker) {
                    w.role = Role::Discarded { build: rep.build };
                }
            }
        }
        for &worker in self.workers.keys() {
            self.out.push(Action::Stop { worker, graceful });
        }
    }

    /// Starts a reload: refused unless running and idle; otherwise installs
    /// the plugin files of the groups concerned, then rolls.
    fn reload(
        &mut self,
        graceful: bool,
        client: Option<ClientId>,
        changed: Option<Vec<Trigger>>,
        now: Instant,
    ) {
        let refused = match self.phase {
            Phase::Running if self.reload.is_some() => Some("a reload is already in progress"),
            Phase::Running => None,
            Phase::Starting { .. } => Some("still starting"),
            Phase::Stopping { .. } => Some("stopping"),
        };
        if let Some(why) = refused {
            match client {
                Some(client) => self.out.push(Action::Reply {
                    client,
                    response: Response::Error {
                        message: format!("cannot reload: {why}"),
                    },
                }),
                None => tracing::warn!("reload refused: {why}"),
            }
            return;
        }
        let from_watch = changed.is_some();
        let (picked, if_changed) = match changed {
            None => ((0..self.groups.len()).collect(), BTreeSet::new()),
            Some(triggers) => {
                let mut picked = BTreeSet::new();
                let mut extra = BTreeSet::new();
                for t in triggers {
                    match t {
                        Trigger::Plugin(g) => picked.insert(g),
                        Trigger::Extra(g) => extra.insert(g),
                    };
                }
                let if_changed: BTreeSet<usize> = picked.difference(&extra).copied().collect();
                picked.extend(extra);
                (picked, if_changed)
            }
        };
        let pending: BTreeSet<usize> = picked
            .iter()
            .copied()
            .filter(|&g| self.groups[g].spec.reloadable || if_changed.contains(&g))
            .collect();
        for &group in &pending {
            self.out.push(Action::Install {
                group,
                source: self.groups[group].spec.plugin.clone(),
                tls: self.groups[group].spec.tls.clone(),
            });
        }
        self.reload = Some(Reload {
            graceful,
            began: now,
            waiters: client.into_iter().collect(),
            stage: Stage::Installing {
                picked,
                if_changed,
                from_watch,
                pending,
                installed: BTreeMap::new(),
            },
        });
        self.begin_roll(now);
    }

    fn installed(&mut self, group: usize, result: Result<Build, String>, now: Instant) {
        let Some(Reload {
            stage: Stage::Installing {
                pending, installed, ..
            },
            ..
        }) = &mut self.reload
        else {
            return;
        };
        if pending.remove(&group) {
            installed.insert(group, result);
            self.begin_roll(now);
        }
    }

    /// Once every install is back: decides what each group does and starts the roll.
    fn begin_roll(&mut self, now: Instant) {
        let all_in = matches!(
            &self.reload,
            Some(Reload { stage: Stage::Installing { pending, .. }, .. }) if pending.is_empty()
        );
        if !all_in {
            return;
        }
        let Some(Reload {
            graceful,
            began,
            waiters,
            stage:
                Stage::Installing {
                    picked,
                    if_changed,
                    from_watch,
                    mut installed,
                    ..
                },
        }) = self.reload.take()
        else {
            return;
        };
        let mut plans = Vec::new();
        let mut kept = Vec::new();
        let mut refused = Vec::new();
        for g in picked {
            let grp = &self.groups[g];
            let result = installed.remove(&g);
            if if_changed.contains(&g) {
                match &result {
                    Some(Ok(b))
                        if grp
                            .slots
                            .iter()
                            .all(|s| s.build.hash == b.hash && s.build.tls == b.tls) =>
                    {
                        // Same bytes (a touch, or our own copy's events): nothing to do.
                        tracing::info!(
                            "{} changed on disk but not its content: no reload",
                            grp.spec.plugin.display()
                        );
                        continue;
                    }
                    // Missing: mid-replace; the next event brings it back.
                    Some(Err(e)) => {
                        tracing::debug!("not reloading {}: {e}", grp.spec.name);
                        continue;
                    }
                    _ => {}
                }
            }
            let (name, count) = (grp.spec.name.clone(), grp.spec.count);
            let old = grp.slots[0].build.short().to_string();
            if !grp.spec.reloadable {
                kept.push((name, old, count));
                for (&worker, w) in &self.workers {
                    if w.group == g && matches!(w.role, Role::Serving) {
                        self.out.push(Action::Reload { worker });
                    }
                }
                continue;
            }
            match result {
                Some(Ok(new)) => plans.push(Plan {
                    group: g,
                    name,
                    count,
                    old,
                    new,
                }),
                Some(Err(e)) => refused.push((name, old, count, e)),
                None => refused.push((name, old, count, "not installed".into())),
            }
        }
        if from_watch {
            if plans.is_empty() && kept.is_empty() && refused.is_empty() {
                return;
            }
            let names: Vec<&str> = (plans.iter().map(|p| p.name.as_str()))
                .chain(kept.iter().map(|k| k.0.as_str()))
                .chain(refused.iter().map(|r| r.0.as_str()))
                .collect();
            tracing::info!("change detected for {}: reloading", names.join(", "));
        }
        let mut roll = Roll::new(plans, kept);
        for (name, old, count, error) in refused {
            tracing::error!("reload of {name} refused: {error}");
            roll.report.groups.push(GroupReport {
                name,
                new: old.clone(),
                old,
                rolled: 0,
                count,
                millis: 0,
                kept: false,
                error: Some(error),
                handover: None,
            });
        }
        tracing::info!(graceful, "rolling reload started");
        self.reload = Some(Reload {
            graceful,
            began,
            waiters,
            stage: Stage::Rolling(roll),
        });
        self.drive_roll(now);
    }

    /// Carries out the roll's next step.
    fn drive_roll(&mut self, now: Instant) {
        let Some(Reload {
            stage: Stage::Rolling(roll),
            ..
        }) = &mut self.reload
        else {
            return;
        };
        match roll.next(now) {
            Step::Spawn { group, id, build } => {
                // A recycle starting for this id: the roll replaces it anyway.
                if let Some(rep) = self.groups[group].slots[id as usize].replacement.take() {
                    tracing::info!(
                        "reload: recycling of {}#{id} left to the reload",
                        self.name(group)
                    );
                    if let Some(w) = self.workers.get_mut(&rep.worker) {
                        w.role = Role::Discarded { build: rep.build };
                        self.out.push(Action::Kill { worker: rep.worker });
                    }
                }
                tracing::info!(
                    "reload: starting {}#{id} on build {}",
                    self.name(group),
                    build.short()
                );
                let worker = self.add_worker(group, id, Role::Replacement, now);
                self.groups[group].slots[id as usize].replacement = Some(Replacement {
                    worker,
                    build: build.clone(),
                    deadline: now + self.timeouts.start,
                    recycle: None,
                    handing_over: false,
                });
                self.out.push(Action::Spawn {
                    worker,
                    group,
                    id,
                    build,
                    handover: self.groups[group].spec.handover,
                });
            }
            Step::Finished => self.finish_roll(now),
        }
    }

    /// The replacement for (group, id) failed (could not start, died or
    /// was not ready in time).
    fn fail_replacement(&mut self, group: usize, id: u32, error: String, now: Instant) {
        let slot = &mut self.groups[group].slots[id as usize];
        if slot
            .replacement
            .as_ref()
            .is_none_or(|r| r.recycle.is_none())
        {
            return self.fail_roll_step(group, id, error, now);
        }
        let rep = slot.replacement.take().expect("checked");
        // The old worker keeps serving; it is not tried again at once.
        slot.recycle_retry_at = Some(now + RECYCLE_RETRY);
        tracing::error!(
            "recycling {}#{id} failed: {error}; the running worker keeps serving, retried in {:?} at the earliest",
            self.name(group),
            RECYCLE_RETRY
        );
        if let Some(w) = self.workers.get_mut(&rep.worker) {
            w.role = Role::Discarded { build: rep.build };
            self.out.push(Action::Kill { worker: rep.worker });
        }
    }

    /// A ready, serving worker reported its usage: over a limit of its
    /// group, it waits for its turn to be recycled.
    fn usage(&mut self, worker: WorkerId, requests: Option<u64>, memory: Option<u64>) {
        if self.phase != Phase::Running {
            return;
        }
        let Some(w) = self.workers.get(&worker) else {
            return;
        };
        if !w.ready || w.killed_for.is_some() || !matches!(w.role, Role::Serving) {
            return;
        }
        let spec = &self.groups[w.group].spec;
        let mib = |b: u64| b as f64 / f64::from(1 << 20);
        let recycle = match (requests, spec.max_requests, memory, spec.max_memory) {
            (Some(n), Some(max), ..) if n >= max => Recycle {
                cause: Cause::MaxRequests,
                reason: format!("{n} requests served, max_requests = {max}"),
            },
            (.., Some(b), Some(max)) if b > max => Recycle {
                cause: Cause::MaxMemory,
                reason: format!(
                    "{:.1} MiB resident, max_memory = {:.1} MiB",
                    mib(b),
                    mib(max)
                ),
            },
            _ => return,
        };
        let slot = &self.groups[w.group].slots[w.id as usize];
        if slot.replacement.is_some() || self.recycles.iter().any(|r| r.0 == worker) {
            return;
        }
        // After a failed recycle, `drive_recycle` skips it until then.
        tracing::debug!(
            pid = w.pid.unwrap_or(0),
            "{}#{} is due for recycling: {}",
            spec.name,
            w.id,
            recycle.reason
        );
        self.recycles.push_back((worker, recycle));
    }

    /// Starts the next recycle, unless one is starting, a reload is in
    /// progress, or the master is not running.
    fn drive_recycle(&mut self, now: Instant) {
        if self.phase != Phase::Running || self.reload.is_some() {
            return;
        }
        let slots = || self.groups.iter().flat_map(|g| &g.slots);
        if slots().any(|s| s.replacement.as_ref().is_some_and(|r| r.recycle.is_some())) {
            return;
        }
        let mut later = VecDeque::new();
        while let Some((old, recycle)) = self.recycles.pop_front() {
            let Some(w) = self.workers.get(&old) else {
                continue;
            };
            if !matches!(w.role, Role::Serving) || w.killed_for.is_some() {
                continue;
            }
            let (group, id, pid) = (w.group, w.id, w.pid.unwrap_or(0));
            let slot = &self.groups[group].slots[id as usize];
            if slot.replacement.is_some() {
                continue;
            }
            if slot.recycle_retry_at.is_some_and(|t| t > now) {
                // Its last replacement failed: it waits its turn until then.
                later.push_back((old, recycle));
                continue;
            }
            let build = slot.build.clone();
            tracing::info!(
                pid,
                "recycling {}#{id} ({}): starting its replacement",
                self.name(group),
                recycle.reason
            );
            let worker = self.add_worker(group, id, Role::Replacement, now);
            let slot = &mut self.groups[group].slots[id as usize];
            slot.recycle_retry_at = None;
            slot.replacement = Some(Replacement {
                worker,
                build: build.clone(),
                deadline: now + self.timeouts.start,
                recycle: Some(recycle),
                handing_over: false,
            });
            self.out.push(Action::Spawn {
                worker,
                group,
                id,
                build,
                handover: self.groups[group].spec.handover,
            });
            break;
        }
        self.recycles.extend(later);
    }

    /// The replacement for (group, id) failed: the roll stops there.
    fn fail_roll_step(&mut self, group: usize, id: u32, error: String, now: Instant) {
        let Some(Reload {
            stage: Stage::Rolling(roll),
            ..
        }) = &mut self.reload
        else {
            return;
        };
        if roll.waiting() != Some((group, id)) {
            return;
        }
        tracing::error!(
            "reload of {}#{id} failed: {error}; keeping the running build",
            self.groups[group].spec.name
        );
        roll.failed(group, id, error, now);
        if let Some(rep) = self.groups[group].slots[id as usize].replacement.take() {
            if let Some(w) = self.workers.get_mut(&rep.worker) {
                w.role = Role::Discarded { build: rep.build };
                self.out.push(Action::Kill { worker: rep.worker });
            }
        }
        self.drive_roll(now);
    }

    fn finish_roll(&mut self, now: Instant) {
        let Some(Reload {
            began,
            waiters,
            stage: Stage::Rolling(roll),
            ..
        }) = self.reload.take()
        else {
            return;
        };
        let report = roll.report;
        for g in &report.groups {
            if let (Some(h), Some(i)) = (
                g.handover,
                self.groups.iter().position(|x| x.spec.name == g.name),
            ) {
                self.last_handover.insert(i, h);
            }
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
        for g in &report.groups {
            let outcome = match (&g.error, g.kept) {
                (Some(_), _) => "failed",
                (None, true) => "kept",
                (None, false) => "ok",
            };
            *self
                .reload_outcomes
                .entry((g.name.clone(), outcome))
                .or_default() += 1;
        }
        if self.history.len() == RELOAD_HISTORY {
            self.history.pop_front();
        }
        self.history.push_back((began, now, report.clone()));
        for client in waiters {
            self.out.push(Action::Reply {
                client,
                response: Response::Reloaded(report.clone()),
            });
        }
        self.prune();
    }

    /// Asks to remove plugin copies that no worker, slot or roll uses; not
    /// while installs run (a copy may be written but not yet reported).
    fn prune(&mut self) {
        let mut keep = HashSet::new();
        match &self.reload {
            Some(Reload {
                stage: Stage::Installing { .. },
                ..
            }) => return,
            Some(Reload {
                stage: Stage::Rolling(roll),
                ..
            }) => keep.extend(roll.builds().map(|b| b.copy.clone())),
            None => {}
        }
        for (&k, w) in &self.workers {
            keep.insert(self.build_of(k, w).copy.clone());
        }
        for slot in self.groups.iter().flat_map(|g| &g.slots) {
            keep.insert(slot.build.copy.clone());
        }
        self.out.push(Action::Prune { keep });
    }
}
