//! db-commit against real database servers: MariaDB, PostgreSQL and SQLite.
//!
//! The shared servers are expected at `mysql://root@127.0.0.1:3306/test` and
//! `postgres://postgres@127.0.0.1:5432/test` (override with `TEST_MYSQL_URL`
//! and `TEST_POSTGRES_URL`); each test works in a scratch database of its
//! own there. Tests that need to shrink `max_allowed_packet` or to stop the
//! server start a private `mariadbd` instead. A missing server fails the
//! test with what to install: these tests never skip.

mod common;

use std::collections::BTreeMap;

use common::{PrivateMariaDb, ScratchDb};
use image_queue_pipeline::{ErrorClass, EventKind, ImageEvent, Outcome, OutputRef, Source, Stage};
use image_queue_stages::db_commit::{DbCommitConfig, DbCommitStage};

/// An uploaded image's event with `variants` outputs, as upload leaves it.
fn event(job: &str, image: u32, variants: usize) -> ImageEvent {
    let outputs: BTreeMap<String, OutputRef> = (0..variants)
        .map(|v| {
            (
                format!("v{v}"),
                OutputRef {
                    blob: None,
                    url: Some(format!(
                        "https://cdn.example.com/vendor-1/{job}/{image}/v{v}.webp?padding={}",
                        "x".repeat(120)
                    )),
                    content_type: "image/webp".into(),
                    width: 800,
                    height: 600,
                    bytes: 12_345,
                },
            )
        })
        .collect();
    let mut notes = serde_json::Map::new();
    notes.insert("face_found".into(), serde_json::Value::Bool(true));
    notes.insert("bg_engine".into(), serde_json::Value::String("u2net".into()));
    ImageEvent {
        v: 1,
        kind: EventKind::ImageUploaded,
        job: job.to_string(),
        vendor: "vendor-1".into(),
        image,
        record_id: format!("sku-{image}"),
        ops: vec![],
        source: Source::Url("https://vendor.example.com/a.jpg".into()),
        working: None,
        outputs,
        notes,
        slot: false,
        attempt: 0,
        submitted_ms: 1_700_000_000_000,
        traceparent: None,
    }
}

fn events(job: &str, images: u32, variants: usize) -> Vec<ImageEvent> {
    (0..images).map(|i| event(job, i, variants)).collect()
}

fn new_job() -> String {
    format!("job-{}", common::uuid_hex())
}

async fn count_rows(stage: &DbCommitStage, job: &str) -> i64 {
    let sql = match stage.dialect() {
        image_queue_stages::db_commit::Dialect::Postgres => "SELECT COUNT(*) FROM image_results WHERE job_id = $1",
        _ => "SELECT COUNT(*) FROM image_results WHERE job_id = ?",
    };
    let (n,): (i64,) = sqlx::query_as(sql).bind(job).fetch_one(stage.pool()).await.unwrap();
    n
}

async fn count_distinct_keys(stage: &DbCommitStage, job: &str) -> i64 {
    let sql = match stage.dialect() {
        image_queue_stages::db_commit::Dialect::Postgres => {
            "SELECT COUNT(*) FROM (SELECT DISTINCT image_index, variant FROM image_results WHERE job_id = $1) k"
        }
        _ => "SELECT COUNT(*) FROM (SELECT DISTINCT image_index, variant FROM image_results WHERE job_id = ?) k",
    };
    let (n,): (i64,) = sqlx::query_as(sql).bind(job).fetch_one(stage.pool()).await.unwrap();
    n
}

fn assert_all_done(results: &[Result<Outcome, image_queue_pipeline::StageError>]) {
    for (i, r) in results.iter().enumerate() {
        match r {
            Ok(Outcome::Done(_)) => {}
            Ok(other) => panic!("event {i}: expected Done, got {other:?}"),
            Err(e) => panic!("event {i}: expected Done, got error {e} ({:?})", e.class),
        }
    }
}

/// A batch delivered twice (the runner crashed before acknowledging it)
/// leaves exactly one row per result.
async fn redelivery_is_idempotent(url: &str) {
    let config = DbCommitConfig {
        max_rows_per_statement: 37,
        ..DbCommitConfig::default()
    };
    let stage = config.build(url).await.expect("building db-commit");
    let job = new_job();
    let batch = events(&job, 60, 3);
    assert_all_done(&stage.handle_batch(batch.clone()).await);
    assert_eq!(count_rows(&stage, &job).await, 180);
    assert_all_done(&stage.handle_batch(batch).await);
    assert_eq!(count_rows(&stage, &job).await, 180, "a redelivered batch added rows");
    assert_eq!(count_distinct_keys(&stage, &job).await, 180);
    stage.pool().close().await;
}

#[tokio::test]
async fn redelivered_batch_leaves_one_row_per_result_on_mariadb() {
    let db = ScratchDb::create(&common::shared_mysql_url()).await;
    redelivery_is_idempotent(&db.url).await;
    db.drop_db().await;
}

