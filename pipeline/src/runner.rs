//! The stage runner: drives one stage's handler from its stream.
//!
//! One reader per process reads batches with `XREADGROUP` on a connection of
//! its own, only as many entries as it has free slots (so entries never sit
//! in this consumer's pending list while other consumers idle). Each entry
//! is handled in a task that renews its claim while it runs; its result is
//! turned into one atomic step in Redis: hand off to the next stage, complete
//! the image, schedule a retry, or dead-letter it. Hand-offs and completions,
//! the steps of every event that goes well, are gathered by one finisher
//! per runner and run as one script call per batch: whatever finished while
//! the previous call was on its way goes in the next, so a busy stage pays
//! one round trip (and one script) for many events and an idle one waits
//! for no timer. Before it reads new entries, the reader takes back, with
//! every free slot, entries orphaned by dead consumers (`XAUTOCLAIM`).
//! Alongside, a maintenance loop promotes due retries, trims acknowledged
//! entries, reaps idle consumers and publishes this worker's heartbeat.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use std::panic::AssertUnwindSafe;

use backon::{ExponentialBuilder, Retryable};
use futures::FutureExt;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use crate::admission::{Admission, Reconciled, WindowSettings};
pub use crate::context::Pipeline;
use crate::event::{ImageEvent, StageName};
use crate::now_ms;
use crate::retry::RetryPolicy;
use crate::scripts::{DeadLetter, Finish, FinishBatch, Finished, ScheduleRetry, Waiting};
use crate::stage::{ErrorClass, Outcome, Stage, StageError};

/// How one stage runs in this process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerConfig {
    /// Events (or batches, for a batching stage) handled at once.
    pub concurrency: usize,
    /// How long one `XREADGROUP` blocks waiting for entries.
    pub read_block_ms: u64,
    /// An entry pending this long without its claim being renewed is taken
    /// to be orphaned by a dead consumer and reclaimed by a live one.
    pub claim_idle_ms: u64,
    /// How often to look for orphaned entries.
    pub reclaim_every_ms: u64,
    pub retry: RetryPolicy,
    /// Time one attempt at one event may take (60 s, as Bull's jobs had).
    pub timeout_ms: u64,
    /// On SIGTERM: how long in-flight work may take to finish.
    pub shutdown_grace_ms: u64,
    /// How often to trim acknowledged entries from the stream.
    pub trim_every_ms: u64,
    /// Consumers idle this long with nothing pending are removed.
    pub reap_idle_ms: u64,
    /// Dead-letter stream length kept (approximately).
    pub dead_letter_max: u64,
    /// An entry delivered this many times without finishing (its worker
    /// keeps dying on it) is dead-lettered rather than reclaimed again.
    pub max_deliveries: u64,
    /// Blobs of jobs older than this are swept even if the job never ended.
    pub blob_ttl_ms: u64,
    /// A completed job's blobs are deleted this long after its end instead
    /// of at once. After a Redis failover the new primary may redo a step
    /// the old one had finished (its end not yet replicated), and that step
    /// must still find its blobs: with replicas, set this above the time a
    /// failover takes (e.g. 60000).
    pub blob_linger_ms: u64,
    /// Per-vendor processing quotas, by operation: images per
    /// `quota_window_ms`. An image over quota is deferred (status
    /// `throttled`, with the time it resumes), never failed.
    pub quotas: std::collections::BTreeMap<String, u64>,
    /// The window of the processing quotas (one hour).
    pub quota_window_ms: u64,
    /// Fair scheduling: at most this many images are in flight downstream
    /// of rate-check, admitted from vendors' queues in weighted round-robin.
    /// With `admission_adaptive` (the default) this is a ceiling and the
    /// window sizes itself from the workers' measurements; without it, the
    /// window. 0 turns fair scheduling off (plain FIFO).
    pub admission_window: u64,
    /// Size the admission window from what the workers measure (their live
    /// slots and time per image), every second.
    pub admission_adaptive: bool,
    /// With an adaptive window: the most a vendor's first image should wait
    /// behind images already admitted (less when the stages themselves take
    /// less time per image).
    pub admission_target_ms: u64,
    /// How often rate-check corrects the admission counter from the true
    /// count of images in flight downstream (logging any drift it repairs).
    pub reconcile_every_ms: u64,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            concurrency: 4,
            read_block_ms: 1_000,
            claim_idle_ms: 30_000,
            reclaim_every_ms: 2_000,
            retry: RetryPolicy::default(),
            timeout_ms: 60_000,
            shutdown_grace_ms: 25_000,
            trim_every_ms: 5_000,
            reap_idle_ms: 3_600_000,
            dead_letter_max: 100_000,
            max_deliveries: 10,
            blob_ttl_ms: 2 * 86_400_000,
            blob_linger_ms: 0,
            admission_window: 1_000,
            admission_adaptive: true,
            admission_target_ms: 500,
            quotas: std::collections::BTreeMap::new(),
            quota_window_ms: 3_600_000,
            reconcile_every_ms: 30_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// One entry read from the stream.
