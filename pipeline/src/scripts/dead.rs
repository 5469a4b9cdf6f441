//! `dead.lua`'s one typed call: gives up on an image in its stage. The
//! only Rust code that knows that script's KEYS and ARGV order; every key
//! comes from `keys.rs`.

use crate::context::Pipeline;
use crate::event::StageName;
use crate::metrics::{Counted, MINUTE_BUCKET_TTL_S};
use crate::now_ms;
use crate::scripts::flag;

/// An image given up on: acknowledged in `stage`, appended to the
/// dead-letter stream with why, and recorded as failed on its job.
pub struct DeadLetter<'a> {
    pub stage: StageName,
    pub entry_id: &'a str,
    /// The event as delivered, kept whole for a replay.
    pub payload: &'a str,
    /// `None` for an entry whose event could not even be read.
    pub job_id: Option<&'a str>,
    pub vendor: &'a str,
    pub image: u32,
    pub error: &'a str,
    pub attempts: u32,
    /// Whether the image holds an admission slot (freed here).
    pub held_slot: bool,
    /// The dead-letter stream's approximate cap.
    pub max_len: u64,
}

/// What dead-lettering did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadLettered {
    /// The entry was acknowledged already: nothing was done twice.
    Duplicate,
    /// Recorded; its job has images still open (or is unknown).
    JobOpen,
    /// Recorded, and it was its job's last open image: the job ended.
    JobClosed,
}

impl DeadLetter<'_> {
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<DeadLettered> {
        let keys = &p.keys;
        let now = now_ms();
        let code: i64 = p
            .scripts
            .dead
            .key(keys.stream(self.stage))
            .key(keys.dead_letters())
            // An unreadable entry's job is one no submit makes.
            .key(keys.job(self.job_id.unwrap_or("unknown")))
            .key(keys.admitted())
            .key(keys.counters(self.stage))
            .key(keys.counters_minute(self.stage, now / 60_000))
            .key(keys.webhooks())
            .key(keys.webhook_outbox())
            .arg(keys.group(self.stage))
            .arg(self.entry_id)
            .arg(self.payload)
            .arg(self.image)
            .arg(self.stage.as_str())
            .arg(self.error)
            .arg(self.attempts)
            .arg(now)
            .arg(self.max_len)
            .arg(keys.finished_channel())
            .arg(self.job_id.unwrap_or(""))
            .arg(self.vendor)
            .arg(keys.progress_channel())
            .arg(flag(self.held_slot))
            .arg(Counted::Dead.field())
            .arg(MINUTE_BUCKET_TTL_S)
            .invoke_async(&mut p.conn.clone())
            .await?;
        Ok(match code {
            -1 => DeadLettered::Duplicate,
            1 => DeadLettered::JobClosed,
            _ => DeadLettered::JobOpen,
        })
    }
}
