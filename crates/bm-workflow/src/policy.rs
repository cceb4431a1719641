//! The error policy: one pure function decides whether a failed attempt is retried, and
//! after how long, by the kind of the error:
//!
//! - permanent (401, 404, 405, a missing setting) and canceled: never retried;
//! - transient (a server error, a read-back that disagrees): `max_attempts` attempts;
//! - unavailable and unreachable (a BMC that is rebooting itself, updating its firmware,
//!   overloaded, or does not answer): retried with backoff until the step has been failing
//!   for `unavailable_budget` (minutes: what such a BMC needs), at least `max_attempts`
//!   attempts in all.
//!
//! Either way a retry waits at least what the service asked for (`Retry-After`).

use std::time::Duration;

use bm_provider::{ErrorKind, ProviderError};

/// How failed attempts of a step are retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts of one step in all, the first included (at least 1), for transient
    /// errors; the least number of attempts for unavailable and unreachable ones.
    pub max_attempts: u32,
    /// The wait before the first retry; each later one doubles it.
    pub base_backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
    /// How long a step failing with unavailable or unreachable errors is retried, from its
    /// first failure: a BMC rebooting itself or updating its firmware is gone for minutes.
    pub unavailable_budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            unavailable_budget: Duration::from_secs(10 * 60),
        }
    }
}

/// What to do after a failed attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Wait, then run the step again.
    Retry {
        /// How long to wait.
        after: Duration,
    },
    /// Fail the operation.
    GiveUp,
}

/// Decides after the failed `attempt` (from 1) of a step, which has been failing for
/// `failing_for` (since its first failure in this run): retry per the error's kind (see
/// the module documentation), waiting an exponential backoff with "equal jitter" (half
/// fixed, half random, so that a fleet of failing machines does not retry in lockstep), or
/// the error's `retry_after` if longer. `jitter` is a random number in `[0, 1)` supplied by
/// the caller, which keeps this function pure.
pub fn decide(
    policy: &RetryPolicy,
    attempt: u32,
    failing_for: Duration,
    error: &ProviderError,
    jitter: f64,
) -> Decision {
    let exp = attempt.saturating_sub(1).min(31);
    let backoff = policy
        .base_backoff
        .saturating_mul(1u32 << exp)
        .min(policy.max_backoff);
    let half = backoff / 2;
    let jitter = jitter.clamp(0.0, 1.0);
    let after = (half + half.mul_f64(jitter)).max(error.retry_after().unwrap_or_default());
    let attempts_left = attempt < policy.max_attempts.max(1);
    let retry = match error.kind() {
        ErrorKind::Permanent | ErrorKind::Canceled => false,
        ErrorKind::Transient => attempts_left,
        ErrorKind::Unavailable | ErrorKind::Unreachable => {
            attempts_left || failing_for.saturating_add(after) <= policy.unavailable_budget
        }
    };
    if retry {
        Decision::Retry { after }
    } else {
        Decision::GiveUp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            base_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(500),
            unavailable_budget: Duration::from_secs(600),
        }
    }

    const T0: Duration = Duration::ZERO;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let e = ProviderError::transient("busy");
        let after = |attempt| match decide(&policy(), attempt, T0, &e, 1.0) {
            Decision::Retry { after } => after,
            Decision::GiveUp => panic!("gave up at {attempt}"),
        };
        assert_eq!(after(1), Duration::from_millis(100));
        assert_eq!(after(2), Duration::from_millis(200));
        assert_eq!(after(3), Duration::from_millis(400));
        assert_eq!(decide(&policy(), 4, T0, &e, 1.0), Decision::GiveUp);
        let capped = RetryPolicy {
            max_attempts: 100,
            ..policy()
        };
        assert_eq!(
            decide(&capped, 50, T0, &e, 1.0),
            Decision::Retry {
                after: Duration::from_millis(500)
            }
        );
    }

    #[test]
    fn only_retryable_errors_are_retried() {
        for e in [
            ProviderError::permanent("bad credentials"),
            ProviderError::canceled(),
        ] {
            assert_eq!(decide(&policy(), 1, T0, &e, 0.5), Decision::GiveUp);
        }
        assert!(matches!(
            decide(
                &policy(),
                1,
                T0,
                &ProviderError::unreachable("no route"),
                0.5
            ),
            Decision::Retry { .. }
        ));
    }

    #[test]
    fn unavailable_bmcs_get_minutes_and_permanent_errors_none() {
        let p = RetryPolicy {
            max_attempts: 3,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            unavailable_budget: Duration::from_secs(600),
        };
        // A BMC updating its firmware: retried past max_attempts, until the budget.
        for e in [
            ProviderError::unavailable("HTTP 503"),
            ProviderError::unreachable("connection refused"),
        ] {
            assert!(matches!(
                decide(&p, 10, Duration::from_secs(300), &e, 0.5),
                Decision::Retry { .. }
            ));
            assert_eq!(
                decide(&p, 30, Duration::from_secs(590), &e, 1.0),
                Decision::GiveUp,
                "a wait of 30 s would end past the budget"
            );
        }
        // Transient errors keep their attempts; permanent ones fail at once.
        let t = ProviderError::transient("HTTP 500");
        assert_eq!(decide(&p, 3, Duration::ZERO, &t, 0.5), Decision::GiveUp);
        for e in [
            ProviderError::permanent("HTTP 401"),
            ProviderError::permanent("HTTP 404"),
            ProviderError::permanent("HTTP 405"),
        ] {
            assert_eq!(decide(&p, 1, Duration::ZERO, &e, 0.5), Decision::GiveUp);
        }
    }

    #[test]
    fn retry_after_is_honoured() {
        let e =
            ProviderError::unavailable("HTTP 503").with_retry_after(Some(Duration::from_secs(120)));
        assert_eq!(
            decide(&policy(), 1, Duration::ZERO, &e, 0.0),
            Decision::Retry {
                after: Duration::from_secs(120)
            }
        );
        // Not past the budget.
        assert_eq!(
            decide(&policy(), 5, Duration::from_secs(500), &e, 0.0),
            Decision::GiveUp
        );
        // A shorter Retry-After than the backoff changes nothing.
        let e = ProviderError::transient("HTTP 429").with_retry_after(Some(Duration::ZERO));
        assert_eq!(
            decide(&policy(), 1, Duration::ZERO, &e, 1.0),
            Decision::Retry {
                after: Duration::from_millis(100)
            }
        );
    }

    proptest! {
        #[test]
        fn jitter_stays_within_half_and_full_backoff(attempt in 1u32..4, jitter in 0.0f64..1.0) {
            let e = ProviderError::transient("busy");
            let full = Duration::from_millis(100) * (1 << (attempt - 1));
            match decide(&policy(), attempt, T0, &e, jitter) {
                Decision::Retry { after } => {
                    prop_assert!(after >= full / 2 && after <= full, "{after:?} vs {full:?}");
                }
                Decision::GiveUp => prop_assert!(false, "gave up"),
            }
        }

        #[test]
        fn never_more_than_max_attempts(max in 1u32..10, attempt in 1u32..20) {
            let p = RetryPolicy { max_attempts: max, ..policy() };
            let d = decide(&p, attempt, T0, &ProviderError::transient("x"), 0.0);
            prop_assert_eq!(matches!(d, Decision::Retry { .. }), attempt < max);
        }
    }
}
