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
//! however long it lasts it does not use up the events' attempts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use image_queue_pipeline::stage::Batching;
use image_queue_pipeline::{now_ms, ImageEvent, Outcome, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Connection};

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
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
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
    connect_with(url, max_connections, Duration::from_secs(10)).await
}

async fn connect_with(
    url: &str,
    max_connections: u32,
    acquire_timeout: Duration,
) -> Result<(AnyPool, Dialect), sqlx::Error> {
    sqlx::any::install_default_drivers();
    let dialect = Dialect::of_url(url).map_err(|e| sqlx::Error::Configuration(e.into()))?;
    let url = if dialect == Dialect::MySql && url.starts_with("mariadb:") {
        url.replacen("mariadb:", "mysql:", 1)
    } else {
        url.to_string()
    };
    let pool = AnyPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(acquire_timeout)
        // A connection that died with the server (or was dropped after a
        // packet error) must not be handed out again.
        .test_before_acquire(true)
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
    pub async fn build(&self, database_url: &str) -> Result<DbCommitStage, DbCommitError> {
        if self.batch_size == 0 || self.max_rows_per_statement == 0 {
            return Err(DbCommitError::Config(
                "db_commit.batch_size and db_commit.max_rows_per_statement must be at least 1".into(),
            ));
        }
        let dialect = Dialect::of_url(database_url).map_err(DbCommitError::Config)?;
        let shop = if self.shop_update_sql.trim().is_empty() {
            None
        } else {
            Some(
                ShopUpdate::parse(&self.shop_update_sql, dialect)
                    .map_err(|e| DbCommitError::Config(format!("db_commit.shop_update_sql: {e}")))?,
            )
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

/// A value the shop statement can refer to by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShopParam {
    Url,
    RecordId,
    VendorId,
    Variant,
    JobId,
}

impl ShopParam {
    fn of_name(name: &str) -> Option<ShopParam> {
        match name {
            "url" => Some(ShopParam::Url),
            "record_id" => Some(ShopParam::RecordId),
            "vendor_id" => Some(ShopParam::VendorId),
            "variant" => Some(ShopParam::Variant),
            "job_id" => Some(ShopParam::JobId),
            _ => None,
        }
    }

    fn of_row(self, r: &ResultRow) -> &str {
        match self {
            ShopParam::Url => &r.url,
            ShopParam::RecordId => &r.record_id,
            ShopParam::VendorId => &r.vendor_id,
            ShopParam::Variant => &r.variant,
            ShopParam::JobId => &r.job_id,
        }
    }
}

/// The configured shop statement, its named placeholders turned into the
/// dialect's positional ones, and what to bind to each in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShopUpdate {
    pub sql: String,
    pub params: Vec<ShopParam>,
}

impl ShopUpdate {
    /// Translates `:name` placeholders outside quotes and comments. A
    /// positional placeholder in the template is refused: binding by
    /// position would silently depend on our order.
    pub fn parse(template: &str, dialect: Dialect) -> Result<ShopUpdate, String> {
        let chars: Vec<char> = template.chars().collect();
        let mut sql = String::with_capacity(template.len());
        let mut params = Vec::new();
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            match c {
                '\'' | '"' | '`' => {
                    // A quoted literal or identifier, copied as is; a doubled
                    // quote inside it just closes and reopens it.
                    let end = chars[i + 1..]
                        .iter()
                        .position(|&d| d == c)
                        .ok_or_else(|| format!("unterminated {c} quote"))?;
                    sql.extend(&chars[i..=i + 1 + end]);
                    i += end + 2;
                }
                '-' if chars.get(i + 1) == Some(&'-') => {
                    let end = chars[i..]
                        .iter()
                        .position(|&d| d == '\n')
                        .map_or(chars.len(), |p| i + p);
                    sql.extend(&chars[i..end]);
                    i = end;
                }
                '/' if chars.get(i + 1) == Some(&'*') => {
                    let end = (i + 2..chars.len().saturating_sub(1))
                        .find(|&j| chars[j] == '*' && chars[j + 1] == '/')
                        .ok_or("unterminated comment")?;
                    sql.extend(&chars[i..end + 2]);
                    i = end + 2;
                }
                ':' if chars.get(i + 1) == Some(&':') => {
                    // A PostgreSQL cast.
                    sql.push_str("::");
                    i += 2;
                }
                ':' if chars.get(i + 1).is_some_and(|d| d.is_ascii_alphabetic() || *d == '_') => {
                    let len = chars[i + 1..]
                        .iter()
                        .position(|d| !(d.is_ascii_alphanumeric() || *d == '_'))
                        .unwrap_or(chars.len() - i - 1);
                    let name: String = chars[i + 1..i + 1 + len].iter().collect();
                    let p = ShopParam::of_name(&name).ok_or_else(|| {
                        format!("unknown placeholder :{name} (known: :url, :record_id, :vendor_id, :variant, :job_id)")
                    })?;
                    params.push(p);
                    match dialect {
                        Dialect::Postgres => sql.push_str(&format!("${}", params.len())),
                        _ => sql.push('?'),
                    }
                    i += 1 + len;
                }
                '?' => return Err("use named placeholders (:url, :record_id, ...), not ?".into()),
                '$' if chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()) => {
                    return Err("use named placeholders (:url, :record_id, ...), not $n".into())
                }
                _ => {
                    sql.push(c);
                    i += 1;
                }
            }
        }
        if params.is_empty() {
            return Err("the statement uses no placeholder, so it would write the same to every row".into());
        }
        Ok(ShopUpdate { sql, params })
    }
}

