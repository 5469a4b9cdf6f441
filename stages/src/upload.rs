//! upload: puts an image's outputs where the shop can serve them, and
//! records their URLs on the event.
//!
//! Object keys are deterministic, `<vendor>/<job>/<image>/<variant>.<ext>`,
//! so a redelivered event overwrites what an earlier attempt wrote instead
//! of leaving a second object. Backends: a local directory the API serves;
//! Cloudinary (see [`crate::cloudinary`]), whose asset ids are recorded in
//! the event's notes under `cloudinary.<variant>`; or an S3-compatible
//! bucket (see [`crate::s3`]), whose object keys, ETags and versions are
//! recorded under `s3.<variant>`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use image_queue_pipeline::{ImageEvent, Outcome, OutputRef, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};

use crate::cloudinary::{self, Credentials};
use crate::decode::sniff;
use crate::s3;
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
    /// Cloudinary's signed Upload API.
    Cloudinary {
        /// The environment variable holding the account's
        /// `cloudinary://<api_key>:<api_secret>@<cloud_name>` URL; the
        /// secret is never written in the configuration itself.
        #[serde(default = "default_cloudinary_env")]
        credentials_env: String,
        /// Where the API is; tests point it at a local stand-in.
        #[serde(default = "default_cloudinary_api")]
        api_base: String,
        /// Folder above the per-vendor folders. Empty: vendors' folders
        /// at the top.
        #[serde(default)]
        folder: String,
        #[serde(default = "default_upload_timeout_ms")]
        timeout_ms: u64,
    },
    /// An S3-compatible bucket: AWS S3, MinIO, Cloudflare R2, ...
    S3 {
        bucket: String,
        /// The service's URL, for S3-compatible services (e.g.
        /// `http://127.0.0.1:9000` for a MinIO). Absent: AWS S3.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        #[serde(default = "s3::default_region")]
        region: String,
        /// Key prefix above the per-vendor folders. Empty: vendors'
        /// folders at the top of the bucket.
        #[serde(default)]
        prefix: String,
        /// What recorded URLs start with: the bucket's root as the shop
        /// reaches it (a CDN, a public bucket domain). Empty:
        /// `<endpoint>/<bucket>`, or AWS's `https://<bucket>.s3.<region>.amazonaws.com`.
        #[serde(default)]
        public_base_url: String,
        /// The environment variables holding the access key pair (and the
        /// session token of temporary credentials, if set); the secret is
        /// never written in the configuration itself.
        #[serde(default = "s3::default_key_env")]
        access_key_id_env: String,
        #[serde(default = "s3::default_secret_env")]
        secret_access_key_env: String,
        #[serde(default = "s3::default_token_env")]
        session_token_env: String,
        /// Allow a plain `http://` endpoint (a local MinIO).
        #[serde(default)]
        allow_http: bool,
        #[serde(default = "default_upload_timeout_ms")]
        timeout_ms: u64,
        /// Retries of a connection error or 5xx inside one attempt, before
        /// the pipeline's own retries of the event take over.
        #[serde(default = "default_s3_retries")]
        retries: usize,
    },
}

fn default_s3_retries() -> usize {
    2
}

fn default_cloudinary_env() -> String {
    "CLOUDINARY_URL".into()
}

fn default_cloudinary_api() -> String {
    "https://api.cloudinary.com".into()
}

