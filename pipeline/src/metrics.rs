//! What the runner counts as it finishes events: Prometheus metrics through
//! the `metrics` facade (the exporter lives in the binary), and per-stage
//! counters in Redis that every process and the stats can read.
//!
//! Throughput comes from those Redis counters rather than from sampling
//! `XINFO STREAM`'s `entries-added` in the API: a sample needs a process
//! that has been watching for minutes, each API replica would see its own
//! history, and `entries-added` counts arrivals (including retries coming
//! back), not work done. The counters are kept by the very script that
//! finishes an event (no round trip of their own, and a duplicate delivery
//! is never counted): a lifetime hash per stage and a hash per stage and
//! minute that expires on its own, so nothing needs sweeping.

use std::time::Duration;

use crate::event::StageName;

/// Minute buckets are kept this long (seconds): enough for the 5-minute
/// figure and the minute it straddles.
pub const MINUTE_BUCKET_TTL_S: u64 = 7 * 60;

/// What became of one event at a stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Done: handed to the next stage or completed.
    Processed,
    /// Failed an attempt and will be tried again.
    Retried,
    /// Held back until its vendor's quota refills.
    Throttled,
    /// Failed for good: dead-lettered.
    Dead,
}

impl Counted {
    /// The Redis hash field counting this outcome.
    pub fn field(self) -> &'static str {
        match self {
            Counted::Processed => "processed",
            Counted::Retried => "retried",
            Counted::Throttled => "throttled",
            Counted::Dead => "dead",
        }
    }

    fn metric(self) -> &'static str {
        match self {
            Counted::Processed => "image_queue_events_processed_total",
            Counted::Retried => "image_queue_events_retried_total",
            Counted::Throttled => "image_queue_events_throttled_total",
            Counted::Dead => "image_queue_events_dead_lettered_total",
        }
    }

    /// A failed attempt, whether retried or dead-lettered.
    fn is_failure(self) -> bool {
        matches!(self, Counted::Retried | Counted::Dead)
    }
}

/// Describes the metrics once, so the exporter prints their help text.
pub fn describe() {
    metrics::describe_gauge!(
        "image_queue_admission_window",
        "Images fair admission lets in flight downstream of rate-check, as its dispatcher sized it"
    );
    metrics::describe_counter!(
        "image_queue_events_processed_total",
        "Events a stage finished and passed on"
    );
    metrics::describe_counter!(
        "image_queue_events_failed_total",
        "Failed attempts at a stage, retried or not"
    );
    metrics::describe_counter!(
        "image_queue_events_retried_total",
        "Failed attempts scheduled for another try"
    );
    metrics::describe_counter!(
        "image_queue_events_throttled_total",
        "Events held back by a vendor's quota"
    );
    metrics::describe_counter!(
        "image_queue_events_dead_lettered_total",
        "Events given up on and dead-lettered"
    );
    metrics::describe_histogram!(
        "image_queue_handle_seconds",
        metrics::Unit::Seconds,
        "Time a stage's handler took for one event or batch"
    );
}

/// Records a handler's running time.
pub fn observe_handle(stage: StageName, took: Duration) {
    metrics::histogram!("image_queue_handle_seconds", "stage" => stage.as_str()).record(took.as_secs_f64());
}

/// The admission window the dispatcher in this process chose.
pub fn admission_window(window: u64) {
    metrics::gauge!("image_queue_admission_window").set(window as f64);
}

/// Counts one finished event in this process's metrics. Its Redis
/// counters are kept by the script that finished it (`count_event` in
/// `scripts/lib.lua`), which receives [`Counted::field`] and the keys.
pub fn record(stage: StageName, what: Counted) {
    metrics::counter!(what.metric(), "stage" => stage.as_str()).increment(1);
    if what.is_failure() {
        metrics::counter!("image_queue_events_failed_total", "stage" => stage.as_str()).increment(1);
    }
}
