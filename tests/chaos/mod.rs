//! What the chaos tests share: a real pipeline of separate processes (the
//! API and one or more workers per stage, all the real binary) on a private
//! `redis-server` with its append-only file and a SQLite results database;
//! tiny images submitted over HTTP; and the checker of the suite's
//! invariants: every accepted job reaches exactly one terminal state, no
//! result is committed twice and no object is uploaded under two keys.
#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use image_queue_api::Auth;
use image_queue_pipeline::redis_server::{free_port, Fsync};
use image_queue_pipeline::{JobView, StageName};
use rand::Rng;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::common::{product_png, result_rows, TestEnv};

pub const VENDOR: &str = "vendor-a";
/// The resize stage's default variants: every image has one object and one
/// result row per variant.
pub const VARIANTS: [&str; 3] = ["large", "medium", "thumb"];

/// `CHAOS_HEAVY=1` runs the suite with more images and faults.
pub fn heavy() -> bool {
    std::env::var("CHAOS_HEAVY").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// How much work a test pushes through: `jobs` jobs of `images` images.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    pub jobs: usize,
    pub images: usize,
}

impl Load {
    /// At least 1,000 images; five times that when heavy.
    pub fn standard() -> Load {
        Load {
            jobs: if heavy() { 500 } else { 100 },
            images: 10,
        }
    }

    pub fn total_images(&self) -> usize {
        self.jobs * self.images
    }
}

pub struct Worker {
    pub stage: StageName,
    pub concurrency: usize,
    pub child: Child,
}

/// The processes of one pipeline, on one test's Redis and database.
pub struct Cluster {
    pub env: TestEnv,
    /// The Redis URL workers are given (a proxy's, in the network test).
    pub worker_redis_url: String,
    /// The Redis URL the API is given.
    pub api_redis_url: String,
    /// Settings every process started from now on gets, as environment
    /// variables.
    pub extra_env: Vec<(String, String)>,
    /// What every submitted job asks for (comma-separated); `resize` unless
    /// a test sets more.
    pub operations: &'static str,
    /// The results database (the test's SQLite unless a test sets another).
    pub database_url: String,
    pub api_addr: String,
    pub api: tokio::sync::Mutex<Option<Child>>,
    pub workers: tokio::sync::Mutex<Vec<Worker>>,
    pub vendor_key: String,
    pub http: reqwest::Client,
    /// Submit attempts that got no 2xx and were retried.
    pub retried_submits: AtomicUsize,
    /// Retried submits answered 200: an attempt whose answer was lost had
    /// made the job already.
    pub found_by_retry: AtomicUsize,
    /// Submit requests sent and not yet answered.
    pub in_flight: Arc<AtomicUsize>,
    log_seq: AtomicUsize,
}

impl Cluster {
    /// Starts Redis (append-only file, `appendfsync always`) and nothing else.
    pub async fn new() -> Cluster {
        Cluster::with_fsync(Fsync::Always).await
    }

    pub async fn with_fsync(fsync: Fsync) -> Cluster {
        let env = TestEnv::start(fsync).await;
        let url = env.redis.url();
        Cluster::on(env, url).await
    }

    /// The processes of a pipeline on `env`, all given `redis_url` (a
    /// Sentinel URL, in the failover test).
    pub async fn on(env: TestEnv, redis_url: String) -> Cluster {
        let vendor_key = Auth::new(env.pipeline.clone(), None)
            .add_vendor(VENDOR)
            .await
            .expect("creating a vendor key");
        std::fs::create_dir_all(env.dir.path().join("logs")).unwrap();
        let database_url = env.database_url();
        Cluster {
            env,
            worker_redis_url: redis_url.clone(),
            api_redis_url: redis_url,
            extra_env: Vec::new(),
            operations: "resize",
            database_url,
            api_addr: format!("127.0.0.1:{}", free_port().unwrap()),
            api: tokio::sync::Mutex::new(None),
            workers: tokio::sync::Mutex::new(Vec::new()),
            vendor_key,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            retried_submits: Default::default(),
            found_by_retry: Default::default(),
            in_flight: Default::default(),
            log_seq: Default::default(),
        }
    }

