//! Exponential backoff with jitter, and what to do after a failure.

use std::time::Duration;

use rand::Rng;

use crate::error::Error;
use crate::strategy::{Exhausted, Order};

/// Retry policy shared by the on-commit path and the relay.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failure. Default: 1 s.
    pub initial: Duration,
    /// Cap on the delay. Default: 5 min.
    pub max: Duration,
    /// Growth factor per attempt. Default: 2.0.
    pub multiplier: f64,
    /// Fraction of the delay that is randomised, 0.0 to 1.0: the delay is drawn from
    /// `[d * (1 - jitter), d]`. Default: 0.5.
    pub jitter: f64,
    /// Attempts before a message is dead-lettered (publish-on-commit) or reported stuck
    /// (keep-order). Default: 10.
    pub max_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: 10,
        }
    }
}

impl RetryPolicy {
    /// The delay after `attempts` failed attempts (1 = first failure), jittered.
    pub fn delay(&self, attempts: u32) -> Duration {
        let exp = self
            .multiplier
            .max(1.0)
            .powi(attempts.saturating_sub(1).min(64) as i32);
        let base = self.initial.as_secs_f64() * exp;
        let capped = base.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let factor = if jitter > 0.0 {
            1.0 - jitter * rand::thread_rng().gen::<f64>()
        } else {
            1.0
        };
        Duration::from_secs_f64(capped * factor)
    }

    /// Check the values; used by the builders.
    pub fn validate(&self) -> crate::Result<()> {
        if self.max_attempts == 0 {
            return Err(Error::config("retry.max_attempts must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.jitter)
            || !self.multiplier.is_finite()
            || self.multiplier < 1.0
        {
            return Err(Error::config(
                "retry.jitter must be in [0, 1] and retry.multiplier >= 1",
            ));
        }
        if self.initial > self.max {
            return Err(Error::config("retry.initial must not exceed retry.max"));
        }
        const DAY: Duration = Duration::from_secs(24 * 3600);
        crate::error::in_range("retry.max", self.max, Duration::ZERO, DAY)?;
        crate::error::in_range("retry.multiplier", self.multiplier, 1.0, 1000.0)?;
        crate::error::in_range("retry.max_attempts", self.max_attempts, 1, 1_000_000)?;
        Ok(())
    }
}

/// What happens to a message after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after the delay.
    Retry(Duration),
    /// Give up: dead letter.
    Dead,
    /// Keep-order head that cannot be delivered: stay blocked, retry after the delay, and
    /// report it stuck.
    Stuck(Duration),
    /// Keep-order head that cannot be delivered: park its unit for an operator.
    Park,
}

impl RetryPolicy {
    /// Decide after a failure. `attempts` includes the one that just failed; `order` and
    /// `exhausted` are the row's stored answers; `dead_letter_keep_order` is what
    /// [`Exhausted::Default`] means for an ordered row.
    pub fn decide(
        &self,
        order: Order,
        exhausted: Exhausted,
        attempts: u32,
        error: &Error,
        dead_letter_keep_order: bool,
    ) -> Decision {
        if error.is_transient() && attempts < self.max_attempts {
            return Decision::Retry(self.delay(attempts));
        }
        match (order, exhausted) {
            (_, Exhausted::DeadLetter) | (Order::Unordered, Exhausted::Default) => Decision::Dead,
            (Order::InUnit, Exhausted::Default) if dead_letter_keep_order => Decision::Dead,
            (Order::InUnit, Exhausted::Park) => Decision::Park,
            (Order::Unordered, Exhausted::Park) => Decision::Dead,
            (_, Exhausted::Default | Exhausted::Block) => Decision::Stuck(self.delay(attempts)),
        }
    }
}

/// Run a store write whose messages were already sent (a relay's settle, the committer's
/// marks) until it succeeds: a transient failure (a deadlock the database broke by rolling
/// the write back, a lost connection, a timeout) is tried again, with a pause that doubles
/// from 50 ms up to 2 s, while `deadline` (the end of the rows' lease, less a margin) leaves
/// room. Giving up means the rows are published again after the lease, so it is worth the
/// wait. The write must be idempotent (settling rows already settled changes nothing).
pub(crate) async fn until_recorded<T, F, Fut>(
    deadline: std::time::Instant,
    what: &str,
    mut write: F,
) -> crate::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = crate::Result<T>>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        match write().await {
            Err(e) if e.is_transient() && std::time::Instant::now() + pause < deadline => {
                metrics::counter!("outbox_record_retries_total").increment(1);
                tracing::warn!(error = %e, "{what} failed; trying again (its messages are not published again)");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(2));
            }
            Err(e) => {
                tracing::error!(error = %e, "{what} failed for good before its lease ends: its published messages will be published again once the lease ends");
                return Err(e);
            }
            Ok(v) => return Ok(v),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_grows_exponentially_within_jitter_and_cap() {
        let p = RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            multiplier: 2.0,
            jitter: 0.5,
            max_attempts: 5,
        };
        for _ in 0..200 {
            for (attempt, nominal) in [
                (1, 100),
                (2, 200),
                (3, 400),
                (4, 800),
                (5, 1000),
                (30, 1000),
            ] {
                let d = p.delay(attempt).as_millis() as u64;
                assert!(d >= nominal / 2 && d <= nominal, "attempt {attempt}: {d}ms");
            }
        }
        let no_jitter = RetryPolicy {
            jitter: 0.0,
            ..p.clone()
        };
        assert_eq!(no_jitter.delay(3), Duration::from_millis(400));
        // Jitter really varies.
        let distinct: std::collections::HashSet<_> = (0..50).map(|_| p.delay(2)).collect();
        assert!(distinct.len() > 10);
    }

    #[test]
    fn decisions() {
        let p = RetryPolicy {
            max_attempts: 3,
            ..Default::default()
        };
        let t = Error::transient("x");
        let perm = Error::permanent("x");
        assert!(matches!(
            p.decide(Order::Unordered, Exhausted::Default, 1, &t, false),
            Decision::Retry(_)
        ));
        assert_eq!(
            p.decide(Order::Unordered, Exhausted::Default, 3, &t, false),
            Decision::Dead
        );
        assert_eq!(
            p.decide(Order::Unordered, Exhausted::Default, 1, &perm, false),
            Decision::Dead
        );
        assert!(matches!(
            p.decide(Order::InUnit, Exhausted::Default, 3, &t, false),
            Decision::Stuck(_)
        ));
        assert!(matches!(
            p.decide(Order::InUnit, Exhausted::Default, 1, &perm, false),
            Decision::Stuck(_)
        ));
        assert_eq!(
            p.decide(Order::InUnit, Exhausted::Default, 3, &t, true),
            Decision::Dead
        );
        assert_eq!(
            p.decide(Order::InUnit, Exhausted::Park, 3, &t, false),
            Decision::Park
        );
        assert!(matches!(
            p.decide(Order::InUnit, Exhausted::Park, 2, &t, false),
            Decision::Retry(_)
        ));
        // The row's own answer wins over the relay's default.
        assert_eq!(
            p.decide(Order::InUnit, Exhausted::DeadLetter, 3, &t, false),
            Decision::Dead
        );
        assert!(matches!(
            p.decide(Order::InUnit, Exhausted::Block, 3, &t, true),
            Decision::Stuck(_)
        ));
        assert!(matches!(
            p.decide(Order::InUnit, Exhausted::Block, 1, &t, true),
            Decision::Retry(_)
        ));
        assert!(RetryPolicy {
            max_attempts: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
