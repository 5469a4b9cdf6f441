//! The vendor-facing API end to end: the real router, a private
//! redis-server per test, a local blob store in a temporary directory.
//! Requests go through `tower::ServiceExt::oneshot`, with the peer address a
//! real server would attach, so the per-IP limits see a client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use image_queue_api::{app, ApiConfig, AppState, Auth, Limit, ProgressHub};
use image_queue_pipeline::redis_server::{Fsync, RedisServer};
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{
    ImageEvent, JobStore, LocalBlobStore, Outcome, Pipeline, RetryPolicy, RunnerConfig, Stage, StageError, StageName,
};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const ADMIN: &str = "admin-key-for-tests";

struct Harness {
    app: Router,
    p: Pipeline,
    redis: RedisServer,
    dir: TempDir,
}

async fn harness(config: ApiConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(&dir.path().join("redis"), Fsync::Off).await.unwrap();
    let (app, p) = instance(&redis, &dir, config).await;
    Harness { app, p, redis, dir }
}

/// One API process's worth of state on an existing Redis: its own
/// connections, scripts and router.
async fn instance(redis: &RedisServer, dir: &TempDir, config: ApiConfig) -> (Router, Pipeline) {
    let blobs = Arc::new(LocalBlobStore::new(dir.path().join("blobs")).unwrap());
    let p = Pipeline::connect(&redis.url(), "iq", blobs.clone()).await.unwrap();
    let state = AppState {
        jobs: JobStore::new(p.clone(), 3600),
        blobs,
        auth: Auth::new(p.clone(), Some(ADMIN)),
        config,
        media_dir: None,
        progress: ProgressHub::new(p.clone()),
    };
    (app(state), p)
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Resp {
    /// Asserts an error answer: its status, and the one error shape.
    fn error(&self, status: StatusCode, code: &str) -> &Self {
        assert_eq!(self.status, status, "{}", self.body);
        let e = &self.body["error"];
        assert_eq!(e["code"], code, "{}", self.body);
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{}", self.body);
        assert_eq!(self.body.as_object().unwrap().len(), 1, "{}", self.body);
        assert_eq!(e.as_object().unwrap().len(), 2, "{}", self.body);
        self
    }
}

const CLIENT: &str = "203.0.113.7:40000";

async fn send_from(app: &Router, peer: &str, mut req: Request<Body>) -> Resp {
    req.extensions_mut()
        .insert(ConnectInfo(peer.parse::<SocketAddr>().unwrap()));
    let resp = app.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX).await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)))
    };
    Resp { status, headers, body }
}

async fn send(app: &Router, req: Request<Body>) -> Resp {
    send_from(app, CLIENT, req).await
}

fn req(method: &str, uri: &str, key: Option<&str>) -> axum::http::request::Builder {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b
}

fn get(uri: &str, key: &str) -> Request<Body> {
    req("GET", uri, Some(key)).body(Body::empty()).unwrap()
}

