//! The stage runner: drives one stage's handler from its stream.
//!
//! A runner is a [`Consumer`] of its stage's group (reading, reclaiming,
//! renewing claims, the graceful stop) plus what is the stage's own:
//! calling the handler (a panic or a timeout is a failed attempt), turning
//! its result into one step (`steps`), and running that step atomically in
//! Redis (`finisher`). Beside them run the worker's chores (`maintenance`)
//! and, on rate-check with fair admission, the dispatcher
//! ([`Admission::run_dispatcher`]). It must not issue stream commands
//! itself (the consumer does) nor build a script's arguments (the typed
//! calls in `scripts` do).

mod config;
mod finisher;
mod maintenance;
mod steps;

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures::FutureExt;
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, info_span, warn, Instrument};

use crate::admission::{Admission, WindowSettings};
use crate::consumer::{Consumer, Delivery, Work};
pub use crate::context::Pipeline;
use crate::event::{ImageEvent, StageName, EVENT_FIELD};
pub use crate::heartbeat::Heartbeat;
use crate::heartbeat::ServiceTime;
use crate::now_ms;
use crate::scripts::Finished;
use crate::stage::{Outcome, Stage, StageError};
pub use config::RunnerConfig;
use finisher::Finisher;
use steps::Step;

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

pub struct StageRunner {
    p: Pipeline,
    stage: Arc<dyn Stage>,
    name: StageName,
    cfg: RunnerConfig,
    consumer: Arc<Consumer>,
    handled: AtomicUsize,
    /// Woken when this process parks an image, so the dispatcher runs at once.
    parked: tokio::sync::Notify,
    finisher: Arc<Finisher>,
    /// The fair scheduler's calls (rate-check's quotas and dispatch).
    admission: Admission,
    /// How long this runner's handler takes, for the heartbeat.
    service: Mutex<ServiceTime>,
}

/// Creates a stage's consumer group (and its stream) if missing.
pub async fn ensure_group(p: &Pipeline, stage: StageName) -> redis::RedisResult<()> {
    crate::consumer::create_group(p, &p.keys.stream(stage), p.keys.group(stage)).await
}

impl StageRunner {
    pub fn new(p: Pipeline, stage: Arc<dyn Stage>, cfg: RunnerConfig) -> Arc<Self> {
        let name = stage.name();
        let batching = stage.batching();
        let consumer = Consumer::new(
            p.clone(),
            p.keys.stream(name),
            p.keys.group(name),
            cfg.consumer(
                batching.as_ref().map(|b| b.max_events.max(1)).unwrap_or(1),
                batching.map(|b| b.max_wait),
            ),
        );
        Arc::new(StageRunner {
            admission: Admission::new(
                p.clone(),
                WindowSettings {
                    ceiling: cfg.admission_window,
                    adaptive: cfg.admission_adaptive,
                    target_ms: cfg.admission_target_ms,
                },
                cfg.quotas.clone(),
                cfg.quota_window_ms,
            ),
            finisher: Arc::new(Finisher::new(p.clone(), name, cfg.dead_letter_max)),
            service: Mutex::new(ServiceTime::default()),
            consumer,
            p,
            name,
            cfg,
            stage,
            handled: AtomicUsize::new(0),
            parked: tokio::sync::Notify::new(),
        })
    }

    pub fn consumer(&self) -> &str {
        self.consumer.name()
    }

    /// Rate-check with fair admission: done images wait in their vendors'
    /// queues for the dispatcher.
    fn fair(&self) -> bool {
        self.name == StageName::RateCheck && self.cfg.admission_window > 0
    }

