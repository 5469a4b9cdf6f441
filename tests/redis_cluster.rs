//! Redis Cluster: the pipeline on a three-master cluster reached through a
//! `redis+cluster://` URL. All of its keys share one hash tag, so they live
//! in one slot; that slot is migrated to another master (IMPORTING,
//! MIGRATING, MIGRATE, SETSLOT NODE, as `redis-cli --cluster reshard`
//! does) while 500 images flow, and every stage follows MOVED and ASK by
//! itself: nothing is restarted, every job completes once.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::ha::LocalCluster;
use common::{fast_runner, TestEnv, ALL_OPS};
use image_queue_pipeline::Operation;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pipeline_runs_on_a_cluster_and_follows_its_slot_to_another_master() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut cluster = LocalCluster::start(&dir.path().join("redis")).await;
    let url = cluster.url();
    let env = TestEnv::connect(dir, cluster.take_server(), &url).await;
    // `{iq}:…` keys hash by their tag.
    let slot = cluster.slot_of("iq").await;

    let mut finished = env.finished_listener().await;
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(fast_runner(4), shutdown.clone()).await;

    // Every operation, submitted without an Idempotency-Key (the submit
    // script then takes three keys, all in the pipeline's slot).
    let first = env.submit("vendor-a", 1, 2, &ALL_OPS, 64).await;
    finished.wait(&first, Duration::from_secs(120)).await;
    for v in env.wait_terminal(&first, Duration::from_secs(10)).await {
        assert_eq!(v.status, "completed", "{v:#?}");
        assert_eq!((v.completed, v.failed), (2, 0));
    }

    // 500 images: half submitted before the migration starts, half while
    // it runs.
    let from = cluster.owner_of(slot).await;
    let to = (from + 1) % cluster.ports.len();
    let mut flowing = env.submit("vendor-b", 25, 10, &[Operation::Resize], 32).await;
    let (during, moved) = tokio::join!(
        env.submit("vendor-b", 25, 10, &[Operation::Resize], 32),
        cluster.migrate_slot(slot, to)
    );
    flowing.extend(during);
    assert_eq!(cluster.owner_of(slot).await, to, "the slot moved");
    finished.wait(&flowing, Duration::from_secs(180)).await;
    for v in env.wait_terminal(&flowing, Duration::from_secs(10)).await {
        assert_eq!(v.status, "completed", "{v:#?}");
        assert_eq!((v.completed, v.failed), (10, 0));
    }
    assert!(
        stages.try_join_next().is_none(),
        "a stage runner stopped while the slot moved"
    );

    // A submit after the move, and its result.
    let after = env.submit("vendor-a", 1, 1, &[Operation::Resize], 32).await;
    finished.wait(&after, Duration::from_secs(60)).await;

    let rows = env.results_rows().await;
    let unique: HashSet<_> = rows.iter().collect();
    assert_eq!(unique.len(), rows.len(), "no result committed twice");
    assert_eq!(rows.len(), (2 + 500 + 1) * 3, "one row per image and variant");
    println!(
        "cluster: slot {slot} moved from master {from} to {to} with {moved} keys while 500 images flowed; all completed, no stage restarted"
    );
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}
