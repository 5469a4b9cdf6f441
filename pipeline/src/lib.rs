//! The Redis Streams pipeline of image-queue.
//!
//! This crate is the only code that speaks Redis Streams. It owns the event
//! types that travel between stages, every Redis key ([`keys`]), the Lua
//! scripts that make each hand-off atomic ([`scripts`]), the job records the
//! API reads ([`jobs`]), and the [`runner`] that drives one stage: read a
//! batch with `XREADGROUP`, call the stage's handler, then publish, retry or
//! dead-letter the event in one atomic step.
//!
//! Stages themselves (in the `image-queue-stages` crate) only implement
//! [`Stage`]: they get an event, do their work and return the next event.

pub mod admission;
pub mod blob;
pub mod connection;
pub mod consumer;
pub mod context;
pub mod dlq;
pub mod endpoint;
pub mod estimate;
pub mod event;
pub mod heartbeat;
pub mod jobs;
pub mod keys;
mod lua;
pub mod metrics;
pub mod rate_limits;
pub mod redis_server;
pub mod retry;
pub mod runner;
pub mod scripts;
pub mod stage;
pub mod stats;
pub mod status;
pub mod trace;
pub mod vendor_keys;
pub mod webhooks;

pub use blob::{BlobStore, BlobWriter, LocalBlobStore};
pub use connection::Conn;
pub use endpoint::Endpoint;
pub use event::{EventKind, ImageEvent, Operation, OutputRef, Source, StageName};
pub use jobs::{JobStore, JobView, NewImage, NewJob, ReplicationConfig, SubmitError};
pub use keys::Keys;
pub use retry::RetryPolicy;
pub use runner::{Pipeline, RunnerConfig};
pub use stage::{ErrorClass, Outcome, Stage, StageError};
pub use status::{ImageStatus, JobStatus};

/// Milliseconds since the Unix epoch, by this host's clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
