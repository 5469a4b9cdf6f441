//! Chaos: `redis-server` killed with SIGKILL every one to two seconds and
//! restarted on its data directory, with `appendfsync always`, while at
//! least a thousand images flow through the API and every stage. Whatever
//! Redis acknowledged must survive the kill: every accepted job ends
//! exactly once, with nothing committed or uploaded twice, and every worker
//! rides the outages out instead of exiting. The same faults with
//! `appendfsync everysec` measure what that setting loses to a process
//! kill.

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
        // A connection of its own each time: Redis may be restarting.
        let info: redis::RedisResult<String> = match env.pipeline.endpoint.connect(Some(Duration::from_secs(2))).await {
            Ok(mut conn) => redis::cmd("INFO").arg("server").query_async(&mut conn).await,
            Err(e) => Err(e),
        };
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
async fn kill_and_restart(env: &TestEnv, fsync: Fsync) -> RedisServer {
    let pid = redis_pid(env).await;
    // SAFETY: signalling a redis-server this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Until the dead server's port is free again.
        match RedisServer::start_on(env.redis.dir(), env.redis.port(), fsync).await {
            Ok(server) => return server,
            Err(e) => assert!(Instant::now() < deadline, "redis-server did not restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Run {
    accepted: Vec<String>,
    /// Accepted jobs whose record Redis no longer has.
    forgotten: Vec<String>,
    kills: usize,
    retried: usize,
    flowed: Duration,
    checked: Checked,
}

/// Kills Redis every one to two seconds while a load flows, then checks
/// the invariants on the jobs Redis still knows.
async fn kill_redis_under_load(fsync: Fsync) -> Run {
    let cluster = Cluster::with_fsync(fsync).await;
    let c = &cluster;
    c.start_standard_workers().await;
    c.start_api().await;
    let announcements = Announcements::listen(&c.env).await;
    let load = Load::standard();
    let flow = Flow {
        forgotten_jobs_end: true,
        ..Flow::standard(4)
    };
    let ran = run(c, flow, |stop| async move {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut kills = 0usize;
        // The latest restarted server; dropping it would stop it.
        let mut current = None;
        while pause(&stop, Duration::from_millis(rng.random_range(1_000..2_000))).await {
            current = Some(kill_and_restart(&c.env, fsync).await);
            kills += 1;
            c.assert_workers_alive().await;
        }
        (kills, current)
    })
    .await;
    let (accepted, forgotten, (kills, _current), flowed) = (ran.accepted, ran.forgotten, ran.faults, ran.flowed);

    c.assert_workers_alive().await;
    let survivors: Vec<String> = accepted.iter().filter(|j| !forgotten.contains(j)).cloned().collect();
    let checked = check_invariants_sparing(
        c,
        &survivors,
        &forgotten,
        load,
        &announcements,
        Announced::AtMostOnce,
        Duration::from_secs(60),
    )
    .await;
    assert!(kills >= 5, "only {kills} Redis kills: the load finished too soon");
    c.stop_all().await;
    Run {
        accepted,
        forgotten,
        kills,
        retried: c.retried_submits.load(std::sync::atomic::Ordering::Relaxed),
        flowed,
        checked,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_repeatedly_with_fsync_always_loses_nothing() {
    let r = kill_redis_under_load(Fsync::Always).await;
    assert!(r.forgotten.is_empty(), "acknowledged jobs lost: {:?}", r.forgotten);
    println!(
        "appendfsync always: {} images in {} jobs, redis-server killed {} times, {} submit attempts refused and retried, all done in {:.1?}; {} result rows, {} objects",
        r.checked.images, r.checked.jobs, r.kills, r.retried, r.flowed, r.checked.rows, r.checked.objects
    );
}

/// With `everysec` Redis normally writes the append-only file before it
/// answers but syncs it only once a second: a killed process loses nothing
/// the kernel already holds, while an OS crash or power cut (which this
/// test cannot inject) loses up to the last second or two, as does a kill
/// while a slow disk has Redis postponing its writes. This measures what
/// process kills lose, for docs/OPERATIONS.md, and asserts only that the
/// jobs Redis still knows end exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_repeatedly_with_fsync_everysec_measured() {
    let r = kill_redis_under_load(Fsync::EverySec).await;
    println!(
        "appendfsync everysec: {} of {} acknowledged submits lost over {} kills of redis-server ({} result rows and {} objects of lost jobs left behind); {} images of the rest all done in {:.1?}",
        r.forgotten.len(),
        r.accepted.len(),
        r.kills,
        r.checked.orphan_rows,
        r.checked.orphan_objects,
        r.checked.images,
        r.flowed
    );
}
