//! Live job progress as Server-Sent Events.
//!
//! The pipeline's scripts publish each image's stage transition on the
//! progress channel, and each job's end on the finished channel, in the same
//! atomic step that makes the transition. One subscriber per API process, on
//! a connection of its own (a subscribed connection can do nothing else),
//! fans the messages out through a broadcast channel to every open stream;
//! each stream keeps its own job's messages and ends after the job's
//! terminal state. Pub/sub delivers at most once, so a stream also rereads
//! its job when it falls behind and every little while, and so cannot hang
//! on a message lost to a reconnection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures::StreamExt;
use image_queue_pipeline::jobs::{is_terminal, JobView};
use image_queue_pipeline::Pipeline;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, mpsc, OnceCell};
use tokio_stream::wrappers::ReceiverStream;

use crate::auth::Vendor;
use crate::error::ApiError;
use crate::AppState;

/// One transition: an image's (`image` set) or the whole job's (`image`
/// absent, `stage` "job").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub job: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<u32>,
    pub stage: String,
    pub status: String,
}

impl Progress {
    fn ends_job(&self) -> bool {
        self.image.is_none() && is_terminal(&self.status)
    }
}

/// The process's subscriber, started by the first stream that needs it.
#[derive(Clone)]
pub struct ProgressHub {
    p: Pipeline,
    tx: Arc<OnceCell<broadcast::Sender<Arc<Progress>>>>,
}

/// How often an open stream rereads its job regardless of messages.
const RECHECK: Duration = Duration::from_secs(15);

impl ProgressHub {
    pub fn new(p: Pipeline) -> Self {
        ProgressHub {
            p,
            tx: Arc::new(OnceCell::new()),
        }
    }

    /// A receiver of every transition from now on. The first call returns
    /// only once Redis has confirmed the subscription, so a caller that
    /// subscribes and then reads a job's state misses nothing in between.
    pub async fn subscribe(&self) -> Result<broadcast::Receiver<Arc<Progress>>, ApiError> {
        let tx = self
            .tx
            .get_or_try_init(|| async {
                let pubsub = self.connect().await?;
                let (tx, _) = broadcast::channel(4096);
                tokio::spawn(fan_out(self.clone(), pubsub, tx.clone()));
                Ok::<_, ApiError>(tx)
            })
            .await?;
        Ok(tx.subscribe())
    }

    async fn connect(&self) -> Result<redis::aio::PubSub, ApiError> {
        let channels = [self.p.keys.progress_channel(), self.p.keys.finished_channel()];
        Ok(self.p.subscribe(&channels).await?)
    }

    /// The transitions one message announces: a job's end on the finished
    /// channel; on the progress channel one transition, or a JSON array of
    /// them from a step that moved a batch.
    fn parse(&self, channel: &str, payload: &str) -> Vec<Progress> {
        if channel == self.p.keys.finished_channel() {
            // A line "<job id> <status>" per closed job (see keys.rs).
            return payload
                .lines()
                .filter_map(|line| line.split_once(' '))
                .map(|(job, status)| Progress {
                    job: job.into(),
                    image: None,
                    stage: "job".into(),
                    status: status.into(),
                })
                .collect();
        }
        if payload.starts_with('[') {
            serde_json::from_str(payload).unwrap_or_default()
        } else {
            serde_json::from_str(payload).into_iter().collect()
        }
    }
}

/// Reads the subscription for the life of the process, reconnecting (with
/// a growing pause) whenever the connection drops.
async fn fan_out(hub: ProgressHub, mut pubsub: redis::aio::PubSub, tx: broadcast::Sender<Arc<Progress>>) {
    loop {
        {
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let (Ok(payload), channel) = (msg.get_payload::<String>(), msg.get_channel_name()) else {
                    continue;
                };
                for p in hub.parse(channel, &payload) {
                    // No receiver means no open stream: nothing to do.
                    let _ = tx.send(Arc::new(p));
                }
            }
        }
        tracing::warn!("the progress subscription dropped; reconnecting");
        let mut pause = Duration::from_millis(100);
        pubsub = loop {
            tokio::time::sleep(pause).await;
            match hub.connect().await {
                Ok(ps) => break ps,
                Err(_) => pause = (pause * 2).min(Duration::from_secs(5)),
            }
        };
    }
}

