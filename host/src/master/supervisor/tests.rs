//! The supervisor driven by hand: every path the end-to-end tests take, and
//! those they cannot reach reliably (timeouts, races between events).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::*;
use crate::ipc::ReloadReport;

const START: Duration = Duration::from_secs(5);
const STOP: Duration = Duration::from_secs(2);
const MS: Duration = Duration::from_millis(1);

fn build(tag: &str) -> Build {
    Build {
        hash: tag.repeat(64)[..64].to_string(),
        copy: PathBuf::from(format!("/rt/plugins/{tag}.so")),
        tls: None,
    }
}

struct H {
    sup: Supervisor,
    now: Instant,
}

impl H {
    /// Groups as (name, count, reloadable), all on build "a".
    fn new(groups: &[(&str, u32, bool)]) -> (H, Vec<Action>) {
        let now = Instant::now();
        let specs = groups
            .iter()
            .map(|&(name, count, reloadable)| {
                let spec = GroupSpec {
                    name: name.into(),
                    count,
                    reloadable,
                    plugin: PathBuf::from(format!("/src/{name}.so")),
                    max_requests: None,
                    max_memory: None,
                    handover: false,
                    tls: None,
                };
                (spec, build("a"))
            })
            .collect();
        let timeouts = Timeouts {
            start: START,
            stop: STOP,
        };
        let mut sup = Supervisor::new(specs, timeouts, now);
        let actions = sup.start(now);
        (H { sup, now }, actions)
    }

    /// Started, every worker ready; the workers by (group, id).
    fn running(groups: &[(&str, u32, bool)]) -> (H, Vec<WorkerId>) {
        let (mut h, actions) = H::new(groups);
        let workers: Vec<WorkerId> = spawned(&actions).iter().map(|s| s.0).collect();
        for &w in &workers {
            assert!(h
                .ev(Event::Ready {
                    worker: w,
                    handover: false
                })
                .is_empty());
        }
        assert!(matches!(h.ev(Event::Tick)[..], [Action::Started]));
        assert!(h.sup.is_running());
        (h, workers)
    }

    fn later(&mut self, d: Duration) {
        self.now += d;
    }

    fn ev(&mut self, e: Event) -> Vec<Action> {
        self.sup.handle(e, self.now)
    }

    fn reload(&mut self, client: Option<u64>) -> Vec<Action> {
        self.ev(Event::Reload {
            graceful: false,
            client: client.map(ClientId),
            changed: None,
        })
    }

    fn installed(&mut self, group: usize, result: Result<Build, String>) -> Vec<Action> {
        self.ev(Event::Installed { group, result })
    }

    fn exited(&mut self, worker: WorkerId, how: &str) -> Vec<Action> {
        self.ev(Event::Exited {
            worker,
            how: how.into(),
            clean: how == "exit code 0",
            by_itself: how.starts_with("exit code")
                || ["SIGSEGV", "SIGABRT", "SIGBUS"]
                    .iter()
                    .any(|s| how.ends_with(s)),
        })
    }

    fn build_of(&self, w: WorkerId) -> String {
        self.sup.worker(w).unwrap().build.hash[..1].to_string()
    }

    fn exits(&self) -> Vec<(String, String, u64)> {
        self.sup
            .exits()
            .map(|(g, s, n)| (g.to_string(), s.to_string(), n))
            .collect()
    }
}

/// (worker, group, id, build tag) of each `Spawn`.
fn spawned(actions: &[Action]) -> Vec<(WorkerId, usize, u32, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spawn {
                worker,
                group,
                id,
                build,
                ..
            } => Some((*worker, *group, *id, build.hash[..1].to_string())),
            _ => None,
        })
        .collect()
}

fn stopped(actions: &[Action]) -> Vec<WorkerId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Stop { worker, .. } => Some(*worker),
            _ => None,
        })
        .collect()
}

fn killed(actions: &[Action]) -> Vec<WorkerId> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Kill { worker } => Some(*worker),
            _ => None,
        })
        .collect()
}

fn replies(actions: &[Action]) -> Vec<(u64, &Response)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Reply { client, response } => Some((client.0, response)),
            _ => None,
        })
        .collect()
}

fn installs(actions: &[Action]) -> Vec<usize> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Install { group, .. } => Some(*group),
            _ => None,
        })
        .collect()
}

/// The single `Reloaded` reply in `actions`, to `client`.
fn reloaded(actions: &[Action], client: u64) -> &ReloadReport {
    match replies(actions)[..] {
        [(c, Response::Reloaded(r))] if c == client => r,
        ref other => panic!("expected one Reloaded reply to {client}: {other:?}"),
    }
}

fn error_reply(actions: &[Action], client: u64) -> &str {
    match replies(actions)[..] {
        [(c, Response::Error { message })] if c == client => message,
        ref other => panic!("expected one error reply to {client}: {other:?}"),
    }
}

/// Runs a roll of `group`'s `count` workers to its end: each replacement
/// becomes ready. Returns the replacements and the last step's actions.
fn roll_through(h: &mut H, mut actions: Vec<Action>, count: usize) -> (Vec<WorkerId>, Vec<Action>) {
    let mut new = Vec::new();
    for _ in 0..count {
        let s = spawned(&actions);
        assert_eq!(s.len(), 1, "one replacement at a time: {actions:?}");
        new.push(s[0].0);
        h.later(10 * MS);
        actions = h.ev(Event::Ready {
            worker: s[0].0,
            handover: false,
        });
    }
    (new, actions)
}