    /// Runs until `shutdown` is cancelled, then stops reading, lets in-flight
    /// work finish within the grace period and hands back what did not
    /// (see [`Consumer::run`]); the whole stop takes the grace period at
    /// most, even with Redis gone.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), RunnerError> {
        info!(stage = %self.name, consumer = %self.consumer(), concurrency = self.cfg.concurrency, "worker started");
        let maintenance = tokio::spawn(self.clone().maintain(shutdown.clone()));
        // The finisher outlives the reader: in-flight work finishes through it.
        let finisher_stop = CancellationToken::new();
        let finisher = tokio::spawn(self.finisher.clone().run(finisher_stop.clone()));
        let dispatcher = self.fair().then(|| {
            let (me, stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move { me.admission.run_dispatcher(&me.parked, stop).await })
        });
        let consumed = self.consumer.clone().run(self.clone(), shutdown).await;
        finisher_stop.cancel();
        let grace_end = match &consumed {
            Ok(end) => *end,
            Err(_) => tokio::time::Instant::now(),
        };
        // The helpers stop at once when Redis answers; when it does not, they
        // are not waited for past the grace period (nothing they hold is lost:
        // unacknowledged entries stay pending).
        let helpers = [Some(maintenance), Some(finisher), dispatcher];
        for mut h in helpers.into_iter().flatten() {
            let last_call = grace_end.max(tokio::time::Instant::now() + Duration::from_millis(100));
            if tokio::time::timeout_at(last_call, &mut h).await.is_err() {
                h.abort();
            }
        }
        consumed?;
        let mut conn = self.p.conn.clone();
        let bye = conn.hdel::<_, _, ()>(self.p.keys.workers(), self.consumer());
        tokio::time::timeout(Duration::from_secs(1), bye).await.ok();
        info!(stage = %self.name, handled = self.handled.load(Ordering::Relaxed), "worker stopped");
        Ok(())
    }

    /// Calls the stage, catching a panic and stopping it at the timeout;
    /// both count as failed attempts.
    async fn call_handler(&self, events: &[(String, ImageEvent)]) -> Vec<Result<Outcome, StageError>> {
        let n = events.len();
        let first = &events[0].1;
        let span = info_span!("handle", stage = %self.name, job = %first.job, image = first.image,
            vendor = %first.vendor, attempt = first.attempt + 1, batch = n, trace_id = trace_id_of(first));
        let batch: Vec<ImageEvent> = events.iter().map(|(_, e)| e.clone()).collect();
        let stage = &self.stage;
        let work = async move {
            if stage.batching().is_some() {
                stage.handle_batch(batch).await
            } else {
                let mut out = Vec::with_capacity(n);
                for ev in batch {
                    out.push(stage.handle(ev).await);
                }
                out
            }
        };
        let timeout = Duration::from_millis(self.cfg.timeout_ms);
        let all = |err: StageError| (0..n).map(|_| Err(err.clone())).collect();
        // Dropping the future at the timeout stops the work.
        match tokio::time::timeout(timeout, AssertUnwindSafe(work).catch_unwind().instrument(span)).await {
            Ok(Ok(results)) if results.len() == n => results,
            Ok(Ok(results)) => all(StageError::permanent(format!(
                "stage returned {} results for {n} events",
                results.len()
            ))),
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                all(StageError::retryable(format!("handler panicked: {what}")))
            }
            Err(_) => all(StageError::retryable(format!(
                "timed out after {} ms",
                self.cfg.timeout_ms
            ))),
        }
    }

    /// Rate-check's quotas: an image over its vendor's quota waits, with no
    /// attempt counted. `None` when Redis cannot say: then the image waits
    /// too (its entry stays pending and is reclaimed).
    async fn within_quota(&self, result: Result<Outcome, StageError>) -> Option<Result<Outcome, StageError>> {
        match result {
            Ok(Outcome::Done(ev)) if self.name == StageName::RateCheck && self.admission.has_quotas() => {
                match self.admission.quota_wait(&ev).await {
                    Ok(0) => Some(Ok(Outcome::Done(ev))),
                    Ok(wait) => Some(Ok(Outcome::Deferred {
                        reason: format!(
                            "the vendor's processing quota is used up; resumes in {} s",
                            wait.div_ceil(1000)
                        ),
                        until_ms: now_ms() + wait,
                        event: ev,
                    })),
                    Err(e) => {
                        warn!(error = %e, "checking quotas failed; the entry stays pending");
                        None
                    }
                }
            }
            other => Some(other),
        }
    }

    /// Turns a handler's result into one atomic step in Redis.
    async fn finish(&self, id: &str, input: ImageEvent, result: Result<Outcome, StageError>) {
        let Some(result) = self.within_quota(result).await else {
            return;
        };
        self.handled.fetch_add(1, Ordering::Relaxed);
        let step = Step::after(self.name, self.fair(), &self.cfg.retry, input, result);
        let counted = step.counted();
        let parks = matches!(step, Step::Park(..));
        let job = step.job().map(str::to_string);
        match self.finisher.run_step(id, step).await {
            Ok(finished) => {
                crate::metrics::record(self.name, counted);
                if finished == Finished::Closed {
                    // A job with no failed image needs its blobs no more; a
                    // failed image's stay for replaying its dead letter,
                    // until the sweep (`blob_ttl_ms`) takes them.
                    if let Some(job) = job {
                        self.drop_blobs_of_completed(&job).await;
                    }
                } else if parks && finished == Finished::Moved {
                    self.parked.notify_one();
                }
            }
            Err(e) => {
                error!(stage = %self.name, entry = id, error = %e, "could not record a result; the entry stays pending")
            }
        }
    }
}

#[async_trait]
impl Work for StageRunner {
    /// Handles one unit of work (one entry, or one batch) to its end.
    async fn handle(self: Arc<Self>, unit: Vec<Delivery>) {
        let mut events = Vec::with_capacity(unit.len());
        for d in unit {
            match d.field(EVENT_FIELD).as_deref().map(ImageEvent::from_json) {
                Some(Ok(ev)) => events.push((d.id, ev)),
                Some(Err(e)) => {
                    self.finisher
                        .dead_letter_raw(&d, &format!("undecodable event: {e}"))
                        .await
                }
                None => self.finisher.dead_letter_raw(&d, "entry has no event").await,
            }
        }
        if events.is_empty() {
            return;
        }
        let started = Instant::now();
        let results = self.call_handler(&events).await;
        crate::metrics::observe_handle(self.name, started.elapsed());
        self.service.lock().unwrap().observe(started.elapsed(), events.len());
        for ((id, ev), result) in events.into_iter().zip(results) {
            let span = info_span!("finish", stage = %self.name, job = %ev.job, image = ev.image,
                vendor = %ev.vendor, trace_id = trace_id_of(&ev));
            self.finish(&id, ev, result).instrument(span).await;
        }
    }

    /// An event whose workers keep dying on it fails for good (its job
    /// learns why); an entry with no readable event is dead-lettered raw.
    async fn poisoned(&self, d: Delivery, delivered: u64) {
        let why = format!("delivered {delivered} times without finishing; its workers kept dying on it");
        match d.field(EVENT_FIELD).as_deref().map(ImageEvent::from_json) {
            Some(Ok(ev)) => self.finish(&d.id, ev, Err(StageError::permanent(why))).await,
            _ => self.finisher.dead_letter_raw(&d, &why).await,
        }
    }
}

/// The trace id of an event's `traceparent`, for spans; empty if none.
fn trace_id_of(ev: &ImageEvent) -> &str {
    ev.traceparent.as_deref().and_then(crate::trace::trace_id).unwrap_or("")
}
