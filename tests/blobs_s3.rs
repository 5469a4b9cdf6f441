//! Hosts that share no disk: the API and the workers as separate processes
//! with data directories of their own, sharing only Redis, the results
//! database and a bucket of a real S3-protocol server (`s3s-fs`) for the
//! blobs between stages (`[blobs] backend = "s3"`). An uploaded photo goes
//! through every operation; nothing lands in either local blob directory,
//! and the job's blobs leave the bucket when it completes.

mod common;
#[path = "../stages/tests/support/s3s.rs"]
mod s3s;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use image_queue_api::Auth;
use image_queue_pipeline::redis_server::{free_port, Fsync};
use image_queue_pipeline::StageName;
use s3s::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use serde_json::Value;

/// Files under `dir`, recursively (none when it does not exist).
fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() {
                files_under(&p)
            } else {
                vec![p]
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_and_workers_on_separate_hosts_share_blobs_through_a_bucket() {
    let server = S3Server::start();
    let env = TestEnv::start(Fsync::Off).await;
    let key = Auth::new(env.pipeline.clone(), None).add_vendor("shop").await.unwrap();
    let shared = [
        ("REDIS_URL", env.redis.url()),
        ("DATABASE_URL", env.database_url()),
        ("IMAGE_QUEUE_BLOBS__BACKEND", "s3".into()),
        ("IMAGE_QUEUE_BLOBS__BUCKET", BUCKET.into()),
        ("IMAGE_QUEUE_BLOBS__ENDPOINT", server.endpoint()),
        ("IMAGE_QUEUE_BLOBS__ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
        ("IMAGE_QUEUE_PIPELINE__READ_BLOCK_MS", "200".into()),
        ("RUST_LOG", "warn".into()),
    ];
    let spawn = |data_dir: &Path, args: &[&str]| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_image-queue"))
            .args(args)
            .envs(shared.iter().map(|(k, v)| (*k, v.as_str())))
            .env("IMAGE_QUEUE_DATA_DIR", data_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("run the image-queue binary")
    };
    let api_host = env.dir.path().join("api-host");
    let worker_host = env.dir.path().join("worker-host");
    let addr = format!("127.0.0.1:{}", free_port().unwrap());
    let _api = spawn(&api_host, &["api", "--listen", &addr]);
    let _workers: Vec<_> = StageName::ALL
        .into_iter()
        .map(|s| spawn(&worker_host, &["worker", "--stage", s.as_str()]))
        .collect();

    let http = reqwest::Client::new();
    common::http::wait_ready(&http, &addr).await;
    let form = reqwest::multipart::Form::new()
        .text("operations", "bg-removal,face-crop,resize")
        .part(
            "images",
            reqwest::multipart::Part::bytes(product_png(640, 480))
                .file_name("p.png")
                .mime_str("image/png")
                .unwrap(),
        )
        .text("record_id", "sku-1");
    let r = http
        .post(format!("http://{addr}/api/image-queue/jobs"))
        .bearer_auth(&key)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let job_id = r.json::<Value>().await.unwrap()["job_id"].as_str().unwrap().to_string();

    let deadline = Instant::now() + Duration::from_secs(120);
    let job = loop {
        let job = common::http::get_json(&http, &format!("http://{addr}/api/image-queue/job/{job_id}"), &key).await;
        if ["completed", "failed", "partially_failed", "cancelled"].contains(&job["status"].as_str().unwrap_or("")) {
            break job;
        }
        assert!(Instant::now() < deadline, "the job did not end within 2 minutes: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(job["status"], "completed", "{job}");
    for host in [&api_host, &worker_host] {
        let local = files_under(&host.join("blobs"));
        assert!(local.is_empty(), "blobs on a host's disk: {local:?}");
    }
    // The completed job's blobs are gone from the bucket (the results are
    // the upload backend's, under the worker's media directory here).
    // They are removed right after the job's end is recorded.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left: Vec<String> = server
            .keys()
            .await
            .into_iter()
            .filter(|k| k.starts_with("blobs/"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "blobs left in the bucket: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !files_under(&worker_host.join("media")).is_empty(),
        "no results were uploaded"
    );
}
