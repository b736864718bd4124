//! [`Pace`]: the one rate limiter of the peer server, used twice: chunk requests per
//! connection (a rate with a burst), and upload bytes per second for the whole daemon (a rate
//! with no burst, shared by every connection).
//!
//! It is the generic cell rate algorithm in its virtual-scheduling form: every unit spent
//! moves a theoretical arrival time on by `1 / rate`, and a caller waits until that time is
//! no more than the burst ahead of now. No background task, no tokens to refill, one lock.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::lock;

/// A rate in units per second, with a burst of units spendable at once.
pub struct Pace {
    /// Time one unit takes at the rate; `None` for no limit.
    per_unit: Option<f64>,
    /// How far ahead of now the schedule may run before a caller waits.
    tolerance: Duration,
    /// When the units spent so far are all paid for.
    paid_until: Mutex<Instant>,
}

impl Pace {
    /// `rate` units per second (0: no limit), `burst` of them at once without waiting.
    pub fn new(rate: f64, burst: f64) -> Pace {
        let per_unit = (rate > 0.0).then(|| 1.0 / rate);
        let tolerance = per_unit.map_or(Duration::ZERO, |t| {
            Duration::from_secs_f64(t * burst.max(0.0))
        });
        Pace {
            per_unit,
            tolerance,
            paid_until: Mutex::new(Instant::now()),
        }
    }

    /// Is there a limit? (Asked only where chunks go out by `sendfile`.)
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub fn is_limited(&self) -> bool {
        self.per_unit.is_some()
    }

    /// How long a caller spending `units` now must wait, with the spending recorded.
    fn reserve(&self, units: u64, now: Instant) -> Duration {
        let Some(per_unit) = self.per_unit else {
            return Duration::ZERO;
        };
        let mut paid = lock(&self.paid_until);
        let start = (*paid).max(now);
        *paid = start + Duration::from_secs_f64(per_unit * units as f64);
        paid.saturating_duration_since(now + self.tolerance)
    }

    /// Spends `units`, waiting until the rate allows them.
    pub async fn spend(&self, units: u64) {
        let wait = self.reserve(units, Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_is_free_then_each_unit_waits_its_share() {
        let pace = Pace::new(100.0, 10.0);
        let now = Instant::now();
        for _ in 0..10 {
            assert_eq!(pace.reserve(1, now), Duration::ZERO);
        }
        let wait = pace.reserve(1, now);
        assert!(
            (wait.as_secs_f64() - 0.01).abs() < 1e-6,
            "eleventh unit waits {wait:?}"
        );
    }

    #[test]
    fn without_a_burst_a_send_waits_for_its_own_time_and_those_before_it() {
        let pace = Pace::new(1000.0, 0.0);
        let now = Instant::now();
        let first = pace.reserve(500, now);
        let second = pace.reserve(500, now);
        assert!((first.as_secs_f64() - 0.5).abs() < 1e-6, "{first:?}");
        assert!((second.as_secs_f64() - 1.0).abs() < 1e-6, "{second:?}");
        // Idle time is not banked: a second later the next send starts afresh.
        let later = now + Duration::from_secs(3);
        let third = pace.reserve(500, later);
        assert!((third.as_secs_f64() - 0.5).abs() < 1e-6, "{third:?}");
    }

    #[test]
    fn no_rate_means_no_limit() {
        let pace = Pace::new(0.0, 0.0);
        assert!(!pace.is_limited());
        assert_eq!(pace.reserve(u64::MAX, Instant::now()), Duration::ZERO);
    }
}
