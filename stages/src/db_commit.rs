//! db-commit: writes each image's results to the database, in batches.
//!
//! The runner hands this stage up to `batch_size` events (waiting at most
//! `batch_wait_ms` for a batch to fill); they are written in one transaction
//! of multi-row upserts keyed on (job, image, variant), and acknowledged only
//! after it commits. Each statement stays under the bind-parameter limit and
//! under MySQL's `max_allowed_packet` (read from the server); a packet error
//! splits the statement further instead of failing. A database outage is a
//! retryable error: nothing is acknowledged until it is back.

use std::time::Duration;

use async_trait::async_trait;
use image_queue_pipeline::stage::Batching;
use image_queue_pipeline::{now_ms, ImageEvent, Outcome, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;
use sqlx::AnyPool;

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
}

impl Default for DbCommitConfig {
    fn default() -> Self {
        DbCommitConfig {
            batch_size: 200,
            batch_wait_ms: 20,
            max_rows_per_statement: 500,
            max_connections: 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    MySql,
    Postgres,
    Sqlite,
}

impl Dialect {
    pub fn of_url(url: &str) -> Result<Dialect, String> {
        let scheme = url.split(':').next().unwrap_or("");
        match scheme {
            "mysql" | "mariadb" => Ok(Dialect::MySql),
            "postgres" | "postgresql" => Ok(Dialect::Postgres),
            "sqlite" => Ok(Dialect::Sqlite),
            other => Err(format!(
                "unsupported database URL scheme {other:?}: use mysql://, postgres:// or sqlite://"
            )),
        }
    }

    /// Most bind parameters one statement may carry.
    fn max_params(self) -> usize {
        match self {
            Dialect::MySql | Dialect::Postgres => 65_535,
            Dialect::Sqlite => 32_766,
        }
    }
}

/// Connects, applying the migrations in `migrations/`.
pub async fn connect(url: &str, max_connections: u32) -> Result<(AnyPool, Dialect), sqlx::Error> {
    sqlx::any::install_default_drivers();
    let dialect = Dialect::of_url(url).map_err(|e| sqlx::Error::Configuration(e.into()))?;
    let url = if dialect == Dialect::MySql && url.starts_with("mariadb:") {
        url.replacen("mariadb:", "mysql:", 1)
    } else {
        url.to_string()
    };
    let pool = AnyPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&url)
        .await?;
    migrate(&pool).await?;
    Ok((pool, dialect))
}

pub async fn migrate(pool: &AnyPool) -> Result<(), sqlx::Error> {
    sqlx::migrate!("../migrations")
        .run(pool)
        .await
        .map_err(|e| sqlx::Error::Migrate(Box::new(e)))
}

impl DbCommitConfig {
    pub async fn build(&self, database_url: &str) -> Result<DbCommitStage, sqlx::Error> {
        let (pool, dialect) = connect(database_url, self.max_connections).await?;
        let max_packet = if dialect == Dialect::MySql {
            let v: (i64,) = sqlx::query_as("SELECT CAST(@@max_allowed_packet AS SIGNED)")
                .fetch_one(&pool)
                .await?;
            Some(v.0.max(4096) as usize)
        } else {
            None
        };
        Ok(DbCommitStage {
            pool,
            dialect,
            max_packet,
            config: self.clone(),
        })
    }
}

pub struct DbCommitStage {
    pool: AnyPool,
    dialect: Dialect,
    max_packet: Option<usize>,
    config: DbCommitConfig,
}

const COLUMNS: [&str; 13] = [
    "job_id",
    "image_index",
    "variant",
    "vendor_id",
    "record_id",
    "url",
    "content_type",
    "width",
    "height",
    "bytes",
    "notes",
    "submitted_ms",
    "committed_ms",
];

/// One row to write.
#[derive(Debug, Clone)]
pub struct ResultRow {
    pub job_id: String,
    pub image_index: i64,
    pub variant: String,
    pub vendor_id: String,
    pub record_id: String,
    pub url: String,
    pub content_type: String,
    pub width: i64,
    pub height: i64,
    pub bytes: i64,
    pub notes: String,
    pub submitted_ms: i64,
    pub committed_ms: i64,
}

impl ResultRow {
    /// Bytes this row adds to a statement, roughly, for packet sizing.
    fn weight(&self) -> usize {
        64 + self.job_id.len()
            + self.variant.len()
            + self.vendor_id.len()
            + self.record_id.len()
            + self.url.len()
            + self.content_type.len()
            + self.notes.len()
            + 13 * 8
    }
}

pub fn rows_of(ev: &ImageEvent, now: i64) -> Vec<ResultRow> {
    let notes = serde_json::Value::Object(ev.notes.clone()).to_string();
    ev.outputs
        .iter()
        .filter_map(|(variant, o)| {
            Some(ResultRow {
                job_id: ev.job.clone(),
                image_index: ev.image as i64,
                variant: variant.clone(),
                vendor_id: ev.vendor.clone(),
                record_id: ev.record_id.clone(),
                url: o.url.clone()?,
                content_type: o.content_type.clone(),
                width: o.width as i64,
                height: o.height as i64,
                bytes: o.bytes as i64,
                notes: notes.clone(),
                submitted_ms: ev.submitted_ms as i64,
                committed_ms: now,
            })
        })
        .collect()
}

impl DbCommitStage {
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    fn upsert_sql(&self, rows: usize) -> String {
        let mut sql = format!("INSERT INTO image_results ({}) VALUES ", COLUMNS.join(", "));
        let mut n = 0;
        for r in 0..rows {
            if r > 0 {
                sql.push_str(", ");
            }
            sql.push('(');
            for c in 0..COLUMNS.len() {
                if c > 0 {
                    sql.push_str(", ");
                }
                n += 1;
                match self.dialect {
                    Dialect::Postgres => sql.push_str(&format!("${n}")),
                    _ => sql.push('?'),
                }
            }
            sql.push(')');
        }
        let updates = COLUMNS[3..].iter();
        match self.dialect {
            Dialect::MySql => {
                sql.push_str(" ON DUPLICATE KEY UPDATE ");
                sql.push_str(
                    &updates
                        .map(|c| format!("{c} = VALUES({c})"))
                        .collect::<Vec<_>>()
                        .join(", "),
                );
            }
            _ => {
                sql.push_str(" ON CONFLICT (job_id, image_index, variant) DO UPDATE SET ");
                sql.push_str(
                    &updates
                        .map(|c| format!("{c} = excluded.{c}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                );
            }
        }
        sql
    }

    /// Splits rows into statements under the count, parameter and packet limits.
    pub fn chunks<'a>(&self, rows: &'a [ResultRow]) -> Vec<&'a [ResultRow]> {
        let max_rows = self
            .config
            .max_rows_per_statement
            .min(self.dialect.max_params() / COLUMNS.len())
            .max(1);
        let budget = self.max_packet.map(|p| p * 3 / 4);
        let mut out = Vec::new();
        let mut start = 0;
        let mut weight = 512;
        for (i, row) in rows.iter().enumerate() {
            let w = row.weight();
            let over_bytes = budget.is_some_and(|b| weight + w > b);
            if i > start && (i - start >= max_rows || over_bytes) {
                out.push(&rows[start..i]);
                start = i;
                weight = 512;
            }
            weight += w;
        }
        if start < rows.len() {
            out.push(&rows[start..]);
        }
        out
    }

    /// Writes rows in one transaction; a statement the server finds too
    /// large is split in half and tried again.
    pub async fn write(&self, rows: &[ResultRow]) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        let mut pending: Vec<&[ResultRow]> = self.chunks(rows);
        pending.reverse();
        while let Some(chunk) = pending.pop() {
            let sql = self.upsert_sql(chunk.len());
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(r.job_id.clone())
                    .bind(r.image_index)
                    .bind(r.variant.clone())
                    .bind(r.vendor_id.clone())
                    .bind(r.record_id.clone())
                    .bind(r.url.clone())
                    .bind(r.content_type.clone())
                    .bind(r.width)
                    .bind(r.height)
                    .bind(r.bytes)
                    .bind(r.notes.clone())
                    .bind(r.submitted_ms)
                    .bind(r.committed_ms);
            }
            match q.execute(&mut *tx).await {
                Ok(_) => {}
                Err(e) if is_packet_too_large(&e) && chunk.len() > 1 => {
                    // The server's limit is smaller than we thought: the
                    // statement was refused whole, so split and go on.
                    let (a, b) = chunk.split_at(chunk.len() / 2);
                    pending.push(b);
                    pending.push(a);
                }
                Err(e) => return Err(e),
            }
        }
        tx.commit().await
    }
}

fn is_packet_too_large(e: &sqlx::Error) -> bool {
    let text = e.to_string();
    text.contains("max_allowed_packet") || text.contains("1153") || text.contains("Packet too large")
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
        let rows: Vec<ResultRow> = events.iter().flat_map(|e| rows_of(e, now)).collect();
        match self.write(&rows).await {
            Ok(()) => events.into_iter().map(|e| Ok(Outcome::Done(e))).collect(),
            Err(e) => {
                tracing::warn!(error = %e, rows = rows.len(), "writing results failed");
                let err = StageError::retryable(format!("database: {}", short(&e)));
                events.iter().map(|_| Err(err.clone())).collect()
            }
        }
    }
}

/// A database error as vendors may see it: its kind, without connection
/// details.
fn short(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => format!("the database refused the write ({})", d.code().unwrap_or_default()),
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed => {
            "the database is unreachable".into()
        }
        _ => "the write failed".into(),
    }
}
