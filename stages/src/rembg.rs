//! A client for a pool of rembg servers (`rembg s`), speaking rembg's own
//! HTTP API: `POST /api/remove` with the image as the multipart part
//! `file`, options as form fields (`bgc` and `extras` in the query), and a
//! PNG back. rembg's `GET ?url=` mode is never used: it would make rembg
//! fetch vendors' URLs itself, outside our fetcher's safeguards.
//!
//! Requests go to the ready instance with the fewest requests outstanding,
//! never more than `max_per_instance` at once on one instance (rembg runs
//! one inference at a time per worker; queueing there only hides latency
//! from us). rembg has no health route, so an instance is ready when its
//! `GET /openapi.json` answers. An instance whose request fails with a
//! connection error, a timeout or a 5xx is ejected at once and probed again
//! with exponential backoff; the request that found it dead is retried on
//! another instance within the same call, so a dying instance costs latency,
//! not a failed attempt. A 4xx is rembg refusing this image or these
//! options: permanent, and no reason to eject anyone.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use bytes::Bytes;
use image_queue_pipeline::StageError;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{info, warn};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RembgConfig {
    /// Base URLs of the rembg servers, e.g. `http://rembg-0:7000`.
    pub urls: Vec<String>,
    /// rembg's model name (form field `model`).
    pub model: String,
    /// Alpha matting (form field `a`): finer hair and fur edges, much slower.
    pub alpha_matting: bool,
    /// Alpha matting foreground threshold (`af`).
    pub alpha_matting_foreground_threshold: u8,
    /// Alpha matting background threshold (`ab`).
    pub alpha_matting_background_threshold: u8,
    /// Alpha matting erode size (`ae`).
    pub alpha_matting_erode_size: u32,
    /// Return the mask alone (`om`).
    pub only_mask: bool,
    /// Smooth the mask (`ppm`).
    pub post_process_mask: bool,
    /// Background colour `r,g,b,a` instead of transparency (query `bgc`).
    pub bgc: Option<String>,
    /// Extra model options as JSON (query `extras`).
    pub extras: Option<String>,
    /// Requests in flight at once on one instance.
    pub max_per_instance: usize,
    /// One request's time limit; an instance that exceeds it is ejected.
    pub timeout_ms: u64,
    /// How long a request waits for a ready instance with a free slot.
    pub wait_ready_ms: u64,
    /// First and longest wait between readiness probes of an ejected instance.
    pub readmit_min_ms: u64,
    pub readmit_max_ms: u64,
    /// Time limit of one readiness probe.
    pub probe_timeout_ms: u64,
}

impl Default for RembgConfig {
    fn default() -> Self {
        RembgConfig {
            urls: Vec::new(),
            model: "u2net".into(),
            alpha_matting: false,
            alpha_matting_foreground_threshold: 240,
            alpha_matting_background_threshold: 10,
            alpha_matting_erode_size: 10,
            only_mask: false,
            post_process_mask: false,
            bgc: None,
            extras: None,
            max_per_instance: 2,
            timeout_ms: 60_000,
            wait_ready_ms: 30_000,
            readmit_min_ms: 500,
            readmit_max_ms: 30_000,
            probe_timeout_ms: 2_000,
        }
    }
}

/// Why a rembg pool's configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RembgConfigError {
    #[error("bg_removal: the rembg engine needs at least one URL in `urls`")]
    NoUrls,
    #[error("bg_removal: max_per_instance must be at least 1")]
    NoSlots,
    #[error("bg_removal: rembg URL {url:?}")]
    Url {
        url: String,
        #[source]
        cause: url::ParseError,
    },
    #[error("bg_removal: HTTP client")]
    Client(#[source] reqwest::Error),
}

impl RembgConfig {
    pub fn build(&self) -> Result<RembgPool, RembgConfigError> {
        RembgPool::new(self.clone())
    }
}

