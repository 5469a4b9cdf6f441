//! The upload stage's Cloudinary backend against a local stand-in.
//!
//! This machine cannot reach Cloudinary, so these tests run a small HTTP
//! server that implements the documented contract of the signed Upload API
//! (`POST /v1_1/<cloud>/image/upload`, multipart, SHA-1 signature of the
//! sorted parameters with the API secret appended) and rejects a request
//! whose signature is wrong with 401, as Cloudinary does. They verify that
//! the stage speaks the documented protocol, not that Cloudinary accepts it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use bytes::Bytes;
use image_queue_pipeline::{
    BlobStore, ErrorClass, EventKind, ImageEvent, LocalBlobStore, Outcome, OutputRef, Source, Stage,
};
use image_queue_stages::cloudinary::{sign, Credentials};
use image_queue_stages::{FetchConfig, StageContext, UploadConfig};
use secrecy::SecretString;

const CLOUD: &str = "demo-cloud";
const KEY: &str = "123456789012345";
const SECRET: &str = "stand-in-secret";

/// One upload the stand-in accepted.
#[derive(Debug, Clone)]
struct Received {
    params: BTreeMap<String, String>,
    file: Bytes,
    file_name: String,
}

/// A status to answer with, and its `Retry-After` if any.
type Failure = (StatusCode, Option<&'static str>);

#[derive(Clone, Default)]
struct StandIn {
    received: Arc<Mutex<Vec<Received>>>,
    /// Statuses to answer the next requests with instead of uploading.
    failures: Arc<Mutex<Vec<Failure>>>,
}

async fn upload(State(s): State<StandIn>, Path(cloud): Path<String>, mut form: Multipart) -> Response {
    if let Some((status, retry_after)) = s.failures.lock().unwrap().pop() {
        let mut h = HeaderMap::new();
        if let Some(r) = retry_after {
            h.insert("retry-after", r.parse().unwrap());
        }
        return (
            status,
            h,
            Json(serde_json::json!({"error": {"message": "stand-in failure"}})),
        )
            .into_response();
    }
    if cloud != CLOUD {
        return (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": {"message": "no such cloud"}})),
        )
            .into_response();
    }
    let mut params = BTreeMap::new();
    let mut file = None;
    let mut file_name = String::new();
    while let Some(field) = form.next_field().await.unwrap() {
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            file_name = field.file_name().unwrap_or_default().to_string();
            file = Some(field.bytes().await.unwrap());
        } else {
            params.insert(name, field.text().await.unwrap());
        }
    }
    let bad = |m: &str| {
        (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": {"message": m}})),
        )
            .into_response()
    };
    let Some(file) = file else {
        return bad("Missing required parameter - file");
    };
    if params.get("api_key").map(String::as_str) != Some(KEY) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": {"message": "Unknown API key"}})),
        )
            .into_response();
    }
    let Some(timestamp) = params.get("timestamp") else {
        return bad("Missing required parameter - timestamp");
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    if timestamp.parse::<u64>().map_or(true, |t| t.abs_diff(now) > 3600) {
        return bad("Stale request");
    }
    // Every parameter but file, cloud_name, resource_type, api_key (and the
    // signature itself) is signed.
    let signed: Vec<(&str, String)> = params
        .iter()
        .filter(|(k, _)| k.as_str() != "signature")
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let expected = sign(&signed, &SecretString::from(SECRET));
    if params.get("signature") != Some(&expected) {
        return (
            StatusCode::UNAUTHORIZED,
            Json(serde_json::json!({"error": {"message": "Invalid Signature"}})),
        )
            .into_response();
    }
    let public_id = match params.get("folder") {
        Some(f) => format!("{f}/{}", params["public_id"]),
        None => params["public_id"].clone(),
    };
    let version = 1_700_000_000 + s.received.lock().unwrap().len() as u64;
    let body = serde_json::json!({
        "asset_id": format!("asset-{}", public_id.replace('/', "-")),
        "public_id": public_id,
        "version": version,
        "format": "png",
        "resource_type": "image",
        "secure_url": format!("https://res.cloudinary.com/{CLOUD}/image/upload/v{version}/{public_id}.png"),
    });
    s.received.lock().unwrap().push(Received {
        params,
        file,
        file_name,
    });
    Json(body).into_response()
}

async fn stand_in() -> (String, StandIn) {
    let state = StandIn::default();
    let app = Router::new()
        .route("/v1_1/{cloud}/image/upload", post(upload))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), state)
}

struct Setup {
    _dir: tempfile::TempDir,
    ctx: StageContext,
    server: StandIn,
    config: UploadConfig,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(LocalBlobStore::new(dir.path().join("blobs")).unwrap());
    let ctx = StageContext {
        blobs,
        fetcher: Arc::new(FetchConfig::default().build().unwrap()),
        limits: image_queue_stages::decode::DecodeLimits::default(),
    };
    let (base, server) = stand_in().await;
    let config = UploadConfig::Cloudinary {
        credentials_env: "UNUSED_IN_TESTS".into(),
        api_base: base,
        folder: "shop".into(),
        timeout_ms: 5_000,
    };
    Setup {
        _dir: dir,
        ctx,
        server,
        config,
    }
}

