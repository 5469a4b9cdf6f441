//! `promote_webhooks.lua`'s one typed call: moves due webhook retries back
//! into the outbox. The only Rust code that knows that script's KEYS and
//! ARGV order; every key comes from `keys.rs`.

use crate::context::Pipeline;

/// Move up to `most` webhook notices due by `now_ms` into the outbox.
pub struct PromoteWebhooks {
    pub now_ms: u64,
    pub most: u32,
}

impl PromoteWebhooks {
    /// Notices moved.
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<u64> {
        p.scripts
            .promote_webhooks
            .key(p.keys.webhook_retries())
            .key(p.keys.webhook_outbox())
            .arg(self.now_ms)
            .arg(self.most)
            .invoke_async(&mut p.conn.clone())
            .await
    }
}