/// One instance as the dispatcher sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceStatus {
    pub url: String,
    pub ready: bool,
    pub outstanding: usize,
    /// Requests it answered successfully.
    pub served: u64,
    /// Times it was ejected.
    pub ejections: u64,
    /// How long, in all, it has had at least one request in flight: over
    /// a stretch of wall time, how busy the pool kept it.
    pub busy: Duration,
}

#[derive(Debug, Default)]
struct Slot {
    ready: bool,
    probing: bool,
    outstanding: usize,
    served: u64,
    ejections: u64,
    /// When `outstanding` last went from 0 to 1, while it is above 0.
    busy_since: Option<Instant>,
    /// Busy time before `busy_since`.
    busy: Duration,
}

struct Inner {
    config: RembgConfig,
    urls: Vec<url::Url>,
    http: reqwest::Client,
    slots: Mutex<Vec<Slot>>,
    /// Signalled whenever a slot frees or an instance becomes ready.
    changed: Notify,
    probes_started: AtomicBool,
    failovers: AtomicU64,
}

/// A pool of rembg servers; cheap to clone.
#[derive(Clone)]
pub struct RembgPool {
    inner: Arc<Inner>,
}

/// Why one try on one instance failed.
enum TryError {
    /// The instance failed (and was ejected): another may succeed.
    Instance(StageError),
    /// Trying elsewhere would not help.
    Final(StageError),
}

