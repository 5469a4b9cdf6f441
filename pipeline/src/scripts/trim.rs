//! `trim.lua`'s one typed call: removes a stream's acknowledged entries.
//! The only Rust code that knows that script's KEYS; every key comes from
//! `keys.rs`.

use crate::context::Pipeline;
use crate::event::StageName;

/// Trim `stage`'s stream below every group's oldest unfinished entry.
pub struct TrimAcknowledged {
    pub stage: StageName,
}

impl TrimAcknowledged {
    /// Entries removed.
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<u64> {
        p.scripts
            .trim
            .key(p.keys.stream(self.stage))
            .invoke_async(&mut p.conn.clone())
            .await
    }
}
