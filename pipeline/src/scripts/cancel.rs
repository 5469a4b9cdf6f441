//! `cancel.lua`'s one typed call: cancels a vendor's job. The only Rust
//! code that knows that script's KEYS and ARGV order; every key comes from
//! `keys.rs`.

use crate::context::Pipeline;
use crate::now_ms;

/// Cancel job `job_id` of `vendor`: its unfinished images are skipped as
/// they reach their next step.
pub struct CancelJob<'a> {
    pub vendor: &'a str,
    pub job_id: &'a str,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cancelled {
    Yes,
    /// No such job for this vendor (another vendor's job is not found).
    NotFound,
    AlreadyEnded,
}

impl CancelJob<'_> {
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<Cancelled> {
        let code: i64 = p
            .scripts
            .cancel
            .key(p.keys.job(self.job_id))
            .arg(self.vendor)
            .arg(now_ms())
            .arg(p.keys.progress_channel())
            .arg(self.job_id)
            .invoke_async(&mut p.conn.clone())
            .await?;
        Ok(match code {
            1 => Cancelled::Yes,
            -1 => Cancelled::AlreadyEnded,
            _ => Cancelled::NotFound,
        })
    }
}
