//! What the integration tests share: a private `redis-server` per test, a
//! temporary data directory, real stages, and ways to submit jobs and wait
//! for them.
#![allow(dead_code)]

pub mod ha;
pub mod http;

use std::collections::HashSet;
use std::io::Cursor;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use image::{DynamicImage, ImageFormat, Rgba, RgbaImage};
use image_queue_pipeline::blob::blob_key;
use image_queue_pipeline::redis_server::{Fsync, RedisServer};
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{
    BlobStore, JobStore, JobView, LocalBlobStore, NewImage, NewJob, Operation, Pipeline, RunnerConfig, Source, Stage,
    StageName,
};
use image_queue_stages::decode::DecodeLimits;
use image_queue_stages::{
    BgRemovalConfig, DbCommitConfig, FaceCropConfig, FetchConfig, RateCheckConfig, ResizeConfig, StageContext,
    UploadConfig,
};
use tokio_util::sync::CancellationToken;

pub const ALL_OPS: [Operation; 3] = [Operation::BgRemoval, Operation::FaceCrop, Operation::Resize];

pub struct TestEnv {
    pub redis: RedisServer,
    pub dir: tempfile::TempDir,
    pub pipeline: Pipeline,
    pub jobs: JobStore,
}

impl TestEnv {
    pub async fn start(fsync: Fsync) -> TestEnv {
        let dir = tempfile::tempdir().expect("a temp dir");
        let redis = RedisServer::start(&dir.path().join("redis"), fsync)
            .await
            .expect("redis-server must be installed to run these tests (apt-get install redis-server)");
        let url = redis.url();
        TestEnv::connect(dir, redis, &url).await
    }

    /// The environment on Redis at `url` (a Sentinel or cluster URL), with
    /// `redis` one of its servers, kept for as long as the environment.
    pub async fn connect(dir: tempfile::TempDir, redis: RedisServer, url: &str) -> TestEnv {
        let blobs: Arc<dyn BlobStore> = Arc::new(LocalBlobStore::new(dir.path().join("blobs")).unwrap());
        let mut pipeline = Pipeline::connect(url, "iq", blobs)
            .await
            .expect("connect to the test redis");
        // Every script the tests run fails if it names a key its caller
        // did not pass in KEYS.
        pipeline.scripts = Arc::new(image_queue_pipeline::scripts::Scripts::tracking_keys());
        let jobs = JobStore::new(pipeline.clone(), 3600);
        TestEnv {
            redis,
            dir,
            pipeline,
            jobs,
        }
    }

    pub fn database_url(&self) -> String {
        format!("sqlite://{}/results.db?mode=rwc", self.dir.path().display())
    }

