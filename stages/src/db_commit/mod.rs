//! db-commit: writes each image's results to the database, in batches.
//!
//! The runner hands this stage up to `batch_size` events (waiting at most
//! `batch_wait_ms` for a batch to fill); they are written in one transaction
//! of multi-row upserts keyed on (job, image, variant), and acknowledged only
//! after it commits, so a redelivered batch rewrites the same rows instead of
//! adding new ones. Each statement stays under the bind-parameter limit and
//! under MySQL's `max_allowed_packet` (read from the server). MariaDB answers
//! a statement over that limit by dropping the connection, which loses the
//! transaction: the stage then re-reads the limit and writes the whole batch
//! again, in smaller statements, on a fresh connection. A database outage is
//! an "unavailable" error: nothing is acknowledged until it is back, and
//! however long it lasts it does not use up the events' attempts. When the
//! database refuses the data itself (SQLSTATE classes 22 and 23, MySQL's
//! data errors), the batch is split in halves, each written on its own, down
//! to the one event at fault: every other event commits, and that one fails
//! permanently with the database's reason, so one vendor's bad value never
//! holds back another's images. Conflicts and other refusals are retried.
//!
//! Files: `connect` (dialect, pool, migrations), `shop` (the shop statement
//! template), `writer` (rows, statements, one transaction), `errors` (what a
//! failure means for the events).

mod connect;
mod errors;
mod shop;
mod writer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use image_queue_pipeline::stage::Batching;
use image_queue_pipeline::{now_ms, ImageEvent, Outcome, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};
use sqlx::AnyPool;

use connect::connect_with;
pub use connect::{connect, migrate, Dialect, UnsupportedDatabase};
use errors::{classify, invalid_data, short, Refusal};
pub use shop::{ShopParam, ShopUpdate, TemplateError};
use writer::budget_of;
pub use writer::{chunk_rows, rows_of, ResultRow};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbCommitConfig {
    /// Most events per transaction.
    pub batch_size: usize,
    /// Longest wait for a batch to fill, in milliseconds.
    pub batch_wait_ms: u64,
    /// Most rows in one INSERT statement.
    pub max_rows_per_statement: usize,
    pub max_connections: u32,
    /// Longest wait for a database connection, in milliseconds. While the
    /// database is down every batch waits this long before it is retried
    /// later, so it bounds how long a worker sits on an outage.
    pub acquire_timeout_ms: u64,
    /// A statement run for each result in the same transaction, to point
    /// the shop's own table at the new image, e.g.
    /// `UPDATE products SET image_url = :url WHERE id = :record_id AND vendor_id = :vendor_id`.
    /// Values are bound, never spliced in; the placeholders are `:url`,
    /// `:record_id`, `:vendor_id`, `:variant` and `:job_id`, all text (on
    /// PostgreSQL cast where a column is not, e.g. `:record_id::bigint`).
    /// Empty: no shop write.
    pub shop_update_sql: String,
    /// The variants the shop statement runs for. Empty: every variant.
    pub shop_update_variants: Vec<String>,
}

impl Default for DbCommitConfig {
    fn default() -> Self {
        DbCommitConfig {
            batch_size: 200,
            batch_wait_ms: 20,
            max_rows_per_statement: 500,
            max_connections: 4,
            acquire_timeout_ms: 10_000,
            shop_update_sql: String::new(),
            shop_update_variants: Vec::new(),
        }
    }
}