fn json_req(method: &str, uri: &str, key: Option<&str>, body: &Value) -> Request<Body> {
    req(method, uri, key)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn job_body(ops: &[&str], images: usize) -> Value {
    let images: Vec<Value> = (0..images)
        .map(|i| json!({"url": format!("https://images.example.com/{i}.jpg"), "record_id": format!("sku-{i}")}))
        .collect();
    json!({"operations": ops, "images": images})
}

fn submit(key: &str, ops: &[&str], images: usize) -> Request<Body> {
    json_req("POST", "/api/image-queue/jobs", Some(key), &job_body(ops, images))
}

async fn new_vendor(app: &Router, id: &str) -> String {
    let r = send(
        app,
        json_req("POST", "/api/admin/vendors", Some(ADMIN), &json!({"vendor_id": id})),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    assert_eq!(r.body["vendor_id"], id);
    r.body["api_key"].as_str().unwrap().to_string()
}

/// A multipart body of `(field, file name, bytes)` parts.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "XtestBoundary7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (name, file, data) in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        match file {
            Some(f) => body.extend_from_slice(
                format!(
                    "Content-Disposition: form-data; name=\"{name}\"; filename=\"{f}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                )
                .as_bytes(),
            ),
            None => body.extend_from_slice(format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n").as_bytes()),
        }
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn multipart_req(key: &str, parts: &[(&str, Option<&str>, &[u8])]) -> Request<Body> {
    let (ct, body) = multipart(parts);
    req("POST", "/api/image-queue/jobs", Some(key))
        .header("content-type", ct)
        .body(Body::from(body))
        .unwrap()
}

/// A valid 1×1 PNG of `len` bytes or more: padded with a text chunk, so
/// that the API's screening (header, dimensions, IEND at the end) passes.
fn png(len: usize) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let start = out.len();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = crc32fast::hash(&out[start..]);
        out.extend_from_slice(&crc.to_be_bytes());
    }
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut v, b"IHDR", &[0, 0, 0, 1, 0, 0, 0, 1, 8, 0, 0, 0, 0]);
    // One grey pixel: filter byte 0, value 0, in a stored zlib block.
    chunk(
        &mut v,
        b"IDAT",
        &[0x78, 0x01, 0x01, 0x02, 0x00, 0xfd, 0xff, 0, 0, 0x00, 0x02, 0x00, 0x01],
    );
    let pad = len.saturating_sub(v.len() + 12 + 12);
    let mut text = b"x\0".to_vec();
    text.resize(pad.max(2), b'.');
    chunk(&mut v, b"tEXt", &text);
    chunk(&mut v, b"IEND", &[]);
    v
}

#[tokio::test]
async fn vendors_cannot_see_list_or_cancel_each_others_jobs() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let b = new_vendor(&h.app, "vendor-b").await;

    let r = send(&h.app, submit(&a, &["resize"], 2)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    let job = r.body["job_id"].as_str().unwrap().to_string();
    let url = format!("/api/image-queue/job/{job}");
    // Nothing has been processed yet, so there is no throughput to
    // estimate with: no estimate, rather than one with a rate of 0.
    assert!(r.body.get("estimated_start").is_none(), "{}", r.body);

    let own = send(&h.app, get(&url, &a)).await;
    assert_eq!(own.status, StatusCode::OK);
    assert_eq!(own.body["job_id"], job.as_str());
    assert_eq!(own.body["total"], 2);
    assert!(own.body.get("estimated_start").is_none(), "{}", own.body);

    // Another vendor's job answers exactly like a job that does not exist.
    let missing = send(&h.app, get(&format!("/api/image-queue/job/{}", "0".repeat(32)), &b)).await;
    missing.error(StatusCode::NOT_FOUND, "not_found");
    let theirs = send(&h.app, get(&url, &b)).await;
    assert_eq!((theirs.status, &theirs.body), (missing.status, &missing.body));

    let listed = send(&h.app, get("/api/image-queue/jobs", &b)).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert_eq!(listed.body["jobs"], json!([]));
    let listed = send(&h.app, get("/api/image-queue/jobs", &a)).await;
    assert_eq!(listed.body["jobs"].as_array().unwrap().len(), 1);

    let cancel = send(&h.app, req("DELETE", &url, Some(&b)).body(Body::empty()).unwrap()).await;
    assert_eq!((cancel.status, &cancel.body), (missing.status, &missing.body));
    // And the owner's job was left alone.
    let own = send(&h.app, get(&url, &a)).await;
    assert_eq!(own.body["status"], "queued");
}

