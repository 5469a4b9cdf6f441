//! Pipeline statistics from `XINFO` and `XPENDING`, for the API and CLI.

use std::collections::HashMap;

use redis::AsyncCommands;
use serde::Serialize;

use crate::context::Pipeline;
use crate::event::StageName;
use crate::now_ms;
use crate::runner::Heartbeat;

#[derive(Debug, Clone, Serialize)]
pub struct StageStats {
    pub stage: String,
    pub length: u64,
    /// Entries not yet delivered to any consumer. Redis 7 may not know it
    /// after deletions; then it is counted from the stream.
    pub lag: u64,
    pub pending: u64,
    pub oldest_pending_ms: Option<u64>,
    pub consumers: u64,
    pub retrying: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct PipelineStats {
    pub stages: Vec<StageStats>,
    pub dead_letters: u64,
    pub workers: Vec<Heartbeat>,
}

/// Workers not heard from for this long are taken for dead.
pub const HEARTBEAT_STALE_MS: u64 = 15_000;

pub async fn collect(p: &Pipeline) -> redis::RedisResult<PipelineStats> {
    let mut conn = p.conn.clone();
    let mut stages = Vec::new();
    for stage in StageName::ALL {
        let stream = p.keys.stream(stage);
        let length: u64 = conn.xlen(&stream).await.unwrap_or(0);
        let groups: redis::RedisResult<Vec<HashMap<String, redis::Value>>> = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(&stream)
            .query_async(&mut conn)
            .await;
        let group = groups.ok().and_then(|gs| {
            gs.into_iter()
                .find(|g| value_str(g.get("name")) == Some(stage.as_str().to_string()))
        });
        let (pending, consumers, lag, last) = match &group {
            Some(g) => (
                value_u64(g.get("pending")),
                value_u64(g.get("consumers")),
                g.get("lag")
                    .and_then(|v| redis::from_redis_value_ref::<Option<u64>>(v).ok().flatten()),
                value_str(g.get("last-delivered-id")),
            ),
            None => (0, 0, Some(length), None),
        };
        let lag = match (lag, last) {
            (Some(l), _) => l,
            // Lag unknown: count the entries after the last delivered one.
            (None, Some(last)) => {
                let after: Vec<redis::Value> = redis::cmd("XRANGE")
                    .arg(&stream)
                    .arg(format!("({last}"))
                    .arg("+")
                    .arg("COUNT")
                    .arg(100_000)
                    .query_async(&mut conn)
                    .await
                    .unwrap_or_default();
                after.len() as u64
            }
            (None, None) => length,
        };
        let oldest_pending_ms = if pending > 0 {
            let summary: redis::RedisResult<(u64, Option<String>, Option<String>, redis::Value)> =
                redis::cmd("XPENDING")
                    .arg(&stream)
                    .arg(stage.as_str())
                    .query_async(&mut conn)
                    .await;
            summary
                .ok()
                .and_then(|s| s.1)
                .and_then(|id| id.split('-').next().and_then(|ms| ms.parse::<u64>().ok()))
                .map(|ms| now_ms().saturating_sub(ms))
        } else {
            None
        };
        let retrying: u64 = conn.zcard(p.keys.retries(stage)).await.unwrap_or(0);
        stages.push(StageStats {
            stage: stage.as_str().into(),
            length,
            lag,
            pending,
            oldest_pending_ms,
            consumers,
            retrying,
        });
    }
    let dead_letters: u64 = conn.xlen(p.keys.dead_letters()).await.unwrap_or(0);
    let beats: HashMap<String, String> = conn.hgetall(p.keys.workers()).await.unwrap_or_default();
    let now = now_ms();
    let mut workers: Vec<Heartbeat> = beats
        .values()
        .filter_map(|b| serde_json::from_str::<Heartbeat>(b).ok())
        .filter(|b| now.saturating_sub(b.last_seen_ms) < HEARTBEAT_STALE_MS)
        .collect();
    workers.sort_by(|a, b| a.stage.cmp(&b.stage).then(a.consumer.cmp(&b.consumer)));
    Ok(PipelineStats {
        stages,
        dead_letters,
        workers,
    })
}

fn value_str(v: Option<&redis::Value>) -> Option<String> {
    v.and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
}

fn value_u64(v: Option<&redis::Value>) -> u64 {
    v.and_then(|v| redis::from_redis_value_ref::<u64>(v).ok()).unwrap_or(0)
}
