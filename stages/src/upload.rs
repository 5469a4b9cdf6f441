//! upload: puts an image's outputs where the shop can serve them, and
//! records their URLs on the event.
//!
//! Object keys are deterministic, `<vendor>/<job>/<image>/<variant>.<ext>`,
//! so a redelivered event overwrites what an earlier attempt wrote instead
//! of leaving a second object.

use std::path::PathBuf;

use async_trait::async_trait;
use bytes::Bytes;
use image_queue_pipeline::{ImageEvent, Outcome, OutputRef, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};

use crate::decode::sniff;
use crate::StageContext;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case", deny_unknown_fields)]
pub enum UploadConfig {
    /// Files under a directory, served by the API under `/media/`.
    Local {
        dir: PathBuf,
        /// What URLs start with, e.g. `http://127.0.0.1:3001/media`.
        public_base_url: String,
    },
}

impl UploadConfig {
    pub fn build(&self, ctx: StageContext) -> UploadStage {
        UploadStage {
            ctx,
            config: self.clone(),
        }
    }
}

pub struct UploadStage {
    ctx: StageContext,
    config: UploadConfig,
}

/// A key component: vendor ids and record ids are the vendor's; keep them
/// to a safe alphabet so a key is always one path below its parent.
pub fn safe_component(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    match cleaned.trim_matches('.') {
        "" => "_".into(),
        t => t.to_string(),
    }
}

pub fn object_key(ev: &ImageEvent, variant: &str, ext: &str) -> String {
    format!(
        "{}/{}/{}/{}.{}",
        safe_component(&ev.vendor),
        ev.job,
        ev.image,
        safe_component(variant),
        ext
    )
}

impl UploadStage {
    async fn store(&self, key: &str, bytes: Bytes) -> Result<String, StageError> {
        match &self.config {
            UploadConfig::Local { dir, public_base_url } => {
                let path = dir.join(key);
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent)
                        .await
                        .map_err(|e| StageError::retryable(format!("creating {}: {e}", parent.display())))?;
                }
                let tmp = path.with_extension("partial");
                tokio::fs::write(&tmp, &bytes)
                    .await
                    .and(tokio::fs::rename(&tmp, &path).await)
                    .map_err(|e| StageError::retryable(format!("writing {key}: {e}")))?;
                Ok(format!("{}/{}", public_base_url.trim_end_matches('/'), key))
            }
        }
    }
}

#[async_trait]
impl Stage for UploadStage {
    fn name(&self) -> StageName {
        StageName::Upload
    }

    async fn handle(&self, mut event: ImageEvent) -> Result<Outcome, StageError> {
        if event.outputs.is_empty() {
            // No resize asked for: the working image itself is the output.
            let bytes = self.ctx.working_image(&event).await?;
            let (ext, ct) = match sniff(&bytes) {
                Some(image::ImageFormat::Png) => ("png", "image/png"),
                Some(image::ImageFormat::Jpeg) => ("jpg", "image/jpeg"),
                Some(image::ImageFormat::WebP) => ("webp", "image/webp"),
                Some(image::ImageFormat::Gif) => ("gif", "image/gif"),
                _ => return Err(StageError::permanent("the result is not an image")),
            };
            let key = object_key(&event, "image", ext);
            let len = bytes.len() as u64;
            let url = self.store(&key, bytes).await?;
            event.outputs.insert(
                "image".into(),
                OutputRef {
                    blob: None,
                    url: Some(url),
                    content_type: ct.into(),
                    width: 0,
                    height: 0,
                    bytes: len,
                },
            );
            return Ok(Outcome::Done(event));
        }
        let names: Vec<String> = event.outputs.keys().cloned().collect();
        for name in names {
            let out = event.outputs.get(&name).cloned().unwrap_or_default();
            if out.url.is_some() {
                continue;
            }
            let Some(blob) = out.blob.clone() else { continue };
            let bytes = self
                .ctx
                .blobs
                .get(&blob)
                .await
                .map_err(|e| StageError::retryable(format!("reading blob {blob}: {e}")))?;
            let ext = blob.rsplit('.').next().unwrap_or("bin").to_string();
            let key = object_key(&event, &name, &ext);
            let url = self.store(&key, bytes).await?;
            let o = event.outputs.get_mut(&name).expect("listed above");
            o.url = Some(url);
            o.blob = None;
        }
        Ok(Outcome::Done(event))
    }
}
