//! The order of a rolling reload and its report: which id to replace next,
//! when the roll is over. The supervisor tells it what happened (the
//! replacement is ready, or failed) and does the rest (retiring, killing).
//!
//! Per worker id: start the replacement first, wait until it is ready, then
//! retire the old one, so capacity never dips. The first failure stops the
//! roll; workers not yet replaced keep their build.

use std::collections::VecDeque;
use std::time::Instant;

use crate::ipc::{GroupReport, HandoverReport, ReloadReport};
use crate::master::builds::Build;

/// What the roll wants next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Start a replacement for `id` running `build`.
    Spawn { group: usize, id: u32, build: Build },
    /// Nothing left to do.
    Finished,
}

#[derive(Debug)]
struct GroupRoll {
    group: usize,
    count: u32,
    build: Build,
    next: u32,
    started: Option<Instant>,
    report: usize,
}

#[derive(Debug)]
pub struct Roll {
    queue: VecDeque<GroupRoll>,
    /// The id whose replacement we are waiting for.
    waiting: Option<(usize, u32)>,
    pub report: ReloadReport,
    failed: bool,
}

/// One group to roll: index, name, worker count, current and new build.
pub struct Plan {
    pub group: usize,
    pub name: String,
    pub count: u32,
    pub old: String,
    pub new: Build,
}

impl Roll {
    /// `kept` lists groups that are not reloadable (reported, not rolled).
    pub fn new(plans: Vec<Plan>, kept: Vec<(String, String, u32)>) -> Roll {
        let mut report = ReloadReport { groups: Vec::new() };
        let mut queue = VecDeque::new();
        for p in plans {
            queue.push_back(GroupRoll {
                group: p.group,
                count: p.count,
                build: p.new.clone(),
                next: 0,
                started: None,
                report: report.groups.len(),
            });
            report.groups.push(GroupReport {
                name: p.name,
                old: p.old,
                new: p.new.short().to_string(),
                rolled: 0,
                count: p.count,
                millis: 0,
                kept: false,
                error: None,
                handover: None,
            });
        }
        for (name, build, count) in kept {
            report.groups.push(GroupReport {
                name,
                old: build.clone(),
                new: build,
                rolled: 0,
                count,
                millis: 0,
                kept: true,
                error: None,
                handover: None,
            });
        }
        Roll {
            queue,
            waiting: None,
            report,
            failed: false,
        }
    }

    /// The id being replaced now, if any.
    pub fn waiting(&self) -> Option<(usize, u32)> {
        self.waiting
    }

    /// The builds still to be rolled out (their copies must be kept).
    pub fn builds(&self) -> impl Iterator<Item = &Build> {
        self.queue.iter().map(|g| &g.build)
    }

    /// Starts the roll (or the next step).
    pub fn next(&mut self, now: Instant) -> Step {
        if self.failed {
            return Step::Finished;
        }
        while let Some(g) = self.queue.front_mut() {
            if g.next < g.count {
                g.started.get_or_insert(now);
                self.waiting = Some((g.group, g.next));
                return Step::Spawn {
                    group: g.group,
                    id: g.next,
                    build: g.build.clone(),
                };
            }
            let done = self.queue.pop_front().expect("front exists");
            let r = &mut self.report.groups[done.report];
            r.millis = done
                .started
                .map_or(0, |s| now.duration_since(s).as_millis() as u64);
        }
        self.waiting = None;
        Step::Finished
    }

    /// The replacement for the id we wait on is ready: true if that was the
    /// one (the caller then retires the old worker of that id).
    pub fn ready(&mut self, group: usize, id: u32) -> bool {
        if self.waiting != Some((group, id)) {
            return false;
        }
        let Some(g) = self.queue.front_mut() else {
            return false;
        };
        g.next += 1;
        self.report.groups[g.report].rolled += 1;
        self.waiting = None;
        true
    }

    /// The replacement for the id we wait on took over its predecessor's
    /// connections: counted in its group's report.
    pub fn handed_over(&mut self, group: usize, id: u32, report: &HandoverReport) {
        if self.waiting != Some((group, id)) {
            return;
        }
        if let Some(g) = self.queue.front() {
            let r = &mut self.report.groups[g.report];
            r.handover
                .get_or_insert_with(HandoverReport::default)
                .add(report);
        }
    }

    /// The replacement failed: stop here, keeping the rest on their build.
    pub fn failed(&mut self, group: usize, id: u32, error: String, now: Instant) {
        if self.waiting != Some((group, id)) {
            return;
        }
        if let Some(g) = self.queue.front() {
            let r = &mut self.report.groups[g.report];
            r.error = Some(error);
            r.millis = g
                .started
                .map_or(0, |s| now.duration_since(s).as_millis() as u64);
        }
        self.failed = true;
        self.waiting = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn build(tag: &str) -> Build {
        Build {
            hash: format!("{tag:0>64}"),
            copy: PathBuf::from(format!("/rt/plugins/{tag}.so")),
            tls: None,
        }
    }

    fn plan(group: usize, count: u32) -> Plan {
        Plan {
            group,
            name: format!("g{group}"),
            count,
            old: "old".into(),
            new: build("new"),
        }
    }

    #[test]
    fn rolls_one_id_at_a_time_starting_the_replacement_first() {
        let t = Instant::now();
        let mut r = Roll::new(vec![plan(0, 2), plan(1, 1)], vec![]);
        let mut log = Vec::new();
        while let Step::Spawn { group, id, .. } = r.next(t) {
            log.push(format!("spawn {group}#{id}"));
            // The next id waits until this replacement is ready.
            assert_eq!(r.waiting(), Some((group, id)));
            assert!(r.ready(group, id));
            log.push(format!("ready {group}#{id}"));
        }
        assert_eq!(
            log,
            [
                "spawn 0#0",
                "ready 0#0",
                "spawn 0#1",
                "ready 0#1",
                "spawn 1#0",
                "ready 1#0",
            ]
        );
        assert!(r.report.ok());
        assert_eq!(r.report.groups[0].rolled, 2);
    }

    #[test]
    fn first_failure_stops_the_roll_and_is_reported() {
        let t = Instant::now();
        let mut r = Roll::new(vec![plan(0, 3)], vec![("static".into(), "abc".into(), 2)]);
        assert!(matches!(r.next(t), Step::Spawn { id: 0, .. }));
        r.failed(0, 0, "plugin x: not a wm-host plugin".into(), t);
        assert_eq!(r.next(t), Step::Finished);
        assert!(!r.report.ok());
        let g = &r.report.groups[0];
        assert_eq!(
            (g.rolled, g.error.as_deref()),
            (0, Some("plugin x: not a wm-host plugin"))
        );
        assert!(r.report.groups[1].kept);
    }

    #[test]
    fn stray_events_are_ignored() {
        let t = Instant::now();
        let mut r = Roll::new(vec![plan(0, 2)], vec![]);
        r.next(t);
        assert!(!r.ready(0, 1), "not the id being replaced");
        r.failed(3, 0, "other group".into(), t);
        assert!(r.report.ok());
        assert!(r.ready(0, 0));
    }
}