#[test]
fn start_up_fills_every_slot_and_succeeds_once_all_are_ready() {
    let (mut h, actions) = H::new(&[("t", 2, true), ("u", 1, true)]);
    let s = spawned(&actions);
    let slots: Vec<(usize, u32)> = s.iter().map(|s| (s.1, s.2)).collect();
    assert_eq!(slots, [(0, 0), (0, 1), (1, 0)]);
    assert!(h
        .ev(Event::Ready {
            worker: s[0].0,
            handover: false
        })
        .is_empty());
    assert!(h.ev(Event::Tick).is_empty(), "not all ready yet");
    h.ev(Event::Ready {
        worker: s[1].0,
        handover: false,
    });
    h.ev(Event::Ready {
        worker: s[2].0,
        handover: false,
    });
    assert!(matches!(h.ev(Event::Tick)[..], [Action::Started]));
    assert_eq!(h.sup.processes(0), 2);
    assert!(h.sup.take_start_error().is_none());
}

#[test]
fn a_worker_that_fails_at_start_fails_the_start_and_stops_the_others() {
    let (mut h, actions) = H::new(&[("t", 2, true)]);
    let s = spawned(&actions);
    h.ev(Event::Ready {
        worker: s[0].0,
        handover: false,
    });
    let a = h.ev(Event::Failed {
        worker: s[1].0,
        error: "plugin x: not a wm-host plugin".into(),
    });
    assert_eq!(stopped(&a), [s[0].0, s[1].0]);
    assert!(!h.sup.finished());
    h.exited(s[1].0, "exit code 1");
    h.exited(s[0].0, "exit code 0");
    assert!(h.sup.finished());
    assert_eq!(
        h.sup.take_start_error().unwrap().to_string(),
        "worker t#1 failed to start: plugin x: not a wm-host plugin"
    );
    assert!(
        h.exits().is_empty(),
        "deaths while stopping are not counted"
    );
}

#[test]
fn a_spawn_that_fails_at_start_fails_the_start() {
    let (mut h, actions) = H::new(&[("t", 2, true)]);
    let s = spawned(&actions);
    let a = h.ev(Event::SpawnFailed {
        worker: s[0].0,
        error: "no such file".into(),
    });
    assert_eq!(stopped(&a), [s[1].0], "the one that did start is stopped");
    assert_eq!(
        h.sup.take_start_error(),
        Some(StartFailure::Spawn("no such file".into()))
    );
}

#[test]
fn start_times_out_and_a_stop_during_start_is_an_interruption() {
    let (mut h, actions) = H::new(&[("t", 1, true)]);
    let w = spawned(&actions)[0].0;
    assert_eq!(h.sup.next_deadline(), Some(h.now + START));
    h.later(START);
    assert_eq!(stopped(&h.ev(Event::Tick)), [w]);
    assert_eq!(h.sup.take_start_error(), Some(StartFailure::Timeout(START)));

    let (mut h, actions) = H::new(&[("t", 1, true)]);
    let w = spawned(&actions)[0].0;
    let a = h.ev(Event::Stop {
        graceful: false,
        client: None,
    });
    assert_eq!(stopped(&a), [w]);
    assert_eq!(h.sup.take_start_error(), Some(StartFailure::Interrupted));
}

#[test]
fn stop_tells_every_worker_kills_leftovers_and_answers_every_stop_client() {
    let (mut h, w) = H::running(&[("t", 2, true)]);
    let a = h.ev(Event::Stop {
        graceful: true,
        client: Some(ClientId(1)),
    });
    assert!(a
        .iter()
        .all(|a| matches!(a, Action::Stop { graceful: true, .. })));
    assert_eq!(stopped(&a), w);
    // A second stop is not a second stop, but it is answered too.
    assert!(h
        .ev(Event::Stop {
            graceful: false,
            client: Some(ClientId(2)),
        })
        .is_empty());
    h.exited(w[0], "exit code 0");
    assert_eq!(h.sup.next_deadline(), Some(h.now + STOP));
    h.later(STOP);
    assert_eq!(killed(&h.ev(Event::Tick)), [w[1]]);
    assert!(h.ev(Event::Tick).is_empty(), "killed once");
    assert_eq!(h.sup.next_deadline(), None);
    h.exited(w[1], "signal SIGKILL");
    assert!(h.sup.finished());
    let done: Vec<u64> = replies(&h.sup.finish()).iter().map(|r| r.0).collect();
    assert_eq!(done, [1, 2]);
}

#[test]
fn a_crash_loop_backs_off_and_a_long_life_is_forgiven() {
    let (mut h, w) = H::running(&[("t", 2, true)]);
    h.later(10 * MS);
    assert!(h.exited(w[1], "signal SIGSEGV").is_empty(), "not at once");
    assert_eq!(h.sup.next_deadline(), Some(h.now + 100 * MS));
    h.later(99 * MS);
    assert!(h.ev(Event::Tick).is_empty());
    h.later(MS);
    let s = spawned(&h.ev(Event::Tick));
    assert_eq!(
        (s[0].1, s[0].2, s[0].3.as_str()),
        (0, 1, "a"),
        "same slot, same build"
    );
    // Dies again at once: twice the delay.
    h.later(MS);
    h.exited(s[0].0, "signal SIGSEGV");
    assert_eq!(h.sup.next_deadline(), Some(h.now + 200 * MS));
    h.later(200 * MS);
    let s = spawned(&h.ev(Event::Tick));
    h.ev(Event::Ready {
        worker: s[0].0,
        handover: false,
    });
    // A respawn that cannot start is retried with the backoff too.
    h.later(Duration::from_secs(60));
    h.exited(s[0].0, "exit code 3");
    let s = spawned(&h.ev(Event::Tick));
    assert_eq!(s.len(), 1, "after a long life: at once");
    assert!(h
        .ev(Event::SpawnFailed {
            worker: s[0].0,
            error: "EAGAIN".into(),
        })
        .is_empty());
    assert!(h.sup.next_deadline().is_some_and(|d| d > h.now));
    assert_eq!(
        h.exits(),
        [
            ("t".into(), "exit code 3".into(), 1),
            ("t".into(), "signal SIGSEGV".into(), 2)
        ]
    );
    assert_eq!(h.sup.processes(0), 1);
}