struct Delivery {
    id: String,
    payload: Option<String>,
}

/// What a worker tells the world about itself, every few seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub consumer: String,
    pub stage: String,
    pub host: String,
    pub pid: u32,
    pub concurrency: usize,
    pub in_flight: usize,
    pub last_seen_ms: u64,
    /// Milliseconds an event spends in the handler, lately (none handled yet:
    /// `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ms: Option<f64>,
    /// Events per second this worker can finish with all its slots busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_per_s: Option<f64>,
    /// When it last finished handling something.
    #[serde(default)]
    pub last_handled_ms: u64,
    /// The cores this worker's process may run on.
    #[serde(default)]
    pub cores: usize,
    /// What the stage measures of its own work (see [`Stage::measures`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub measures: std::collections::BTreeMap<String, f64>,
}

pub struct StageRunner {
    p: Pipeline,
    stage: Arc<dyn Stage>,
    name: StageName,
    cfg: RunnerConfig,
    consumer: String,
    stream: String,
    slots: Arc<Semaphore>,
    in_flight: Mutex<HashSet<String>>,
    handled: AtomicUsize,
    /// Woken when this process parks an image, so the dispatcher runs at once.
    parked: tokio::sync::Notify,
    /// Steps on their way to the finisher, which runs them in batches.
    finishing: mpsc::UnboundedSender<Finishing>,
    finishing_rx: Mutex<Option<mpsc::UnboundedReceiver<Finishing>>>,
    /// The fair scheduler's calls (rate-check's quotas and dispatch).
    admission: Admission,
    /// How long this runner's handler takes, for the heartbeat.
    service: Mutex<ServiceTime>,
}

/// Events finished in one script call, at most.
const MAX_FINISH_BATCH: usize = 256;

/// A hand-off, park or completion waiting for the finisher, and where the
/// script's verdict on it goes (see `finish.lua` for the codes).
struct Finishing {
    id: String,
    step: Step,
    done: oneshot::Sender<Result<Finished, String>>,
}

/// A unique consumer name: host, pid and a random suffix, so two processes
/// (or two runners of one stage in a process) never share a pending list.
pub fn consumer_name() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}-{:06x}", std::process::id(), rand::random::<u32>() & 0xffffff)
}

