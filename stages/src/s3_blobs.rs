//! Blobs between stages in an S3-compatible bucket: the store to use when
//! the API and the workers run on several hosts that share nothing but
//! Redis, the results database and the bucket. A blob key
//! `<job>/<image>/<name>` is the object `<prefix>/<job>/<image>/<name>`.
//!
//! It owns only the bytes: which blobs exist and when they may go is the
//! pipeline's business (see `image_queue_pipeline::blob`). Uploads are
//! written as they arrive, in parts of [`PART_BYTES`] (one `PutObject` when
//! smaller), so a large upload never sits in memory whole; one dropped
//! before it is committed leaves at most an unfinished multipart upload,
//! which the bucket's lifecycle rule for those removes (see
//! docs/OPERATIONS.md). Errors name the bucket and key and never a secret.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use image_queue_pipeline::{BlobStore, BlobWriter};
use object_store::buffered::BufWriter;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::s3;

/// Bytes an upload is buffered up to before it goes out as a part (S3's
/// smallest part).
pub const PART_BYTES: usize = 5 * 1024 * 1024;

/// `[blobs]`: where blobs between stages live when not in `blob_dir`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BlobsConfig {
    /// An S3-compatible bucket (AWS S3, MinIO, Cloudflare R2, ...).
    S3 {
        bucket: String,
        /// The service's URL, for S3-compatible services. Absent: AWS S3.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        endpoint: Option<String>,
        #[serde(default = "s3::default_region")]
        region: String,
        /// Objects go under this prefix in the bucket.
        #[serde(default = "default_prefix")]
        prefix: String,
        /// Environment variables holding the access key pair (and a
        /// session token, for temporary credentials).
        #[serde(default = "s3::default_key_env")]
        access_key_id_env: String,
        #[serde(default = "s3::default_secret_env")]
        secret_access_key_env: String,
        #[serde(default = "s3::default_token_env")]
        session_token_env: String,
        /// Allow a plain `http://` endpoint (a local MinIO).
        #[serde(default)]
        allow_http: bool,
        #[serde(default = "default_timeout_ms")]
        timeout_ms: u64,
    },
}

fn default_prefix() -> String {
    "blobs".into()
}
fn default_timeout_ms() -> u64 {
    30_000
}

/// Why the S3 blob store cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum BlobsConfigError {
    #[error("blobs: s3 credentials")]
    Credentials(#[from] s3::CredentialsError),
    #[error("blobs")]
    Client(#[from] s3::S3ClientError),
}

impl BlobsConfig {
    /// The store, with the access keys read from the environment.
    pub fn build(&self) -> Result<S3BlobStore, BlobsConfigError> {
        let BlobsConfig::S3 {
            access_key_id_env,
            secret_access_key_env,
            session_token_env,
            ..
        } = self;
        let credentials = s3::Credentials::from_env(access_key_id_env, secret_access_key_env, session_token_env)?;
        self.build_with(credentials)
    }

    /// The store with the access keys given.
    pub fn build_with(&self, credentials: s3::Credentials) -> Result<S3BlobStore, BlobsConfigError> {
        let BlobsConfig::S3 {
            bucket,
            endpoint,
            region,
            prefix,
            allow_http,
            timeout_ms,
            ..
        } = self;
        let settings = s3::Settings {
            bucket: bucket.clone(),
            endpoint: endpoint.clone(),
            region: region.clone(),
            allow_http: *allow_http,
            timeout: Duration::from_millis(*timeout_ms),
            retries: 3,
        };
        let (store, secrets) = s3::build_store(&settings, credentials)?;
        Ok(S3BlobStore {
            store: Arc::new(store),
            bucket: bucket.clone(),
            prefix: prefix.trim_matches('/').to_string(),
            secrets,
        })
    }
}

pub struct S3BlobStore {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    prefix: String,
    secrets: Vec<secrecy::SecretString>,
}

impl std::fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3BlobStore(s3://{}/{})", self.bucket, self.prefix)
    }
}

