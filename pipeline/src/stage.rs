//! What a stage is to the runner: a handler from one event to the next.
//!
//! A stage never sees streams, acknowledgements or retries. It returns an
//! [`Outcome`] or a [`StageError`]; whether an error is worth retrying is a
//! separate decision ([`StageError::class`]) made where the error is made,
//! and the runner alone turns it into a retry or a dead letter.

use std::time::Duration;

use async_trait::async_trait;

use crate::event::{ImageEvent, StageName};

/// What a stage did with an event.
#[derive(Debug)]
pub enum Outcome {
    /// Done: pass this event to the next stage.
    Done(ImageEvent),
    /// Not now (e.g. the vendor's quota is used up): hold the event until
    /// `until_ms` without counting an attempt.
    Deferred {
        event: ImageEvent,
        until_ms: u64,
        reason: String,
    },
}

/// Whether trying again could help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// A passing fault: a timeout, a 5xx, a database outage.
    Retryable,
    /// The input itself is bad (an undecodable image, a 4xx): retrying
    /// would fail the same way, so the event is dead-lettered at once.
    Permanent,
    /// A service every event needs is down (the results database): no
    /// fault of this event's, so it is retried without counting an attempt,
    /// for as long as the outage lasts, instead of being dead-lettered once
    /// a few quick retries have failed against it.
    Unavailable,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StageError {
    pub class: ErrorClass,
    pub message: String,
    /// A server's own word on when to come back (e.g. `Retry-After`).
    pub retry_after: Option<Duration>,
}

impl StageError {
    pub fn retryable(message: impl Into<String>) -> Self {
        StageError {
            class: ErrorClass::Retryable,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        StageError {
            class: ErrorClass::Permanent,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        StageError {
            class: ErrorClass::Unavailable,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    pub fn is_retryable(&self) -> bool {
        self.class != ErrorClass::Permanent
    }
}

/// How a batching stage wants its events grouped.
#[derive(Debug, Clone, Copy)]
pub struct Batching {
    /// At most this many events per call to [`Stage::handle_batch`].
    pub max_events: usize,
    /// Wait at most this long for a batch to fill.
    pub max_wait: Duration,
}

#[async_trait]
pub trait Stage: Send + Sync + 'static {
    fn name(&self) -> StageName;

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError>;

    /// `Some` for stages that work on batches (db-commit writes one
    /// transaction per batch); the runner then calls [`Stage::handle_batch`].
    fn batching(&self) -> Option<Batching> {
        None
    }

    /// Figures the stage measures of its own work lately, by name, for the
    /// worker's heartbeat (`image-queue stats` shows them per worker): e.g.
    /// bg-removal's `inference_ms` and `images_per_s`.
    fn measures(&self) -> std::collections::BTreeMap<String, f64> {
        Default::default()
    }

    /// Handles a batch, one result per event in order. Acknowledgements
    /// happen only after this returns, so a batch is all-or-nothing per event.
    async fn handle_batch(&self, events: Vec<ImageEvent>) -> Vec<Result<Outcome, StageError>> {
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            out.push(self.handle(event).await);
        }
        out
    }
}
