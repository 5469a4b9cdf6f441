//! Fair admission: the work rate-check does beyond passing an image on.
//!
//! Owns the three scripts of the fair scheduler's bookkeeping: charging an
//! image against its vendor's processing quotas (`quota.lua`), moving
//! waiting images downstream in weighted round-robin while the admission
//! window has room (`dispatch.lua`), and correcting the window's counter
//! from the true count of images in flight (`reconcile_admitted.lua`).
//! Parking an image in its vendor's queue is part of the finisher's batch
//! (`finish.lua`), since it acknowledges the rate-check entry. Its
//! dispatcher ([`Admission::run_dispatcher`]) runs beside rate-check's
//! consumer. This module never reads streams or acknowledges entries. The window's size is `window`'s to choose, from the workers'
//! heartbeats; this module keeps the current choice and publishes it.

pub mod window;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::context::Pipeline;
use crate::event::ImageEvent;
use crate::heartbeat::Heartbeat;
use crate::now_ms;
pub use crate::scripts::Reconciled;
use crate::scripts::{ChargeQuotas, Charged, Committed, Dispatch, Planned, ReconcileAdmitted};
use window::{WindowChoice, WindowPolicy};

/// What one dispatch call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dispatched {
    /// Images moved downstream.
    pub moved: u64,
    /// Vendors still waiting with images queued.
    pub vendors_waiting: u64,
}

/// How the window is sized.
#[derive(Debug, Clone, Copy)]
pub struct WindowSettings {
    /// The most images in flight downstream (`admission_window`).
    pub ceiling: u64,
    /// Size the window from the workers' measurements (else it is the
    /// ceiling, fixed).
    pub adaptive: bool,
    /// The most a newcomer's first image should wait behind admitted ones.
    pub target_ms: u64,
}

impl WindowSettings {
    /// A fixed window of `n` images.
    pub fn fixed(n: u64) -> Self {
        WindowSettings {
            ceiling: n,
            adaptive: false,
            target_ms: 0,
        }
    }

    /// The window before any worker has reported.
    fn initial(&self) -> u64 {
        if self.adaptive {
            self.ceiling.min(8)
        } else {
            self.ceiling
        }
    }
}

/// The fair scheduler's calls for one pipeline.
pub struct Admission {
    p: Pipeline,
    settings: WindowSettings,
    /// Images in flight downstream at most, now.
    window: AtomicU64,
    /// Why the window is what it is.
    reason: Mutex<String>,
    /// Per operation: images per `quota_window_ms` and vendor.
    quotas: BTreeMap<String, u64>,
    quota_window_ms: u64,
}

impl Admission {
    pub fn new(p: Pipeline, settings: WindowSettings, quotas: BTreeMap<String, u64>, quota_window_ms: u64) -> Self {
        let reason = if settings.adaptive {
            "no worker has reported yet: the initial window".to_string()
        } else {
            "fixed (admission_adaptive = false)".to_string()
        };
        Admission {
            p,
            window: AtomicU64::new(settings.initial()),
            settings,
            reason: Mutex::new(reason),
            quotas,
            quota_window_ms,
        }
    }

    /// The window now.
    pub fn window(&self) -> u64 {
        self.window.load(Ordering::Relaxed)
    }

    /// Sizes the window again from the live workers' heartbeats, and
    /// publishes it (for stats, queue-stats and `/metrics`). Keeps the
    /// window as it is when nothing is measured.
    pub async fn resize_window(&self) -> redis::RedisResult<WindowChoice> {
        let keys = &self.p.keys;
        let mut conn = self.p.conn.clone();
        if self.settings.adaptive {
            let beats: HashMap<String, String> = conn.hgetall(keys.workers()).await?;
            let beats: Vec<Heartbeat> = beats.values().filter_map(|b| serde_json::from_str(b).ok()).collect();
            let policy = WindowPolicy {
                ceiling: self.settings.ceiling,
                target_ms: self.settings.target_ms,
            };
            let now = now_ms();
            let measured = window::choose(&window::loads(&beats, now), policy);
            if let Some(choice) = measured.or_else(|| window::unmeasured(&beats, now, self.settings.ceiling)) {
                self.window.store(choice.window, Ordering::Relaxed);
                *self.reason.lock().unwrap() = choice.reason;
            }
        }
        let choice = WindowChoice {
            window: self.window(),
            reason: self.reason.lock().unwrap().clone(),
        };
        crate::metrics::admission_window(choice.window);
        let _: () = redis::pipe()
            .hset_multiple(
                keys.admission(),
                &[
                    ("window", choice.window.to_string()),
                    ("reason", choice.reason.clone()),
                    ("updated_ms", now_ms().to_string()),
                ],
            )
            .expire(keys.admission(), 60)
            .query_async(&mut conn)
            .await?;
        Ok(choice)
    }

    /// Whether any quota applies at all (no script call is needed if not).
    pub fn has_quotas(&self) -> bool {
        !self.quotas.is_empty()
    }