#[tokio::test]
async fn keys_are_required_and_admin_routes_need_the_admin_key() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;

    let none = send(
        &h.app,
        req("GET", "/api/image-queue/jobs", None).body(Body::empty()).unwrap(),
    )
    .await;
    none.error(StatusCode::UNAUTHORIZED, "unauthorized");
    let wrong = send(&h.app, get("/api/image-queue/jobs", &"f".repeat(64))).await;
    wrong.error(StatusCode::UNAUTHORIZED, "unauthorized");
    let basic = req("GET", "/api/image-queue/jobs", None)
        .header("authorization", format!("Basic {a}"))
        .body(Body::empty())
        .unwrap();
    send(&h.app, basic)
        .await
        .error(StatusCode::UNAUTHORIZED, "unauthorized");

    // A vendor's key is known but not enough for operators' routes.
    send(&h.app, get("/api/admin/dead-letters", &a))
        .await
        .error(StatusCode::FORBIDDEN, "forbidden");
    let make = json_req("POST", "/api/admin/vendors", Some(&a), &json!({"vendor_id": "evil"}));
    send(&h.app, make).await.error(StatusCode::FORBIDDEN, "forbidden");
    send(&h.app, get("/api/admin/dead-letters", "nope"))
        .await
        .error(StatusCode::UNAUTHORIZED, "unauthorized");

    // The admin key reads the dead letters, newest first.
    let mut conn = h.p.endpoint.connect(None).await.unwrap();
    for i in 0..3 {
        let _: String = redis::cmd("XADD")
            .arg(h.p.keys.dead_letters())
            .arg("*")
            .arg(&[
                ("stage", "resize"),
                ("job", "j1"),
                ("vendor", "vendor-a"),
                ("error", "bad image"),
            ])
            .arg("image")
            .arg(i)
            .arg("e")
            .arg(r#"{"job":"j1"}"#)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let dl = send(&h.app, get("/api/admin/dead-letters?limit=2", ADMIN)).await;
    assert_eq!(dl.status, StatusCode::OK, "{}", dl.body);
    let entries = dl.body["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2);
    assert_eq!(entries[0]["image"], 2);
    assert_eq!(entries[0]["error"], "bad image");
    assert_eq!(entries[0]["event"]["job"], "j1");
    let next = dl.body["next_cursor"].as_str().unwrap();
    let dl = send(&h.app, get(&format!("/api/admin/dead-letters?before={next}"), ADMIN)).await;
    assert_eq!(dl.body["entries"].as_array().unwrap().len(), 1);
    assert_eq!(dl.body["entries"][0]["image"], 0);

    // The admin route's own input is checked like any other.
    let bad = json_req("POST", "/api/admin/vendors", Some(ADMIN), &json!({"vendor_id": "a b"}));
    send(&h.app, bad)
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");
    let bad = json_req(
        "POST",
        "/api/admin/vendors",
        Some(ADMIN),
        &json!({"vendor_id": "x", "wieght": 2}),
    );
    send(&h.app, bad)
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");
    let ok = json_req(
        "POST",
        "/api/admin/vendors",
        Some(ADMIN),
        &json!({"vendor_id": "heavy", "weight": 5}),
    );
    let r = send(&h.app, ok).await;
    assert_eq!((r.status, &r.body["weight"]), (StatusCode::CREATED, &json!(5)));
    let key = r.body["api_key"].as_str().unwrap();
    assert_eq!(
        send(&h.app, get("/api/image-queue/jobs", key)).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn bad_input_is_refused_with_the_right_status() {
    let config = ApiConfig {
        max_image_bytes: 1024,
        max_images_per_job: 2,
        ..ApiConfig::default()
    };
    let h = harness(config).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let jobs = "/api/image-queue/jobs";

    let malformed = req("POST", jobs, Some(&a))
        .header("content-type", "application/json")
        .body(Body::from("{\"operations\": [\"resize\""))
        .unwrap();
    send(&h.app, malformed)
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request");

    let mut unknown = job_body(&["resize"], 1);
    unknown["priority"] = json!("high");
    send(&h.app, json_req("POST", jobs, Some(&a), &unknown))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");

    let text = req("POST", jobs, Some(&a))
        .header("content-type", "text/plain")
        .body(Body::from(job_body(&["resize"], 1).to_string()))
        .unwrap();
    send(&h.app, text)
        .await
        .error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");

    send(&h.app, submit(&a, &["sharpen"], 1))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");
    send(&h.app, submit(&a, &["resize"], 3))
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    send(&h.app, submit(&a, &["resize"], 0))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");

    let small = png(100);
    let big = png(2048);
    let r = send(
        &h.app,
        multipart_req(
            &a,
            &[
                ("operations", None, b"resize"),
                ("images", Some("a.png"), &big),
                ("record_id", None, b"sku-1"),
            ],
        ),
    )
    .await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    let r = send(
        &h.app,
        multipart_req(
            &a,
            &[
                ("operations", None, b"resize"),
                ("images", Some("notes.png"), b"just some text, not an image"),
                ("record_id", None, b"sku-1"),
            ],
        ),
    )
    .await;
    r.error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");

    let three: Vec<(&str, Option<&str>, &[u8])> = std::iter::once(("operations", None, &b"resize"[..]))
        .chain((0..3).map(|_| ("images", Some("a.png"), &small[..])))
        .collect();
    send(&h.app, multipart_req(&a, &three))
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    let r = send(
        &h.app,
        multipart_req(
            &a,
            &[
                ("operations", None, b"sharpen"),
                ("images", Some("a.png"), &small),
                ("record_id", None, b"sku-1"),
            ],
        ),
    )
    .await;
    r.error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");

    // Nothing refused left a job or a blob behind.
    let listed = send(&h.app, get(jobs, &a)).await;
    assert_eq!(listed.body["jobs"], json!([]));
    let blobs = h.dir.path().join("blobs");
    assert_eq!(std::fs::read_dir(&blobs).unwrap().count(), 0);

    // And a good multipart upload is taken.
    let r = send(
        &h.app,
        multipart_req(
            &a,
            &[
                ("operations", None, b"resize"),
                ("images", Some("a.png"), &small),
                ("record_id", None, b"sku-1"),
            ],
        ),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);

    // Unknown routes, methods and query fields answer in the same shape.
    send(&h.app, get("/api/nothing-here", &a))
        .await
        .error(StatusCode::NOT_FOUND, "not_found");
    let put = req("PUT", jobs, Some(&a)).body(Body::empty()).unwrap();
    send(&h.app, put)
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
    send(&h.app, get("/api/image-queue/jobs?colour=red", &a))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");
}

#[tokio::test]
async fn a_retried_submit_with_an_idempotency_key_returns_the_same_job() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let b = new_vendor(&h.app, "vendor-b").await;
    let with_key = |key: &str, idem: &str| {
        req("POST", "/api/image-queue/jobs", Some(key))
            .header("content-type", "application/json")
            .header("idempotency-key", idem)
            .body(Body::from(job_body(&["resize"], 1).to_string()))
            .unwrap()
    };
    let first = send(&h.app, with_key(&a, "order-42")).await;
    assert_eq!(first.status, StatusCode::ACCEPTED);
    let again = send(&h.app, with_key(&a, "order-42")).await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.body["job_id"], first.body["job_id"]);
    // Keys are per vendor: another vendor's same key is its own job.
    let other = send(&h.app, with_key(&b, "order-42")).await;
    assert_eq!(other.status, StatusCode::ACCEPTED);
    assert_ne!(other.body["job_id"], first.body["job_id"]);
    let listed = send(&h.app, get("/api/image-queue/jobs", &a)).await;
    assert_eq!(listed.body["jobs"].as_array().unwrap().len(), 1);
    // The same key with another request is refused, not answered with the
    // earlier job.
    let different = req("POST", "/api/image-queue/jobs", Some(&a))
        .header("content-type", "application/json")
        .header("idempotency-key", "order-42")
        .body(Body::from(job_body(&["resize"], 2).to_string()))
        .unwrap();
    send(&h.app, different)
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");
    let listed = send(&h.app, get("/api/image-queue/jobs", &a)).await;
    assert_eq!(listed.body["jobs"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn cancel_then_cancel_again_conflicts() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let r = send(&h.app, submit(&a, &["resize"], 1)).await;
    let url = format!("/api/image-queue/job/{}", r.body["job_id"].as_str().unwrap());
    let delete = || req("DELETE", &url, Some(&a)).body(Body::empty()).unwrap();
    let c = send(&h.app, delete()).await;
    assert_eq!(c.status, StatusCode::OK, "{}", c.body);
    assert_eq!(c.body["status"], "cancelled");
    assert_eq!(send(&h.app, get(&url, &a)).await.body["status"], "cancelled");
    send(&h.app, delete()).await.error(StatusCode::CONFLICT, "conflict");
}

fn header<'a>(r: &'a Resp, name: &str) -> &'a str {
    r.headers
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bg_removal_submits_admit_exactly_the_limit() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let (app, a) = (h.app.clone(), a.clone());
            tokio::spawn(async move { send(&app, submit(&a, &["bg-removal"], 1)).await })
        })
        .collect();
    let mut admitted = 0;
    let mut refused = Vec::new();
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            StatusCode::ACCEPTED => admitted += 1,
            _ => refused.push(r),
        }
    }
    println!("admitted {admitted} of 64 concurrent bg-removal submits");
    assert_eq!(admitted, 30);
    assert_eq!(refused.len(), 34);
    for r in &refused {
        r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
        let retry: u64 = header(r, "retry-after").parse().unwrap();
        assert!((1..=3600).contains(&retry), "{retry}");
        assert!(header(r, "ratelimit-policy").contains("\"bg-removal-images\";q=30;w=3600"));
        assert!(header(r, "ratelimit").contains(&format!("\"bg-removal-images\";r=0;t={retry}")));
    }
    // A refused submit spent none of the other limits: 30 submits used of 50.
    let jobs = send(&h.app, submit(&a, &["resize"], 1)).await;
    assert_eq!(jobs.status, StatusCode::ACCEPTED);
    assert!(
        header(&jobs, "ratelimit").contains("\"submits\";r=19;"),
        "{}",
        header(&jobs, "ratelimit")
    );
}