/// Takes the respawn of the last death: due at `h.now + delay`; returns it ready.
fn respawn_after(h: &mut H, delay: Duration) -> WorkerId {
    assert_eq!(h.sup.next_deadline(), Some(h.now + delay));
    h.later(delay);
    let s = spawned(&h.ev(Event::Tick));
    assert_eq!(s.len(), 1, "respawned once");
    h.ev(Event::Ready {
        worker: s[0].0,
        handover: false,
    });
    s[0].0
}

#[test]
fn a_worker_killed_from_outside_while_serving_is_replaced_at_once_every_time() {
    let (mut h, w) = H::running(&[("t", 1, true)]);
    let mut worker = w[0];
    // Killed again each time it is back, soon after it is ready.
    for _ in 0..6 {
        h.later(100 * MS);
        let a = h.exited(worker, "signal SIGKILL");
        assert!(a.is_empty(), "{a:?}");
        worker = respawn_after(&mut h, Duration::ZERO);
    }
    // SIGTERM from outside is no crash either.
    h.later(100 * MS);
    h.exited(worker, "signal SIGTERM");
    worker = respawn_after(&mut h, Duration::ZERO);
    // Killed before it was ready: it never served, so that is a failure.
    h.later(100 * MS);
    h.exited(worker, "signal SIGKILL");
    h.later(MS);
    let s = spawned(&h.ev(Event::Tick));
    h.exited(s[0].0, "signal SIGKILL");
    assert_eq!(h.sup.next_deadline(), Some(h.now + 100 * MS));
    assert_eq!(
        h.exits(),
        [
            ("t".into(), "signal SIGKILL".into(), 8),
            ("t".into(), "signal SIGTERM".into(), 1)
        ]
    );
}

#[test]
fn a_worker_that_dies_by_itself_right_after_ready_backs_off() {
    let (mut h, w) = H::running(&[("t", 1, true)]);
    // An exit code within QUICK_DEATH of being ready: a crash loop.
    h.later(500 * MS);
    h.exited(w[0], "exit code 1");
    let r = respawn_after(&mut h, 100 * MS);
    h.later(500 * MS);
    h.exited(r, "exit code 1");
    let r = respawn_after(&mut h, 200 * MS);
    // So does a crash signal it raised itself.
    h.later(10 * MS);
    h.exited(r, "signal SIGABRT");
    let r = respawn_after(&mut h, 400 * MS);
    // Once it served past QUICK_DEATH, a death by itself is forgiven…
    h.later(backoff::QUICK_DEATH);
    h.exited(r, "exit code 1");
    let r = respawn_after(&mut h, Duration::ZERO);
    // …and the next quick one starts from the shortest delay again.
    h.later(10 * MS);
    h.exited(r, "signal SIGSEGV");
    respawn_after(&mut h, 100 * MS);
}

#[test]
fn a_roll_replaces_one_id_at_a_time_and_reports() {
    let (mut h, old) = H::running(&[("t", 2, true)]);
    let a = h.reload(Some(7));
    assert_eq!(installs(&a), [0]);
    assert!(spawned(&a).is_empty(), "nothing starts before the install");
    assert!(h.sup.reload_busy());
    let a = h.installed(0, Ok(build("b")));
    let s = spawned(&a);
    assert_eq!((s[0].1, s[0].2, s[0].3.as_str()), (0, 0, "b"));
    assert_eq!(h.build_of(s[0].0), "b");
    assert_eq!(h.sup.processes(0), 3, "capacity never dips");
    h.later(10 * MS);
    let a = h.ev(Event::Ready {
        worker: s[0].0,
        handover: false,
    });
    assert_eq!(
        stopped(&a),
        [old[0]],
        "the old one goes once the new one is ready"
    );
    assert_eq!(
        h.build_of(old[0]),
        "a",
        "a retiring worker still runs its build"
    );
    let s2 = spawned(&a);
    assert_eq!((s2[0].2, s2[0].3.as_str()), (1, "b"));
    let a = h.ev(Event::Ready {
        worker: s2[0].0,
        handover: false,
    });
    assert_eq!(stopped(&a), [old[1]]);
    let report = reloaded(&a, 7);
    assert!(report.ok());
    let g = &report.groups[0];
    assert_eq!(
        (g.old.as_str(), g.new.as_str(), g.rolled, g.count, g.millis),
        ("aaaaaaaaaaaa", "bbbbbbbbbbbb", 2, 2, 10)
    );
    assert!(!h.sup.reload_busy());
    // Replaced workers that exit cleanly are not counted; the new ones stay.
    h.exited(old[0], "exit code 0");
    let a = h.exited(old[1], "exit code 0");
    assert!(
        matches!(&a[..], [Action::Prune { keep }] if keep.len() == 1),
        "{a:?}"
    );
    assert!(h.exits().is_empty());
    assert_eq!(h.sup.processes(0), 2);
    // A later crash respawns on the new build.
    h.later(Duration::from_secs(10));
    h.exited(s[0].0, "signal SIGKILL");
    assert_eq!(spawned(&h.ev(Event::Tick))[0].3, "b");
}