/// The event streams open in this process, per vendor: each vendor may
/// hold at most `max_event_streams_per_vendor` of them.
#[derive(Clone, Default)]
pub struct OpenStreams(Arc<Mutex<HashMap<String, usize>>>);

/// One open stream, counted until dropped.
struct StreamSlot {
    open: OpenStreams,
    vendor: String,
}

impl OpenStreams {
    fn acquire(&self, vendor: &str, max: usize) -> Option<StreamSlot> {
        let mut open = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(vendor.to_string()).or_default();
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(StreamSlot {
            open: self.clone(),
            vendor: vendor.to_string(),
        })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.open.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.vendor) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.vendor);
            }
        }
    }
}

fn job_event(name: &str, job: &JobView) -> Event {
    Event::default()
        .event(name)
        .json_data(job)
        .unwrap_or_else(|_| Event::default().event(name))
}

/// `GET /api/image-queue/job/{id}/events`: `job` (the job as it is now),
/// then `progress` per transition, then `done` (the job in its terminal
/// state), after which the stream ends.
#[utoipa::path(get, path = "/api/image-queue/job/{id}/events", tag = "jobs",
    params(("id" = String, Path, description = "The job id")),
    responses(
        (status = 200, description = "text/event-stream of `job`, `progress` and a final `done` event", content_type = "text/event-stream", body = String),
        (status = 404, description = "No such job of the caller's", body = crate::bodies::ErrorBody),
        (status = 401, description = "No valid API key", body = crate::bodies::ErrorBody),
        (status = 429, description = "Rate limited, or too many open streams; see Retry-After", body = crate::bodies::ErrorBody)
    ))]
pub async fn job_events(
    State(state): State<AppState>,
    Extension(open): Extension<OpenStreams>,
    vendor: Vendor,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let max = state.config.max_event_streams_per_vendor;
    let slot = open.acquire(&vendor.0, max).ok_or_else(|| ApiError::TooManyRequests {
        message: format!("at most {max} event streams may be open at once; close one first"),
        retry_after_s: 5,
        headers: Vec::new(),
    })?;
    let rate = crate::routes::limit_reads(&state, &vendor).await?;
    // Subscribe first, then read: a transition in between is seen twice
    // (in the snapshot and as a message), never missed.
    let mut rx = state.progress.subscribe().await?;
    let job = state.jobs.get(Some(&vendor.0), &id).await?.ok_or(ApiError::NotFound)?;
    let (out, stream) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        // Held as long as the stream is open.
        let _slot = slot;
        let terminal = job.is_terminal();
        if out
            .send(job_event(if terminal { "done" } else { "job" }, &job))
            .await
            .is_err()
            || terminal
        {
            return;
        }
        // Rereads the job; sends it as `done` and says so if it has ended.
        let reread = || async {
            match state.jobs.get(Some(&vendor.0), &id).await {
                Ok(Some(job)) if job.is_terminal() => {
                    let _ = out.send(job_event("done", &job)).await;
                    true
                }
                Ok(Some(_)) => false,
                // Expired or unreadable: nothing more will come.
                Ok(None) => true,
                Err(_) => false,
            }
        };
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.tick().await;
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Ok(p) if p.job == id => {
                        let ev = Event::default().event("progress").json_data(&*p).unwrap_or_default();
                        if out.send(ev).await.is_err() {
                            return;
                        }
                        if p.ends_job() && reread().await {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        if reread().await {
                            return;
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                _ = recheck.tick() => {
                    if out.is_closed() || reread().await {
                        return;
                    }
                }
                // The client went away: free its slot now, not at the next
                // message or recheck.
                _ = out.closed() => return,
            }
        }
    });
    let stream = ReceiverStream::new(stream).map(Ok::<_, Infallible>);
    let mut resp = Sse::new(stream).keep_alive(KeepAlive::default()).into_response();
    rate.apply(&mut resp);
    Ok(resp)
}
