//! `image-queue bench shares`: three vendors of weights 1, 2 and 4, all
//! backlogged, through a bottleneck stage with the admission window sizing
//! itself; the shares of the images each completes, against 1:2:4.
//!
//! Keys live under a prefix of their own, removed at the end. The result is
//! one JSON line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{JobStore, Operation, RunnerConfig, Stage, StageName};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::bench::{submit_job, Noop};

pub struct SharesArgs {
    pub redis_url: String,
    /// Each vendor's backlog, in images (jobs of 100).
    pub backlog: usize,
    /// What the bottleneck (resize) spends on each image.
    pub work: Duration,
    /// The bottleneck's concurrency.
    pub concurrency: usize,
}

const VENDORS: [(&str, u32); 3] = [("weight-1", 1), ("weight-2", 2), ("weight-4", 4)];

#[derive(Serialize)]
struct VendorShare {
    vendor: &'static str,
    weight: u32,
    completed: u64,
    share: f64,
    expected: f64,
    /// How far the share is from its weight's, in percent of the latter.
    off_pct: f64,
}

#[derive(Serialize)]
struct SharesResult {
    backlog_per_vendor: usize,
    work_ms: u64,
    concurrency: usize,
    /// Images completed by all three while all were backlogged, counted
    /// from the moment the last backlog was submitted.
    counted: u64,
    shares: Vec<VendorShare>,
    worst_off_pct: f64,
}

pub async fn shares(args: SharesArgs) -> anyhow::Result<()> {
    let (p, _blobs) = crate::bench::connect(&args.redis_url).await?;
    let jobs = JobStore::new(p.clone(), 3600);
    for (vendor, weight) in VENDORS {
        jobs.set_weight(vendor, weight).await?;
    }
    let shutdown = CancellationToken::new();
    let mut runners = tokio::task::JoinSet::new();
    for name in [
        StageName::RateCheck,
        StageName::Resize,
        StageName::Upload,
        StageName::DbCommit,
    ] {
        let (stage, concurrency): (Arc<dyn Stage>, usize) = if name == StageName::Resize {
            (Arc::new(Noop(name, args.work)), args.concurrency)
        } else {
            (Arc::new(Noop(name, Duration::ZERO)), 256)
        };
        let cfg = RunnerConfig {
            concurrency,
            read_block_ms: 100,
            ..RunnerConfig::default()
        };
        let runner = StageRunner::new(p.clone(), stage, cfg);
        let s = shutdown.clone();
        runners.spawn(async move { runner.run(s).await });
    }

    // The backlogs, a job of each vendor in turn.
    let mut ids: Vec<Vec<String>> = vec![Vec::new(); VENDORS.len()];
    for first in (0..args.backlog).step_by(100) {
        for (v, (vendor, _)) in VENDORS.iter().enumerate() {
            let images = first..(first + 100).min(args.backlog);
            let id = submit_job(&jobs, vendor, vec![Operation::Resize], images, crate::bench::nowhere).await?;
            ids[v].push(id);
        }
    }
    let completed = || async {
        let mut counts = Vec::new();
        for vendor_ids in &ids {
            let mut n = 0u64;
            for id in vendor_ids {
                n += jobs.get(None, id).await?.map_or(0, |j| j.completed as u64);
            }
            counts.push(n);
        }
        Ok::<_, anyhow::Error>(counts)
    };
    // Counted from here: while the backlogs were submitted, the first
    // vendors' images had the stage to themselves.
    let start = completed().await?;
    // The heaviest vendor takes 4/7 of what completes: counting stops at
    // half a backlog's worth in all, long before any vendor runs out.
    let target = args.backlog as u64 / 2;
    let deadline = Instant::now() + Duration::from_secs(1800);
    let counts = loop {
        let now = completed().await?;
        let done: Vec<u64> = now.iter().zip(&start).map(|(n, s)| n - s).collect();
        if done.iter().sum::<u64>() >= target {
            break done;
        }
        if Instant::now() > deadline {
            bail!("the vendors completed {done:?} images in 30 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    shutdown.cancel();
    while runners.join_next().await.is_some() {}
    p.delete_every_key().await?;

    let counted: u64 = counts.iter().sum();
    let weights: u32 = VENDORS.iter().map(|(_, w)| w).sum();
    let shares: Vec<VendorShare> = VENDORS
        .iter()
        .zip(&counts)
        .map(|(&(vendor, weight), &completed)| {
            let share = completed as f64 / counted as f64;
            let expected = weight as f64 / weights as f64;
            VendorShare {
                vendor,
                weight,
                completed,
                share,
                expected,
                off_pct: (share / expected - 1.0) * 100.0,
            }
        })
        .collect();
    let result = SharesResult {
        backlog_per_vendor: args.backlog,
        work_ms: args.work.as_millis() as u64,
        concurrency: args.concurrency,
        counted,
        worst_off_pct: shares.iter().map(|s| s.off_pct.abs()).fold(0.0, f64::max),
        shares,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}
