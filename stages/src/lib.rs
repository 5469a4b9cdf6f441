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

/// What every stage may use: the blob store and the source fetcher.
#[derive(Clone)]
pub struct StageContext {
    pub blobs: Arc<dyn BlobStore>,
    pub fetcher: Arc<fetch::Fetcher>,
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
        let before = thread_cpu_time();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let spent = thread_cpu_time().saturating_sub(before);
        *CPU_SPENT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(what)
            .or_default() += spent;
        r
    };
    match tokio::task::spawn_blocking(work).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(StageError::permanent(format!("{what}: the image crashed the decoder"))),
        Err(e) => Err(StageError::retryable(format!("{what}: {e}"))),
    }
}

/// CPU time spent in [`cpu`] sections, by what they were doing.
static CPU_SPENT: std::sync::Mutex<std::collections::BTreeMap<&'static str, std::time::Duration>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());

/// The CPU time this process's stages have spent on image work since it
/// started, by stage (the name each gave [`cpu`]). ONNX Runtime's runs count
/// when they run on the calling thread (one thread a session, the default
/// on the CPU).
pub fn cpu_seconds() -> Vec<(&'static str, f64)> {
    let spent = CPU_SPENT.lock().unwrap_or_else(|e| e.into_inner());
    spent.iter().map(|(k, v)| (*k, v.as_secs_f64())).collect()
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
