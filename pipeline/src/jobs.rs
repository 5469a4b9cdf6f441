//! Jobs as the API sees them: submit, read, list and cancel.
//!
//! A job is one Redis hash holding the job's own fields and, per image,
//! `<index>:<field>` entries that the stage scripts update as the image moves
//! on. It expires after the retention period; so does the vendor's index.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::context::Pipeline;
use crate::estimate::{self, QuotaConfig, StartEstimate};
use crate::event::{EventKind, ImageEvent, Operation, Source, EVENT_VERSION};
use crate::now_ms;
use crate::scripts::{CancelJob, RecordJob, Recorded};
use crate::status::{ImageStatus, JobStatus};

#[derive(Debug, Clone)]
pub struct NewImage {
    pub source: Source,
    pub record_id: String,
}

#[derive(Debug, Clone)]
pub struct NewJob {
    /// The job id; blobs uploaded before submitting are stored under it.
    pub id: String,
    pub vendor: String,
    pub operations: Vec<Operation>,
    pub images: Vec<NewImage>,
    pub idempotency_key: Option<String>,
    /// A digest of what the request asked for (operations, record ids,
    /// sources), kept with the idempotency key: a retry carrying the same
    /// key but another request is told so instead of being answered with
    /// the earlier job.
    pub fingerprint: Option<String>,
    pub traceparent: Option<String>,
}

impl NewJob {
    /// A new job id: time-ordered, so a vendor's jobs list in order.
    pub fn new_id() -> String {
        uuid::Uuid::now_v7().simple().to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submitted {
    pub job_id: String,
    /// False when the idempotency key named an earlier job.
    pub created: bool,
    /// The earlier job's request, when the key named one, had another
    /// fingerprint than this one.
    pub conflicting: bool,
}

/// How many replicas must hold a submitted job before the submit is
/// answered (`[redis]` in the configuration). With none (the default, and
/// right for a single node), a submit is answered once the primary has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicationConfig {
    /// Replicas that must confirm a job (Redis's `WAIT`) before it is
    /// accepted; when fewer confirm in time the submit is refused as
    /// unavailable, and the client's retry with the same Idempotency-Key
    /// gets the one job.
    pub min_replicas: u32,
    /// How long a submit waits for them, in milliseconds.
    pub wait_timeout_ms: u64,
    /// Wait until the replicas have the job in their append-only files too
    /// (`WAITAOF`, Redis 7.2 and later, replicas with `appendonly yes`),
    /// not only in memory.
    pub wait_aof: bool,
}

impl Default for ReplicationConfig {
    fn default() -> Self {
        ReplicationConfig {
            min_replicas: 0,
            wait_timeout_ms: 1_000,
            wait_aof: false,
        }
    }
}

/// Why a submit was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// The primary has the job but too few replicas confirmed it in time:
    /// a failover now could lose it. Not an acceptance; a retry with the
    /// same idempotency key answers with this job once it is replicated.
    #[error("job {job_id} is on {confirmed} of the {wanted} replica(s) required")]
    NotReplicated {
        job_id: String,
        confirmed: u32,
        wanted: u32,
    },
}

/// What an idempotency key recorded: the job it made and the fingerprint
/// of the request that made it ('' when none was given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EarlierSubmit {
    pub job_id: String,
    pub fingerprint: String,
}

impl EarlierSubmit {
    fn parse(value: &str) -> Self {
        let (job_id, fingerprint) = value.split_once('\n').unwrap_or((value, ""));
        EarlierSubmit {
            job_id: job_id.to_string(),
            fingerprint: fingerprint.to_string(),
        }
    }