#[tokio::test]
async fn bulk_jobs_and_submits_have_their_own_limits() {
    let mut config = ApiConfig::default();
    config.rate_limits.bulk_jobs_per_vendor = Limit::new(2, 3600);
    config.rate_limits.submits_per_vendor = Limit::new(4, 900);
    let h = harness(config).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    for _ in 0..2 {
        assert_eq!(
            send(&h.app, submit(&a, &["resize"], 11)).await.status,
            StatusCode::ACCEPTED
        );
    }
    let r = send(&h.app, submit(&a, &["resize"], 11)).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(header(&r, "ratelimit").contains("\"bulk-jobs\";r=0"));
    // Ten images is not bulk.
    assert_eq!(
        send(&h.app, submit(&a, &["resize"], 10)).await.status,
        StatusCode::ACCEPTED
    );
    // The refused bulk job spent no submit: this is the fourth of four.
    assert_eq!(
        send(&h.app, submit(&a, &["resize"], 1)).await.status,
        StatusCode::ACCEPTED
    );
    let r = send(&h.app, submit(&a, &["resize"], 1)).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(header(&r, "ratelimit").contains("\"submits\";r=0"));
    // More bg-removal images than the limit allows at all is not a matter
    // of waiting: it is refused as such.
    let b = new_vendor(&h.app, "vendor-b").await;
    send(&h.app, submit(&b, &["bg-removal"], 31))
        .await
        .error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");
}

