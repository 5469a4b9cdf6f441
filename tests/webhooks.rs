//! Vendors' webhooks against a real HTTP receiver: a job's end is POSTed,
//! signed with the vendor's secret, retried with backoff while the receiver
//! fails, recorded on the job; private addresses are refused unless allowed;
//! a vendor without a webhook gets no call.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use common::*;
use hmac::{Hmac, Mac};
use image_queue_pipeline::redis_server::Fsync;
use image_queue_pipeline::webhooks::{run_deliveries, JobFinished, WebhookDeliveryConfig, Webhooks};
use image_queue_pipeline::{Operation, RetryPolicy};
use image_queue_stages::webhook::HttpWebhookSender;
use image_queue_stages::FetchConfig;
use sha2::Sha256;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// One call the receiver got.
struct Call {
    headers: HeaderMap,
    body: Vec<u8>,
}

/// A receiver that fails its first `fail_first` calls with 503, then
/// answers 204, and reports each call.
async fn receiver(fail_first: usize) -> (String, mpsc::UnboundedReceiver<Call>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let seen = Arc::new(Mutex::new(0usize));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (tx, seen) = (tx.clone(), seen.clone());
            async move {
                let n = {
                    let mut s = seen.lock().unwrap();
                    *s += 1;
                    *s
                };
                tx.send(Call {
                    headers,
                    body: body.to_vec(),
                })
                .ok();
                if n <= fail_first {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::NO_CONTENT
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), rx)
}

fn fast_delivery() -> WebhookDeliveryConfig {
    WebhookDeliveryConfig {
        retry: RetryPolicy {
            max_attempts: 3,
            base_ms: 100,
            factor: 2.0,
            max_ms: 1_000,
            jitter: 0.0,
        },
        read_block_ms: 200,
        ..WebhookDeliveryConfig::default()
    }
}

fn sender(allow_loopback: bool) -> Arc<HttpWebhookSender> {
    let fetch = FetchConfig {
        allow_networks: if allow_loopback {
            vec!["127.0.0.1/32".into()]
        } else {
            vec![]
        },
        ..FetchConfig::default()
    };
    Arc::new(HttpWebhookSender::new(fetch.build().unwrap()))
}

/// What a receiver does: recompute the signature over `<t>.<body>`.
fn verify(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let sig = headers["image-queue-signature"].to_str().unwrap();
    let (t, v1) = sig.split_once(",v1=").unwrap();
    let t = t.strip_prefix("t=").unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&hex::decode(v1).unwrap()).is_ok()
}

