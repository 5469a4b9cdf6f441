//! Chaos: Redis failover under Sentinel. A primary, a replica and three
//! Sentinels (quorum 2); the API and every worker are separate processes
//! given only the `redis+sentinel://` URL; a thousand images flow through
//! the API and every operation (bg-removal, face-crop, resize) while the
//! primary is SIGKILLed three times, each time restarted as a replica of
//! the node the Sentinels promoted. Submits wait for one replica (`redis.min_replicas = 1`), so a
//! 202 survives the failover: every accepted job ends exactly once with its
//! results, none is unknown (404), no row or object is written twice and
//! nothing is left pending. Every process follows the new primary by itself;
//! none is restarted.

mod chaos;
mod common;

use std::time::{Duration, Instant};

use chaos::*;
use common::ha::SentinelSet;
use common::TestEnv;
use image_queue_pipeline::redis_server::Fsync;
use image_queue_pipeline::StageName;

/// How long a Sentinel waits before it calls an unanswering primary down.
const DOWN_AFTER_MS: u64 = 1_000;
const KILLS: usize = 3;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_killed_three_times_under_sentinel_loses_no_accepted_job() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut set = SentinelSet::start(&dir.path().join("redis"), Fsync::EverySec, DOWN_AFTER_MS).await;
    let url = set.url();
    let env = TestEnv::connect(dir, set.take_sentinel(), &url).await;
    let mut cluster = Cluster::on(env, url).await;
    // Every operation: bg-removal (the border-key engine a worker without
    // a model runs), face-crop (no face: kept whole) and resize.
    cluster.operations = "bg-removal,face-crop,resize";
    cluster.extra_env = vec![
        // A 202 only once a replica holds the job.
        ("IMAGE_QUEUE_REDIS__MIN_REPLICAS".into(), "1".into()),
        ("IMAGE_QUEUE_REDIS__WAIT_TIMEOUT_MS".into(), "1000".into()),
        // A step the new primary redoes still finds its blobs.
        ("IMAGE_QUEUE_PIPELINE__BLOB_LINGER_MS".into(), "60000".into()),
    ];
    let c = &cluster;
    c.start_workers(&[
        (StageName::RateCheck, 4),
        (StageName::BgRemoval, 2),
        (StageName::FaceCrop, 2),
        (StageName::Resize, 2),
        (StageName::Resize, 2),
        (StageName::Upload, 4),
        (StageName::DbCommit, 1),
    ])
    .await;
    c.start_api().await;
    let announcements = Announcements::listen(&c.env).await;
    let load = Load::standard();
    let flow = Flow {
        spread: Duration::from_secs(30),
        ..Flow::standard(4)
    };
    let (set, ann) = (&mut set, &announcements);
    // A fixed number of kills, each once work is in flight on every stage.
    let ran = run(c, flow, move |_stop| async move {
        let announcements = ann;
        let mut failovers = Vec::new();
        let probes = std::sync::Mutex::new(Vec::new());
        for _ in 0..KILLS {
            // Work in flight on every stage before each kill.
            tokio::time::sleep(Duration::from_secs(3)).await;
            let done_before = announcements.snapshot().len();
            let old = set.kill_primary().await;
            let killed = Instant::now();
            // While the Sentinels promote the replica and the killed node
            // comes back as the new primary's replica: how long a fresh
            // submit is refused, and how long until a job completes.
            let (promoted, (unavailable, first_completed)) = tokio::join!(
                async {
                    let new = set.await_promotion(old).await;
                    let promoted = killed.elapsed();
                    set.rejoin(old, new).await;
                    promoted
                },
                async {
                    let unavailable = async {
                        // One key per failover: a refused attempt's job is
                        // the one its retry gets, as for any client.
                        let key = format!("probe-{}", failovers.len());
                        loop {
                            if let Ok((s, Some(job))) = c.submit_once(&key, load.images).await {
                                if (200..300).contains(&s) {
                                    probes.lock().unwrap().push(job);
                                    return killed.elapsed();
                                }
                            }
                            assert!(
                                killed.elapsed() < Duration::from_secs(60),
                                "submits refused for a minute"
                            );
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    };
                    let first_completed = async {
                        while announcements.snapshot().len() <= done_before {
                            assert!(
                                killed.elapsed() < Duration::from_secs(60),
                                "no job completed for a minute"
                            );
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        killed.elapsed()
                    };
                    tokio::join!(unavailable, first_completed)
                }
            );
            failovers.push((promoted, unavailable, first_completed));
        }
        (failovers, probes.into_inner().unwrap())
    })
    .await;
    let (mut accepted, (failovers, probes), flowed) = (ran.accepted, ran.faults, ran.flowed);
    accepted.extend(probes);
    c.assert_workers_alive().await;
    let checked = check_invariants(
        c,
        &accepted,
        load,
        &announcements,
        // A finish the new primary redoes may be announced again.
        Announced::AtMostOnce,
        Duration::from_secs(180),
    )
    .await;
    c.assert_workers_alive().await;
    for (i, (promoted, unavailable, first)) in failovers.iter().enumerate() {
        println!(
            "failover {}: replica promoted {promoted:.1?} after the kill; submits refused for {unavailable:.1?}; first job completed {first:.1?} after the kill",
            i + 1
        );
    }
    println!(
        "sentinel failover: {} kills of the primary; {} images in {} jobs all done in {flowed:.1?}; {} submit attempts refused and retried ({} found by their retry); {} result rows, {} objects",
        failovers.len(),
        checked.images,
        checked.jobs,
        c.retried_submits.load(std::sync::atomic::Ordering::Relaxed),
        c.found_by_retry.load(std::sync::atomic::Ordering::Relaxed),
        checked.rows,
        checked.objects
    );
    c.stop_all().await;
}