#[test]
fn a_bad_build_is_refused_and_nothing_is_touched() {
    let (mut h, old) = H::running(&[("t", 2, true)]);
    h.reload(Some(1));
    let a = h.installed(0, Err("plugin /src/t.so: file not found".into()));
    assert!(spawned(&a).is_empty() && stopped(&a).is_empty());
    let r = reloaded(&a, 1);
    assert!(!r.ok());
    assert_eq!(
        r.groups[0].error.as_deref(),
        Some("plugin /src/t.so: file not found")
    );
    assert_eq!(h.build_of(old[0]), "a");
}

#[test]
fn reloads_are_remembered_with_outcome_and_duration_and_counted() {
    let (mut h, _old) = H::running(&[("t", 1, true)]);
    h.reload(None);
    h.installed(0, Err("bad".into()));
    h.reload(None);
    let s = spawned(&h.installed(0, Ok(build("b"))));
    h.later(25 * MS);
    h.ev(Event::Ready {
        worker: s[0].0,
        handover: false,
    });
    let hist: Vec<_> = h.sup.reload_history().collect();
    assert_eq!(hist.len(), 2);
    assert!(!hist[0].2.ok() && hist[1].2.ok());
    assert_eq!(
        hist[1].1 - hist[1].0,
        25 * MS,
        "from the request to the end"
    );
    let outcomes: Vec<_> = h.sup.reload_outcomes().collect();
    assert_eq!(outcomes, [("t", "failed", 1), ("t", "ok", 1)]);
    // Only the last RELOAD_HISTORY are kept; the counts go on.
    for _ in 0..crate::ipc::RELOAD_HISTORY {
        h.reload(None);
        h.installed(0, Err("bad".into()));
    }
    assert_eq!(h.sup.reload_history().count(), crate::ipc::RELOAD_HISTORY);
    assert!(h.sup.reload_history().all(|r| !r.2.ok()));
    let failed = h.sup.reload_outcomes().find(|o| o.1 == "failed").unwrap();
    assert_eq!(failed.2, 1 + crate::ipc::RELOAD_HISTORY as u64);
}

#[test]
fn a_replacement_that_dies_before_ready_stops_the_roll_and_the_old_build_serves() {
    let (mut h, old) = H::running(&[("t", 3, true)]);
    h.reload(Some(1));
    let a = h.installed(0, Ok(build("b")));
    let (new, a) = roll_through(&mut h, a, 1);
    assert_eq!(stopped(&a), [old[0]]);
    // The second replacement reports why it cannot start, then exits.
    let r2 = spawned(&a)[0].0;
    let a = h.ev(Event::Failed {
        worker: r2,
        error: "plugin panicked in on_worker_start".into(),
    });
    assert_eq!(killed(&a), [r2]);
    let a = h.exited(r2, "exit code 1");
    assert!(spawned(&a).is_empty(), "the roll stops there");
    let r = reloaded(&a, 1);
    let g = &r.groups[0];
    assert_eq!(
        (g.rolled, g.error.as_deref()),
        (1, Some("plugin panicked in on_worker_start"))
    );
    // Ids 1 and 2 keep their old workers and build; id 0 keeps the new one.
    assert_eq!(h.build_of(old[1]), "a");
    assert_eq!(h.build_of(old[2]), "a");
    assert_eq!(h.build_of(new[0]), "b");
    assert!(h.sup.worker(r2).is_none());
    // Without a reason, the exit is the reason.
    h.reload(Some(2));
    let a = h.installed(0, Ok(build("c")));
    let r = spawned(&a)[0].0;
    let a = h.exited(r, "signal SIGSEGV");
    assert_eq!(
        reloaded(&a, 2).groups[0].error.as_deref(),
        Some("exited before it was ready (signal SIGSEGV)")
    );
}

#[test]
fn a_replacement_not_ready_in_time_is_killed_and_fails_the_roll() {
    let (mut h, old) = H::running(&[("t", 1, true)]);
    h.reload(Some(1));
    let r = spawned(&h.installed(0, Ok(build("b"))))[0].0;
    assert_eq!(h.sup.next_deadline(), Some(h.now + START));
    h.later(START);
    let a = h.ev(Event::Tick);
    assert_eq!(killed(&a), [r]);
    assert_eq!(
        reloaded(&a, 1).groups[0].error.as_deref(),
        Some("not ready within start_timeout (5s)")
    );
    // Ready too late: it is not promoted.
    assert!(h
        .ev(Event::Ready {
            worker: r,
            handover: false
        })
        .is_empty());
    assert!(h.exited(r, "signal SIGKILL").is_empty());
    assert_eq!(h.build_of(old[0]), "a");
    assert_eq!(h.exits(), [("t".into(), "signal SIGKILL".into(), 1)]);
    assert_eq!(h.sup.next_deadline(), None);
}

#[test]
fn a_replacement_that_cannot_be_spawned_fails_the_roll() {
    let (mut h, _) = H::running(&[("t", 1, true)]);
    h.reload(Some(1));
    let r = spawned(&h.installed(0, Ok(build("b"))))[0].0;
    let a = h.ev(Event::SpawnFailed {
        worker: r,
        error: "EAGAIN".into(),
    });
    assert_eq!(
        reloaded(&a, 1).groups[0].error.as_deref(),
        Some("cannot start a worker: EAGAIN")
    );
    assert!(killed(&a).is_empty(), "there is no process to kill");
}

