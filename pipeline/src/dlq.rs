//! The dead-letter stream as operators handle it: list and filter, show,
//! replay (after fixing whatever made the stage fail) and purge.
//!
//! Entries are read newest first. An age filter becomes the bounds of the
//! range read, since entry ids are their millisecond timestamps; the other
//! filters are applied while scanning, up to [`SCAN_MAX`] entries, so a huge
//! dead-letter stream cannot make one request run away.

use std::collections::HashMap;

use redis::AsyncCommands;
use serde::Serialize;

use crate::context::Pipeline;
use crate::event::{ImageEvent, StageName};
use crate::now_ms;
use crate::scripts::{ReplayDeadLetter, ReplayOutcome};

/// Most dead letters one list or purge looks at.
pub const SCAN_MAX: usize = 100_000;
const PAGE: usize = 500;
/// Replay log length kept (approximately).
const REPLAY_LOG_MAX: u64 = 100_000;

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub stage: String,
    pub job: String,
    pub vendor: String,
    pub image: u32,
    pub error: String,
    pub attempts: u32,
    pub failed_ms: u64,
    /// The event as it was when the stage gave up; `null` if unreadable.
    pub event: Option<serde_json::Value>,
    #[serde(skip)]
    payload: String,
}

impl DeadLetter {
    fn from_entry(id: String, mut f: HashMap<String, String>) -> DeadLetter {
        let mut take = |k: &str| f.remove(k).unwrap_or_default();
        let payload = take(crate::event::EVENT_FIELD);
        DeadLetter {
            stage: take("stage"),
            job: take("job"),
            vendor: take("vendor"),
            image: take("image").parse().unwrap_or(0),
            error: take("error"),
            attempts: take("attempts").parse().unwrap_or(0),
            failed_ms: take("failed_ms").parse().unwrap_or(0),
            event: serde_json::from_str(&payload).ok(),
            payload,
            id,
        }
    }
}

/// Which dead letters an operation applies to; empty matches all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub stage: Option<StageName>,
    pub vendor: Option<String>,
    pub job: Option<String>,
    /// Case-insensitive text the error must contain.
    pub error: Option<String>,
    /// Failed at least this long ago.
    pub older_than_ms: Option<u64>,
    /// Failed at most this long ago.
    pub newer_than_ms: Option<u64>,
}

impl Filter {
    pub fn is_empty(&self) -> bool {
        self.stage.is_none()
            && self.vendor.is_none()
            && self.job.is_none()
            && self.error.is_none()
            && self.older_than_ms.is_none()
            && self.newer_than_ms.is_none()
    }

    fn matches(&self, d: &DeadLetter) -> bool {
        self.stage.is_none_or(|s| s.as_str() == d.stage)
            && self.vendor.as_deref().is_none_or(|v| v == d.vendor)
            && self.job.as_deref().is_none_or(|j| j == d.job)
            && self
                .error
                .as_deref()
                .is_none_or(|e| d.error.to_lowercase().contains(&e.to_lowercase()))
    }

    /// The id range to read: `(newest, oldest)` for `XREVRANGE`.
    fn bounds(&self) -> (String, String) {
        let now = now_ms();
        let end = match self.older_than_ms {
            Some(age) => format!("{}", now.saturating_sub(age)),
            None => "+".into(),
        };
        let start = match self.newer_than_ms {
            Some(age) => format!("{}", now.saturating_sub(age)),
            None => "-".into(),
        };
        (end, start)
    }
}

