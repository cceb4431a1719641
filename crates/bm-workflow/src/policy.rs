//! The error policy: one pure function decides whether a failed attempt is retried, and
//! after how long.

use std::time::Duration;

use bm_provider::ProviderError;

/// How failed attempts of a step are retried.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts of one step in all, the first included (at least 1).
    pub max_attempts: u32,
    /// The wait before the first retry; each later one doubles it.
    pub base_backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 3,
            base_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
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

/// Decides after the failed `attempt` (from 1) of a step: retry when the error is
/// retryable and attempts remain, waiting an exponential backoff with "equal jitter" (half
/// fixed, half random, so that a fleet of failing machines does not retry in lockstep).
/// `jitter` is a random number in `[0, 1)` supplied by the caller, which keeps this
/// function pure.
pub fn decide(policy: &RetryPolicy, attempt: u32, error: &ProviderError, jitter: f64) -> Decision {
    if !error.is_retryable() || attempt >= policy.max_attempts.max(1) {
        return Decision::GiveUp;
    }
    let exp = attempt.saturating_sub(1).min(31);
    let backoff = policy
        .base_backoff
        .saturating_mul(1u32 << exp)
        .min(policy.max_backoff);
    let half = backoff / 2;
    let jitter = jitter.clamp(0.0, 1.0);
    Decision::Retry {
        after: half + half.mul_f64(jitter),
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
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let e = ProviderError::transient("busy");
        let after = |attempt| match decide(&policy(), attempt, &e, 1.0) {
            Decision::Retry { after } => after,
            Decision::GiveUp => panic!("gave up at {attempt}"),
        };
        assert_eq!(after(1), Duration::from_millis(100));
        assert_eq!(after(2), Duration::from_millis(200));
        assert_eq!(after(3), Duration::from_millis(400));
        assert_eq!(decide(&policy(), 4, &e, 1.0), Decision::GiveUp);
        let capped = RetryPolicy {
            max_attempts: 100,
            ..policy()
        };
        assert_eq!(
            decide(&capped, 50, &e, 1.0),
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
            assert_eq!(decide(&policy(), 1, &e, 0.5), Decision::GiveUp);
        }
        assert!(matches!(
            decide(&policy(), 1, &ProviderError::unreachable("no route"), 0.5),
            Decision::Retry { .. }
        ));
    }

    proptest! {
        #[test]
        fn jitter_stays_within_half_and_full_backoff(attempt in 1u32..4, jitter in 0.0f64..1.0) {
            let e = ProviderError::transient("busy");
            let full = Duration::from_millis(100) * (1 << (attempt - 1));
            match decide(&policy(), attempt, &e, jitter) {
                Decision::Retry { after } => {
                    prop_assert!(after >= full / 2 && after <= full, "{after:?} vs {full:?}");
                }
                Decision::GiveUp => prop_assert!(false, "gave up"),
            }
        }

        #[test]
        fn never_more_than_max_attempts(max in 1u32..10, attempt in 1u32..20) {
            let p = RetryPolicy { max_attempts: max, ..policy() };
            let d = decide(&p, attempt, &ProviderError::transient("x"), 0.0);
            prop_assert_eq!(matches!(d, Decision::Retry { .. }), attempt < max);
        }
    }
}