impl S3BlobStore {
    fn location(&self, key: &str) -> io::Result<Path> {
        let full = if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}/{key}", self.prefix)
        };
        // Keys come from our own events, but a key is a path: one that
        // does not parse as plain segments is refused, never normalised.
        Path::parse(&full).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("blob key {key:?}: {e}")))
    }

    fn error(&self, doing: &str, key: &str, e: object_store::Error) -> io::Error {
        let kind = match e {
            object_store::Error::NotFound { .. } => io::ErrorKind::NotFound,
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
                io::ErrorKind::PermissionDenied
            }
            _ => io::ErrorKind::Other,
        };
        let mut text = format!("s3 bucket {}: {doing} {key}: {e}", self.bucket);
        for s in &self.secrets {
            let s = secrecy::ExposeSecret::expose_secret(s);
            if !s.is_empty() {
                text = text.replace(s, "[redacted]");
            }
        }
        io::Error::new(kind, text)
    }

    /// Every object under `prefix` (relative to the store's own prefix).
    async fn list(&self, prefix: &str) -> io::Result<Vec<object_store::ObjectMeta>> {
        let at = self.location(prefix)?;
        self.store
            .list(Some(&at))
            .try_collect()
            .await
            .map_err(|e| self.error("listing", prefix, e))
    }

    async fn delete_all(&self, locations: Vec<Path>) -> io::Result<()> {
        let stream = futures::stream::iter(locations.into_iter().map(Ok)).boxed();
        self.store
            .delete_stream(stream)
            .try_collect::<Vec<_>>()
            .await
            .map(|_| ())
            .or_else(|e| match e {
                // Gone already: what was asked.
                object_store::Error::NotFound { .. } => Ok(()),
                e => Err(self.error("deleting", "objects", e)),
            })
    }
}

#[async_trait]
impl BlobStore for S3BlobStore {
    async fn put(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        let at = self.location(key)?;
        self.store
            .put(&at, PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| self.error("storing", key, e))
    }

    async fn get(&self, key: &str) -> io::Result<Bytes> {
        let at = self.location(key)?;
        let got = self.store.get(&at).await.map_err(|e| self.error("reading", key, e))?;
        got.bytes().await.map_err(|e| self.error("reading", key, e))
    }

    async fn writer(&self, key: &str) -> io::Result<Box<dyn BlobWriter>> {
        let at = self.location(key)?;
        Ok(Box::new(S3Writer {
            inner: BufWriter::with_capacity(self.store.clone(), at, PART_BYTES),
            key: key.to_string(),
            bucket: self.bucket.clone(),
        }))
    }

    async fn delete_job(&self, job: &str) -> io::Result<()> {
        let objects = self.list(job).await?;
        self.delete_all(objects.into_iter().map(|o| o.location).collect()).await
    }

    async fn sweep(&self, max_age: Duration) -> io::Result<usize> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64;
        let cutoff_ms = now_ms.saturating_sub(max_age.as_millis().min(i64::MAX as u128) as i64);
        let root = if self.prefix.is_empty() {
            None
        } else {
            Some(Path::parse(&self.prefix).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?)
        };
        let all: Vec<object_store::ObjectMeta> = self
            .store
            .list(root.as_ref())
            .try_collect()
            .await
            .map_err(|e| self.error("listing", "", e))?;
        // A job's blobs go together, once the newest of them is old.
        let depth = root.as_ref().map_or(0, |r| r.parts().count());
        let mut jobs: BTreeMap<String, (i64, Vec<Path>)> = BTreeMap::new();
        for o in all {
            let Some(job) = o.location.parts().nth(depth) else {
                continue;
            };
            let modified_ms = o.last_modified.timestamp_millis();
            let entry = jobs
                .entry(job.as_ref().to_string())
                .or_insert((modified_ms, Vec::new()));
            entry.0 = entry.0.max(modified_ms);
            entry.1.push(o.location);
        }
        let mut removed = 0;
        for (_, (newest_ms, locations)) in jobs {
            if newest_ms < cutoff_ms {
                self.delete_all(locations).await?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

struct S3Writer {
    inner: BufWriter,
    key: String,
    bucket: String,
}

#[async_trait]
impl BlobWriter for S3Writer {
    async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        self.inner.write_all(chunk).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("s3 bucket {}: writing {}: {e}", self.bucket, self.key),
            )
        })
    }

    async fn commit(mut self: Box<Self>) -> io::Result<()> {
        self.inner.shutdown().await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("s3 bucket {}: finishing {}: {e}", self.bucket, self.key),
            )
        })
    }
}
