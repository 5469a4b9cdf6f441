//! The finisher: runs the step that ends an event's time at a stage.
//!
//! Owns the scripts' calls for steps: hand-offs, parks and completions
//! (the steps of every event that goes well) are gathered and run as one
//! `finish.lua` call per batch (whatever finished while the previous call
//! was on its way goes in the next, so a busy stage pays one round trip
//! for many events and an idle one waits for no timer); retries and dead
//! letters run on their own. While Redis is away (a restart, a failover)
//! a step keeps trying rather than redo finished work; if it stays away,
//! the entry stays pending and is reclaimed. It must not decide which step
//! an event takes (`steps`) nor read streams (`consumer`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use super::steps::Step;
use crate::consumer::Delivery;
use crate::context::Pipeline;
use crate::event::{StageName, EVENT_FIELD};
use crate::scripts::{DeadLetter, Finish, FinishBatch, Finished, ScheduleRetry};

/// Events finished in one script call, at most.
const MAX_FINISH_BATCH: usize = 256;

/// A hand-off, park or completion waiting for the batch, and where the
/// script's verdict on it goes (see `finish.lua` for the codes).
struct Finishing {
    id: String,
    step: Step,
    done: oneshot::Sender<Result<Finished, String>>,
}

pub(super) struct Finisher {
    p: Pipeline,
    stage: StageName,
    dead_letter_max: u64,
    queue: mpsc::UnboundedSender<Finishing>,
    queue_rx: Mutex<Option<mpsc::UnboundedReceiver<Finishing>>>,
}

impl Finisher {
    pub(super) fn new(p: Pipeline, stage: StageName, dead_letter_max: u64) -> Self {
        let (queue, queue_rx) = mpsc::unbounded_channel();
        Finisher {
            p,
            stage,
            dead_letter_max,
            queue,
            queue_rx: Mutex::new(Some(queue_rx)),
        }
    }

    /// Runs `step` for entry `id`; the script's verdict, or why there is none.
    pub(super) async fn run_step(&self, id: &str, step: Step) -> Result<Finished, String> {
        if step.batched() {
            let (done, verdict) = oneshot::channel();
            let sent = self.queue.send(Finishing {
                id: id.to_string(),
                step,
                done,
            });
            return match sent {
                Ok(()) => verdict.await.unwrap_or_else(|_| Err("the finisher stopped".into())),
                Err(_) => Err("the finisher stopped".into()),
            };
        }
        // As for a batch: only an outage is waited out; a refusal leaves
        // the entry pending at once rather than after forty tries.
        let attempt = || async { self.apply(id, &step).await };
        attempt
            .retry(redis_outage())
            .when(is_outage)
            .await
            .map(|()| Finished::Moved)
            .map_err(|e| e.to_string())
    }

