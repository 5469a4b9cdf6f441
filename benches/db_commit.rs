//! Rows per second that db-commit writes, on MariaDB, PostgreSQL and SQLite.
//!
//! Each run writes 20,000 fresh result rows through `DbCommitStage::write`
//! in batches of 200 (one transaction each, as the runner hands them over)
//! and the median of several runs is printed per database. MariaDB and
//! PostgreSQL are the local servers the tests use (`TEST_MYSQL_URL`,
//! `TEST_POSTGRES_URL` override them); the bench works in a scratch
//! database of its own there and drops it afterwards. A database that
//! cannot be reached is reported and skipped: this is a measurement, not a
//! test.
//!
//! `cargo bench --bench db_commit` (optionally followed by `-- mariadb`,
//! `-- postgres` or `-- sqlite` to measure only those).

use std::time::Instant;

use image_queue_stages::db_commit::{Dialect, ResultRow};
use image_queue_stages::DbCommitConfig;
use sqlx::Connection;

const ROWS: usize = 20_000;
const BATCH: usize = 200;
const RUNS: usize = 5;

fn rows(run: usize, bench: &str) -> Vec<ResultRow> {
    let job = format!("bench-{bench}-{}-{run}", std::process::id());
    (0..ROWS)
        .map(|i| ResultRow {
            job_id: job.clone(),
            image_index: (i / 3) as i64,
            variant: format!("v{}", i % 3),
            vendor_id: "vendor-1".into(),
            record_id: format!("sku-{}", i / 3),
            url: format!("https://cdn.example.com/vendor-1/{job}/{}/v{}.webp", i / 3, i % 3),
            content_type: "image/webp".into(),
            width: 800,
            height: 600,
            bytes: 48_213,
            notes: r#"{"bg_engine":"u2net","face_found":true}"#.into(),
            submitted_ms: 1_700_000_000_000,
            committed_ms: 1_700_000_000_500,
        })
        .collect()
}

/// A scratch database on a server, named after this process.
async fn scratch(server_url: &str) -> Result<(String, String), sqlx::Error> {
    let name = format!("iq_bench_{}", std::process::id());
    let mut c = sqlx::AnyConnection::connect(server_url).await?;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
        .execute(&mut c)
        .await?;
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await?;
    c.close().await?;
    let base = server_url.rsplit_once('/').map_or(server_url, |(b, _)| b);
    Ok((format!("{base}/{name}"), name))
}

async fn drop_scratch(server_url: &str, name: &str) {
    if let Ok(mut c) = sqlx::AnyConnection::connect(server_url).await {
        let force = if server_url.starts_with("postgres") {
            " WITH (FORCE)"
        } else {
            ""
        };
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name}{force}"))
            .execute(&mut c)
            .await;
    }
}

async fn measure(label: &str, url: &str) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let stage = DbCommitConfig {
        batch_size: BATCH,
        ..DbCommitConfig::default()
    }
    .build(url)
    .await?;
    // One unmeasured run to warm caches, connections and prepared statements.
    for chunk in rows(usize::MAX, label).chunks(BATCH) {
        stage.write(chunk).await?;
    }
    let mut rates = Vec::new();
    for run in 0..RUNS {
        let data = rows(run, label);
        let start = Instant::now();
        for chunk in data.chunks(BATCH) {
            stage.write(chunk).await?;
        }
        rates.push(ROWS as f64 / start.elapsed().as_secs_f64());
    }
    stage.pool().close().await;
    Ok(rates)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn report(label: &str, result: Result<Vec<f64>, Box<dyn std::error::Error>>) {
    match result {
        Ok(rates) => {
            let min = rates.iter().cloned().fold(f64::INFINITY, f64::min);
            let max = rates.iter().cloned().fold(0.0, f64::max);
            println!(
                "{label:<10} median {:>9.0} rows/s   (min {min:.0}, max {max:.0}; {RUNS} runs of {ROWS} rows in batches of {BATCH})",
                median(rates)
            );
        }
        Err(e) => println!("{label:<10} not measured: {e}"),
    }
}

#[tokio::main]
async fn main() {
    sqlx::any::install_default_drivers();
    // `cargo bench` passes `--bench`; anything else selects databases.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);

    let servers = [
        (
            "mariadb",
            std::env::var("TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into()),
        ),
        (
            "postgres",
            std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into()),
        ),
    ];
    for (label, server) in servers {
        if !wanted(label) {
            continue;
        }
        debug_assert!(Dialect::of_url(&server).is_ok());
        match scratch(&server).await {
            Ok((url, name)) => {
                report(label, measure(label, &url).await);
                drop_scratch(&server, &name).await;
            }
            Err(e) => report(label, Err(e.into())),
        }
    }
    if wanted("sqlite") {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let url = format!("sqlite://{}/bench.db?mode=rwc", dir.path().display());
        report("sqlite", measure("sqlite", &url).await);
    }
}
