//! Per-vendor webhooks: a signed HTTP call when a job ends, delivered at
//! least once, retried with backoff.
//!
//! A vendor registers a URL and gets a signing secret ([`Webhooks::set`]).
//! When a job of that vendor reaches its terminal state, the very script
//! that closes it appends a notice to the webhook outbox stream (see
//! `close_job_if_done` in `scripts/lib.lua`), so a notice exists exactly when
//! the job ended, whichever process ended it and whatever crashes after.
//! [`run_deliveries`] reads the outbox with a consumer group, hands each
//! notice to a [`WebhookSender`] (the HTTP work lives outside this crate),
//! and then: acknowledges it, or schedules another attempt on the retry set
//! (promoted back into the outbox by one script when due), or gives up after
//! the last attempt. The outcome is written on the job record, where the
//! vendor's status reads show it. Receivers deduplicate on the job id, sent
//! as the delivery id.
//!
//! Deliveries are independent of each other: each runs on its own and is
//! settled as soon as it finishes, at most `concurrency` at once per
//! process and `per_vendor_concurrency` per vendor, so an endpoint that
//! hangs delays only its own vendor's notices (those over its share wait on
//! the retry set a moment, their attempts not counted).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::context::Pipeline;
use crate::now_ms;
use crate::retry::RetryPolicy;
use crate::runner::consumer_name;
use crate::stage::StageError;

const GROUP: &str = "webhooks";

/// A vendor's registration: where to call and the secret to sign with.
#[derive(Clone, Serialize, Deserialize)]
pub struct Webhook {
    pub url: String,
    pub secret: String,
}

impl std::fmt::Debug for Webhook {
    // The secret never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// What a job's end is to its vendor's webhook: the body that is sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobFinished {
    pub event: String,
    pub job_id: String,
    pub status: String,
    pub finished_ms: u64,
    /// 1 for the first try.
    pub attempt: u32,
    /// The images that ended with warnings (a doubtful cutout, no face
    /// found), so that a shop can look at them; absent when none did.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<ImageWarnings>,
}

/// One image's warnings, as its `notes.warnings` holds them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageWarnings {
    pub index: u32,
    pub record_id: String,
    pub warnings: Vec<String>,
}

/// The warnings of a job's images, read from its record.
async fn job_warnings(p: &Pipeline, job_id: &str) -> Vec<ImageWarnings> {
    let job = match crate::jobs::JobStore::new(p.clone(), 0).get(None, job_id).await {
        Ok(Some(job)) => job,
        _ => return Vec::new(),
    };
    job.images
        .iter()
        .filter_map(|i| {
            let list = i.notes.as_ref()?.get("warnings")?.as_array()?;
            let warnings: Vec<String> = list.iter().filter_map(|w| w.as_str().map(String::from)).collect();
            (!warnings.is_empty()).then(|| ImageWarnings {
                index: i.index,
                record_id: i.record_id.clone(),
                warnings,
            })
        })
        .collect()
}

/// Sends one notice; `Ok` with the receiver's HTTP status once it took it.
#[async_trait]
pub trait WebhookSender: Send + Sync + 'static {
    async fn send(&self, hook: &Webhook, delivery_id: &str, body: &[u8]) -> Result<u16, StageError>;
}

/// Vendors' webhook registrations.
#[derive(Clone)]
pub struct Webhooks {
    p: Pipeline,
}

impl Webhooks {
    pub fn new(p: Pipeline) -> Self {
        Webhooks { p }
    }

    /// Registers (or replaces) a vendor's webhook; returns the new signing
    /// secret, which is shown to the vendor once.
    pub async fn set(&self, vendor: &str, url: &str) -> redis::RedisResult<String> {
        let secret = format!("whsec_{}", hex::encode(rand::random::<[u8; 24]>()));
        let hook = Webhook {
            url: url.to_string(),
            secret: secret.clone(),
        };
        let mut conn = self.p.conn.clone();
        let _: () = conn
            .hset(
                self.p.keys.webhooks(),
                vendor,
                serde_json::to_string(&hook).expect("serialisable"),
            )
            .await?;
        Ok(secret)
    }