/// Why the stage could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DbCommitError {
    #[error("db_commit.batch_size and db_commit.max_rows_per_statement must be at least 1")]
    ZeroSize,
    #[error(transparent)]
    UnsupportedDatabase(#[from] UnsupportedDatabase),
    #[error("db_commit.shop_update_sql cannot be used")]
    ShopUpdateSql(#[source] TemplateError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl DbCommitConfig {
    pub async fn build(&self, database_url: &str) -> Result<DbCommitStage, DbCommitError> {
        if self.batch_size == 0 || self.max_rows_per_statement == 0 {
            return Err(DbCommitError::ZeroSize);
        }
        let dialect = Dialect::of_url(database_url)?;
        let shop = if self.shop_update_sql.trim().is_empty() {
            None
        } else {
            Some(ShopUpdate::parse(&self.shop_update_sql, dialect).map_err(DbCommitError::ShopUpdateSql)?)
        };
        let acquire = Duration::from_millis(self.acquire_timeout_ms.max(100));
        let (pool, dialect) = connect_with(database_url, self.max_connections, acquire).await?;
        let stage = DbCommitStage {
            pool,
            dialect,
            budget: AtomicUsize::new(usize::MAX),
            shop,
            config: self.clone(),
        };
        if dialect == Dialect::MySql {
            let packet = stage.read_max_packet().await?;
            stage.budget.store(budget_of(packet), Ordering::Relaxed);
        }
        Ok(stage)
    }
}

pub struct DbCommitStage {
    pool: AnyPool,
    dialect: Dialect,
    /// Most bytes one statement may weigh: three quarters of the server's
    /// `max_allowed_packet` (MySQL only; unlimited elsewhere), lowered when
    /// the server refuses a statement.
    budget: AtomicUsize,
    shop: Option<ShopUpdate>,
    config: DbCommitConfig,
}

#[async_trait]
impl Stage for DbCommitStage {
    fn name(&self) -> StageName {
        StageName::DbCommit
    }

    fn batching(&self) -> Option<Batching> {
        Some(Batching {
            max_events: self.config.batch_size.max(1),
            max_wait: Duration::from_millis(self.config.batch_wait_ms),
        })
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        self.handle_batch(vec![event])
            .await
            .pop()
            .expect("one result per event")
    }

    async fn handle_batch(&self, events: Vec<ImageEvent>) -> Vec<Result<Outcome, StageError>> {
        let now = now_ms() as i64;
        // All rows in event order; event i's rows are rows[at[i]..at[i + 1]],
        // so any run of events is one slice of rows.
        let mut rows: Vec<ResultRow> = Vec::new();
        let mut at = vec![0];
        for e in &events {
            rows.extend(rows_of(e, now));
            at.push(rows.len());
        }
        let mut settled: Vec<Option<Result<(), StageError>>> = vec![None; events.len()];
        // Runs of events still to write, each in a transaction of its own.
        let mut todo = Vec::new();
        todo.push(0..events.len());
        while let Some(run) = todo.pop() {
            let slice = &rows[at[run.start]..at[run.end]];
            let written = if slice.is_empty() {
                Ok(())
            } else {
                self.write(slice).await
            };
            let e = match written {
                Ok(()) => {
                    settled[run].fill(Some(Ok(())));
                    continue;
                }
                Err(e) => e,
            };
            match classify(&e) {
                Refusal::Outage => {
                    // An outage: every event not yet written waits it out
                    // however long it lasts, without using up its attempts.
                    tracing::warn!(error = %e, rows = slice.len(), "writing results failed: the database is unreachable");
                    let err = StageError::unavailable(format!("database: {}", short(&e)));
                    for s in settled.iter_mut().filter(|s| s.is_none()) {
                        *s = Some(Err(err.clone()));
                    }
                    break;
                }
                Refusal::InvalidData if run.len() > 1 => {
                    // Some event's data is refused: write each half on its
                    // own, so every good event commits and only the guilty
                    // one is left (about log2(batch) writes per bad event).
                    let mid = run.start + run.len() / 2;
                    todo.push(mid..run.end);
                    todo.push(run.start..mid);
                }
                Refusal::InvalidData => {
                    let ev = &events[run.start];
                    tracing::warn!(error = %e, job = %ev.job, image = ev.image, vendor = %ev.vendor,
                        "the database refused an image's results as invalid");
                    settled[run.start] = Some(Err(StageError::permanent(format!("database: {}", invalid_data(&e)))));
                }
                Refusal::Transient => {
                    tracing::warn!(error = %e, rows = slice.len(), "writing results failed");
                    let err = StageError::retryable(format!("database: {}", short(&e)));
                    settled[run].fill(Some(Err(err)));
                }
            }
        }
        events
            .into_iter()
            .zip(settled)
            .map(|(e, s)| match s.expect("every event is settled") {
                Ok(()) => Ok(Outcome::Done(e)),
                Err(err) => Err(err),
            })
            .collect()
    }
}
