//! Reading a multipart submit: files streamed to the blob store as they
//! arrive, text fields read to a small bound, and the vendor's rate limits
//! consulted before any byte of a file is stored.
//!
//! Memory stays bounded whatever a client sends: a text field is refused
//! at its first kilobyte too many, a file at `max_image_bytes`, and what the
//! multipart parser would otherwise buffer whole (a preamble, a part's
//! headers) is capped by [`guard`]. This module owns the parsing; the job
//! itself is made by `routes::submit`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::multipart::{Field, MultipartError};
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::StatusCode;
use futures::Stream;
use image_queue_pipeline::blob::blob_key;
use image_queue_pipeline::{NewImage, Operation, Source};
use image_queue_stages::decode::{screen, sniff, ScreenError};

use crate::auth::Vendor;
use crate::error::ApiError;
use crate::ratelimit::{self, Check};
use crate::routes::{check_record_id, parse_operations};
use crate::AppState;

/// Most bytes of one text field (`record_id`, `operations`): far more than
/// any valid value, and nothing beyond it is read.
pub const MAX_TEXT_FIELD_BYTES: usize = 1024;

/// Most bytes the parser may hold that are not a part's data: the
/// preamble, boundaries and part headers, per part (plus one read's slack).
const MAX_PART_OVERHEAD_BYTES: u64 = 16 * 1024;
const READ_SLACK_BYTES: u64 = 1024 * 1024;

/// How much of each upload's start is kept for screening: enough for any
/// header we accept but the rare JPEG with huge metadata (left to the
/// pipeline's decoder).
const SCREEN_HEAD_BYTES: usize = 64 * 1024;

/// What the parser has been fed and what it has handed out as part data.
#[derive(Default)]
struct Progress {
    fed: AtomicU64,
    data: AtomicU64,
    parts: AtomicU64,
}

/// Wraps the body the parser reads, for two bounds. The parser takes all
/// the body has ready at once: the wrapper hands it one chunk per poll, so
/// that a field's data reaches its reader (and its limit) as it arrives.
/// And once the parser has been fed more than a bounded amount beyond the
/// part data it handed out, the body fails: the parser buffers a preamble
/// or a part's headers whole while looking for their end, so a body of one
/// endless header line would otherwise be held in memory to the end.
fn guard(body: Body, progress: Arc<Progress>) -> Body {
    Body::from_stream(Guarded {
        inner: body.into_data_stream(),
        progress,
        yielded: false,
    })
}

struct Guarded {
    inner: BodyDataStream,
    progress: Arc<Progress>,
    /// A chunk was just handed out: the next poll lets the parser work.
    yielded: bool,
}

impl Stream for Guarded {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.yielded {
            this.yielded = false;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        let chunk = match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => chunk,
            other => return other,
        };
        this.yielded = true;
        let p = &this.progress;
        let fed = p.fed.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
        let allowed = p.data.load(Ordering::Relaxed)
            + MAX_PART_OVERHEAD_BYTES * (p.parts.load(Ordering::Relaxed) + 1)
            + READ_SLACK_BYTES;
        if fed > allowed {
            return Poll::Ready(Some(Err(axum::Error::new(format!(
                "part headers (or a preamble) over {MAX_PART_OVERHEAD_BYTES} bytes"
            )))));
        }
        Poll::Ready(Some(Ok(chunk)))
    }
}

/// The vendor's submit limits as they stand before the body is read: what
/// is already spent decides whether a file may be stored at all. The
/// limits are charged only after the body is read, in one atomic check
/// (`ratelimit::check`), which stays the authority when submits race.
struct Budget {
    /// Per check: units remaining and ms until the oldest unit leaves.
    remaining: Vec<(Check, u64, u64)>,
    bulk_min_images: usize,
}

