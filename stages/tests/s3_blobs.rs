//! Blobs between stages in a bucket, against a real S3-protocol server
//! (`s3s-fs`, one per test): what one host writes another reads, uploads
//! stream in parts, a job's blobs go together, the sweep takes only old
//! jobs, and a missing blob is "not found" as on a local disk. A missing
//! `s3s-fs` fails the test with how to install it.

#[path = "support/s3s.rs"]
mod s3s;

use std::io::ErrorKind;
use std::time::Duration;

use bytes::Bytes;
use image_queue_pipeline::BlobStore;
use image_queue_stages::s3::Credentials;
use image_queue_stages::s3_blobs::{BlobsConfig, PART_BYTES};
use s3s::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};

fn config(server: &S3Server) -> BlobsConfig {
    toml::from_str(&format!(
        "backend = \"s3\"\nbucket = \"{BUCKET}\"\nendpoint = \"{}\"\nallow_http = true\nprefix = \"iq/blobs\"",
        server.endpoint()
    ))
    .unwrap()
}

#[tokio::test]
async fn blobs_in_a_bucket_behave_as_blobs_on_a_disk() {
    let server = S3Server::start();
    // Two stores, as two hosts would have: they share only the bucket.
    let api = config(&server)
        .build_with(Credentials::new(ACCESS_KEY, SECRET_KEY))
        .unwrap();
    let worker = config(&server)
        .build_with(Credentials::new(ACCESS_KEY, SECRET_KEY))
        .unwrap();

    worker
        .put("job-1/0/cutout.png", Bytes::from_static(b"pixels"))
        .await
        .unwrap();
    assert_eq!(
        api.get("job-1/0/cutout.png").await.unwrap(),
        Bytes::from_static(b"pixels")
    );
    let missing = api.get("job-1/0/nothing").await.unwrap_err();
    assert_eq!(missing.kind(), ErrorKind::NotFound, "{missing}");

    // An upload larger than a part, written as it arrives: visible only
    // once committed, then whole.
    let big: Vec<u8> = (0..PART_BYTES * 2 + 12_345).map(|i| (i % 251) as u8).collect();
    let mut w = api.writer("job-1/1/original").await.unwrap();
    for chunk in big.chunks(64 * 1024) {
        w.write(chunk).await.unwrap();
    }
    assert_eq!(
        worker.get("job-1/1/original").await.unwrap_err().kind(),
        ErrorKind::NotFound,
        "an uncommitted upload is visible"
    );
    w.commit().await.unwrap();
    assert_eq!(worker.get("job-1/1/original").await.unwrap(), Bytes::from(big));
    // A small one is one object too.
    let mut w = api.writer("job-2/0/original").await.unwrap();
    w.write(b"small").await.unwrap();
    w.commit().await.unwrap();
    assert_eq!(
        worker.get("job-2/0/original").await.unwrap(),
        Bytes::from_static(b"small")
    );

    // The sweep keeps what is young, and takes a job whole when old.
    assert_eq!(worker.sweep(Duration::from_secs(3600)).await.unwrap(), 0);
    worker.delete_job("job-1").await.unwrap();
    assert_eq!(
        api.get("job-1/0/cutout.png").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(
        api.get("job-1/1/original").await.unwrap_err().kind(),
        ErrorKind::NotFound
    );
    assert_eq!(api.get("job-2/0/original").await.unwrap(), Bytes::from_static(b"small"));
    // Deleting a job with nothing left is no error.
    worker.delete_job("job-1").await.unwrap();
    assert_eq!(worker.sweep(Duration::ZERO).await.unwrap(), 1);
    assert!(server.keys().await.is_empty(), "{:?}", server.keys().await);

    // A key is a path: one that is not plain segments is refused.
    assert_eq!(
        api.put("job-3/../../escape", Bytes::new()).await.unwrap_err().kind(),
        ErrorKind::InvalidInput
    );
}

#[tokio::test]
async fn wrong_credentials_are_refused_and_never_printed() {
    let server = S3Server::start();
    let store = config(&server)
        .build_with(Credentials::new(ACCESS_KEY, "not-the-secret-Xy7"))
        .unwrap();
    let e = store
        .put("job-1/0/original", Bytes::from_static(b"x"))
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(!text.contains("not-the-secret-Xy7"), "{text}");
    assert!(text.contains(BUCKET) && text.contains("job-1/0/original"), "{text}");
}
