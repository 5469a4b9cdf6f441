//! The rembg engine against real rembg servers: cutouts, load balancing,
//! ejection of a killed instance with the request retried on another, and
//! re-admission when the instance comes back on the same port.
//!
//! Needs rembg and the u2netp model: `scripts/install-rembg.sh`. rembg is
//! slow to start and to run, so one test covers the pool's behaviours in
//! sequence over two instances.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use image::ImageFormat;
use image_queue_pipeline::Stage;
use image_queue_stages::rembg::RembgConfig;
use image_queue_stages::BgRemovalConfig;
use support::{context, encode, event_for, product_photo, working, RembgServer, REMBG_START_TIMEOUT};

fn config(urls: Vec<String>, model: &str) -> RembgConfig {
    RembgConfig {
        urls,
        model: model.into(),
        // One at a time per instance, so six concurrent requests must spread.
        max_per_instance: 1,
        timeout_ms: 120_000,
        wait_ready_ms: REMBG_START_TIMEOUT.as_millis() as u64,
        readmit_min_ms: 100,
        readmit_max_ms: 1_000,
        ..RembgConfig::default()
    }
}

fn assert_cutout(img: &image::RgbaImage, what: &str) {
    let (w, h) = img.dimensions();
    for (x, y) in [(0, 0), (w - 1, 0), (0, h - 1), (w - 1, h - 1)] {
        assert_eq!(
            img.get_pixel(x, y)[3],
            0,
            "{what}: backdrop at ({x},{y}) is not transparent"
        );
    }
    for (x, y) in [(w / 2, h / 2), (w / 2 - w / 8, h / 2), (w / 2, h / 2 + h / 8)] {
        assert!(
            img.get_pixel(x, y)[3] >= 250,
            "{what}: subject at ({x},{y}) is not opaque: {:?}",
            img.get_pixel(x, y)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rembg_pool_cuts_out_balances_ejects_and_readmits() {
    let (a, mut b) = tokio::join!(RembgServer::start(None), RembgServer::start(None));
    let (ctx, _dir) = context();
    let stage = BgRemovalConfig::Rembg(config(vec![a.url(), b.url()], "u2netp"))
        .build(ctx.clone())
        .unwrap();
    let pool = stage.rembg_pool().unwrap().clone();
    assert!(
        pool.wait_for(Duration::from_secs(60), |s| s.iter().all(|i| i.ready))
            .await,
        "both instances answer /openapi.json but the pool did not admit them: {:?}",
        pool.status()
    );

    // Real images, concurrently: every result is a cutout, and both
    // instances share the work.
    let photo = product_photo(320, 240);
    let mut events = Vec::new();
    for i in 0..6 {
        let format = if i % 2 == 0 {
            ImageFormat::Jpeg
        } else {
            ImageFormat::Png
        };
        events.push(event_for(&ctx, "balance", i, encode(&photo, format)).await);
    }
    let done = join_all(events.into_iter().map(|e| stage.handle(e))).await;
    let mut by_instance = BTreeMap::<String, usize>::new();
    for (i, r) in done.into_iter().enumerate() {
        let image_queue_pipeline::Outcome::Done(ev) = r.unwrap_or_else(|e| panic!("image {i}: {e}")) else {
            panic!("image {i} deferred")
        };
        assert_eq!(ev.notes["bg_engine"], "rembg");
        let instance = ev.notes["bg_instance"].as_str().unwrap().to_string();
        assert!(instance == a.url() || instance == b.url(), "{instance}");
        *by_instance.entry(instance).or_default() += 1;
        assert_cutout(&working(&ctx, &ev).await, &format!("image {i}"));
    }
    assert!(
        by_instance.len() == 2 && by_instance.values().all(|&n| n >= 2),
        "six requests, one at a time per instance, should spread over both: {by_instance:?}"
    );
    eprintln!("six concurrent requests by instance: {by_instance:?}");

    // rembg refusing the request (an unknown model: 422) is permanent and
    // no reason to eject anyone.
    let (ctx2, _dir2) = context();
    let refusing = BgRemovalConfig::Rembg(config(vec![a.url()], "no-such-model"))
        .build(ctx2.clone())
        .unwrap();
    let ev = event_for(&ctx2, "refused", 0, encode(&photo, ImageFormat::Png)).await;
    let err = refusing.handle(ev).await.expect_err("an unknown model is refused");
    assert!(!err.is_retryable(), "{err}");
    assert!(err.message.contains("422"), "{err}");
    let st = refusing.rembg_pool().unwrap().status();
    assert!(st[0].ready && st[0].ejections == 0, "{st:?}");

    // Kill b. Requests keep succeeding, all on a; the one that met the dead
    // instance was retried on a within the same call.
    b.kill().await;
    for i in 0..6 {
        let ev = event_for(&ctx, "failover", i, encode(&photo, ImageFormat::Png)).await;
        let image_queue_pipeline::Outcome::Done(ev) = stage.handle(ev).await.expect("a dead instance is not a failure")
        else {
            panic!("deferred")
        };
        assert_eq!(ev.notes["bg_instance"].as_str(), Some(a.url().as_str()));
        assert_cutout(&working(&ctx, &ev).await, "after the kill");
        if !pool.status()[1].ready {
            break;
        }
    }
    let st = pool.status();
    assert!(!st[1].ready && st[1].ejections >= 1, "b was not ejected: {st:?}");
    assert!(pool.failovers() >= 1, "no request was retried on another instance");
    eprintln!("after killing b: {st:?}, failovers: {}", pool.failovers());

    // b comes back on the same port: the pool's probes re-admit it, and
    // having served less, it takes the next request.
    b.restart().await;
    assert!(
        pool.wait_for(Duration::from_secs(30), |s| s[1].ready).await,
        "b answers /openapi.json again but was not re-admitted: {:?}",
        pool.status()
    );
    let ev = event_for(&ctx, "readmitted", 0, encode(&photo, ImageFormat::Png)).await;
    let image_queue_pipeline::Outcome::Done(ev) = stage.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    assert_eq!(ev.notes["bg_instance"].as_str(), Some(b.url().as_str()));
    assert_cutout(&working(&ctx, &ev).await, "after re-admission");
}
