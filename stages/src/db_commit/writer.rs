//! db-commit's writer: result rows, the upsert statement, and one batch's
//! transaction, sized to the server's statement limits. Decides nothing
//! about events: what a failure means is `errors`' and the stage's.

use std::sync::atomic::Ordering;

use image_queue_pipeline::ImageEvent;
use sqlx::{AnyPool, Connection};

use super::errors::is_connection_lost;
use super::{DbCommitStage, Dialect};

/// The statement budget for a `max_allowed_packet`: a quarter is left for
/// what [`ResultRow::weight`] does not count (protocol framing, the
/// statement text's fixed parts).
pub(super) fn budget_of(max_packet: usize) -> usize {
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

    pub(super) async fn read_max_packet(&self) -> Result<usize, sqlx::Error> {
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
    fn a_row_over_the_budget_goes_alone() {
        let rows = vec![row(10), row(10_000), row(10)];
        let chunks = chunk_rows(&rows, 500, 2_000);
        assert_eq!(chunks.iter().map(|c| c.len()).collect::<Vec<_>>(), vec![1, 1, 1]);
    }
}
