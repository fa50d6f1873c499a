//! Time for the KMS: real, or fixed for tests so that "a year later" and "after the deletion
//! window" are testable. `NBDCRYPT_FAKE_NOW` (Unix seconds) fixes it for a whole process, which
//! is how the CLI tests move time.

use std::sync::atomic::{AtomicU64, Ordering};

/// Environment variable that fixes the clock (Unix seconds).
pub const FAKE_NOW_ENV: &str = "NBDCRYPT_FAKE_NOW";

/// A source of Unix time.
#[derive(Debug)]
pub struct Clock {
    fixed: Option<AtomicU64>,
}

impl Clock {
    /// The system clock, unless `NBDCRYPT_FAKE_NOW` fixes it.
    pub fn from_env() -> Self {
        let fixed = std::env::var(FAKE_NOW_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok());
        Clock {
            fixed: fixed.map(AtomicU64::new),
        }
    }

    /// A clock fixed at `now`, for tests.
    pub fn fixed(now: u64) -> Self {
        Clock {
            fixed: Some(AtomicU64::new(now)),
        }
    }

    /// Moves a fixed clock forward (no effect on the system clock).
    pub fn advance(&self, seconds: u64) {
        if let Some(t) = &self.fixed {
            t.fetch_add(seconds, Ordering::SeqCst);
        }
    }

    /// Now, in Unix seconds.
    pub fn now(&self) -> u64 {
        match &self.fixed {
            Some(t) => t.load(Ordering::SeqCst),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// Seconds in a day.
pub const DAY: u64 = 86_400;
