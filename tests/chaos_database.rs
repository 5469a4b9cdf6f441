//! Chaos: the results database (a private MariaDB server) stopped for 20 s
//! while at least a thousand images flow (and again every 3 s while work
//! is left, with `CHAOS_HEAVY=1`). db-commit must hold its batches
//! unacknowledged through the outage and commit them once the server is
//! back: every accepted job ends exactly once, completed, with nothing
//! committed or uploaded twice and nothing dead-lettered.

mod chaos;
mod common;
// The stages' tests' private mariadbd, which can be stopped and started
// again on the same data directory and port.
#[path = "../stages/tests/common/mod.rs"]
mod mariadb;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaos::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_of_20_s_loses_and_duplicates_nothing() {
    let db = tokio::task::spawn_blocking(|| mariadb::PrivateMariaDb::start("64M"))
        .await
        .unwrap();
    db.create_test_db().await;
    let db = Arc::new(Mutex::new(db));
    let mut cluster = Cluster::new().await;
    cluster.database_url = db.lock().unwrap().url();
    let c = &cluster;
    c.start_standard_workers().await;
    c.start_api().await;
    let announcements = Announcements::listen(&c.env).await;
    let load = Load::standard();
    let outage = Duration::from_secs(20);
    let ran = run(c, Flow::standard(4), |stop| {
        let db = db.clone();
        async move {
            let (mut outages, mut down_for) = (0usize, Duration::ZERO);
            // Once results are flowing; heavy runs do it again for as
            // long as work is left.
            while (outages == 0 || heavy()) && pause(&stop, Duration::from_secs(3)).await {
                let d = db.clone();
                tokio::task::spawn_blocking(move || d.lock().unwrap().stop())
                    .await
                    .unwrap();
                let down = Instant::now();
                tokio::time::sleep(outage).await;
                let d = db.clone();
                tokio::task::spawn_blocking(move || d.lock().unwrap().restart())
                    .await
                    .unwrap();
                outages += 1;
                down_for += down.elapsed();
                c.assert_workers_alive().await;
            }
            (outages, down_for)
        }
    })
    .await;
    let (accepted, (outages, down_for), flowed) = (ran.accepted, ran.faults, ran.flowed);

    c.assert_workers_alive().await;
    let checked = check_invariants(
        c,
        &accepted,
        load,
        &announcements,
        Announced::ExactlyOnce,
        Duration::from_secs(60),
    )
    .await;
    assert!(outages >= 1, "the database was never stopped");
    println!(
        "{} images in {} jobs, the database stopped {outages} times ({down_for:.1?} down in all), all done in {flowed:.1?}; {} result rows, {} objects",
        checked.images, checked.jobs, checked.rows, checked.objects
    );
    c.stop_all().await;
}
