//! Recording a job, against a real redis-server: a job of thousands of
//! images is recorded whole, and an idempotency key only ever names a job
//! that was recorded, with the request that made it.

mod common;

use common::*;
use image_queue_pipeline::redis_server::Fsync;
use image_queue_pipeline::{NewImage, NewJob, Operation, Source};

fn job(vendor: &str, images: usize, key: Option<&str>, fingerprint: Option<&str>) -> NewJob {
    NewJob {
        id: NewJob::new_id(),
        vendor: vendor.into(),
        operations: vec![Operation::Resize],
        images: (0..images)
            .map(|i| NewImage {
                source: Source::Url(format!("https://shop.example/{i}.jpg")),
                record_id: format!("sku-{i}"),
            })
            .collect(),
        idempotency_key: key.map(String::from),
        fingerprint: fingerprint.map(String::from),
        traceparent: None,
    }
}

#[tokio::test]
async fn a_job_of_five_thousand_images_is_recorded_whole_and_its_key_names_it() {
    let env = TestEnv::start(Fsync::Off).await;
    let first = env
        .jobs
        .submit(job("vendor-a", 5_000, Some("k1"), Some("f1")))
        .await
        .expect("a job of 5,000 images is recorded");
    assert!(first.created);
    let view = env
        .jobs
        .get(Some("vendor-a"), &first.job_id)
        .await
        .unwrap()
        .expect("the job reads back");
    assert_eq!(view.total, 5_000);
    assert_eq!(view.images.len(), 5_000);
    assert_eq!(view.images[4_999].record_id, "sku-4999");

    // A retry with the same key and request gets the same job.
    let again = env
        .jobs
        .submit(job("vendor-a", 5_000, Some("k1"), Some("f1")))
        .await
        .unwrap();
    assert_eq!((again.created, again.conflicting), (false, false));
    assert_eq!(again.job_id, first.job_id);
    // The same key with another request is told so.
    let other = env
        .jobs
        .submit(job("vendor-a", 3, Some("k1"), Some("f2")))
        .await
        .unwrap();
    assert_eq!((other.created, other.conflicting), (false, true));
    let earlier = env.jobs.idempotent_submit("vendor-a", "k1").await.unwrap().unwrap();
    assert_eq!(earlier.job_id, first.job_id);
    assert!(earlier.conflicts_with(Some("f2")) && !earlier.conflicts_with(Some("f1")));
}

#[tokio::test]
async fn a_submit_redis_refuses_leaves_no_idempotency_key_behind() {
    let env = TestEnv::start(Fsync::Off).await;
    // Redis full: the job cannot be written.
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let refused = env.jobs.submit(job("vendor-a", 2, Some("k2"), None)).await;
    assert!(refused.is_err(), "{refused:?}");
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(env.jobs.idempotent_job("vendor-a", "k2").await.unwrap(), None);
    // The client's retry with the same key makes the job.
    let retried = env.jobs.submit(job("vendor-a", 2, Some("k2"), None)).await.unwrap();
    assert!(retried.created);
    assert!(env.jobs.get(Some("vendor-a"), &retried.job_id).await.unwrap().is_some());
}