    /// Removes a vendor's webhook; true if there was one.
    pub async fn remove(&self, vendor: &str) -> redis::RedisResult<bool> {
        let mut conn = self.p.conn.clone();
        let n: u64 = conn.hdel(self.p.keys.webhooks(), vendor).await?;
        Ok(n > 0)
    }

    pub async fn get(&self, vendor: &str) -> redis::RedisResult<Option<Webhook>> {
        let mut conn = self.p.conn.clone();
        let raw: Option<String> = conn.hget(self.p.keys.webhooks(), vendor).await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebhookDeliveryConfig {
    /// Notices sent at once, per process.
    pub concurrency: usize,
    /// Notices of one vendor sent at once, per process: a vendor whose
    /// endpoint hangs holds at most this many of the `concurrency` slots.
    pub per_vendor_concurrency: usize,
    /// Attempts in all and the waits between them: receivers are often
    /// down for minutes, so the default spreads 8 attempts over about
    /// half an hour.
    pub retry: RetryPolicy,
    /// A notice pending this long with a consumer that stopped is taken
    /// over by another.
    pub claim_idle_ms: u64,
    pub read_block_ms: u64,
}

impl Default for WebhookDeliveryConfig {
    fn default() -> Self {
        WebhookDeliveryConfig {
            concurrency: 8,
            per_vendor_concurrency: 2,
            retry: RetryPolicy {
                max_attempts: 8,
                base_ms: 2_000,
                factor: 3.0,
                max_ms: 15 * 60_000,
                jitter: 0.2,
            },
            claim_idle_ms: 60_000,
            read_block_ms: 2_000,
        }
    }
}

/// Delivers the outbox until `shutdown`; any number of these may run, on
/// any hosts.
pub async fn run_deliveries(
    p: Pipeline,
    sender: Arc<dyn WebhookSender>,
    cfg: WebhookDeliveryConfig,
    shutdown: CancellationToken,
) -> redis::RedisResult<()> {
    let keys = &p.keys;
    let outbox = keys.webhook_outbox();
    let mut conn = p.conn.clone();
    let created: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&outbox)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await;
    if let Err(e) = created {
        if e.code() != Some("BUSYGROUP") {
            return Err(e);
        }
    }
    let consumer = consumer_name();
    let mut reader = p.blocking_connection().await?;
    let mut claim_cursor = "0-0".to_string();
    let mut next_claim = 0u64;
    let cfg = Arc::new(cfg);
    // Each delivery runs on its own and is settled as soon as it finishes:
    // a slot is taken per delivery in flight, and a vendor holds at most
    // `per_vendor_concurrency` of them.
    let slots = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let per_vendor = cfg.per_vendor_concurrency.max(1);
    let busy: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let mut in_flight = JoinSet::new();
    info!(consumer, "delivering webhooks");
    while !shutdown.is_cancelled() {
        while let Some(done) = in_flight.try_join_next() {
            if let Err(e) = done {
                warn!(error = %e, "a webhook delivery task failed");
            }
        }
        // Read only what there are free slots for; wait for one if none.
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
            _ = shutdown.cancelled() => break,
        };
        let mut permits = vec![first];
        while let Ok(permit) = slots.clone().try_acquire_owned() {
            permits.push(permit);
        }
        let free = permits.len();
        if let Err(e) = promote_due(&p).await {
            warn!(error = %e, "promoting due webhook retries failed");
        }
        let mut entries = Vec::new();
        let now = now_ms();
        if now >= next_claim {
            // Notices a stopped process was sending.
            let reply: redis::RedisResult<StreamAutoClaimReply> = redis::cmd("XAUTOCLAIM")
                .arg(&outbox)
                .arg(GROUP)
                .arg(&consumer)
                .arg(cfg.claim_idle_ms)
                .arg(&claim_cursor)
                .arg("COUNT")
                .arg(free)
                .query_async(&mut conn)
                .await;
            if let Ok(r) = reply {
                claim_cursor = r.next_stream_id.clone();
                entries.extend(r.claimed);
            }
            next_claim = now + (cfg.claim_idle_ms / 4).max(100);
        }
        if entries.is_empty() {
            // Short enough that due retries are promoted promptly.
            let block = cfg.read_block_ms.min(1_000);
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(GROUP)
                .arg(&consumer)
                .arg("COUNT")
                .arg(free)
                .arg("BLOCK")
                .arg(block)
                .arg("STREAMS")
                .arg(&outbox)
                .arg(">");
            let read = tokio::select! {
                r = cmd.query_async::<Option<StreamReadReply>>(&mut reader) => r,
                _ = shutdown.cancelled() => break,
            };
            match read {
                Ok(r) => entries.extend(r.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids)),
                Err(e) => {
                    warn!(error = %e, "reading the webhook outbox failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            }
        }
        for entry in entries {
            let vendor = entry.get::<String>("vendor").unwrap_or_default();
            let taken = {
                let mut b = busy.lock().unwrap();
                let n = b.entry(vendor.clone()).or_insert(0);
                let free = *n < per_vendor;
                if free {
                    *n += 1;
                }
                free
            };
            if !taken {
                // The vendor's endpoint already has all it may: this notice
                // goes back to the retry set for a moment, its attempt not
                // counted, instead of holding a slot another vendor needs.
                postpone(&p, &entry).await;
                continue;
            }
            let permit = permits.pop().expect("one slot per entry read");
            let (p, sender, cfg, busy) = (p.clone(), sender.clone(), cfg.clone(), busy.clone());
            in_flight.spawn(async move {
                deliver_one(&p, sender.as_ref(), &cfg, entry).await;
                drop(permit);
                let mut b = busy.lock().unwrap();
                if let Some(n) = b.get_mut(&vendor) {
                    *n -= 1;
                    if *n == 0 {
                        b.remove(&vendor);
                    }
                }
            });
        }
    }
    // Deliveries under way get a moment to finish; any still running after
    // it stay pending in the outbox, and a reclaim sends them again (which
    // receivers deduplicate on the delivery id).
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async { while in_flight.join_next().await.is_some() {} });
    if drained.await.is_err() {
        in_flight.shutdown().await;
    }
    Ok(())
}

/// How long deliveries under way may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a notice waits when its vendor has all the deliveries it may.
const POSTPONE_MS: u64 = 500;

/// Puts a notice back on the retry set for [`POSTPONE_MS`], acknowledged
/// in the outbox, with the same attempt number and nothing written on the
/// job. If Redis fails here the notice stays pending, for a reclaim.
async fn postpone(p: &Pipeline, entry: &StreamId) {
    let field = |k: &str| entry.get::<String>(k).unwrap_or_default();
    let member = serde_json::json!({
        "job": field("job"), "vendor": field("vendor"), "status": field("status"),
        "finished_ms": field("finished_ms").parse::<u64>().unwrap_or(0),
        "attempt": field("attempt").parse::<u32>().unwrap_or(1).max(1),
    });
    let settled = settle(p, &entry.id, None, "", &member.to_string(), now_ms() + POSTPONE_MS).await;
    if let Err(e) = settled {
        warn!(error = %e, "postponing a webhook delivery failed");
    }
}

/// Sends one notice and settles it: acknowledged either way, with a retry
/// scheduled when one is worth it. Left pending only if Redis itself
/// failed, for a reclaim to pick up.
async fn deliver_one(p: &Pipeline, sender: &dyn WebhookSender, cfg: &WebhookDeliveryConfig, entry: StreamId) {
    let field = |k: &str| entry.get::<String>(k).unwrap_or_default();
    let (job_id, vendor, status) = (field("job"), field("vendor"), field("status"));
    let finished_ms: u64 = field("finished_ms").parse().unwrap_or(0);
    let attempt: u32 = field("attempt").parse().unwrap_or(1).max(1);
    let hooks = Webhooks::new(p.clone());
    let outcome = match hooks.get(&vendor).await {
        Err(e) => {
            warn!(error = %e, "reading a webhook registration failed");
            return;
        }
        // Removed since the job ended: nothing to deliver.
        Ok(None) => Settled::Dropped,
        Ok(Some(hook)) => {
            let notice = JobFinished {
                event: "job.finished".into(),
                job_id: job_id.clone(),
                status: status.clone(),
                finished_ms,
                attempt,
                warnings: job_warnings(p, &job_id).await,
            };
            let body = serde_json::to_vec(&notice).expect("serialisable");
            match sender.send(&hook, &job_id, &body).await {
                Ok(code) => Settled::Delivered(code),
                Err(e) if e.is_retryable() && cfg.retry.may_retry(attempt) => {
                    let wait = e.retry_after.unwrap_or_else(|| cfg.retry.delay(attempt));
                    Settled::Retry(e.message, wait)
                }
                Err(e) => Settled::Failed(e.message),
            }
        }
    };
    let (record, retry) = match &outcome {
        Settled::Delivered(code) => (format!("delivered: HTTP {code} on attempt {attempt}"), None),
        Settled::Retry(why, wait) => {
            let member = serde_json::json!({
                "job": job_id, "vendor": vendor, "status": status,
                "finished_ms": finished_ms, "attempt": attempt + 1,
            });
            let due = now_ms() + wait.as_millis() as u64;
            let record = format!(
                "retrying: attempt {attempt} failed ({why}); next in {} s",
                wait.as_secs()
            );
            (record, Some((member.to_string(), due)))
        }
        Settled::Failed(why) => (format!("failed after {attempt} attempts: {why}"), None),
        Settled::Dropped => (String::new(), None),
    };
    match &outcome {
        Settled::Failed(why) => warn!(job = %job_id, vendor = %vendor, reason = %why, "a webhook was given up on"),
        Settled::Retry(why, _) => {
            info!(job = %job_id, vendor = %vendor, reason = %why, attempt, "a webhook will be retried")
        }
        _ => {}
    }
    let keys = &p.keys;
    let (member, due) = retry.unwrap_or_default();
    let job = (!job_id.is_empty()).then(|| keys.job(&job_id));
    let settled = settle(p, &entry.id, job, &record, &member, due).await;
    if let Err(e) = settled {
        // Left pending: a reclaim sends it again, which receivers dedupe.
        warn!(error = %e, "settling a webhook delivery failed");
    }
}

enum Settled {
    Delivered(u16),
    Retry(String, Duration),
    Failed(String),
    Dropped,
}

/// Moves due retries back into the outbox, atomically per notice.
async fn promote_due(p: &Pipeline) -> redis::RedisResult<u64> {
    let mut conn = p.conn.clone();
    p.scripts
        .promote_webhooks
        .key(p.keys.webhook_retries())
        .key(p.keys.webhook_outbox())
        .arg(now_ms())
        .arg(100)
        .invoke_async(&mut conn)
        .await
}

/// `settle_webhook.lua`: acknowledges outbox entry `entry_id`, schedules
/// `retry_member` at `due_ms` ('' for no retry) and writes `outcome` on
/// the job record `job` when there is one. A job it does not know is
/// left out of KEYS, not passed as an empty key (which a cluster refuses
/// as a cross-slot call).
async fn settle(
    p: &Pipeline,
    entry_id: &str,
    job: Option<String>,
    outcome: &str,
    retry_member: &str,
    due_ms: u64,
) -> redis::RedisResult<()> {
    let mut inv = p.scripts.settle_webhook.prepare_invoke();
    inv.key(p.keys.webhook_outbox()).key(p.keys.webhook_retries());
    if let Some(job) = job {
        inv.key(job);
    }
    inv.arg(GROUP).arg(entry_id).arg(outcome).arg(retry_member).arg(due_ms);
    inv.invoke_async(&mut p.conn.clone()).await
}
