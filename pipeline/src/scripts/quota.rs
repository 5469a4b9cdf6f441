//! `quota.lua`'s one typed call: charges one image against its vendor's
//! processing quotas. The only Rust code that knows that script's KEYS and
//! ARGV order; every key comes from `keys.rs`.

use crate::context::Pipeline;

/// Charge image `image` of `job` against `vendor`'s quota for each of
/// `charges` (an operation and its most images per window): all of them
/// or none, and once however often the image is delivered.
pub struct ChargeQuotas<'a> {
    pub vendor: &'a str,
    pub job: &'a str,
    pub image: u32,
    pub charges: &'a [(&'a str, u64)],
    pub window_ms: u64,
}

/// What the quotas said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charged {
    /// Charged now, or already charged on an earlier delivery.
    Admitted,
    /// Over a quota: the image fits in this many ms.
    FitsInMs(u64),
}

impl ChargeQuotas<'_> {
    pub async fn run(&self, p: &Pipeline) -> redis::RedisResult<Charged> {
        if self.charges.is_empty() {
            return Ok(Charged::Admitted);
        }
        let mut call = p.scripts.quota.prepare_invoke();
        call.arg(format!("{}:{}", self.job, self.image));
        for (op, limit) in self.charges {
            call.key(p.keys.quota(self.vendor, op)).arg(*limit).arg(self.window_ms);
        }
        let wait: u64 = call.invoke_async(&mut p.conn.clone()).await?;
        Ok(match wait {
            0 => Charged::Admitted,
            ms => Charged::FitsInMs(ms),
        })
    }
}
