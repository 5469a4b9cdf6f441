//! Fair admission's bookkeeping, against a real redis-server: every image
//! that took an admission slot gives it back however its time in the
//! pipeline ends, a drifted counter is repaired from the true count, and
//! thousands of waiting vendors do not stop admission.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::*;
use image_queue_pipeline::admission::{self, Reconciled};
use image_queue_pipeline::redis_server::Fsync;
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{ImageEvent, Operation, Outcome, Pipeline, Stage, StageError, StageName};
use redis::AsyncCommands;
use tokio_util::sync::CancellationToken;

/// Passes every event on untouched (rate-check, upload, db-commit here).
struct PassOn(StageName);

#[async_trait]
impl Stage for PassOn {
    fn name(&self) -> StageName {
        self.0
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        Ok(Outcome::Done(event))
    }
}

/// A resize stage during whose work the job's record disappears (as when
/// it expires): the image then hands off, or fails retryably when `fail`.
struct RecordVanishes {
    p: Pipeline,
    fail: AtomicBool,
    /// The admission counter as it read during the work, once per image.
    handled: tokio::sync::mpsc::UnboundedSender<i64>,
}

#[async_trait]
impl Stage for RecordVanishes {
    fn name(&self) -> StageName {
        StageName::Resize
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        let mut conn = crate::common::redis_conn(&self.p).await;
        let _: () = conn.del(self.p.keys.job(&event.job)).await.unwrap();
        self.handled.send(admitted(&self.p).await).unwrap();
        if self.fail.load(Ordering::SeqCst) {
            Err(StageError::retryable("the service behind this stage is down"))
        } else {
            Ok(Outcome::Done(event))
        }
    }
}

async fn admitted(p: &Pipeline) -> i64 {
    let mut conn = crate::common::redis_conn(p).await;
    let n: Option<i64> = conn.get(p.keys.admitted()).await.unwrap();
    n.unwrap_or(0)
}

/// `XPENDING` summary: count, lowest id, highest id, per-consumer counts.
type PendingSummary = (u64, Option<String>, Option<String>, Option<Vec<(String, String)>>);

/// Entries pending in resize's group.
async fn resize_pending(p: &Pipeline) -> u64 {
    let mut conn = crate::common::redis_conn(p).await;
    let summary: PendingSummary = redis::cmd("XPENDING")
        .arg(p.keys.stream(StageName::Resize))
        .arg("resize")
        .query_async(&mut conn)
        .await
        .unwrap();
    summary.0
}

