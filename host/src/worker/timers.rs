//! Worker timers: one-shot and repeating, millisecond precision, run on the
//! worker's own loop. A timer that comes due late (the worker was busy) fires
//! once and is rescheduled from now, never in a burst of catch-up calls.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Timer {
    interval: Duration,
    repeat: bool,
    due: Instant,
}

#[derive(Debug, Default)]
pub struct Timers {
    live: HashMap<u64, Timer>,
    /// May hold stale entries for deleted or rescheduled timers; `live` is the
    /// truth and stale entries are skipped when popped.
    queue: BinaryHeap<Reverse<(Instant, u64)>>,
    next_id: u64,
}

impl Timers {
    pub fn add(&mut self, now: Instant, interval: Duration, repeat: bool) -> u64 {
        self.next_id += 1;
        let id = self.next_id;
        let due = now + interval;
        self.live.insert(
            id,
            Timer {
                interval,
                repeat,
                due,
            },
        );
        self.queue.push(Reverse((due, id)));
        id
    }

    pub fn del(&mut self, id: u64) -> bool {
        self.live.remove(&id).is_some()
    }

    /// Deletes every timer; returns how many there were.
    pub fn clear(&mut self) -> usize {
        let n = self.live.len();
        self.live.clear();
        self.queue.clear();
        n
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    /// How long the loop may sleep before the next timer is due.
    pub fn timeout(&mut self, now: Instant) -> Option<Duration> {
        self.skip_stale();
        self.queue
            .peek()
            .map(|Reverse((due, _))| due.saturating_duration_since(now))
    }

    /// The next timer due at `now`, if any. A repeating timer is rescheduled
    /// before it is returned, so its callback may delete it.
    pub fn pop_due(&mut self, now: Instant) -> Option<u64> {
        self.skip_stale();
        let &Reverse((due, id)) = self.queue.peek()?;
        if due > now {
            return None;
        }
        self.queue.pop();
        let timer = self.live.get_mut(&id)?;
        if timer.repeat {
            let mut next = timer.due + timer.interval;
            if next <= now {
                next = now + timer.interval;
            }
            timer.due = next;
            self.queue.push(Reverse((next, id)));
        } else {
            self.live.remove(&id);
        }
        Some(id)
    }

    fn skip_stale(&mut self) {
        while let Some(&Reverse((due, id))) = self.queue.peek() {
            match self.live.get(&id) {
                Some(t) if t.due == due => return,
                _ => {
                    self.queue.pop();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn drain(t: &mut Timers, now: Instant) -> Vec<u64> {
        std::iter::from_fn(|| t.pop_due(now)).collect()
    }

    #[test]
    fn one_shot_fires_once_in_order() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let b = t.add(t0, 20 * MS, false);
        let a = t.add(t0, 10 * MS, false);
        assert_eq!(t.timeout(t0), Some(10 * MS));
        assert!(drain(&mut t, t0 + 5 * MS).is_empty());
        assert_eq!(drain(&mut t, t0 + 25 * MS), vec![a, b]);
        assert!(drain(&mut t, t0 + 100 * MS).is_empty());
        assert_eq!(t.len(), 0);
        assert_eq!(t.timeout(t0), None);
    }

    #[test]
    fn repeating_keeps_its_cadence() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let id = t.add(t0, 10 * MS, true);
        assert_eq!(drain(&mut t, t0 + 10 * MS), vec![id]);
        assert_eq!(t.timeout(t0 + 12 * MS), Some(8 * MS));
    }

    #[test]
    fn late_repeating_timer_fires_once_not_in_a_burst() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let id = t.add(t0, 10 * MS, true);
        assert_eq!(drain(&mut t, t0 + 95 * MS), vec![id]);
        assert_eq!(t.timeout(t0 + 95 * MS), Some(10 * MS));
    }

    #[test]
    fn deleted_timers_never_fire_and_may_delete_themselves() {
        let t0 = Instant::now();
        let mut t = Timers::default();
        let a = t.add(t0, 10 * MS, true);
        let b = t.add(t0, 10 * MS, false);
        assert!(t.del(b));
        assert!(!t.del(b));
        assert_eq!(t.pop_due(t0 + 10 * MS), Some(a));
        // The callback of `a` deletes `a`.
        assert!(t.del(a));
        assert!(drain(&mut t, t0 + 100 * MS).is_empty());
        assert_eq!(t.timeout(t0), None);
    }
}
