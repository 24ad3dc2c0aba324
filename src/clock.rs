//! Injectable time, so retention, consent and audit tests need not wait.
//!
//! ```
//! use facematch::clock::{Clock, ManualClock};
//! use std::time::{Duration, UNIX_EPOCH};
//! let c = ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_700_000_000));
//! c.advance(Duration::from_secs(60));
//! assert_eq!(c.now_unix_ms(), 1_700_000_060_000);
//! ```

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
    /// The current time in milliseconds since the Unix epoch (negative before 1970).
    fn now_unix_ms(&self) -> i64 {
        match self.now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_millis() as i64,
            Err(e) => -(e.duration().as_millis() as i64),
        }
    }
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to (tests).
#[derive(Debug)]
pub struct ManualClock {
    ms: AtomicI64,
}

impl ManualClock {
    /// A clock stopped at `t`.
    pub fn new(t: SystemTime) -> Self {
        let ms = t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        ManualClock { ms: AtomicI64::new(ms) }
    }
    /// Move the clock forward.
    pub fn advance(&self, d: Duration) {
        self.ms.fetch_add(d.as_millis() as i64, Ordering::SeqCst);
    }
    /// Set the clock to `t`.
    pub fn set(&self, t: SystemTime) {
        let ms = t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        self.ms.store(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        let ms = self.ms.load(Ordering::SeqCst);
        if ms >= 0 {
            UNIX_EPOCH + Duration::from_millis(ms as u64)
        } else {
            UNIX_EPOCH - Duration::from_millis(ms.unsigned_abs())
        }
    }
}
