//! Dead letters as an operator handles them, against the real runner, a
//! private redis-server and the API over real HTTP: a broken stage
//! dead-letters images; once it is fixed, replaying them completes the job
//! and its status is recomputed.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use common::http::ADMIN_KEY;
use common::*;
use image_queue_pipeline::redis_server::Fsync;
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{dlq, ImageEvent, Operation, Outcome, Stage, StageError, StageName};
use redis::AsyncCommands;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

/// The real resize stage, failing for good while `broken` is set.
struct Breakable {
    inner: Arc<dyn Stage>,
    broken: AtomicBool,
}

#[async_trait]
impl Stage for Breakable {
    fn name(&self) -> StageName {
        StageName::Resize
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(StageError::permanent("resize is broken: bad encoder build"));
        }
        self.inner.handle(event).await
    }
}

/// Runs every real stage, resize through [`Breakable`] (broken at first).
async fn run_stages(env: &TestEnv, shutdown: &CancellationToken) -> (Arc<Breakable>, tokio::task::JoinSet<()>) {
    let resize = Arc::new(Breakable {
        inner: env.stage(StageName::Resize).await,
        broken: AtomicBool::new(true),
    });
    let mut set = tokio::task::JoinSet::new();
    for name in StageName::ALL {
        let stage: Arc<dyn Stage> = if name == StageName::Resize {
            resize.clone()
        } else {
            env.stage(name).await
        };
        let runner = StageRunner::new(env.pipeline.clone(), stage, fast_runner(2));
        let s = shutdown.clone();
        set.spawn(async move { runner.run(s).await.expect("runner") });
    }
    (resize, set)
}