impl Budget {
    async fn read(state: &AppState, vendor: &Vendor) -> Result<Budget, ApiError> {
        let limits = &state.config.rate_limits;
        let checks = vec![
            Check {
                name: "submits",
                subject: vendor.0.clone(),
                limit: limits.submits_per_vendor,
                cost: 1,
            },
            Check {
                name: "bg-removal-images",
                subject: vendor.0.clone(),
                limit: limits.bg_removal_images_per_vendor,
                cost: 0,
            },
            Check {
                name: "bulk-jobs",
                subject: vendor.0.clone(),
                limit: limits.bulk_jobs_per_vendor,
                cost: 1,
            },
        ];
        let left = ratelimit::peek(state, &checks).await?;
        let budget = Budget {
            remaining: checks.into_iter().zip(left).map(|(c, (r, t))| (c, r, t)).collect(),
            bulk_min_images: limits.bulk_min_images,
        };
        budget.admit(0, None)?;
        Ok(budget)
    }

    /// Refuses if a job of `images` images with these operations (when
    /// known yet) is already over a limit.
    fn admit(&self, images: usize, ops: Option<&[Operation]>) -> Result<(), ApiError> {
        for (c, remaining, reset_ms) in &self.remaining {
            let need = match c.name {
                "submits" => 1,
                "bg-removal-images" if ops.is_some_and(|o| o.contains(&Operation::BgRemoval)) => images as u64,
                "bulk-jobs" if images > self.bulk_min_images => 1,
                _ => 0,
            };
            if need == 0 || need <= *remaining {
                continue;
            }
            if need > c.limit.max {
                return Err(ApiError::Unprocessable(format!(
                    "this request needs {need} units of the {:?} limit, which allows {} per {} s: split it",
                    c.name, c.limit.max, c.limit.window_secs
                )));
            }
            return Err(ratelimit::refusal(c, reset_ms.div_ceil(1000).max(1)));
        }
        Ok(())
    }
}

/// Reads a multipart submit, storing its files under `job_id`. Every
/// refusal removes what was stored.
pub async fn read_multipart(
    state: &AppState,
    vendor: &Vendor,
    job_id: &str,
    req: Request,
) -> Result<(Vec<Operation>, Vec<NewImage>), ApiError> {
    // Decided before a byte of the body is read.
    let budget = if state.config.rate_limits.enabled {
        Some(Budget::read(state, vendor).await?)
    } else {
        None
    };
    let progress = Arc::new(Progress::default());
    let req = req.map(|b| guard(b, progress.clone()));
    let mut multipart = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::BadRequest(e.body_text()))?;
    let mut parts = Parts::default();
    let result = read_parts(state, budget.as_ref(), job_id, &mut multipart, &progress, &mut parts).await;
    let result = result.and_then(|()| parts.finish());
    if result.is_err() {
        state.blobs.delete_job(job_id).await.ok();
    }
    result
}

#[derive(Default)]
struct Parts {
    ops: Option<Vec<Operation>>,
    record_ids: Vec<String>,
    blobs: Vec<String>,
}

impl Parts {
    fn finish(self) -> Result<(Vec<Operation>, Vec<NewImage>), ApiError> {
        let ops = match self.ops {
            Some(ops) => ops,
            None => parse_operations([""])?,
        };
        if self.record_ids.len() != self.blobs.len() {
            return Err(ApiError::Unprocessable(format!(
                "{} images but {} record_id fields: send one record_id per image, in order",
                self.blobs.len(),
                self.record_ids.len()
            )));
        }
        let images = self
            .blobs
            .into_iter()
            .zip(self.record_ids)
            .map(|(key, record_id)| NewImage {
                source: Source::Blob(key),
                record_id,
            })
            .collect();
        Ok((ops, images))
    }
}

fn bad(max: u64) -> impl Fn(MultipartError) -> ApiError {
    move |e: MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::PayloadTooLarge(format!("images are limited to {max} bytes each"))
        } else {
            ApiError::BadRequest(format!("malformed multipart body: {}", e.body_text()))
        }
    }
}

fn too_many_images(state: &AppState) -> ApiError {
    ApiError::PayloadTooLarge(format!(
        "a job holds at most {} images",
        state.config.max_images_per_job
    ))
}

