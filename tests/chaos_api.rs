//! Chaos: the API process killed with SIGKILL every 0.3 to 1 s and
//! restarted, during concurrent multipart submits that each carry an
//! `Idempotency-Key`. A submit answered 2xx must be processed; one that was
//! cut off is retried with the same key once the API is back, and must end
//! up as exactly one job, whether or not the cut-off attempt had made it.

mod chaos;
mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use chaos::*;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_killed_during_submits_makes_one_job_per_key() {
    let cluster = Cluster::new().await;
    let c = &cluster;
    c.start_standard_workers().await;
    c.start_api().await;
    let announcements = Announcements::listen(&c.env).await;
    let load = Load::standard();
    // Eight clients at once, so that kills land mid-request; the API is
    // killed while submits go on, then left to answer the checks.
    let flow = Flow {
        faults_while: FaultsWhile::Submitting,
        ..Flow::standard(8)
    };
    let ran = run(c, flow, |stop| async move {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut kills = 0usize;
        while pause(&stop, Duration::from_millis(rng.random_range(300..1_000))).await {
            // Aim at a request in flight, if one comes within 0.5 s: a kill
            // between requests only tests refused connections.
            for _ in 0..100 {
                if c.in_flight.load(Ordering::SeqCst) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            c.kill_api().await;
            c.start_api().await;
            kills += 1;
        }
        kills
    })
    .await;
    let (accepted, kills) = (ran.accepted, ran.faults);
    let retried = c.retried_submits.load(Ordering::Relaxed);
    let found = c.found_by_retry.load(Ordering::Relaxed);

    // A late retry of every submit names the job its first 2xx named.
    for (j, job) in accepted.iter().enumerate() {
        let (status, again) = c.submit_once(&format!("submit-{j}"), load.images).await.unwrap();
        assert_eq!(status, 200, "a repeated key must answer 200, not make a job");
        assert_eq!(again.as_ref(), Some(job), "key submit-{j} names another job");
    }

    let checked = check_invariants(
        c,
        &accepted,
        load,
        &announcements,
        Announced::ExactlyOnce,
        Duration::from_secs(240),
    )
    .await;
    assert!(kills >= 5, "only {kills} API kills: the submits finished too soon");
    assert!(retried > 0, "no submit was ever cut off: the faults missed");
    println!(
        "{} images in {} jobs, API killed {kills} times, {retried} submit attempts cut off and retried ({found} found the job their cut-off attempt had made), submits done in {:.1?}, all done in {:.1?}; {} result rows, {} objects",
        checked.images,
        checked.jobs,
        ran.submitted,
        ran.flowed,
        checked.rows,
        checked.objects
    );
    c.stop_all().await;
}
