//! A rate limit for the log lines clients can cause (bad input, refused
//! handshakes, cut connections): a flood of garbage must not become a
//! flood of log. At most [`PER_WINDOW`] such lines go out per second and
//! per worker; the rest are counted, and one "suppressed K similar
//! messages" line follows once the second is over.
//!
//! A worker is one thread, so the window is thread-local (tests run
//! workers in-process, one per thread).

use std::cell::RefCell;
use std::time::{Duration, Instant};

/// Lines allowed per window.
pub const PER_WINDOW: u32 = 10;
const WINDOW: Duration = Duration::from_secs(1);

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl Window {
    /// Ends the window if it is over, logging what it held back.
    fn roll(&mut self, now: Instant) {
        if self.start.is_some_and(|s| now.duration_since(s) < WINDOW) {
            return;
        }
        if self.suppressed > 0 {
            tracing::warn!(
                "suppressed {} similar messages (at most {PER_WINDOW} per second)",
                self.suppressed
            );
        }
        *self = Window::default();
    }
}

thread_local! {
    static LIMIT: RefCell<Window> = RefCell::new(Window::default());
}

/// Whether one more line may be logged now.
pub fn allow() -> bool {
    let now = Instant::now();
    LIMIT.with_borrow_mut(|w| {
        w.roll(now);
        let start = *w.start.get_or_insert(now);
        debug_assert!(start <= now);
        if w.logged < PER_WINDOW {
            w.logged += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    })
}

/// When the summary of held-back lines is due, if any are.
pub fn due() -> Option<Instant> {
    LIMIT.with_borrow(|w| match w.start {
        Some(s) if w.suppressed > 0 => Some(s + WINDOW),
        _ => None,
    })
}

/// Logs the summary once its window is over (the loop calls this).
pub fn flush(now: Instant) {
    if due().is_some_and(|t| t <= now) {
        LIMIT.with_borrow_mut(|w| w.roll(now));
    }
}

/// `tracing::warn!` (or another level: `limited!(error, …)`), subject to
/// the worker's rate limit.
macro_rules! limited {
    (error, $($arg:tt)*) => {
        if $crate::worker::logs::allow() {
            tracing::error!($($arg)*)
        }
    };
    ($($arg:tt)*) => {
        if $crate::worker::logs::allow() {
            tracing::warn!($($arg)*)
        }
    };
}
pub(crate) use limited;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn at_most_a_window_of_lines_then_a_summary() {
        let allowed = (0..100).filter(|_| allow()).count();
        assert_eq!(allowed, PER_WINDOW as usize);
        let at = due().expect("a summary is owed");
        flush(at - Duration::from_millis(1));
        assert!(due().is_some(), "not before the window is over");
        flush(at);
        assert_eq!(due(), None);
        assert!(allow(), "a new window");
    }
}
