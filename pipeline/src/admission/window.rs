//! How large the admission window should be, from what the workers report.
//!
//! A pure function of the live workers' heartbeats, so its arithmetic is
//! tested on its own; the dispatcher (in `admission`) calls it every second
//! and never reads streams itself.
//!
//! The law is Little's: the images in flight downstream are the pipeline's
//! throughput times the time an image spends there. The throughput is the
//! capacity of the bottleneck stage (its live slots over its measured time
//! per image); the time is the sum of the stages' times per image, which
//! keeps every slot of every stage busy, plus a queueing allowance. That
//! allowance is what a newcomer's first image waits behind images already
//! admitted: it is the smaller of `admission_target_ms` and the stages' own
//! time per image, so a vendor's first image behind another's backlog takes
//! about twice as long as alone, whether a stage costs 10 ms or 10 s. The
//! window follows the workers: one killed or added changes the slots, a
//! stage slowing down changes its time per image, within a heartbeat.
//!
//! Images are counted at their uncontended time: when a stage runs more
//! images at once than its host has cores, each waits for a core part of
//! the time (its workers report how long, `cpu_wait_ms`), and admitting
//! enough images to fill every slot would only slow each one down, a
//! newcomer's too. The time an image waited for a core is taken off its
//! stage's time per image, and the slots that really run at once are the
//! slots times the uncontended share of their time.
//!
//! Fairness is by images, not by work: each vendor's share of the window
//! is in images, whatever each image costs. A vendor's large photos hold
//! downstream slots longer than another's thumbnails; what bounds a
//! newcomer's wait is the window's measured drain time, which counts them
//! at their real cost.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::event::StageName;
use crate::heartbeat::Heartbeat;

/// What one stage's live workers report, summed.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StageLoad {
    /// Images the stage can finish per second with its live slots, no more
    /// than its workers' cores can compute.
    pub capacity_per_s: f64,
    /// Milliseconds one image spends in the stage's handler, on average.
    pub service_ms: f64,
    /// Of those, the milliseconds its work waited for a core.
    pub cpu_wait_ms: f64,
    /// Live slots (consumers' concurrency, summed).
    pub slots: u64,
    /// Images that really run at once (Little's law: the capacity times
    /// the uncontended time): fewer than the slots when the work needs
    /// more cores than there are.
    pub parallel: f64,
}

impl StageLoad {
    /// Milliseconds one image takes with a core to itself.
    pub fn uncontended_ms(&self) -> f64 {
        uncontended(self.service_ms, self.cpu_wait_ms)
    }
}

fn uncontended(service_ms: f64, cpu_wait_ms: f64) -> f64 {
    (service_ms - cpu_wait_ms).max(service_ms * 0.05)
}

/// The heartbeat measure of the time a stage's image work waited for a
/// core, per image.
pub const CPU_WAIT_MS: &str = "cpu_wait_ms";
/// The heartbeat measure of a stage's CPU time per image.
pub const CPU_MS: &str = "cpu_ms";

/// The window chosen and why, as `stats`, queue-stats and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowChoice {
    pub window: u64,
    pub reason: String,
}

/// The controller's settings.
#[derive(Debug, Clone, Copy)]
pub struct WindowPolicy {
    /// The window never exceeds this (`admission_window`).
    pub ceiling: u64,
    /// The most a newcomer should wait behind admitted images.
    pub target_ms: u64,
}

/// Heartbeats older than this (three missed) are of dead workers.
pub const LIVE_MS: u64 = 6_000;
/// A stage whose workers finished nothing for this long is not on the
/// current work's path (its jobs skip it): its time does not count.
pub const ACTIVE_MS: u64 = 30_000;

/// Sums the live, recently active workers of each stage downstream of
/// rate-check.
pub fn loads(beats: &[Heartbeat], now_ms: u64) -> BTreeMap<StageName, StageLoad> {
    let mut out: BTreeMap<StageName, (StageLoad, f64)> = BTreeMap::new();
    for b in beats {
        let Some(stage) = StageName::parse(&b.stage) else {
            continue;
        };
        if stage == StageName::RateCheck || now_ms.saturating_sub(b.last_seen_ms) > LIVE_MS {
            continue;
        }
        let (Some(service), Some(capacity)) = (b.service_ms, b.capacity_per_s) else {
            continue;
        };
        if now_ms.saturating_sub(b.last_handled_ms) > ACTIVE_MS || service <= 0.0 || capacity <= 0.0 {
            continue;
        }
        let waited = b.measures.get(CPU_WAIT_MS).copied().unwrap_or(0.0).clamp(0.0, service);
        // A worker computes no more images per second than its cores allow,
        // whatever its slots: measured alone, an image has every core to
        // itself, and its time would promise as much for every slot.
        let cpu_ms = b.measures.get(CPU_MS).copied().unwrap_or(0.0);
        let capacity = if cpu_ms > 0.0 && b.cores > 0 {
            capacity.min(b.cores as f64 * 1000.0 / cpu_ms)
        } else {
            capacity
        };
        let (load, weights) = out.entry(stage).or_default();
        load.capacity_per_s += capacity;
        load.slots += b.concurrency as u64;
        load.parallel += capacity * uncontended(service, waited) / 1000.0;
        // Time per image, weighted by how much of the stage's work each
        // worker does.
        load.service_ms += service * capacity;
        load.cpu_wait_ms += waited * capacity;
        *weights += capacity;
    }
    out.into_iter()
        .map(|(s, (mut l, w))| {
            l.service_ms /= w.max(f64::MIN_POSITIVE);
            l.cpu_wait_ms /= w.max(f64::MIN_POSITIVE);
            (s, l)
        })
        .collect()
}

