//! The API under hostile or unlucky conditions: bodies far over their
//! limits (refused while streaming, never read whole), ids with control
//! characters, uploads over a vendor's rate limit (refused before a byte is
//! stored), a Redis out of memory (503 with Retry-After, not ready, nothing
//! left behind), bad admin queries, the operational figures anyone may
//! read, and the cap on a vendor's open event streams. The real router on a
//! private redis-server per test, requests through `oneshot`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use image_queue_api::{app, ApiConfig, AppState, Auth, Limit, ProgressHub};
use image_queue_pipeline::redis_server::{Fsync, RedisServer};
use image_queue_pipeline::{JobStore, LocalBlobStore, Pipeline};
use serde_json::{json, Value};
use tempfile::TempDir;
use tower::ServiceExt;

const ADMIN: &str = "admin-key-for-tests";
const CLIENT: &str = "203.0.113.7:40000";

struct Harness {
    app: Router,
    p: Pipeline,
    _redis: RedisServer,
    dir: TempDir,
}

impl Harness {
    /// Jobs with blobs in the blob store.
    fn stored_jobs(&self) -> usize {
        std::fs::read_dir(self.dir.path().join("blobs"))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

async fn harness(config: ApiConfig) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(&dir.path().join("redis"), Fsync::Off).await.unwrap();
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
    Harness {
        app: app(state),
        p,
        _redis: redis,
        dir,
    }
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
        assert_eq!(self.body["error"]["code"], code, "{}", self.body);
        assert!(self.body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        assert_eq!(self.body.as_object().unwrap().len(), 1, "{}", self.body);
        self
    }
}

async fn send(app: &Router, mut req: Request<Body>) -> Resp {
    req.extensions_mut()
        .insert(ConnectInfo(CLIENT.parse::<SocketAddr>().unwrap()));
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

fn req(method: &str, uri: &str, key: Option<&str>) -> axum::http::request::Builder {
    let mut b = Request::builder().method(method).uri(uri);
    if let Some(k) = key {
        b = b.header("authorization", format!("Bearer {k}"));
    }
    b
}

fn json_req(uri: &str, key: &str, body: &Value) -> Request<Body> {
    req("POST", uri, Some(key))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

async fn new_vendor(app: &Router, id: &str) -> String {
    let r = send(app, json_req("/api/admin/vendors", ADMIN, &json!({"vendor_id": id}))).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
    r.body["api_key"].as_str().unwrap().to_string()
}

const BOUNDARY: &str = "XhardeningBoundary0d1e2f";

fn text_part(name: &str, value: &[u8]) -> Vec<u8> {
    let mut p = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n").into_bytes();
    p.extend_from_slice(value);
    p.extend_from_slice(b"\r\n");
    p
}

fn file_part(data: &[u8]) -> Vec<u8> {
    let mut p = format!(
        "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"images\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n"
    )
    .into_bytes();
    p.extend_from_slice(data);
    p.extend_from_slice(b"\r\n");
    p
}

fn multipart_req(key: &str, parts: &[Vec<u8>]) -> Request<Body> {
    let mut body = parts.concat();
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    req("POST", "/api/image-queue/jobs", Some(key))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(Body::from(body))
        .unwrap()
}

/// A valid 1×1 PNG.
fn png() -> Vec<u8> {
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
    chunk(
        &mut v,
        b"IDAT",
        &[0x78, 0x01, 0x01, 0x02, 0x00, 0xfd, 0xff, 0, 0, 0x00, 0x02, 0x00, 0x01],
    );
    chunk(&mut v, b"IEND", &[]);
    v
}

/// A body of `head`, then `fill` repeated up to `len` bytes in 64 KB
/// chunks made as they are read, then `tail`; counts what was read of it.
fn streamed(head: Vec<u8>, fill: u8, len: u64, tail: Vec<u8>) -> (Body, Arc<AtomicU64>) {
    const CHUNK: usize = 64 * 1024;
    let pulled = Arc::new(AtomicU64::new(0));
    let counter = pulled.clone();
    let filler = Bytes::from(vec![fill; CHUNK]);
    let chunks = (len as usize).div_ceil(CHUNK);
    let stream = futures::stream::iter(
        std::iter::once(Bytes::from(head))
            .chain((0..chunks).map(move |_| filler.clone()))
            .chain(std::iter::once(Bytes::from(tail))),
    )
    .map(move |b| {
        counter.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok::<_, std::io::Error>(b)
    });
    (Body::from_stream(stream), pulled)
}

use futures::StreamExt;

const MB: u64 = 1024 * 1024;

#[tokio::test]
async fn bodies_over_their_limits_are_refused_without_being_read_whole() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let jobs = "/api/image-queue/jobs";

    // 600 MB of JSON, sent without a length: refused at the limit (1 MB).
    let (body, pulled) = streamed(
        br#"{"operations": ["resize"], "images": [{"url": ""#.to_vec(),
        b'a',
        600 * MB,
        b"\"}]}".to_vec(),
    );
    let r = req("POST", jobs, Some(&a))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    send(&h.app, r)
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    let read = pulled.load(Ordering::Relaxed);
    assert!(read <= MB + 128 * 1024, "read {read} bytes of a 600 MB JSON body");

    // Declared that large, it is refused before a byte is read.
    let (body, pulled) = streamed(Vec::new(), b'a', 600 * MB, Vec::new());
    let r = req("POST", jobs, Some(&a))
        .header("content-type", "application/json")
        .header("content-length", (600 * MB).to_string())
        .body(body)
        .unwrap();
    send(&h.app, r)
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert_eq!(pulled.load(Ordering::Relaxed), 0);

    // An admin route's JSON is held to the same limit.
    let (body, pulled) = streamed(br#"{"vendor_id": ""#.to_vec(), b'a', 600 * MB, b"\"}".to_vec());
    let r = req("POST", "/api/admin/vendors", Some(ADMIN))
        .header("content-type", "application/json")
        .body(body)
        .unwrap();
    send(&h.app, r)
        .await
        .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(pulled.load(Ordering::Relaxed) <= MB + 128 * 1024);

    // A 400 MB record_id: refused at its first kilobyte too many.
    let mut head = text_part("operations", b"resize");
    head.extend_from_slice(&file_part(&png()));
    head.extend_from_slice(
        format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"record_id\"\r\n\r\n").as_bytes(),
    );
    let (body, pulled) = streamed(head, b'r', 400 * MB, format!("\r\n--{BOUNDARY}--\r\n").into_bytes());
    let r = req("POST", jobs, Some(&a))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .unwrap();
    let r = send(&h.app, r).await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    assert!(
        r.body["error"]["message"].as_str().unwrap().contains("record_id"),
        "{}",
        r.body
    );
    let read = pulled.load(Ordering::Relaxed);
    assert!(read <= 2 * MB, "read {read} bytes of a 400 MB record_id");

    // A part whose headers never end: refused, not buffered.
    let head = format!("--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"record_id\"\r\nX-Pad: ").into_bytes();
    let (body, pulled) = streamed(head, b'h', 400 * MB, b"\r\n\r\nx\r\n".to_vec());
    let r = req("POST", jobs, Some(&a))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .unwrap();
    send(&h.app, r).await.error(StatusCode::BAD_REQUEST, "bad_request");
    let read = pulled.load(Ordering::Relaxed);
    assert!(read <= 4 * MB, "read {read} bytes of a 400 MB part header");

    // An operations field too long is refused the same way.
    let long_ops = vec![b'r'; 2048];
    let r = send(&h.app, multipart_req(&a, &[text_part("operations", &long_ops)])).await;
    r.error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    // Nothing refused left a blob behind.
    assert_eq!(h.stored_jobs(), 0);
}

#[tokio::test]
async fn record_ids_with_control_characters_are_refused() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    for bad in ["sku\u{0}1", "sku\n1", "sku\u{1b}[31m", "sku\u{7f}"] {
        let body = json!({"operations": ["resize"], "images": [{"url": "https://images.example.com/a.jpg", "record_id": bad}]});
        let r = send(&h.app, json_req("/api/image-queue/jobs", &a, &body)).await;
        r.error(StatusCode::BAD_REQUEST, "bad_request");
        assert!(
            r.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("control characters"),
            "{}",
            r.body
        );
    }
    let r = send(
        &h.app,
        multipart_req(
            &a,
            &[
                text_part("operations", b"resize"),
                file_part(&png()),
                text_part("record_id", b"sku\x001"),
            ],
        ),
    )
    .await;
    r.error(StatusCode::BAD_REQUEST, "bad_request");
    assert_eq!(h.stored_jobs(), 0, "a refused upload left its blobs");
    // Printable text beyond ASCII is an id like any other.
    let body = json!({"operations": ["resize"], "images": [{"url": "https://images.example.com/a.jpg", "record_id": "sku-ü-1"}]});
    let r = send(&h.app, json_req("/api/image-queue/jobs", &a, &body)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
}

#[tokio::test]
async fn uploads_over_the_rate_limit_are_refused_before_a_byte_is_stored() {
    let mut config = ApiConfig::default();
    config.rate_limits.submits_per_vendor = Limit::new(2, 900);
    config.rate_limits.bg_removal_images_per_vendor = Limit::new(3, 3600);
    let h = harness(config).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let b = new_vendor(&h.app, "vendor-b").await;
    let job = |key: &str, ops: &[u8], images: usize| {
        let mut parts = vec![text_part("operations", ops)];
        for i in 0..images {
            parts.push(file_part(&png()));
            parts.push(text_part("record_id", format!("sku-{i}").as_bytes()));
        }
        multipart_req(key, &parts)
    };
    for _ in 0..2 {
        assert_eq!(send(&h.app, job(&a, b"resize", 1)).await.status, StatusCode::ACCEPTED);
    }
    assert_eq!(h.stored_jobs(), 2);

    // The third submit is over the limit: refused before its body is read.
    let head = [text_part("operations", b"resize"), file_part(&png())].concat();
    let (body, pulled) = streamed(head, b'x', 20 * MB, format!("\r\n--{BOUNDARY}--\r\n").into_bytes());
    let r = req("POST", "/api/image-queue/jobs", Some(&a))
        .header("content-type", format!("multipart/form-data; boundary={BOUNDARY}"))
        .body(body)
        .unwrap();
    let r = send(&h.app, r).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(r.headers.contains_key("retry-after"));
    assert_eq!(pulled.load(Ordering::Relaxed), 0, "the refused body was read");
    assert_eq!(h.stored_jobs(), 2);

    // Background removal is counted in images: with one of three left, the
    // second image of a job is refused before it is stored, and the first
    // is removed.
    assert_eq!(
        send(&h.app, job(&b, b"bg-removal", 2)).await.status,
        StatusCode::ACCEPTED
    );
    assert_eq!(h.stored_jobs(), 3);
    let r = send(&h.app, job(&b, b"bg-removal", 2)).await;
    r.error(StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("bg-removal-images"));
    assert_eq!(h.stored_jobs(), 3);
    // What is within the limit is taken.
    let r = send(&h.app, job(&b, b"bg-removal", 1)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
}

#[tokio::test]
async fn redis_out_of_memory_answers_503_with_retry_after_and_not_ready() {
    let mut config = ApiConfig::default();
    // The per-IP write limit would be refused first; the submit is the test.
    config.rate_limits.enabled = false;
    let h = harness(config).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let ready = send(&h.app, req("GET", "/readyz", None).body(Body::empty()).unwrap()).await;
    assert_eq!(ready.status, StatusCode::OK);

    let mut conn = h.p.endpoint.connect(None).await.unwrap();
    let set = |k: &'static str, v: &'static str| redis::cmd("CONFIG").arg("SET").arg(k).arg(v).to_owned();
    let _: () = set("maxmemory-policy", "noeviction")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = set("maxmemory", "1").query_async(&mut conn).await.unwrap();

    let upload = multipart_req(
        &a,
        &[
            text_part("operations", b"resize"),
            file_part(&png()),
            text_part("record_id", b"sku-1"),
        ],
    );
    let r = send(&h.app, upload).await;
    r.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let retry: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    // The refused submit took its blobs with it.
    assert_eq!(h.stored_jobs(), 0);

    let body =
        json!({"operations": ["resize"], "images": [{"url": "https://images.example.com/a.jpg", "record_id": "a"}]});
    let r = send(&h.app, json_req("/api/image-queue/jobs", &a, &body)).await;
    r.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(r.headers.contains_key("retry-after"));

    // Redis still answers PING, but this process cannot serve: not ready.
    let ready = send(&h.app, req("GET", "/readyz", None).body(Body::empty()).unwrap()).await;
    ready.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    assert!(ready.headers.contains_key("retry-after"));

    let _: () = set("maxmemory", "0").query_async(&mut conn).await.unwrap();
    let ready = send(&h.app, req("GET", "/readyz", None).body(Body::empty()).unwrap()).await;
    assert_eq!(ready.status, StatusCode::OK);
    let r = send(&h.app, json_req("/api/image-queue/jobs", &a, &body)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.body);
}

#[tokio::test]
async fn a_redis_refusing_writes_is_not_ready_and_workers_not_healthy() {
    let h = harness(ApiConfig::default()).await;
    let mut conn = h.p.endpoint.connect(None).await.unwrap();
    // A replica of nothing is read-only: it answers PING, refuses writes.
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg("1")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ready = send(&h.app, req("GET", "/readyz", None).body(Body::empty()).unwrap()).await;
    ready.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    // Nor are the workers healthy: none of them can move an image on.
    let health = send(
        &h.app,
        req("GET", "/api/worker/health", None).body(Body::empty()).unwrap(),
    )
    .await;
    health.error(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    let _: () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ready = send(&h.app, req("GET", "/readyz", None).body(Body::empty()).unwrap()).await;
    assert_eq!(ready.status, StatusCode::OK);
}

#[tokio::test]
async fn bad_dead_letter_queries_are_answered_in_the_error_shape() {
    let h = harness(ApiConfig::default()).await;
    let get = |uri: &str| req("GET", uri, Some(ADMIN)).body(Body::empty()).unwrap();
    send(&h.app, get("/api/admin/dlq?older_than_s=yesterday"))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request");
    send(&h.app, get("/api/admin/dlq?colour=red"))
        .await
        .error(StatusCode::BAD_REQUEST, "bad_request");
    let purge = req("DELETE", "/api/admin/dlq?limit=-1", Some(ADMIN))
        .body(Body::empty())
        .unwrap();
    send(&h.app, purge).await.error(StatusCode::BAD_REQUEST, "bad_request");
    let replay = req("POST", "/api/admin/dlq/1-0/replay", Some(ADMIN))
        .header("content-type", "application/json")
        .body(Body::from("{\"stage\":"))
        .unwrap();
    send(&h.app, replay).await.error(StatusCode::BAD_REQUEST, "bad_request");
    // A good query still answers.
    assert_eq!(
        send(&h.app, get("/api/admin/dlq?older_than_s=60")).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn queue_stats_name_vendors_and_workers_only_to_the_admin() {
    let h = harness(ApiConfig::default()).await;
    let a = new_vendor(&h.app, "vendor-secret-name").await;
    let body =
        json!({"operations": ["resize"], "images": [{"url": "https://images.example.com/a.jpg", "record_id": "a"}]});
    assert_eq!(
        send(&h.app, json_req("/api/image-queue/jobs", &a, &body)).await.status,
        StatusCode::ACCEPTED
    );
    // A worker's heartbeat, as a running worker publishes it.
    let mut conn = h.p.endpoint.connect(None).await.unwrap();
    let beat = json!({"consumer": "rate-check-host7-4242", "stage": "rate-check", "host": "host7.internal",
        "pid": 4242, "concurrency": 4, "in_flight": 0, "last_seen_ms": image_queue_pipeline::now_ms()});
    let _: () = redis::cmd("HSET")
        .arg(h.p.keys.workers())
        .arg("rate-check-host7-4242")
        .arg(beat.to_string())
        .query_async(&mut conn)
        .await
        .unwrap();

    let anon = send(
        &h.app,
        req("GET", "/api/image-queue/queue-stats", None)
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(anon.status, StatusCode::OK);
    let text = anon.body.to_string();
    for secret in ["vendor-secret-name", "host7", "4242"] {
        assert!(!text.contains(secret), "{secret} in the public stats: {text}");
    }
    // What a load balancer needs is there.
    let stage = &anon.body["stages"][0];
    assert_eq!(stage["stage"], "rate-check");
    assert_eq!(stage["lag"], 1, "{stage}");
    assert!(stage["live_workers"].is_u64(), "{stage}");

    // A vendor's key is not the admin key.
    let vendor = send(
        &h.app,
        req("GET", "/api/image-queue/queue-stats", Some(&a))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert!(!vendor.body.to_string().contains("vendor-secret-name"));

    let health = send(
        &h.app,
        req("GET", "/api/worker/health", None).body(Body::empty()).unwrap(),
    )
    .await;
    assert!(!health.body.to_string().contains("host7"), "{}", health.body);

    // The figures are cached for a moment; the admin's view is complete.
    let admin = send(
        &h.app,
        req("GET", "/api/image-queue/queue-stats", Some(ADMIN))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(admin.body["vendor_backlog"]["vendor-secret-name"], 1, "{}", admin.body);
    assert!(admin.body.to_string().contains("host7.internal"));
    let health = send(
        &h.app,
        req("GET", "/api/worker/health", Some(ADMIN))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(health.body["workers"][0]["pid"], 4242, "{}", health.body);
}

#[tokio::test]
async fn a_vendor_holds_at_most_its_share_of_event_streams() {
    let config = ApiConfig {
        max_event_streams_per_vendor: 2,
        ..ApiConfig::default()
    };
    let h = harness(config).await;
    let a = new_vendor(&h.app, "vendor-a").await;
    let b = new_vendor(&h.app, "vendor-b").await;
    let body =
        json!({"operations": ["resize"], "images": [{"url": "https://images.example.com/a.jpg", "record_id": "a"}]});
    let job_a = send(&h.app, json_req("/api/image-queue/jobs", &a, &body)).await.body["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let job_b = send(&h.app, json_req("/api/image-queue/jobs", &b, &body)).await.body["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let open = |key: &str, job: &str| {
        let mut r = req("GET", &format!("/api/image-queue/job/{job}/events"), Some(key))
            .body(Body::empty())
            .unwrap();
        r.extensions_mut()
            .insert(ConnectInfo(CLIENT.parse::<SocketAddr>().unwrap()));
        h.app.clone().oneshot(r)
    };
    let first = open(&a, &job_a).await.unwrap();
    let second = open(&a, &job_a).await.unwrap();
    assert_eq!((first.status(), second.status()), (StatusCode::OK, StatusCode::OK));
    let third = open(&a, &job_a).await.unwrap();
    assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(third.headers().contains_key("retry-after"));
    // Another vendor is not held to vendor-a's streams.
    assert_eq!(open(&b, &job_b).await.unwrap().status(), StatusCode::OK);
    // A closed stream frees its slot.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let r = open(&a, &job_a).await.unwrap();
        if r.status() == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "a closed stream kept its slot");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(second);
}
