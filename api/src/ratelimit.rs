//! Rate limits, shared by every API process through Redis.
//!
//! Each limit is an exact sliding log in a Redis sorted set, checked and
//! recorded by one Lua script (`rate_limit.lua`) that reads Redis's own
//! clock: concurrent requests, on one process or many, can never be admitted
//! beyond a limit, and no window boundary lets twice the limit through.
//! A request subject to several limits (a submit is counted as a submit, in
//! bg-removal images and maybe as a bulk job) is admitted by all of them in
//! the same script call or by none, so a refusal never spends quota.
//!
//! Answers carry the IETF draft `RateLimit-Policy` and `RateLimit` fields
//! (draft-ietf-httpapi-ratelimit-headers, structured-field form), and a
//! refusal is a 429 with `Retry-After`.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use image_queue_stages::fetch::parse_network;

use crate::ApiConfigError;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use image_queue_pipeline::rate_limits;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::AppState;

/// At most `max` units in any `window_secs` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    pub max: u64,
    pub window_secs: u64,
}

impl Limit {
    pub const fn new(max: u64, window_secs: u64) -> Self {
        Limit { max, window_secs }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Off: no request is ever refused for its rate.
    pub enabled: bool,
    /// Writes (anything but GET, HEAD and OPTIONS) per client network.
    pub writes_per_ip: Limit,
    /// Reads of jobs (status, list, events) per vendor.
    pub status_reads_per_vendor: Limit,
    /// Job submissions per vendor.
    pub submits_per_vendor: Limit,
    /// Images submitted for background removal per vendor: the costly
    /// operation, so counted in images, not jobs.
    pub bg_removal_images_per_vendor: Limit,
    /// Bulk jobs (more than `bulk_min_images` images) per vendor.
    pub bulk_jobs_per_vendor: Limit,
    pub bulk_min_images: usize,
    /// Proxies (CIDRs) whose `X-Forwarded-For` is believed. A client's own
    /// `X-Forwarded-For` is ignored, or anyone could pick their bucket.
    pub trusted_proxies: Vec<String>,
}

impl Default for RateLimitConfig {
    /// The seed service's limits.
    fn default() -> Self {
        RateLimitConfig {
            enabled: true,
            writes_per_ip: Limit::new(100, 15 * 60),
            status_reads_per_vendor: Limit::new(1_200, 15 * 60),
            submits_per_vendor: Limit::new(50, 15 * 60),
            bg_removal_images_per_vendor: Limit::new(30, 60 * 60),
            bulk_jobs_per_vendor: Limit::new(10, 60 * 60),
            bulk_min_images: 10,
            trusted_proxies: Vec::new(),
        }
    }
}

impl RateLimitConfig {
    pub fn trusted(&self) -> Result<Vec<IpNet>, ApiConfigError> {
        self.trusted_proxies
            .iter()
            .map(|n| {
                parse_network(n).map_err(|source| ApiConfigError::TrustedProxy {
                    entry: n.clone(),
                    source,
                })
            })
            .collect()
    }
}

/// One limit a request is checked against.
#[derive(Debug, Clone)]
pub struct Check {
    /// The policy's name, as shown in the `RateLimit` fields.
    pub name: &'static str,
    pub subject: String,
    pub limit: Limit,
    /// Units this request uses: 1 for a request, n for n images.
    pub cost: u64,
}

/// What the limits said about an admitted request, for its headers.
#[derive(Debug, Clone, Default)]
pub struct RateState {
    /// Per policy: name, limit, units remaining, seconds until its oldest
    /// unit leaves the window.
    policies: Vec<(&'static str, Limit, u64, u64)>,
}

impl RateState {
    fn policy_field(&self) -> String {
        self.policies
            .iter()
            .map(|(name, l, _, _)| format!("\"{name}\";q={};w={}", l.max, l.window_secs))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn state_field(&self) -> String {
        self.policies
            .iter()
            .map(|(name, _, r, t)| format!("\"{name}\";r={r};t={t}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        if self.policies.is_empty() {
            return Vec::new();
        }
        vec![
            ("ratelimit-policy", self.policy_field()),
            ("ratelimit", self.state_field()),
        ]
    }

    /// Adds the `RateLimit-Policy` and `RateLimit` fields to an answer.
    pub fn apply(&self, resp: &mut Response) {
        for (name, value) in self.headers() {
            if let Ok(v) = HeaderValue::from_str(&value) {
                resp.headers_mut().insert(name, v);
            }
        }
    }
}

fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// Checks a request against every limit in `checks` at once; admitted and
/// recorded by all, or refused with a 429 and recorded by none.
pub async fn check(state: &AppState, checks: &[Check]) -> Result<RateState, ApiError> {
    let cfg = &state.config.rate_limits;
    if !cfg.enabled || checks.is_empty() {
        return Ok(RateState::default());
    }
    for c in checks {
        if c.cost > c.limit.max {
            return Err(ApiError::Unprocessable(format!(
                "this request needs {} units of the {:?} limit, which allows {} per {} s: split it",
                c.cost, c.name, c.limit.max, c.limit.window_secs
            )));
        }
    }
    let verdict = rate_limits::spend(state.jobs.pipeline(), &spends(checks, true)).await?;
    let rs = RateState {
        policies: checks
            .iter()
            .zip(&verdict.left)
            .map(|(c, &(remaining, reset_ms))| (c.name, c.limit, remaining, ceil_secs(reset_ms)))
            .collect(),
    };
    let Some(refused) = verdict.refused_by.map(|i| &checks[i]) else {
        return Ok(rs);
    };
    // At least a second: a client told 0 would come straight back.
    let retry_after_s = ceil_secs(verdict.retry_after_ms).max(1);
    // The refusing policy's state says when it frees up, not when its oldest
    // unit leaves: tell the client the wait that matters.
    let mut shown = rs.clone();
    for p in shown.policies.iter_mut() {
        if p.0 == refused.name {
            p.3 = retry_after_s;
        }
    }
    Err(ApiError::TooManyRequests {
        message: format!(
            "rate limit {:?} reached ({} per {} s); retry in {retry_after_s} s",
            refused.name, refused.limit.max, refused.limit.window_secs
        ),
        retry_after_s,
        headers: shown.headers(),
    })
}

/// What each limit in `checks` has left, spending nothing: per check, the
/// units remaining and the ms until its oldest unit leaves the window.
/// With limits off, every limit has all it allows.
pub async fn peek(state: &AppState, checks: &[Check]) -> Result<Vec<(u64, u64)>, ApiError> {
    if !state.config.rate_limits.enabled || checks.is_empty() {
        return Ok(checks.iter().map(|c| (c.limit.max, 0)).collect());
    }
    // A cost of 0 is never refused nor recorded: the script only counts.
    Ok(rate_limits::spend(state.jobs.pipeline(), &spends(checks, false))
        .await?
        .left)
}

/// The checks as the pipeline's limits, costing what they cost or nothing.
fn spends(checks: &[Check], with_cost: bool) -> Vec<rate_limits::Spend<'_>> {
    checks
        .iter()
        .map(|c| rate_limits::Spend {
            name: c.name,
            subject: &c.subject,
            max: c.limit.max,
            window_ms: c.limit.window_secs.saturating_mul(1000),
            cost: if with_cost { c.cost } else { 0 },
        })
        .collect()
}

/// The 429 of a request refused by `c`, to retry in `retry_after_s`.
pub fn refusal(c: &Check, retry_after_s: u64) -> ApiError {
    ApiError::TooManyRequests {
        message: format!(
            "rate limit {:?} reached ({} per {} s); retry in {retry_after_s} s",
            c.name, c.limit.max, c.limit.window_secs
        ),
        retry_after_s,
        headers: Vec::new(),
    }
}

/// The client's address: the peer's, unless the peer is a trusted proxy,
/// in which case `X-Forwarded-For` is walked from its right end (the hop our
/// proxy added) past every trusted proxy to the first address that is not.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    let mut client = peer;
    if !is_trusted(&client) {
        return client;
    }
    let hops: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    for hop in hops.iter().rev() {
        match hop.parse::<IpAddr>() {
            Ok(ip) => {
                client = ip;
                if !is_trusted(&client) {
                    break;
                }
            }
            // Garbage in the chain: the last address we could trust is as
            // far as we can tell.
            Err(_) => break,
        }
    }
    client
}

/// The rate-limit subject of a client address: an IPv4 address, or an IPv6
/// client's /64, since one host commonly holds a whole /64.
pub fn ip_subject(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip4-{v4}"),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => format!("ip4-{v4}"),
            None => {
                let s = v6.segments();
                let net = Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0);
                format!("ip6-{net}/64")
            }
        },
    }
}

