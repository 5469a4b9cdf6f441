//! One member of a consumer group: how work is taken from a stream.
//!
//! Owns the Redis side of consuming: creating the group, reading new
//! entries with `XREADGROUP` on a connection of its own (only as many as
//! there are free slots, so entries never wait in this consumer's pending
//! list while other consumers idle), taking back entries orphaned by dead
//! consumers (`XAUTOCLAIM`, with every free slot), spotting poison pills
//! (entries delivered too often, by their `XPENDING` count), renewing the
//! claims of entries in flight so they are not taken while their handler
//! runs, and a graceful stop: stop reading, let work in flight finish
//! within the grace period, hand back what did not. Every stage runner
//! and the webhook delivery consume through it.
//!
//! It must not decide what an entry means or how it ends: that is the
//! [`Work`]'s, and only the scripts that end an entry acknowledge it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::context::Pipeline;
use crate::Conn;

/// One entry read from the stream: its id and its fields.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: String,
    fields: HashMap<String, redis::Value>,
}

impl Delivery {
    /// A field's value as text; `None` when absent or not text.
    pub fn field(&self, name: &str) -> Option<String> {
        self.fields.get(name).and_then(|v| redis::from_redis_value_ref(v).ok())
    }
}

impl From<StreamId> for Delivery {
    fn from(entry: StreamId) -> Self {
        Delivery {
            id: entry.id,
            fields: entry.map,
        }
    }
}

/// How a consumer reads, reclaims and stops.
#[derive(Debug, Clone)]
pub struct ConsumerSettings {
    /// Units of work in flight at once.
    pub slots: usize,
    /// Entries in one unit (a batching stage's batch; otherwise 1).
    pub per_slot: usize,
    /// A batching stage waits up to this long for a unit to fill.
    pub batch_wait: Option<Duration>,
    /// How long one `XREADGROUP` blocks waiting for entries.
    pub read_block_ms: u64,
    /// An entry pending this long without its claim renewed is orphaned.
    pub claim_idle_ms: u64,
    /// How often to look for orphaned entries.
    pub reclaim_every_ms: u64,
    /// An entry delivered more often than this is a poison pill.
    pub max_deliveries: u64,
    /// On stop: how long work in flight may take to finish.
    pub shutdown_grace_ms: u64,
}

/// What a consumer's entries are for.
#[async_trait]
pub trait Work: Send + Sync + 'static {
    /// Handles one unit of work (up to `per_slot` entries) to its end.
    async fn handle(self: Arc<Self>, unit: Vec<Delivery>);

    /// Ends an entry its workers kept dying on (delivered `delivered`
    /// times), without handling it again.
    async fn poisoned(&self, entry: Delivery, delivered: u64);

    /// Runs before each read (e.g. moving due retries onto the stream).
    async fn before_read(&self) {}
}

/// A member of one consumer group of one stream.
pub struct Consumer {
    p: Pipeline,
    stream: String,
    group: String,
    name: String,
    settings: ConsumerSettings,
    slots: Arc<Semaphore>,
    in_flight: Mutex<HashSet<String>>,
}

/// A unique consumer name: host, pid and a random suffix, so two processes
/// (or two consumers of one stream in a process) never share a pending list.
pub fn consumer_name() -> String {
    let host = hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    format!("{host}-{}-{:06x}", std::process::id(), rand::random::<u32>() & 0xffffff)
}

/// Creates a consumer group (and its stream) if missing.
pub async fn create_group(p: &Pipeline, stream: &str, group: &str) -> redis::RedisResult<()> {
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut p.conn.clone())
        .await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

