//! Workers as separate processes of the real binary, killed with SIGKILL or
//! stopped with SIGTERM in the middle of their work: nothing is lost and
//! nothing is committed twice.

mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use image_queue_pipeline::redis_server::Fsync;
use image_queue_pipeline::{Operation, StageName};
use tokio::process::{Child, Command};

fn worker(env: &TestEnv, stage: StageName, concurrency: usize) -> Child {
    worker_with(env, stage, concurrency, &[])
}

/// A worker process with extra `IMAGE_QUEUE_*` settings (later ones win).
fn worker_with(env: &TestEnv, stage: StageName, concurrency: usize, settings: &[(&str, &str)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_image-queue"))
        .args([
            "worker",
            "--stage",
            stage.as_str(),
            "--concurrency",
            &concurrency.to_string(),
        ])
        .env("REDIS_URL", env.redis.url())
        .env("DATABASE_URL", env.database_url())
        .env("IMAGE_QUEUE_DATA_DIR", env.dir.path())
        .env("IMAGE_QUEUE_PIPELINE__CLAIM_IDLE_MS", "1500")
        .env("IMAGE_QUEUE_PIPELINE__RECLAIM_EVERY_MS", "200")
        .env("IMAGE_QUEUE_PIPELINE__READ_BLOCK_MS", "200")
        .env("IMAGE_QUEUE_PIPELINE__SHUTDOWN_GRACE_MS", "10000")
        .env("RUST_LOG", "warn")
        .envs(settings.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run the image-queue binary")
}

fn signal(child: &Child, sig: i32) {
    let pid = child.id().expect("child still running") as i32;
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// `XPENDING` summary: count, lowest id, highest id, per-consumer counts.
type PendingSummary = (usize, Option<String>, Option<String>, Option<Vec<(String, String)>>);

/// Entries pending at a stage for the consumer of process `pid`.
async fn pending_of(env: &TestEnv, stage: StageName, pid: u32) -> usize {
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let summary: PendingSummary = redis::cmd("XPENDING")
        .arg(env.pipeline.keys.stream(stage))
        .arg(stage.as_str())
        .query_async(&mut conn)
        .await
        .unwrap();
    let tag = format!("-{pid}-");
    summary
        .3
        .unwrap_or_default()
        .iter()
        .filter(|(name, _)| name.contains(&tag))
        .map(|(_, n)| n.parse::<usize>().unwrap_or(0))
        .sum()
}

async fn wait_until_pending(env: &TestEnv, stage: StageName, pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while pending_of(env, stage, pid).await == 0 {
        assert!(Instant::now() < deadline, "the worker never took work");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn assert_all_committed_once(env: &TestEnv, ids: &[String], images: u32) {
    let views = env.wait_terminal(ids, Duration::from_secs(240)).await;
    for v in &views {
        assert_eq!(v.status, "completed", "{v:?}");
        assert_eq!(v.completed, images, "each image completed exactly once");
    }
    let rows = env.results_rows().await;
    let unique: HashSet<_> = rows.iter().collect();
    assert_eq!(rows.len(), ids.len() * images as usize * 3);
    assert_eq!(unique.len(), rows.len(), "no result committed twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_batch_has_its_entries_reclaimed() {
    let env = TestEnv::start(Fsync::Off).await;
    let mut others: Vec<Child> = [StageName::RateCheck, StageName::Upload, StageName::DbCommit]
        .into_iter()
        .map(|s| worker(&env, s, 4))
        .collect();
    let mut victim = worker(&env, StageName::Resize, 4);
    let mut survivor = worker(&env, StageName::Resize, 2);
    let ids = env.submit("vendor-a", 40, 3, &[Operation::Resize], 900).await;
    let pid = victim.id().unwrap();
    wait_until_pending(&env, StageName::Resize, pid).await;
    signal(&victim, libc::SIGKILL);
    let killed = Instant::now();
    victim.wait().await.unwrap();
    let orphaned = pending_of(&env, StageName::Resize, pid).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while pending_of(&env, StageName::Resize, pid).await > 0 {
        assert!(Instant::now() < deadline, "orphaned entries never reclaimed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reclaimed_after = killed.elapsed();
    assert_all_committed_once(&env, &ids, 3).await;
    println!(
        "kill -9 with {orphaned} entries in flight: reclaimed after {reclaimed_after:.2?} (claim idle 1.5 s), all 120 images done {:.2?} after the kill",
        killed.elapsed()
    );
    survivor.kill().await.ok();
    for c in &mut others {
        c.kill().await.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_load_loses_nothing_and_exits_zero() {
    let env = TestEnv::start(Fsync::Off).await;
    let mut others: Vec<Child> = [StageName::RateCheck, StageName::Upload, StageName::DbCommit]
        .into_iter()
        .map(|s| worker(&env, s, 4))
        .collect();
    let mut resize = worker(&env, StageName::Resize, 3);
    let ids = env.submit("vendor-a", 30, 3, &[Operation::Resize], 900).await;
    wait_until_pending(&env, StageName::Resize, resize.id().unwrap()).await;
    signal(&resize, libc::SIGTERM);
    let status = tokio::time::timeout(Duration::from_secs(30), resize.wait())
        .await
        .expect("the worker stops within its grace period")
        .unwrap();
    assert!(status.success(), "exit status {status:?}");
    // Work continues on a new worker, as in a rolling restart.
    let mut replacement = worker(&env, StageName::Resize, 3);
    assert_all_committed_once(&env, &ids, 3).await;
    replacement.kill().await.ok();
    for c in &mut others {
        c.kill().await.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_whole_pending_list_comes_back_within_the_idle_time() {
    let env = TestEnv::start(Fsync::Off).await;
    // Plain FIFO, so 64 entries can be in one worker's hands at once, and
    // the production reclaim period: what is measured is how many entries
    // a reclaim takes back, not how often it looks.
    let settings = [
        ("IMAGE_QUEUE_PIPELINE__ADMISSION_WINDOW", "0"),
        ("IMAGE_QUEUE_PIPELINE__RECLAIM_EVERY_MS", "2000"),
    ];
    let mut others: Vec<Child> = [StageName::RateCheck, StageName::Upload, StageName::DbCommit]
        .into_iter()
        .map(|s| worker_with(&env, s, 64, &settings))
        .collect();
    // All 64 images wait on resize's stream before the victim starts, so
    // its first read takes them all at once, and each (1200 pixels, 64
    // sharing the cores) takes seconds: it holds all 64 when it dies.
    let ids = env.submit("vendor-a", 32, 2, &[Operation::Resize], 1200).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut conn = crate::common::redis_conn(&env.pipeline).await;
        let queued: usize = redis::cmd("XLEN")
            .arg(env.pipeline.keys.stream(StageName::Resize))
            .query_async(&mut conn)
            .await
            .unwrap();
        if queued == 64 {
            break;
        }
        assert!(Instant::now() < deadline, "rate-check never passed the 64 images on");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    image_queue_pipeline::runner::ensure_group(&env.pipeline, StageName::Resize)
        .await
        .unwrap();
    let mut victim = worker_with(&env, StageName::Resize, 64, &settings);
    let pid = victim.id().unwrap();
    while pending_of(&env, StageName::Resize, pid).await < 64 {
        assert!(Instant::now() < deadline, "the worker never held 64 entries");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The survivor joins with nothing left to read: what it gets is the
    // victim's.
    let mut survivor = worker_with(&env, StageName::Resize, 64, &settings);
    signal(&victim, libc::SIGKILL);
    let killed = Instant::now();
    victim.wait().await.unwrap();
    let orphaned = pending_of(&env, StageName::Resize, pid).await;
    // claim_idle_ms is 1.5 s here; the whole pending list must be back in
    // a live consumer's hands well within 5 s after that.
    let bound = Duration::from_millis(1_500) + Duration::from_secs(5);
    while pending_of(&env, StageName::Resize, pid).await > 0 {
        assert!(
            killed.elapsed() < bound,
            "{} of {orphaned} orphaned entries still not reclaimed {:.1?} after the kill",
            pending_of(&env, StageName::Resize, pid).await,
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let reclaimed_after = killed.elapsed();
    assert_all_committed_once(&env, &ids, 2).await;
    println!(
        "kill -9 with {orphaned} entries in flight: all reclaimed {reclaimed_after:.2?} after the kill (claim idle 1.5 s), all 64 images done {:.2?} after it",
        killed.elapsed()
    );
    survivor.kill().await.ok();
    for c in &mut others {
        c.kill().await.ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_redis_gone_exits_within_the_grace_period() {
    let mut env = TestEnv::start(Fsync::Off).await;
    let settings = [("IMAGE_QUEUE_PIPELINE__SHUTDOWN_GRACE_MS", "3000")];
    let mut resize = worker_with(&env, StageName::Resize, 3, &settings);
    let mut rate_check = worker_with(&env, StageName::RateCheck, 3, &settings);
    env.submit("vendor-a", 10, 3, &[Operation::Resize], 900).await;
    wait_until_pending(&env, StageName::Resize, resize.id().unwrap()).await;
    env.redis.kill().await.unwrap();
    signal(&resize, libc::SIGTERM);
    let stopping = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(60), resize.wait())
        .await
        .expect("the worker exits even with Redis gone")
        .unwrap();
    let took = stopping.elapsed();
    println!("SIGTERM with Redis gone: exited after {took:.2?} (grace 3 s), {status:?}");
    assert!(
        took < Duration::from_secs(3 + 5),
        "took {took:.1?} to exit with a grace period of 3 s"
    );
    rate_check.kill().await.ok();
}