/// Middleware: every write counts against its client network's limit,
/// before authentication, so floods of bad keys are limited too.
pub async fn limit_writes(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) || !state.config.rate_limits.enabled {
        return next.run(req).await;
    }
    let cfg = &state.config.rate_limits;
    // Checked at startup by `ApiConfig::validate`; a bad entry here is
    // ignored rather than failing every request.
    let trusted = cfg.trusted().unwrap_or_default();
    let subject = match req.extensions().get::<ConnectInfo<SocketAddr>>() {
        Some(ConnectInfo(peer)) => ip_subject(client_ip(peer.ip(), req.headers(), &trusted)),
        // Served without peer addresses: every client shares one bucket,
        // which errs on the side of limiting.
        None => "unknown".to_string(),
    };
    let checks = [Check {
        name: "writes",
        subject,
        limit: cfg.writes_per_ip,
        cost: 1,
    }];
    match check(&state, &checks).await {
        Ok(rs) => {
            let mut resp = next.run(req).await;
            // A handler's own, more specific limits take precedence.
            if !resp.headers().contains_key("ratelimit") {
                rs.apply(&mut resp);
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.1.1.1, 203.0.113.9, 10.0.0.7".parse().unwrap());
        // From an untrusted peer the header is the client's own claim.
        assert_eq!(
            client_ip("198.51.100.1".parse().unwrap(), &h, &trusted),
            "198.51.100.1".parse::<IpAddr>().unwrap()
        );
        // Through trusted proxies: the first untrusted hop from the right,
        // not the leftmost entry, which the client wrote.
        assert_eq!(
            client_ip("10.0.0.1".parse().unwrap(), &h, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let a = ip_subject("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = ip_subject("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = ip_subject("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(ip_subject("::ffff:192.0.2.1".parse().unwrap()), "ip4-192.0.2.1");
    }

    #[test]
    fn a_trusted_proxy_that_is_no_address_is_refused_with_its_cause() {
        let cfg = RateLimitConfig {
            trusted_proxies: vec!["10.0.0.0/8".into(), "10.0.0.300".into()],
            ..RateLimitConfig::default()
        };
        let e = cfg.trusted().unwrap_err();
        assert!(
            matches!(&e, ApiConfigError::TrustedProxy { entry, .. } if entry == "10.0.0.300"),
            "{e}"
        );
        assert!(
            std::error::Error::source(&e).is_some(),
            "the parse error is kept as the cause"
        );
    }
}