#[test]
fn reloadable_false_groups_keep_their_workers_and_run_on_worker_reload() {
    let (mut h, w) = H::running(&[("t", 1, true), ("keep", 2, false)]);
    let a = h.reload(Some(1));
    assert_eq!(installs(&a), [0], "only the reloadable group is installed");
    let a = h.installed(0, Ok(build("b")));
    let reloads: Vec<WorkerId> = a
        .iter()
        .filter_map(|a| match a {
            Action::Reload { worker } => Some(*worker),
            _ => None,
        })
        .collect();
    assert_eq!(reloads, [w[1], w[2]]);
    let (_, a) = roll_through(&mut h, a, 1);
    let r = reloaded(&a, 1);
    assert!(r.ok());
    assert!(r.groups[1].kept && r.groups[1].name == "keep");
    assert_eq!(stopped(&a), [w[0]], "kept workers are not stopped");
}

#[test]
fn a_second_reload_while_one_runs_is_refused_and_the_first_goes_on() {
    let (mut h, _) = H::running(&[("t", 1, true)]);
    h.reload(Some(1));
    // While installing…
    let a = h.reload(Some(2));
    assert_eq!(
        error_reply(&a, 2),
        "cannot reload: a reload is already in progress"
    );
    let a = h.installed(0, Ok(build("b")));
    // …and while rolling.
    let a2 = h.reload(None);
    assert!(a2.is_empty(), "a signal's reload is only logged: {a2:?}");
    let (_, a) = roll_through(&mut h, a, 1);
    assert!(reloaded(&a, 1).ok());
}

#[test]
fn a_reload_is_refused_while_starting_or_stopping() {
    let (mut h, _) = H::new(&[("t", 1, true)]);
    assert_eq!(
        error_reply(&h.reload(Some(1)), 1),
        "cannot reload: still starting"
    );
    h.ev(Event::Stop {
        graceful: false,
        client: None,
    });
    assert_eq!(
        error_reply(&h.reload(Some(1)), 1),
        "cannot reload: stopping"
    );
}

#[test]
fn stop_during_a_reload_answers_the_reload_and_stops_the_replacement_too() {
    // While rolling.
    let (mut h, old) = H::running(&[("t", 2, true)]);
    h.reload(Some(1));
    let r = spawned(&h.installed(0, Ok(build("b"))))[0].0;
    let a = h.ev(Event::Stop {
        graceful: false,
        client: Some(ClientId(2)),
    });
    assert_eq!(error_reply(&a, 1), "stopped during the reload");
    assert_eq!(stopped(&a), [old[0], old[1], r]);
    // The replacement exiting now is no roll failure; nothing restarts.
    for w in [r, old[0], old[1]] {
        assert!(h.exited(w, "exit code 0").is_empty());
    }
    assert_eq!(h.sup.next_deadline(), Some(h.now + STOP));
    assert!(h.sup.finished());
    assert_eq!(replies(&h.sup.finish())[0].0, 2);

    // While installing: the install's late result is ignored.
    let (mut h, _) = H::running(&[("t", 1, true)]);
    h.reload(Some(1));
    let a = h.ev(Event::Stop {
        graceful: true,
        client: None,
    });
    assert_eq!(error_reply(&a, 1), "stopped during the reload");
    assert!(h.installed(0, Ok(build("b"))).is_empty());
}

#[test]
fn a_retiring_worker_that_outlives_stop_timeout_is_killed() {
    let (mut h, old) = H::running(&[("t", 1, true)]);
    h.reload(Some(1));
    let a = h.installed(0, Ok(build("b")));
    h.later(Duration::from_secs(1));
    let (_, a) = roll_through(&mut h, a, 1);
    assert_eq!(stopped(&a), [old[0]]);
    // The retire time counts, not the time it was started.
    assert_eq!(h.sup.next_deadline(), Some(h.now + STOP));
    h.later(STOP - MS);
    assert!(h.ev(Event::Tick).is_empty());
    h.later(MS);
    assert_eq!(killed(&h.ev(Event::Tick)), [old[0]]);
    assert!(h.ev(Event::Tick).is_empty(), "killed once");
    assert_eq!(h.sup.next_deadline(), None);
    h.exited(old[0], "signal SIGKILL");
    assert_eq!(h.exits(), [("t".into(), "signal SIGKILL".into(), 1)]);
    assert!(h.ev(Event::Tick).is_empty(), "not respawned");
}

#[test]
fn a_cli_gone_mid_reload_gets_nothing_and_the_roll_goes_on() {
    let (mut h, _) = H::running(&[("t", 1, true)]);
    h.reload(Some(1));
    assert!(h.ev(Event::ClientGone(ClientId(1))).is_empty());
    let a = h.installed(0, Ok(build("b")));
    let (_, a) = roll_through(&mut h, a, 1);
    assert!(replies(&a).is_empty(), "{a:?}");
    assert!(!h.sup.reload_busy());
    // Stop waiters too.
    h.ev(Event::Stop {
        graceful: false,
        client: Some(ClientId(3)),
    });
    h.ev(Event::ClientGone(ClientId(3)));
    assert!(h.sup.finish().is_empty());
}

