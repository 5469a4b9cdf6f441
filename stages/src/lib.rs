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
/// decoder or encoder into a permanent error for that image.
pub async fn cpu<T, F>(what: &'static str, f: F) -> Result<T, StageError>
where
    F: FnOnce() -> Result<T, StageError> + Send + 'static,
    T: Send + 'static,
{
    match tokio::task::spawn_blocking(move || std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(StageError::permanent(format!("{what}: the image crashed the decoder"))),
        Err(e) => Err(StageError::retryable(format!("{what}: {e}"))),
    }
}