/// The statement budget for a `max_allowed_packet`: a quarter is left for
/// what [`ResultRow::weight`] does not count (protocol framing, the
/// statement text's fixed parts).
fn budget_of(max_packet: usize) -> usize {
    (max_packet.max(4096)) * 3 / 4
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

/// What a statement weighs before its rows: the column list and the
/// upsert clause.
const STATEMENT_BASE_WEIGHT: usize = 512;

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
    /// Bytes this row adds to a statement, an overestimate: its share of the
    /// statement text (13 placeholders) plus its bound values, each with a
    /// type tag and a length prefix.
    pub fn weight(&self) -> usize {
        64 + self.job_id.len()
            + self.variant.len()
            + self.vendor_id.len()
            + self.record_id.len()
            + self.url.len()
            + self.content_type.len()
            + self.notes.len()
            + 13 * 8
            + 13 * 4
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

/// A failed attempt at a batch's transaction, with the statement it failed
/// on (if any) so a packet error can be sized.
struct Attempt {
    error: sqlx::Error,
    statement_weight: usize,
    statement_rows: usize,
}

impl From<sqlx::Error> for Attempt {
    fn from(error: sqlx::Error) -> Self {
        Attempt {
            error,
            statement_weight: 0,
            statement_rows: 0,
        }
    }
}

/// Most attempts at one batch's transaction when the server keeps refusing
/// statements as too large; each one halves the statements at least.
const MAX_PACKET_ATTEMPTS: usize = 8;

impl DbCommitStage {
    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// The current statement budget in bytes (`usize::MAX`: unlimited).
    pub fn statement_budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    async fn read_max_packet(&self) -> Result<usize, sqlx::Error> {
        let v: (i64,) = sqlx::query_as("SELECT CAST(@@max_allowed_packet AS SIGNED)")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.0.max(0) as usize)
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
        chunk_rows(rows, self.max_rows(), self.statement_budget())
    }

    fn max_rows(&self) -> usize {
        self.config
            .max_rows_per_statement
            .min(self.dialect.max_params() / COLUMNS.len())
            .max(1)
    }

    /// Writes rows in one transaction. A statement the server refuses as
    /// too large costs the transaction (MariaDB drops the connection with
    /// it), so the whole write is tried again on a fresh connection, with
    /// statements sized to the server's current limit and at most half the
    /// refused one.
    pub async fn write(&self, rows: &[ResultRow]) -> Result<(), sqlx::Error> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let failed = match self.write_once(rows).await {
                Ok(()) => return Ok(()),
                Err(f) => f,
            };
            let too_large = is_packet_too_large(&failed.error);
            let lost = is_connection_lost(&failed.error);
            if self.dialect != Dialect::MySql || !(too_large || lost) || attempts >= MAX_PACKET_ATTEMPTS {
                return Err(failed.error);
            }
            // Lost without a word may still be the packet limit (the server
            // can hang up before its error reaches us): ask the server what
            // its limit is now. If it cannot be asked, it is down, and that
            // is the error to report.
            let old = self.statement_budget();
            let mut new = budget_of(self.read_max_packet().await?);
            if too_large {
                new = new.min(failed.statement_weight / 2);
                if failed.statement_rows <= 1 {
                    // One row alone is over the limit: smaller statements
                    // cannot help.
                    return Err(failed.error);
                }
            } else if new >= old {
                // A connection lost for another reason: nothing to learn,
                // leave the retry to the runner.
                return Err(failed.error);
            }
            tracing::warn!(
                old_budget = old,
                new_budget = new,
                statement_bytes = failed.statement_weight,
                "the database refused a statement as too large; writing the batch again in smaller statements"
            );
            self.budget.store(new.max(1024), Ordering::Relaxed);
        }
    }

    async fn write_once(&self, rows: &[ResultRow]) -> Result<(), Attempt> {
        let mut conn = self.pool.acquire().await?;
        let result = self.write_on(&mut conn, rows).await;
        if result.is_err() {
            // Whatever failed, this connection's state is in doubt (MariaDB
            // may have hung up on it): do not give it back to the pool.
            conn.close_on_drop();
        }
        result
    }

    async fn write_on(&self, conn: &mut sqlx::AnyConnection, rows: &[ResultRow]) -> Result<(), Attempt> {
        let mut tx = conn.begin().await?;
        for chunk in self.chunks(rows) {
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
            if let Err(error) = q.execute(&mut *tx).await {
                return Err(Attempt {
                    error,
                    statement_weight: STATEMENT_BASE_WEIGHT + chunk.iter().map(ResultRow::weight).sum::<usize>(),
                    statement_rows: chunk.len(),
                });
            }
        }
        if let Some(shop) = &self.shop {
            let wanted = &self.config.shop_update_variants;
            for r in rows.iter().filter(|r| wanted.is_empty() || wanted.contains(&r.variant)) {
                let mut q = sqlx::query(&shop.sql);
                for p in &shop.params {
                    q = q.bind(p.of_row(r).to_string());
                }
                // A shop row that does not exist (yet) is not our error:
                // the result row is written either way.
                q.execute(&mut *tx).await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Splits rows into runs of at most `max_rows` rows weighing at most
/// `budget` bytes; a row heavier than the budget goes alone.
pub fn chunk_rows(rows: &[ResultRow], max_rows: usize, budget: usize) -> Vec<&[ResultRow]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut weight = STATEMENT_BASE_WEIGHT;
    for (i, row) in rows.iter().enumerate() {
        let w = row.weight();
        if i > start && (i - start >= max_rows || weight.saturating_add(w) > budget) {
            out.push(&rows[start..i]);
            start = i;
            weight = STATEMENT_BASE_WEIGHT;
        }
        weight = weight.saturating_add(w);
    }
    if start < rows.len() {
        out.push(&rows[start..]);
    }
    out
}

/// MariaDB's ER_NET_PACKET_TOO_LARGE (1153), or MySQL's wording of it.
fn is_packet_too_large(e: &sqlx::Error) -> bool {
    if let sqlx::Error::Database(d) = e {
        if let Some(my) = d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>() {
            if my.number() == 1153 {
                return true;
            }
        }
    }
    let text = e.to_string();
    text.contains("max_allowed_packet") || text.contains("Packet too large")
}

/// The connection went away under the statement.
fn is_connection_lost(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(d) => {
            // 2006 "server has gone away", 2013 "lost connection".
            d.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>()
                .is_some_and(|my| matches!(my.number(), 2006 | 2013))
        }
        _ => false,
    }
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
                let message = format!("database: {}", short(&e));
                // Unreachable is an outage: the batch waits it out however
                // long it lasts, without using up its events' attempts.
                let err = if is_unreachable(&e) {
                    StageError::unavailable(message)
                } else {
                    StageError::retryable(message)
                };
                events.iter().map(|_| Err(err.clone())).collect()
            }
        }
    }
}