#[tokio::test]
async fn redelivered_batch_leaves_one_row_per_result_on_postgres() {
    let db = ScratchDb::create(&common::shared_postgres_url()).await;
    redelivery_is_idempotent(&db.url).await;
    db.drop_db().await;
}

#[tokio::test]
async fn redelivered_batch_leaves_one_row_per_result_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/results.db?mode=rwc", dir.path().display());
    redelivery_is_idempotent(&url).await;
}

/// 5,000 results in one batch fit a server whose `max_allowed_packet` is
/// 64 KiB: the stage sizes its statements to it.
#[tokio::test]
async fn five_thousand_results_commit_under_a_64k_packet_limit() {
    let server = PrivateMariaDb::start("64K");
    server.create_test_db().await;
    let stage = DbCommitConfig {
        batch_size: 5_000,
        ..DbCommitConfig::default()
    }
    .build(&server.url())
    .await
    .expect("building db-commit");
    assert!(
        stage.statement_budget() <= 64 * 1024,
        "the stage did not read the server's packet limit"
    );
    let job = new_job();
    let batch = events(&job, 2_500, 2);
    let results = stage.handle_batch(batch).await;
    assert_all_done(&results);
    assert_eq!(count_rows(&stage, &job).await, 5_000);
    stage.pool().close().await;
}

/// The server's limit shrinks under a running stage (an operator restarts
/// it with a smaller `max_allowed_packet`): the first oversized statement
/// costs the transaction and its connection, and the stage writes the
/// whole batch again under the new limit instead of failing.
#[tokio::test]
async fn a_packet_limit_lowered_under_the_stage_is_learned() {
    let mut server = PrivateMariaDb::start("16M");
    server.create_test_db().await;
    let stage = DbCommitConfig {
        batch_size: 5_000,
        max_connections: 1,
        ..DbCommitConfig::default()
    }
    .build(&server.url())
    .await
    .expect("building db-commit");
    let before = stage.statement_budget();
    server.restart_with_packet("64K");
    let job = new_job();
    let results = stage.handle_batch(events(&job, 2_500, 2)).await;
    assert_all_done(&results);
    assert_eq!(count_rows(&stage, &job).await, 5_000);
    assert!(
        stage.statement_budget() < 64 * 1024,
        "statement budget still {} (was {before})",
        stage.statement_budget()
    );
    stage.pool().close().await;
}

/// A database stopped during a run loses nothing: every event of a batch
/// written while it is down gets an "unavailable" error (so nothing is
/// acknowledged, and no attempt is counted), and the same batch commits
/// once it is back.
#[tokio::test]
async fn a_stopped_database_loses_nothing() {
    let mut server = PrivateMariaDb::start("16M");
    server.create_test_db().await;
    let stage = DbCommitConfig {
        acquire_timeout_ms: 1_500,
        ..DbCommitConfig::default()
    }
    .build(&server.url())
    .await
    .expect("building db-commit");
    let job = new_job();
    let first = events(&job, 50, 2);
    assert_all_done(&stage.handle_batch(first).await);

    server.stop();
    let second: Vec<ImageEvent> = (50..150).map(|i| event(&job, i, 2)).collect();
    let results = stage.handle_batch(second.clone()).await;
    assert_eq!(results.len(), second.len());
    for (i, r) in results.iter().enumerate() {
        match r {
            // Unavailable: retried for as long as the outage lasts, without
            // using up the event's attempts.
            Err(e) => assert_eq!(e.class, ErrorClass::Unavailable, "event {i}: {e}"),
            Ok(_) => panic!("event {i}: written while the database was stopped?"),
        }
    }

    server.restart();
    assert_all_done(&stage.handle_batch(second).await);
    assert_eq!(count_rows(&stage, &job).await, 300);
    stage.pool().close().await;
}

