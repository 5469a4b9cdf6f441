//! `reap_consumers.lua`'s one typed call: removes a stage's long-idle
//! consumers that hold nothing. The only Rust code that knows that
//! script's KEYS and ARGV order; every key comes from `keys.rs`.

use crate::context::Pipeline;
use crate::event::StageName;

/// Remove `stage`'s consumers idle at least `idle_ms` with nothing
/// pending, except `keep` (the caller).
pub struct ReapConsumers<'a> {
    pub stage: StageName,
    pub idle_ms: u64,
    pub keep: &'a str,
}

impl ReapConsumers<'_> {
    /// Consumers removed.
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<u64> {
        p.scripts
            .reap_consumers
            .key(p.keys.stream(self.stage))
            .arg(p.keys.group(self.stage))
            .arg(self.idle_ms)
            .arg(self.keep)
            .invoke_async(&mut p.conn.clone())
            .await
    }
}
