//! The pipeline's delivery guarantees, each against a real redis-server of
//! its own: jobs flow end to end, failures retry with backoff and then
//! dead-letter, a live long handler keeps its claim, trimming spares pending
//! entries, and a Redis killed mid-run loses no accepted job.

mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use image_queue_pipeline::estimate::QuotaConfig;
use image_queue_pipeline::redis_server::Fsync;
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{
    ImageEvent, JobStore, Operation, Outcome, RetryPolicy, RunnerConfig, Stage, StageError, StageName,
};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundred_jobs_of_three_images_complete_each_committed_once() {
    let env = TestEnv::start(Fsync::Off).await;
    let mut finished = env.finished_listener().await;
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(fast_runner(4), shutdown.clone()).await;
    let started = Instant::now();
    let ids = env.submit("vendor-a", 100, 3, &ALL_OPS, 64).await;
    finished.wait(&ids, Duration::from_secs(240)).await;
    let elapsed = started.elapsed();
    let views = env.wait_terminal(&ids, Duration::from_secs(10)).await;
    for v in &views {
        assert_eq!(v.status, "completed", "{v:?}");
        assert_eq!((v.completed, v.failed, v.skipped), (3, 0, 0));
        for img in &v.images {
            assert_eq!(img.outputs.len(), 3, "three variants: {img:?}");
        }
    }
    let rows = env.results_rows().await;
    let unique: HashSet<_> = rows.iter().collect();
    assert_eq!(rows.len(), 100 * 3 * 3, "one row per job, image and variant");
    assert_eq!(unique.len(), rows.len(), "no result committed twice");
    println!(
        "end to end: 300 images in {:.2?}: {:.1} jobs/s, {:.1} images/s",
        elapsed,
        100.0 / elapsed.as_secs_f64(),
        300.0 / elapsed.as_secs_f64()
    );
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}

/// A stage that fails every time, recording when it was called.
struct AlwaysFails {
    calls: Mutex<Vec<Instant>>,
}

#[async_trait]
impl Stage for AlwaysFails {
    fn name(&self) -> StageName {
        StageName::RateCheck
    }

