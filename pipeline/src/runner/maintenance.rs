//! A worker's background chores, beside its consumer.
//!
//! Owns what keeps a stage's Redis state tidy and visible: moving due
//! retries back onto the stream (`promote.lua`), trimming acknowledged
//! entries (`trim.lua`), removing idle consumers (`reap_consumers.lua`),
//! publishing the heartbeat, and on rate-check the pipeline-wide chores:
//! correcting the admission counter, deleting the blobs of jobs whose
//! linger is over and sweeping expired blobs. It must not read or end
//! entries (the consumer and the finisher do).

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Heartbeat, StageRunner};
use crate::admission::Reconciled;
use crate::event::StageName;
use crate::now_ms;
use crate::scripts::{PromoteRetries, ReapConsumers, TrimAcknowledged};

impl StageRunner {
    /// The background chores of a worker, until shutdown.
    pub(super) async fn maintain(self: Arc<Self>, shutdown: CancellationToken) {
        let trim_every = Duration::from_millis(self.cfg.trim_every_ms);
        let mut next_trim = Instant::now() + trim_every;
        let mut next_beat = Instant::now();
        let mut next_reap = Instant::now() + Duration::from_secs(60);
        let mut next_sweep = Instant::now() + Duration::from_secs(600);
        let mut next_linger_check = Instant::now();
        let reconcile_every = Duration::from_millis(self.cfg.reconcile_every_ms.max(1_000));
        let mut next_reconcile = Instant::now() + reconcile_every;
        loop {
            let mut wait = Duration::from_millis(250);
            match self.promote().await {
                Ok(Some(due)) => wait = wait.min(Duration::from_millis(due.saturating_sub(now_ms()).max(5))),
                Ok(None) => {}
                Err(e) => debug!(error = %e, "promoting retries failed"),
            }
            let now = Instant::now();
            if now >= next_trim {
                next_trim = now + trim_every;
                match (TrimAcknowledged { stage: self.name }).run(&self.p).await {
                    Ok(n) if n > 0 => debug!(stage = %self.name, trimmed = n, "trimmed"),
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "trimming failed"),
                }
            }
            if now >= next_beat {
                next_beat = now + Duration::from_secs(2);
                self.heartbeat().await;
            }
            if now >= next_reap {
                next_reap = now + Duration::from_secs(60);
                let r = ReapConsumers {
                    stage: self.name,
                    idle_ms: self.cfg.reap_idle_ms,
                    keep: self.consumer(),
                }
                .run(&self.p)
                .await;
                if let Ok(n) = r {
                    if n > 0 {
                        info!(stage = %self.name, removed = n, "removed idle consumers");
                    }
                }
            }
            if now >= next_reconcile && self.fair() {
                next_reconcile = now + reconcile_every;
                match crate::admission::reconcile(&self.p).await {
                    Ok(Reconciled::Repaired { in_flight, counter_was }) => {
                        warn!(
                            in_flight,
                            counter_was, "the admission counter had drifted; corrected it"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => debug!(error = %e, "reconciling the admission counter failed"),
                }
            }
            // Once a second: a linger is meant in tens of seconds.
            if self.name == StageName::RateCheck && self.cfg.blob_linger_ms > 0 && now >= next_linger_check {
                next_linger_check = now + Duration::from_secs(1);
                self.delete_lingering_blobs().await;
            }
            if now >= next_sweep && self.name == StageName::RateCheck {
                next_sweep = now + Duration::from_secs(600);
                match self.p.blobs.sweep(Duration::from_millis(self.cfg.blob_ttl_ms)).await {
                    Ok(n) if n > 0 => info!(removed = n, "swept expired blobs"),
                    _ => {}
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Deletes a completed job's blobs, at once or, with `blob_linger_ms`,
    /// by scheduling their deletion (see [`StageRunner::delete_lingering_blobs`]).
    pub(super) async fn drop_blobs_of_completed(&self, job: &str) {
        if self.cfg.blob_linger_ms == 0 {
            if let Err(e) = self.p.blobs.delete_job(job).await {
                warn!(job, error = %e, "removing a finished job's blobs failed");
            }
            return;
        }
        let mut conn = self.p.conn.clone();
        let due = now_ms() + self.cfg.blob_linger_ms;
        let r: redis::RedisResult<()> = conn.zadd(self.p.keys.blob_deletions(), job, due).await;
        if let Err(e) = r {
            // The sweep (`blob_ttl_ms`) takes them in the end.
            warn!(job, error = %e, "scheduling a finished job's blob deletion failed");
        }
    }

    /// Deletes the blobs of jobs whose linger is over (rate-check's chore).
    pub(super) async fn delete_lingering_blobs(&self) {
        let mut conn = self.p.conn.clone();
        let key = self.p.keys.blob_deletions();
        let due: redis::RedisResult<Vec<String>> = redis::cmd("ZRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(now_ms())
            .arg("LIMIT")
            .arg(0)
            .arg(100)
            .query_async(&mut conn)
            .await;
        for job in due.unwrap_or_default() {
            match self.p.blobs.delete_job(&job).await {
                Ok(()) => {
                    let _: redis::RedisResult<()> = conn.zrem(&key, &job).await;
                }
                Err(e) => warn!(job, error = %e, "removing a finished job's blobs failed; will try again"),
            }
        }
    }
    /// Moves due retries back onto the stream; returns when the next is due.
    pub(super) async fn promote(&self) -> redis::RedisResult<Option<u64>> {
        let promoted = PromoteRetries {
            stage: self.name,
            now_ms: now_ms(),
            most: 200,
        }
        .run(&self.p)
        .await?;
        Ok(promoted.next_due_ms)
    }

    pub(super) async fn heartbeat(&self) {
        let beat = Heartbeat {
            consumer: self.consumer().to_string(),
            stage: self.name.as_str().to_string(),
            host: hostname::get()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            pid: std::process::id(),
            concurrency: self.cfg.concurrency,
            in_flight: self.consumer.in_flight(),
            last_seen_ms: now_ms(),
            service_ms: None,
            capacity_per_s: None,
            last_handled_ms: 0,
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            measures: self.stage.measures(),
        };
        let beat = self.service.lock().unwrap().describe(beat, self.cfg.concurrency);
        let mut conn = self.p.conn.clone();
        let _: redis::RedisResult<()> = conn
            .hset(
                self.p.keys.workers(),
                self.consumer(),
                serde_json::to_string(&beat).unwrap_or_default(),
            )
            .await;
    }
}