#[test]
fn a_serving_worker_that_dies_mid_roll_is_replaced_once() {
    let (mut h, old) = H::running(&[("t", 1, true)]);
    h.reload(Some(1));
    let r = spawned(&h.installed(0, Ok(build("b"))))[0].0;
    h.later(Duration::from_secs(10));
    h.exited(old[0], "signal SIGKILL");
    // The replacement is ready before the respawn is due: it fills the slot.
    let a = h.ev(Event::Ready {
        worker: r,
        handover: false,
    });
    assert!(reloaded(&a, 1).ok());
    assert!(stopped(&a).is_empty(), "nothing left to retire");
    assert!(
        spawned(&h.ev(Event::Tick)).is_empty(),
        "no second worker for id 0"
    );
    assert_eq!(h.sup.processes(0), 1);
}

#[test]
fn watched_changes_roll_only_groups_whose_content_changed() {
    let (mut h, _) = H::running(&[("t", 1, true), ("u", 1, true)]);
    let watch = |h: &mut H, triggers| {
        h.ev(Event::Reload {
            graceful: false,
            client: None,
            changed: Some(triggers),
        })
    };
    // Touched, same bytes: no reload at all.
    assert_eq!(installs(&watch(&mut h, vec![Trigger::Plugin(0)])), [0]);
    assert!(h.installed(0, Ok(build("a"))).is_empty());
    assert!(!h.sup.reload_busy());
    // Missing (mid-replace): wait for the next event, no report.
    watch(&mut h, vec![Trigger::Plugin(0)]);
    assert!(h.installed(0, Err("file not found".into())).is_empty());
    assert!(!h.sup.reload_busy());
    // Another watched file changed: rolled even on the same build.
    watch(&mut h, vec![Trigger::Extra(1)]);
    let s = spawned(&h.installed(1, Ok(build("a"))));
    assert_eq!((s[0].1, s[0].3.as_str()), (1, "a"));
    h.ev(Event::Ready {
        worker: s[0].0,
        handover: false,
    });
    assert!(!h.sup.reload_busy());
    // New content: rolled.
    watch(&mut h, vec![Trigger::Plugin(0)]);
    let s = spawned(&h.installed(0, Ok(build("b"))));
    assert_eq!((s[0].1, s[0].3.as_str()), (0, "b"));
}

fn restarts(h: &H) -> Vec<(String, &'static str, u64)> {
    h.sup
        .restarts()
        .map(|(g, c, n)| (g.to_string(), c.name(), n))
        .collect()
}

#[test]
fn a_stuck_worker_is_killed_once_and_replaced_at_once() {
    let (mut h, w) = H::running(&[("t", 2, true)]);
    let stuck = |h: &mut H, worker| {
        h.ev(Event::Stuck {
            worker,
            reason: "its bus took nothing for 10s".into(),
        })
    };
    h.later(Duration::from_secs(30));
    assert_eq!(killed(&stuck(&mut h, w[1])), [w[1]]);
    assert!(stuck(&mut h, w[1]).is_empty(), "killed once");
    h.later(MS);
    assert!(h.exited(w[1], "signal SIGKILL").is_empty());
    let r = respawn_after(&mut h, Duration::ZERO);
    assert_eq!(h.sup.worker(r).unwrap().id, 1, "same slot");
    assert_eq!(restarts(&h), [("t".into(), "stuck", 1)]);
    assert_eq!(h.exits(), [("t".into(), "signal SIGKILL".into(), 1)]);
    // Not before it is ready: start_timeout covers a worker that starts.
    h.exited(r, "signal SIGKILL");
    let s = spawned(&h.ev(Event::Tick));
    assert!(stuck(&mut h, s[0].0).is_empty());
    assert_eq!(
        restarts(&h),
        [("t".into(), "died", 1), ("t".into(), "stuck", 1)]
    );
    // A retiring worker is killed once too; while stopping, stop_timeout decides.
    h.reload(None);
    let a = h.installed(0, Ok(build("b")));
    let (_, a) = roll_through(&mut h, a, 1);
    let old = stopped(&a)[0];
    assert_eq!(killed(&stuck(&mut h, old)), [old]);
    assert!(
        h.ev(Event::Tick).is_empty(),
        "not killed again at stop_timeout"
    );
    h.ev(Event::Stop {
        graceful: false,
        client: None,
    });
    assert!(stuck(&mut h, w[0]).is_empty());
}

/// One group "t" of `count` workers with recycling limits, running.
fn recycling(count: u32, max_requests: Option<u64>, max_memory: Option<u64>) -> (H, Vec<WorkerId>) {
    let now = Instant::now();
    let spec = GroupSpec {
        name: "t".into(),
        count,
        reloadable: true,
        plugin: PathBuf::from("/src/t.so"),
        max_requests,
        max_memory,
        handover: false,
        tls: None,
    };
    let timeouts = Timeouts {
        start: START,
        stop: STOP,
    };
    let mut sup = Supervisor::new(vec![(spec, build("a"))], timeouts, now);
    let workers: Vec<WorkerId> = spawned(&sup.start(now)).iter().map(|s| s.0).collect();
    let mut h = H { sup, now };
    for &w in &workers {
        h.ev(Event::Ready {
            worker: w,
            handover: false,
        });
    }
    assert!(matches!(h.ev(Event::Tick)[..], [Action::Started]));
    (h, workers)
}

fn requests(h: &mut H, worker: WorkerId, n: u64) -> Vec<Action> {
    h.ev(Event::Usage {
        worker,
        requests: Some(n),
        memory: None,
    })
}

