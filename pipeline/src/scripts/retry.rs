//! `retry.lua`'s one typed call: sets an image aside in its stage's retry
//! set until it is due again. The only Rust code that knows that script's
//! KEYS and ARGV order; every key comes from `keys.rs`.

use crate::context::Pipeline;
use crate::event::{ImageEvent, StageName};
use crate::metrics::{Counted, MINUTE_BUCKET_TTL_S};
use crate::now_ms;
use crate::scripts::flag;
use crate::status::ImageStatus;

/// Why an image waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waiting {
    /// After a failure that may pass.
    Retrying,
    /// Until its vendor's quota has room again.
    Throttled,
}

impl Waiting {
    /// The image status the job record shows.
    pub fn status(self) -> ImageStatus {
        match self {
            Waiting::Retrying => ImageStatus::Retrying,
            Waiting::Throttled => ImageStatus::Throttled,
        }
    }

    /// The counter the step counts in.
    pub fn counted(self) -> Counted {
        match self {
            Waiting::Retrying => Counted::Retried,
            Waiting::Throttled => Counted::Throttled,
        }
    }
}

/// An image set aside in `stage` until `due_ms`.
pub struct ScheduleRetry<'a> {
    pub stage: StageName,
    pub entry_id: &'a str,
    /// The event to publish again when due (its attempt count updated).
    pub event: &'a ImageEvent,
    pub due_ms: u64,
    pub waiting: Waiting,
    pub reason: &'a str,
    pub attempts: u32,
}

/// What scheduling did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheduled {
    /// The entry was acknowledged already: nothing was done twice.
    Duplicate,
    /// In the retry set, due at `due_ms`.
    Scheduled,
    /// Its job was cancelled (the image is skipped) or is gone.
    Dropped,
}

impl ScheduleRetry<'_> {
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<Scheduled> {
        let keys = &p.keys;
        let now = now_ms();
        let code: i64 = p
            .scripts
            .retry
            .key(keys.stream(self.stage))
            .key(keys.retries(self.stage))
            .key(keys.job(&self.event.job))
            .key(keys.admitted())
            .key(keys.counters(self.stage))
            .key(keys.counters_minute(self.stage, now / 60_000))
            .key(keys.webhooks())
            .key(keys.webhook_outbox())
            .arg(keys.group(self.stage))
            .arg(self.entry_id)
            .arg(self.event.to_json())
            .arg(self.due_ms)
            .arg(self.event.image)
            .arg(self.waiting.status().as_str())
            .arg(self.reason)
            .arg(self.attempts)
            .arg(now)
            .arg(keys.finished_channel())
            .arg(keys.progress_channel())
            .arg(&self.event.job)
            .arg(self.stage.as_str())
            .arg(flag(self.event.slot))
            .arg(self.waiting.counted().field())
            .arg(MINUTE_BUCKET_TTL_S)
            .invoke_async(&mut p.conn.clone())
            .await?;
        Ok(match code {
            0 => Scheduled::Duplicate,
            1 => Scheduled::Scheduled,
            _ => Scheduled::Dropped,
        })
    }
}
