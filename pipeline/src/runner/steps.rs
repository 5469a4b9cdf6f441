//! What a handler's result becomes: the one step that ends an event's
//! time at a stage.
//!
//! Owns the outcome-to-step policy: a done event goes on to the next stage
//! (parked in its vendor's queue when rate-check admits fairly), or
//! completes its image; a deferred one waits, its attempts unchanged; an
//! outage waits as a first retry would, uncounted; a failure is retried
//! with backoff while the policy allows and is retryable, else
//! dead-lettered. Pure decisions: it never speaks to Redis (the finisher
//! runs the steps).

use tracing::{debug, warn};

use crate::event::{ImageEvent, StageName};
use crate::metrics::Counted;
use crate::now_ms;
use crate::retry::RetryPolicy;
use crate::scripts::Waiting;
use crate::stage::{ErrorClass, Outcome, StageError};

/// One atomic step in Redis that ends an event's time at a stage.
#[derive(Debug)]
pub(super) enum Step {
    /// On to the next stage's stream.
    Handoff(StageName, ImageEvent),
    /// Into the vendor's queue, for the fair dispatcher to admit.
    Park(StageName, ImageEvent),
    /// The image's last stage is done.
    Complete(ImageEvent),
    /// Back on the stage's retry set until `due_ms`.
    Retry {
        due_ms: u64,
        waiting: Waiting,
        reason: String,
        attempts: u32,
        event: ImageEvent,
    },
    /// Onto the dead-letter stream.
    Dead {
        error: String,
        attempts: u32,
        event: ImageEvent,
    },
}

impl Step {
    /// Decides the step for a handler's `result` on `input` at `stage`.
    /// `parks` says that a done event waits in its vendor's queue rather
    /// than going straight on (rate-check with fair admission).
    pub(super) fn after(
        stage: StageName,
        parks: bool,
        retry: &RetryPolicy,
        input: ImageEvent,
        result: Result<Outcome, StageError>,
    ) -> Step {
        match result {
            Ok(Outcome::Done(mut ev)) => {
                ev.kind = stage.done_kind();
                ev.attempt = 0;
                match stage.next(&ev.ops) {
                    Some(next) if parks => {
                        ev.slot = true;
                        Step::Park(next, ev)
                    }
                    Some(next) => Step::Handoff(next, ev),
                    None => Step::Complete(ev),
                }
            }
            Ok(Outcome::Deferred {
                event,
                until_ms,
                reason,
            }) => Step::Retry {
                due_ms: until_ms,
                waiting: Waiting::Throttled,
                reason,
                attempts: event.attempt,
                event,
            },
            Err(err) if err.class == ErrorClass::Unavailable => {
                // An outage is not this event's failure: its attempts stay
                // as they were, and it waits as a first retry would.
                let mut delay = retry.delay(1);
                if let Some(after) = err.retry_after {
                    delay = delay.max(after);
                }
                debug!(stage = %stage, error = %err, ?delay, "a service is unavailable; retrying later");
                Step::Retry {
                    due_ms: now_ms() + delay.as_millis() as u64,
                    waiting: Waiting::Retrying,
                    reason: err.message,
                    attempts: input.attempt,
                    event: input,
                }
            }
            Err(err) => {
                let failed = input.attempt + 1;
                if err.is_retryable() && retry.may_retry(failed) {
                    let mut delay = retry.delay(failed);
                    if let Some(after) = err.retry_after {
                        delay = delay.max(after);
                    }
                    debug!(stage = %stage, error = %err, failed, ?delay, "retrying later");
                    let mut event = input;
                    event.attempt = failed;
                    Step::Retry {
                        due_ms: now_ms() + delay.as_millis() as u64,
                        waiting: Waiting::Retrying,
                        reason: err.message,
                        attempts: failed,
                        event,
                    }
                } else {
                    warn!(stage = %stage, error = %err, failed, "dead-lettering");
                    Step::Dead {
                        error: err.message,
                        attempts: failed,
                        event: input,
                    }
                }
            }
        }
    }

    /// How the step counts in the metrics.
    pub(super) fn counted(&self) -> Counted {
        match self {
            Step::Handoff(..) | Step::Park(..) | Step::Complete(_) => Counted::Processed,
            Step::Retry { waiting, .. } => waiting.counted(),
            Step::Dead { .. } => Counted::Dead,
        }
    }

    /// The job whose end this step may bring.
    pub(super) fn job(&self) -> Option<&str> {
        match self {
            Step::Complete(ev) | Step::Dead { event: ev, .. } => Some(&ev.job),
            _ => None,
        }
    }

    /// Runs in the finisher's batches (the steps of every event that goes
    /// well) rather than on its own.
    pub(super) fn batched(&self) -> bool {
        matches!(self, Step::Handoff(..) | Step::Park(..) | Step::Complete(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event() -> ImageEvent {
        ImageEvent::from_json(
            r#"{"v":2,"kind":"ImageSubmitted","job":"j","vendor":"v","image":0,"record_id":"r",
            "ops":["resize"],"source":{"url":"https://x/a.jpg"},"submitted_ms":1}"#,
        )
        .expect("a valid event")
    }

    #[test]
    fn a_done_event_parks_only_where_admission_is_fair() {
        let policy = RetryPolicy::default();
        let parked = Step::after(StageName::RateCheck, true, &policy, event(), Ok(Outcome::Done(event())));
        assert!(matches!(parked, Step::Park(StageName::Resize, ref ev) if ev.slot));
        let handed = Step::after(
            StageName::RateCheck,
            false,
            &policy,
            event(),
            Ok(Outcome::Done(event())),
        );
        assert!(matches!(handed, Step::Handoff(StageName::Resize, _)));
    }

    #[test]
    fn an_outage_keeps_the_attempts_and_a_last_failure_dead_letters() {
        let policy = RetryPolicy {
            max_attempts: 2,
            ..RetryPolicy::default()
        };
        let outage = Step::after(
            StageName::Resize,
            false,
            &policy,
            event(),
            Err(StageError::unavailable("down")),
        );
        assert!(matches!(
            outage,
            Step::Retry {
                attempts: 0,
                waiting: Waiting::Retrying,
                ..
            }
        ));
        let mut tried = event();
        tried.attempt = 1;
        let last = Step::after(
            StageName::Resize,
            false,
            &policy,
            tried,
            Err(StageError::retryable("boom")),
        );
        assert!(matches!(last, Step::Dead { attempts: 2, .. }));
        let permanent = Step::after(
            StageName::Resize,
            false,
            &policy,
            event(),
            Err(StageError::permanent("bad")),
        );
        assert!(matches!(permanent, Step::Dead { attempts: 1, .. }));
    }
}
