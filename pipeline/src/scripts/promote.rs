//! `promote.lua`'s one typed call: moves a stage's due retries back onto
//! its stream. The only Rust code that knows that script's KEYS and ARGV
//! order; every key comes from `keys.rs`.

use crate::context::Pipeline;
use crate::event::StageName;

/// Move up to `most` of `stage`'s retries due by `now_ms` onto its stream.
pub struct PromoteRetries {
    pub stage: StageName,
    pub now_ms: u64,
    pub most: u32,
}

/// What a promotion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Promoted {
    pub moved: u64,
    /// When the next retry is due, if any waits.
    pub next_due_ms: Option<u64>,
}

impl PromoteRetries {
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<Promoted> {
        let (moved, next): (i64, i64) = p
            .scripts
            .promote
            .key(p.keys.retries(self.stage))
            .key(p.keys.stream(self.stage))
            .arg(self.now_ms)
            .arg(self.most)
            .invoke_async(&mut p.conn.clone())
            .await?;
        Ok(Promoted {
            moved: moved.max(0) as u64,
            next_due_ms: (next >= 0).then_some(next as u64),
        })
    }
}