    /// Whether a request with `fingerprint` differs from the earlier one
    /// (unknown on either side counts as the same).
    pub fn conflicts_with(&self, fingerprint: Option<&str>) -> bool {
        match fingerprint {
            Some(f) => !self.fingerprint.is_empty() && self.fingerprint != f,
            None => false,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageView {
    pub index: u32,
    pub record_id: String,
    pub stage: String,
    pub status: String,
    pub attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_at_ms: Option<u64>,
    pub outputs: BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub notes: Option<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct JobView {
    pub job_id: String,
    #[serde(skip)]
    pub vendor: String,
    pub status: String,
    pub operations: Vec<String>,
    pub created_ms: u64,
    pub updated_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    pub total: u32,
    pub completed: u32,
    pub failed: u32,
    pub skipped: u32,
    /// While no image of the job has started: when one is expected to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimated_start: Option<StartEstimate>,
    /// What became of the vendor's webhook call for this job's end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    pub images: Vec<ImageView>,
}

impl JobView {
    pub fn is_terminal(&self) -> bool {
        is_terminal(&self.status)
    }
}

pub fn is_terminal(status: &str) -> bool {
    crate::JobStatus::parse(status).is_some_and(crate::JobStatus::is_terminal)
}

pub use crate::scripts::Cancelled;

/// Reads and writes job records.
#[derive(Clone)]
pub struct JobStore {
    p: Pipeline,
    retention_secs: u64,
    /// What the scheduler enforces, for start estimates.
    quotas: QuotaConfig,
    admission_window: u64,
    replication: ReplicationConfig,
    /// Connections of their own for submits that wait for replicas: `WAIT`
    /// holds the connection it is sent on, and on the shared one it would
    /// hold every other command behind it.
    waiting_conns: std::sync::Arc<WaitingConns>,
}

/// A few connections lent to one submit at a time.
struct WaitingConns {
    idle: std::sync::Mutex<Vec<crate::Conn>>,
    lendable: tokio::sync::Semaphore,
}

/// Submits waiting for replicas at once, per process; more queue for a
/// connection.
const WAITING_SUBMITS: usize = 32;

impl JobStore {
    pub fn new(p: Pipeline, retention_secs: u64) -> Self {
        JobStore {
            p,
            retention_secs,
            quotas: QuotaConfig::default(),
            admission_window: 0,
            replication: ReplicationConfig::default(),
            waiting_conns: std::sync::Arc::new(WaitingConns {
                idle: Default::default(),
                lendable: tokio::sync::Semaphore::new(WAITING_SUBMITS),
            }),
        }
    }

    /// Tells the store the scheduler's quotas and admission window (the
    /// pipeline's config), so its start estimates account for them.
    /// Submits wait for `replication.min_replicas` replicas.
    pub fn with_replication(mut self, replication: ReplicationConfig) -> Self {
        self.replication = replication;
        self
    }

    pub fn with_scheduling(mut self, quotas: QuotaConfig, admission_window: u64) -> Self {
        self.quotas = quotas;
        self.admission_window = admission_window;
        self
    }

    /// When `vendor`'s next image asking for `ops` is expected to start;
    /// `None` when there is no throughput to go by yet.
    pub async fn estimate_start(&self, vendor: &str, ops: &[String]) -> redis::RedisResult<Option<StartEstimate>> {
        self.estimate_start_behind(vendor, ops, 0).await
    }

    /// The same for a job with `own_waiting` images already in its
    /// vendor's queue: those are not ahead of its first one. (Later jobs'
    /// images may still be counted: the estimate errs late, never early.)
    async fn estimate_start_behind(
        &self,
        vendor: &str,
        ops: &[String],
        own_waiting: u64,
    ) -> redis::RedisResult<Option<StartEstimate>> {
        let mut snap = estimate::snapshot(&self.p, vendor, ops, &self.quotas, self.admission_window).await?;
        snap.queued_ahead = snap.queued_ahead.saturating_sub(own_waiting);
        Ok(snap.estimate())
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.p
    }

    /// Records a job and queues its images, atomically.
    pub async fn submit(&self, job: NewJob) -> Result<Submitted, SubmitError> {
        let now = now_ms();
        let ops: Vec<&str> = job.operations.iter().map(|o| o.as_str()).collect();
        // One job is one trace, whether the caller started it or not.
        let traceparent = crate::trace::accept_or_new(job.traceparent.as_deref());
        let mut images = Vec::with_capacity(job.images.len());
        for (i, img) in job.images.iter().enumerate() {
            let event = ImageEvent {
                v: EVENT_VERSION,
                kind: EventKind::ImageSubmitted,
                job: job.id.clone(),
                vendor: job.vendor.clone(),
                image: i as u32,
                record_id: img.record_id.clone(),
                ops: job.operations.clone(),
                source: img.source.clone(),
                working: None,
                outputs: BTreeMap::new(),
                notes: serde_json::Map::new(),
                slot: false,
                attempt: 0,
                submitted_ms: now,
                traceparent: Some(traceparent.clone()),
            };
            images.push((img.record_id.as_str(), event.to_json()));
        }
        let record = RecordJob {
            job_id: &job.id,
            vendor: &job.vendor,
            now_ms: now,
            retention_secs: self.retention_secs,
            ops: &ops,
            fingerprint: job.fingerprint.as_deref(),
            idempotency_key: job.idempotency_key.as_deref(),
            images: &images,
        };
        let inv = record.invocation(&self.p);
        let reply: (String, i64, String) = if self.replication.min_replicas == 0 {
            inv.invoke_async(&mut self.p.conn.clone()).await?
        } else {
            let _lent = self
                .waiting_conns
                .lendable
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let idle = self.waiting_conns.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let mut conn = match idle {
                Some(c) => c,
                None => {
                    let timeout = Duration::from_millis(self.replication.wait_timeout_ms) + Duration::from_secs(5);
                    self.p.dedicated_connection(timeout).await?
                }
            };
            let generation = conn.generation();
            let reply: (String, i64, String) = inv.invoke_async(&mut conn).await?;
            // Also when the key named an earlier job: that job may be the
            // one a submit refused here for want of replicas.
            self.wait_for_replicas(&mut conn, generation, &reply.0).await?;
            self.waiting_conns
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(conn);
            reply
        };
        Ok(match RecordJob::reply(reply) {
            Recorded::New => Submitted {
                job_id: job.id,
                created: true,
                conflicting: false,
            },
            Recorded::Earlier { job_id, fingerprint } => {
                let earlier = EarlierSubmit { job_id, fingerprint };
                Submitted {
                    conflicting: earlier.conflicts_with(job.fingerprint.as_deref()),
                    job_id: earlier.job_id,
                    created: false,
                }
            }
        })
    }

    /// Waits until the configured replicas hold every write this
    /// connection made so far (the job's among them).
    async fn wait_for_replicas(
        &self,
        conn: &mut crate::Conn,
        generation: u64,
        job_id: &str,
    ) -> Result<(), SubmitError> {
        let r = self.replication;
        let not_replicated = |confirmed| SubmitError::NotReplicated {
            job_id: job_id.to_string(),
            confirmed,
            wanted: r.min_replicas,
        };
        if conn.generation() != generation {
            // The script and the wait went to different primaries (a
            // failover between them): the wait would vouch for nothing.
            return Err(not_replicated(0));
        }
        let confirmed: u32 = if r.wait_aof {
            // [fsynced locally, replicas that fsynced]; 0 local: the primary
            // may run without an append-only file.
            let (_, replicas): (u32, u32) = redis::cmd("WAITAOF")
                .arg(0)
                .arg(r.min_replicas)
                .arg(r.wait_timeout_ms)
                .query_async(conn)
                .await?;
            replicas
        } else {
            redis::cmd("WAIT")
                .arg(r.min_replicas)
                .arg(r.wait_timeout_ms)
                .query_async(conn)
                .await?
        };
        if confirmed < r.min_replicas || conn.generation() != generation {
            return Err(not_replicated(confirmed));
        }
        Ok(())
    }

    /// The job an earlier submit with this idempotency key made, if any.
    pub async fn idempotent_job(&self, vendor: &str, key: &str) -> redis::RedisResult<Option<String>> {
        Ok(self.idempotent_submit(vendor, key).await?.map(|e| e.job_id))
    }

    /// What an earlier submit with this idempotency key recorded, if any.
    pub async fn idempotent_submit(&self, vendor: &str, key: &str) -> redis::RedisResult<Option<EarlierSubmit>> {
        let mut conn = self.p.conn.clone();
        let value: Option<String> = conn.get(self.p.keys.idempotency(vendor, key)).await?;
        Ok(value.as_deref().map(EarlierSubmit::parse))
    }

    /// A job as its vendor sees it; `None` if it does not exist or belongs
    /// to another vendor (the two are indistinguishable on purpose).
    pub async fn get(&self, vendor: Option<&str>, id: &str) -> redis::RedisResult<Option<JobView>> {
        if !valid_job_id(id) {
            return Ok(None);
        }
        let mut conn = self.p.conn.clone();
        let fields: HashMap<String, String> = conn.hgetall(self.p.keys.job(id)).await?;
        let Some(mut view) = parse_job(&fields) else {
            return Ok(None);
        };
        if vendor.is_some_and(|v| v != view.vendor) {
            return Ok(None);
        }
        // A job still queued has no image started yet (the dispatcher marks
        // the job processing with its first one).
        if view.status == JobStatus::Queued.as_str() {
            let waiting = view
                .images
                .iter()
                .filter(|i| i.status == ImageStatus::Waiting.as_str())
                .count() as u64;
            view.estimated_start = self
                .estimate_start_behind(&view.vendor, &view.operations, waiting)
                .await?;
        }
        Ok(Some(view))
    }

    /// A vendor's job ids, newest first, `limit` from `before_ms` down.
    pub async fn list_ids(
        &self,
        vendor: &str,
        before_ms: Option<u64>,
        limit: usize,
    ) -> redis::RedisResult<Vec<(String, u64)>> {
        let mut conn = self.p.conn.clone();
        let max = before_ms.map(|b| format!("({b}")).unwrap_or_else(|| "+inf".into());
        redis::cmd("ZRANGE")
            .arg(self.p.keys.vendor_jobs(vendor))
            .arg(max)
            .arg("-inf")
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .arg("WITHSCORES")
            .query_async(&mut conn)
            .await
    }

    /// Sets a vendor's weight in fair scheduling (images per round-robin turn).
    pub async fn set_weight(&self, vendor: &str, weight: u32) -> redis::RedisResult<()> {
        let mut conn = self.p.conn.clone();
        conn.hset(self.p.keys.vendor_weights(), vendor, weight.max(1)).await
    }

    pub async fn cancel(&self, vendor: &str, id: &str) -> redis::RedisResult<Cancelled> {
        if !valid_job_id(id) {
            return Ok(Cancelled::NotFound);
        }
        CancelJob { vendor, job_id: id }.run(&self.p).await
    }
}

/// Job ids are ours (32 hex digits); anything else cannot name a job, and
/// must never reach a key name.
pub fn valid_job_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn parse_job(f: &HashMap<String, String>) -> Option<JobView> {
    let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let total = num("images") as u32;
    let images = (0..total)
        .map(|i| {
            let get = |field: &str| f.get(&format!("{i}:{field}")).cloned();
            let outputs: BTreeMap<String, String> = get("outputs")
                .and_then(|o| serde_json::from_str(&o).ok())
                .unwrap_or_default();
            ImageView {
                index: i,
                record_id: get("record").unwrap_or_default(),
                stage: get("stage").unwrap_or_default(),
                status: get("status").unwrap_or_default(),
                attempts: get("attempts").and_then(|a| a.parse().ok()).unwrap_or(0),
                error: get("error").filter(|e| !e.is_empty()),
                resume_at_ms: get("resume_ms")
                    .and_then(|r| r.parse().ok())
                    .filter(|_| get("status").as_deref() == Some(ImageStatus::Throttled.as_str())),
                outputs,
                notes: get("notes").and_then(|n| serde_json::from_str(&n).ok()),
            }
        })
        .collect();
    Some(JobView {
        job_id: f.get("id")?.clone(),
        vendor: f.get("vendor")?.clone(),
        status: f.get("status")?.clone(),
        operations: f
            .get("ops")
            .map(|o| o.split(',').filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default(),
        created_ms: num("created_ms"),
        updated_ms: num("updated_ms"),
        finished_ms: f.get("finished_ms").and_then(|v| v.parse().ok()),
        total,
        completed: num("done") as u32,
        failed: num("failed") as u32,
        skipped: num("skipped") as u32,
        estimated_start: None,
        webhook: f.get("webhook").cloned(),
        images,
    })
}