impl Consumer {
    pub fn new(p: Pipeline, stream: String, group: &str, settings: ConsumerSettings) -> Arc<Self> {
        Arc::new(Consumer {
            p,
            stream,
            group: group.to_string(),
            name: consumer_name(),
            slots: Arc::new(Semaphore::new(settings.slots.max(1))),
            settings,
            in_flight: Mutex::new(HashSet::new()),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Entries being handled now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().map(|f| f.len()).unwrap_or(0)
    }

    /// Consumes until `shutdown` is cancelled, then stops reading, lets
    /// work in flight finish within the grace period and hands back what
    /// did not. Returns the end of the grace period. The whole stop takes
    /// the grace period at most, even with Redis gone: what could not be
    /// handed back stays pending, and a live consumer reclaims it once it
    /// has been idle `claim_idle_ms`.
    pub async fn run<W: Work>(
        self: Arc<Self>,
        work: Arc<W>,
        shutdown: CancellationToken,
    ) -> redis::RedisResult<tokio::time::Instant> {
        create_group(&self.p, &self.stream, &self.group).await?;
        let mut tasks = JoinSet::new();
        // Renewal outlives the reader: work in flight keeps its claims
        // through the grace period.
        let renew_stop = CancellationToken::new();
        let renewer = tokio::spawn(self.clone().renew_claims(renew_stop.clone()));
        let mut reader = self.p.blocking_connection().await?;
        let mut reclaim = Reclaimer::new(Duration::from_millis(self.settings.reclaim_every_ms));
        loop {
            let first = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = self.slots.clone().acquire_owned() => p.expect("semaphore never closes"),
            };
            let mut permits = vec![first];
            while let Ok(p) = self.slots.clone().try_acquire_owned() {
                permits.push(p);
            }
            work.before_read().await;
            // Orphaned entries come first, with every free slot: a dead
            // consumer's whole pending list is taken back in a few rounds,
            // not one entry per reclaim period.
            if reclaim.due() {
                match self.reclaim(&mut reclaim, permits.len(), work.as_ref()).await {
                    Ok(fresh) if !fresh.is_empty() => {
                        info!(stream = %self.stream, count = fresh.len(), "reclaimed orphaned entries");
                        self.start(fresh, permits, &work, &mut tasks);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        reclaim.scanned("0-0", false);
                        debug!(stream = %self.stream, error = %e, "reclaiming failed");
                    }
                }
            }
            // The read is not cancelled on shutdown: entries it returns are
            // already in our pending list and must be handed back, not lost.
            // A read that outlives its BLOCK by far is on a dead connection
            // (Redis restarted under it): drop that connection for a new one.
            let limit = Duration::from_millis(self.settings.read_block_ms * 2 + 5_000);
            let read = tokio::time::timeout(limit, self.read(&mut reader, permits.len())).await;
            let entries = match read {
                Ok(Ok(e)) => e,
                failed => {
                    drop(permits);
                    match failed {
                        Ok(Err(e)) if e.code() == Some("NOGROUP") => {
                            // The stream or group is gone (Redis lost its data,
                            // or someone deleted it): create it again.
                            warn!(stream = %self.stream, "consumer group missing; creating it again");
                            create_group(&self.p, &self.stream, &self.group).await.ok();
                        }
                        Ok(Err(e)) => warn!(stream = %self.stream, error = %e, "reading the stream failed; retrying"),
                        _ => warn!(stream = %self.stream, "a read hung; reconnecting"),
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        fresh = self.p.blocking_connection() => {
                            if let Ok(fresh) = fresh {
                                reader = fresh;
                            }
                        }
                    }
                    continue;
                }
            };
            if shutdown.is_cancelled() {
                self.release(entries.iter().map(|d| d.id.clone()).collect()).await;
                break;
            }
            self.start(entries, permits, &work, &mut tasks);
            // Reap finished tasks so the set does not grow without bound.
            while tasks.try_join_next().is_some() {}
        }
        info!(stream = %self.stream, "stopping: finishing in-flight work");
        let grace_end = tokio::time::Instant::now() + Duration::from_millis(self.settings.shutdown_grace_ms);
        if tokio::time::timeout_at(grace_end, async { while tasks.join_next().await.is_some() {} })
            .await
            .is_err()
        {
            tasks.abort_all();
            while tasks.join_next().await.is_some() {}
            let left: Vec<String> = self.in_flight.lock().unwrap().drain().collect();
            warn!(stream = %self.stream, abandoned = left.len(), "grace period over; handing back unfinished entries");
            self.release(left).await;
        }
        renew_stop.cancel();
        // Not waited for past the grace period (a renewal on its way to a
        // Redis that is gone); nothing it holds is lost.
        let last_call = grace_end.max(tokio::time::Instant::now() + Duration::from_millis(100));
        let mut renewer = renewer;
        if tokio::time::timeout_at(last_call, &mut renewer).await.is_err() {
            renewer.abort();
        }
        Ok(grace_end)
    }

    /// Reads up to `slots` units of work; a batching consumer waits up to
    /// its `batch_wait` for a batch to fill.
    async fn read(&self, reader: &mut Conn, slots: usize) -> redis::RedisResult<Vec<Delivery>> {
        let want = slots * self.settings.per_slot.max(1);
        let mut out = self.xreadgroup(reader, want, self.settings.read_block_ms).await?;
        if let Some(wait) = self.settings.batch_wait {
            let deadline = Instant::now() + wait;
            while !out.is_empty() && out.len() < want {
                let left = deadline.saturating_duration_since(Instant::now()).as_millis() as u64;
                if left == 0 {
                    break;
                }
                let more = self.xreadgroup(reader, want - out.len(), left).await?;
                if more.is_empty() {
                    break;
                }
                out.extend(more);
            }
        }
        Ok(out)
    }

    async fn xreadgroup(&self, reader: &mut Conn, count: usize, block_ms: u64) -> redis::RedisResult<Vec<Delivery>> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(reader)
            .await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).map(Delivery::from).collect())
            .unwrap_or_default())
    }

    /// Starts a task per unit of work, each holding one slot.
    fn start<W: Work>(
        self: &Arc<Self>,
        entries: Vec<Delivery>,
        permits: Vec<OwnedSemaphorePermit>,
        work: &Arc<W>,
        tasks: &mut JoinSet<()>,
    ) {
        let per = self.settings.per_slot.max(1);
        let mut permits = permits.into_iter();
        let mut entries = entries.into_iter().peekable();
        while entries.peek().is_some() {
            let unit: Vec<Delivery> = entries.by_ref().take(per).collect();
            let permit = permits.next().expect("never read more than the free slots");
            let ids: Vec<String> = unit.iter().map(|d| d.id.clone()).collect();
            self.in_flight.lock().unwrap().extend(ids.iter().cloned());
            let (me, work) = (self.clone(), work.clone());
            tasks.spawn(async move {
                work.handle(unit).await;
                let mut f = me.in_flight.lock().unwrap();
                for id in &ids {
                    f.remove(id);
                }
                drop(permit);
            });
        }
        // Unused permits return to the semaphore here.
    }

    /// Keeps long handlers' entries from being reclaimed while this
    /// consumer is alive, by claiming every entry in flight to itself again
    /// (which resets its idle time), a thousand per command.
    async fn renew_claims(self: Arc<Self>, stop: CancellationToken) {
        let every = Duration::from_millis((self.settings.claim_idle_ms / 3).max(10));
        let mut conn = self.p.conn.clone();
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
            }
            let ids: Vec<String> = self.in_flight.lock().unwrap().iter().cloned().collect();
            for chunk in ids.chunks(1000) {
                let r: redis::RedisResult<redis::Value> = redis::cmd("XCLAIM")
                    .arg(&self.stream)
                    .arg(&self.group)
                    .arg(&self.name)
                    .arg(0)
                    .arg(chunk)
                    .arg("JUSTID")
                    .query_async(&mut conn)
                    .await;
                if let Err(e) = r {
                    warn!(stream = %self.stream, error = %e, "renewing claims failed");
                }
            }
        }
    }

    /// Takes over entries left pending by consumers that stopped renewing
    /// them (they died): as many as `slots` free slots can handle. An entry
    /// delivered too often is handed to [`Work::poisoned`] instead. Returns
    /// the entries to handle.
    async fn reclaim<W: Work>(&self, r: &mut Reclaimer, slots: usize, work: &W) -> redis::RedisResult<Vec<Delivery>> {
        let want = slots * self.settings.per_slot.max(1);
        let mut conn = self.p.conn.clone();
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(&self.group)
            .arg(&self.name)
            .arg(self.settings.claim_idle_ms)
            .arg(&r.cursor)
            .arg("COUNT")
            .arg(want)
            .query_async(&mut conn)
            .await?;
        r.scanned(&reply.next_stream_id, reply.claimed.len() >= want);
        if !reply.deleted_ids.is_empty() {
            warn!(stream = %self.stream, count = reply.deleted_ids.len(), "pending entries had been deleted from the stream");
        }
        if reply.claimed.is_empty() {
            return Ok(Vec::new());
        }
        // How often has each been delivered? An entry whose workers keep
        // dying on it is a poison pill: end it instead of looping.
        let mut pipe = redis::pipe();
        for e in &reply.claimed {
            pipe.cmd("XPENDING")
                .arg(&self.stream)
                .arg(&self.group)
                .arg(&e.id)
                .arg(&e.id)
                .arg(1);
        }
        let counts: Vec<Vec<(String, String, u64, u64)>> = pipe.query_async(&mut conn).await?;
        let mut fresh = Vec::new();
        for (entry, info) in reply.claimed.into_iter().zip(counts) {
            let delivered = info.first().map(|i| i.3).unwrap_or(0);
            if delivered > self.settings.max_deliveries {
                work.poisoned(Delivery::from(entry), delivered).await;
            } else {
                fresh.push(Delivery::from(entry));
            }
        }
        Ok(fresh)
    }

    /// Hands entries back without acknowledging them: marks them long idle,
    /// so that a live consumer's next reclaim takes them at once.
    async fn release(&self, ids: Vec<String>) {
        if ids.is_empty() {
            return;
        }
        let mut conn = self.p.conn.clone();
        let mut cmd = redis::cmd("XCLAIM");
        cmd.arg(&self.stream)
            .arg(&self.group)
            .arg(&self.name)
            .arg(0)
            .arg(&ids)
            .arg("IDLE")
            .arg(self.settings.claim_idle_ms.saturating_mul(1000))
            .arg("JUSTID");
        let call = cmd.query_async::<redis::Value>(&mut conn);
        // Bounded: a stop with Redis gone must not wait for it.
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Err(_) => {
                warn!(stream = %self.stream, "handing back entries timed out; they will be reclaimed after the idle time")
            }
            Ok(Ok(_)) => info!(stream = %self.stream, count = ids.len(), "handed back unfinished entries"),
            Ok(Err(e)) => {
                warn!(stream = %self.stream, error = %e, "handing back entries failed; they will be reclaimed after the idle time")
            }
        }
    }
}

/// When the reader next looks for orphaned entries, and where in the
/// pending list it goes on from.
struct Reclaimer {
    every: Duration,
    next: Instant,
    /// `XAUTOCLAIM`'s cursor: "0-0" starts a new pass over the pending list.
    cursor: String,
}

impl Reclaimer {
    fn new(every: Duration) -> Self {
        // At once on start: a worker restarted after a crash takes back
        // what the crash left (once idle), without waiting a period.
        Reclaimer {
            every,
            next: Instant::now(),
            cursor: "0-0".into(),
        }
    }

    fn due(&self) -> bool {
        Instant::now() >= self.next
    }

    /// After one `XAUTOCLAIM`: a pass that filled its batch, or has more of
    /// the pending list to scan, goes on at once; a finished pass waits a
    /// period.
    fn scanned(&mut self, cursor: &str, full: bool) {
        self.cursor = cursor.to_string();
        if !full && self.cursor == "0-0" {
            self.next = Instant::now() + self.every;
        }
    }
}