    /// The ms until `ev` fits its vendor's quotas for the operations it
    /// asks for, or 0 (then it has been charged, once, whatever the number
    /// of deliveries).
    pub async fn quota_wait(&self, ev: &ImageEvent) -> redis::RedisResult<u64> {
        let charges: Vec<(&str, u64)> = ev
            .ops
            .iter()
            .filter_map(|op| self.quotas.get(op.as_str()).map(|limit| (op.as_str(), *limit)))
            .collect();
        let charged = ChargeQuotas {
            vendor: &ev.vendor,
            job: &ev.job,
            image: ev.image,
            charges: &charges,
            window_ms: self.quota_window_ms,
        }
        .run(&self.p)
        .await?;
        Ok(match charged {
            Charged::Admitted => 0,
            Charged::FitsInMs(ms) => ms,
        })
    }

    /// Moves waiting images downstream while the window has room.
    ///
    /// Three round trips, so that `dispatch.lua` is given every key it
    /// touches: read the head of the vendor ring; a `plan` call says how
    /// many images each of those vendors gives and the jobs they belong
    /// to; a `commit` call moves them. A dispatcher that raced another
    /// reads again.
    pub async fn dispatch(&self) -> redis::RedisResult<Dispatched> {
        for _ in 0..DISPATCH_ATTEMPTS {
            if let Some(done) = self.dispatch_once().await? {
                return Ok(done);
            }
        }
        // Another dispatcher kept changing the ring: it is moving images.
        let mut conn = self.p.conn.clone();
        let waiting: u64 = conn.llen(self.p.keys.vendor_ring()).await?;
        Ok(Dispatched {
            moved: 0,
            vendors_waiting: waiting,
        })
    }

    /// One read-plan-commit pass; `None` when the state changed between
    /// the plan and the commit.
    async fn dispatch_once(&self) -> redis::RedisResult<Option<Dispatched>> {
        let keys = &self.p.keys;
        let window = self.window();
        let mut conn = self.p.conn.clone();
        // Every vendor reached gives at least one image: no more than the
        // free window's worth of vendors can be reached, and never more
        // than the window's.
        let (admitted, ring_len, mut head): (Option<u64>, u64, Vec<String>) = redis::pipe()
            .get(keys.admitted())
            .llen(keys.vendor_ring())
            .lrange(keys.vendor_ring(), 0, window.max(1) as isize - 1)
            .query_async(&mut conn)
            .await?;
        let budget = window.saturating_sub(admitted.unwrap_or(0));
        if budget == 0 || ring_len == 0 {
            return Ok(Some(Dispatched {
                moved: 0,
                vendors_waiting: ring_len,
            }));
        }
        head.truncate(budget as usize);
        let dispatch = Dispatch { head: &head, window };
        let plan = match dispatch.plan(&self.p).await? {
            Planned::Raced => return Ok(None),
            Planned::Nothing { vendors_waiting } => {
                return Ok(Some(Dispatched {
                    moved: 0,
                    vendors_waiting,
                }))
            }
            Planned::Plan(plan) => plan,
        };
        Ok(match dispatch.commit(&self.p, &plan).await? {
            Committed::Raced => None,
            Committed::Moved { moved, vendors_waiting } => Some(Dispatched { moved, vendors_waiting }),
        })
    }

    /// The fair scheduler: keeps the admission window filled from vendors'
    /// queues, and its size chosen, until `shutdown`. It runs at once when
    /// `parked` is notified (this process parked an image), and polls
    /// briefly while images wait (slots free up in other processes).
    pub async fn run_dispatcher(&self, parked: &Notify, shutdown: CancellationToken) {
        let mut failing = false;
        let mut next_sizing = Instant::now();
        loop {
            if Instant::now() >= next_sizing {
                next_sizing = Instant::now() + Duration::from_secs(1);
                if let Err(e) = self.resize_window().await {
                    debug!(error = %e, "sizing the admission window failed");
                }
            }
            let r = self.dispatch().await;
            let wait = match r {
                Ok(d) if d.moved > 0 => {
                    failing = false;
                    continue;
                }
                Ok(d) if d.vendors_waiting > 0 => Duration::from_millis(2),
                Ok(_) => Duration::from_millis(250),
                Err(e) => {
                    // Not only at debug: while dispatch fails, no vendor's
                    // image is admitted. Once per failing streak.
                    if !failing {
                        warn!(error = %e, "dispatching failed");
                    }
                    failing = true;
                    Duration::from_millis(250)
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = parked.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Read-plan-commit passes a dispatch makes before leaving the images to
/// the dispatcher that keeps racing it.
const DISPATCH_ATTEMPTS: usize = 3;

/// Sets the admission counter to the true count of images in flight
/// downstream of rate-check, if it had drifted.
pub async fn reconcile(p: &Pipeline) -> redis::RedisResult<Reconciled> {
    ReconcileAdmitted.run(p).await
}

/// The window the dispatcher last published, if one runs.
pub async fn published_window(p: &Pipeline) -> redis::RedisResult<Option<WindowChoice>> {
    let mut conn = p.conn.clone();
    let h: HashMap<String, String> = conn.hgetall(p.keys.admission()).await?;
    Ok(match (h.get("window").and_then(|w| w.parse().ok()), h.get("reason")) {
        (Some(window), Some(reason)) => Some(WindowChoice {
            window,
            reason: reason.clone(),
        }),
        _ => None,
    })
}