    /// Runs hand-offs, parks and completions in batches, until `stop`
    /// (which comes once no work is left in flight).
    pub(super) async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut queue = self.queue_rx.lock().unwrap().take().expect("a finisher runs once");
        let mut batch = Vec::with_capacity(MAX_FINISH_BATCH);
        loop {
            let first = tokio::select! {
                biased;
                f = queue.recv() => match f {
                    Some(f) => f,
                    None => break,
                },
                _ = stop.cancelled() => break,
            };
            batch.push(first);
            while batch.len() < MAX_FINISH_BATCH {
                match queue.try_recv() {
                    Ok(f) => batch.push(f),
                    Err(_) => break,
                }
            }
            let attempt = || async { self.finish_batch(&batch).await };
            match attempt.retry(redis_outage()).when(is_outage).await {
                Err(e) if batch.len() > 1 && !is_outage(&e) => {
                    // Something in the batch the script refuses must not
                    // hold up the rest: finish them one by one.
                    warn!(stage = %self.stage, error = %e, events = batch.len(), "a batch failed; finishing its events one by one");
                    for f in batch.drain(..) {
                        let one = std::slice::from_ref(&f);
                        let attempt = || async { self.finish_batch(one).await };
                        let r = attempt.retry(redis_outage()).when(is_outage).await;
                        let _ = f.done.send(r.map(|outcomes| outcomes[0]).map_err(|e| e.to_string()));
                    }
                }
                Ok(outcomes) => {
                    for (f, outcome) in batch.drain(..).zip(outcomes) {
                        let _ = f.done.send(Ok(outcome));
                    }
                }
                Err(e) => {
                    let why = e.to_string();
                    for f in batch.drain(..) {
                        let _ = f.done.send(Err(why.clone()));
                    }
                }
            }
        }
    }

    /// Runs `finish.lua` for a batch (`scripts/finish.rs`); one outcome per
    /// event.
    async fn finish_batch(&self, batch: &[Finishing]) -> redis::RedisResult<Vec<Finished>> {
        let events: Vec<(&str, Finish)> = batch
            .iter()
            .map(|f| {
                let finish = match &f.step {
                    Step::Handoff(next, ev) => Finish::HandOff(*next, ev),
                    Step::Park(next, ev) => Finish::Park(*next, ev),
                    Step::Complete(ev) => Finish::Complete(ev),
                    Step::Retry { .. } | Step::Dead { .. } => unreachable!("retries and dead letters run on their own"),
                };
                (f.id.as_str(), finish)
            })
            .collect();
        FinishBatch {
            stage: self.stage,
            events: &events,
        }
        .run(&self.p)
        .await
    }

    /// Runs the script for a retry or a dead letter (`retry.rs`,
    /// `dead.rs`); neither asks the caller for more.
    async fn apply(&self, id: &str, step: &Step) -> redis::RedisResult<()> {
        match step {
            Step::Retry {
                due_ms,
                waiting,
                reason,
                attempts,
                event,
            } => {
                ScheduleRetry {
                    stage: self.stage,
                    entry_id: id,
                    event,
                    due_ms: *due_ms,
                    waiting: *waiting,
                    reason,
                    attempts: *attempts,
                }
                .run(&self.p)
                .await?;
            }
            Step::Dead { error, attempts, event } => {
                DeadLetter {
                    stage: self.stage,
                    entry_id: id,
                    payload: &event.to_json(),
                    job_id: Some(&event.job),
                    vendor: &event.vendor,
                    image: event.image,
                    error,
                    attempts: *attempts,
                    held_slot: event.slot,
                    max_len: self.dead_letter_max,
                }
                .run(&self.p)
                .await?;
            }
            Step::Handoff(..) | Step::Park(..) | Step::Complete(_) => {
                unreachable!("hand-offs, parks and completions run in batches")
            }
        }
        Ok(())
    }

    /// Dead-letters an entry whose event cannot even be read.
    pub(super) async fn dead_letter_raw(&self, d: &Delivery, why: &str) {
        error!(stage = %self.stage, entry = %d.id, why, "dead-lettering an unreadable entry");
        let payload = d.field(EVENT_FIELD).unwrap_or_default();
        let r = DeadLetter {
            stage: self.stage,
            entry_id: &d.id,
            payload: &payload,
            job_id: None,
            vendor: "",
            image: 0,
            error: why,
            attempts: 1,
            held_slot: false,
            max_len: self.dead_letter_max,
        }
        .run(&self.p)
        .await;
        match r {
            Ok(_) => crate::metrics::record(self.stage, crate::metrics::Counted::Dead),
            Err(e) => error!(error = %e, "dead-lettering failed; the entry stays pending"),
        }
    }
}

/// How long a step keeps trying while Redis is unreachable (a restart, a
/// failover) before the entry is left pending for a reclaim.
fn redis_outage() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(2))
        .with_max_times(40)
}

/// A Redis error that says Redis is away, loading or failing over (worth
/// waiting for), rather than that the step itself was refused.
fn is_outage(e: &redis::RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(
            e.code(),
            Some("LOADING" | "BUSY" | "TRYAGAIN" | "READONLY" | "MASTERDOWN" | "CLUSTERDOWN" | "OOM")
        )
}
