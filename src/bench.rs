//! `image-queue bench pipeline`: the pipeline's own overhead, measured on
//! the user's Redis.
//!
//! Jobs of one image go through all six stages with handlers that do
//! nothing, so what is measured is the queue: reads, hand-offs, job state
//! and completion. Keys live under a prefix of their own, removed at the
//! end. The result is one JSON line.
//!
//! `image-queue bench fairness` measures what fair scheduling is for: one
//! vendor's single image submitted behind another vendor's backlog, with
//! fair scheduling and on a plain FIFO (admission window 0), side by side.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use futures::StreamExt;
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{
    ImageEvent, JobStore, LocalBlobStore, NewImage, NewJob, Operation, Outcome, Pipeline, RunnerConfig, Source, Stage,
    StageError, StageName,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub struct BenchArgs {
    pub redis_url: String,
    pub jobs: usize,
    /// Jobs per second to submit; `None` submits as fast as possible.
    pub rate: Option<f64>,
    pub concurrency: usize,
    /// Fair scheduling's admission window (0: off).
    pub window: u64,
    /// Replicas each submit waits for (`redis.min_replicas`).
    pub min_replicas: u32,
}

#[derive(Serialize)]
struct BenchResult {
    jobs: usize,
    rate: Option<f64>,
    jobs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    redis_cpu_us_per_job: f64,
    window: u64,
    min_replicas: u32,
}

/// A stage that does nothing, or sleeps for `work` per image.
pub(crate) struct Noop(pub StageName, pub Duration);

#[async_trait]
impl Stage for Noop {
    fn name(&self) -> StageName {
        self.0
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        if !self.1.is_zero() {
            tokio::time::sleep(self.1).await;
        }
        Ok(Outcome::Done(event))
    }
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Submits one job of `vendor` asking for `operations` on the images
/// numbered `images`, each from `source(i)`; returns its id.
pub(crate) async fn submit_job(
    jobs: &JobStore,
    vendor: &str,
    operations: Vec<Operation>,
    images: std::ops::Range<usize>,
    source: impl Fn(usize) -> Source,
) -> anyhow::Result<String> {
    let id = NewJob::new_id();
    jobs.submit(NewJob {
        id: id.clone(),
        vendor: vendor.into(),
        operations,
        images: images
            .map(|i| NewImage {
                source: source(i),
                record_id: format!("r{i}"),
            })
            .collect(),
        idempotency_key: None,
        fingerprint: None,
        traceparent: None,
    })
    .await?;
    Ok(id)
}

/// A source no stage reads (for benchmarks whose stages do not).
pub(crate) fn nowhere(i: usize) -> Source {
    Source::Url(format!("https://bench.invalid/{i}.jpg"))
}

/// A pipeline on the user's Redis under a prefix of its own (removed by
/// `Pipeline::delete_every_key`), with blobs in a temporary directory kept while the guard lives.
pub(crate) async fn connect(redis_url: &str) -> anyhow::Result<(Pipeline, tempfile::TempDir)> {
    let prefix = format!("bench-{:08x}", rand::random::<u32>());
    let dir = tempfile::tempdir()?;
    let blobs = Arc::new(LocalBlobStore::new(dir.path())?);
    let p = Pipeline::connect(redis_url, &prefix, blobs)
        .await
        .context("connecting to Redis")?;
    Ok((p, dir))
}

pub async fn pipeline(args: BenchArgs) -> anyhow::Result<()> {
    let (p, _blobs_dir) = connect(&args.redis_url).await?;
    let jobs = JobStore::new(p.clone(), 3600).with_replication(image_queue_pipeline::ReplicationConfig {
        min_replicas: args.min_replicas,
        ..Default::default()
    });
    let cfg = RunnerConfig {
        concurrency: args.concurrency,
        read_block_ms: 100,
        admission_window: args.window,
        ..RunnerConfig::default()
    };
    let shutdown = CancellationToken::new();
    let mut runners = tokio::task::JoinSet::new();
    for name in StageName::ALL {
        let runner = StageRunner::new(p.clone(), Arc::new(Noop(name, Duration::ZERO)), cfg.clone());
        let s = shutdown.clone();
        runners.spawn(async move { runner.run(s).await });
    }
    // Completions, as announced on the finished channel.
    let submitted: Arc<Mutex<HashMap<String, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let mut pubsub = p.subscribe(&[p.keys.finished_channel()]).await?;
    let total = args.jobs;
    let subs = submitted.clone();
    let collector = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total);
        let mut stream = pubsub.on_message();
        let mut last = Instant::now();
        while latencies.len() < total {
            let Some(msg) = stream.next().await else { break };
            let now = Instant::now();
            let payload: String = msg.get_payload().unwrap_or_default();
            // A line "<job id> <status>" per closed job.
            for line in payload.lines() {
                let job = line.split(' ').next().unwrap_or("");
                // A completion may beat its submit's bookkeeping: wait for it.
                loop {
                    let t = subs.lock().unwrap().get(job).copied();
                    match t {
                        Some(t) => {
                            latencies.push(now.duration_since(t).as_secs_f64() * 1000.0);
                            break;
                        }
                        None => tokio::task::yield_now().await,
                    }
                }
            }
            last = now;
        }
        (latencies, last)
    });

    let cpu_before = p.redis_cpu_seconds().await?;
    let started = Instant::now();
    let ops = vec![Operation::BgRemoval, Operation::FaceCrop, Operation::Resize];
    let submitters = if args.rate.is_some() { 1 } else { 16 };
    let per = total.div_ceil(submitters);
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..submitters {
        let (jobs, ops, submitted, rate) = (jobs.clone(), ops.clone(), submitted.clone(), args.rate);
        let n = per.min(total.saturating_sub(s * per));
        tasks.spawn(async move {
            let mut next = Instant::now();
            for _ in 0..n {
                if let Some(r) = rate {
                    tokio::time::sleep_until(next.into()).await;
                    next += Duration::from_secs_f64(1.0 / r);
                }
                let id = NewJob::new_id();
                submitted.lock().unwrap().insert(id.clone(), Instant::now());
                jobs.submit(NewJob {
                    id,
                    vendor: "bench".into(),
                    operations: ops.clone(),
                    images: vec![NewImage {
                        source: Source::Url("https://bench.invalid/a.jpg".into()),
                        record_id: "r".into(),
                    }],
                    idempotency_key: None,
                    fingerprint: None,
                    traceparent: None,
                })
                .await?;
            }
            Ok::<_, image_queue_pipeline::SubmitError>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    let (mut latencies, last) = tokio::time::timeout(Duration::from_secs(600), collector)
        .await
        .context("jobs did not finish within 10 minutes")??;
    let cpu_after = p.redis_cpu_seconds().await?;
    shutdown.cancel();
    while runners.join_next().await.is_some() {}

    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let elapsed = last.duration_since(started).as_secs_f64();
    let result = BenchResult {
        jobs: total,
        rate: args.rate,
        jobs_per_s: total as f64 / elapsed,
        p50_ms: percentile(&latencies, 0.50),
        p99_ms: percentile(&latencies, 0.99),
        redis_cpu_us_per_job: (cpu_after - cpu_before) * 1e6 / total as f64,
        window: args.window,
        min_replicas: args.min_replicas,
    };
    p.delete_every_key().await?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

pub struct FairnessArgs {
    pub redis_url: String,
    /// Vendor A's backlog, in images (jobs of 100).
    pub backlog: usize,
    /// What the resize stage spends on each image (synthetic work): one
    /// cost, or a mix that images take in turn by their index.
    pub work: Vec<Duration>,
    /// Resize's concurrency.
    pub concurrency: usize,
    /// The fixed admission window to compare the sized one with.
    pub window: u64,
    /// Real resize work on generated 2000–4000-pixel JPEGs instead of a
    /// synthetic delay.
    pub real: bool,
    /// Which admissions to measure, in this order.
    pub modes: Vec<Mode>,
    /// Measure A's throughput too (waits for A's whole backlog to drain).
    pub drain: bool,
}

/// An admission to measure, as `--modes` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Sized,
    Fixed,
    Fifo,
}

/// A stage that spends a cost from a mix on each image, chosen by the
/// image's index, so images of one job cost different amounts.
struct Mixed(StageName, Vec<Duration>);

#[async_trait]
impl Stage for Mixed {
    fn name(&self) -> StageName {
        self.0
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        let cost = self.1[event.image as usize % self.1.len()];
        if !cost.is_zero() {
            tokio::time::sleep(cost).await;
        }
        Ok(Outcome::Done(event))
    }
}

/// How admission is run in one measurement.
#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "snake_case")]
enum Admission {
    /// The window sizes itself (the default).
    Sized,
    /// A fixed window.
    Fixed(u64),
    /// No fair scheduling: one FIFO.
    Fifo,
}

#[derive(Serialize)]
struct FairnessRun {
    admission: Admission,
    /// The window in force when B was submitted.
    window: u64,
    window_reason: String,
    /// B's one image with nothing else queued.
    alone_ms: f64,
    /// B's one image submitted right after A's backlog.
    behind_ms: f64,
    ratio: f64,
    /// A's images done when B's finished.
    backlog_done: u64,
    /// A's images finished per second, its whole backlog from its first
    /// submit to its last image (absent when not drained).
    a_images_per_s: Option<f64>,
}

#[derive(Serialize)]
struct FairnessResult {
    backlog: usize,
    work: String,
    concurrency: usize,
    sized: Option<FairnessRun>,
    fixed: Option<FairnessRun>,
    fifo: Option<FairnessRun>,
    /// How much longer B waits behind the backlog on a FIFO than with
    /// the sized window.
    fifo_over_sized: Option<f64>,
    /// A's throughput with the sized window over a fixed one's.
    sized_over_fixed_throughput: Option<f64>,
}

/// Vendor A submits `backlog` images, then vendor B submits one; B's
/// latency against B alone, with the sized window, a fixed one and on a
/// plain FIFO.
pub async fn fairness(args: FairnessArgs) -> anyhow::Result<()> {
    let sources = if args.real {
        real_sources(&args.redis_url).await?
    } else {
        None
    };
    let (mut sized, mut fixed, mut fifo) = (None, None, None);
    for mode in &args.modes {
        match mode {
            Mode::Sized => sized = Some(fairness_run(&args, Admission::Sized, sources.as_ref()).await?),
            Mode::Fixed => fixed = Some(fairness_run(&args, Admission::Fixed(args.window), sources.as_ref()).await?),
            Mode::Fifo => fifo = Some(fairness_run(&args, Admission::Fifo, sources.as_ref()).await?),
        }
    }
    let costs: Vec<String> = args.work.iter().map(|d| d.as_millis().to_string()).collect();
    let result = FairnessResult {
        backlog: args.backlog,
        work: if args.real {
            "real resize of 2000-4000 px JPEGs".into()
        } else {
            format!("{} ms per image", costs.join("/"))
        },
        concurrency: args.concurrency,
        fifo_over_sized: sized
            .as_ref()
            .zip(fifo.as_ref())
            .map(|(s, f)| f.behind_ms / s.behind_ms),
        sized_over_fixed_throughput: sized
            .as_ref()
            .zip(fixed.as_ref())
            .and_then(|(s, f)| Some(s.a_images_per_s? / f.a_images_per_s?.max(f64::MIN_POSITIVE))),
        sized,
        fixed,
        fifo,
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// Generated photographs (noise over gradients, 2000 to 4000 pixels wide)
/// in a blob directory of their own, which every image of the run reads.
struct RealSources {
    dir: tempfile::TempDir,
    keys: Vec<String>,
}

async fn real_sources(_redis_url: &str) -> anyhow::Result<Option<RealSources>> {
    let dir = tempfile::tempdir()?;
    let store = LocalBlobStore::new(dir.path())?;
    let mut keys = Vec::new();
    for (k, (w, h)) in [(2000u32, 1500u32), (2400, 1600), (3000, 2000), (4000, 3000)]
        .into_iter()
        .enumerate()
    {
        let jpeg = tokio::task::spawn_blocking(move || photo_jpeg(w, h, k as u32)).await??;
        let key = format!("bench-sources/{k}/original");
        image_queue_pipeline::BlobStore::put(&store, &key, jpeg.into()).await?;
        keys.push(key);
    }
    Ok(Some(RealSources { dir, keys }))
}

/// A photograph-like JPEG: smooth gradients with noise, so it neither
/// compresses to nothing nor decodes trivially.
fn photo_jpeg(w: u32, h: u32, seed: u32) -> anyhow::Result<Vec<u8>> {
    let mut state = 0x9e37_79b9u32 ^ seed.wrapping_mul(0x85eb_ca6b);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let n = (state & 0x3f) as i32 - 32;
        let r = (x * 255 / w) as i32 + n;
        let g = (y * 255 / h) as i32 + n;
        let b = ((x + y) * 255 / (w + h)) as i32 + n;
        image::Rgb([r.clamp(0, 255) as u8, g.clamp(0, 255) as u8, b.clamp(0, 255) as u8])
    });
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 85).encode_image(&img)?;
    Ok(out)
}

async fn fairness_run(
    args: &FairnessArgs,
    admission: Admission,
    sources: Option<&RealSources>,
) -> anyhow::Result<FairnessRun> {
    let (p, blobs_dir) = match sources {
        // Real work reads the generated photographs: the run's blobs live
        // beside them.
        Some(src) => {
            let prefix = format!("bench-{:08x}", rand::random::<u32>());
            let blobs = Arc::new(LocalBlobStore::new(src.dir.path())?);
            let p = Pipeline::connect(&args.redis_url, &prefix, blobs)
                .await
                .context("connecting to Redis")?;
            (p, None)
        }
        None => {
            let (p, dir) = connect(&args.redis_url).await?;
            (p, Some(dir))
        }
    };
    let _blobs_dir = blobs_dir;
    let jobs = JobStore::new(p.clone(), 3600);
    let shutdown = CancellationToken::new();
    let mut runners = tokio::task::JoinSet::new();
    let (window, adaptive) = match admission {
        Admission::Sized => (1_000, true),
        Admission::Fixed(n) => (n, false),
        Admission::Fifo => (0, false),
    };
    for name in [
        StageName::RateCheck,
        StageName::Resize,
        StageName::Upload,
        StageName::DbCommit,
    ] {
        // The other stages take a burst in a few reads, as rate-check does
        // by default (see config.rs): a FIFO in front of fair admission
        // that passed A's burst four images at a time would bury B there.
        let concurrency = if name == StageName::Resize {
            args.concurrency
        } else {
            256
        };
        let cfg = RunnerConfig {
            concurrency,
            read_block_ms: 100,
            admission_window: window,
            admission_adaptive: adaptive,
            ..RunnerConfig::default()
        };
        let stage: Arc<dyn Stage> = match (name, sources) {
            (StageName::Resize, Some(_)) => {
                let ctx = image_queue_stages::StageContext {
                    blobs: p.blobs.clone(),
                    fetcher: Arc::new(image_queue_stages::FetchConfig::default().build()?),
                    limits: image_queue_stages::decode::DecodeLimits::default(),
                };
                Arc::new(image_queue_stages::ResizeConfig::default().build(ctx)?)
            }
            (StageName::Resize, None) => Arc::new(Mixed(name, args.work.clone())),
            _ => Arc::new(Noop(name, Duration::ZERO)),
        };
        let runner = StageRunner::new(p.clone(), stage, cfg);
        let s = shutdown.clone();
        runners.spawn(async move { runner.run(s).await });
    }
    let pubsub = p.subscribe(&[p.keys.finished_channel()]).await?;
    let mut finished = pubsub.into_on_message();
    let source_keys: Option<Vec<String>> = sources.map(|s| s.keys.clone());
    let submit = |vendor: &'static str, images: usize| {
        let jobs = jobs.clone();
        let source_keys = source_keys.clone();
        async move {
            submit_job(
                &jobs,
                vendor,
                vec![Operation::Resize],
                0..images,
                |i| match &source_keys {
                    Some(keys) => Source::Blob(keys[i % keys.len()].clone()),
                    None => nowhere(i),
                },
            )
            .await
        }
    };
    // Waits for the job's finished announcement.
    async fn until_finished(
        finished: &mut (impl futures::Stream<Item = redis::Msg> + Unpin),
        job: &str,
    ) -> anyhow::Result<()> {
        let wait = async {
            while let Some(msg) = finished.next().await {
                let payload: String = msg.get_payload().unwrap_or_default();
                if payload.lines().any(|l| l.split(' ').next() == Some(job)) {
                    return Ok(());
                }
            }
            anyhow::bail!("the finished subscription ended")
        };
        tokio::time::timeout(Duration::from_secs(600), wait)
            .await
            .context("B's image did not finish within 10 minutes")?
    }

    // B alone, twice: the first warms the stages (and the window's
    // measurements) up.
    let mut alone = Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        let b = submit("vendor-b", 1).await?;
        until_finished(&mut finished, &b).await?;
        alone = started.elapsed();
    }

    // A running system has sized its window by now; give the heartbeats
    // that long here too (a cold start is `bench window`'s subject).
    if matches!(admission, Admission::Sized) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let w = image_queue_pipeline::admission::published_window(&p).await?;
            if w.is_some_and(|w| w.reason.starts_with("bottleneck")) || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let a_started = Instant::now();
    let mut backlog = Vec::new();
    let mut left = args.backlog;
    while left > 0 {
        let n = left.min(100);
        backlog.push(submit("vendor-a", n).await?);
        left -= n;
    }
    // The sized window needs the stages' heartbeats to have measured
    // something: wait for it (A's backlog drains meanwhile, as it would).
    let mut in_force = image_queue_pipeline::admission::published_window(&p).await?;
    if matches!(admission, Admission::Sized) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !in_force.as_ref().is_some_and(|w| w.reason.starts_with("bottleneck")) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            in_force = image_queue_pipeline::admission::published_window(&p).await?;
        }
    }
    let started = Instant::now();
    let b = submit("vendor-b", 1).await?;
    until_finished(&mut finished, &b).await?;
    let behind = started.elapsed();
    let mut backlog_done = 0;
    for id in &backlog {
        backlog_done += jobs.get(None, id).await?.map(|j| j.completed).unwrap_or(0) as u64;
    }
    // A's throughput: its whole backlog, from its first submit to its
    // last image (what fairness must not cost).
    let mut drained = !args.drain;
    while !drained {
        let mut open = 0;
        for id in &backlog {
            if !jobs.get(None, id).await?.is_some_and(|j| j.is_terminal()) {
                open += 1;
            }
        }
        drained = open == 0;
        if !drained {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let a_elapsed = a_started.elapsed();
    shutdown.cancel();
    while runners.join_next().await.is_some() {}
    p.delete_every_key().await?;
    let (window, window_reason) = match (admission, in_force) {
        (Admission::Fifo, _) => (0, "plain FIFO".to_string()),
        (_, Some(w)) => (w.window, w.reason),
        (_, None) => (window, "fixed".to_string()),
    };
    Ok(FairnessRun {
        admission,
        window,
        window_reason,
        a_images_per_s: args.drain.then(|| args.backlog as f64 / a_elapsed.as_secs_f64()),
        alone_ms: alone.as_secs_f64() * 1000.0,
        behind_ms: behind.as_secs_f64() * 1000.0,
        ratio: behind.as_secs_f64() / alone.as_secs_f64(),
        backlog_done,
    })
}