impl RembgPool {
    pub fn new(config: RembgConfig) -> Result<RembgPool, RembgConfigError> {
        if config.urls.is_empty() {
            return Err(RembgConfigError::NoUrls);
        }
        if config.max_per_instance == 0 {
            return Err(RembgConfigError::NoSlots);
        }
        let urls = config
            .urls
            .iter()
            .map(|u| {
                let mut parsed = url::Url::parse(u).map_err(|cause| RembgConfigError::Url { url: u.clone(), cause })?;
                if !parsed.path().ends_with('/') {
                    let p = format!("{}/", parsed.path());
                    parsed.set_path(&p);
                }
                Ok(parsed)
            })
            .collect::<Result<Vec<_>, RembgConfigError>>()?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(config.probe_timeout_ms))
            .build()
            .map_err(RembgConfigError::Client)?;
        // Every instance starts unready: the first probe admits it.
        let slots = urls
            .iter()
            .map(|_| Slot {
                probing: true,
                ..Slot::default()
            })
            .collect();
        Ok(RembgPool {
            inner: Arc::new(Inner {
                config,
                urls,
                http,
                slots: Mutex::new(slots),
                changed: Notify::new(),
                probes_started: AtomicBool::new(false),
                failovers: AtomicU64::new(0),
            }),
        })
    }

    pub fn status(&self) -> Vec<InstanceStatus> {
        self.start_probes();
        let slots = self.inner.slots.lock().unwrap();
        slots
            .iter()
            .zip(&self.inner.urls)
            .map(|(s, u)| InstanceStatus {
                url: display_url(u),
                ready: s.ready,
                outstanding: s.outstanding,
                served: s.served,
                ejections: s.ejections,
                busy: s.busy + s.busy_since.map_or(Duration::ZERO, |t| t.elapsed()),
            })
            .collect()
    }

    /// Requests that found their instance dead and were sent to another.
    pub fn failovers(&self) -> u64 {
        self.inner.failovers.load(Ordering::Relaxed)
    }

    /// Waits until `pred` holds for the pool's status, or `timeout` passes;
    /// returns whether it held. Woken by the pool's own events.
    pub async fn wait_for(&self, timeout: Duration, pred: impl Fn(&[InstanceStatus]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(&self.status()) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return pred(&self.status());
            }
        }
    }

    /// Cuts out `image` (any format rembg reads; we send PNG) on one of the
    /// instances; returns rembg's PNG and the URL of the instance that made it.
    pub async fn remove(&self, image: Bytes) -> Result<(Bytes, String), StageError> {
        self.start_probes();
        let tried = Mutex::new(HashSet::new());
        let retries = self.inner.urls.len().saturating_sub(1);
        let attempt = || async {
            match self.try_once(image.clone(), &tried).await {
                Ok(r) => Ok(Ok(r)),
                Err(TryError::Final(e)) => Ok(Err(e)),
                Err(TryError::Instance(e)) => Err(e),
            }
        };
        let result = attempt
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(10))
                    .with_max_delay(Duration::from_millis(200))
                    .with_max_times(retries),
            )
            .notify(|e: &StageError, _| {
                self.inner.failovers.fetch_add(1, Ordering::Relaxed);
                warn!(error = %e, "rembg instance failed; retrying on another");
            })
            .await;
        match result {
            Ok(r) => r,
            Err(e) => Err(e),
        }
    }

    async fn try_once(&self, image: Bytes, tried: &Mutex<HashSet<usize>>) -> Result<(Bytes, String), TryError> {
        let c = &self.inner.config;
        let exclude = tried.lock().unwrap().clone();
        let lease = self.acquire(&exclude).await.map_err(TryError::Final)?;
        tried.lock().unwrap().insert(lease.index);
        let base = &self.inner.urls[lease.index];
        let name = display_url(base);
        let mut url = base.join("api/remove").expect("a relative path joins");
        {
            let mut q = url.query_pairs_mut();
            if let Some(bgc) = &c.bgc {
                q.append_pair("bgc", bgc);
            }
            if let Some(extras) = &c.extras {
                q.append_pair("extras", extras);
            }
        }
        if url.query() == Some("") {
            url.set_query(None);
        }
        let part = reqwest::multipart::Part::stream(image)
            .file_name("image.png")
            .mime_str("image/png")
            .expect("a valid MIME type");
        let form = reqwest::multipart::Form::new()
            .part("file", part)
            .text("model", c.model.clone())
            .text("a", c.alpha_matting.to_string())
            .text("af", c.alpha_matting_foreground_threshold.to_string())
            .text("ab", c.alpha_matting_background_threshold.to_string())
            .text("ae", c.alpha_matting_erode_size.to_string())
            .text("om", c.only_mask.to_string())
            .text("ppm", c.post_process_mask.to_string());
        let sent = self
            .inner
            .http
            .post(url)
            .multipart(form)
            .timeout(Duration::from_millis(c.timeout_ms))
            .send()
            .await;
        let resp = match sent {
            Ok(r) => r,
            Err(e) => {
                let why = if e.is_timeout() {
                    format!("no answer within {} ms", c.timeout_ms)
                } else {
                    crate::error_chain(&e)
                };
                self.eject(lease.index, &why);
                return Err(TryError::Instance(StageError::retryable(format!(
                    "rembg at {name}: {why}"
                ))));
            }
        };
        let status = resp.status();
        if status.is_client_error() {
            let body = resp.text().await.unwrap_or_default();
            return Err(TryError::Final(StageError::permanent(format!(
                "rembg at {name} refused the image: {status}: {}",
                truncate(&body, 300)
            ))));
        }
        if !status.is_success() {
            let body = resp.text().await.unwrap_or_default();
            let why = format!("{status}: {}", truncate(&body, 300));
            self.eject(lease.index, &why);
            return Err(TryError::Instance(StageError::retryable(format!(
                "rembg at {name}: {why}"
            ))));
        }
        let body = match resp.bytes().await {
            Ok(b) => b,
            Err(e) => {
                let why = format!("reading the answer: {}", crate::error_chain(&e));
                self.eject(lease.index, &why);
                return Err(TryError::Instance(StageError::retryable(format!(
                    "rembg at {name}: {why}"
                ))));
            }
        };
        if !body.starts_with(b"\x89PNG\r\n\x1a\n") {
            // A 200 that is not a PNG: a proxy's page or a different service
            // on that port. Nothing about this image is wrong.
            let why = "answered 200 with something that is not a PNG";
            self.eject(lease.index, why);
            return Err(TryError::Instance(StageError::retryable(format!(
                "rembg at {name}: {why}"
            ))));
        }
        self.inner.slots.lock().unwrap()[lease.index].served += 1;
        Ok((body, name))
    }

    /// Takes a slot on the ready instance with the fewest outstanding
    /// requests (ties to the one that served least), waiting for one to free
    /// or become ready.
    async fn acquire(&self, exclude: &HashSet<usize>) -> Result<Lease, StageError> {
        let wait = Duration::from_millis(self.inner.config.wait_ready_ms);
        let deadline = Instant::now() + wait;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut slots = self.inner.slots.lock().unwrap();
                let cap = self.inner.config.max_per_instance;
                let best = slots
                    .iter()
                    .enumerate()
                    .filter(|(i, s)| s.ready && s.outstanding < cap && !exclude.contains(i))
                    .min_by_key(|(_, s)| (s.outstanding, s.served))
                    .map(|(i, _)| i);
                if let Some(i) = best {
                    let slot = &mut slots[i];
                    if slot.outstanding == 0 {
                        slot.busy_since = Some(Instant::now());
                    }
                    slot.outstanding += 1;
                    return Ok(Lease {
                        pool: self.inner.clone(),
                        index: i,
                    });
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let ready = self.status().iter().filter(|s| s.ready).count();
                return Err(StageError::retryable(format!(
                    "no rembg instance free within {} ms ({ready} of {} ready{})",
                    wait.as_millis(),
                    self.inner.urls.len(),
                    if exclude.is_empty() {
                        String::new()
                    } else {
                        format!(", {} failed this request already", exclude.len())
                    }
                )));
            }
        }
    }

    fn start_probes(&self) {
        if self.inner.probes_started.swap(true, Ordering::SeqCst) {
            return;
        }
        for i in 0..self.inner.urls.len() {
            tokio::spawn(readmit(Arc::downgrade(&self.inner), i, true));
        }
    }

    fn eject(&self, index: usize, why: &str) {
        let mut slots = self.inner.slots.lock().unwrap();
        let slot = &mut slots[index];
        if slot.ready {
            slot.ready = false;
            slot.ejections += 1;
            warn!(instance = %display_url(&self.inner.urls[index]), reason = why, "rembg instance ejected");
        }
        if !slot.probing {
            slot.probing = true;
            tokio::spawn(readmit(Arc::downgrade(&self.inner), index, false));
        }
        drop(slots);
        self.inner.changed.notify_waiters();
    }
}