    pub fn media_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("media")
    }

    /// The real stage for a name, configured for tests (small variants).
    pub async fn stage(&self, name: StageName) -> Arc<dyn Stage> {
        let ctx = StageContext {
            blobs: self.pipeline.blobs.clone(),
            fetcher: Arc::new(FetchConfig::default().build().unwrap()),
            limits: DecodeLimits::default(),
        };
        match name {
            StageName::RateCheck => Arc::new(RateCheckConfig::default().build(ctx).unwrap()),
            StageName::BgRemoval => Arc::new(BgRemovalConfig::default().build(ctx).unwrap()),
            StageName::FaceCrop => Arc::new(FaceCropConfig::default().build(ctx).unwrap()),
            StageName::Resize => Arc::new(ResizeConfig::default().build(ctx).unwrap()),
            StageName::Upload => Arc::new(
                UploadConfig::Local {
                    dir: self.media_dir(),
                    public_base_url: "http://media.test/media".into(),
                }
                .build(ctx)
                .unwrap(),
            ),
            StageName::DbCommit => Arc::new(DbCommitConfig::default().build(&self.database_url()).await.unwrap()),
        }
    }

    /// Runs every stage in this process until the token is cancelled.
    pub async fn run_all_stages(&self, cfg: RunnerConfig, shutdown: CancellationToken) -> tokio::task::JoinSet<()> {
        let upload = self.stage(StageName::Upload).await;
        self.run_all_stages_with_upload(cfg, shutdown, upload).await
    }

    /// Runs every stage, with `upload` as the upload stage, until the token
    /// is cancelled.
    pub async fn run_all_stages_with_upload(
        &self,
        cfg: RunnerConfig,
        shutdown: CancellationToken,
        upload: Arc<dyn Stage>,
    ) -> tokio::task::JoinSet<()> {
        let mut set = tokio::task::JoinSet::new();
        for name in StageName::ALL {
            let stage = match name {
                StageName::Upload => upload.clone(),
                _ => self.stage(name).await,
            };
            let runner = StageRunner::new(self.pipeline.clone(), stage, cfg.clone());
            let s = shutdown.clone();
            set.spawn(async move {
                runner.run(s).await.expect("runner");
            });
        }
        set
    }

    /// Submits `jobs` jobs of `images` PNGs each, as the API would after an upload.
    pub async fn submit(&self, vendor: &str, jobs: usize, images: usize, ops: &[Operation], side: u32) -> Vec<String> {
        let png = Bytes::from(product_png(side, side * 3 / 4));
        let mut ids = Vec::new();
        for _ in 0..jobs {
            let id = NewJob::new_id();
            let mut imgs = Vec::new();
            for i in 0..images {
                let key = blob_key(&id, i as u32, "original");
                self.pipeline.blobs.put(&key, png.clone()).await.unwrap();
                imgs.push(NewImage {
                    source: Source::Blob(key),
                    record_id: format!("sku-{i}"),
                });
            }
            let s = self
                .jobs
                .submit(NewJob {
                    id: id.clone(),
                    vendor: vendor.into(),
                    operations: ops.to_vec(),
                    images: imgs,
                    idempotency_key: None,
                    fingerprint: None,
                    traceparent: None,
                })
                .await
                .unwrap();
            ids.push(s.job_id);
        }
        ids
    }

    /// Waits until every job is in a terminal state, by polling the job
    /// records (the only signal that survives a Redis restart).
    pub async fn wait_terminal(&self, ids: &[String], timeout: Duration) -> Vec<JobView> {
        self.try_wait_terminal(ids, timeout)
            .await
            .unwrap_or_else(|stuck| panic!("{stuck}"))
    }

    /// The same, answering with what is stuck (a few of the open jobs and
    /// the pipeline's figures) instead of failing the test.
    pub async fn try_wait_terminal(&self, ids: &[String], timeout: Duration) -> Result<Vec<JobView>, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut views = Vec::new();
            let mut open = 0;
            for id in ids {
                match self.jobs.get(None, id).await {
                    Ok(Some(v)) => {
                        if !v.is_terminal() {
                            open += 1;
                        }
                        views.push(v);
                    }
                    _ => open += 1,
                }
            }
            if open == 0 {
                return Ok(views);
            }
            if Instant::now() >= deadline {
                let stuck: Vec<_> = views.iter().filter(|v| !v.is_terminal()).take(3).collect();
                let stats = image_queue_pipeline::stats::collect(&self.pipeline).await;
                return Err(format!(
                    "{open} of {} jobs still open after {timeout:?}: {stuck:#?}\nstats: {stats:#?}",
                    ids.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Subscribes to the finished-jobs channel; `wait` then returns once
    /// every given job has been announced.
    pub async fn finished_listener(&self) -> FinishedListener {
        let pubsub = self
            .pipeline
            .subscribe(&[self.pipeline.keys.finished_channel()])
            .await
            .unwrap();
        FinishedListener { pubsub }
    }

    /// Every result row in the test's database: job, image, variant.
    pub async fn results_rows(&self) -> Vec<(String, i64, String)> {
        result_rows(&self.database_url())
            .await
            .into_iter()
            .map(|(job, image, variant, _)| (job, image, variant))
            .collect()
    }
}

pub struct FinishedListener {
    pubsub: redis::aio::PubSub,
}

impl FinishedListener {
    pub async fn wait(&mut self, ids: &[String], timeout: Duration) {
        let mut open: HashSet<&str> = ids.iter().map(String::as_str).collect();
        let mut stream = self.pubsub.on_message();
        let r = tokio::time::timeout(timeout, async {
            while !open.is_empty() {
                let msg = stream.next().await.expect("subscription ended");
                let payload: String = msg.get_payload().unwrap();
                // A line "<job id> <status>" per closed job.
                for line in payload.lines() {
                    open.remove(line.split(' ').next().unwrap_or(""));
                }
            }
        })
        .await;
        assert!(r.is_ok(), "{} jobs not finished within {timeout:?}", open.len());
    }
}

/// A product shot: a coloured block on a light backdrop.
pub fn product_png(w: u32, h: u32) -> Vec<u8> {
    let mut img = RgbaImage::from_pixel(w, h, Rgba([245, 245, 245, 255]));
    for y in h / 4..h * 3 / 4 {
        for x in w / 4..w * 3 / 4 {
            img.put_pixel(x, y, Rgba([(x * 255 / w) as u8, 40, (y * 255 / h) as u8, 255]));
        }
    }
    let mut out = Vec::new();
    DynamicImage::ImageRgba8(img)
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .unwrap();
    out
}

/// A runner configuration for tests: short idle and reclaim times.
pub fn fast_runner(concurrency: usize) -> RunnerConfig {
    RunnerConfig {
        concurrency,
        read_block_ms: 200,
        claim_idle_ms: 1_500,
        reclaim_every_ms: 200,
        shutdown_grace_ms: 5_000,
        trim_every_ms: 500,
        ..RunnerConfig::default()
    }
}

/// A connection of the test's own to the pipeline's Redis, for looking at
/// (and, in fault tests, tampering with) what the pipeline keeps there: the
/// pipeline's own connection is not public.
pub async fn redis_conn(p: &Pipeline) -> image_queue_pipeline::Conn {
    p.endpoint
        .connect(Some(std::time::Duration::from_secs(10)))
        .await
        .expect("a connection to the test's redis-server")
}

/// Every result row: job, image, variant, URL.
pub async fn result_rows(database_url: &str) -> Vec<(String, i64, String, String)> {
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(database_url).await.unwrap();
    // MySQL's CAST knows no BIGINT, SQLite's no SIGNED.
    let int = if database_url.starts_with("mysql") {
        "SIGNED"
    } else {
        "BIGINT"
    };
    let rows = sqlx::query_as(&format!(
        "SELECT job_id, CAST(image_index AS {int}), variant, url FROM image_results"
    ))
    .fetch_all(&pool)
    .await
    .unwrap();
    pool.close().await;
    rows
}
