//! Sliding-window rate limits in Redis: one call of `rate_limit.lua` checks
//! a request against every limit at once, and records it in all or none.
//! What the limits are and what a refusal tells the client is the API's.

use crate::context::Pipeline;
use crate::scripts::SpendRateLimits;

/// One limit a request is checked against.
#[derive(Debug, Clone)]
pub struct Spend<'a> {
    /// The limit's name and who it counts (a vendor, an address).
    pub name: &'a str,
    pub subject: &'a str,
    /// Units allowed per window.
    pub max: u64,
    pub window_ms: u64,
    /// Units this request uses; 0 only reads what is left.
    pub cost: u64,
}

/// What the limits said: whether the request was admitted (and recorded),
/// which limit refused it (index into the spends) and in how many ms it
/// could pass, and per limit the units left and the ms until its oldest
/// unit leaves the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub admitted: bool,
    pub refused_by: Option<usize>,
    pub retry_after_ms: u64,
    pub left: Vec<(u64, u64)>,
}

/// Checks and, when every limit admits it, records a request.
pub async fn spend(p: &Pipeline, spends: &[Spend<'_>]) -> redis::RedisResult<Verdict> {
    SpendRateLimits { spends }.run(p).await
}