#[test]
fn a_worker_past_max_requests_is_recycled_new_before_old_one_at_a_time() {
    let (mut h, old) = recycling(2, Some(100), None);
    assert!(requests(&mut h, old[0], 99).is_empty());
    let a = requests(&mut h, old[0], 100);
    let s = spawned(&a);
    assert_eq!(
        (s[0].1, s[0].2, s[0].3.as_str()),
        (0, 0, "a"),
        "same slot, same build"
    );
    assert!(
        stopped(&a).is_empty(),
        "the old one serves until the new one is ready"
    );
    assert_eq!(h.sup.processes(0), 3, "capacity never dips");
    assert!(requests(&mut h, old[0], 120).is_empty(), "asked once");
    // The other one is over too: it waits for its turn.
    assert!(requests(&mut h, old[1], 150).is_empty());
    h.later(10 * MS);
    let a = h.ev(Event::Ready {
        worker: s[0].0,
        handover: false,
    });
    assert_eq!(stopped(&a), [old[0]]);
    let s2 = spawned(&a);
    assert_eq!((s2[0].2, s2[0].3.as_str()), (1, "a"));
    assert_eq!(restarts(&h), [("t".into(), "max_requests", 1)]);
    let a = h.ev(Event::Ready {
        worker: s2[0].0,
        handover: false,
    });
    assert_eq!(stopped(&a), [old[1]]);
    assert!(spawned(&a).is_empty());
    assert_eq!(restarts(&h), [("t".into(), "max_requests", 2)]);
    // Told to stop, they exit cleanly: no exit statistics, no respawn.
    for w in old {
        assert!(spawned(&h.exited(w, "exit code 0")).is_empty());
    }
    assert!(h.exits().is_empty());
    assert_eq!(h.sup.processes(0), 2);
    // The replacement starts counting from zero in its own process.
    assert!(requests(&mut h, s[0].0, 10).is_empty());
    assert!(!h.sup.reload_busy(), "a recycle is no reload");
}

#[test]
fn a_worker_past_max_memory_is_recycled() {
    let (mut h, old) = recycling(1, Some(1000), Some(256 << 20));
    let mem = |h: &mut H, bytes| {
        h.ev(Event::Usage {
            worker: old[0],
            requests: None,
            memory: Some(bytes),
        })
    };
    assert!(
        mem(&mut h, 256 << 20).is_empty(),
        "at the limit is not past it"
    );
    let s = spawned(&mem(&mut h, 300 << 20));
    assert_eq!(s.len(), 1);
    assert_eq!(
        stopped(&h.ev(Event::Ready {
            worker: s[0].0,
            handover: false
        })),
        [old[0]]
    );
    assert_eq!(restarts(&h), [("t".into(), "max_memory", 1)]);
}

#[test]
fn a_recycle_whose_replacement_fails_keeps_the_old_worker_and_retries_later() {
    let (mut h, old) = recycling(1, Some(100), None);
    let r = spawned(&requests(&mut h, old[0], 100))[0].0;
    let a = h.ev(Event::Failed {
        worker: r,
        error: "on_worker_start failed: no database".into(),
    });
    assert_eq!(killed(&a), [r]);
    let a = h.exited(r, "exit code 2");
    assert!(spawned(&a).is_empty() && stopped(&a).is_empty(), "{a:?}");
    assert!(h.sup.worker(old[0]).unwrap().serving);
    assert_eq!(h.exits(), [("t".into(), "exit code 2".into(), 1)]);
    // Not tried again at once…
    assert!(requests(&mut h, old[0], 120).is_empty());
    h.later(RECYCLE_RETRY - MS);
    assert!(h.ev(Event::Tick).is_empty());
    // …but once RECYCLE_RETRY has passed.
    h.later(MS);
    let r = spawned(&h.ev(Event::Tick));
    assert_eq!(r.len(), 1, "the recycle waiting for its turn starts");
    // Not ready in time is a failure too.
    h.later(START);
    let a = h.ev(Event::Tick);
    assert_eq!(killed(&a), [r[0].0]);
    assert!(h.sup.worker(old[0]).unwrap().serving);
    assert!(restarts(&h).is_empty());
}

#[test]
fn a_reload_takes_over_a_recycle_and_recycles_wait_for_the_reload() {
    let (mut h, old) = recycling(2, Some(100), None);
    let rec = spawned(&requests(&mut h, old[0], 100))[0].0;
    h.reload(Some(1));
    // During the reload, nothing more is recycled.
    assert!(requests(&mut h, old[1], 100).is_empty());
    let a = h.installed(0, Ok(build("b")));
    // The roll reaches id 0, whose recycle is starting: it takes over.
    assert_eq!(killed(&a), [rec]);
    let s = spawned(&a);
    assert_eq!((s[0].2, s[0].3.as_str()), (0, "b"));
    assert!(
        h.exited(rec, "signal SIGKILL").is_empty(),
        "no roll failure"
    );
    let (new, a) = roll_through(&mut h, a, 2);
    assert!(reloaded(&a, 1).ok());
    // The worker that was due is replaced by the roll: nothing more to do.
    assert!(spawned(&a).is_empty(), "{a:?}");
    assert_eq!(h.build_of(new[1]), "b");
    assert!(restarts(&h).is_empty());
}

#[test]
fn usage_is_ignored_while_starting_and_stopping() {
    let (mut h, _) = H::new(&[("t", 1, true)]);
    let w = WorkerId(1);
    h.ev(Event::Ready {
        worker: w,
        handover: false,
    });
    assert!(requests(&mut h, w, u64::MAX).is_empty(), "no limit set");
    let (mut h, old) = recycling(1, Some(1), None);
    h.ev(Event::Stop {
        graceful: false,
        client: None,
    });
    assert!(spawned(&requests(&mut h, old[0], 5)).is_empty());
}

