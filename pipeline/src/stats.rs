//! Pipeline statistics for the API, the dashboard and `image-queue stats`:
//! stream figures from `XINFO` and `XPENDING`, live workers from their
//! heartbeats, throughput from the runner's minute counters (see
//! [`crate::metrics`]), and a line of advice per stage saying whether it
//! keeps up or needs more consumers.
//!
//! Per-vendor backlog and the throttled count need the events themselves;
//! they are read from at most [`SAMPLE_MAX`] entries per stage, and the
//! result says when it is a sample.

use std::collections::{BTreeMap, HashMap};

use redis::AsyncCommands;
use serde::{Deserialize, Serialize};

use crate::context::Pipeline;
use crate::event::StageName;
use crate::heartbeat::Heartbeat;
use crate::now_ms;

/// Most waiting events per stage (and per retry set) read for the
/// per-vendor backlog.
pub const SAMPLE_MAX: usize = 10_000;

/// A backlog that takes longer than this to drain at the current rate
/// calls for more consumers.
const DRAIN_ADVICE_S: f64 = 300.0;

#[derive(Debug, Clone, Serialize)]
pub struct ConsumerStats {
    pub name: String,
    /// From the consumer's heartbeat; `None` when it has none (it is dead).
    pub host: Option<String>,
    pub pending: u64,
    pub idle_ms: u64,
    /// Whether its heartbeat is fresh.
    pub live: bool,
}

