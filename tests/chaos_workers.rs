//! Chaos: worker processes killed with SIGKILL, one at random every one to
//! two seconds and restarted at once, while at least a thousand images
//! flow through the API and every stage. Their in-flight entries must be
//! reclaimed and finished by the others without any job ending twice, any
//! result being committed twice or any object being uploaded twice.

mod chaos;
mod common;

use std::time::Duration;

use chaos::*;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_killed_at_random_lose_and_duplicate_nothing() {
    let cluster = Cluster::new().await;
    let c = &cluster;
    c.start_standard_workers().await;
    c.start_api().await;
    let announcements = Announcements::listen(&c.env).await;
    let load = Load::standard();
    let ran = run(c, Flow::standard(4), |stop| async move {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let (mut kills, mut orphaned) = (0usize, 0usize);
        while pause(&stop, Duration::from_millis(rng.random_range(1_000..2_000))).await {
            let (_, n) = c.kill_random_worker(&mut rng).await;
            kills += 1;
            orphaned += n;
        }
        (kills, orphaned)
    })
    .await;
    let (accepted, (kills, orphaned), flowed) = (ran.accepted, ran.faults, ran.flowed);

    let checked = check_invariants(
        c,
        &accepted,
        load,
        &announcements,
        Announced::ExactlyOnce,
        Duration::from_secs(60),
    )
    .await;
    // The suite must have done what it says: faults while work flowed.
    assert!(kills >= 5, "only {kills} workers killed: the load finished too soon");
    println!(
        "{} images in {} jobs, {kills} workers killed with {orphaned} entries in flight, all done in {flowed:.1?}; {} result rows, {} objects",
        checked.images, checked.jobs, checked.rows, checked.objects
    );
    c.stop_all().await;
}