/// Before anything is measured: twice the live slots of the stage with the
/// fewest (the likeliest bottleneck), so its slots can all be busy without
/// burying a newcomer under the ceiling; `None` when no worker of a
/// downstream stage is live.
pub fn unmeasured(beats: &[Heartbeat], now_ms: u64, ceiling: u64) -> Option<WindowChoice> {
    let mut slots: BTreeMap<StageName, u64> = BTreeMap::new();
    for b in beats {
        let Some(stage) = StageName::parse(&b.stage) else {
            continue;
        };
        if stage != StageName::RateCheck && now_ms.saturating_sub(b.last_seen_ms) <= LIVE_MS {
            *slots.entry(stage).or_default() += b.concurrency as u64;
        }
    }
    let (stage, fewest) = slots.into_iter().min_by_key(|(_, n)| *n)?;
    Some(WindowChoice {
        window: (fewest * 2).clamp(1, ceiling.max(1)),
        reason: format!("nothing measured yet: twice the live slots of {stage} ({fewest})"),
    })
}

/// The window for these stage loads, or `None` when nothing is measured
/// yet.
pub fn choose(loads: &BTreeMap<StageName, StageLoad>, policy: WindowPolicy) -> Option<WindowChoice> {
    let (bottleneck, slowest) = loads
        .iter()
        .min_by(|a, b| a.1.capacity_per_s.total_cmp(&b.1.capacity_per_s))?;
    let throughput = slowest.capacity_per_s;
    let path_ms: f64 = loads.values().map(|l| l.uncontended_ms()).sum();
    // When the bottleneck has more slots than its cores run, images
    // admitted beyond what runs do not wait their turn: they take a slot
    // and share the cores, slowing every image there, a newcomer's too.
    // No queueing allowance then: what the cores run, and one more.
    let cpu_bound = slowest.parallel + 0.5 < slowest.slots as f64;
    let allowance_ms = if cpu_bound {
        0.0
    } else {
        path_ms.min(policy.target_ms as f64)
    };
    let wanted = (throughput * (path_ms + allowance_ms) / 1000.0).ceil() as u64;
    // At least every slot of the bottleneck that really runs busy, and one
    // more waiting.
    let floor = (slowest.parallel.round() as u64).max(1) + 1;
    let window = wanted.max(floor).min(policy.ceiling.max(1));
    let capped = if window < wanted.max(floor) {
        " (capped by admission_window)"
    } else {
        ""
    };
    Some(WindowChoice {
        window,
        reason: format!(
            "bottleneck {bottleneck}: {} slots at {:.0} ms/image ({throughput:.1} images/s){}; {:.0} ms per image through {} stages + {:.0} ms queueing allowance{capped}",
            slowest.slots,
            slowest.service_ms,
            if slowest.parallel + 0.5 < slowest.slots as f64 {
                format!(
                    ", {:.1} running at once ({:.0} ms of an image's time waiting for a core)",
                    slowest.parallel, slowest.cpu_wait_ms,
                )
            } else {
                String::new()
            },
            path_ms,
            loads.len(),
            allowance_ms
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(stage: &str, concurrency: usize, service_ms: f64) -> Heartbeat {
        Heartbeat {
            consumer: format!("{stage}-{concurrency}-{service_ms}"),
            stage: stage.into(),
            host: "h".into(),
            pid: 1,
            concurrency,
            in_flight: 0,
            last_seen_ms: 100_000,
            service_ms: Some(service_ms),
            capacity_per_s: Some(concurrency as f64 * 1000.0 / service_ms),
            last_handled_ms: 100_000,
            cores: 2,
            measures: Default::default(),
        }
    }

    const POLICY: WindowPolicy = WindowPolicy {
        ceiling: 10_000,
        target_ms: 500,
    };

    #[test]
    fn a_slow_stage_gets_a_window_of_about_twice_its_slots() {
        // 4 slots of 1 s per image; fast stages around it.
        let beats = [
            beat("resize", 4, 1_000.0),
            beat("upload", 4, 10.0),
            beat("db-commit", 4, 5.0),
        ];
        let c = choose(&loads(&beats, 100_000), POLICY).unwrap();
        // 4 images/s × (1.015 s + 0.5 s allowance) = 6.06 → 7.
        assert_eq!(c.window, 7, "{c:?}");
        assert!(c.reason.contains("bottleneck resize"), "{}", c.reason);
    }

    #[test]
    fn a_fast_pipeline_allows_no_more_queueing_than_its_own_time() {
        // 10 ms per image at 4 slots: 400 images/s, 20 ms through the
        // stages, so 20 ms of allowance, not 500.
        let beats = [
            beat("resize", 4, 10.0),
            beat("upload", 8, 5.0),
            beat("db-commit", 8, 5.0),
        ];
        let c = choose(&loads(&beats, 100_000), POLICY).unwrap();
        assert_eq!(c.window, 16, "{c:?}");
    }

    #[test]
    fn workers_added_or_lost_move_the_window() {
        let one = [beat("bg-removal", 3, 300.0)];
        let two = [beat("bg-removal", 3, 300.0), {
            let mut b = beat("bg-removal", 3, 300.0);
            b.consumer = "other".into();
            b
        }];
        let w1 = choose(&loads(&one, 100_000), POLICY).unwrap().window;
        let w2 = choose(&loads(&two, 100_000), POLICY).unwrap().window;
        assert_eq!((w1, w2), (6, 12));
        // A dead worker's heartbeat no longer counts.
        let mut stale = two.clone();
        stale[1].last_seen_ms = 100_000 - LIVE_MS - 1;
        assert_eq!(choose(&loads(&stale, 100_000), POLICY).unwrap().window, 6);
    }

    #[test]
    fn images_waiting_for_cores_are_not_admitted_to_wait_longer() {
        // 5 slots on 2 cores: each image takes 2.5 s, 1.5 s of it waiting
        // for a core. Filling the slots (6) would slow every image, a
        // newcomer's too: 2 run at once, plus one ready to start.
        let mut resize = beat("resize", 5, 2_500.0);
        resize.measures.insert(CPU_WAIT_MS.into(), 1_500.0);
        let beats = [resize, beat("upload", 4, 10.0), beat("db-commit", 4, 5.0)];
        let c = choose(&loads(&beats, 100_000), POLICY).unwrap();
        assert_eq!(c.window, 3, "{c:?}");
        assert!(c.reason.contains("2.0 running at once"), "{}", c.reason);
        // Measured alone, the same work has both cores and no wait: its CPU
        // time per image still says only 2 run at once on 2 cores.
        let mut alone = beat("resize", 5, 400.0);
        alone.measures.insert(CPU_MS.into(), 400.0);
        let beats = [alone, beat("upload", 4, 10.0), beat("db-commit", 4, 5.0)];
        let c = choose(&loads(&beats, 100_000), POLICY).unwrap();
        // 5 images/s × 0.415 s = 2.1, and no allowance: 2 run, 1 ready.
        assert_eq!(c.window, 3, "{c:?}");
        // Without the wait the same stage gets every slot filled.
        let uncontended = [
            beat("resize", 5, 2_500.0),
            beat("upload", 4, 10.0),
            beat("db-commit", 4, 5.0),
        ];
        assert_eq!(choose(&loads(&uncontended, 100_000), POLICY).unwrap().window, 7);
    }

    #[test]
    fn the_ceiling_caps_and_nothing_measured_says_nothing() {
        let beats = [beat("resize", 64, 10.0)];
        let c = choose(
            &loads(&beats, 100_000),
            WindowPolicy {
                ceiling: 8,
                target_ms: 500,
            },
        )
        .unwrap();
        assert_eq!(c.window, 8);
        assert!(c.reason.contains("capped"), "{}", c.reason);
        assert_eq!(choose(&loads(&[], 100_000), POLICY), None);
        // Before any measurement: twice the fewest live slots of a stage.
        let mut fresh = [beat("resize", 5, 10.0), beat("upload", 64, 1.0)];
        for b in &mut fresh {
            b.service_ms = None;
            b.capacity_per_s = None;
        }
        assert_eq!(unmeasured(&fresh, 100_000, 1_000).unwrap().window, 10);
        // An idle stage's old figures do not count.
        let mut idle = beat("resize", 4, 10.0);
        idle.last_handled_ms = 100_000 - ACTIVE_MS - 1;
        assert_eq!(choose(&loads(&[idle], 100_000), POLICY), None);
    }
}