#[tokio::test]
async fn the_per_ip_write_limit_holds_across_api_processes() {
    let mut config = ApiConfig::default();
    config.rate_limits.writes_per_ip = Limit::new(5, 900);
    config.rate_limits.trusted_proxies = vec!["10.0.0.0/8".into()];
    let h = harness(config.clone()).await;
    let (second, _p2) = instance(&h.redis, &h.dir, config).await;
    let write = || req("POST", "/api/image-queue/jobs", None).body(Body::empty()).unwrap();
    let mut statuses = Vec::new();
    for i in 0..12 {
        let app = if i % 2 == 0 { &h.app } else { &second };
        statuses.push(send(app, write()).await.status);
    }
    let admitted = statuses.iter().filter(|s| **s != StatusCode::TOO_MANY_REQUESTS).count();
    assert_eq!(admitted, 5, "{statuses:?}");
    let r = send(&second, write()).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(header(&r, "ratelimit-policy").contains("\"writes\";q=5;w=900"));
    assert!(header(&r, "retry-after").parse::<u64>().unwrap() >= 1);

    // Reads are not writes.
    let read = send(&h.app, req("GET", "/healthz", None).body(Body::empty()).unwrap()).await;
    assert_eq!(read.status, StatusCode::OK);

    // Another client has its own bucket; claiming another address in
    // X-Forwarded-For does not get the limited client one.
    send(&h.app, write())
        .await
        .error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let spoofed = req("POST", "/api/image-queue/jobs", None)
        .header("x-forwarded-for", "198.51.100.99")
        .body(Body::empty())
        .unwrap();
    send(&h.app, spoofed)
        .await
        .error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(
        send_from(&h.app, "198.51.100.1:1000", write()).await.status,
        StatusCode::UNAUTHORIZED
    );

    // Behind a trusted proxy, the forwarded client is the subject.
    let via_proxy = |client: &str| {
        req("POST", "/api/image-queue/jobs", None)
            .header("x-forwarded-for", format!("{client}, 10.1.1.1"))
            .body(Body::empty())
            .unwrap()
    };
    let r = send_from(&h.app, "10.0.0.2:1000", via_proxy("203.0.113.7")).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let r = send_from(&h.app, "10.0.0.2:1000", via_proxy("198.51.100.50")).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);

    // IPv6 clients are counted by their /64.
    for i in 0..5 {
        let peer = format!("[2001:db8:1:2::{i:x}]:1000");
        assert_eq!(send_from(&h.app, &peer, write()).await.status, StatusCode::UNAUTHORIZED);
    }
    send_from(&h.app, "[2001:db8:1:2:ffff::1]:1000", write())
        .await
        .error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(
        send_from(&h.app, "[2001:db8:1:3::1]:1000", write()).await.status,
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn the_window_slides() {
    let mut config = ApiConfig::default();
    config.rate_limits.status_reads_per_vendor = Limit::new(3, 1);
    let h = harness(config).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    for _ in 0..3 {
        let r = send(&h.app, get("/api/image-queue/jobs", &a)).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(header(&r, "ratelimit-policy").contains("\"status-reads\";q=3;w=1"));
    }
    let r = send(&h.app, get("/api/image-queue/jobs", &a)).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert_eq!(header(&r, "retry-after"), "1");
    // Waiting out the window is the behaviour under test, not a guess at
    // when something else finished.
    tokio::time::sleep(std::time::Duration::from_millis(1050)).await;
    assert_eq!(
        send(&h.app, get("/api/image-queue/jobs", &a)).await.status,
        StatusCode::OK
    );
}

/// A stage that passes every image on, except that resize fails for good
/// the images whose record id is "bad", and fails "flaky" ones once in a
/// way worth retrying.
struct PassThrough(StageName);

#[async_trait::async_trait]
impl Stage for PassThrough {
    fn name(&self) -> StageName {
        self.0
    }

    async fn handle(&self, event: ImageEvent) -> Result<Outcome, StageError> {
        if self.0 == StageName::Resize && event.record_id == "bad" {
            return Err(StageError::permanent("this image is bad"));
        }
        if self.0 == StageName::Resize && event.record_id == "flaky" && event.attempt == 0 {
            return Err(StageError::retryable("try me again"));
        }
        Ok(Outcome::Done(event))
    }
}

/// Server-sent events read off a response body: (event name, data).
struct Events {
    body: axum::body::BodyDataStream,
    buf: String,
}

impl Events {
    /// The next event; `None` once the stream has ended.
    async fn next(&mut self) -> Option<(String, Value)> {
        use futures::StreamExt;
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut name, mut data) = (String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.body.next())
                .await
                .expect("no event within 30 s")?
                .unwrap();
            self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
        }
    }
}