/// The database cannot be reached at all (down, restarting, refusing
/// connections), as opposed to refusing this write.
fn is_unreachable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_)
    ) || is_connection_lost(e)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn row(notes: usize) -> ResultRow {
        ResultRow {
            job_id: "j".into(),
            image_index: 0,
            variant: "v".into(),
            vendor_id: "x".into(),
            record_id: "r".into(),
            url: "https://e/x".into(),
            content_type: "image/png".into(),
            width: 1,
            height: 1,
            bytes: 1,
            notes: "n".repeat(notes),
            submitted_ms: 0,
            committed_ms: 0,
        }
    }

    #[test]
    fn chunks_keep_under_row_count_and_byte_budget() {
        let rows: Vec<ResultRow> = (0..1000).map(|_| row(100)).collect();
        let w = rows[0].weight();
        let budget = STATEMENT_BASE_WEIGHT + 10 * w;
        let chunks = chunk_rows(&rows, 7, budget);
        assert!(chunks.iter().all(|c| c.len() <= 7));
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 1000);
        let chunks = chunk_rows(&rows, 500, budget);
        assert!(chunks.iter().all(|c| c.len() == 10 || c.len() == 1000 % 10));
        assert_eq!(chunks.iter().map(|c| c.len()).sum::<usize>(), 1000);
    }

    #[test]
    fn shop_placeholders_become_positional_in_order() {
        let t = "UPDATE products SET image_url = :url WHERE id = :record_id AND vendor_id = :vendor_id";
        let my = ShopUpdate::parse(t, Dialect::MySql).unwrap();
        assert_eq!(
            my.sql,
            "UPDATE products SET image_url = ? WHERE id = ? AND vendor_id = ?"
        );
        assert_eq!(
            my.params,
            vec![ShopParam::Url, ShopParam::RecordId, ShopParam::VendorId]
        );
        let pg = ShopUpdate::parse(t, Dialect::Postgres).unwrap();
        assert_eq!(
            pg.sql,
            "UPDATE products SET image_url = $1 WHERE id = $2 AND vendor_id = $3"
        );
    }

    #[test]
    fn shop_placeholders_skip_quotes_comments_and_casts() {
        let t = "UPDATE p SET u = :url, note = ':not_a_param' /* :nor */ WHERE id = :record_id::bigint -- :this\n";
        let pg = ShopUpdate::parse(t, Dialect::Postgres).unwrap();
        assert_eq!(
            pg.sql,
            "UPDATE p SET u = $1, note = ':not_a_param' /* :nor */ WHERE id = $2::bigint -- :this\n"
        );
        assert_eq!(pg.params, vec![ShopParam::Url, ShopParam::RecordId]);
    }

    #[test]
    fn shop_templates_with_unknown_or_positional_placeholders_are_refused() {
        assert!(ShopUpdate::parse("UPDATE p SET u = :uri", Dialect::MySql).is_err());
        assert!(ShopUpdate::parse("UPDATE p SET u = ? WHERE id = :record_id", Dialect::MySql).is_err());
        assert!(ShopUpdate::parse("UPDATE p SET u = $1", Dialect::Postgres).is_err());
        assert!(ShopUpdate::parse("UPDATE p SET u = 'x'", Dialect::Sqlite).is_err());
        assert!(ShopUpdate::parse("UPDATE p SET u = 'x", Dialect::Sqlite).is_err());
    }

    #[test]
    fn a_row_over_the_budget_goes_alone() {
        let rows = vec![row(10), row(10_000), row(10)];
        let chunks = chunk_rows(&rows, 500, 2_000);
        assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![1, 1, 1]);
    }
}
