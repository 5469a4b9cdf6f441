//! Every Redis key the project uses, built in one place.
//!
//! All keys share one hash tag, `{<prefix>}`, so that the keys an atomic
//! step touches (the stage's stream, the next stage's stream, the job record,
//! the retry set, the dead-letter stream) always live in the same Redis
//! Cluster slot. Sharding later means giving each shard its own tag, e.g.
//! `{iq-3}`, and routing a job to one shard for its whole life: nothing here
//! assumes a single tag.

use crate::event::StageName;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    base: String,
}

impl Keys {
    /// Keys under `prefix`, e.g. `iq` gives `{iq}:stream:resize`.
    pub fn new(prefix: &str) -> Self {
        Keys {
            base: format!("{{{prefix}}}"),
        }
    }

    /// The stream a stage consumes.
    /// A `SCAN MATCH` pattern for every key under this prefix.
    pub fn every_key_pattern(&self) -> String {
        format!("{}:*", self.base)
    }

    pub fn stream(&self, stage: StageName) -> String {
        format!("{}:stream:{}", self.base, stage.as_str())
    }

    /// The consumer group of a stage on its stream.
    pub fn group(&self, stage: StageName) -> &'static str {
        stage.as_str()
    }

    /// Sorted set of events waiting for a retry (or a quota refill) at a
    /// stage, scored by the millisecond they are due.
    pub fn retries(&self, stage: StageName) -> String {
        format!("{}:retry:{}", self.base, stage.as_str())
    }

    /// The dead-letter stream shared by all stages.
    pub fn dead_letters(&self) -> String {
        format!("{}:dead", self.base)
    }

    /// The hash holding one job's state and its images' states.
    pub fn job(&self, job_id: &str) -> String {
        format!("{}:job:{}", self.base, job_id)
    }

    /// Sorted set of a vendor's job ids, scored by creation time.
    pub fn vendor_jobs(&self, vendor: &str) -> String {
        format!("{}:vendor-jobs:{}", self.base, vendor)
    }

    /// Maps a vendor's `Idempotency-Key` to the job it created.
    pub fn idempotency(&self, vendor: &str, key: &str) -> String {
        format!("{}:idem:{}:{}", self.base, vendor, key)
    }

    /// Hash from the SHA-256 of a vendor API key to the vendor's id.
    pub fn vendor_keys(&self) -> String {
        format!("{}:vendor-keys", self.base)
    }

    /// A vendor's admitted-but-not-dispatched images, in order (a list of
    /// items the dispatcher moves downstream in weighted round-robin).
    pub fn vendor_queue(&self, vendor: &str) -> String {
        format!("{}:vendor-queue:{}", self.base, vendor)
    }

    /// Round-robin ring (a list) of vendors with images waiting.
    pub fn vendor_ring(&self) -> String {
        format!("{}:vendor-ring", self.base)
    }

    /// The rest of a vendor's weighted turn the admission window cut short:
    /// `<vendor>\n<images>` (see `scripts/dispatch.lua`).
    pub fn vendor_round(&self) -> String {
        format!("{}:vendor-round", self.base)
    }

    /// Hash of vendor id to scheduling weight (absent: 1).
    pub fn vendor_weights(&self) -> String {
        format!("{}:vendor-weights", self.base)
    }

    /// Count of images dispatched downstream and not yet finished: the
    /// admission window the dispatcher keeps filled, and no fuller.
    pub fn admitted(&self) -> String {
        format!("{}:admitted", self.base)
    }

    /// Hash of the admission window the dispatcher chose, why, and when
    /// (for stats; it expires if no dispatcher runs).
    pub fn admission(&self) -> String {
        format!("{}:admission", self.base)
    }

    /// Sorted set logging the images a vendor's processing quota for one
    /// operation admitted, scored by the millisecond of admission.
    pub fn quota(&self, vendor: &str, operation: &str) -> String {
        format!("{}:quota:{}:{}", self.base, vendor, operation)
    }

    /// Sorted set logging the requests one rate limit admitted for one
    /// subject (a vendor, or a client network), scored by the millisecond
    /// they were admitted. `limit` and `subject` must be key-safe.
    pub fn rate_limit(&self, limit: &str, subject: &str) -> String {
        format!("{}:rl:{}:{}", self.base, limit, subject)
    }

    /// Sorted set of completed jobs whose blobs are to be deleted, scored
    /// by when (`blob_linger_ms` after the job's end).
    pub fn blob_deletions(&self) -> String {
        format!("{}:blob-deletions", self.base)
    }

    /// Hash of live workers' heartbeats, keyed by consumer name.
    pub fn workers(&self) -> String {
        format!("{}:workers", self.base)
    }

    /// Pub/sub channel announcing each job that reached a terminal state:
    /// one line `<job id> <status>` per job, several lines in a message
    /// from a step that closed several jobs.
    pub fn finished_channel(&self) -> String {
        format!("{}:finished", self.base)
    }

    /// Pub/sub channel carrying every image's stage transitions: a JSON
    /// object per transition, or a JSON array of them from a batch.
    pub fn progress_channel(&self) -> String {
        format!("{}:progress", self.base)
    }

    /// Per-stage counters of processed, failed, retried and dead-lettered
    /// events, bucketed by minute for throughput figures.
    pub fn counters(&self, stage: StageName) -> String {
        format!("{}:counters:{}", self.base, stage.as_str())
    }

    /// One minute's counters of a stage (`minute` since the epoch); kept a
    /// few minutes for the 1- and 5-minute throughput figures.
    pub fn counters_minute(&self, stage: StageName, minute: u64) -> String {
        format!("{}:counters:{}:{}", self.base, stage.as_str(), minute)
    }

    /// Stream recording each dead letter replayed: which, where to, when.
    pub fn replays(&self) -> String {
        format!("{}:replays", self.base)
    }

    /// Hash of vendor id to its webhook registration (URL and secret).
    /// `scripts/lib.lua` derives this name from a job key: keep them alike.
    pub fn webhooks(&self) -> String {
        format!("{}:webhooks", self.base)
    }

    /// Stream of job-ended notices for vendors' webhooks, appended by the
    /// script that ends the job (name derived in `scripts/lib.lua` too).
    pub fn webhook_outbox(&self) -> String {
        format!("{}:webhook-outbox", self.base)
    }

    /// Sorted set of webhook notices waiting for another attempt, scored
    /// by the millisecond it is due.
    pub fn webhook_retries(&self) -> String {
        format!("{}:webhook-retry", self.base)
    }

    /// Written (with a short expiry) by the API's readiness check, to see
    /// that Redis takes writes, not only that it answers.
    pub fn ready_probe(&self) -> String {
        format!("{}:ready-probe", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_one_step_share_a_hash_tag() {
        let k = Keys::new("iq");
        for key in [
            k.stream(StageName::Resize),
            k.stream(StageName::Upload),
            k.job("j1"),
            k.retries(StageName::Resize),
            k.dead_letters(),
            k.webhooks(),
            k.webhook_outbox(),
        ] {
            assert!(key.starts_with("{iq}:"), "{key}");
        }
    }
}
