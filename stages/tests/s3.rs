//! The upload stage's `s3` backend against a real S3-protocol server.
//!
//! Each test starts its own `s3s-fs` (an S3 server that keeps buckets as
//! directories) on a free port over a temporary directory, with an access
//! key pair, and reads back what the stage stored through the S3 API
//! itself. A missing `s3s-fs` fails the tests with how to install it.

#[path = "support/s3s.rs"]
mod s3s;
mod support;

use std::collections::BTreeSet;

use bytes::Bytes;
use image::ImageFormat;
use image_queue_pipeline::{ErrorClass, ImageEvent, Outcome, Stage};
use image_queue_stages::s3::Credentials;
use image_queue_stages::{ResizeConfig, StageContext, UploadConfig, UploadStage};
use object_store::path::Path;
use object_store::{Attribute, ObjectStoreExt};
use s3s::{S3Server, ACCESS_KEY, BUCKET, SECRET_KEY};

fn config(server: &S3Server, bucket: &str) -> UploadConfig {
    UploadConfig::S3 {
        bucket: bucket.into(),
        endpoint: Some(server.endpoint()),
        region: "us-east-1".into(),
        prefix: "products".into(),
        public_base_url: String::new(),
        access_key_id_env: "UNUSED_IN_TESTS_KEY".into(),
        secret_access_key_env: "UNUSED_IN_TESTS_SECRET".into(),
        session_token_env: String::new(),
        allow_http: true,
        timeout_ms: 5_000,
        retries: 0,
    }
}

fn stage(server: &S3Server, ctx: &StageContext, secret: &str) -> UploadStage {
    config(server, BUCKET)
        .build_s3_with(ctx.clone(), Credentials::new(ACCESS_KEY, secret))
        .unwrap()
}

/// A product photo of `job`'s image 4 that the real resize stage has made
/// its variants of, as the upload stage receives it.
async fn resized_event(ctx: &StageContext, job: &str) -> ImageEvent {
    // Larger than the medium variant, so that the three variants differ
    // (identical ones would be stored once).
    let png = support::encode(&support::product_photo(1000, 750), ImageFormat::Png);
    let mut ev = support::event_for(ctx, job, 4, png).await;
    ev.vendor = "acme/shop".into();
    let resize = ResizeConfig::default().build(ctx.clone()).unwrap();
    let Outcome::Done(ev) = resize.handle(ev).await.expect("resize") else {
        panic!("resize did not finish the image")
    };
    assert_eq!(ev.outputs.len(), 3, "{:?}", ev.outputs.keys());
    ev
}

#[tokio::test]
async fn stores_each_variant_under_its_deterministic_key_with_its_content_type() {
    let server = S3Server::start();
    let (ctx, _dir) = support::context();
    let stage = stage(&server, &ctx, SECRET_KEY);
    let ev = resized_event(&ctx, "job-7").await;
    let blobs: Vec<(String, Bytes)> = {
        let mut v = Vec::new();
        for (name, out) in &ev.outputs {
            v.push((name.clone(), ctx.blobs.get(out.blob.as_ref().unwrap()).await.unwrap()));
        }
        v
    };

    let Outcome::Done(done) = stage.handle(ev).await.expect("upload") else {
        panic!("expected Done")
    };
    let reader = server.reader();
    for (name, bytes) in blobs {
        let key = format!("products/acme_shop/job-7/4/{name}.webp");
        let out = &done.outputs[&name];
        assert_eq!(
            out.url.as_deref(),
            Some(format!("{}/{BUCKET}/{key}", server.endpoint()).as_str())
        );
        assert_eq!(out.blob, None);
        let got = reader
            .get(&Path::parse(&key).unwrap())
            .await
            .expect("the object is there");
        assert_eq!(
            got.attributes.get(&Attribute::ContentType).map(|v| v.as_ref()),
            Some("image/webp"),
            "{key}"
        );
        assert_eq!(got.bytes().await.unwrap(), bytes, "{key}");
        let note = &done.notes["s3"][&name];
        assert_eq!(note["key"], key);
        assert!(note["e_tag"].as_str().is_some_and(|t| !t.is_empty()), "{note}");
    }
    assert_eq!(server.keys().await.len(), 3);

    // No resize asked for: the working image itself, with its own type.
    let png = support::encode(&support::product_photo(64, 48), ImageFormat::Png);
    let ev = support::event_for(&ctx, "job-8", 0, png.clone()).await;
    let Outcome::Done(done) = stage.handle(ev).await.expect("upload") else {
        panic!("expected Done")
    };
    let key = "products/v/job-8/0/image.png";
    assert_eq!(
        done.outputs["image"].url.as_deref(),
        Some(format!("{}/{BUCKET}/{key}", server.endpoint()).as_str())
    );
    let got = reader.get(&Path::parse(key).unwrap()).await.unwrap();
    assert_eq!(
        got.attributes.get(&Attribute::ContentType).map(|v| v.as_ref()),
        Some("image/png")
    );
    assert_eq!(got.bytes().await.unwrap(), Bytes::from(png));
}

