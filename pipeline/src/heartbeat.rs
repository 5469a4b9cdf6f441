//! What a worker tells the world about itself, every few seconds.
//!
//! Owns the heartbeat's shape (read by `stats` and by the admission
//! window's sizing) and the moving average of how long the handler takes,
//! from which a worker's capacity is derived. It does not publish (the
//! runner's maintenance does) and reads nothing from Redis (`stats` and
//! `admission` read the heartbeats).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::now_ms;

/// What a worker tells the world about itself, every few seconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub consumer: String,
    pub stage: String,
    pub host: String,
    pub pid: u32,
    pub concurrency: usize,
    pub in_flight: usize,
    pub last_seen_ms: u64,
    /// Milliseconds an event spends in the handler, lately (none handled yet:
    /// `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_ms: Option<f64>,
    /// Events per second this worker can finish with all its slots busy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capacity_per_s: Option<f64>,
    /// When it last finished handling something.
    #[serde(default)]
    pub last_handled_ms: u64,
    /// The cores this worker's process may run on.
    #[serde(default)]
    pub cores: usize,
    /// What the stage measures of its own work (see [`Stage::measures`]).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub measures: std::collections::BTreeMap<String, f64>,
}

/// heartbeat (the admission window is sized from it).
#[derive(Default)]
pub(crate) struct ServiceTime {
    /// Milliseconds one unit of work (an event, or a batch) takes.
    unit_ms: Option<f64>,
    /// Events in a unit.
    per_unit: f64,
    last_ms: u64,
}

impl ServiceTime {
    /// Weight of the newest sample: the average follows a change within
    /// a few dozen events, and one odd image does not swing it.
    const ALPHA: f64 = 0.1;

    pub(crate) fn observe(&mut self, took: Duration, events: usize) {
        let ms = took.as_secs_f64() * 1000.0;
        let n = events.max(1) as f64;
        match self.unit_ms {
            None => {
                self.unit_ms = Some(ms);
                self.per_unit = n;
            }
            Some(avg) => {
                self.unit_ms = Some(avg + Self::ALPHA * (ms - avg));
                self.per_unit += Self::ALPHA * (n - self.per_unit);
            }
        }
        self.last_ms = now_ms();
    }

    pub(crate) fn describe(&self, mut beat: Heartbeat, concurrency: usize) -> Heartbeat {
        if let Some(unit_ms) = self.unit_ms {
            let unit_ms = unit_ms.max(0.01);
            beat.service_ms = Some(unit_ms);
            beat.capacity_per_s = Some(concurrency as f64 * self.per_unit * 1000.0 / unit_ms);
            beat.last_handled_ms = self.last_ms;
        }
        beat
    }
}