/// Dead-letter ids are stream ids, `<ms>-<seq>`; nothing else may reach a
/// command.
pub fn valid_id(id: &str) -> bool {
    match id.split_once('-') {
        Some((ms, seq)) => {
            !ms.is_empty()
                && !seq.is_empty()
                && ms.len() <= 20
                && seq.len() <= 20
                && ms.bytes().all(|b| b.is_ascii_digit())
                && seq.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// Visits matching dead letters, newest first, until `visit` says stop.
async fn scan(p: &Pipeline, filter: &Filter, mut visit: impl FnMut(DeadLetter) -> bool) -> redis::RedisResult<()> {
    let mut conn = p.conn.clone();
    let key = p.keys.dead_letters();
    let (mut end, start) = filter.bounds();
    let mut seen = 0;
    while seen < SCAN_MAX {
        let page: Vec<(String, HashMap<String, String>)> = redis::cmd("XREVRANGE")
            .arg(&key)
            .arg(&end)
            .arg(&start)
            .arg("COUNT")
            .arg(PAGE)
            .query_async(&mut conn)
            .await?;
        let n = page.len();
        for (id, fields) in page {
            seen += 1;
            end = format!("({id}");
            let d = DeadLetter::from_entry(id, fields);
            if filter.matches(&d) && !visit(d) {
                return Ok(());
            }
        }
        if n < PAGE {
            break;
        }
    }
    Ok(())
}

/// How many dead letters are held.
pub async fn count(p: &Pipeline) -> redis::RedisResult<u64> {
    let mut conn = p.conn.clone();
    redis::cmd("XLEN")
        .arg(p.keys.dead_letters())
        .query_async(&mut conn)
        .await
}

/// A page of the dead-letter stream as it is stored, newest first: up to
/// `limit` entries before the entry id `before` (exclusive; `None`: from
/// the newest), each as its id and fields.
pub async fn raw_page(
    p: &Pipeline,
    before: Option<&str>,
    limit: usize,
) -> redis::RedisResult<Vec<(String, Vec<(String, String)>)>> {
    let end = before.map_or_else(|| "+".to_string(), |b| format!("({b}"));
    let mut conn = p.conn.clone();
    redis::cmd("XREVRANGE")
        .arg(p.keys.dead_letters())
        .arg(end)
        .arg("-")
        .arg("COUNT")
        .arg(limit)
        .query_async(&mut conn)
        .await
}

/// Matching dead letters, newest first, at most `limit`.
pub async fn list(p: &Pipeline, filter: &Filter, limit: usize) -> redis::RedisResult<Vec<DeadLetter>> {
    let mut out = Vec::new();
    scan(p, filter, |d| {
        out.push(d);
        out.len() < limit
    })
    .await?;
    Ok(out)
}

pub async fn get(p: &Pipeline, id: &str) -> redis::RedisResult<Option<DeadLetter>> {
    if !valid_id(id) {
        return Ok(None);
    }
    let mut conn = p.conn.clone();
    let found: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(p.keys.dead_letters())
        .arg(id)
        .arg(id)
        .query_async(&mut conn)
        .await?;
    Ok(found.into_iter().next().map(|(id, f)| DeadLetter::from_entry(id, f)))
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("no such dead letter")]
    NotFound,
    #[error("its event cannot be read, so it cannot be replayed; purge it")]
    Unreadable,
    #[error("its job record has expired")]
    JobGone,
    #[error("its image is no longer failed (replayed already?)")]
    NotFailed,
    #[error("its job was cancelled")]
    Cancelled,
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

#[derive(Debug, Clone, Serialize)]
pub struct Replayed {
    pub id: String,
    pub job: String,
    pub image: u32,
    pub from: String,
    pub to: String,
}

/// Puts a dead letter's event back on the stage it failed in (or `to`),
/// with its attempts reset, and reopens its image and job; atomically.
pub async fn replay(p: &Pipeline, id: &str, to: Option<StageName>) -> Result<Replayed, ReplayError> {
    let d = get(p, id).await?.ok_or(ReplayError::NotFound)?;
    let mut event = ImageEvent::from_json(&d.payload).map_err(|_| ReplayError::Unreadable)?;
    let from = StageName::parse(&d.stage).ok_or(ReplayError::Unreadable)?;
    let to = to.unwrap_or(from);
    event.attempt = 0;
    // Its dead-lettering released its admission slot; a replay bypasses the
    // window rather than release that slot a second time.
    event.slot = false;
    let replay = ReplayDeadLetter {
        dead_letter_id: id,
        event: &event,
        from,
        to,
        log_max: REPLAY_LOG_MAX,
    };
    match replay.run(p).await? {
        ReplayOutcome::Replayed => Ok(Replayed {
            id: id.to_string(),
            job: event.job,
            image: event.image,
            from: from.as_str().into(),
            to: to.as_str().into(),
        }),
        ReplayOutcome::NoSuchDeadLetter => Err(ReplayError::NotFound),
        ReplayOutcome::JobGone => Err(ReplayError::JobGone),
        ReplayOutcome::JobCancelled => Err(ReplayError::Cancelled),
        ReplayOutcome::NotFailed => Err(ReplayError::NotFailed),
    }
}

/// Deletes one dead letter; false if there was none.
pub async fn delete(p: &Pipeline, id: &str) -> redis::RedisResult<bool> {
    if !valid_id(id) {
        return Ok(false);
    }
    let mut conn = p.conn.clone();
    let n: u64 = conn.xdel(p.keys.dead_letters(), &[id]).await?;
    Ok(n > 0)
}

/// Deletes every matching dead letter; returns how many.
pub async fn purge(p: &Pipeline, filter: &Filter) -> redis::RedisResult<u64> {
    let mut ids = Vec::new();
    scan(p, filter, |d| {
        ids.push(d.id);
        true
    })
    .await?;
    let mut conn = p.conn.clone();
    let mut n = 0;
    for chunk in ids.chunks(PAGE) {
        let deleted: u64 = conn.xdel(p.keys.dead_letters(), chunk).await?;
        n += deleted;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stream_ids_are_valid() {
        assert!(valid_id("1700000000000-0"));
        for bad in ["", "-", "1-", "-1", "abc-1", "1-2-3", "+", "1700000000000"] {
            assert!(!valid_id(bad), "{bad}");
        }
    }
}
