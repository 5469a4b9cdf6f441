//! How one stage runs in this process: the runner's configuration.
//!
//! Owns the settings and their defaults; it holds no policy of its own
//! (the runner, the consumer, admission and maintenance read them).

use serde::{Deserialize, Serialize};

use crate::consumer::ConsumerSettings;
use crate::retry::RetryPolicy;

/// How one stage runs in this process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RunnerConfig {
    /// Events (or batches, for a batching stage) handled at once. Not a
    /// configuration key of its own: the binary sets it per stage from
    /// `concurrency.<stage>` (so `pipeline.concurrency` is refused as
    /// unknown rather than silently ignored).
    #[serde(skip)]
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

impl RunnerConfig {
    /// How the runner's consumer reads: `per_slot` events a unit, waiting
    /// up to `batch_wait` for a unit to fill.
    pub fn consumer(&self, per_slot: usize, batch_wait: Option<std::time::Duration>) -> ConsumerSettings {
        ConsumerSettings {
            slots: self.concurrency.max(1),
            per_slot,
            batch_wait,
            read_block_ms: self.read_block_ms,
            claim_idle_ms: self.claim_idle_ms,
            reclaim_every_ms: self.reclaim_every_ms,
            max_deliveries: self.max_deliveries,
            shutdown_grace_ms: self.shutdown_grace_ms,
        }
    }
}