    /// The binary with this test's configuration, its log in the test's
    /// directory (so a noisy fault does not flood the test output).
    fn command(&self, name: &str, redis_url: &str) -> Command {
        let n = self.log_seq.fetch_add(1, Ordering::Relaxed);
        let log = std::fs::File::create(self.env.dir.path().join("logs").join(format!("{n:03}-{name}.log"))).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_image-queue"));
        cmd.env("REDIS_URL", redis_url)
            .env("DATABASE_URL", &self.database_url)
            .env("IMAGE_QUEUE_DATA_DIR", self.env.dir.path())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        cmd.envs(self.extra_env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn spawn_worker(&self, stage: StageName, concurrency: usize) -> Worker {
        let child = self
            .command(stage.as_str(), &self.worker_redis_url)
            .args([
                "worker",
                "--stage",
                stage.as_str(),
                "--concurrency",
                &concurrency.to_string(),
            ])
            // Short idle and reclaim times, so a killed worker's entries are
            // taken over within seconds, as in tests/processes.rs.
            .env("IMAGE_QUEUE_PIPELINE__CLAIM_IDLE_MS", "1500")
            .env("IMAGE_QUEUE_PIPELINE__RECLAIM_EVERY_MS", "200")
            .env("IMAGE_QUEUE_PIPELINE__READ_BLOCK_MS", "200")
            .env("IMAGE_QUEUE_PIPELINE__TRIM_EVERY_MS", "500")
            .spawn()
            .expect("run the image-queue binary");
        Worker {
            stage,
            concurrency,
            child,
        }
    }

    /// Starts one worker process per entry.
    pub async fn start_workers(&self, stages: &[(StageName, usize)]) {
        let mut workers = self.workers.lock().await;
        for &(stage, concurrency) in stages {
            workers.push(self.spawn_worker(stage, concurrency));
        }
    }

    /// The usual set: one process per stage and a second resize worker.
    pub async fn start_standard_workers(&self) {
        self.start_workers(&[
            (StageName::RateCheck, 4),
            (StageName::Resize, 2),
            (StageName::Resize, 2),
            (StageName::Upload, 4),
            (StageName::DbCommit, 1),
        ])
        .await;
    }

    /// Starts the API process and waits until it answers `/readyz`.
    pub async fn start_api(&self) {
        let child = self
            .command("api", &self.api_redis_url)
            .args(["api", "--listen", &self.api_addr])
            // The seed's limits would refuse a thousand-image burst; they
            // are not what these tests are about.
            .env("IMAGE_QUEUE_API__RATE_LIMITS__ENABLED", "false")
            .spawn()
            .expect("run the image-queue binary");
        *self.api.lock().await = Some(child);
        self.wait_api_ready(Duration::from_secs(30)).await;
    }

    pub async fn wait_api_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let url = format!("http://{}/readyz", self.api_addr);
        loop {
            if let Ok(r) = self.http.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "the API never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the API process.
    pub async fn kill_api(&self) {
        if let Some(mut child) = self.api.lock().await.take() {
            sigkill(&child);
            child.wait().await.ok();
        }
    }

    /// One multipart submit of `images` tiny PNGs for resizing.
    pub async fn submit_once(&self, idempotency_key: &str, images: usize) -> Result<(u16, Option<String>), String> {
        let png = tiny_png();
        let mut form = reqwest::multipart::Form::new().text("operations", self.operations);
        for i in 0..images {
            form = form
                .part(
                    "images",
                    reqwest::multipart::Part::bytes(png.clone())
                        .file_name(format!("p{i}.png"))
                        .mime_str("image/png")
                        .unwrap(),
                )
                .text("record_id", format!("sku-{i}"));
        }
        let _in_flight = InFlight::enter(&self.in_flight);
        let resp = self
            .http
            .post(format!("http://{}/api/image-queue/jobs", self.api_addr))
            .bearer_auth(&self.vendor_key)
            .header("Idempotency-Key", idempotency_key)
            .multipart(form)
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.map_err(|e| e.to_string())?;
        let job = body.get("job_id").and_then(|j| j.as_str()).map(String::from);
        Ok((status, job))
    }

    /// Submits until a 2xx answers, with the same idempotency key each
    /// time, as a client should: returns the accepted job's id.
    pub async fn submit_until_accepted(&self, idempotency_key: &str, images: usize, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut retry = false;
        loop {
            let last = match self.submit_once(idempotency_key, images).await {
                Ok((s, Some(job))) if (200..300).contains(&s) => {
                    if retry && s == 200 {
                        self.found_by_retry.fetch_add(1, Ordering::Relaxed);
                    }
                    return job;
                }
                Ok((s, _)) => format!("status {s}"),
                Err(e) => e,
            };
            assert!(
                Instant::now() < deadline,
                "submit {idempotency_key} never accepted: {last}"
            );
            self.retried_submits.fetch_add(1, Ordering::Relaxed);
            retry = true;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Submits a whole load, `parallel` clients at a time, spreading the
    /// submits over `spread` so that faults land while work flows. Returns
    /// the accepted job ids, in submit order.
    pub async fn submit_load(&self, load: Load, parallel: usize, spread: Duration) -> Vec<String> {
        let gap = spread / load.jobs as u32;
        let start = Instant::now();
        futures::stream::iter(0..load.jobs)
            .map(|j| async move {
                // The fault schedule's counterpart: submits paced on a timer.
                tokio::time::sleep_until((start + gap * j as u32).into()).await;
                self.submit_until_accepted(&format!("submit-{j}"), load.images, Duration::from_secs(120))
                    .await
            })
            .buffered(parallel)
            .collect()
            .await
    }

    /// SIGKILLs a random worker and starts a replacement for its stage.
    /// Returns the stage and how many entries the victim had in flight.
    pub async fn kill_random_worker(&self, rng: &mut impl Rng) -> (StageName, usize) {
        let mut workers = self.workers.lock().await;
        let i = rng.random_range(0..workers.len());
        let stage = workers[i].stage;
        let pid = workers[i].child.id().expect("worker still running");
        if let Some(status) = workers[i].child.try_wait().unwrap() {
            panic!("the {stage} worker {pid} exited by itself: {status:?}");
        }
        sigkill(&workers[i].child);
        workers[i].child.wait().await.unwrap();
        let orphaned = pending_of(&self.env, stage, pid).await;
        workers[i] = self.spawn_worker(stage, workers[i].concurrency);
        (stage, orphaned)
    }

    /// Fails if any worker exited on its own: a worker must ride out
    /// faults, not leave its stage unmanned.
    pub async fn assert_workers_alive(&self) {
        let mut workers = self.workers.lock().await;
        for w in workers.iter_mut() {
            if let Some(status) = w.child.try_wait().unwrap() {
                panic!(
                    "a {} worker exited by itself: {status:?}\n{}",
                    w.stage,
                    self.logs_tail()
                );
            }
        }
    }

    /// The last lines of every process's log, for failure messages.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        let dir = self.env.dir.path().join("logs");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                continue;
            }
            out.push_str(&format!("--- {}\n", f.file_name().unwrap().to_string_lossy()));
            for l in &lines[lines.len().saturating_sub(5)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub async fn stop_all(&self) {
        for w in self.workers.lock().await.iter_mut() {
            w.child.kill().await.ok();
        }
        if let Some(mut api) = self.api.lock().await.take() {
            api.kill().await.ok();
        }
    }
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(n: &Arc<AtomicUsize>) -> InFlight {
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A 16×16 product shot: the cheapest image the stages really process.
pub fn tiny_png() -> Vec<u8> {
    product_png(16, 16)
}

pub fn sigkill(child: &Child) {
    if let Some(pid) = child.id() {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
}

/// `XPENDING` summary: count, lowest id, highest id, per-consumer counts.
type PendingSummary = (usize, Option<String>, Option<String>, Option<Vec<(String, String)>>);

pub async fn pending_summary(env: &TestEnv, stage: StageName) -> redis::RedisResult<PendingSummary> {
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    redis::cmd("XPENDING")
        .arg(env.pipeline.keys.stream(stage))
        .arg(stage.as_str())
        .query_async(&mut conn)
        .await
}

/// Entries pending at a stage for the consumer of process `pid`.
pub async fn pending_of(env: &TestEnv, stage: StageName, pid: u32) -> usize {
    let tag = format!("-{pid}-");
    pending_summary(env, stage)
        .await
        .map(|s| {
            s.3.unwrap_or_default()
                .iter()
                .filter(|(name, _)| name.contains(&tag))
                .map(|(_, n)| n.parse::<usize>().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0)
}

/// Counts the finished-job announcements, resubscribing whenever the
/// connection drops (as it does when Redis is killed).
pub struct Announcements {
    counts: Arc<Mutex<HashMap<String, u32>>>,
    stop: CancellationToken,
}

impl Drop for Announcements {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Announcements {
    pub async fn listen(env: &TestEnv) -> Announcements {
        let counts: Arc<Mutex<HashMap<String, u32>>> = Default::default();
        let stop = CancellationToken::new();
        let pipeline = env.pipeline.clone();
        let channel = [env.pipeline.keys.finished_channel()];
        // The first subscription is in place before this returns, so no
        // announcement of the test's jobs can be missed by starting late.
        let first = pipeline.subscribe(&channel).await.unwrap();
        let (c, s) = (counts.clone(), stop.clone());
        tokio::spawn(async move {
            let mut next = Some(first);
            loop {
                let mut pubsub = match next.take() {
                    Some(p) => p,
                    None => match pipeline.subscribe(&channel).await {
                        Ok(p) => p,
                        Err(_) => {
                            tokio::select! {
                                _ = s.cancelled() => return,
                                _ = tokio::time::sleep(Duration::from_millis(50)) => continue,
                            }
                        }
                    },
                };
                let mut stream = pubsub.on_message();
                loop {
                    tokio::select! {
                        _ = s.cancelled() => return,
                        msg = stream.next() => match msg {
                            Some(m) => {
                                let payload: String = m.get_payload().unwrap_or_default();
                                // A line "<job id> <status>" per closed job.
                                for line in payload.lines() {
                                    let job = line.split(' ').next().unwrap_or("").to_string();
                                    *c.lock().unwrap().entry(job).or_default() += 1;
                                }
                            }
                            None => break,
                        }
                    }
                }
            }
        });
        Announcements { counts, stop }
    }

    pub fn snapshot(&self) -> HashMap<String, u32> {
        self.counts.lock().unwrap().clone()
    }

    /// Waits until every job has been announced, within `timeout`.
    pub async fn wait_all(&self, ids: &[String], timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let counts = self.snapshot();
            let missing = ids.iter().filter(|id| !counts.contains_key(*id)).count();
            if missing == 0 {
                return;
            }
            assert!(Instant::now() < deadline, "{missing} finished jobs never announced");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// How strictly finished-job announcements are counted: pub/sub is not
/// durable, so one sent while the test's subscriber is cut off by a Redis
/// restart is lost; a second announcement of a job is a bug either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announced {
    ExactlyOnce,
    AtMostOnce,
}

/// What the checker saw, for the tests' reports.
#[derive(Debug)]
pub struct Checked {
    pub jobs: usize,
    pub images: usize,
    pub rows: usize,
    pub objects: usize,
    /// Result rows and objects of jobs Redis forgot (see
    /// [`check_invariants_sparing`]).
    pub orphan_rows: usize,
    pub orphan_objects: usize,
}

/// Waits for every accepted job to end, then checks the suite's
/// invariants (see the module's doc).
pub async fn check_invariants(
    c: &Cluster,
    accepted: &[String],
    load: Load,
    announcements: &Announcements,
    announced: Announced,
    timeout: Duration,
) -> Checked {
    check_invariants_sparing(c, accepted, &[], load, announcements, announced, timeout).await
}

/// [`check_invariants`] for the jobs Redis still knows, when it may have
/// forgotten some accepted ones (a crash with `appendfsync everysec`):
/// results and objects of `forgotten` jobs are counted, not failed.
pub async fn check_invariants_sparing(
    c: &Cluster,
    accepted: &[String],
    forgotten: &[String],
    load: Load,
    announcements: &Announcements,
    announced: Announced,
    timeout: Duration,
) -> Checked {
    let env = &c.env;
    let unique: HashSet<&String> = accepted.iter().collect();
    assert_eq!(unique.len(), accepted.len(), "two submits were given the same job");
    let forgotten: HashSet<&String> = forgotten.iter().collect();

    // Every accepted job ends, completed: a resize of a valid image has no
    // reason to fail, whatever was killed on the way.
    let views = wait_terminal(c, accepted, timeout).await;
    for v in &views {
        assert_eq!(v.status, "completed", "{v:#?}");
        assert_eq!(v.total as usize, load.images, "{v:#?}");
        assert_eq!(v.completed, v.total, "each image completed exactly once: {v:#?}");
        assert_eq!((v.failed, v.skipped), (0, 0), "{v:#?}");
        assert!(v.finished_ms.is_some(), "{v:#?}");
        for img in &v.images {
            assert_eq!(img.status, "completed", "{}: {img:#?}", v.job_id);
            let names: Vec<&str> = img.outputs.keys().map(String::as_str).collect();
            assert_eq!(names, VARIANTS, "{}: {img:#?}", v.job_id);
        }
    }

    // No job was made that no client was told about (a retried submit
    // must find its first attempt's job, not make a second one).
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let listed: Vec<String> = redis::cmd("ZRANGE")
        .arg(env.pipeline.keys.vendor_jobs(VENDOR))
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let listed: BTreeSet<&String> = listed.iter().collect();
    let accepted_set: BTreeSet<&String> = accepted.iter().collect();
    assert_eq!(listed, accepted_set, "the vendor's jobs are exactly the accepted ones");

    // Exactly one terminal state per job: one announcement each.
    if announced == Announced::ExactlyOnce {
        announcements.wait_all(accepted, Duration::from_secs(10)).await;
    }
    let counts = announcements.snapshot();
    for (job, n) in &counts {
        assert!(
            unique.contains(job) || forgotten.contains(job),
            "an announcement of an unknown job {job}"
        );
        assert_eq!(*n, 1, "job {job} announced finished {n} times");
    }

    // Results: one row per (job, image, variant), pointing at its object.
    let rows = result_rows(&c.database_url).await;
    let expected_rows = accepted.len() * load.images * VARIANTS.len();
    let mut seen = HashSet::new();
    let mut expected_objects = BTreeSet::new();
    let urls: HashMap<(String, u32, String), String> = views
        .iter()
        .flat_map(|v| {
            v.images.iter().flat_map(move |img| {
                img.outputs
                    .iter()
                    .map(move |(var, url)| ((v.job_id.clone(), img.index, var.clone()), url.clone()))
            })
        })
        .collect();
    let mut orphan_rows = 0;
    for (job, image, variant, url) in &rows {
        if forgotten.contains(job) {
            orphan_rows += 1;
            continue;
        }
        assert!(unique.contains(job), "a result of an unknown job {job}");
        let key = (job.clone(), *image as u32, variant.clone());
        assert!(seen.insert(key.clone()), "result {key:?} committed twice");
        // Its own object, or a sibling variant's when the two came out the
        // same bytes (a small source: `large` and `medium` are one object).
        let object = VARIANTS
            .iter()
            .map(|v| format!("{VENDOR}/{job}/{image}/{v}.webp"))
            .find(|o| url.ends_with(&format!("/{o}")))
            .unwrap_or_else(|| panic!("{key:?} points at {url}"));
        assert!(
            urls.get(&key) == Some(url),
            "{key:?}: the job record has another URL than the result row: {:?}",
            urls.get(&key)
        );
        expected_objects.insert(object);
    }
    assert_eq!(
        rows.len() - orphan_rows,
        expected_rows,
        "one result row per image and variant"
    );

    // Uploads: exactly the objects the results point at, nothing else (no
    // second key for an object, no half-written file left behind).
    let mut objects = walk(&env.media_dir());
    let before = objects.len();
    objects.retain(|o| !forgotten.iter().any(|j| o.starts_with(&format!("{VENDOR}/{j}/"))));
    let orphan_objects = before - objects.len();
    if objects != expected_objects {
        let extra: Vec<_> = objects.difference(&expected_objects).take(5).collect();
        let missing: Vec<_> = expected_objects.difference(&objects).take(5).collect();
        panic!(
            "uploaded objects differ from the results: {} found, {} expected; unexpected {extra:?}, missing {missing:?}",
            objects.len(),
            expected_objects.len()
        );
    }

    // Nothing left behind in the queue (a stage no job asked for has no
    // group, so nothing pending either).
    for stage in StageName::ALL {
        let pending = match pending_summary(env, stage).await {
            Ok(summary) => summary.0,
            Err(e) if e.code() == Some("NOGROUP") => 0,
            Err(e) => panic!("{stage}: {e}"),
        };
        assert_eq!(pending, 0, "{stage}: entries still pending");
    }
    let dead: usize = redis::cmd("XLEN")
        .arg(env.pipeline.keys.dead_letters())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(dead, 0, "dead letters:\n{}", c.logs_tail());

    Checked {
        jobs: accepted.len(),
        images: accepted.len() * load.images,
        rows: rows.len() - orphan_rows,
        objects: objects.len(),
        orphan_rows,
        orphan_objects,
    }
}

/// Waits until every job's record is terminal, polling the records (the
/// only signal that survives a Redis restart).
pub async fn wait_terminal(c: &Cluster, ids: &[String], timeout: Duration) -> Vec<JobView> {
    match c.env.try_wait_terminal(ids, timeout).await {
        Ok(views) => views,
        Err(stuck) => panic!("{stuck}\nlogs:\n{}", c.logs_tail()),
    }
}

/// Every file under `root`, as `/`-separated paths relative to it.
fn walk(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack: Vec<PathBuf> = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(root).unwrap();
                out.insert(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out
}

/// Runs `faults` on a timer until `work` is done; returns both results.
pub async fn with_faults<W, F>(work: W, faults: impl FnOnce(CancellationToken) -> F) -> (W::Output, F::Output)
where
    W: std::future::Future,
    F: std::future::Future,
{
    let stop = CancellationToken::new();
    let f = faults(stop.clone());
    let w = async {
        let r = work.await;
        stop.cancel();
        r
    };
    tokio::join!(w, f)
}

/// What a chaos run did: the jobs accepted (and, when the flow allows it,
/// those Redis has forgotten), the faults' own report, how long the
/// submits took and how long the load took from the first submit to its
/// last job's end.
pub struct Ran<R> {
    pub accepted: Vec<String>,
    /// Accepted jobs whose record Redis no longer has (only with
    /// [`Flow::forgotten_jobs_end`]; otherwise such a job fails the run).
    pub forgotten: Vec<String>,
    pub faults: R,
    pub submitted: Duration,
    pub flowed: Duration,
}

/// While the faults run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultsWhile {
    /// Until every job has ended.
    Flowing,
    /// Until every job is submitted (the API's faults: what they break is
    /// submits).
    Submitting,
}

/// A chaos run's load: the standard number of images, sent by `parallel`
/// clients over `spread`.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    pub parallel: usize,
    pub spread: Duration,
    pub faults_while: FaultsWhile,
    /// A job Redis forgot (a kill that lost its write) counts as ended.
    pub forgotten_jobs_end: bool,
}

impl Flow {
    /// Over 15 s (60 s with `CHAOS_HEAVY`), faults until every job ended.
    pub fn standard(parallel: usize) -> Flow {
        Flow {
            parallel,
            spread: Duration::from_secs(if heavy() { 60 } else { 15 }),
            faults_while: FaultsWhile::Flowing,
            forgotten_jobs_end: false,
        }
    }
}

/// The scaffold the chaos tests share: `flow`'s load submitted and waited
/// to its end (240 s at most), while `faults` runs (it gets the token that
/// says the flow is done; one that ends by itself sooner is fine). Each
/// test states only its fault and its check.
pub async fn run<F, Fut>(c: &Cluster, flow: Flow, faults: F) -> Ran<Fut::Output>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future,
{
    let load = Load::standard();
    let started = Instant::now();
    let submit = async {
        let ids = c.submit_load(load, flow.parallel, flow.spread).await;
        (ids, started.elapsed())
    };
    let end = |ids: Vec<String>| async move {
        let limit = Duration::from_secs(240);
        let forgotten = if flow.forgotten_jobs_end {
            settle(c, &ids, limit).await
        } else {
            wait_terminal(c, &ids, limit).await;
            Vec::new()
        };
        (ids, forgotten)
    };
    let (((accepted, forgotten), submitted), faults) = match flow.faults_while {
        FaultsWhile::Flowing => {
            let flowing = async {
                let (ids, submitted) = submit.await;
                (end(ids).await, submitted)
            };
            with_faults(flowing, faults).await
        }
        FaultsWhile::Submitting => {
            let ((ids, submitted), faults) = with_faults(submit, faults).await;
            ((end(ids).await, submitted), faults)
        }
    };
    Ran {
        accepted,
        forgotten,
        faults,
        submitted,
        flowed: started.elapsed(),
    }
}

/// Waits until every job is terminal or gone from Redis; returns the gone.
pub async fn settle(c: &Cluster, ids: &[String], timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (mut open, mut gone) = (0, Vec::new());
        for id in ids {
            match c.env.jobs.get(None, id).await {
                Ok(Some(v)) if v.is_terminal() => {}
                Ok(None) => gone.push(id.clone()),
                _ => open += 1,
            }
        }
        if open == 0 {
            return gone;
        }
        if Instant::now() >= deadline {
            // Fails with the stuck jobs and the logs.
            wait_terminal(c, ids, Duration::ZERO).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits `d`, or less if `stop` comes first; false when it came.
pub async fn pause(stop: &CancellationToken, d: Duration) -> bool {
    tokio::select! {
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}
