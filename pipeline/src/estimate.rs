//! When will a vendor's next image start? An estimate for the submit
//! response and the status of a job still waiting.
//!
//! The dispatcher feeds the stages from per-vendor queues in weighted
//! round-robin, so an image waits for the images queued before it *by its
//! own vendor*, drained at the vendor's share of the pipeline's measured
//! throughput: `weight / sum of the weights of vendors with images waiting`.
//! Other vendors' backlogs only shrink that share; they are never ahead of
//! it. A processing quota that is used up pushes the start out to when its
//! oldest charge leaves the window, whatever the queue says.
//!
//! Throughput is what the last stage finished in the last minute (five
//! when the last minute saw nothing; the seconds since work began when that
//! was less than a minute ago), from the runner's counters. With no
//! throughput measured yet and images waiting, there is nothing honest to
//! say, and the estimate is `None`.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::context::Pipeline;
use crate::event::StageName;
use crate::now_ms;

/// The processing quotas the rate-check stage enforces (its config), for
/// estimates made outside it.
#[derive(Debug, Clone, Default)]
pub struct QuotaConfig {
    /// Images per window, by operation name.
    pub limits: BTreeMap<String, u64>,
    pub window_ms: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StartEstimate {
    /// The millisecond (since the epoch) the next image is expected to start.
    pub start_ms: u64,
    /// The vendor's images queued ahead.
    pub queued_ahead: u64,
    /// The vendor's share of the pipeline while others have images waiting.
    pub share: f64,
    /// Images per second the pipeline finished lately.
    pub throughput: f64,
    /// Set when a used-up quota, not the queue, decides the start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota_resumes_ms: Option<u64>,
}

/// The inputs of an estimate, read from Redis; a pure function of them
/// makes the arithmetic testable on its own.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub now_ms: u64,
    pub queued_ahead: u64,
    pub vendor_weight: u64,
    /// Weights of the other vendors with images waiting.
    pub other_weights: Vec<u64>,
    /// Images in flight downstream, and how many the window allows.
    pub admitted: u64,
    pub window: u64,
    pub throughput: f64,
    /// The latest time a used-up quota refills enough for one image.
    pub quota_resumes_ms: Option<u64>,
}

impl Snapshot {
    pub fn estimate(&self) -> Option<StartEstimate> {
        // Until the pipeline has finished some work there is no rate to
        // estimate with, even for "now": absent, as documented; unless a
        // used-up quota decides the start, which needs no rate.
        let measured = self.throughput > 0.0 && self.throughput.is_finite();
        if !measured && self.quota_resumes_ms.is_none() {
            return None;
        }
        let weight = self.vendor_weight.max(1) as f64;
        let others: u64 = self.other_weights.iter().map(|w| (*w).max(1)).sum();
        let share = weight / (weight + others as f64);
        // Images that must finish before ours is dispatched: the vendor's
        // own queue, plus one slot to free when the window is full.
        let full = self.window > 0 && self.admitted >= self.window;
        let ahead = self.queued_ahead as f64 + if full { 1.0 } else { 0.0 };
        let queue_wait_ms = if ahead == 0.0 {
            0
        } else if measured {
            (ahead / (self.throughput * share) * 1000.0).ceil() as u64
        } else {
            return None;
        };
        let queue_start = self.now_ms + queue_wait_ms;
        let start_ms = queue_start.max(self.quota_resumes_ms.unwrap_or(0));
        Some(StartEstimate {
            start_ms,
            queued_ahead: self.queued_ahead,
            share: (share * 1000.0).round() / 1000.0,
            throughput: (self.throughput * 100.0).round() / 100.0,
            quota_resumes_ms: self.quota_resumes_ms.filter(|q| *q > queue_start),
        })
    }
}