async fn read_parts(
    state: &AppState,
    budget: Option<&Budget>,
    job_id: &str,
    multipart: &mut Multipart,
    progress: &Progress,
    parts: &mut Parts,
) -> Result<(), ApiError> {
    let max = state.config.max_image_bytes;
    while let Some(mut field) = multipart.next_field().await.map_err(bad(max))? {
        progress.parts.fetch_add(1, Ordering::Relaxed);
        match field.name().unwrap_or("") {
            "operations" => {
                if parts.ops.is_some() {
                    return Err(ApiError::Unprocessable("send one operations field".into()));
                }
                let text = read_text(&mut field, "operations", progress, max).await?;
                let ops = parse_operations(text.split(','))?;
                if let Some(b) = budget {
                    b.admit(parts.blobs.len(), Some(&ops))?;
                }
                parts.ops = Some(ops);
            }
            "record_id" => {
                if parts.record_ids.len() >= state.config.max_images_per_job {
                    return Err(too_many_images(state));
                }
                let r = read_text(&mut field, "record_id", progress, max).await?;
                check_record_id(&r)?;
                parts.record_ids.push(r);
            }
            "images" => {
                if parts.blobs.len() >= state.config.max_images_per_job {
                    return Err(too_many_images(state));
                }
                if let Some(b) = budget {
                    b.admit(parts.blobs.len() + 1, parts.ops.as_deref())?;
                }
                let key = store_file(state, job_id, parts.blobs.len(), &mut field, progress).await?;
                parts.blobs.push(key);
            }
            other => {
                let name: String = other.chars().take(40).collect();
                return Err(ApiError::Unprocessable(format!(
                    "unknown field {name:?}: send images, record_id and operations"
                )));
            }
        }
    }
    Ok(())
}

/// A text field, refused at its first byte over [`MAX_TEXT_FIELD_BYTES`].
async fn read_text(field: &mut Field<'_>, name: &str, progress: &Progress, max: u64) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = field.chunk().await.map_err(bad(max))? {
        progress.data.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if buf.len() + chunk.len() > MAX_TEXT_FIELD_BYTES {
            return Err(ApiError::PayloadTooLarge(format!(
                "the {name} field is limited to {MAX_TEXT_FIELD_BYTES} bytes"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    String::from_utf8(buf).map_err(|_| ApiError::BadRequest(format!("the {name} field is not UTF-8 text")))
}

fn not_an_image(index: usize, why: &str) -> ApiError {
    ApiError::UnsupportedMediaType(format!("file {}: {why}", index + 1))
}

/// Streams one file to the blob store as it arrives: a job of 100 images
/// of 25 MB never sits in memory. The first bytes decide whether it is an
/// image at all.
async fn store_file(
    state: &AppState,
    job_id: &str,
    index: usize,
    field: &mut Field<'_>,
    progress: &Progress,
) -> Result<String, ApiError> {
    let max = state.config.max_image_bytes;
    let key = blob_key(job_id, index as u32, "original");
    let stored = |e: std::io::Error| ApiError::Internal(format!("storing an upload: {e}"));
    let mut writer = state.blobs.writer(&key).await.map_err(stored)?;
    let mut head = Vec::with_capacity(4096);
    let mut tail: Vec<u8> = Vec::with_capacity(32);
    let mut size = 0u64;
    while let Some(chunk) = field.chunk().await.map_err(bad(max))? {
        progress.data.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        size += chunk.len() as u64;
        if size > max {
            return Err(ApiError::PayloadTooLarge(format!(
                "images are limited to {max} bytes each"
            )));
        }
        if head.len() < SCREEN_HEAD_BYTES {
            let was = head.len();
            head.extend_from_slice(&chunk[..chunk.len().min(SCREEN_HEAD_BYTES - was)]);
            // Refuse a non-image at its first bytes, not at its end.
            if was < 16 && head.len() >= 16 && sniff(&head).is_none() {
                return Err(not_an_image(index, "not a JPEG, PNG, WebP or GIF image"));
            }
        }
        tail.extend_from_slice(&chunk[chunk.len().saturating_sub(16)..]);
        tail.drain(..tail.len().saturating_sub(16));
        writer.write(&chunk).await.map_err(stored)?;
    }
    screen(&head, &tail, size, &state.config.decode).map_err(|e| match e {
        ScreenError::Unsupported(why) => not_an_image(index, &why),
        ScreenError::Invalid(why) => ApiError::Unprocessable(format!("file {}: {why}", index + 1)),
    })?;
    writer.commit().await.map_err(stored)?;
    Ok(key)
}
