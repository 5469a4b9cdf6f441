//! Operating the pipeline, against real stages, a private redis-server, the
//! API over real HTTP and the binary itself: queue stats and throughput,
//! worker health, the `stats` and `dlq` commands, and `/metrics` checked
//! by Prometheus' own `promtool`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::http::ADMIN_KEY;
use common::*;
use image_queue_pipeline::redis_server::Fsync;
use image_queue_pipeline::Operation;
use serde_json::Value;
use tokio_util::sync::CancellationToken;

const BIN: &str = env!("CARGO_BIN_EXE_image-queue");

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed to check /metrics: apt-get install prometheus");
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool rejects /metrics:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stats_health_metrics_and_the_stats_command_describe_a_running_pipeline() {
    image_queue_api::metrics::install();
    let env = TestEnv::start(Fsync::Off).await;
    let api = env.serve_api().await;
    let shutdown = CancellationToken::new();
    let mut stages = env.run_all_stages(fast_runner(2), shutdown.clone()).await;
    let mut finished = env.finished_listener().await;
    let ids = env.submit("vendor-a", 4, 2, &[Operation::Resize], 48).await;
    finished.wait(&ids, Duration::from_secs(60)).await;

    // Heartbeats are published as workers start; wait for all six.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stats: Value = loop {
        let s: Value = api
            .client
            .get(api.url("/api/image-queue/queue-stats"))
            .bearer_auth(ADMIN_KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if s["workers"].as_array().unwrap().len() == 6 || std::time::Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stage = |name: &str| {
        stats["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stage"] == name)
            .unwrap()
            .clone()
    };
    let resize = stage("resize");
    assert_eq!(resize["totals"]["processed"], 8, "{resize}");
    assert!(resize["throughput_1m"].as_f64().unwrap() > 0.0, "{resize}");
    assert!(resize["throughput_5m"].as_f64().unwrap() > 0.0, "{resize}");
    assert_eq!(resize["lag"], 0);
    assert_eq!(resize["live_workers"], 1);
    let consumers = resize["consumers"].as_array().unwrap();
    assert_eq!(consumers.len(), 1, "{resize}");
    assert_eq!(consumers[0]["live"], true);
    assert!(consumers[0]["host"].is_string());
    assert_eq!(stage("bg-removal")["totals"]["processed"], 0, "not asked for");
    assert_eq!(stats["dead_letters"], 0);
    assert!(resize["advice"].is_null(), "{resize}");

    let health = api.client.get(api.url("/api/worker/health")).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);

    // /metrics: the runner's counters and timings, stream gauges and HTTP
    // metrics, in a format Prometheus accepts.
    let text = api
        .client
        .get(api.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "image_queue_events_processed_total{stage=\"resize\"}",
        "image_queue_handle_seconds_bucket{stage=\"resize\"",
        "image_queue_stage_lag{stage=\"bg-removal\"} 0",
        "image_queue_stage_live_workers{stage=\"resize\"} 1",
        "image_queue_dead_letters 0",
        "image_queue_http_requests_total{method=\"GET\",route=\"/api/image-queue/queue-stats\",status=\"200\"}",
    ] {
        assert!(text.contains(needle), "no {needle} in /metrics:\n{text}");
    }
    promtool_check(&text);

    // With the workers gone, new work has nobody to do it: health says so,
    // and so do the stats and the stats command.
    shutdown.cancel();
    while stages.join_next().await.is_some() {}
    env.submit("vendor-b", 1, 3, &[Operation::Resize], 32).await;
    // The API serves figures up to a second old (api.stats_cache_ms).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let health = loop {
        let health = api.client.get(api.url("/api/worker/health")).send().await.unwrap();
        if health.status().as_u16() == 503 || std::time::Instant::now() > deadline {
            break health;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health.status().as_u16(), 503);
    let body: Value = health.json().await.unwrap();
    assert_eq!(body["stages_without_workers"], serde_json::json!(["rate-check"]));

    let out = Command::new(BIN)
        .args(["--redis-url", &env.redis.url(), "stats", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["stages"][0]["lag"], 3);
    assert_eq!(json["vendor_backlog"]["vendor-b"], 3);

    let out = Command::new(BIN)
        .args(["--redis-url", &env.redis.url(), "stats"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let table = String::from_utf8_lossy(&out.stdout);
    println!("{table}");
    assert!(
        table.starts_with("STAGE"),
        "not on a terminal: one plain table\n{table}"
    );
    assert!(
        table.contains("rate-check: 3 waiting and no live worker"),
        "the table says what to do:\n{table}"
    );

    // The dlq command on an empty dead-letter stream.
    let out = Command::new(BIN)
        .args(["--redis-url", &env.redis.url(), "dlq", "list"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "No dead letters match.");
    let out = Command::new(BIN)
        .args(["--redis-url", &env.redis.url(), "dlq", "purge"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "purging everything needs --all");

    // Admin routes answer the admin key only.
    let r = api
        .client
        .get(api.url(&format!("/api/admin/job/{}", ids[0])))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["vendor"], "vendor-a");
    let r = api
        .client
        .get(api.url(&format!("/api/admin/job/{}", ids[0])))
        .bearer_auth(&api.vendor_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pages_are_served_from_the_binary() {
    let env = TestEnv::start(Fsync::Off).await;
    let api = env.serve_api().await;
    for (path, needle) in [
        ("/", "Submit product images"),
        ("/dashboard", "image-queue dashboard"),
        ("/assets/dashboard.js", "queue-stats"),
        ("/assets/app.css", ".pipeline"),
    ] {
        let r = api.client.get(api.url(path)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
        let text = r.text().await.unwrap();
        assert!(text.contains(needle), "{path}");
    }
    let r = api.client.get(api.url("/assets/nope.js")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 404);
}
