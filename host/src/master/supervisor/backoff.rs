//! When to respawn a worker that died: at once, unless it keeps failing by
//! itself soon after starting (a crash loop), then with a doubling delay.
//!
//! Which deaths count is the supervisor's call (see `Supervisor::exited`):
//! a worker that never became ready, or that died by itself (an exit code,
//! or a signal a process raises against itself such as SIGSEGV or SIGABRT)
//! within `QUICK_DEATH` of being ready. A worker that was serving and was
//! killed by a signal from outside (SIGKILL, SIGTERM…) is no crash loop: it
//! is respawned at once, however often that happens.

use std::time::Duration;

/// A worker that dies by itself within this time after being ready is
/// failing, not serving: its death counts towards the backoff.
pub const QUICK_DEATH: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Backoff {
    /// Delay after the first failure.
    pub min: Duration,
    pub max: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            failures: 0,
        }
    }

    /// The worker failed (see the module doc): how long to wait before
    /// starting its replacement; doubles with each failure in a row.
    pub fn failure(&mut self) -> Duration {
        self.failures += 1;
        let doublings = (self.failures - 1).min(20);
        self.min.saturating_mul(1 << doublings).min(self.max)
    }

    /// The worker had been serving: the next one starts at once, and a
    /// later failure starts from the shortest delay again.
    pub fn reset(&mut self) -> Duration {
        self.failures = 0;
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn failures_double_up_to_the_cap() {
        let mut b = Backoff::default();
        let delays: Vec<Duration> = (0..9).map(|_| b.failure()).collect();
        assert_eq!(&delays[..4], &[100 * MS, 200 * MS, 400 * MS, 800 * MS]);
        assert_eq!(delays[8], 10 * S);
    }

    #[test]
    fn a_reset_starts_over() {
        let mut b = Backoff::default();
        b.failure();
        b.failure();
        assert_eq!(b.reset(), Duration::ZERO);
        assert_eq!(b.reset(), Duration::ZERO);
        assert_eq!(b.failure(), 100 * MS);
    }
}