/// Like `H::running`, with `reload_mode = "handover"` for every group.
fn running_handover(groups: &[(&str, u32, bool)]) -> (H, Vec<WorkerId>) {
    let (mut h, workers) = H::running(groups);
    for g in &mut h.sup.groups {
        g.spec.handover = true;
    }
    (h, workers)
}

fn handovers(actions: &[Action]) -> Vec<(Option<WorkerId>, WorkerId)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Handover { from, to } => Some((*from, *to)),
            _ => None,
        })
        .collect()
}

fn report(moved: u64) -> HandoverReport {
    HandoverReport {
        moved,
        refused: 1,
        closed: 2,
        millis: 3,
    }
}

#[test]
fn a_handover_roll_asks_each_old_worker_for_its_connections_before_it_goes() {
    let (mut h, old) = running_handover(&[("t", 2, true)]);
    h.reload(Some(7));
    let mut actions = h.installed(0, Ok(build("b")));
    let mut new = Vec::new();
    for (i, &o) in old.iter().enumerate() {
        let s = spawned(&actions);
        assert!(actions
            .iter()
            .any(|a| matches!(a, Action::Spawn { handover: true, .. })));
        new.push(s[0].0);
        // Ready to take over: the old worker is asked, not yet stopped.
        let a = h.ev(Event::Ready {
            worker: s[0].0,
            handover: true,
        });
        assert_eq!(handovers(&a), [(Some(o), s[0].0)]);
        assert!(stopped(&a).is_empty() && spawned(&a).is_empty());
        // Until it is over, nothing else happens.
        assert!(h.ev(Event::Tick).is_empty());
        actions = h.ev(Event::HandedOver {
            worker: s[0].0,
            report: report(10 + i as u64),
        });
        assert_eq!(stopped(&actions), [o]);
    }
    let r = reloaded(&actions, 7);
    assert!(r.ok());
    let hv = r.groups[0].handover.expect("counted");
    assert_eq!((hv.moved, hv.refused, hv.closed), (21, 2, 4));
    assert_eq!(h.sup.last_handover(0).map(|h| h.moved), Some(21));
    assert!(new.iter().all(|&w| h.sup.worker(w).unwrap().serving));
}

#[test]
fn a_replacement_that_fails_its_import_stops_the_roll_and_the_old_worker_stays() {
    let (mut h, old) = running_handover(&[("t", 2, true)]);
    h.reload(Some(7));
    let actions = h.installed(0, Ok(build("b")));
    let rep = spawned(&actions)[0].0;
    h.ev(Event::Ready {
        worker: rep,
        handover: true,
    });
    let a = h.ev(Event::Failed {
        worker: rep,
        error: "on_import failed: boom".into(),
    });
    assert_eq!(killed(&a), [rep]);
    let a = h.exited(rep, "signal SIGKILL");
    let r = reloaded(&a, 7);
    assert!(!r.ok());
    assert!(r.groups[0].error.as_deref().unwrap().contains("boom"));
    assert!(stopped(&a).is_empty(), "the old worker keeps serving");
    assert!(h.sup.worker(old[0]).unwrap().serving);
    assert_eq!(h.build_of(old[0]), "a");
}

#[test]
fn a_handover_that_does_not_finish_in_time_fails_like_a_late_start() {
    let (mut h, old) = running_handover(&[("t", 1, true)]);
    h.reload(Some(7));
    let actions = h.installed(0, Ok(build("b")));
    let rep = spawned(&actions)[0].0;
    h.later(START - MS);
    // The deadline starts again when the handover begins.
    h.ev(Event::Ready {
        worker: rep,
        handover: true,
    });
    h.later(START - MS);
    assert!(h.ev(Event::Tick).is_empty());
    h.later(2 * MS);
    let a = h.ev(Event::Tick);
    assert_eq!(killed(&a), [rep]);
    assert!(!reloaded(&a, 7).ok());
    assert!(stopped(&a).is_empty());
    h.exited(rep, "signal SIGKILL");
    assert!(h.sup.worker(old[0]).unwrap().serving);
}

#[test]
fn a_recycle_hands_over_too() {
    let (mut h, w) = recycling(1, Some(100), None);
    for g in &mut h.sup.groups {
        g.spec.handover = true;
    }
    let a = h.ev(Event::Usage {
        worker: w[0],
        requests: Some(100),
        memory: None,
    });
    let rep = spawned(&a)[0].0;
    let a = h.ev(Event::Ready {
        worker: rep,
        handover: true,
    });
    assert_eq!(handovers(&a), [(Some(w[0]), rep)]);
    let a = h.ev(Event::HandedOver {
        worker: rep,
        report: report(5),
    });
    assert_eq!(stopped(&a), [w[0]]);
}

#[test]
fn a_replacement_whose_slot_has_no_worker_left_starts_afresh() {
    let (mut h, old) = running_handover(&[("t", 1, true)]);
    h.reload(Some(7));
    let actions = h.installed(0, Ok(build("b")));
    let rep = spawned(&actions)[0].0;
    // The old worker died meanwhile (its respawn waits for the roll).
    h.exited(old[0], "signal SIGSEGV");
    let a = h.ev(Event::Ready {
        worker: rep,
        handover: true,
    });
    assert_eq!(handovers(&a), [(None, rep)]);
    let a = h.ev(Event::HandedOver {
        worker: rep,
        report: HandoverReport::default(),
    });
    assert!(reloaded(&a, 7).ok());
    assert!(h.sup.worker(rep).unwrap().serving);
}
