//! A 202 means the job is on the replicas `redis.min_replicas` asks for:
//! the real `api` process against a real primary and replica. While the
//! replica is paused (SIGSTOP, as a partition leaves it), a submit is
//! answered 503 with Retry-After; once it is back, the client's retry with
//! the same Idempotency-Key gets that one job, now on the replica.

mod common;

use std::sync::Arc;
use std::time::Instant;

use image_queue_api::Auth;
use image_queue_pipeline::redis_server::{free_port, Fsync, RedisServer};
use image_queue_pipeline::{LocalBlobStore, Pipeline};
use serde_json::{json, Value};

/// A process paused (SIGSTOP) until dropped (SIGCONT).
struct Paused(u32);

impl Paused {
    fn new(pid: u32) -> Paused {
        // SAFETY: signalling our own child's pid.
        assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
        Paused(pid)
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

/// Waits until `replicas` replicas have everything written so far: Redis's
/// own acknowledgement, not a guess.
async fn replicated(url: &str, replicas: u32) {
    let client = redis::Client::open(url).unwrap();
    // WAIT blocks: no response timeout on its connection.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("probe")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let acked: u32 = redis::cmd("WAIT")
        .arg(replicas)
        .arg(30_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(acked, replicas, "the replica never caught up with its primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_is_accepted_only_once_a_replica_has_it() {
    let dir = tempfile::tempdir().unwrap();
    let primary = RedisServer::start(&dir.path().join("primary"), Fsync::Off)
        .await
        .unwrap();
    let replica = RedisServer::start_replica(&dir.path().join("replica"), &primary, Fsync::Off)
        .await
        .unwrap();
    replicated(&primary.url(), 1).await;
    let blobs = Arc::new(LocalBlobStore::new(dir.path().join("blobs")).unwrap());
    let p = Pipeline::connect(&primary.url(), "iq", blobs).await.unwrap();
    let key = Auth::new(p.clone(), None).add_vendor("shop").await.unwrap();

    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let _api = tokio::process::Command::new(env!("CARGO_BIN_EXE_image-queue"))
        .env("REDIS_URL", primary.url())
        .env("IMAGE_QUEUE_DATA_DIR", dir.path())
        .env("IMAGE_QUEUE_REDIS__MIN_REPLICAS", "1")
        // Long enough that a loaded machine does not refuse the first
        // submit, whose replica is there; the paused one waits it out.
        .env("IMAGE_QUEUE_REDIS__WAIT_TIMEOUT_MS", "2000")
        .env("RUST_LOG", "warn")
        .args(["api", "--listen", &addr])
        .kill_on_drop(true)
        .spawn()
        .expect("run the image-queue binary");
    let http = reqwest::Client::new();
    common::http::wait_ready(&http, &addr).await;
    let submit = |idempotency_key: &'static str| {
        let (http, addr, key) = (http.clone(), addr.clone(), key.clone());
        async move {
            let body = json!({
                "operations": ["resize"],
                "images": [{"url": "https://images.example.com/a.jpg", "record_id": "sku-1"}],
            });
            let r = http
                .post(format!("http://{addr}/api/image-queue/jobs"))
                .bearer_auth(&key)
                .header("Idempotency-Key", idempotency_key)
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let retry_after = r.headers().get("retry-after").cloned();
            let body: Value = r.json().await.unwrap_or(Value::Null);
            (status, retry_after, body)
        }
    };

    // With the replica there: accepted.
    let (status, _, body) = submit("first").await;
    assert_eq!(status, 202, "{body}");

    // The replica paused: not accepted, and the client is told to retry.
    let paused = Paused::new(replica.pid().unwrap());
    let started = Instant::now();
    let (status, retry_after, body) = submit("second").await;
    println!("refused after {:?} with the replica paused", started.elapsed());
    assert_eq!(status, 503, "{body}");
    assert!(retry_after.is_some(), "a 503 without Retry-After");
    assert!(
        !body.to_string().contains("replica"),
        "operational detail in a vendor's error: {body}"
    );

    // The replica back: the retry with the same key gets the one job.
    drop(paused);
    let (status, _, body) = submit("second").await;
    assert!(status == 200 || status == 202, "{status}: {body}");
    let job_id = body["job_id"].as_str().unwrap().to_string();
    let (status, _, again) = submit("second").await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["job_id"], job_id.as_str());
    let listed = common::http::get_json(&http, &format!("http://{addr}/api/image-queue/jobs"), &key).await;
    let jobs = listed["jobs"].as_array().unwrap_or_else(|| panic!("{listed}"));
    assert_eq!(jobs.len(), 2, "one job per idempotency key: {listed}");

    // And it is on the replica.
    let mut on_replica = redis::Client::open(replica.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg(p.keys.job(&job_id))
        .query_async(&mut on_replica)
        .await
        .unwrap();
    assert!(exists, "the accepted job is not on the replica");
}
