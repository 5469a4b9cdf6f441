//! A real job through every stage with the `s3` upload backend: its images
//! land in a bucket of a real S3-protocol server (`s3s-fs`) under their
//! deterministic keys, and the URLs the job reports point at them.

mod common;
#[path = "../stages/tests/support/s3s.rs"]
mod s3s;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use image_queue_pipeline::redis_server::Fsync;
use image_queue_stages::s3::Credentials;
use image_queue_stages::{FetchConfig, StageContext, UploadConfig};
use object_store::path::Path;
use object_store::{Attribute, ObjectStoreExt};
use s3s::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_jobs_images_land_in_an_s3_bucket() {
    let server = S3Server::start();
    let env = TestEnv::start(Fsync::Off).await;
    let ctx = StageContext {
        blobs: env.pipeline.blobs.clone(),
        fetcher: Arc::new(FetchConfig::default().build().unwrap()),
        limits: image_queue_stages::decode::DecodeLimits::default(),
    };
    let upload = UploadConfig::S3 {
        bucket: BUCKET.into(),
        endpoint: Some(server.endpoint()),
        region: "us-east-1".into(),
        prefix: String::new(),
        public_base_url: "https://cdn.shop.test".into(),
        access_key_id_env: "UNUSED_IN_TESTS_KEY".into(),
        secret_access_key_env: "UNUSED_IN_TESTS_SECRET".into(),
        session_token_env: String::new(),
        allow_http: true,
        timeout_ms: 10_000,
        retries: 2,
    }
    .build_s3_with(ctx, Credentials::new(ACCESS_KEY, SECRET_KEY))
    .unwrap();

    let mut finished = env.finished_listener().await;
    let shutdown = CancellationToken::new();
    let mut stages = env
        .run_all_stages_with_upload(fast_runner(2), shutdown.clone(), Arc::new(upload))
        .await;
    let ids = env.submit("vendor-s3", 1, 2, &ALL_OPS, 64).await;
    finished.wait(&ids, Duration::from_secs(120)).await;
    let views = env.wait_terminal(&ids, Duration::from_secs(10)).await;
    shutdown.cancel();
    while stages.join_next().await.is_some() {}

    let job = &views[0];
    assert_eq!(job.status, "completed", "{job:?}");
    let reader = server.reader();
    let mut expected = BTreeSet::new();
    for img in &job.images {
        assert_eq!(img.outputs.len(), 3, "three variants: {img:?}");
        // The image is smaller than every variant: all three are the same
        // bytes, stored once, under the first variant's name.
        let urls: BTreeSet<&String> = img.outputs.values().collect();
        assert_eq!(urls.len(), 1, "identical variants stored once: {img:?}");
        for url in urls {
            let key = format!("vendor-s3/{}/{}/large.webp", job.job_id, img.index);
            assert_eq!(url, &format!("https://cdn.shop.test/{key}"));
            let got = reader
                .get(&Path::parse(&key).unwrap())
                .await
                .expect("the object is there");
            assert_eq!(
                got.attributes.get(&Attribute::ContentType).map(|v| v.as_ref()),
                Some("image/webp")
            );
            let bytes = got.bytes().await.unwrap();
            let decoded = image::load_from_memory(&bytes).expect("a real image");
            assert!(
                decoded.width() > 0 && decoded.width() <= 64,
                "{key}: {}",
                decoded.width()
            );
            expected.insert(key);
        }
    }
    assert_eq!(server.keys().await, expected, "nothing but the job's variants");
}
