//! Chaos: `redis-server` killed with SIGKILL every one to two seconds and
//! restarted on its data directory, with `appendfsync always`, while at
//! least a thousand images flow through the API and every stage. Whatever
//! Redis acknowledged must survive the kill: every accepted job ends
//! exactly once, with nothing committed or uploaded twice, and every worker
//! rides the outages out instead of exiting.

mod chaos;
mod common;

use std::time::{Duration, Instant};

use chaos::*;
use common::TestEnv;
use image_queue_pipeline::redis_server::{Fsync, RedisServer};
use rand::{Rng, SeedableRng};

/// The pid of the Redis the test's connection is talking to.
async fn redis_pid(env: &TestEnv) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut conn = env.pipeline.conn.clone();
        let info: redis::RedisResult<String> = redis::cmd("INFO").arg("server").query_async(&mut conn).await;
        if let Ok(info) = info {
            if let Some(pid) = info.lines().find_map(|l| l.strip_prefix("process_id:")) {
                return pid.trim().parse().unwrap();
            }
        }
        assert!(Instant::now() < deadline, "redis never answered INFO after a restart");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// SIGKILLs the running Redis and starts a new one on the same port and
/// data directory, which replays its append-only file.
async fn kill_and_restart(env: &TestEnv) -> RedisServer {
    let pid = redis_pid(env).await;
    // SAFETY: signalling a redis-server this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Until the dead server's port is free again.
        match RedisServer::start_on(env.redis.dir(), env.redis.port(), Fsync::Always).await {
            Ok(server) => return server,
            Err(e) => assert!(Instant::now() < deadline, "redis-server did not restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_repeatedly_with_fsync_always_loses_nothing() {
    let cluster = Cluster::new().await;
    let c = &cluster;
    c.start_standard_workers().await;
    c.start_api().await;
    let announcements = Announcements::listen(&c.env).await;
    let load = Load::standard();
    let spread = Duration::from_secs(if heavy() { 60 } else { 15 });
    let started = Instant::now();

    let (accepted, (kills, _current)) = with_faults(
        async move {
            let ids = c.submit_load(load, 4, spread).await;
            wait_terminal(c, &ids, Duration::from_secs(240)).await;
            ids
        },
        |stop| async move {
            let mut rng = rand::rngs::StdRng::from_os_rng();
            let mut kills = 0usize;
            // The latest restarted server; dropping it would stop it.
            let mut current = None;
            loop {
                let pause = Duration::from_millis(rng.random_range(1_000..2_000));
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(pause) => {}
                }
                current = Some(kill_and_restart(&c.env).await);
                kills += 1;
                c.assert_workers_alive().await;
            }
            (kills, current)
        },
    )
    .await;
    let flowed = started.elapsed();

    c.assert_workers_alive().await;
    let checked = check_invariants(
        c,
        &accepted,
        load,
        &announcements,
        Announced::AtMostOnce,
        Duration::from_secs(60),
    )
    .await;
    assert!(kills >= 5, "only {kills} Redis kills: the load finished too soon");
    let retried = c.retried_submits.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "{} images in {} jobs, redis-server killed {kills} times, {retried} submit attempts refused and retried, all done in {flowed:.1?}; {} result rows, {} objects",
        checked.images, checked.jobs, checked.rows, checked.objects
    );
    c.stop_all().await;
}
