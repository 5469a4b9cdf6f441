//! `replay.lua`'s one typed call: puts a dead letter's event back to work.
//! The only Rust code that knows that script's KEYS and ARGV order; every
//! key comes from `keys.rs`.

use crate::context::Pipeline;
use crate::event::{ImageEvent, StageName};
use crate::now_ms;

/// Queue `event` (its attempts reset) on stage `to`, drop dead letter
/// `dead_letter_id`, reopen its image and job and log the replay.
pub struct ReplayDeadLetter<'a> {
    pub dead_letter_id: &'a str,
    pub event: &'a ImageEvent,
    /// The stage it failed in.
    pub from: StageName,
    pub to: StageName,
    /// The replay log's approximate cap.
    pub log_max: u64,
}

/// What a replay did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayOutcome {
    Replayed,
    NoSuchDeadLetter,
    JobGone,
    /// The image is not failed (replayed already?).
    NotFailed,
    JobCancelled,
}

impl ReplayDeadLetter<'_> {
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<ReplayOutcome> {
        let keys = &p.keys;
        let code: i64 = p
            .scripts
            .replay
            .key(keys.dead_letters())
            .key(keys.stream(self.to))
            .key(keys.job(&self.event.job))
            .key(keys.replays())
            .arg(self.dead_letter_id)
            .arg(self.event.to_json())
            .arg(self.event.image)
            .arg(self.to.as_str())
            .arg(now_ms())
            .arg(self.log_max)
            .arg(&self.event.job)
            .arg(&self.event.vendor)
            .arg(self.from.as_str())
            .invoke_async(&mut p.conn.clone())
            .await?;
        Ok(match code {
            1 => ReplayOutcome::Replayed,
            0 => ReplayOutcome::NoSuchDeadLetter,
            -1 => ReplayOutcome::JobGone,
            -3 => ReplayOutcome::JobCancelled,
            _ => ReplayOutcome::NotFailed,
        })
    }
}