#[tokio::test]
async fn a_redelivered_event_overwrites_and_leaves_one_object_per_variant() {
    let server = S3Server::start();
    let (ctx, _dir) = support::context();
    let stage = stage(&server, &ctx, SECRET_KEY);
    let ev = resized_event(&ctx, "job-9").await;
    let first = stage.handle(ev.clone()).await.expect("first delivery");

    // The same event again (as after a crash before the acknowledgement),
    // with one variant's blob changed so the overwrite can be seen.
    let thumb_blob = ev.outputs["thumb"].blob.clone().unwrap();
    let newer = support::encode(&support::product_photo(20, 15), ImageFormat::WebP);
    ctx.blobs.put(&thumb_blob, Bytes::from(newer.clone())).await.unwrap();
    let second = stage.handle(ev).await.expect("redelivery");

    let (Outcome::Done(a), Outcome::Done(b)) = (first, second) else {
        panic!("expected Done twice")
    };
    for name in ["large", "medium", "thumb"] {
        assert_eq!(a.outputs[name].url, b.outputs[name].url, "{name}");
    }
    let expected: BTreeSet<String> = ["large", "medium", "thumb"]
        .iter()
        .map(|n| format!("products/acme_shop/job-9/4/{n}.webp"))
        .collect();
    assert_eq!(server.keys().await, expected);
    let thumb = server
        .reader()
        .get(&Path::parse("products/acme_shop/job-9/4/thumb.webp").unwrap())
        .await
        .unwrap();
    assert_eq!(thumb.bytes().await.unwrap(), Bytes::from(newer));
}

#[tokio::test]
async fn wrong_credentials_are_permanent_and_the_error_keeps_the_secret() {
    let server = S3Server::start();
    let (ctx, _dir) = support::context();
    let ev = resized_event(&ctx, "job-10").await;

    let wrong_secret = "not-the-secret-Xy7Q2";
    let err = stage(&server, &ctx, wrong_secret)
        .handle(ev.clone())
        .await
        .expect_err("a wrong secret must be refused");
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.message.contains("403"), "{err}");
    assert!(err.message.contains("SignatureDoesNotMatch"), "{err}");
    assert!(err.message.contains(BUCKET), "{err}");
    assert!(!err.message.contains(wrong_secret), "{err}");

    let err = config(&server, BUCKET)
        .build_s3_with(ctx.clone(), Credentials::new("AKIAUNKNOWN", wrong_secret))
        .unwrap()
        .handle(ev)
        .await
        .expect_err("an unknown key must be refused");
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(!err.message.contains(wrong_secret), "{err}");
    assert!(server.keys().await.is_empty());
}

#[tokio::test]
async fn a_stopped_server_is_retryable_and_the_retry_succeeds() {
    let mut server = S3Server::start();
    let (ctx, _dir) = support::context();
    let stage = stage(&server, &ctx, SECRET_KEY);
    let ev = resized_event(&ctx, "job-12").await;
    server.stop();
    let err = stage.handle(ev.clone()).await.expect_err("nothing listens");
    assert_eq!(err.class, ErrorClass::Retryable, "{err}");

    server.restart();
    let Outcome::Done(done) = stage.handle(ev).await.expect("the retry") else {
        panic!("expected Done")
    };
    assert!(done.outputs.values().all(|o| o.url.is_some()));
    assert_eq!(server.keys().await.len(), 3);
}

#[tokio::test]
async fn missing_credentials_fail_the_build_naming_the_variable() {
    let server = S3Server::start();
    let (ctx, _dir) = support::context();
    let err = config(&server, BUCKET)
        .build(ctx)
        .err()
        .expect("no credentials in the environment");
    assert!(err.to_string().contains("UNUSED_IN_TESTS_KEY"), "{err}");
}