/// Creates a stage's consumer group (and its stream) if missing.
pub async fn ensure_group(p: &Pipeline, stage: StageName) -> redis::RedisResult<()> {
    let mut conn = p.conn.clone();
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(p.keys.stream(stage))
        .arg(p.keys.group(stage))
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

impl StageRunner {
    pub fn new(p: Pipeline, stage: Arc<dyn Stage>, cfg: RunnerConfig) -> Arc<Self> {
        let name = stage.name();
        let (finishing, finishing_rx) = mpsc::unbounded_channel();
        Arc::new(StageRunner {
            stream: p.keys.stream(name),
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
            service: Mutex::new(ServiceTime::default()),
            p,
            name,
            slots: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            cfg,
            stage,
            consumer: consumer_name(),
            in_flight: Mutex::new(HashSet::new()),
            handled: AtomicUsize::new(0),
            parked: tokio::sync::Notify::new(),
            finishing,
            finishing_rx: Mutex::new(Some(finishing_rx)),
        })
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    fn group(&self) -> &'static str {
        self.p.keys.group(self.name)
    }

    fn fair(&self) -> bool {
        self.name == StageName::RateCheck && self.cfg.admission_window > 0
    }

    fn per_slot(&self) -> usize {
        self.stage.batching().map(|b| b.max_events.max(1)).unwrap_or(1)
    }

    /// Runs until `shutdown` is cancelled, then stops reading, lets in-flight
    /// work finish within the grace period and hands back what did not.
    /// The whole stop takes the grace period at most, even with Redis gone:
    /// what could not be finished or handed back stays pending, and a live
    /// consumer reclaims it once it has been idle `claim_idle_ms`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) -> Result<(), RunnerError> {
        ensure_group(&self.p, self.name).await?;
        info!(stage = %self.name, consumer = %self.consumer, concurrency = self.cfg.concurrency, "worker started");
        let mut tasks = JoinSet::new();
        let maintenance = tokio::spawn(self.clone().maintain(shutdown.clone()));
        // Renewal outlives the reader: in-flight work keeps its claims
        // through the shutdown grace period.
        let renew_stop = CancellationToken::new();
        let renewer = tokio::spawn(self.clone().renew_claims(renew_stop.clone()));
        // So does the finisher: in-flight work finishes through it.
        let finishing = self.finishing_rx.lock().unwrap().take().expect("a runner runs once");
        let finisher = tokio::spawn(self.clone().finisher(finishing, renew_stop.clone()));
        let dispatcher = self
            .fair()
            .then(|| tokio::spawn(self.clone().dispatch_loop(shutdown.clone())));
        let mut reader = self.p.blocking_connection().await?;
        let mut reclaim = Reclaimer::new(Duration::from_millis(self.cfg.reclaim_every_ms));
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = self.slots.clone().acquire_owned() => p.expect("semaphore never closes"),
            };
            let mut permits = vec![first];
            while let Ok(p) = self.slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            // Orphaned entries come first, with every free slot: a dead
            // consumer's whole pending list is taken back in a few rounds,
            // not one entry per reclaim period.
            if reclaim.due() {
                match self.reclaim(&mut reclaim, permits.len()).await {
                    Ok(fresh) if !fresh.is_empty() => {
                        info!(stage = %self.name, count = fresh.len(), "reclaimed orphaned entries");
                        self.dispatch(fresh, permits, &mut tasks);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        reclaim.scanned("0-0", false);
                        debug!(stage = %self.name, error = %e, "reclaiming failed");
                    }
                }
            }
            // The read is not cancelled on shutdown: entries it returns are
            // already in our pending list and must be handed back, not lost.
            // A read that outlives its BLOCK by far is on a dead connection
            // (Redis restarted under it): drop that connection for a new one.
            let limit = Duration::from_millis(self.cfg.read_block_ms * 2 + 5_000);
            let read = tokio::time::timeout(limit, self.read(&mut reader, permits.len())).await;
            let entries = match read {
                Ok(Ok(e)) => e,
                failed => {
                    drop(permits);
                    match failed {
                        Ok(Err(e)) if e.code() == Some("NOGROUP") => {
                            // The stream or group is gone (Redis lost its data,
                            // or someone deleted it): create it again.
                            warn!(stage = %self.name, "consumer group missing; creating it again");
                            ensure_group(&self.p, self.name).await.ok();
                        }
                        Ok(Err(e)) => warn!(stage = %self.name, error = %e, "reading the stream failed; retrying"),
                        _ => warn!(stage = %self.name, "a read hung; reconnecting"),
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        fresh = self.p.blocking_connection() => {
                            if let Ok(fresh) = fresh {
                                reader = fresh;
                            }
                        }
                    }
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                self.release(entries.iter().map(|d| d.id.clone()).collect()).await;
                break;
            }
            self.dispatch(entries, permits, &mut tasks);
            // Reap finished tasks so the set does not grow without bound.
            while tasks.try_join_next().is_some() {}
        }
        info!(stage = %self.name, "stopping: finishing in-flight work");
        let grace_end = tokio::time::Instant::now() + Duration::from_millis(self.cfg.shutdown_grace_ms);
        if tokio::time::timeout_at(grace_end, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            let left: Vec<String> = self.in_flight.lock().unwrap().drain().collect();
            warn!(stage = %self.name, abandoned = left.len(), "grace period over; handing back unfinished entries");
            self.release(left).await;
        }
        renew_stop.cancel();
        // The helpers stop at once when Redis answers; when it does not, they
        // are not waited for past the grace period (nothing they hold is lost:
        // unacknowledged entries stay pending).
        let helpers = [Some(maintenance), Some(renewer), Some(finisher), dispatcher];
        for mut h in helpers.into_iter().flatten() {
            let last_call = grace_end.max(tokio::time::Instant::now() + Duration::from_millis(100));
            if tokio::time::timeout_at(last_call, &mut h).await.is_err() {
                h.abort();
            }
        }
        let mut conn = self.p.conn.clone();
        let bye = conn.hdel::<_, _, ()>(self.p.keys.workers(), &self.consumer);
        tokio::time::timeout(Duration::from_secs(1), bye).await.ok();
        info!(stage = %self.name, handled = self.handled.load(Ordering::Relaxed), "worker stopped");
        Ok(())
    }

    /// Reads up to `slots` units of work; a batching stage waits up to its
    /// `max_wait` for a batch to fill.
    async fn read(&self, reader: &mut crate::Conn, slots: usize) -> redis::RedisResult<Vec<Delivery>> {
        let want = slots * self.per_slot();
        let mut out = self.xreadgroup(reader, want, self.cfg.read_block_ms).await?;
        if let Some(b) = self.stage.batching() {
            let deadline = Instant::now() + b.max_wait;
            while !out.is_empty() && out.len() < want {
                let left = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
                if left == 0 {
                    break;
                }
                let more = self.xreadgroup(reader, want - out.len(), left).await?;
                if more.is_empty() {
                    break;
                }
                out.extend(more);
            }
        }
        Ok(out)
    }

    async fn xreadgroup(
        &self,
        reader: &mut crate::Conn,
        count: usize,
        block_ms: u64,
    ) -> redis::RedisResult<Vec<Delivery>> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(self.group())
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(reader)
            .await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).map(to_delivery).collect())
            .unwrap_or_default())
    }

    fn dispatch(self: &Arc<Self>, entries: Vec<Delivery>, permits: Vec<OwnedSemaphorePermit>, tasks: &mut JoinSet<()>) {
        let per = self.per_slot();
        let mut permits = permits.into_iter();
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let unit: Vec<Delivery> = entries.by_ref().take(per).collect();
            let permit = permits.next().expect("never read more than the free slots");
            {
                let mut f = self.in_flight.lock().unwrap();
                f.extend(unit.iter().map(|d| d.id.clone()));
            }
            let me = self.clone();
            tasks.spawn(async move {
                me.process(unit).await;
                drop(permit);
            });
        }
        // Unused permits return to the semaphore here.
    }

    /// Handles one unit of work (one entry, or one batch) to its end.
    async fn process(self: &Arc<Self>, unit: Vec<Delivery>) {
        let ids: Vec<String> = unit.iter().map(|d| d.id.clone()).collect();
        let mut events = Vec::with_capacity(unit.len());
        for d in unit {
            match d.payload.as_deref().map(ImageEvent::from_json) {
                Some(Ok(ev)) => events.push((d.id, ev)),
                Some(Err(e)) => self.dead_letter_raw(&d, &format!("undecodable event: {e}")).await,
                None => self.dead_letter_raw(&d, "entry has no event").await,
            }
        }
        if !events.is_empty() {
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
        let mut f = self.in_flight.lock().unwrap();
        for id in &ids {
            f.remove(id);
        }
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

    /// Keeps long handlers' entries from being reclaimed while this worker
    /// is alive, by claiming every in-flight entry to ourselves again (which
    /// resets its idle time), all in one command.
    async fn renew_claims(self: Arc<Self>, shutdown: CancellationToken) {
        let every = Duration::from_millis((self.cfg.claim_idle_ms / 3).max(10));
        let mut conn = self.p.conn.clone();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let ids: Vec<String> = self.in_flight.lock().unwrap().iter().cloned().collect();
            for chunk in ids.chunks(1000) {
                let r: redis::RedisResult<redis::Value> = redis::cmd("XCLAIM")
                    .arg(&self.stream)
                    .arg(self.group())
                    .arg(&self.consumer)
                    .arg(0)
                    .arg(chunk)
                    .arg("JUSTID")
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = r {
                    warn!(stage = %self.name, error = %e, "renewing claims failed");
                }
            }
        }
    }

    /// Turns a handler's result into one atomic step in Redis.
    async fn finish(&self, id: &str, input: ImageEvent, result: Result<Outcome, StageError>) {
        // Admission control: an image over its vendor's quota waits, with
        // no attempt counted. If Redis cannot say, the image waits too: the
        // entry stays pending and is reclaimed.
        let result = match result {
            Ok(Outcome::Done(ev)) if self.name == StageName::RateCheck && self.admission.has_quotas() => {
                match self.admission.quota_wait(&ev).await {
                    Ok(0) => Ok(Outcome::Done(ev)),
                    Ok(wait) => {
                        let until_ms = now_ms() + wait;
                        Ok(Outcome::Deferred {
                            reason: format!(
                                "the vendor's processing quota is used up; resumes in {} s",
                                wait.div_ceil(1000)
                            ),
                            until_ms,
                            event: ev,
                        })
                    }
                    Err(e) => {
                        warn!(error = %e, "checking quotas failed; the entry stays pending");
                        return;
                    }
                }
            }
            other => other,
        };
        self.handled.fetch_add(1, Ordering::Relaxed);
        let step = match result {
            Ok(Outcome::Done(mut ev)) => {
                ev.kind = self.name.done_kind();
                ev.attempt = 0;
                match self.name.next(&ev.ops) {
                    Some(next) if self.fair() => {
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
                let mut delay = self.cfg.retry.delay(1);
                if let Some(after) = err.retry_after {
                    delay = delay.max(after);
                }
                debug!(stage = %self.name, error = %err, ?delay, "a service is unavailable; retrying later");
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
                if err.is_retryable() && self.cfg.retry.may_retry(failed) {
                    let mut delay = self.cfg.retry.delay(failed);
                    if let Some(after) = err.retry_after {
                        delay = delay.max(after);
                    }
                    debug!(stage = %self.name, error = %err, failed, ?delay, "retrying later");
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
                    warn!(stage = %self.name, error = %err, failed, "dead-lettering");
                    Step::Dead {
                        error: err.message,
                        attempts: failed,
                        event: input,
                    }
                }
            }
        };
        // Redis may be briefly unreachable (a restart, a failover): keep
        // trying rather than redo finished work. If it stays away, the entry
        // stays pending and is reclaimed later; nothing is acknowledged early.
        let counted = step.counted();
        let parks = matches!(step, Step::Park(..));
        let job = step.job().map(str::to_string);
        let r = match step {
            Step::Handoff(..) | Step::Park(..) | Step::Complete(_) => {
                let (done, verdict) = oneshot::channel();
                let sent = self.finishing.send(Finishing {
                    id: id.to_string(),
                    step,
                    done,
                });
                match sent {
                    Ok(()) => verdict.await.unwrap_or_else(|_| Err("the finisher stopped".into())),
                    Err(_) => Err("the finisher stopped".into()),
                }
            }
            step => {
                let attempt = || async { self.apply(id, &step).await };
                attempt
                    .retry(redis_outage())
                    .await
                    .map(|()| Finished::Moved)
                    .map_err(|e| e.to_string())
            }
        };
        match r {
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

    /// Runs hand-offs, parks and completions in batches, until `stop`
    /// (which comes once no work is left in flight).
    async fn finisher(self: Arc<Self>, mut queue: mpsc::UnboundedReceiver<Finishing>, stop: CancellationToken) {
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
                    warn!(stage = %self.name, error = %e, events = batch.len(), "a batch failed; finishing its events one by one");
                    for f in batch.drain(..) {
                        let one = std::slice::from_ref(&f);
                        let attempt = || async { self.finish_batch(one).await };
                        let r = attempt.retry(redis_outage()).when(is_outage).await;
                        let _ = f.done.send(verdict(r).map(|outcomes| outcomes[0]));
                    }
                }
                r => match verdict(r) {
                    Ok(outcomes) => {
                        for (f, outcome) in batch.drain(..).zip(outcomes) {
                            let _ = f.done.send(Ok(outcome));
                        }
                    }
                    Err(why) => {
                        for f in batch.drain(..) {
                            let _ = f.done.send(Err(why.clone()));
                        }
                    }
                },
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
            stage: self.name,
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
                    stage: self.name,
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
                    stage: self.name,
                    entry_id: id,
                    payload: &event.to_json(),
                    job_id: Some(&event.job),
                    vendor: &event.vendor,
                    image: event.image,
                    error,
                    attempts: *attempts,
                    held_slot: event.slot,
                    max_len: self.cfg.dead_letter_max,
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
    async fn dead_letter_raw(&self, d: &Delivery, why: &str) {
        error!(stage = %self.name, entry = %d.id, why, "dead-lettering an unreadable entry");
        let r = DeadLetter {
            stage: self.name,
            entry_id: &d.id,
            payload: d.payload.as_deref().unwrap_or(""),
            job_id: None,
            vendor: "",
            image: 0,
            error: why,
            attempts: 1,
            held_slot: false,
            max_len: self.cfg.dead_letter_max,
        }
        .run(&self.p)
        .await;
        match r {
            Ok(_) => crate::metrics::record(self.name, crate::metrics::Counted::Dead),
            Err(e) => error!(error = %e, "dead-lettering failed; the entry stays pending"),
        }
    }

    /// Hands entries back without acknowledging them: marks them long idle,
    /// so that a live consumer's next reclaim takes them at once.
    async fn release(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let mut conn = self.p.conn.clone();
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.stream)
            .arg(self.group())
            .arg(&self.consumer)
            .arg(0)
            .arg(&ids)
            .arg("IDLE")
            .arg(self.cfg.claim_idle_ms.saturating_mul(1000))
            .arg("JUSTID");
        let call = cmd.query_async::<redis::Value>(&mut conn);
        // Bounded: a shutdown with Redis gone must not wait for it.
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Err(_) => {
                warn!(stage = %self.name, "handing back entries timed out; they will be reclaimed after the idle time")
            }
            Ok(Ok(_)) => info!(stage = %self.name, count = ids.len(), "handed back unfinished entries"),
            Ok(Err(e)) => {
                warn!(stage = %self.name, error = %e, "handing back entries failed; they will be reclaimed after the idle time")
            }
        }
    }

    /// The background chores of a worker, until shutdown.
    async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let trim_every = Duration::from_millis(self.cfg.trim_every_ms);
        let mut next_trim = Instant::now() + trim_every;
        let mut next_beat = Instant::now();
        let mut next_reap = Instant::now() + Duration::from_secs(60);
        let mut next_sweep = Instant::now() + Duration::from_secs(600);
        let mut next_linger_check = Instant::now();
        let reconcile_every = Duration::from_millis(self.cfg.reconcile_every_ms.max(1_000));
        let mut next_reconcile = Instant::now() + reconcile_every;
        loop {
            let mut wait = Duration::from_millis(250);
            match self.promote().await {
                Ok(Some(due)) => wait = wait.min(Duration::from_millis(due.saturating_sub(now_ms()).max(5))),
                Ok(None) => {}
                Err(e) => debug!(error = %e, "promoting retries failed"),
            }
            let now = Instant::now();
            if now >= next_trim {
                next_trim = now + trim_every;
                let mut conn = self.p.conn.clone();
                let r: redis::RedisResult<i64> = self.p.scripts.trim.key(&self.stream).invoke_async(&mut conn).await;
                match r {
                    Ok(n) if n > 0 => debug!(stage = %self.name, trimmed = n, "trimmed"),
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "trimming failed"),
                }
            }
            if now >= next_beat {
                next_beat = now + Duration::from_secs(2);
                self.heartbeat().await;
            }
            if now >= next_reap {
                next_reap = now + Duration::from_secs(60);
                let mut conn = self.p.conn.clone();
                let r: redis::RedisResult<i64> = self
                    .p
                    .scripts
                    .reap_consumers
                    .key(&self.stream)
                    .arg(self.group())
                    .arg(self.cfg.reap_idle_ms)
                    .arg(&self.consumer)
                    .invoke_async(&mut conn)
                    .await;
                if let Ok(n) = r {
                    if n > 0 {
                        info!(stage = %self.name, removed = n, "removed idle consumers");
                    }
                }
            }
            if now >= next_reconcile && self.fair() {
                next_reconcile = now + reconcile_every;
                match crate::admission::reconcile(&self.p).await {
                    Ok(Reconciled::Repaired { in_flight, counter_was }) => {
                        warn!(
                            in_flight,
                            counter_was, "the admission counter had drifted; corrected it"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "reconciling the admission counter failed"),
                }
            }
            // Once a second: a linger is meant in tens of seconds.
            if self.name == StageName::RateCheck && self.cfg.blob_linger_ms > 0 && now >= next_linger_check {
                next_linger_check = now + Duration::from_secs(1);
                self.delete_lingering_blobs().await;
            }
            if now >= next_sweep && self.name == StageName::RateCheck {
                next_sweep = now + Duration::from_secs(600);
                match self.p.blobs.sweep(Duration::from_millis(self.cfg.blob_ttl_ms)).await {
                    Ok(n) if n > 0 => info!(removed = n, "swept expired blobs"),
                    _ => {}
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Deletes a completed job's blobs, at once or, with `blob_linger_ms`,
    /// by scheduling their deletion (see [`StageRunner::delete_lingering_blobs`]).
    async fn drop_blobs_of_completed(&self, job: &str) {
        if self.cfg.blob_linger_ms == 0 {
            if let Err(e) = self.p.blobs.delete_job(job).await {
                warn!(job, error = %e, "removing a finished job's blobs failed");
            }
            return;
        }
        let mut conn = self.p.conn.clone();
        let due = now_ms() + self.cfg.blob_linger_ms;
        let r: redis::RedisResult<()> = conn.zadd(self.p.keys.blob_deletions(), job, due).await;
        if let Err(e) = r {
            // The sweep (`blob_ttl_ms`) takes them in the end.
            warn!(job, error = %e, "scheduling a finished job's blob deletion failed");
        }
    }

    /// Deletes the blobs of jobs whose linger is over (rate-check's chore).
    async fn delete_lingering_blobs(&self) {
        let mut conn = self.p.conn.clone();
        let key = self.p.keys.blob_deletions();
        let due: redis::RedisResult<Vec<String>> = redis::cmd("ZRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now_ms())
            .arg("LIMIT")
            .arg(0)
            .arg(100)
            .query_async(&mut conn)
            .await;
        for job in due.unwrap_or_default() {
            match self.p.blobs.delete_job(&job).await {
                Ok(()) => {
                    let _: redis::RedisResult<()> = conn.zrem(&key, &job).await;
                }
                Err(e) => warn!(job, error = %e, "removing a finished job's blobs failed; will try again"),
            }
        }
    }

    /// The fair scheduler: keeps the admission window filled from vendors'
    /// queues. It runs at once when this process parks an image, and polls
    /// briefly while images wait (slots free up in other processes).
    async fn dispatch_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut failing = false;
        let mut next_sizing = Instant::now();
        loop {
            if Instant::now() >= next_sizing {
                next_sizing = Instant::now() + Duration::from_secs(1);
                if let Err(e) = self.admission.resize_window().await {
                    debug!(error = %e, "sizing the admission window failed");
                }
            }
            let r = self.admission.dispatch().await;
            let wait = match r {
                Ok(d) if d.moved > 0 => {
                    failing = false;
                    continue;
                }
                Ok(d) if d.vendors_waiting > 0 => Duration::from_millis(2),
                Ok(_) => Duration::from_millis(250),
                Err(e) => {
                    // Not only at debug: while dispatch fails, no vendor's
                    // image is admitted. Once per failing streak.
                    if !failing {
                        warn!(error = %e, "dispatching failed");
                    }
                    failing = true;
                    Duration::from_millis(250)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.parked.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Moves due retries back onto the stream; returns when the next is due.
    async fn promote(&self) -> redis::RedisResult<Option<u64>> {
        let mut conn = self.p.conn.clone();
        let (_moved, next): (i64, i64) = self
            .p
            .scripts
            .promote
            .key(self.p.keys.retries(self.name))
            .key(&self.stream)
            .arg(now_ms())
            .arg(200)
            .invoke_async(&mut conn)
            .await?;
        Ok((next >= 0).then_some(next as u64))
    }

    /// Takes over entries left pending by consumers that stopped renewing
    /// them (they died): as many as `slots` free slots can handle. An entry
    /// delivered too often (its workers keep dying on it) is dead-lettered
    /// instead. Returns the entries to handle.
    async fn reclaim(&self, r: &mut Reclaimer, slots: usize) -> redis::RedisResult<Vec<Delivery>> {
        let want = slots * self.per_slot();
        let mut conn = self.p.conn.clone();
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(self.group())
            .arg(&self.consumer)
            .arg(self.cfg.claim_idle_ms)
            .arg(&r.cursor)
            .arg("COUNT")
            .arg(want)
            .query_async(&mut conn)
            .await?;
        r.scanned(&reply.next_stream_id, reply.claimed.len() >= want);
        if !reply.deleted_ids.is_empty() {
            warn!(stage = %self.name, count = reply.deleted_ids.len(), "pending entries had been deleted from the stream");
        }
        if reply.claimed.is_empty() {
            return Ok(Vec::new());
        }
        // How often has each been delivered? An entry whose workers keep
        // dying on it is a poison pill: dead-letter it instead of looping.
        let mut pipe = redis::pipe();
        for e in &reply.claimed {
            pipe.cmd("XPENDING")
                .arg(&self.stream)
                .arg(self.group())
                .arg(&e.id)
                .arg(&e.id)
                .arg(1);
        }
        let counts: Vec<Vec<(String, String, u64, u64)>> = pipe.query_async(&mut conn).await?;
        let mut fresh = Vec::new();
        for (entry, info) in reply.claimed.into_iter().zip(counts) {
            let delivered = info.first().map(|i| i.3).unwrap_or(0);
            let d = to_delivery(entry);
            if delivered > self.cfg.max_deliveries {
                let why = format!("delivered {delivered} times without finishing; its workers kept dying on it");
                match d.payload.as_deref().map(ImageEvent::from_json) {
                    Some(Ok(ev)) => self.finish(&d.id, ev, Err(StageError::permanent(why))).await,
                    _ => self.dead_letter_raw(&d, &why).await,
                }
            } else {
                fresh.push(d);
            }
        }
        Ok(fresh)
    }

    async fn heartbeat(&self) {
        let beat = Heartbeat {
            consumer: self.consumer.clone(),
            stage: self.name.as_str().to_string(),
            host: hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            pid: std::process::id(),
            concurrency: self.cfg.concurrency,
            in_flight: self.in_flight.lock().map(|f| f.len()).unwrap_or(0),
            last_seen_ms: now_ms(),
            service_ms: None,
            capacity_per_s: None,
            last_handled_ms: 0,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            measures: self.stage.measures(),
        };
        let beat = self.service.lock().unwrap().describe(beat, self.cfg.concurrency);
        let mut conn = self.p.conn.clone();
        let _: redis::RedisResult<()> = conn
            .hset(
                self.p.keys.workers(),
                &self.consumer,
                serde_json::to_string(&beat).unwrap_or_default(),
            )
            .await;
    }
}

enum Step {
    Handoff(StageName, ImageEvent),
    Park(StageName, ImageEvent),
    Complete(ImageEvent),
    Retry {
        due_ms: u64,
        waiting: Waiting,
        reason: String,
        attempts: u32,
        event: ImageEvent,
    },
    Dead {
        error: String,
        attempts: u32,
        event: ImageEvent,
    },
}

impl Step {
    fn counted(&self) -> crate::metrics::Counted {
        use crate::metrics::Counted;
        match self {
            Step::Handoff(..) | Step::Park(..) | Step::Complete(_) => Counted::Processed,
            Step::Retry { waiting, .. } => waiting.counted(),
            Step::Dead { .. } => Counted::Dead,
        }
    }

    fn job(&self) -> Option<&str> {
        match self {
            Step::Complete(ev) | Step::Dead { event: ev, .. } => Some(&ev.job),
            _ => None,
        }
    }
}

/// How long the handler takes per event, as a moving average, for the
/// heartbeat (the admission window is sized from it).
#[derive(Default)]
struct ServiceTime {
    /// Milliseconds one unit of work (an event, or a batch) takes.
    unit_ms: Option<f64>,
    /// Events in a unit.
    per_unit: f64,
    last_ms: u64,
}

impl ServiceTime {
    /// Weight of the newest sample: the average follows a change within
    /// a few dozen events, and one odd image does not swing it.
    const ALPHA: f64 = 0.1;

    fn observe(&mut self, took: Duration, events: usize) {
        let ms = took.as_secs_f64() * 1000.0;
        let n = events.max(1) as f64;
        match self.unit_ms {
            None => {
                self.unit_ms = Some(ms);
                self.per_unit = n;
            }
            Some(avg) => {
                self.unit_ms = Some(avg + Self::ALPHA * (ms - avg));
                self.per_unit += Self::ALPHA * (n - self.per_unit);
            }
        }
        self.last_ms = now_ms();
    }

    fn describe(&self, mut beat: Heartbeat, concurrency: usize) -> Heartbeat {
        if let Some(unit_ms) = self.unit_ms {
            let unit_ms = unit_ms.max(0.01);
            beat.service_ms = Some(unit_ms);
            beat.capacity_per_s = Some(concurrency as f64 * self.per_unit * 1000.0 / unit_ms);
            beat.last_handled_ms = self.last_ms;
        }
        beat
    }
}

/// When the reader next looks for orphaned entries, and where in the
/// pending list it goes on from.
struct Reclaimer {
    every: Duration,
    next: Instant,
    /// `XAUTOCLAIM`'s cursor: "0-0" starts a new pass over the pending list.
    cursor: String,
}

impl Reclaimer {
    fn new(every: Duration) -> Self {
        // At once on start: a worker restarted after a crash takes back
        // what the crash left (once idle), without waiting a period.
        Reclaimer {
            every,
            next: Instant::now(),
            cursor: "0-0".into(),
        }
    }

    fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// After one `XAUTOCLAIM`: a pass that filled its batch, or has more of
    /// the pending list to scan, goes on at once; a finished pass waits a
    /// period.
    fn scanned(&mut self, cursor: &str, full: bool) {
        self.cursor = cursor.to_string();
        if !full && self.cursor == "0-0" {
            self.next = Instant::now() + self.every;
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

/// `finish.lua`'s codes for `n` events, or why there are none.
fn verdict(r: redis::RedisResult<Vec<Finished>>) -> Result<Vec<Finished>, String> {
    r.map_err(|e| e.to_string())
}

/// The trace id of an event's `traceparent`, for spans; empty if none.
fn trace_id_of(ev: &ImageEvent) -> &str {
    ev.traceparent.as_deref().and_then(crate::trace::trace_id).unwrap_or("")
}

fn to_delivery(entry: StreamId) -> Delivery {
    Delivery {
        payload: entry.get::<String>("e"),
        id: entry.id,
    }
}