async fn resized_event(ctx: &StageContext) -> (ImageEvent, Bytes) {
    let png = Bytes::from_static(b"\x89PNG\r\n\x1a\nnot really a png, the stand-in does not decode");
    let blob = "job-1/3/large.png".to_string();
    ctx.blobs.put(&blob, png.clone()).await.unwrap();
    let mut outputs = BTreeMap::new();
    outputs.insert(
        "large".to_string(),
        OutputRef {
            blob: Some(blob),
            url: None,
            content_type: "image/png".into(),
            width: 10,
            height: 10,
            bytes: png.len() as u64,
        },
    );
    let ev = ImageEvent {
        v: 1,
        kind: EventKind::ImageResized,
        job: "job-1".into(),
        vendor: "acme/shop".into(),
        image: 3,
        record_id: "sku-3".into(),
        ops: vec![],
        source: Source::Url("https://vendor.example.com/a.png".into()),
        working: None,
        outputs,
        notes: Default::default(),
        slot: false,
        attempt: 0,
        submitted_ms: 0,
        traceparent: None,
    };
    (ev, png)
}

fn credentials(secret: &str) -> Credentials {
    Credentials::from_url(&format!("cloudinary://{KEY}:{secret}@{CLOUD}")).unwrap()
}

#[tokio::test]
async fn uploads_signed_with_a_deterministic_public_id_and_records_the_asset() {
    let s = setup().await;
    let stage = s.config.build_with(s.ctx.clone(), Some(credentials(SECRET))).unwrap();
    let (ev, png) = resized_event(&s.ctx).await;
    let Outcome::Done(done) = stage.handle(ev.clone()).await.expect("upload") else {
        panic!("expected Done")
    };
    let out = &done.outputs["large"];
    let expected_id = "shop/acme_shop/job-1/3/large";
    assert_eq!(
        out.url.as_deref(),
        Some(format!("https://res.cloudinary.com/{CLOUD}/image/upload/v1700000000/{expected_id}.png").as_str())
    );
    assert_eq!(out.blob, None);
    let asset = &done.notes["cloudinary"]["large"];
    assert_eq!(asset["public_id"], expected_id);
    assert_eq!(asset["version"], 1_700_000_000u64);
    assert_eq!(asset["asset_id"], "asset-shop-acme_shop-job-1-3-large");

    // Redelivered: the same public_id again, with overwrite, so Cloudinary
    // replaces the asset rather than adding one.
    stage.handle(ev).await.expect("second upload");
    let got = s.server.received.lock().unwrap().clone();
    assert_eq!(got.len(), 2);
    for r in &got {
        assert_eq!(r.file, png);
        assert_eq!(r.file_name, "large.png");
        assert_eq!(r.params["public_id"], "job-1/3/large");
        assert_eq!(r.params["folder"], "shop/acme_shop");
        assert_eq!(r.params["overwrite"], "true");
        assert!(!r.params.values().any(|v| v.contains(SECRET)), "the secret was sent");
    }
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_permanent() {
    let s = setup().await;
    let stage = s
        .config
        .build_with(s.ctx.clone(), Some(credentials("wrong-secret")))
        .unwrap();
    let (ev, _) = resized_event(&s.ctx).await;
    let err = stage.handle(ev).await.expect_err("a wrong signature must be refused");
    assert_eq!(err.class, ErrorClass::Permanent, "{err}");
    assert!(err.message.contains("401"), "{err}");
    assert!(!err.message.contains("wrong-secret"));
    assert!(s.server.received.lock().unwrap().is_empty());
}

#[tokio::test]
async fn rate_limits_and_server_errors_are_retryable_with_retry_after() {
    let s = setup().await;
    let stage = s.config.build_with(s.ctx.clone(), Some(credentials(SECRET))).unwrap();
    let (ev, _) = resized_event(&s.ctx).await;
    for (status, retry_after, class) in [
        (StatusCode::from_u16(420).unwrap(), Some("7"), ErrorClass::Retryable),
        (StatusCode::TOO_MANY_REQUESTS, Some("30"), ErrorClass::Retryable),
        (StatusCode::SERVICE_UNAVAILABLE, None, ErrorClass::Retryable),
        (StatusCode::BAD_REQUEST, None, ErrorClass::Permanent),
    ] {
        s.server.failures.lock().unwrap().push((status, retry_after));
        let err = stage.handle(ev.clone()).await.expect_err("the stand-in failed it");
        assert_eq!(err.class, class, "{status}: {err}");
        assert_eq!(
            err.retry_after,
            retry_after.map(|r| Duration::from_secs(r.parse().unwrap())),
            "{status}"
        );
    }
    // And once the stand-in is well again, the upload goes through.
    assert!(matches!(stage.handle(ev).await, Ok(Outcome::Done(_))));
}

#[tokio::test]
async fn missing_credentials_fail_the_build_without_echoing_anything() {
    let s = setup().await;
    let err = s
        .config
        .build(s.ctx.clone())
        .err()
        .expect("no credentials in the environment");
    assert!(err.to_string().contains("UNUSED_IN_TESTS"), "{err}");
}
