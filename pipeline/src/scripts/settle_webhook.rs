//! `settle_webhook.lua`'s one typed call: ends one delivery of a webhook
//! notice. The only Rust code that knows that script's KEYS and ARGV
//! order; every key comes from `keys.rs`.

use crate::context::Pipeline;

/// Acknowledge outbox entry `entry_id` in `group`, schedule `retry` (a
/// retry-set member and when it is due) if any, and write `outcome` on
/// the job record when the job is known and the outcome is not empty.
pub struct SettleWebhook<'a> {
    pub group: &'a str,
    pub entry_id: &'a str,
    /// The job the notice is of; `None` when the notice names none (then
    /// the job is left out of KEYS, not passed as an empty key, which a
    /// cluster refuses as a cross-slot call).
    pub job_id: Option<&'a str>,
    pub outcome: &'a str,
    pub retry: Option<(&'a str, u64)>,
}

impl SettleWebhook<'_> {
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<()> {
        let mut inv = p.scripts.settle_webhook.prepare_invoke();
        inv.key(p.keys.webhook_outbox()).key(p.keys.webhook_retries());
        if let Some(job) = self.job_id {
            inv.key(p.keys.job(job));
        }
        let (member, due_ms) = self.retry.unwrap_or(("", 0));
        inv.arg(self.group)
            .arg(self.entry_id)
            .arg(self.outcome)
            .arg(member)
            .arg(due_ms);
        let _: i64 = inv.invoke_async(&mut p.conn.clone()).await?;
        Ok(())
    }
}