async fn open_events(app: &Router, key: &str, job: &str) -> Events {
    let mut r = get(&format!("/api/image-queue/job/{job}/events"), key);
    r.extensions_mut()
        .insert(ConnectInfo(CLIENT.parse::<SocketAddr>().unwrap()));
    let resp = app.clone().oneshot(r).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    Events {
        body: resp.into_body().into_data_stream(),
        buf: String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_events_stream_every_transition_and_end_with_the_job() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let b = new_vendor(&h.app, "vendor-b").await;
    let body = json!({"operations": ["resize"], "images": [
        {"url": "https://images.example.com/0.jpg", "record_id": "good"},
        {"url": "https://images.example.com/1.jpg", "record_id": "bad"},
        {"url": "https://images.example.com/2.jpg", "record_id": "flaky"},
    ]});
    let r = send(&h.app, json_req("POST", "/api/image-queue/jobs", Some(&a), &body)).await;
    let job = r.body["job_id"].as_str().unwrap().to_string();

    // Not the caller's job: the same 404 as any other read.
    send(&h.app, get(&format!("/api/image-queue/job/{job}/events"), &b))
        .await
        .error(StatusCode::NOT_FOUND, "not_found");

    let mut events = open_events(&h.app, &a, &job).await;
    let (name, first) = events.next().await.unwrap();
    assert_eq!((name.as_str(), &first["status"]), ("job", &json!("queued")));

    // Only now does the pipeline run, so every transition happens while
    // the stream is open.
    let shutdown = CancellationToken::new();
    let mut runners = Vec::new();
    for stage in StageName::ALL {
        let config = RunnerConfig {
            retry: RetryPolicy {
                base_ms: 20,
                jitter: 0.0,
                ..RetryPolicy::default()
            },
            ..RunnerConfig::default()
        };
        let runner = StageRunner::new(h.p.clone(), Arc::new(PassThrough(stage)), config);
        runners.push(tokio::spawn(runner.run(shutdown.clone())));
    }
    let mut seen: Vec<(String, Value)> = Vec::new();
    while let Some(ev) = events.next().await {
        seen.push(ev);
    }
    shutdown.cancel();
    for r in runners {
        r.await.unwrap().unwrap();
    }

    let (last_name, last) = seen.last().unwrap();
    assert_eq!(last_name, "done");
    assert_eq!(last["status"], "partially_failed");
    let progress: Vec<&Value> = seen.iter().filter(|(n, _)| n == "progress").map(|(_, v)| v).collect();
    let of = |image: u64| -> Vec<(String, String)> {
        progress
            .iter()
            .filter(|p| p["image"] == image)
            .map(|p| {
                (
                    p["stage"].as_str().unwrap().into(),
                    p["status"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect()
    };
    assert_eq!(
        of(0),
        pairs(&[
            ("resize", "processing"),
            ("upload", "processing"),
            ("db-commit", "processing"),
            ("done", "completed")
        ])
    );
    assert_eq!(of(1), pairs(&[("resize", "processing"), ("resize", "failed")]));
    assert_eq!(
        of(2),
        pairs(&[
            ("resize", "processing"),
            ("resize", "retrying"),
            ("upload", "processing"),
            ("db-commit", "processing"),
            ("done", "completed")
        ])
    );
    assert!(progress.iter().all(|p| p["job"] == job.as_str()));
    let job_level: Vec<&&Value> = progress.iter().filter(|p| p.get("image").is_none()).collect();
    assert_eq!(job_level.len(), 1);
    assert_eq!(job_level[0]["status"], "partially_failed");

    // A stream opened on an ended job says so at once and ends.
    let mut again = open_events(&h.app, &a, &job).await;
    assert_eq!(again.next().await.unwrap().0, "done");
    assert!(again.next().await.is_none());
}

#[tokio::test]
async fn a_cancelled_job_ends_its_event_stream() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let r = send(&h.app, submit(&a, &["resize"], 1)).await;
    let job = r.body["job_id"].as_str().unwrap().to_string();
    let mut events = open_events(&h.app, &a, &job).await;
    assert_eq!(events.next().await.unwrap().0, "job");
    let cancel = req("DELETE", &format!("/api/image-queue/job/{job}"), Some(&a))
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&h.app, cancel).await.status, StatusCode::OK);
    let (name, p) = events.next().await.unwrap();
    assert_eq!((name.as_str(), &p["status"]), ("progress", &json!("cancelled")));
    let (name, done) = events.next().await.unwrap();
    assert_eq!((name.as_str(), &done["status"]), ("done", &json!("cancelled")));
    assert!(events.next().await.is_none());
}

#[tokio::test]
async fn the_openapi_description_names_every_vendor_and_admin_route() {
    let h = harness(ApiConfig::default()).await;
    let r = send(&h.app, req("GET", "/openapi.json", None).body(Body::empty()).unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body["openapi"].as_str().unwrap().starts_with("3."));
    let paths = &r.body["paths"];
    for (path, method) in [
        ("/api/image-queue/jobs", "post"),
        ("/api/image-queue/jobs", "get"),
        ("/api/image-queue/job/{id}", "get"),
        ("/api/image-queue/job/{id}", "delete"),
        ("/api/image-queue/job/{id}/events", "get"),
        ("/api/admin/dead-letters", "get"),
        ("/api/admin/vendors", "post"),
        ("/api/image-queue/webhook", "put"),
        ("/api/image-queue/webhook", "get"),
        ("/api/image-queue/webhook", "delete"),
    ] {
        assert!(paths[path][method].is_object(), "{method} {path} is not described");
    }
    let submit = &paths["/api/image-queue/jobs"]["post"];
    assert!(submit["responses"]["429"].is_object());
    assert!(r.body["components"]["schemas"]["JsonJob"]["properties"]["operations"].is_object());
    assert!(r.body["components"]["securitySchemes"]["api_key"].is_object());
}

#[tokio::test]
async fn a_vendor_sets_reads_and_removes_its_own_webhook() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let b = new_vendor(&h.app, "vendor-b").await;
    let path = "/api/image-queue/webhook";

    let set = send(
        &h.app,
        json_req("PUT", path, Some(&a), &json!({"url": "https://shop.example/hooks/iq"})),
    )
    .await;
    assert_eq!(set.status, StatusCode::OK, "{}", set.body);
    let secret = set.body["secret"].as_str().unwrap();
    assert!(secret.starts_with("whsec_") && secret.len() >= 32, "{secret}");

    // Read back without the secret; another vendor sees none of it.
    let got = send(&h.app, get(path, &a)).await;
    assert_eq!(got.body, json!({"url": "https://shop.example/hooks/iq"}));
    let theirs = send(&h.app, get(path, &b)).await;
    assert_eq!(theirs.body, json!({"url": null}));
    assert!(!theirs.body.to_string().contains(secret));

    for bad in [
        json!({"url": "ftp://shop.example/x"}),
        json!({"url": "not a url"}),
        json!({"url": "https://x.example", "events": ["all"]}),
    ] {
        send(&h.app, json_req("PUT", path, Some(&a), &bad))
            .await
            .error(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable");
    }
    send(&h.app, req("PUT", path, None).body(Body::empty()).unwrap())
        .await
        .error(StatusCode::UNAUTHORIZED, "unauthorized");

    let removed = send(&h.app, req("DELETE", path, Some(&a)).body(Body::empty()).unwrap()).await;
    assert_eq!(removed.status, StatusCode::NO_CONTENT);
    assert_eq!(send(&h.app, get(path, &a)).await.body, json!({"url": null}));
}

#[tokio::test]
async fn the_status_filter_takes_an_empty_status_as_none_and_refuses_an_unknown_one() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    for _ in 0..2 {
        let r = send(&h.app, submit(&a, &["resize"], 1)).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
    }
    let count = |r: &Resp| r.body["jobs"].as_array().map(Vec::len);
    let all = send(&h.app, get("/api/image-queue/jobs?status=", &a)).await;
    assert_eq!((all.status, count(&all)), (StatusCode::OK, Some(2)), "{}", all.body);
    let queued = send(&h.app, get("/api/image-queue/jobs?status=queued", &a)).await;
    assert_eq!(count(&queued), Some(2), "{}", queued.body);
    let done = send(&h.app, get("/api/image-queue/jobs?status=completed", &a)).await;
    assert_eq!(count(&done), Some(0), "{}", done.body);
    let bogus = send(&h.app, get("/api/image-queue/jobs?status=bogus", &a)).await;
    assert!(bogus.body["error"].to_string().contains("bogus"), "{}", bogus.body);
    bogus.error(StatusCode::BAD_REQUEST, "bad_request");
}
