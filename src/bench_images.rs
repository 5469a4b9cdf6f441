//! `image-queue bench images`: real work end to end. Photographs go through
//! every operation (bg-removal, face-crop, resize, then upload and
//! db-commit) on the engine `up` would choose, through all six stages on
//! the user's Redis, and the images/s delivered is set against the engine's
//! raw rate on the same images in the same run: the model alone, as many
//! cutouts at once as the bg-removal stage runs. What the pipeline costs
//! beyond the model (queueing, decoding, encoding, face detection, resizes,
//! uploads, the database) is the gap between the two, and each stage's CPU
//! time per image says where it goes.
//!
//! Everything the run writes (blobs, media, the results database) is in a
//! temporary directory, and its keys under a prefix of their own, removed at
//! the end; the model is the one under the user's data directory. The
//! result is one JSON line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use image::DynamicImage;
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{JobStore, LocalBlobStore, Operation, Pipeline, Source, StageName};
use image_queue_stages::bg_removal::BgRemovalConfig;
use image_queue_stages::u2net::U2net;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::Config;

pub struct ImagesArgs {
    /// Images to run, cycling through the photographs.
    pub images: usize,
    /// Directory of JPEG and PNG photographs.
    pub photos: PathBuf,
}

#[derive(Serialize)]
struct ImagesResult {
    engine: String,
    photos: usize,
    images: usize,
    /// Cutouts the bg-removal stage runs at once, in both measurements.
    concurrency: usize,
    /// The model alone on the decoded photographs: pre-processing,
    /// inference and post-processing, `concurrency` at a time.
    raw_images_per_s: f64,
    /// Every operation, end to end: from the first submit to the last
    /// image's end.
    pipeline_images_per_s: f64,
    /// The pipeline's rate over the raw one.
    pipeline_over_raw: f64,
    failed: u64,
    /// CPU milliseconds per image in each stage's image work.
    stage_cpu_ms_per_image: BTreeMap<&'static str, f64>,
    /// The whole process's CPU milliseconds per image (stages, runners,
    /// Redis client, database driver), and Redis's.
    process_cpu_ms_per_image: f64,
    redis_cpu_ms_per_image: f64,
}

