//! `image-queue bench window`: how the admission window follows the
//! workers. A backlog flows through a bottleneck stage served by two
//! workers; one is killed (its runtime dropped at once, as a SIGKILL would
//! leave it: no goodbye, its heartbeat and pending entries left behind),
//! later one is added. The window is sampled every half second; the result
//! is one JSON line with the series and how long the window took to settle
//! after each change.
//!
//! Each bottleneck worker runs on a Tokio runtime of its own, with its own
//! Redis connections, so dropping the runtime ends everything it did.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{JobStore, LocalBlobStore, Operation, Pipeline, RunnerConfig, StageName};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::bench::Noop;

pub struct WindowArgs {
    pub redis_url: String,
    /// Milliseconds the bottleneck (resize) spends on each image.
    pub work: Duration,
    /// Each bottleneck worker's concurrency.
    pub concurrency: usize,
    /// Seconds before the kill, between the kill and the addition, and after.
    pub phase: Duration,
}

#[derive(Serialize)]
struct Sample {
    t_s: f64,
    window: u64,
}

#[derive(Serialize)]
struct WindowResult {
    work_ms: u64,
    concurrency: usize,
    /// The window each phase settled at (median of its last samples).
    two_workers: u64,
    one_killed: u64,
    one_added: u64,
    /// Seconds from the kill, and from the addition, until the window
    /// reached its new level and stayed there.
    settled_after_kill_s: Option<f64>,
    settled_after_add_s: Option<f64>,
    samples: Vec<Sample>,
}

/// A worker of the bottleneck stage on a runtime of its own.
fn bottleneck_worker(
    url: &str,
    prefix: &str,
    dir: &std::path::Path,
    args: &WindowArgs,
) -> anyhow::Result<tokio::runtime::Runtime> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let (url, prefix) = (url.to_string(), prefix.to_string());
    let blobs = Arc::new(LocalBlobStore::new(dir)?);
    let (work, concurrency) = (args.work, args.concurrency);
    rt.spawn(async move {
        let p = Pipeline::connect(&url, &prefix, blobs)
            .await
            .expect("connecting to Redis");
        let cfg = RunnerConfig {
            concurrency,
            read_block_ms: 100,
            claim_idle_ms: 5_000,
            ..RunnerConfig::default()
        };
        let runner = StageRunner::new(p, Arc::new(Noop(StageName::Resize, work)), cfg);
        runner.run(CancellationToken::new()).await.ok();
    });
    Ok(rt)
}

pub async fn window(args: WindowArgs) -> anyhow::Result<()> {
    let prefix = format!("bench-{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir()?;
    let blobs = Arc::new(LocalBlobStore::new(dir.path())?);
    let p = Pipeline::connect(&args.redis_url, &prefix, blobs)
        .await
        .context("connecting to Redis")?;
    let shutdown = CancellationToken::new();
    let mut runners = tokio::task::JoinSet::new();
    for name in [StageName::RateCheck, StageName::Upload, StageName::DbCommit] {
        let cfg = RunnerConfig {
            concurrency: 256,
            read_block_ms: 100,
            ..RunnerConfig::default()
        };
        let runner = StageRunner::new(p.clone(), Arc::new(Noop(name, Duration::ZERO)), cfg);
        let s = shutdown.clone();
        runners.spawn(async move { runner.run(s).await });
    }
    let mut first = Some(bottleneck_worker(&args.redis_url, &prefix, dir.path(), &args)?);
    let second = bottleneck_worker(&args.redis_url, &prefix, dir.path(), &args)?;

    // A backlog that outlasts the run: the workers' capacity for all
    // three phases, and some.
    let capacity = 2.0 * args.concurrency as f64 * 1000.0 / args.work.as_millis().max(1) as f64;
    let images = (capacity * args.phase.as_secs_f64() * 3.0 * 1.2) as usize;
    let jobs = JobStore::new(p.clone(), 3600);
    let mut left = images;
    while left > 0 {
        let n = left.min(100);
        crate::bench::submit_job(&jobs, "vendor-a", vec![Operation::Resize], 0..n, crate::bench::nowhere).await?;
        left -= n;
    }

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut added = None;
    let (mut killed_at, mut added_at) = (None, None);
    while started.elapsed() < args.phase * 3 {
        let t = started.elapsed();
        if killed_at.is_none() && t >= args.phase {
            if let Some(rt) = first.take() {
                rt.shutdown_background();
            }
            killed_at = Some(t.as_secs_f64());
        }
        if added_at.is_none() && t >= args.phase * 2 {
            added = Some(bottleneck_worker(&args.redis_url, &prefix, dir.path(), &args)?);
            added_at = Some(t.as_secs_f64());
        }
        let window = image_queue_pipeline::admission::published_window(&p)
            .await?
            .map(|w| w.window)
            .unwrap_or(0);
        samples.push(Sample {
            t_s: t.as_secs_f64(),
            window,
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (killed_at, added_at) = (killed_at.unwrap_or(0.0), added_at.unwrap_or(0.0));
    let phase_end = args.phase.as_secs_f64() * 3.0;
    let level = |from: f64, to: f64| {
        let mut w: Vec<u64> = samples
            .iter()
            .filter(|s| s.t_s >= from && s.t_s < to)
            .map(|s| s.window)
            .collect();
        let tail = w.len().saturating_sub(5);
        let mut last = w.split_off(tail);
        last.sort_unstable();
        last.get(last.len() / 2).copied().unwrap_or(0)
    };
    let two = level(0.0, killed_at);
    let one = level(killed_at, added_at);
    let again = level(added_at, phase_end);
    // The first sample from which the window stays within one image of
    // the level it settles at, until the phase ends.
    let settled = |from: f64, to: f64, at: u64| {
        let phase: Vec<&Sample> = samples.iter().filter(|s| s.t_s >= from && s.t_s < to).collect();
        (0..phase.len())
            .find(|&i| phase[i..].iter().all(|s| s.window.abs_diff(at) <= 1))
            .map(|i| phase[i].t_s - from)
    };
    let result = WindowResult {
        work_ms: args.work.as_millis() as u64,
        concurrency: args.concurrency,
        two_workers: two,
        one_killed: one,
        one_added: again,
        settled_after_kill_s: settled(killed_at, added_at, one),
        settled_after_add_s: settled(added_at, phase_end, again),
        samples,
    };
    shutdown.cancel();
    while runners.join_next().await.is_some() {}
    // Dropping a runtime inside another blocks it: let them go at once.
    for rt in [first, Some(second), added].into_iter().flatten() {
        rt.shutdown_background();
    }
    p.delete_every_key().await?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