async fn get_json(api: &common::http::Api, path: &str, key: &str) -> (u16, Value) {
    let r = api.client.get(api.url(path)).bearer_auth(key).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_dead_letters_after_a_fix_completes_the_job() {
    let env = TestEnv::start(Fsync::Off).await;
    let api = env.serve_api().await;
    let shutdown = CancellationToken::new();
    let (resize, mut stages) = run_stages(&env, &shutdown).await;
    let mut finished = env.finished_listener().await;

    let ids = env.submit("vendor-a", 1, 2, &[Operation::Resize], 48).await;
    let job = &ids[0];
    finished.wait(&ids, Duration::from_secs(30)).await;
    let view = env.jobs.get(None, job).await.unwrap().unwrap();
    assert_eq!(view.status, "failed", "{view:?}");
    assert_eq!((view.completed, view.failed), (0, 2));

    // Only the admin key may see dead letters.
    let r = api.client.get(api.url("/api/admin/dlq")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let (status, _) = get_json(&api, "/api/admin/dlq", &api.vendor_key).await;
    assert_eq!(status, 403, "a vendor key is refused");
    let (status, body) = get_json(&api, "/api/admin/dlq", ADMIN_KEY).await;
    assert_eq!(status, 200, "{body}");
    let letters = body["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 2, "{body}");
    assert_eq!(body["total"], 2);
    for d in letters {
        assert_eq!(d["stage"], "resize");
        assert_eq!(d["vendor"], "vendor-a");
        assert_eq!(d["job"], job.as_str());
        assert_eq!(d["attempts"], 1);
        assert_eq!(d["event"]["job"], job.as_str(), "the event travels with it");
        let tp = d["event"]["traceparent"]
            .as_str()
            .expect("every event carries a traceparent");
        assert!(image_queue_pipeline::trace::trace_id(tp).is_some(), "{tp}");
    }
    assert_eq!(
        letters[0]["event"]["traceparent"], letters[1]["event"]["traceparent"],
        "one job is one trace"
    );
    // Filters.
    let (_, none) = get_json(&api, "/api/admin/dlq?stage=upload", ADMIN_KEY).await;
    assert_eq!(none["dead_letters"].as_array().unwrap().len(), 0);
    let (_, by_error) = get_json(&api, "/api/admin/dlq?error=ENCODER&vendor=vendor-a", ADMIN_KEY).await;
    assert_eq!(by_error["dead_letters"].as_array().unwrap().len(), 2);
    let (_, old) = get_json(&api, "/api/admin/dlq?older_than_s=3600", ADMIN_KEY).await;
    assert_eq!(old["dead_letters"].as_array().unwrap().len(), 0);
    let (status, _) = get_json(&api, "/api/admin/dlq?stage=nope", ADMIN_KEY).await;
    assert_eq!(status, 422);

    // The stats count them.
    let s = image_queue_pipeline::stats::collect(&env.pipeline).await.unwrap();
    let rs = s.stages.iter().find(|s| s.stage == "resize").unwrap();
    assert_eq!(rs.totals.dead, 2, "{rs:?}");
    assert_eq!(s.dead_letters, 2);

    // Fix the stage, replay one over HTTP: the image completes, and the job
    // ends again with one image done and one still failed.
    resize.broken.store(false, Ordering::SeqCst);
    let first = letters[0]["id"].as_str().unwrap().to_string();
    let second = letters[1]["id"].as_str().unwrap().to_string();
    let r = api
        .client
        .post(api.url(&format!("/api/admin/dlq/{first}/replay")))
        .bearer_auth(&api.vendor_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let r = api
        .client
        .post(api.url(&format!("/api/admin/dlq/{first}/replay")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let replayed: Value = r.json().await.unwrap();
    assert_eq!(replayed["to"], "resize");
    finished.wait(&ids, Duration::from_secs(30)).await;
    let view = env.jobs.get(None, job).await.unwrap().unwrap();
    assert_eq!(view.status, "partially_failed", "{view:?}");
    assert_eq!((view.completed, view.failed), (1, 1));

    // A dead letter is replayed once.
    let r = api
        .client
        .post(api.url(&format!("/api/admin/dlq/{first}/replay")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);

    // The other, through the library, into a stage named explicitly.
    let r = dlq::replay(&env.pipeline, &second, Some(StageName::Resize))
        .await
        .unwrap();
    assert_eq!(r.from, "resize");
    finished.wait(&ids, Duration::from_secs(30)).await;
    let view = env.jobs.get(None, job).await.unwrap().unwrap();
    assert_eq!(view.status, "completed", "{view:?}");
    assert_eq!((view.completed, view.failed), (2, 0));
    for img in &view.images {
        assert_eq!(img.status, "completed");
        assert_eq!(img.outputs.len(), 3, "three variants: {img:?}");
        assert_eq!(img.error, None);
    }
    let rows = env.results_rows().await;
    assert_eq!(rows.len(), 2 * 3, "each replayed image committed once: {rows:?}");

    // Each replay was recorded, on the image and in the replay log.
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let replays: u64 = conn.hget(env.pipeline.keys.job(job), "0:replays").await.unwrap();
    assert_eq!(replays, 1);
    let log: u64 = conn.xlen(env.pipeline.keys.replays()).await.unwrap();
    assert_eq!(log, 2);
    let (_, body) = get_json(&api, "/api/admin/dlq", ADMIN_KEY).await;
    assert_eq!(body["total"], 0);

    // Deleting and purging.
    let r = api
        .client
        .delete(api.url(&format!("/api/admin/dlq/{first}")))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404, "already gone");
    resize.broken.store(true, Ordering::SeqCst);
    let more = env.submit("vendor-a", 1, 1, &[Operation::Resize], 32).await;
    finished.wait(&more, Duration::from_secs(30)).await;
    let r = api
        .client
        .delete(api.url("/api/admin/dlq"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 422, "purging everything needs all=true");
    let r = api
        .client
        .delete(api.url("/api/admin/dlq?vendor=vendor-a&stage=resize"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let purged: Value = r.json().await.unwrap();
    assert_eq!(purged["purged"], 1);

    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_refused_when_the_image_is_no_longer_failed() {
    let env = TestEnv::start(Fsync::Off).await;
    let shutdown = CancellationToken::new();
    let (_resize, mut stages) = run_stages(&env, &shutdown).await;
    let mut finished = env.finished_listener().await;
    let ids = env.submit("vendor-b", 1, 1, &[Operation::Resize], 32).await;
    finished.wait(&ids, Duration::from_secs(30)).await;
    let letters = dlq::list(&env.pipeline, &dlq::Filter::default(), 10).await.unwrap();
    assert_eq!(letters.len(), 1);
    // Someone set the image's state by hand meanwhile: replay must not
    // count it twice.
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let _: () = conn
        .hset(env.pipeline.keys.job(&ids[0]), "0:status", "completed")
        .await
        .unwrap();
    let err = dlq::replay(&env.pipeline, &letters[0].id, None).await.unwrap_err();
    assert!(matches!(err, dlq::ReplayError::NotFailed), "{err}");
    assert_eq!(
        dlq::list(&env.pipeline, &dlq::Filter::default(), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
}