/// The shop's own table is updated in the same transaction, with values
/// bound (a record id full of quotes is just a value).
async fn shop_update_points_products_at_results(url: &str) {
    let setup = DbCommitConfig::default().build(url).await.expect("building db-commit");
    let table = format!("products_{}", common::uuid_hex());
    sqlx::query(&format!(
        "CREATE TABLE {table} (id VARCHAR(64) NOT NULL, vendor_id VARCHAR(64) NOT NULL, image_url VARCHAR(2048))"
    ))
    .execute(setup.pool())
    .await
    .unwrap();
    let job = new_job();
    let mut batch = events(&job, 3, 2);
    batch[2].record_id = "x' OR '1'='1".into();
    for (id, vendor) in [
        ("sku-0", "vendor-1"),
        ("sku-1", "vendor-1"),
        ("sku-1", "vendor-2"),
        ("x' OR '1'='1", "vendor-1"),
    ] {
        let sql = match setup.dialect() {
            image_queue_stages::db_commit::Dialect::Postgres => {
                format!("INSERT INTO {table} (id, vendor_id) VALUES ($1, $2)")
            }
            _ => format!("INSERT INTO {table} (id, vendor_id) VALUES (?, ?)"),
        };
        sqlx::query(&sql)
            .bind(id)
            .bind(vendor)
            .execute(setup.pool())
            .await
            .unwrap();
    }
    let stage = DbCommitConfig {
        shop_update_sql: format!(
            "UPDATE {table} SET image_url = :url WHERE id = :record_id AND vendor_id = :vendor_id"
        ),
        shop_update_variants: vec!["v1".into()],
        ..DbCommitConfig::default()
    }
    .build(url)
    .await
    .expect("building db-commit with a shop update");
    assert_all_done(&stage.handle_batch(batch.clone()).await);

    let rows: Vec<(String, String, Option<String>)> = sqlx::query_as(&format!(
        "SELECT id, vendor_id, image_url FROM {table} ORDER BY id, vendor_id"
    ))
    .fetch_all(stage.pool())
    .await
    .unwrap();
    let url_of = |i: usize| batch[i].outputs["v1"].url.clone();
    assert_eq!(
        rows,
        vec![
            ("sku-0".into(), "vendor-1".into(), url_of(0)),
            ("sku-1".into(), "vendor-1".into(), url_of(1)),
            ("sku-1".into(), "vendor-2".into(), None),
            ("x' OR '1'='1".into(), "vendor-1".into(), url_of(2)),
        ]
    );
    assert_eq!(count_rows(&stage, &job).await, 6);
    stage.pool().close().await;
    setup.pool().close().await;
}

#[tokio::test]
async fn shop_update_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/results.db?mode=rwc", dir.path().display());
    shop_update_points_products_at_results(&url).await;
}

#[tokio::test]
async fn shop_update_on_mariadb() {
    let db = ScratchDb::create(&common::shared_mysql_url()).await;
    shop_update_points_products_at_results(&db.url).await;
    db.drop_db().await;
}

#[tokio::test]
async fn shop_update_on_postgres() {
    let db = ScratchDb::create(&common::shared_postgres_url()).await;
    shop_update_points_products_at_results(&db.url).await;
    db.drop_db().await;
}

/// Other vendors' clean events around two events whose `record_id` the
/// database refuses: the clean ones commit, each bad one fails once,
/// permanently, with the database's reason, and nothing of it is written.
async fn poisoned_rows_fail_alone(url: &str, poison: &str, reason: &[&str]) {
    let stage = DbCommitConfig::default().build(url).await.expect("building db-commit");
    let job = new_job();
    let mut batch = events(&job, 10, 2);
    let bad_jobs = [new_job(), new_job()];
    for (at, bad_job) in [(2, &bad_jobs[0]), (7, &bad_jobs[1])] {
        let mut bad = event(bad_job, 0, 2);
        bad.vendor = "vendor-2".into();
        bad.record_id = poison.to_string();
        batch[at] = bad;
    }
    let results = stage.handle_batch(batch).await;
    assert_eq!(results.len(), 10);
    for (i, r) in results.iter().enumerate() {
        match (i, r) {
            (2 | 7, Err(e)) => {
                assert_eq!(e.class, ErrorClass::Permanent, "event {i}: {e}");
                for needle in reason {
                    assert!(e.message.contains(needle), "event {i}: expected {needle:?} in {e}");
                }
            }
            (2 | 7, Ok(o)) => panic!("event {i}: the poisoned row was accepted: {o:?}"),
            (_, Ok(Outcome::Done(_))) => {}
            (_, other) => panic!("event {i}: a clean event of another vendor did not commit: {other:?}"),
        }
    }
    // Eight clean events of two variants each; the bad ones wrote nothing.
    assert_eq!(count_rows(&stage, &job).await, 16);
    for bad_job in &bad_jobs {
        assert_eq!(count_rows(&stage, bad_job).await, 0);
    }
    stage.pool().close().await;
}

#[tokio::test]
async fn a_poisoned_row_fails_alone_on_postgres() {
    let db = ScratchDb::create(&common::shared_postgres_url()).await;
    // PostgreSQL text cannot hold NUL: SQLSTATE 22021.
    poisoned_rows_fail_alone(&db.url, "sku-\u{0}-1", &["22021", "0x00"]).await;
    db.drop_db().await;
}

#[tokio::test]
async fn a_poisoned_row_fails_alone_on_mariadb() {
    let db = ScratchDb::create(&common::shared_mysql_url()).await;
    // record_id is VARCHAR(255): in strict mode (MariaDB's default) a longer
    // value is refused with 1406, "Data too long".
    poisoned_rows_fail_alone(&db.url, &"x".repeat(300), &["1406", "Data too long", "record_id"]).await;
    db.drop_db().await;
}
