//! The retry policy: how many attempts, and how long to wait between them.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt.
    pub base_ms: u64,
    /// Each further wait is this many times the one before.
    pub factor: f64,
    /// Longest wait between two attempts.
    pub max_ms: u64,
    /// Fraction of the wait drawn at random (0.2 = ±20%), so that images
    /// that failed together do not retry together.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base_ms: 1_000,
            factor: 2.0,
            max_ms: 5 * 60_000,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `failed` (1 for the first).
    pub fn delay(&self, failed: u32) -> Duration {
        let exp = self.factor.powi(failed.saturating_sub(1) as i32);
        let nominal = (self.base_ms as f64 * exp).min(self.max_ms as f64);
        let spread = nominal * self.jitter.clamp(0.0, 1.0);
        let ms = if spread > 0.0 {
            nominal + rand::rng().random_range(-spread..=spread)
        } else {
            nominal
        };
        Duration::from_millis(ms.max(0.0) as u64)
    }

    /// Whether an event that has failed `failed` times may be tried again.
    pub fn may_retry(&self, failed: u32) -> bool {
        failed < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_by_the_factor_within_the_jitter() {
        let p = RetryPolicy::default();
        for (failed, nominal) in [(1, 1000.0), (2, 2000.0), (3, 4000.0)] {
            let d = p.delay(failed).as_millis() as f64;
            assert!((d - nominal).abs() <= nominal * 0.2 + 1.0, "{failed}: {d}");
        }
        assert!(p.may_retry(2));
        assert!(!p.may_retry(3));
    }
}
