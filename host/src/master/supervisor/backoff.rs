//! When to respawn a worker that died: at once after a long life, with a
//! doubling delay while it keeps dying soon after starting.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    /// Delay after the first quick death.
    pub min: Duration,
    pub max: Duration,
    /// A worker that lived this long is healthy: its next death is forgiven.
    pub stable_after: Duration,
    quick_deaths: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(
            Duration::from_millis(100),
            Duration::from_secs(10),
            Duration::from_secs(5),
        )
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration, stable_after: Duration) -> Backoff {
        Backoff {
            min,
            max,
            stable_after,
            quick_deaths: 0,
        }
    }

    /// A worker that had been up for `lived` died: how long to wait before
    /// starting its replacement.
    pub fn on_death(&mut self, lived: Duration) -> Duration {
        if lived >= self.stable_after {
            self.quick_deaths = 0;
            return Duration::ZERO;
        }
        self.quick_deaths += 1;
        let doublings = (self.quick_deaths - 1).min(20);
        self.min.saturating_mul(1 << doublings).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn healthy_worker_is_respawned_at_once() {
        let mut b = Backoff::default();
        assert_eq!(b.on_death(60 * S), Duration::ZERO);
        assert_eq!(b.on_death(60 * S), Duration::ZERO);
    }

    #[test]
    fn crash_loop_doubles_up_to_the_cap() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..9).map(|_| b.on_death(10 * MS)).collect();
        assert_eq!(&delays[..4], &[100 * MS, 200 * MS, 400 * MS, 800 * MS]);
        assert_eq!(delays[8], 10 * S);
    }

    #[test]
    fn a_long_life_resets_the_count() {
        let mut b = Backoff::default();
        b.on_death(MS);
        b.on_death(MS);
        assert_eq!(b.on_death(6 * S), Duration::ZERO);
        assert_eq!(b.on_death(MS), 100 * MS);
    }
}