fn runner_config() -> image_queue_pipeline::RunnerConfig {
    image_queue_pipeline::RunnerConfig {
        admission_window: 8,
        admission_adaptive: false,
        // Long enough that the periodic repair cannot hide a lost release.
        reconcile_every_ms: 600_000,
        ..fast_runner(4)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_whose_job_record_vanished_between_stages_frees_its_slot() {
    let env = TestEnv::start(Fsync::Off).await;
    let shutdown = CancellationToken::new();
    let mut set = tokio::task::JoinSet::new();
    let (handled, mut during) = tokio::sync::mpsc::unbounded_channel();
    let resize = Arc::new(RecordVanishes {
        p: env.pipeline.clone(),
        fail: AtomicBool::new(false),
        handled,
    });
    let stages: Vec<Arc<dyn Stage>> = vec![
        Arc::new(PassOn(StageName::RateCheck)),
        resize.clone(),
        Arc::new(PassOn(StageName::Upload)),
        Arc::new(PassOn(StageName::DbCommit)),
    ];
    for stage in stages {
        let runner = StageRunner::new(env.pipeline.clone(), stage, runner_config());
        let s = shutdown.clone();
        set.spawn(async move { runner.run(s).await.unwrap() });
    }
    for (record, fail) in [("hand-off", false), ("retry", true)] {
        resize.fail.store(fail, Ordering::SeqCst);
        env.submit("vendor-a", 1, 1, &[Operation::Resize], 64).await;
        // Dispatched (the counter took the slot), then its record vanished
        // in resize: the hand-off or the retry finds no job and must still
        // give the slot back, in the script that acknowledges the entry.
        let held = during.recv().await.unwrap();
        assert_eq!(held, 1, "{record}: the image held a slot while in resize");
        let deadline = Instant::now() + Duration::from_secs(20);
        while resize_pending(&env.pipeline).await > 0 {
            assert!(
                Instant::now() < deadline,
                "{record}: the resize entry was never acknowledged"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            admitted(&env.pipeline).await,
            0,
            "{record}: the slot was not given back"
        );
    }
    shutdown.cancel();
    while set.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drifted_admission_counter_is_repaired_from_what_is_in_flight() {
    let env = TestEnv::start(Fsync::Off).await;
    // Three images dispatched into resize's stream and not yet read, one
    // waiting in upload's retry set: four slots truly held.
    for stage in [StageName::Resize, StageName::Upload, StageName::DbCommit] {
        let mut conn = crate::common::redis_conn(&env.pipeline).await;
        let _: () = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(env.pipeline.keys.stream(stage))
            .arg(stage.as_str())
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    for i in 0..3 {
        let _: String = conn
            .xadd(
                env.pipeline.keys.stream(StageName::Resize),
                "*",
                &[("e", format!("event {i}"))],
            )
            .await
            .unwrap();
    }
    let _: () = conn
        .zadd(env.pipeline.keys.retries(StageName::Upload), "event 3", 1)
        .await
        .unwrap();
    let _: () = conn.set(env.pipeline.keys.admitted(), 11).await.unwrap();

    let r = admission::reconcile(&env.pipeline).await.unwrap();
    assert_eq!(
        r,
        Reconciled::Repaired {
            in_flight: 4,
            counter_was: 11
        }
    );
    assert_eq!(admitted(&env.pipeline).await, 4);
    let again = admission::reconcile(&env.pipeline).await.unwrap();
    assert_eq!(again, Reconciled::Agreed { in_flight: 4 });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nine_thousand_waiting_vendors_do_not_stop_admission() {
    let env = TestEnv::start(Fsync::Off).await;
    // Every vendor has one image parked, as rate-check leaves them: 9,000
    // vendors in the ring, more than a Lua call can take as arguments.
    let ring = env.pipeline.keys.vendor_ring();
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let vendors: Vec<String> = (0..9_000).map(|v| format!("vendor-{v}")).collect();
    for chunk in vendors.chunks(1_000) {
        let mut pipe = redis::pipe();
        for v in chunk {
            let item = format!(
                "resize\t{}\tjob-{v}\t0\t{{}}",
                env.pipeline.keys.job(&format!("job-{v}"))
            );
            pipe.rpush(env.pipeline.keys.vendor_queue(v), item).ignore();
        }
        pipe.rpush(&ring, chunk).ignore();
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
    let admission = admission::Admission::new(
        env.pipeline.clone(),
        admission::WindowSettings::fixed(8),
        Default::default(),
        3_600_000,
    );
    let d = admission.dispatch().await.expect("dispatch with 9,000 vendors waiting");
    assert_eq!(d.moved, 8, "{d:?}");
    // The vendors served went to the back of the ring (their queues are
    // empty now; the next call that reaches them drops them); the next
    // call starts with the first one not served.
    let head: Vec<String> = conn.lrange(&ring, 0, 0).await.unwrap();
    assert_eq!(head, vec!["vendor-8".to_string()]);
    let tail: Vec<String> = conn.lrange(&ring, -8, -1).await.unwrap();
    assert_eq!(tail, vendors[..8].to_vec());
    assert_eq!(d.vendors_waiting, 9_000, "{d:?}");
    assert_eq!(admitted(&env.pipeline).await, 8);
    let mut conn2 = crate::common::redis_conn(&env.pipeline).await;
    let queued: u64 = conn2.xlen(env.pipeline.keys.stream(StageName::Resize)).await.unwrap();
    assert_eq!(queued, 8);
}

/// Runs every real stage in this process until the token is cancelled;
/// resize, the bottleneck, with as many slots as the machine has cores
/// (more would slow each image by sharing the cores, which says nothing
/// about admission).
async fn run_real_pipeline(env: &TestEnv, shutdown: &CancellationToken) -> tokio::task::JoinSet<()> {
    let mut set = tokio::task::JoinSet::new();
    for name in StageName::ALL {
        let concurrency = match name {
            StageName::RateCheck => 256,
            StageName::Resize => 2,
            _ => 3,
        };
        let cfg = image_queue_pipeline::RunnerConfig {
            concurrency,
            ..fast_runner(concurrency)
        };
        let runner = StageRunner::new(env.pipeline.clone(), env.stage(name).await, cfg);
        let s = shutdown.clone();
        set.spawn(async move { runner.run(s).await.unwrap() });
    }
    set
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_newcomers_image_behind_a_real_backlog_waits_a_few_images_not_the_window() {
    let env = TestEnv::start(Fsync::Off).await;
    let shutdown = CancellationToken::new();
    let mut stages = run_real_pipeline(&env, &shutdown).await;
    let mut finished = env.finished_listener().await;
    let ops = [Operation::Resize];

    // B alone, twice (the first warms the stages up).
    let mut alone = Duration::ZERO;
    for _ in 0..2 {
        let started = Instant::now();
        let b = env.submit("vendor-b", 1, 1, &ops, 1200).await;
        finished.wait(&b, Duration::from_secs(60)).await;
        alone = started.elapsed();
    }

    // A's backlog of 300 real 1200-pixel images; once the window has been
    // sized from the stages' measurements, B's one image.
    let a = env.submit("vendor-a", 30, 10, &ops, 1200).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let sized = loop {
        if let Some(w) = admission::published_window(&env.pipeline).await.unwrap() {
            if w.reason.starts_with("bottleneck") {
                break w;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the window was never sized from measurements"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let started = Instant::now();
    let b = env.submit("vendor-b", 1, 1, &ops, 1200).await;
    finished.wait(&b, Duration::from_secs(120)).await;
    let behind = started.elapsed();
    let a_done: u32 = {
        let mut done = 0;
        for id in &a {
            done += env.jobs.get(None, id).await.unwrap().unwrap().completed;
        }
        done
    };
    let ratio = behind.as_secs_f64() / alone.as_secs_f64();
    println!(
        "real resize work: B alone {alone:.2?}, behind A's 300 images {behind:.2?} ({ratio:.1}x); window {} ({}); A had {a_done} of 300 done at B's end",
        sized.window, sized.reason
    );
    assert!(
        a_done < 250,
        "A's backlog was nearly done ({a_done} of 300) when B finished: the machine is too slow for this test"
    );
    // A fixed window of 32 puts 32 images of real work ahead of B (about
    // ten times B's own time here); the sized window a few.
    assert!(ratio <= 5.0, "B took {ratio:.1}x its time alone behind A's backlog");
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlogged_vendors_of_weights_one_two_four_are_admitted_one_two_four() {
    let env = TestEnv::start(Fsync::Off).await;
    let ring = env.pipeline.keys.vendor_ring();
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let vendors = [("light", 1u64), ("middle", 2), ("heavy", 4)];
    for (v, weight) in vendors {
        let mut pipe = redis::pipe();
        for i in 0..500 {
            let item = format!(
                "resize\t{}\tjob-{v}\t{i}\t{v}",
                env.pipeline.keys.job(&format!("job-{v}"))
            );
            pipe.rpush(env.pipeline.keys.vendor_queue(v), item).ignore();
        }
        pipe.rpush(&ring, v).ignore();
        pipe.hset(env.pipeline.keys.vendor_weights(), v, weight).ignore();
        let _: () = pipe.query_async(&mut conn).await.unwrap();
    }
    // A window of 5: rounds are cut short and resumed across calls, as
    // when slots free one by one.
    let admission = admission::Admission::new(
        env.pipeline.clone(),
        admission::WindowSettings::fixed(5),
        Default::default(),
        3_600_000,
    );
    let mut moved = 0;
    while moved < 700 {
        let d = admission.dispatch().await.unwrap();
        moved += d.moved;
        // Everything admitted finishes at once.
        let _: () = conn.set(env.pipeline.keys.admitted(), 0).await.unwrap();
    }
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(env.pipeline.keys.stream(StageName::Resize))
        .arg("-")
        .arg("+")
        .query_async::<redis::streams::StreamRangeReply>(&mut conn)
        .await
        .unwrap()
        .ids
        .into_iter()
        .map(|e| (e.id.clone(), vec![("e".to_string(), e.get::<String>("e").unwrap())]))
        .collect();
    let count = |v: &str| entries.iter().filter(|(_, f)| f[0].1 == v).count();
    assert_eq!(entries.len(), 700);
    assert_eq!((count("light"), count("middle"), count("heavy")), (100, 200, 400));
}
