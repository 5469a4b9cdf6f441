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
use redis::AsyncCommands;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::consumer::{Consumer, ConsumerSettings, Delivery, Work};
use crate::context::Pipeline;
use crate::now_ms;
use crate::retry::RetryPolicy;
use crate::scripts::{PromoteWebhooks, SettleWebhook};
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
    /// A notice delivered this many times without being settled (its
    /// deliverers keep dying on it) is given up on.
    pub max_deliveries: u64,
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
            max_deliveries: 10,
        }
    }
}

/// Delivers the outbox until `shutdown`; any number of these may run, on
/// any hosts. Reading, reclaiming a stopped process's notices, renewing
/// claims and the stop are the [`Consumer`]'s; what a notice is, is here.
pub async fn run_deliveries(
    p: Pipeline,
    sender: Arc<dyn WebhookSender>,
    cfg: WebhookDeliveryConfig,
    shutdown: CancellationToken,
) -> redis::RedisResult<()> {
    let settings = ConsumerSettings {
        slots: cfg.concurrency.max(1),
        per_slot: 1,
        batch_wait: None,
        // Short enough that due retries are promoted promptly.
        read_block_ms: cfg.read_block_ms.min(1_000),
        claim_idle_ms: cfg.claim_idle_ms,
        reclaim_every_ms: (cfg.claim_idle_ms / 4).max(100),
        max_deliveries: cfg.max_deliveries,
        shutdown_grace_ms: SHUTDOWN_GRACE.as_millis() as u64,
    };
    let consumer = Consumer::new(p.clone(), p.keys.webhook_outbox(), GROUP, settings);
    info!(consumer = consumer.name(), "delivering webhooks");
    let outbox = Arc::new(Outbox {
        p,
        sender,
        cfg,
        busy: Mutex::default(),
    });
    consumer.run(outbox, shutdown).await.map(|_| ())
}

/// The outbox's notices as a consumer's work: each delivery runs on its
/// own (a slot per delivery in flight) and is settled as soon as it
/// finishes, a vendor holding at most `per_vendor_concurrency` slots.
struct Outbox {
    p: Pipeline,
    sender: Arc<dyn WebhookSender>,
    cfg: WebhookDeliveryConfig,
    /// Deliveries in flight per vendor.
    busy: Mutex<HashMap<String, usize>>,
}

impl Outbox {
    /// Takes one of the vendor's delivery places, if it has one free.
    fn take(&self, vendor: &str) -> bool {
        let mut b = self.busy.lock().unwrap();
        let n = b.entry(vendor.to_string()).or_insert(0);
        let free = *n < self.cfg.per_vendor_concurrency.max(1);
        if free {
            *n += 1;
        }
        free
    }

    fn put_back(&self, vendor: &str) {
        let mut b = self.busy.lock().unwrap();
        if let Some(n) = b.get_mut(vendor) {
            *n -= 1;
            if *n == 0 {
                b.remove(vendor);
            }
        }
    }
}

#[async_trait]
impl Work for Outbox {
    async fn handle(self: Arc<Self>, unit: Vec<Delivery>) {
        for entry in unit {
            let vendor = entry.field("vendor").unwrap_or_default();
            if !self.take(&vendor) {
                // The vendor's endpoint already has all it may: this notice
                // goes back to the retry set for a moment, its attempt not
                // counted, instead of holding a slot another vendor needs.
                postpone(&self.p, &entry).await;
                continue;
            }
            deliver_one(&self.p, self.sender.as_ref(), &self.cfg, &entry).await;
            self.put_back(&vendor);
        }
    }

    /// A notice whose deliverers keep dying on it is given up on, and its
    /// job says so.
    async fn poisoned(&self, entry: Delivery, delivered: u64) {
        let job_id = entry.field("job").unwrap_or_default();
        warn!(job = %job_id, delivered, "a webhook notice kept its deliverers from finishing; giving up on it");
        let record = format!("failed: delivered {delivered} times without finishing");
        let settled = SettleWebhook {
            group: GROUP,
            entry_id: &entry.id,
            job_id: (!job_id.is_empty()).then_some(job_id.as_str()),
            outcome: &record,
            retry: None,
        };
        if let Err(e) = settled.run(&self.p).await {
            warn!(error = %e, "settling a webhook delivery failed");
        }
    }

    async fn before_read(&self) {
        if let Err(e) = promote_due(&self.p).await {
            warn!(error = %e, "promoting due webhook retries failed");
        }
    }
}

/// How long deliveries under way may take to finish at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// How long a notice waits when its vendor has all the deliveries it may.
const POSTPONE_MS: u64 = 500;

/// Puts a notice back on the retry set for [`POSTPONE_MS`], acknowledged
/// in the outbox, with the same attempt number and nothing written on the
/// job. If Redis fails here the notice stays pending, for a reclaim.
async fn postpone(p: &Pipeline, entry: &Delivery) {
    let field = |k: &str| entry.field(k).unwrap_or_default();
    let member = serde_json::json!({
        "job": field("job"), "vendor": field("vendor"), "status": field("status"),
        "finished_ms": field("finished_ms").parse::<u64>().unwrap_or(0),
        "attempt": field("attempt").parse::<u32>().unwrap_or(1).max(1),
    });
    let member = member.to_string();
    let settled = SettleWebhook {
        group: GROUP,
        entry_id: &entry.id,
        job_id: None,
        outcome: "",
        retry: Some((&member, now_ms() + POSTPONE_MS)),
    }
    .run(p)
    .await;
    if let Err(e) = settled {
        warn!(error = %e, "postponing a webhook delivery failed");
    }
}

/// Sends one notice and settles it: acknowledged either way, with a retry
/// scheduled when one is worth it. Left pending only if Redis itself
/// failed, for a reclaim to pick up.
async fn deliver_one(p: &Pipeline, sender: &dyn WebhookSender, cfg: &WebhookDeliveryConfig, entry: &Delivery) {
    let field = |k: &str| entry.field(k).unwrap_or_default();
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
    let settled = SettleWebhook {
        group: GROUP,
        entry_id: &entry.id,
        job_id: (!job_id.is_empty()).then_some(job_id.as_str()),
        outcome: &record,
        retry: retry.as_ref().map(|(member, due)| (member.as_str(), *due)),
    }
    .run(p)
    .await;
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
    PromoteWebhooks {
        now_ms: now_ms(),
        most: 100,
    }
    .run(p)
    .await
}