fn default_upload_timeout_ms() -> u64 {
    60_000
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("cloudinary credentials: {0}")]
    Credentials(#[from] cloudinary::CredentialsError),
    #[error("s3 credentials: {0}")]
    S3Credentials(#[from] s3::CredentialsError),
    #[error("S3 credentials given for another backend")]
    NotS3,
    #[error(transparent)]
    S3Client(#[from] s3::S3ClientError),
    #[error("building the HTTP client")]
    Http(#[from] reqwest::Error),
}

impl UploadConfig {
    pub fn build(&self, ctx: StageContext) -> Result<UploadStage, UploadError> {
        match self {
            UploadConfig::Cloudinary { credentials_env, .. } => {
                let credentials = Credentials::from_env(credentials_env)?;
                self.build_with(ctx, Some(credentials))
            }
            UploadConfig::S3 {
                access_key_id_env,
                secret_access_key_env,
                session_token_env,
                ..
            } => {
                let credentials =
                    s3::Credentials::from_env(access_key_id_env, secret_access_key_env, session_token_env)?;
                self.build_s3_with(ctx, credentials)
            }
            UploadConfig::Local { .. } => self.build_with(ctx, None),
        }
    }

    /// Builds the `s3` backend with the given credentials instead of
    /// reading them from the environment.
    pub fn build_s3_with(&self, ctx: StageContext, credentials: s3::Credentials) -> Result<UploadStage, UploadError> {
        let UploadConfig::S3 {
            bucket,
            endpoint,
            region,
            prefix,
            public_base_url,
            allow_http,
            timeout_ms,
            retries,
            ..
        } = self
        else {
            return Err(UploadError::NotS3);
        };
        let settings = s3::Settings {
            bucket: bucket.clone(),
            endpoint: endpoint.clone().filter(|e| !e.is_empty()),
            region: region.clone(),
            allow_http: *allow_http,
            timeout: Duration::from_millis(*timeout_ms),
            retries: *retries,
        };
        let public_base_url = if public_base_url.is_empty() {
            settings.default_public_base_url()
        } else {
            public_base_url.trim_end_matches('/').to_string()
        };
        let client = s3::Client::new(&settings, credentials)?;
        Ok(UploadStage {
            ctx,
            backend: Backend::S3 {
                client: Arc::new(client),
                prefix: prefix.trim_matches('/').to_string(),
                public_base_url,
            },
        })
    }

    /// Builds with the given Cloudinary credentials instead of reading
    /// them from the environment.
    pub fn build_with(&self, ctx: StageContext, credentials: Option<Credentials>) -> Result<UploadStage, UploadError> {
        let backend = match self {
            UploadConfig::Local { dir, public_base_url } => Backend::Local {
                dir: dir.clone(),
                public_base_url: public_base_url.clone(),
            },
            UploadConfig::Cloudinary {
                credentials_env,
                api_base,
                folder,
                timeout_ms,
            } => {
                let credentials = credentials.ok_or_else(|| {
                    UploadError::Credentials(cloudinary::CredentialsError::Missing(credentials_env.clone()))
                })?;
                let client = cloudinary::Client::new(api_base, credentials, Duration::from_millis(*timeout_ms))?;
                Backend::Cloudinary {
                    client: Arc::new(client),
                    folder: folder.trim_matches('/').to_string(),
                }
            }
            UploadConfig::S3 { .. } => return self.build(ctx),
        };
        Ok(UploadStage { ctx, backend })
    }
}

enum Backend {
    Local {
        dir: PathBuf,
        public_base_url: String,
    },
    Cloudinary {
        client: Arc<cloudinary::Client>,
        folder: String,
    },
    S3 {
        client: Arc<s3::Client>,
        prefix: String,
        public_base_url: String,
    },
}

pub struct UploadStage {
    ctx: StageContext,
    backend: Backend,
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
    /// Stores one output of an image and returns its public URL.
    async fn store(
        &self,
        ev: &mut ImageEvent,
        variant: &str,
        ext: &str,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<String, StageError> {
        match &self.backend {
            Backend::Local { dir, public_base_url } => {
                let key = object_key(ev, variant, ext);
                let path = dir.join(&key);
                // The error is shown to the vendor: it names the object's
                // key, never where the media directory lives; the log has
                // the path.
                let failed = |e: std::io::Error| {
                    tracing::warn!(path = %path.display(), error = %e, "storing a result failed");
                    StageError::retryable(format!("storing result {key}: {}", e.kind()))
                };
                if let Some(parent) = path.parent() {
                    tokio::fs::create_dir_all(parent).await.map_err(failed)?;
                }
                let tmp = path.with_extension("partial");
                tokio::fs::write(&tmp, &bytes)
                    .await
                    .and(tokio::fs::rename(&tmp, &path).await)
                    .map_err(failed)?;
                Ok(format!("{}/{}", public_base_url.trim_end_matches('/'), key))
            }
            Backend::Cloudinary { client, folder } => {
                let vendor = safe_component(&ev.vendor);
                let folder = if folder.is_empty() {
                    vendor
                } else {
                    format!("{folder}/{vendor}")
                };
                let public_id = format!("{}/{}/{}", ev.job, ev.image, safe_component(variant));
                let file_name = format!("{}.{ext}", safe_component(variant));
                let up = client
                    .upload(&folder, &public_id, &file_name, content_type, bytes)
                    .await?;
                let assets = ev
                    .notes
                    .entry("cloudinary")
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if let Some(map) = assets.as_object_mut() {
                    map.insert(
                        variant.to_string(),
                        serde_json::json!({
                            "public_id": up.public_id,
                            "version": up.version,
                            "asset_id": up.asset_id,
                            "secure_url": up.secure_url,
                        }),
                    );
                }
                Ok(up.secure_url)
            }
            Backend::S3 {
                client,
                prefix,
                public_base_url,
            } => {
                let key = object_key(ev, variant, ext);
                let key = if prefix.is_empty() {
                    key
                } else {
                    format!("{prefix}/{key}")
                };
                let stored = client.put(&key, content_type, bytes).await?;
                let objects = ev
                    .notes
                    .entry("s3")
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if let Some(map) = objects.as_object_mut() {
                    map.insert(
                        variant.to_string(),
                        serde_json::json!({
                            "key": key,
                            "e_tag": stored.e_tag,
                            "version": stored.version,
                        }),
                    );
                }
                Ok(format!("{public_base_url}/{key}"))
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
            let len = bytes.len() as u64;
            let url = self.store(&mut event, "image", ext, ct, bytes).await?;
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
        // Variants resize found identical share one blob: stored once.
        let mut stored: std::collections::HashMap<String, String> = std::collections::HashMap::new();
        for name in names {
            let out = event.outputs.get(&name).cloned().unwrap_or_default();
            if out.url.is_some() {
                continue;
            }
            let Some(blob) = out.blob.clone() else { continue };
            if let Some(url) = stored.get(&blob) {
                let o = event.outputs.get_mut(&name).expect("listed above");
                o.url = Some(url.clone());
                o.blob = None;
                continue;
            }
            let bytes = self.ctx.blobs.get(&blob).await.map_err(|e| {
                tracing::warn!(blob, error = %e, "reading a result blob failed");
                StageError::retryable(format!("reading blob {blob}: {}", e.kind()))
            })?;
            let ext = blob.rsplit('.').next().unwrap_or("bin").to_string();
            let url = self.store(&mut event, &name, &ext, &out.content_type, bytes).await?;
            stored.insert(blob, url.clone());
            let o = event.outputs.get_mut(&name).expect("listed above");
            o.url = Some(url);
            o.blob = None;
        }
        Ok(Outcome::Done(event))
    }
}