/// Reads what an estimate for `vendor`'s next image asking for `ops` needs.
pub async fn snapshot(
    p: &Pipeline,
    vendor: &str,
    ops: &[String],
    quotas: &QuotaConfig,
    window: u64,
) -> redis::RedisResult<Snapshot> {
    let now = now_ms();
    let keys = &p.keys;
    let minute = now / 60_000;
    let mut pipe = redis::pipe();
    pipe.llen(keys.vendor_queue(vendor))
        .lrange(keys.vendor_ring(), 0, -1)
        .hgetall(keys.vendor_weights())
        .get(keys.admitted())
        .hget(keys.admission(), "window");
    for back in 0..6 {
        pipe.hget(keys.counters_minute(StageName::DbCommit, minute - back), "processed");
    }
    let limited: Vec<(&String, u64)> = ops
        .iter()
        .filter_map(|op| quotas.limits.get(op).map(|l| (op, *l)))
        .collect();
    let since = now.saturating_sub(quotas.window_ms);
    for (op, limit) in &limited {
        // The charge that must leave the window before one more fits:
        // counting from the newest, the `limit`-th.
        pipe.zcount(keys.quota(vendor, op), format!("({since}"), "+inf");
        pipe.cmd("ZRANGE")
            .arg(keys.quota(vendor, op))
            .arg("+inf")
            .arg(format!("({since}"))
            .arg("BYSCORE")
            .arg("REV")
            .arg("LIMIT")
            .arg(limit.saturating_sub(1))
            .arg(1)
            .arg("WITHSCORES");
    }
    let mut conn = p.conn.clone();
    type Reply = (
        u64,
        Vec<String>,
        HashMap<String, u64>,
        Option<u64>,
        Option<u64>,
        Vec<Option<u64>>,
        Vec<(u64, Vec<(String, u64)>)>,
    );
    let values: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
    let mut it = values.into_iter();
    let mut next = || it.next().unwrap_or(redis::Value::Nil);
    let reply: Reply = (
        redis::from_redis_value(next())?,
        redis::from_redis_value(next())?,
        redis::from_redis_value(next())?,
        redis::from_redis_value(next())?,
        redis::from_redis_value(next()).unwrap_or(None),
        (0..6)
            .map(|_| redis::from_redis_value(next()).unwrap_or(None))
            .collect(),
        limited
            .iter()
            .map(|_| {
                let count = redis::from_redis_value(next()).unwrap_or(0);
                let oldest = redis::from_redis_value(next()).unwrap_or_default();
                (count, oldest)
            })
            .collect(),
    );
    let (queued_ahead, ring, weights, admitted, published_window, minutes, quota_logs) = reply;
    // The window the dispatcher sized for itself, when one runs.
    let window = if window > 0 {
        published_window.unwrap_or(window)
    } else {
        window
    };
    let processed: Vec<f64> = minutes.iter().map(|m| m.unwrap_or(0) as f64).collect();
    let frac = (now % 60_000) as f64 / 60_000.0;
    let last_minute = if processed[1..].iter().all(|p| *p == 0.0) {
        // Work began this minute: its own seconds so far are the window,
        // or a pipeline just started would look slow for a minute.
        processed[0] / (frac * 60.0).max(1.0)
    } else {
        (processed[0] + processed[1] * (1.0 - frac)) / 60.0
    };
    let throughput = if last_minute > 0.0 {
        last_minute
    } else {
        (processed[..5].iter().sum::<f64>() + processed[5] * (1.0 - frac)) / 300.0
    };
    let mut quota_resumes_ms = None;
    for ((_, limit), (count, nth)) in limited.iter().zip(quota_logs) {
        if count >= *limit {
            if let Some((_, at)) = nth.first() {
                let resumes = at + quotas.window_ms;
                quota_resumes_ms = Some(quota_resumes_ms.unwrap_or(0).max(resumes));
            }
        }
    }
    let weight_of = |v: &str| weights.get(v).copied().unwrap_or(1);
    Ok(Snapshot {
        now_ms: now,
        queued_ahead,
        vendor_weight: weight_of(vendor),
        other_weights: ring.iter().filter(|v| *v != vendor).map(|v| weight_of(v)).collect(),
        admitted: admitted.unwrap_or(0),
        window,
        throughput,
        quota_resumes_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            now_ms: 1_000_000,
            queued_ahead: 0,
            vendor_weight: 1,
            other_weights: vec![],
            admitted: 0,
            window: 32,
            throughput: 10.0,
            quota_resumes_ms: None,
        }
    }

    #[test]
    fn nothing_waiting_starts_now() {
        assert_eq!(snap().estimate().unwrap().start_ms, 1_000_000);
        // But with no throughput measured yet, no estimate at all.
        let s = Snapshot {
            throughput: 0.0,
            ..snap()
        };
        assert_eq!(s.estimate(), None);
    }

    #[test]
    fn own_queue_drains_at_the_vendors_share() {
        // 20 ahead at 10/s alone: 2 s; with three other vendors of weight
        // 1 waiting, a quarter of that rate: 8 s.
        let alone = Snapshot {
            queued_ahead: 20,
            ..snap()
        };
        assert_eq!(alone.estimate().unwrap().start_ms, 1_002_000);
        let shared = Snapshot {
            other_weights: vec![1, 1, 1],
            ..alone.clone()
        };
        let e = shared.estimate().unwrap();
        assert_eq!(e.start_ms, 1_008_000);
        assert_eq!(e.share, 0.25);
        // A heavier vendor gets more: weight 3 against 1 is 3/4.
        let heavy = Snapshot {
            vendor_weight: 3,
            other_weights: vec![1],
            ..alone
        };
        assert_eq!(heavy.estimate().unwrap().start_ms, 1_000_000 + 2_667);
    }

    #[test]
    fn a_used_up_quota_decides_even_before_any_throughput_is_measured() {
        let s = Snapshot {
            throughput: 0.0,
            queued_ahead: 0,
            quota_resumes_ms: Some(snap().now_ms + 1_200),
            ..snap()
        };
        let e = s.estimate().expect("the quota alone decides the start");
        assert_eq!(e.start_ms, s.now_ms + 1_200);
        // With nothing measured and no quota, there is nothing to say.
        let none = Snapshot {
            throughput: 0.0,
            quota_resumes_ms: None,
            ..snap()
        };
        assert_eq!(none.estimate(), None);
    }

    #[test]
    fn a_full_window_costs_one_slot() {
        let s = Snapshot { admitted: 32, ..snap() };
        assert_eq!(s.estimate().unwrap().start_ms, 1_000_100);
    }

    #[test]
    fn a_used_up_quota_decides_when_later() {
        let s = Snapshot {
            queued_ahead: 10,
            quota_resumes_ms: Some(1_060_000),
            ..snap()
        };
        let e = s.estimate().unwrap();
        assert_eq!(e.start_ms, 1_060_000);
        assert_eq!(e.quota_resumes_ms, Some(1_060_000));
        // A quota that refills before the queue drains changes nothing.
        let s = Snapshot {
            quota_resumes_ms: Some(1_000_500),
            ..s
        };
        assert_eq!(s.estimate().unwrap().start_ms, 1_001_000);
        assert_eq!(s.estimate().unwrap().quota_resumes_ms, None);
    }

    #[test]
    fn waiting_without_throughput_is_unknown() {
        let s = Snapshot {
            queued_ahead: 5,
            throughput: 0.0,
            ..snap()
        };
        assert_eq!(s.estimate(), None);
    }
}