async fn next_call(rx: &mut mpsc::UnboundedReceiver<Call>) -> Call {
    tokio::time::timeout(Duration::from_secs(20), rx.recv())
        .await
        .expect("the webhook was not called")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_finished_job_is_posted_signed_and_retried_until_taken() {
    let env = TestEnv::start(Fsync::Off).await;
    let (url, mut calls) = receiver(2).await;
    let hooks = Webhooks::new(env.pipeline.clone());
    let secret = hooks.set("vendor-a", &url).await.unwrap();
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(fast_runner(4), shutdown.clone()).await;
    let delivery = tokio::spawn(run_deliveries(
        env.pipeline.clone(),
        sender(true),
        fast_delivery(),
        shutdown.clone(),
    ));

    let ids = env.submit("vendor-a", 1, 2, &[Operation::Resize], 64).await;
    // Vendor B has no webhook: its job must not reach A's receiver.
    let other = env.submit("vendor-b", 1, 1, &[Operation::Resize], 64).await;
    env.wait_terminal(&other, Duration::from_secs(30)).await;

    // Two 503s, then taken: three calls, the same notice each time but its
    // attempt number, each correctly signed.
    let mut attempts = Vec::new();
    for _ in 0..3 {
        let call = next_call(&mut calls).await;
        assert!(verify(&secret, &call.headers, &call.body), "bad signature");
        assert!(!verify("whsec_wrong", &call.headers, &call.body));
        assert_eq!(call.headers["image-queue-delivery"], ids[0].as_str());
        assert_eq!(call.headers["content-type"], "application/json");
        let notice: JobFinished = serde_json::from_slice(&call.body).unwrap();
        assert_eq!(
            (notice.job_id.as_str(), notice.status.as_str()),
            (ids[0].as_str(), "completed")
        );
        assert_eq!(notice.event, "job.finished");
        attempts.push(notice.attempt);
    }
    assert_eq!(attempts, [1, 2, 3]);

    // The job record says so, once the delivery is settled.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let record = loop {
        let job = env.jobs.get(Some("vendor-a"), &ids[0]).await.unwrap().unwrap();
        match job.webhook {
            Some(w) if w.starts_with("delivered") => break w,
            _ if std::time::Instant::now() > deadline => panic!("no delivery recorded: {:?}", job.webhook),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert_eq!(record, "delivered: HTTP 204 on attempt 3");
    let b = env.jobs.get(Some("vendor-b"), &other[0]).await.unwrap().unwrap();
    assert_eq!(b.webhook, None);

    // Nothing more is sent, and nothing is left in the outbox or retries.
    assert!(
        tokio::time::timeout(Duration::from_millis(700), calls.recv())
            .await
            .is_err(),
        "a settled webhook was sent again"
    );
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let outbox: u64 = redis::cmd("XLEN")
        .arg(env.pipeline.keys.webhook_outbox())
        .query_async(&mut conn)
        .await
        .unwrap();
    let retries: u64 = redis::cmd("ZCARD")
        .arg(env.pipeline.keys.webhook_retries())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!((outbox, retries), (0, 0));

    shutdown.cancel();
    delivery.await.unwrap().unwrap();
    while stages.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_webhook_aimed_at_a_private_address_is_refused_not_retried() {
    let env = TestEnv::start(Fsync::Off).await;
    let (url, mut calls) = receiver(0).await;
    Webhooks::new(env.pipeline.clone()).set("vendor-a", &url).await.unwrap();
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(fast_runner(4), shutdown.clone()).await;
    // No allow-list: 127.0.0.1 is loopback, and a vendor may not aim there.
    let delivery = tokio::spawn(run_deliveries(
        env.pipeline.clone(),
        sender(false),
        fast_delivery(),
        shutdown.clone(),
    ));
    let ids = env.submit("vendor-a", 1, 1, &[Operation::Resize], 64).await;
    env.wait_terminal(&ids, Duration::from_secs(30)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let record = loop {
        let job = env.jobs.get(None, &ids[0]).await.unwrap().unwrap();
        match job.webhook {
            Some(w) => break w,
            None if std::time::Instant::now() > deadline => panic!("no delivery outcome recorded"),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(
        record.starts_with("failed after 1 attempts") && record.contains("loopback"),
        "{record}"
    );
    assert!(calls.try_recv().is_err(), "the private address was reached");
    shutdown.cancel();
    delivery.await.unwrap().unwrap();
    while stages.join_next().await.is_some() {}
}

/// A notice whose deliverers keep dying on it (here: two that took it and
/// vanished) is given up on after `max_deliveries`, its job saying why,
/// instead of being taken over and sent for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_notice_its_deliverers_keep_dying_on_is_given_up_not_sent_again() {
    let env = TestEnv::start(Fsync::Off).await;
    let (url, mut calls) = receiver(0).await;
    Webhooks::new(env.pipeline.clone()).set("vendor-a", &url).await.unwrap();
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(fast_runner(4), shutdown.clone()).await;
    let ids = env.submit("vendor-a", 1, 1, &[Operation::Resize], 64).await;
    env.wait_terminal(&ids, Duration::from_secs(30)).await;

    // Two deliverers take the notice in turn and die with it.
    let outbox = env.pipeline.keys.webhook_outbox();
    let mut conn = crate::common::redis_conn(&env.pipeline).await;
    let _: redis::Value = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&outbox)
        .arg("webhooks")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .unwrap();
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("webhooks")
        .arg("ghost-1")
        .arg("COUNT")
        .arg(1)
        .arg("STREAMS")
        .arg(&outbox)
        .arg(">")
        .query_async(&mut conn)
        .await
        .unwrap();
    let id = read.keys[0].ids[0].id.clone();
    let _: redis::Value = redis::cmd("XCLAIM")
        .arg(&outbox)
        .arg("webhooks")
        .arg("ghost-2")
        .arg(0)
        .arg(&id)
        .query_async(&mut conn)
        .await
        .unwrap();

    let delivery = tokio::spawn(run_deliveries(
        env.pipeline.clone(),
        sender(true),
        WebhookDeliveryConfig {
            claim_idle_ms: 200,
            max_deliveries: 2,
            ..fast_delivery()
        },
        shutdown.clone(),
    ));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let record = loop {
        let job = env.jobs.get(None, &ids[0]).await.unwrap().unwrap();
        match job.webhook {
            Some(w) => break w,
            None if std::time::Instant::now() > deadline => panic!("no outcome recorded"),
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    assert!(record.starts_with("failed: delivered 3 times"), "{record}");
    assert!(calls.try_recv().is_err(), "a poison notice was sent again");
    let left: u64 = redis::cmd("XLEN").arg(&outbox).query_async(&mut conn).await.unwrap();
    assert_eq!(left, 0, "the given-up notice left the outbox");
    shutdown.cancel();
    delivery.await.unwrap().unwrap();
    while stages.join_next().await.is_some() {}
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_doubtful_cutout_reaches_the_status_and_the_webhook_as_a_warning() {
    use image_queue_pipeline::blob::blob_key;
    use image_queue_pipeline::{NewImage, NewJob, Source};

    let env = TestEnv::start(Fsync::Off).await;
    let (url, mut calls) = receiver(0).await;
    Webhooks::new(env.pipeline.clone()).set("vendor-a", &url).await.unwrap();
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(fast_runner(4), shutdown.clone()).await;
    let delivery = tokio::spawn(run_deliveries(
        env.pipeline.clone(),
        sender(true),
        fast_delivery(),
        shutdown.clone(),
    ));
    // A blank image: border-key keys all of it out, an empty cutout.
    let mut blank = Vec::new();
    image::DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(96, 72, image::Rgba([250, 250, 250, 255])))
        .write_to(&mut std::io::Cursor::new(&mut blank), image::ImageFormat::Png)
        .unwrap();
    let id = NewJob::new_id();
    let key = blob_key(&id, 0, "original");
    env.pipeline.blobs.put(&key, blank.into()).await.unwrap();
    env.jobs
        .submit(NewJob {
            id: id.clone(),
            vendor: "vendor-a".into(),
            operations: vec![Operation::BgRemoval, Operation::Resize],
            images: vec![NewImage {
                source: Source::Blob(key),
                record_id: "sku-blank".into(),
            }],
            idempotency_key: None,
            fingerprint: None,
            traceparent: None,
        })
        .await
        .unwrap();

    let call = next_call(&mut calls).await;
    let notice: JobFinished = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(
        (notice.job_id.as_str(), notice.status.as_str()),
        (id.as_str(), "completed")
    );
    assert_eq!(notice.warnings.len(), 1, "{notice:?}");
    assert_eq!(notice.warnings[0].record_id, "sku-blank");
    assert!(notice.warnings[0].warnings[0].contains("near-empty"), "{notice:?}");
    let job = env.jobs.get(Some("vendor-a"), &id).await.unwrap().unwrap();
    let notes = job.images[0].notes.clone().unwrap();
    assert_eq!(
        notes["warnings"][0].as_str(),
        Some(notice.warnings[0].warnings[0].as_str())
    );
    assert_eq!(notes["bg_removed"], false);

    shutdown.cancel();
    delivery.await.unwrap().unwrap();
    while stages.join_next().await.is_some() {}
}

/// A receiver that reports each call as it arrives and then holds it,
/// unanswered, until `release` is cancelled: an endpoint that hangs.
async fn hanging_receiver(release: CancellationToken) -> (String, mpsc::UnboundedReceiver<Call>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (tx, release) = (tx.clone(), release.clone());
            async move {
                tx.send(Call {
                    headers,
                    body: body.to_vec(),
                })
                .ok();
                release.cancelled().await;
                StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), rx)
}

/// One vendor's endpoint hangs (longer than the sender's 30 s timeout)
/// with several of its notices due; another vendor's notice, due after
/// them, is still delivered promptly and recorded as delivered while the
/// first vendor's calls are still held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_endpoint_does_not_delay_another_vendors_delivery() {
    let env = TestEnv::start(Fsync::Off).await;
    let release = CancellationToken::new();
    let (slow_url, mut slow_calls) = hanging_receiver(release.clone()).await;
    let (fast_url, mut fast_calls) = receiver(0).await;
    let hooks = Webhooks::new(env.pipeline.clone());
    hooks.set("vendor-slow", &slow_url).await.unwrap();
    hooks.set("vendor-fast", &fast_url).await.unwrap();
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(fast_runner(4), shutdown.clone()).await;
    let delivery = tokio::spawn(run_deliveries(
        env.pipeline.clone(),
        sender(true),
        fast_delivery(),
        shutdown.clone(),
    ));

    // The slow vendor's notices first, more of them than it may send at
    // once; the fast vendor's job ends only once the slow endpoint is
    // holding a call.
    let slow = env.submit("vendor-slow", 4, 1, &[Operation::Resize], 64).await;
    env.wait_terminal(&slow, Duration::from_secs(30)).await;
    next_call(&mut slow_calls).await;
    let fast = env.submit("vendor-fast", 1, 1, &[Operation::Resize], 64).await;
    env.wait_terminal(&fast, Duration::from_secs(30)).await;

    // Well under the 30 s the slow endpoint holds each call.
    let call = tokio::time::timeout(Duration::from_secs(15), fast_calls.recv())
        .await
        .expect("the fast vendor's webhook waited for the slow vendor's endpoint")
        .unwrap();
    let notice: JobFinished = serde_json::from_slice(&call.body).unwrap();
    assert_eq!(notice.job_id, fast[0]);
    // Settled as soon as it finished, not with the slow ones.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let job = env.jobs.get(Some("vendor-fast"), &fast[0]).await.unwrap().unwrap();
        match job.webhook {
            Some(w) if w.starts_with("delivered") => break,
            w if std::time::Instant::now() > deadline => panic!("the fast delivery was not settled: {w:?}"),
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    // The slow vendor never had more than its share in flight, and its
    // notices are still held, not given up.
    assert!(
        slow_calls.len() < WebhookDeliveryConfig::default().per_vendor_concurrency,
        "more of the slow vendor's calls were sent at once than its share"
    );
    for id in &slow {
        let job = env.jobs.get(Some("vendor-slow"), id).await.unwrap().unwrap();
        assert!(
            job.webhook.as_deref().is_none_or(|w| !w.starts_with("failed")),
            "{:?}",
            job.webhook
        );
    }

    release.cancel();
    shutdown.cancel();
    delivery.await.unwrap().unwrap();
    while stages.join_next().await.is_some() {}
}
