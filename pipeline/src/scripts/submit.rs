//! `submit.lua`'s one typed call: records a new job and queues one event
//! per image on rate-check's stream, atomically. The only Rust code that
//! knows that script's KEYS and ARGV order; every key comes from `keys.rs`.

use crate::context::Pipeline;
use crate::event::StageName;

/// Record job `job_id` of `vendor` with its images (record id and the
/// `ImageSubmitted` event's JSON each), unless `idempotency_key` names an
/// earlier one.
pub struct RecordJob<'a> {
    pub job_id: &'a str,
    pub vendor: &'a str,
    pub now_ms: u64,
    pub retention_secs: u64,
    pub ops: &'a [&'a str],
    /// The request's fingerprint, kept with the idempotency key so a reuse
    /// of the key for another request can be told apart.
    pub fingerprint: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    pub images: &'a [(&'a str, String)],
}

/// What the script did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    New,
    /// The idempotency key was seen: the job it named, and that request's
    /// fingerprint ('' for none).
    Earlier {
        job_id: String,
        fingerprint: String,
    },
}

impl RecordJob<'_> {
    /// The call, for the caller to run on the connection it chooses (one
    /// whose writes it will then wait to be replicated).
    pub fn invocation<'s>(&self, p: &'s Pipeline) -> redis::ScriptInvocation<'s> {
        let keys = &p.keys;
        let mut call = p.scripts.submit.prepare_invoke();
        call.key(keys.job(self.job_id))
            .key(keys.stream(StageName::RateCheck))
            .key(keys.vendor_jobs(self.vendor));
        if let Some(k) = self.idempotency_key {
            call.key(keys.idempotency(self.vendor, k));
        }
        call.arg(self.job_id)
            .arg(self.vendor)
            .arg(self.now_ms)
            .arg(self.retention_secs)
            .arg(self.ops.join(","))
            .arg(self.images.len())
            .arg(self.fingerprint.unwrap_or(""));
        for (record_id, event) in self.images {
            call.arg(*record_id).arg(event);
        }
        call
    }

    /// Reads the script's reply.
    pub fn reply((job_id, created, fingerprint): (String, i64, String)) -> Recorded {
        if created == 1 {
            Recorded::New
        } else {
            Recorded::Earlier { job_id, fingerprint }
        }
    }
}