    async fn handle(&self, _event: ImageEvent) -> Result<Outcome, StageError> {
        self.calls.lock().unwrap().push(Instant::now());
        Err(StageError::retryable("the service behind this stage is down"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_handler_is_dead_lettered_after_three_attempts_with_backoff() {
    let env = TestEnv::start(Fsync::Off).await;
    let stage = Arc::new(AlwaysFails {
        calls: Mutex::new(Vec::new()),
    });
    let cfg = image_queue_pipeline::RunnerConfig {
        retry: RetryPolicy {
            max_attempts: 3,
            base_ms: 300,
            factor: 2.0,
            max_ms: 10_000,
            jitter: 0.2,
        },
        ..fast_runner(2)
    };
    let shutdown = CancellationToken::new();
    let runner = StageRunner::new(env.pipeline.clone(), stage.clone(), cfg);
    let task = tokio::spawn(runner.run(shutdown.clone()));
    let mut finished = env.finished_listener().await;
    let ids = env.submit("vendor-a", 1, 1, &[Operation::Resize], 16).await;
    finished.wait(&ids, Duration::from_secs(20)).await;

    let calls = stage.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 3, "exactly three attempts");
    let gaps: Vec<u128> = calls.windows(2).map(|w| (w[1] - w[0]).as_millis()).collect();
    println!("gaps between attempts: {gaps:?} ms (nominal 300, 600 ±20%)");
    assert!((240..=420).contains(&gaps[0]), "first gap {} ms", gaps[0]);
    assert!((480..=780).contains(&gaps[1]), "second gap {} ms", gaps[1]);

    let job = env.jobs.get(None, &ids[0]).await.unwrap().unwrap();
    assert_eq!(job.status, "failed");
    assert_eq!(job.images[0].status, "failed");
    assert_eq!(job.images[0].attempts, 3);
    assert_eq!(
        job.images[0].error.as_deref(),
        Some("the service behind this stage is down")
    );

    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let dead: redis::streams::StreamRangeReply = conn.xrange_all(env.pipeline.keys.dead_letters()).await.unwrap();
    assert_eq!(dead.ids.len(), 1);
    let entry = &dead.ids[0];
    assert_eq!(entry.get::<String>("stage").as_deref(), Some("rate-check"));
    assert_eq!(entry.get::<String>("attempts").as_deref(), Some("3"));
    assert_eq!(entry.get::<String>("job"), Some(ids[0].clone()));
    assert!(entry.get::<String>("failed_ms").is_some());
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

/// A stage whose first call takes several claim-idle periods.
struct SlowOnce {
    calls: AtomicUsize,
    work: Duration,
}

#[async_trait]
impl Stage for SlowOnce {
    fn name(&self) -> StageName {
        StageName::RateCheck
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        // Simulated long work, not synchronisation.
        tokio::time::sleep(self.work).await;
        Ok(Outcome::Done(event))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_handler_that_renews_its_claim_is_not_handed_to_another_consumer() {
    let env = TestEnv::start(Fsync::Off).await;
    let stage = Arc::new(SlowOnce {
        calls: AtomicUsize::new(0),
        work: Duration::from_millis(3_000),
    });
    let cfg = image_queue_pipeline::RunnerConfig {
        claim_idle_ms: 600,
        reclaim_every_ms: 100,
        ..fast_runner(2)
    };
    let shutdown = CancellationToken::new();
    // Two consumers of one stage, both reclaiming eagerly.
    let a = tokio::spawn(StageRunner::new(env.pipeline.clone(), stage.clone(), cfg.clone()).run(shutdown.clone()));
    let b = tokio::spawn(StageRunner::new(env.pipeline.clone(), stage.clone(), cfg).run(shutdown.clone()));
    let ids = env.submit("vendor-a", 1, 2, &[Operation::Resize], 16).await;
    // The events reach the next stage's stream once handled.
    let next = env.pipeline.keys.stream(StageName::Resize);
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let len: usize = conn.xlen(&next).await.unwrap();
        if len == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "events never handed off");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        stage.calls.load(Ordering::SeqCst),
        2,
        "each event handled once, never reclaimed while alive"
    );
    let job = env.jobs.get(None, &ids[0]).await.unwrap().unwrap();
    assert!(job.images.iter().all(|i| i.stage == "resize"));
    shutdown.cancel();
    a.await.unwrap().unwrap();
    b.await.unwrap().unwrap();
}

#[tokio::test]
async fn trimming_never_removes_a_pending_or_undelivered_entry() {
    let env = TestEnv::start(Fsync::Off).await;
    let p = &env.pipeline;
    let stream = p.keys.stream(StageName::Resize);
    image_queue_pipeline::runner::ensure_group(p, StageName::Resize)
        .await
        .unwrap();
    let mut conn = crate::common::redis_conn(p).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let id: String = conn.xadd(&stream, "*", &[("e", i.to_string())]).await.unwrap();
        ids.push(id);
    }
    // Deliver the first six; acknowledge 0, 1, 2 and 4; 3 and 5 stay pending;
    // 6..9 are undelivered.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("resize")
        .arg("c1")
        .arg("COUNT")
        .arg(6)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: i64 = conn
        .xack(&stream, "resize", &[&ids[0], &ids[1], &ids[2], &ids[4]])
        .await
        .unwrap();
    let trim = image_queue_pipeline::scripts::TrimAcknowledged {
        stage: StageName::Resize,
    };
    let trimmed = trim.run(p).await.unwrap();
    assert_eq!(trimmed, 3, "entries below the oldest pending one go");
    let left: redis::streams::StreamRangeReply = conn.xrange_all(&stream).await.unwrap();
    let left: Vec<&str> = left.ids.iter().map(|e| e.id.as_str()).collect();
    for keep in [3, 5, 6, 7, 8, 9] {
        assert!(left.contains(&ids[keep].as_str()), "entry {keep} must survive");
    }
    // Once everything is acknowledged, only undelivered entries remain.
    let _: i64 = conn.xack(&stream, "resize", &[&ids[3], &ids[5]]).await.unwrap();
    trim.run(p).await.unwrap();
    let left: redis::streams::StreamRangeReply = conn.xrange_all(&stream).await.unwrap();
    assert_eq!(left.ids.len(), 4);
    assert_eq!(left.ids[0].id, ids[6]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_loses_no_accepted_job() {
    let mut env = TestEnv::start(Fsync::Always).await;
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(fast_runner(4), shutdown.clone()).await;
    let ids = env.submit("vendor-a", 60, 2, &[Operation::Resize], 48).await;
    // Kill Redis once some work is done and much is not.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let done = env
            .jobs
            .get(None, &ids[ids.len() / 3])
            .await
            .ok()
            .flatten()
            .map(|v| v.completed)
            .unwrap_or(0);
        let any_done = env.jobs.get(None, &ids[0]).await.unwrap().unwrap().completed > 0;
        if any_done || done > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no progress before the kill");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.redis.kill().await.unwrap();
    let killed = Instant::now();
    env.redis.restart().await.unwrap();
    let views = env.wait_terminal(&ids, Duration::from_secs(120)).await;
    println!("all jobs terminal {:.2?} after the kill", killed.elapsed());
    for v in &views {
        assert_eq!(v.status, "completed", "{v:?}");
        assert_eq!(v.completed, 2);
    }
    let rows = env.results_rows().await;
    let unique: HashSet<_> = rows.iter().collect();
    assert_eq!(rows.len(), 60 * 2 * 3);
    assert_eq!(unique.len(), rows.len());
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}

/// A stage that does nothing but take `work` per image.
struct Noop {
    name: StageName,
    work: Duration,
}

#[async_trait]
impl Stage for Noop {
    fn name(&self) -> StageName {
        self.name
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        if !self.work.is_zero() {
            // Simulated image work, not synchronisation.
            tokio::time::sleep(self.work).await;
        }
        Ok(Outcome::Done(event))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_event_the_finishing_script_refuses_does_not_hold_up_its_batch() {
    let env = TestEnv::start(Fsync::Off).await;
    let mut finished = env.finished_listener().await;
    let mut ids = env.submit("vendor-a", 20, 1, &[Operation::Resize], 8).await;
    // One job's record is not a hash any more: every step on its image
    // fails in Redis (WRONGTYPE), whatever batch it lands in.
    let broken = ids.remove(7);
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let key = env.pipeline.keys.job(&broken);
    let _: () = conn.del(&key).await.unwrap();
    let _: () = conn.set(&key, "not a job").await.unwrap();
    // Nothing failed is reclaimed within the test: what finishes, finishes
    // on its first delivery.
    let cfg = image_queue_pipeline::RunnerConfig {
        claim_idle_ms: 120_000,
        ..fast_runner(32)
    };
    let shutdown = CancellationToken::new();
    let mut stages = run_noop_pipeline(&env, cfg, Duration::ZERO, &shutdown).await;
    // The other 19 were read and finished together with it, and finish.
    finished.wait(&ids, Duration::from_secs(20)).await;
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}

/// Images of these jobs done so far.
async fn images_done(env: &TestEnv, jobs: &[String]) -> u32 {
    let mut done = 0;
    for id in jobs {
        done += env.jobs.get(None, id).await.unwrap().unwrap().completed;
    }
    done
}

async fn run_noop_pipeline(
    env: &TestEnv,
    cfg: image_queue_pipeline::RunnerConfig,
    resize_work: Duration,
    shutdown: &CancellationToken,
) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for name in [
        StageName::RateCheck,
        StageName::Resize,
        StageName::Upload,
        StageName::DbCommit,
    ] {
        let work = if name == StageName::Resize {
            resize_work
        } else {
            Duration::ZERO
        };
        let runner = StageRunner::new(env.pipeline.clone(), Arc::new(Noop { name, work }), cfg.clone());
        let s = shutdown.clone();
        set.spawn(async move { runner.run(s).await.unwrap() });
    }
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vendors_single_image_is_not_buried_under_another_vendors_backlog() {
    let env = TestEnv::start(Fsync::Off).await;
    let cfg = image_queue_pipeline::RunnerConfig {
        admission_window: 8,
        ..fast_runner(4)
    };
    let shutdown = CancellationToken::new();
    let mut stages = run_noop_pipeline(&env, cfg, Duration::from_millis(25), &shutdown).await;
    let mut finished = env.finished_listener().await;

    // B alone.
    let started = Instant::now();
    let b_alone = env.submit("vendor-b", 1, 1, &[Operation::Resize], 8).await;
    finished.wait(&b_alone, Duration::from_secs(30)).await;
    let alone = started.elapsed();

    // A's backlog of 2,000 images, then B's one image. A's first images
    // are done while the rest are still being submitted: count from B's
    // submit on.
    let a = env.submit("vendor-a", 20, 100, &[Operation::Resize], 8).await;
    let a_done_before = images_done(&env, &a).await;
    let started = Instant::now();
    let b = env.submit("vendor-b", 1, 1, &[Operation::Resize], 8).await;
    // What a submit would be told now: B's next image waits for none of
    // A's, at half the pipeline; A's next waits for its whole backlog.
    let estimator = JobStore::new(env.pipeline.clone(), 3600).with_scheduling(QuotaConfig::default(), 8);
    let ops = ["resize".to_string()];
    let est_b = estimator
        .estimate_start("vendor-b", &ops)
        .await
        .unwrap()
        .expect("throughput measured");
    let est_a = estimator
        .estimate_start("vendor-a", &ops)
        .await
        .unwrap()
        .expect("throughput measured");
    finished.wait(&b, Duration::from_secs(60)).await;
    let behind = started.elapsed();
    println!("estimates under A's backlog: B {est_b:?}, A {est_a:?}");
    assert!(est_b.queued_ahead <= 1 && est_b.share == 0.5, "{est_b:?}");
    assert!(est_a.queued_ahead > 100, "{est_a:?}");
    assert!(est_a.start_ms > est_b.start_ms + 1_000, "A {est_a:?} vs B {est_b:?}");
    let a_done = images_done(&env, &a).await;
    println!(
        "fairness: B alone {alone:.2?}, B behind A's 2,000 images {behind:.2?} ({:.1}x); A had {a_done_before} of 2,000 done at B's submit, {a_done} at its end",
        behind.as_secs_f64() / alone.as_secs_f64()
    );
    // On a FIFO, B would finish after all of A's images queued before it.
    let waiting = 2_000 - a_done_before;
    assert!(
        waiting > 200,
        "A's backlog was nearly done by the time it was submitted ({a_done_before} done): the machine is too slow for this test"
    );
    assert!(
        a_done - a_done_before < waiting / 2,
        "B waited for A's backlog: {} of A's {waiting} queued images were done before B's one",
        a_done - a_done_before
    );
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn images_over_a_vendors_quota_are_deferred_then_resume_by_themselves() {
    let env = TestEnv::start(Fsync::Off).await;
    let mut quotas = std::collections::BTreeMap::new();
    quotas.insert("resize".to_string(), 3);
    let cfg = image_queue_pipeline::RunnerConfig {
        quotas,
        quota_window_ms: 1_500,
        ..fast_runner(4)
    };
    let shutdown = CancellationToken::new();
    let mut stages = run_noop_pipeline(&env, cfg, Duration::ZERO, &shutdown).await;
    let mut progress = env
        .pipeline
        .subscribe(&[env.pipeline.keys.progress_channel()])
        .await
        .unwrap();
    let mut finished = env.finished_listener().await;
    let started = Instant::now();
    let ids = env.submit("vendor-a", 1, 5, &[Operation::Resize], 8).await;

    // Two of the five wait for the quota; the job says so, with when.
    let mut messages = progress.on_message();
    let mut throttled = 0;
    while throttled < 2 {
        let msg = tokio::time::timeout(Duration::from_secs(10), futures::StreamExt::next(&mut messages))
            .await
            .expect("no throttling announced")
            .unwrap();
        let p: serde_json::Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
        if p["status"] == "throttled" {
            throttled += 1;
        }
    }
    // The three within the quota finish first: until then the window is
    // full and, with no rate measured yet, no start could be promised.
    let deadline = Instant::now() + Duration::from_secs(10);
    let job = loop {
        let job = env.jobs.get(None, &ids[0]).await.unwrap().unwrap();
        if job.completed == 3 {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "the images within the quota never completed: {job:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let waiting: Vec<_> = job.images.iter().filter(|i| i.status == "throttled").collect();
    assert!(!waiting.is_empty(), "{job:?}");
    assert!(waiting.iter().all(|i| i.resume_at_ms.is_some() && i.attempts == 0));
    // A new job of the vendor's would wait for the quota, and is told so.
    let estimator = JobStore::new(env.pipeline.clone(), 3600).with_scheduling(
        QuotaConfig {
            limits: [("resize".to_string(), 3)].into(),
            window_ms: 1_500,
        },
        0,
    );
    let est = estimator
        .estimate_start("vendor-a", &["resize".to_string()])
        .await
        .unwrap()
        .expect("nothing queued ahead");
    let resumes = est.quota_resumes_ms.expect("the quota decides");
    assert_eq!(est.start_ms, resumes);
    assert!(resumes > image_queue_pipeline::now_ms(), "{est:?}");

    finished.wait(&ids, Duration::from_secs(20)).await;
    let elapsed = started.elapsed();
    let job = env.jobs.get(None, &ids[0]).await.unwrap().unwrap();
    assert_eq!(job.status, "completed");
    assert_eq!(job.completed, 5);
    assert!(
        elapsed >= Duration::from_millis(1_400),
        "the quota window was not waited for: {elapsed:?}"
    );
    println!("quota of 3 per 1.5 s: 5 images done in {elapsed:.2?}");
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}

/// After a failover the new primary may redo a step the old one had
/// finished: with `blob_linger_ms`, a completed job's blobs are deleted
/// only that long after its end, by rate-check, not at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_jobs_blobs_linger_before_they_are_deleted() {
    let env = TestEnv::start(Fsync::Off).await;
    let cfg = RunnerConfig {
        blob_linger_ms: 1_500,
        ..fast_runner(2)
    };
    let mut finished = env.finished_listener().await;
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(cfg, shutdown.clone()).await;
    let ids = env.submit("vendor-a", 1, 2, &[Operation::Resize], 64).await;
    finished.wait(&ids, Duration::from_secs(60)).await;
    let job = &ids[0];
    let blob_dir = env.dir.path().join("blobs").join(job);
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let deletions = env.pipeline.keys.blob_deletions();
    // Its deletion is scheduled (right after its end is recorded) while
    // its blobs are still there.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let due: Option<f64> = redis::cmd("ZSCORE")
            .arg(&deletions)
            .arg(job)
            .query_async(&mut conn)
            .await
            .unwrap();
        if due.is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "the job's blob deletion was never scheduled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(blob_dir.is_dir(), "the blobs went at once, with a linger set");
    // Then they go, and so does the schedule.
    let deadline = Instant::now() + Duration::from_secs(15);
    while blob_dir.exists() {
        assert!(Instant::now() < deadline, "the blobs outlived their linger by far");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let left: u64 = redis::cmd("ZCARD")
        .arg(&deletions)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0);
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}

/// The tests run every script with key tracking (`TestEnv`): a script
/// that names a key its caller did not pass, such as one it builds from
/// another, fails, so every key stays declared (what a Redis Cluster
/// needs).
#[tokio::test]
async fn key_tracking_fails_a_script_that_builds_a_key() {
    use image_queue_pipeline::scripts::tracking_keys;
    let env = TestEnv::start(Fsync::Off).await;
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let derived = tracking_keys("return redis.call('GET', KEYS[1] .. ':derived')");
    let err = derived
        .key("{iq}:a")
        .invoke_async::<Option<String>>(&mut conn)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("key tracking"), "{err}");
    let declared = tracking_keys("redis.call('SET', KEYS[1], 'x'); return redis.call('GET', KEYS[1])");
    let ok: Option<String> = declared.key("{iq}:a").invoke_async(&mut conn).await.unwrap();
    assert_eq!(ok.as_deref(), Some("x"));
}
