//! Sliding-window rate limits in Redis: one call of `rate_limit.lua` checks
//! a request against every limit at once, and records it in all or none.
//! What the limits are and what a refusal tells the client is the API's.

use crate::context::Pipeline;
pub use crate::scripts::rate_limit::{Spend, Verdict};
use crate::scripts::SpendRateLimits;

/// Checks and, when every limit admits it, records a request.
pub async fn spend(p: &Pipeline, spends: &[Spend<'_>]) -> redis::RedisResult<Verdict> {
    SpendRateLimits { spends }.run(p).await
}