/// Lifetime counts of what the stage's workers did with events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Totals {
    pub processed: u64,
    /// Failed attempts, retried or dead-lettered.
    pub failed: u64,
    pub retried: u64,
    pub throttled: u64,
    pub dead: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageStats {
    pub stage: String,
    pub length: u64,
    /// Entries not yet delivered to any consumer. Redis 7.0 may not know it
    /// after deletions; then it is counted from the stream.
    pub lag: u64,
    /// Delivered and not yet acknowledged: being worked on.
    pub pending: u64,
    pub oldest_pending_ms: Option<u64>,
    /// Consumers registered in the group, live or not.
    pub consumers: Vec<ConsumerStats>,
    /// Workers of this stage with a fresh heartbeat.
    pub live_workers: u64,
    /// Waiting in the retry set after a failed attempt.
    pub retrying: u64,
    /// Waiting in the retry set for a vendor's quota (events with no failed
    /// attempt); counted from a sample when the set is large.
    pub throttled: u64,
    /// Events finished per second over the last minute and five minutes.
    pub throughput_1m: f64,
    pub throughput_5m: f64,
    /// Failed attempts per second over the last five minutes.
    pub failures_5m: f64,
    pub totals: Totals,
    /// Waiting events (undelivered or in the retry set) per vendor.
    pub vendor_backlog: BTreeMap<String, u64>,
    /// What an operator should do about this stage, if anything.
    pub advice: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineStats {
    pub collected_ms: u64,
    pub stages: Vec<StageStats>,
    pub dead_letters: u64,
    pub workers: Vec<Heartbeat>,
    /// Waiting events per vendor, all stages together.
    pub vendor_backlog: BTreeMap<String, u64>,
    /// True when the per-vendor figures come from a sample.
    pub backlog_sampled: bool,
    /// The admission window rate-check's dispatcher keeps, and why; `None`
    /// when no dispatcher runs (or fair scheduling is off).
    pub admission: Option<crate::admission::window::WindowChoice>,
}

impl PipelineStats {
    /// Stages with work (waiting, in flight or due for retry) and no live
    /// worker: nothing will move them.
    pub fn starved_stages(&self) -> Vec<&str> {
        self.stages
            .iter()
            .filter(|s| (s.lag > 0 || s.pending > 0 || s.retrying + s.throttled > 0) && s.live_workers == 0)
            .map(|s| s.stage.as_str())
            .collect()
    }
}

/// Workers not heard from for this long are taken for dead.
pub const HEARTBEAT_STALE_MS: u64 = 15_000;

/// The two fields of an event the stats need.
#[derive(Deserialize)]
struct Peek {
    vendor: String,
    #[serde(default)]
    attempt: u32,
}

pub async fn collect(p: &Pipeline) -> redis::RedisResult<PipelineStats> {
    let mut conn = p.conn.clone();
    let now = now_ms();
    let beats: HashMap<String, String> = conn.hgetall(p.keys.workers()).await.unwrap_or_default();
    let mut workers: Vec<Heartbeat> = beats
        .values()
        .filter_map(|b| serde_json::from_str::<Heartbeat>(b).ok())
        .filter(|b| now.saturating_sub(b.last_seen_ms) < HEARTBEAT_STALE_MS)
        .collect();
    workers.sort_by(|a, b| a.stage.cmp(&b.stage).then(a.consumer.cmp(&b.consumer)));
    let by_consumer: HashMap<&str, &Heartbeat> = workers.iter().map(|w| (w.consumer.as_str(), w)).collect();

    let mut stages = Vec::new();
    let mut sampled = false;
    let mut all_vendors: BTreeMap<String, u64> = BTreeMap::new();
    for stage in StageName::ALL {
        let stream = p.keys.stream(stage);
        let group = p.keys.group(stage);
        let length: u64 = conn.xlen(&stream).await.unwrap_or(0);
        let groups: redis::RedisResult<Vec<HashMap<String, redis::Value>>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(&mut conn)
            .await;
        let info = groups.ok().and_then(|gs| {
            gs.into_iter()
                .find(|g| value_str(g.get("name")).as_deref() == Some(group))
        });
        let (pending, lag, last) = match &info {
            Some(g) => (
                value_u64(g.get("pending")),
                g.get("lag")
                    .and_then(|v| redis::from_redis_value_ref::<Option<u64>>(v).ok().flatten()),
                value_str(g.get("last-delivered-id")),
            ),
            None => (0, Some(length), None),
        };
        // The undelivered entries: for the per-vendor backlog, and for the
        // lag itself when Redis does not know it.
        let start = last.map(|l| format!("({l}")).unwrap_or_else(|| "-".into());
        let waiting: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(&stream)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(SAMPLE_MAX)
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        // A lag longer than the stream is a promoted replica's stale read
        // counter: count instead.
        let lag = lag.filter(|&l| l <= length).unwrap_or(waiting.len() as u64);
        sampled |= waiting.len() >= SAMPLE_MAX;
        let mut vendors: BTreeMap<String, u64> = BTreeMap::new();
        for (_, f) in &waiting {
            if let Some(peek) = f
                .get(crate::event::EVENT_FIELD)
                .and_then(|e| serde_json::from_str::<Peek>(e).ok())
            {
                *vendors.entry(peek.vendor).or_default() += 1;
            }
        }

        let oldest_pending_ms = if pending > 0 {
            let summary: redis::RedisResult<(u64, Option<String>, Option<String>, redis::Value)> =
                redis::cmd("XPENDING")
                    .arg(&stream)
                    .arg(group)
                    .query_async(&mut conn)
                    .await;
            summary
                .ok()
                .and_then(|s| s.1)
                .and_then(|id| id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()))
                .map(|ms| now.saturating_sub(ms))
        } else {
            None
        };

        let listed: Vec<HashMap<String, redis::Value>> = if info.is_some() {
            redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(&stream)
                .arg(group)
                .query_async(&mut conn)
                .await
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let mut consumers: Vec<ConsumerStats> = listed
            .iter()
            .filter_map(|c| {
                let name = value_str(c.get("name"))?;
                let beat = by_consumer.get(name.as_str());
                Some(ConsumerStats {
                    host: beat.map(|b| b.host.clone()),
                    live: beat.is_some(),
                    pending: value_u64(c.get("pending")),
                    idle_ms: value_u64(c.get("idle")),
                    name,
                })
            })
            .collect();
        consumers.sort_by(|a, b| a.name.cmp(&b.name));
        let live_workers = workers.iter().filter(|w| w.stage == stage.as_str()).count() as u64;

        // Waiting retries: failed attempts versus quota waits, by vendor.
        let retry_key = p.keys.retries(stage);
        let in_retry: u64 = conn.zcard(&retry_key).await.unwrap_or(0);
        let (mut throttled, mut retrying) = (0u64, 0u64);
        if in_retry > 0 {
            let members: Vec<String> = conn
                .zrange(&retry_key, 0, SAMPLE_MAX as isize - 1)
                .await
                .unwrap_or_default();
            sampled |= in_retry > members.len() as u64;
            for m in &members {
                if let Ok(peek) = serde_json::from_str::<Peek>(m) {
                    if peek.attempt == 0 {
                        throttled += 1;
                    } else {
                        retrying += 1;
                    }
                    *vendors.entry(peek.vendor).or_default() += 1;
                }
            }
            // Whatever the sample did not reach counts as retrying.
            retrying += in_retry.saturating_sub(members.len() as u64);
        }

        let (totals, per_minute) = counters(p, stage, now).await;
        let frac = (now % 60_000) as f64 / 60_000.0;
        let processed = |i: usize| per_minute[i].0 as f64;
        let throughput_1m = (processed(0) + processed(1) * (1.0 - frac)) / 60.0;
        let throughput_5m = ((0..5).map(processed).sum::<f64>() + processed(5) * (1.0 - frac)) / 300.0;
        let failed = |i: usize| per_minute[i].1 as f64;
        let failures_5m = ((0..5).map(failed).sum::<f64>() + failed(5) * (1.0 - frac)) / 300.0;

        for (v, n) in &vendors {
            *all_vendors.entry(v.clone()).or_default() += n;
        }
        let mut s = StageStats {
            stage: stage.as_str().into(),
            length,
            lag,
            pending,
            oldest_pending_ms,
            consumers,
            live_workers,
            retrying,
            throttled,
            throughput_1m: round2(throughput_1m),
            throughput_5m: round2(throughput_5m),
            failures_5m: round2(failures_5m),
            totals,
            vendor_backlog: vendors,
            advice: None,
        };
        s.advice = advice(&s);
        stages.push(s);
    }
    let dead_letters: u64 = conn.xlen(p.keys.dead_letters()).await.unwrap_or(0);
    Ok(PipelineStats {
        collected_ms: now,
        stages,
        dead_letters,
        workers,
        vendor_backlog: all_vendors,
        backlog_sampled: sampled,
        admission: crate::admission::published_window(p).await.unwrap_or(None),
    })
}

/// A stage's lifetime totals and, for this minute and the five before it,
/// (processed, failed) counts.
async fn counters(p: &Pipeline, stage: StageName, now: u64) -> (Totals, Vec<(u64, u64)>) {
    let minute = now / 60_000;
    let mut pipe = redis::pipe();
    pipe.hgetall(p.keys.counters(stage));
    for back in 0..6 {
        pipe.hmget(p.keys.counters_minute(stage, minute - back), &["processed", "failed"]);
    }
    let mut conn = p.conn.clone();
    let Ok(replies) = pipe.query_async::<Vec<redis::Value>>(&mut conn).await else {
        return (Totals::default(), vec![(0, 0); 6]);
    };
    let mut replies = replies.into_iter();
    let total: HashMap<String, u64> = replies
        .next()
        .and_then(|v| redis::from_redis_value(v).ok())
        .unwrap_or_default();
    let minutes: Vec<(Option<u64>, Option<u64>)> = replies
        .map(|v| redis::from_redis_value(v).unwrap_or((None, None)))
        .collect();
    let get = |k: &str| total.get(k).copied().unwrap_or(0);
    let totals = Totals {
        processed: get("processed"),
        failed: get("failed"),
        retried: get("retried"),
        throttled: get("throttled"),
        dead: get("dead"),
    };
    let per_minute = minutes.iter().map(|(p, f)| (p.unwrap_or(0), f.unwrap_or(0))).collect();
    (totals, per_minute)
}

/// What to do about a stage, or `None` when it keeps up.
pub fn advice(s: &StageStats) -> Option<String> {
    let waiting = s.lag + s.pending;
    if waiting == 0 && s.retrying + s.throttled == 0 {
        return None;
    }
    if s.live_workers == 0 {
        return Some(format!(
            "{}: {} waiting and no live worker; start one (image-queue worker --stage {})",
            s.stage,
            waiting + s.retrying + s.throttled,
            s.stage
        ));
    }
    if s.lag == 0 {
        return None;
    }
    let rate = if s.throughput_1m > 0.0 {
        s.throughput_1m
    } else {
        s.throughput_5m
    };
    if rate <= 0.0 {
        return Some(format!(
            "{}: lag {}, nothing finished in 5 min; check its workers' logs",
            s.stage, s.lag
        ));
    }
    let drain_s = s.lag as f64 / rate;
    let when = human_duration(drain_s);
    if drain_s > DRAIN_ADVICE_S {
        Some(format!(
            "{}: lag {}, drains in ~{when} at {rate:.1} img/s; add consumers",
            s.stage, s.lag
        ))
    } else {
        Some(format!(
            "{}: lag {}, drains in ~{when} at {rate:.1} img/s",
            s.stage, s.lag
        ))
    }
}

fn human_duration(s: f64) -> String {
    if s < 90.0 {
        format!("{:.0} s", s.max(1.0))
    } else if s < 5400.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn value_str(v: Option<&redis::Value>) -> Option<String> {
    v.and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

fn value_u64(v: Option<&redis::Value>) -> u64 {
    v.and_then(|v| redis::from_redis_value_ref::<u64>(v).ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(lag: u64, live: u64, rate: f64) -> StageStats {
        StageStats {
            stage: "bg-removal".into(),
            length: lag,
            lag,
            pending: 0,
            oldest_pending_ms: None,
            consumers: Vec::new(),
            live_workers: live,
            retrying: 0,
            throttled: 0,
            throughput_1m: rate,
            throughput_5m: rate,
            failures_5m: 0.0,
            totals: Totals::default(),
            vendor_backlog: BTreeMap::new(),
            advice: None,
        }
    }

    #[test]
    fn advice_names_the_stage_to_scale() {
        assert_eq!(advice(&stage(0, 1, 0.0)), None);
        assert_eq!(
            advice(&stage(840, 2, 1.0)).as_deref(),
            Some("bg-removal: lag 840, drains in ~14 min at 1.0 img/s; add consumers")
        );
        assert_eq!(
            advice(&stage(30, 2, 1.0)).as_deref(),
            Some("bg-removal: lag 30, drains in ~30 s at 1.0 img/s")
        );
        assert!(advice(&stage(5, 0, 0.0)).unwrap().contains("no live worker"));
    }
}
