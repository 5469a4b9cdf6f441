//! The work of each pipeline stage, one module per stage.
//!
//! Stages know nothing of streams, acknowledgements or retries: each
//! implements `image_queue_pipeline::Stage`, takes an image's event, does its
//! work on blobs and returns the next event, or an error classed as
//! retryable or permanent. Each stage is built from a serde `XxxConfig`
//! whose `build()` makes the runtime object.

pub mod bg_removal;
pub mod cloudinary;
pub mod db_commit;
pub mod decode;
pub mod face_crop;
pub mod fetch;
pub mod onnxruntime;
pub mod rate_check;
pub mod rembg;
pub mod resize;
pub mod s3;
pub mod s3_blobs;
pub mod u2net;
pub mod upload;
pub mod webhook;

use std::sync::Arc;

use bytes::Bytes;
use image_queue_pipeline::{BlobStore, ImageEvent, StageError};

pub use bg_removal::{BgRemovalConfig, BgRemovalStage};
pub use db_commit::{DbCommitConfig, DbCommitStage};
pub use face_crop::{FaceCropConfig, FaceCropStage};
pub use fetch::FetchConfig;
pub use rate_check::{RateCheckConfig, RateCheckStage};
pub use resize::{ResizeConfig, ResizeStage};
pub use upload::{UploadConfig, UploadStage};

/// What every stage may use: the blob store, the source fetcher and the
/// process's decoding limits. Every stage's configuration is built the same
/// way: `XxxConfig::build(&self, ctx: StageContext) -> Result<XxxStage, _>`
/// (`Infallible` where nothing can be wrong). db-commit's alone is `async`
/// and takes the database URL instead: building it connects and migrates.
#[derive(Clone)]
pub struct StageContext {
    pub blobs: Arc<dyn BlobStore>,
    pub fetcher: Arc<fetch::Fetcher>,
    pub limits: decode::DecodeLimits,
}

impl StageContext {
    /// The image as the previous stage left it: its working blob, or the
    /// original (fetched from the vendor's URL the first time it is needed).
    pub async fn working_image(&self, ev: &ImageEvent) -> Result<Bytes, StageError> {
        let key = match (&ev.working, &ev.source) {
            (Some(key), _) => key.clone(),
            (None, image_queue_pipeline::Source::Blob(key)) => key.clone(),
            (None, image_queue_pipeline::Source::Url(url)) => {
                return self.fetcher.fetch(url).await;
            }
        };
        self.blobs
            .get(&key)
            .await
            .map_err(|e| StageError::retryable(format!("reading blob {key}: {e}")))
    }

    /// Stores a stage's result as the image's new working blob.
    pub async fn put_working(&self, ev: &mut ImageEvent, name: &str, bytes: Bytes) -> Result<(), StageError> {
        let key = image_queue_pipeline::blob::blob_key(&ev.job, ev.image, name);
        self.blobs
            .put(&key, bytes)
            .await
            .map_err(|e| StageError::retryable(format!("writing blob {key}: {e}")))?;
        ev.working = Some(key);
        Ok(())
    }
}

/// Runs CPU-heavy image work off the async runtime, turning a panic inside a
/// decoder or encoder into a permanent error for that image. The thread's
/// CPU time is added to `what`'s in [`cpu_seconds`].
pub async fn cpu<T, F>(what: &'static str, f: F) -> Result<T, StageError>
where
    F: FnOnce() -> Result<T, StageError> + Send + 'static,
    T: Send + 'static,
{
    let work = move || {
        let started = std::time::Instant::now();
        let before = thread_cpu_time();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let spent = thread_cpu_time().saturating_sub(before);
        // The work is all computation: what its wall time has beyond its
        // CPU time, it spent waiting for a core.
        let waited = started.elapsed().saturating_sub(spent);
        let mut all = CPU_SPENT.lock().unwrap_or_else(|e| e.into_inner());
        let entry = all.entry(what).or_default();
        entry.spent += spent;
        // About the last 20 images.
        let lately = |avg: Option<f64>, d: std::time::Duration| {
            let ms = d.as_secs_f64() * 1000.0;
            Some(avg.map_or(ms, |avg| avg + (ms - avg) / 20.0))
        };
        entry.waited_ms = lately(entry.waited_ms, waited);
        entry.cpu_ms = lately(entry.cpu_ms, spent);
        r
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(StageError::permanent(format!("{what}: the image crashed the decoder"))),
        Err(e) => Err(StageError::retryable(format!("{what}: {e}"))),
    }
}

/// Encodes an image handed from one stage to the next (a cutout, a crop) as
/// PNG with fast compression: it is read back by the next stage, and the
/// default compression costs as much CPU as a stage's own work on a small
/// photo. Still a valid, lossless PNG where it is the result itself.
pub fn encode_working_png(img: &image::DynamicImage, what: &str) -> Result<bytes::Bytes, StageError> {
    use image::codecs::png::{CompressionType, FilterType, PngEncoder};
    let mut out = Vec::new();
    img.write_with_encoder(PngEncoder::new_with_quality(
        &mut out,
        CompressionType::Fast,
        FilterType::Adaptive,
    ))
    .map_err(|e| StageError::permanent(format!("encoding {what}: {e}")))?;
    Ok(bytes::Bytes::from(out))
}

/// What [`cpu`] sections cost, by what they were doing.
#[derive(Default)]
struct CpuUse {
    /// CPU time, in all.
    spent: std::time::Duration,
    /// Time a section waited for a core, lately (a moving average).
    waited_ms: Option<f64>,
    /// CPU time of a section, lately.
    cpu_ms: Option<f64>,
}

static CPU_SPENT: std::sync::Mutex<std::collections::BTreeMap<&'static str, CpuUse>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// What a stage reports of its image work in its heartbeat, lately: the CPU
/// time of each image's work (`cpu_ms`) and the time it waited for a core
/// (`cpu_wait_ms`: more images at once than the host has cores). The
/// admission window counts images at their uncontended time and no more
/// at once than the cores can run.
pub fn cpu_measures(what: &str) -> std::collections::BTreeMap<String, f64> {
    use image_queue_pipeline::admission::window::{CPU_MS, CPU_WAIT_MS};
    let all = CPU_SPENT.lock().unwrap_or_else(|e| e.into_inner());
    let Some(u) = all.get(what) else {
        return Default::default();
    };
    [(CPU_WAIT_MS, u.waited_ms), (CPU_MS, u.cpu_ms)]
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect()
}

/// The CPU time this process's stages have spent on image work since it
/// started, by stage (the name each gave [`cpu`]). ONNX Runtime's runs count
/// when they run on the calling thread (one thread a session, the default
/// on the CPU).
pub fn cpu_seconds() -> Vec<(&'static str, f64)> {
    let spent = CPU_SPENT.lock().unwrap_or_else(|e| e.into_inner());
    spent.iter().map(|(k, v)| (*k, v.spent.as_secs_f64())).collect()
}

/// This thread's CPU time so far.
fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// An error with its causes, for a message that travels as text (a
/// `StageError`, a job's record): a library error's own message names only
/// its step (reqwest's says only "error sending request").
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
