//! `finish.lua`'s one typed call: a batch of events one stage handled,
//! each handed to the next stage, parked in its vendor's queue for the
//! fair dispatcher, or completed. The only Rust code that knows that
//! script's KEYS and ARGV order, and the format of a parked item (which
//! `dispatch.lua` reads back); every key comes from `keys.rs`.

use std::collections::BTreeMap;

use crate::context::Pipeline;
use crate::event::{ImageEvent, StageName};
use crate::metrics::MINUTE_BUCKET_TTL_S;
use crate::now_ms;
use crate::scripts::flag;

/// What becomes of one event.
pub enum Finish<'a> {
    /// Published to the next stage's stream.
    HandOff(StageName, &'a ImageEvent),
    /// Parked in its vendor's queue, for `next`, until the dispatcher
    /// admits it (it takes its admission slot then).
    Park(StageName, &'a ImageEvent),
    /// Its image is done: outputs recorded, the job closed if it was the
    /// last.
    Complete(&'a ImageEvent),
}

/// What finishing did to one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// Acknowledged already: nothing was done twice.
    Duplicate,
    /// Moved on (handed off, parked) or completed, its job still open.
    Moved,
    /// Its job was cancelled (the image is skipped) or is gone.
    Dropped,
    /// Completed, and it closed its job with no image failed.
    Closed,
    /// Completed, and it closed its job with failed images.
    ClosedWithFailures,
}

impl Finished {
    fn from_code(code: i64) -> Finished {
        match code {
            0 => Finished::Duplicate,
            1 => Finished::Moved,
            3 => Finished::Closed,
            4 => Finished::ClosedWithFailures,
            _ => Finished::Dropped,
        }
    }
}

/// A batch of one stage's events, `(entry id, what becomes of it)`.
pub struct FinishBatch<'a> {
    pub stage: StageName,
    pub events: &'a [(&'a str, Finish<'a>)],
}

impl FinishBatch<'_> {
    /// One script call for the whole batch; one outcome per event, in
    /// order.
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<Vec<Finished>> {
        let keys = &p.keys;
        let now = now_ms();
        let mut call = p.scripts.finish.prepare_invoke();
        // Counted by the same script, so a duplicate delivery is never
        // counted and counting costs no round trip of its own.
        call.key(keys.stream(self.stage))
            .key(keys.admitted())
            .key(keys.counters(self.stage))
            .key(keys.counters_minute(self.stage, now / 60_000))
            .key(keys.vendor_ring())
            .key(keys.webhooks())
            .key(keys.webhook_outbox())
            .arg(keys.group(self.stage))
            .arg(now)
            .arg(keys.finished_channel())
            .arg(keys.progress_channel())
            .arg(MINUTE_BUCKET_TTL_S);
        for (id, finish) in self.events {
            match finish {
                Finish::HandOff(next, ev) => {
                    call.key(keys.job(&ev.job))
                        .key(keys.stream(*next))
                        .arg("h")
                        .arg(*id)
                        .arg(ev.image)
                        .arg(flag(ev.slot))
                        .arg(ev.to_json())
                        .arg(next.as_str())
                        .arg(progress_note(&ev.job, ev.image, next.as_str(), "processing"));
                }
                Finish::Park(next, ev) => {
                    // A parked image takes its admission slot only when
                    // the dispatcher admits it.
                    call.key(keys.job(&ev.job))
                        .key(keys.vendor_queue(&ev.vendor))
                        .arg("p")
                        .arg(*id)
                        .arg(ev.image)
                        .arg(flag(false))
                        .arg(park_item(*next, &keys.job(&ev.job), ev))
                        .arg(&ev.vendor)
                        .arg("");
                }
                Finish::Complete(ev) => {
                    let outputs: BTreeMap<&str, &str> = ev
                        .outputs
                        .iter()
                        .filter_map(|(k, o)| o.url.as_deref().map(|u| (k.as_str(), u)))
                        .collect();
                    let job_key = keys.job(&ev.job);
                    call.key(&job_key)
                        .key(&job_key)
                        .arg("c")
                        .arg(*id)
                        .arg(ev.image)
                        .arg(flag(ev.slot))
                        .arg(serde_json::to_string(&outputs).unwrap_or_default())
                        .arg(serde_json::Value::Object(ev.notes.clone()).to_string())
                        .arg(progress_note(&ev.job, ev.image, "done", "completed"));
                }
            }
        }
        let codes: Vec<i64> = call.invoke_async(&mut p.conn.clone()).await?;
        if codes.len() != self.events.len() {
            return Err(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "finish.lua answered another number of codes than events",
                format!("{} for {}", codes.len(), self.events.len()),
            )));
        }
        Ok(codes.into_iter().map(Finished::from_code).collect())
    }
}

/// A parked image, as its vendor's queue holds it:
/// "next stage \t job key \t job id \t image \t event".
fn park_item(next: StageName, job_key: &str, ev: &ImageEvent) -> String {
    format!(
        "{}\t{}\t{}\t{}\t{}",
        next.as_str(),
        job_key,
        ev.job,
        ev.image,
        ev.to_json()
    )
}

/// One transition on the progress channel, as `finish.lua` and
/// `dispatch.lua` announce them (in JSON arrays, one per batch).
fn progress_note(job: &str, image: u32, stage: &str, status: &str) -> String {
    serde_json::json!({"job": job, "image": image, "stage": stage, "status": status}).to_string()
}
