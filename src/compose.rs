//! How the binary puts the system together: the Redis connection (given,
//! or the one `up` runs on the same data directory), each stage from its
//! configuration, the API on a bound listener, webhook delivery.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use image_queue_api::{app, ApiConfig, AppState, Auth, ProgressHub};
use image_queue_pipeline::estimate::QuotaConfig;
use image_queue_pipeline::webhooks::run_deliveries;
use image_queue_pipeline::{BlobStore, JobStore, LocalBlobStore, Pipeline, Stage, StageName};
use image_queue_stages::webhook::HttpWebhookSender;
use image_queue_stages::{fetch::Fetcher, StageContext, UploadConfig};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Config;

/// The file, in the data directory, naming the Redis `up` runs on.
pub const REDIS_URL_FILE: &str = "redis.url";

/// The Redis URL `up` left in `data_dir`, if any.
pub fn redis_url_of(data_dir: &Path) -> Option<String> {
    let url = std::fs::read_to_string(data_dir.join(REDIS_URL_FILE)).ok()?;
    let url = url.trim();
    (!url.is_empty()).then(|| url.to_string())
}

pub async fn connect(config: &Config) -> anyhow::Result<Pipeline> {
    // No Redis given: the one `up` runs on this data directory, if any.
    let (redis_url, from_up) = if config.redis_url.is_empty() {
        match redis_url_of(&config.data_dir) {
            Some(url) => (url, true),
            None => bail!(
                "no Redis given: pass --redis-url or set REDIS_URL, or run this with the --data-dir of a running \
                 `image-queue up` ({} has no {})",
                config.data_dir.display(),
                REDIS_URL_FILE
            ),
        }
    } else {
        (config.redis_url.clone(), false)
    };
    let blobs: Arc<dyn BlobStore> = match &config.blobs {
        Some(s3) => Arc::new(s3.build()?),
        None => Arc::new(
            LocalBlobStore::new(config.blob_dir())
                .with_context(|| format!("creating the blob directory {}", config.blob_dir().display()))?,
        ),
    };
    Pipeline::connect(&redis_url, &config.key_prefix, blobs)
        .await
        .with_context(|| {
            if from_up {
                format!(
                    "connecting to Redis at {} (the one `image-queue up` wrote into {}: is it still running?)",
                    redact(&redis_url),
                    config.data_dir.join(REDIS_URL_FILE).display()
                )
            } else {
                format!("connecting to Redis at {}", redact(&redis_url))
            }
        })
}

/// A URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match image_queue_pipeline::endpoint::mask_passwords(url, "***") {
        Some(masked) => masked,
        None if url.contains("://") => url.to_string(),
        None => "(unparseable URL)".into(),
    }
}

pub async fn build_stage(name: StageName, config: &Config, p: &Pipeline) -> anyhow::Result<Arc<dyn Stage>> {
    let fetcher: Fetcher = config.fetch.build()?;
    let ctx = StageContext {
        blobs: p.blobs.clone(),
        fetcher: Arc::new(fetcher),
        limits: config.decode.clone(),
    };
    Ok(match name {
        StageName::RateCheck => Arc::new(config.rate_check.build(ctx)?),
        StageName::BgRemoval => Arc::new(config.bg_removal.build(ctx)?.on_doubtful_mask(config.on_doubtful_mask)),
        StageName::FaceCrop => Arc::new(config.face_crop.build(ctx)?),
        StageName::Resize => Arc::new(config.resize.build(ctx)?),
        StageName::Upload => {
            let upload = config.upload.clone().unwrap_or_else(|| UploadConfig::Local {
                dir: config.media_dir(),
                public_base_url: format!("{}/media", config.public_url()),
            });
            Arc::new(upload.build(ctx).context("setting up uploads")?)
        }
        StageName::DbCommit => Arc::new(
            config
                .db_commit
                .build(&config.database_url())
                .await
                .with_context(|| "connecting to the results database")?,
        ),
    })
}

/// Serves the API on a bound listener until shutdown.
pub async fn serve_api_on(
    config: &Config,
    p: Pipeline,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.api.validate()?;
    image_queue_api::metrics::install();
    let admin = (!config.admin_key.is_empty()).then_some(config.admin_key.as_str());
    let state = AppState {
        jobs: JobStore::new(p.clone(), config.job_retention_secs)
            .with_scheduling(
                QuotaConfig {
                    limits: config.pipeline.quotas.clone(),
                    window_ms: config.pipeline.quota_window_ms,
                },
                config.pipeline.admission_window,
            )
            .with_replication(config.redis),
        blobs: p.blobs.clone(),
        auth: Auth::new(p.clone(), admin),
        config: ApiConfig {
            // Uploads and URLs are screened at the door by the rules the
            // stages apply later, so both agree.
            decode: config.decode.clone(),
            url_policy: config.fetch.address_policy()?,
            ..config.api.clone()
        },
        progress: ProgressHub::new(p.clone()),
        media_dir: Some(config.media_dir()),
    };
    info!(listen = %listener.local_addr()?, "API listening");
    image_queue_api::serve(listener, app(state), &config.api.server, shutdown.cancelled()).await?;
    Ok(())
}

/// Delivers vendors' webhooks until shutdown, through the same address
/// rules as image fetching.
pub async fn deliver_webhooks(config: &Config, p: Pipeline, shutdown: CancellationToken) -> anyhow::Result<()> {
    let fetcher = config.fetch.build()?;
    let sender = Arc::new(HttpWebhookSender::new(fetcher));
    run_deliveries(p, sender, config.webhooks.clone(), shutdown).await?;
    Ok(())
}