pub async fn images(redis_url: &str, mut config: Config, args: ImagesArgs) -> anyhow::Result<()> {
    let photos = read_photos(&args.photos)?;
    // `up`'s engine, with the model from the user's data directory.
    let engine = crate::up::choose_engine(&mut config).await?;
    let BgRemovalConfig::U2net {
        model,
        model_kind,
        runtime,
        onnxruntime_library,
        onnxruntime,
    } = config.bg_removal.clone()
    else {
        bail!(
            "this benchmark measures the in-process engine, and {}: install the model and ONNX Runtime \
             (scripts/install-rembg.sh) or configure [bg_removal] engine = \"u2net\"",
            engine.summary
        );
    };
    let model = U2net::shared_model(
        &model,
        model_kind,
        runtime,
        onnxruntime_library.as_deref(),
        &onnxruntime.settings(),
    )?;
    let concurrency = config.concurrency(StageName::BgRemoval);

    // The engine alone, on the same photographs, decoded beforehand.
    let decoded: Vec<DynamicImage> = photos
        .iter()
        .map(|(name, bytes)| image::load_from_memory(bytes).with_context(|| format!("decoding {name}")))
        .collect::<anyhow::Result<_>>()?;
    let raw = {
        let (model, decoded, n) = (model.clone(), Arc::new(decoded), args.images);
        tokio::task::spawn_blocking(move || raw_rate(&model, &decoded, n, concurrency)).await??
    };

    // The pipeline, on a data directory of the run's own.
    let run_dir = tempfile::tempdir()?;
    config.data_dir = run_dir.path().to_path_buf();
    config.blob_dir = PathBuf::new();
    config.media_dir = PathBuf::new();
    config.database_url = String::new();
    let prefix = format!("bench-{:08x}", rand::random::<u32>());
    let blobs = Arc::new(LocalBlobStore::new(config.blob_dir())?);
    let p = Pipeline::connect(redis_url, &prefix, blobs)
        .await
        .context("connecting to Redis")?;
    let mut sources = Vec::new();
    for (i, (_, bytes)) in photos.iter().enumerate() {
        let key = format!("bench-sources/{i}/original");
        p.blobs.put(&key, bytes.clone().into()).await?;
        sources.push(key);
    }
    let shutdown = CancellationToken::new();
    let mut runners = tokio::task::JoinSet::new();
    for name in StageName::ALL {
        let stage = crate::compose::build_stage(name, &config, &p).await?;
        let runner = StageRunner::new(p.clone(), stage, config.runner(name));
        let s = shutdown.clone();
        runners.spawn(async move { runner.run(s).await });
    }
    let jobs = JobStore::new(p.clone(), 3600);
    let cpu_before = image_queue_stages::cpu_seconds();
    let process_before = process_cpu_seconds();
    let redis_before = p.redis_cpu_seconds().await?;
    let started = Instant::now();
    let mut ids = Vec::new();
    // Jobs of ten, as a shop sends a product's photos.
    for first in (0..args.images).step_by(10) {
        let ops = vec![Operation::BgRemoval, Operation::FaceCrop, Operation::Resize];
        let images = first..(first + 10).min(args.images);
        let id = crate::bench::submit_job(&jobs, "bench", ops, images, |i| {
            Source::Blob(sources[i % sources.len()].clone())
        })
        .await?;
        ids.push(id);
    }
    let mut failed = 0;
    for id in &ids {
        let deadline = Instant::now() + Duration::from_secs(3600);
        loop {
            let job = jobs.get(None, id).await?.context("a job of the run vanished")?;
            if job.is_terminal() {
                failed += job.failed as u64;
                break;
            }
            if Instant::now() > deadline {
                bail!("job {id} did not finish within an hour");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let redis_cpu = p.redis_cpu_seconds().await? - redis_before;
    let process_cpu = process_cpu_seconds() - process_before;
    let before: BTreeMap<_, _> = cpu_before.into_iter().collect();
    let per_image = |seconds: f64| seconds * 1000.0 / args.images as f64;
    let stage_cpu_ms_per_image = image_queue_stages::cpu_seconds()
        .into_iter()
        .map(|(stage, s)| (stage, per_image(s - before.get(stage).copied().unwrap_or(0.0))))
        .collect();
    shutdown.cancel();
    while runners.join_next().await.is_some() {}
    p.delete_every_key().await?;
    let pipeline_images_per_s = args.images as f64 / elapsed;
    let result = ImagesResult {
        engine: engine.summary,
        photos: photos.len(),
        images: args.images,
        concurrency,
        raw_images_per_s: raw,
        pipeline_images_per_s,
        pipeline_over_raw: pipeline_images_per_s / raw,
        failed,
        stage_cpu_ms_per_image,
        process_cpu_ms_per_image: per_image(process_cpu),
        redis_cpu_ms_per_image: per_image(redis_cpu),
    };
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// The JPEG and PNG files in `dir`, by name.
fn read_photos(dir: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "reading the photographs in {} (scripts/fetch-test-images.sh puts some in stages/tests/data/photos; \
             or pass --photos DIR)",
            dir.display()
        )
    })?;
    let mut photos = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let ext = path.extension().map(|e| e.to_string_lossy().to_ascii_lowercase());
        if matches!(ext.as_deref(), Some("jpg" | "jpeg" | "png")) {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            photos.push((name, std::fs::read(&path)?));
        }
    }
    photos.sort();
    if photos.is_empty() {
        bail!("no JPEG or PNG photographs in {}", dir.display());
    }
    Ok(photos)
}

/// Cutouts per second of `model` alone over `images`, `n` in all,
/// `concurrency` at a time.
fn raw_rate(model: &U2net, images: &[DynamicImage], n: usize, concurrency: usize) -> anyhow::Result<f64> {
    // One round first: the sessions are warm, and so are the caches.
    for img in images {
        model.cutout(img)?;
    }
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..concurrency.max(1))
            .map(|_| {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        return Ok::<(), anyhow::Error>(());
                    }
                    model.cutout(&images[i % images.len()])?;
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
    })?;
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// This process's CPU time so far, user and system.
fn process_cpu_seconds() -> f64 {
    // SAFETY: `usage` is a valid rusage for the call to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}
