//! The one retry policy of every Dossier process: capped exponential backoff
//! with jitter, used alike to reconnect to RabbitMQ, to re-run a command that
//! lost a race, and to retry a worker's effect.

use std::time::Duration;

use rand::Rng as _;

/// Capped exponential backoff with jitter: attempt `n` waits between half and all
/// of `min(max, initial * 2^n)`. The jitter keeps processes that lost the broker at
/// the same moment from all coming back at the same moment; the fixed half keeps
/// the wait from collapsing to nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The base wait of the first retry.
    pub initial: Duration,
    /// The ceiling.
    pub max: Duration,
}

impl Backoff {
    /// 200 ms, doubling up to 30 s.
    pub const DEFAULT: Self = Self {
        initial: Duration::from_millis(200),
        max: Duration::from_secs(30),
    };

    /// How long to wait before retry number `attempt` (0 for the first retry).
    pub fn delay(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.min(30));
        let ceiling = self.initial.saturating_mul(factor).min(self.max);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        let half = ceiling_ms / 2;
        let jitter = rand::rng().random_range(0..=ceiling_ms - half);
        Duration::from_millis(half + jitter)
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::DEFAULT
    }
}