/// Probes an instance's `/openapi.json` with exponential backoff until it
/// answers, then makes it ready. Ends early when the pool is dropped.
async fn readmit(pool: Weak<Inner>, index: usize, first_at_once: bool) {
    let (min, max) = match pool.upgrade() {
        Some(p) => (
            p.config.readmit_min_ms,
            p.config.readmit_max_ms.max(p.config.readmit_min_ms),
        ),
        None => return,
    };
    let mut delays = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(min))
        .with_max_delay(Duration::from_millis(max))
        .without_max_times()
        .build();
    let mut first = first_at_once;
    loop {
        if !first {
            let d = delays.next().unwrap_or(Duration::from_millis(max));
            tokio::time::sleep(d).await;
        }
        first = false;
        let Some(p) = pool.upgrade() else { return };
        let url = p.urls[index].join("openapi.json").expect("a relative path joins");
        let ok = p
            .http
            .get(url)
            .timeout(Duration::from_millis(p.config.probe_timeout_ms))
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ok {
            let mut slots = p.slots.lock().unwrap();
            slots[index].ready = true;
            slots[index].probing = false;
            drop(slots);
            info!(instance = %display_url(&p.urls[index]), "rembg instance ready");
            p.changed.notify_waiters();
            return;
        }
    }
}

/// A slot taken on one instance; freed when dropped, whatever happened.
struct Lease {
    pool: Arc<Inner>,
    index: usize,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut slots = self.pool.slots.lock().unwrap();
        let slot = &mut slots[self.index];
        slot.outstanding -= 1;
        if slot.outstanding == 0 {
            if let Some(t) = slot.busy_since.take() {
                slot.busy += t.elapsed();
            }
        }
        drop(slots);
        self.pool.changed.notify_waiters();
    }
}

fn display_url(u: &url::Url) -> String {
    u.as_str().trim_end_matches('/').to_string()
}

fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
