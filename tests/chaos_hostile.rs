//! Chaos: a corpus of hostile input sent to the API process (decompression
//! bombs, huge declared dimensions, truncated and polyglot files, malformed
//! JSON, wrong content types, an oversize body, private-network and
//! non-HTTP URLs). Each request must be refused with a 4xx in the API's
//! error shape, or, when only decoding or fetching can tell, accepted and
//! then failed by the pipeline with a stated error, without retries; the
//! API keeps serving, a good job submitted afterwards completes, and
//! nothing is left pending.
//!
//! Then the hostile clients: bodies of hundreds of megabytes (the API
//! process's peak memory measured from `/proc`), clients that say nothing,
//! trickle their headers or trickle their body (closed within the
//! configured timeouts), and more connections than the server's cap.

mod chaos;
mod common;

use std::io::Cursor;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chaos::*;
use image::{DynamicImage, GrayImage, ImageFormat};
use image_queue_pipeline::StageName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn png_of(img: DynamicImage) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
    out
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A tiny PNG whose header declares `w`×`h` (with a valid header CRC).
fn png_declaring(w: u32, h: u32) -> Vec<u8> {
    let mut png = tiny_png();
    // Signature (8), IHDR length (4), "IHDR" (4), then width and height.
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let crc = crc32(&png[12..29]);
    png[29..33].copy_from_slice(&crc.to_be_bytes());
    png
}

/// What one request of the corpus is.
enum Body {
    File(Vec<u8>),
    Json(&'static str, &'static str),
}

async fn send(c: &Cluster, body: Body) -> (u16, serde_json::Value) {
    let url = format!("http://{}/api/image-queue/jobs", c.api_addr);
    let req = c.http.post(url).bearer_auth(&c.vendor_key);
    let req = match body {
        Body::File(bytes) => req.multipart(
            reqwest::multipart::Form::new()
                .text("operations", "resize")
                .part(
                    "images",
                    reqwest::multipart::Part::bytes(bytes)
                        .file_name("p.png")
                        .mime_str("image/png")
                        .unwrap(),
                )
                .text("record_id", "sku-1"),
        ),
        Body::Json(content_type, text) => req.header("content-type", content_type).body(text),
    };
    let resp = req.send().await.expect("the API answers");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_is_refused_or_failed_and_the_api_keeps_serving() {
    let cluster = Cluster::new().await;
    let c = &cluster;
    c.start_standard_workers().await;
    c.start_api().await;

    let real = png_of(DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
        64,
        64,
        image::Rgba([1, 2, 3, 255]),
    )));
    let mut polyglot = tiny_png()[..8].to_vec();
    polyglot.extend_from_slice(b"<html><script>alert(1)</script></html>PK\x03\x04");
    let mut oversize = tiny_png();
    oversize.resize(26 * 1024 * 1024, 0);
    let corpus: Vec<(&str, Body)> = vec![
        // 80 megapixels of zeros: about 80 KB compressed, 80 MB decoded.
        (
            "decompression bomb",
            Body::File(png_of(DynamicImage::ImageLuma8(GrayImage::new(10_000, 8_000)))),
        ),
        ("huge declared dimensions", Body::File(png_declaring(100_000, 100_000))),
        ("truncated PNG", Body::File(real[..real.len() / 2].to_vec())),
        ("PNG signature over HTML and ZIP", Body::File(polyglot)),
        ("not an image", Body::File(b"GIF89 is not enough".to_vec())),
        ("body over the size limit", Body::File(oversize)),
        (
            "malformed JSON",
            Body::Json("application/json", r#"{"operations": ["resize"], "images": [{"#),
        ),
        (
            "JSON of the wrong shape",
            Body::Json("application/json", r#"{"operations": "resize", "images": 3}"#),
        ),
        (
            "wrong content type",
            Body::Json("text/plain", r#"{"operations": ["resize"], "images": []}"#),
        ),
        (
            "non-HTTP URL",
            Body::Json(
                "application/json",
                r#"{"operations": ["resize"], "images": [{"url": "file:///etc/passwd", "record_id": "a"}]}"#,
            ),
        ),
        (
            "loopback URL",
            Body::Json(
                "application/json",
                r#"{"operations": ["resize"], "images": [{"url": "http://127.0.0.1:9/a.png", "record_id": "a"}]}"#,
            ),
        ),
        (
            "cloud metadata URL",
            Body::Json(
                "application/json",
                r#"{"operations": ["resize"], "images": [{"url": "http://169.254.169.254/latest/meta-data/", "record_id": "a"}]}"#,
            ),
        ),
        (
            "private-network URL",
            Body::Json(
                "application/json",
                r#"{"operations": ["resize"], "images": [{"url": "http://10.0.0.1/a.png", "record_id": "a"}]}"#,
            ),
        ),
        (
            "IPv6 loopback URL",
            Body::Json(
                "application/json",
                r#"{"operations": ["resize"], "images": [{"url": "http://[::1]:9/a.png", "record_id": "a"}]}"#,
            ),
        ),
    ];

    let mut refused = Vec::new();
    let mut accepted = Vec::new();
    for (name, body) in corpus {
        let (status, body) = send(c, body).await;
        match status {
            400..=499 => {
                let code = body["error"]["code"].as_str();
                assert!(code.is_some(), "{name}: {status} without the error shape: {body}");
                refused.push(format!("{name}: {status}"));
            }
            202 => accepted.push((name, body["job_id"].as_str().unwrap().to_string())),
            _ => panic!("{name}: answered {status}: {body}"),
        }
        // The API is still there after each one.
        c.wait_api_ready(Duration::from_secs(5)).await;
    }

    // Every one of them is refused at the door: the API screens uploads
    // (header, dimensions, a format's end) and IP-literal URLs by the same
    // rules the stages apply.
    assert!(
        accepted.is_empty(),
        "accepted instead of refused at submit: {:?}",
        accepted.iter().map(|(n, _)| n).collect::<Vec<_>>()
    );

    // What was accepted fails in the pipeline, at once and with a reason.
    let ids: Vec<String> = accepted.iter().map(|(_, id)| id.clone()).collect();
    let views = wait_terminal(c, &ids, Duration::from_secs(60)).await;
    let mut failed = Vec::new();
    for ((name, _), v) in accepted.iter().zip(&views) {
        assert_eq!(v.status, "failed", "{name}: {v:#?}");
        let img = &v.images[0];
        let error = img.error.as_deref().unwrap_or("");
        assert!(!error.is_empty(), "{name}: failed without a reason: {v:#?}");
        assert!(img.attempts <= 1, "{name}: retried a hopeless input: {v:#?}");
        failed.push(format!("{name}: {} ({error})", img.stage));
    }

    // A good job after all that still goes through.
    let good = c.submit_until_accepted("good", 2, Duration::from_secs(10)).await;
    let done = wait_terminal(c, std::slice::from_ref(&good), Duration::from_secs(60)).await;
    assert_eq!(done[0].status, "completed", "{:#?}", done[0]);

    // Nothing left pending or waiting for a retry.
    let mut conn = crate::common::redis_conn(&c.env.pipeline).await;
    for stage in StageName::ALL {
        let pending = pending_summary(&c.env, stage).await.map(|s| s.0).unwrap_or(0);
        assert_eq!(pending, 0, "{stage}: entries pending");
        let retrying: usize = redis::cmd("ZCARD")
            .arg(c.env.pipeline.keys.retries(stage))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(retrying, 0, "{stage}: retries waiting");
    }
    println!("refused at submit: {refused:#?}\naccepted, then failed by the pipeline: {failed:#?}");
    c.stop_all().await;
}

/// Starts the API process with extra settings (limits off, as in
/// `Cluster::start_api`) and waits until it answers, on a connection it
/// then closes, so no pooled connection holds one of the server's slots.
async fn start_api_with(c: &Cluster, settings: &[(&str, &str)]) -> u32 {
    let log = std::fs::File::create(c.env.dir.path().join("logs").join("api-hostile.log")).unwrap();
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_image-queue"));
    cmd.env("REDIS_URL", c.env.redis.url())
        .env("DATABASE_URL", &c.database_url)
        .env("IMAGE_QUEUE_DATA_DIR", c.env.dir.path())
        .env("RUST_LOG", "warn")
        .env("IMAGE_QUEUE_API__RATE_LIMITS__ENABLED", "false")
        .args(["api", "--listen", &c.api_addr])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    for (k, v) in settings {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("run the image-queue binary");
    let pid = child.id().unwrap();
    *c.api.lock().await = Some(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = TcpStream::connect(&c.api_addr).await {
            let (status, _) = exchange(&mut s, "GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
            if status == 200 {
                return pid;
            }
        }
        assert!(Instant::now() < deadline, "the API never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends a request and reads its answer: status (0 if none) and body.
async fn exchange(s: &mut TcpStream, request: &str) -> (u16, String) {
    if s.write_all(request.as_bytes()).await.is_err() {
        return (0, String::new());
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = text.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
                return (status, text[end + 4..end + 4 + len].to_string());
            }
        }
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return (0, String::from_utf8_lossy(&buf).to_string()),
        }
    }
}

/// Reads until the server closes the connection (or resets it); returns
/// what it sent and how long that took. Fails after `limit`.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((start + limit).into(), s.read(&mut chunk)).await {
            Err(_) => panic!("still open after {limit:?}; got {:?}", String::from_utf8_lossy(&got)),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Peak resident memory of a process, in KiB (`VmHWM`).
fn peak_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// A body of `head`, `fill` up to `len` bytes made as it is read (never
/// held by the test), then `tail`; counts what the server took of it.
fn streamed(head: String, fill: u8, len: u64, tail: String) -> (reqwest::Body, Arc<AtomicU64>) {
    const CHUNK: usize = 256 * 1024;
    let pulled = Arc::new(AtomicU64::new(0));
    let counter = pulled.clone();
    let filler = bytes::Bytes::from(vec![fill; CHUNK]);
    let chunks = (len as usize).div_ceil(CHUNK);
    let parts = std::iter::once(bytes::Bytes::from(head))
        .chain((0..chunks).map(move |_| filler.clone()))
        .chain(std::iter::once(bytes::Bytes::from(tail)));
    let stream = futures::stream::iter(parts).map(move |b| {
        counter.fetch_add(b.len() as u64, Ordering::Relaxed);
        Ok::<_, std::io::Error>(b)
    });
    (reqwest::Body::wrap_stream(stream), pulled)
}

use futures::StreamExt;

const MB: u64 = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_bodies_are_refused_and_the_api_process_stays_small() {
    let cluster = Cluster::new().await;
    let c = &cluster;
    let pid = start_api_with(c, &[]).await;
    let before = peak_kib(pid);
    let url = format!("http://{}/api/image-queue/jobs", c.api_addr);
    let boundary = "XhostileBoundary42";
    let cases = [
        (
            "600 MB of JSON",
            "application/json".to_string(),
            streamed(
                r#"{"operations": ["resize"], "images": [{"url": ""#.into(),
                b'a',
                600 * MB,
                r#""}]}"#.into(),
            ),
        ),
        (
            "a 400 MB record_id",
            format!("multipart/form-data; boundary={boundary}"),
            streamed(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"operations\"\r\n\r\nresize\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"record_id\"\r\n\r\n"),
                b'r',
                400 * MB,
                format!("\r\n--{boundary}--\r\n"),
            ),
        ),
        (
            "a 400 MB part header",
            format!("multipart/form-data; boundary={boundary}"),
            streamed(
                format!("--{boundary}\r\nContent-Disposition: form-data; name=\"record_id\"\r\nX-Pad: "),
                b'h',
                400 * MB,
                format!("\r\n\r\nx\r\n--{boundary}--\r\n"),
            ),
        ),
    ];
    let mut report = Vec::new();
    for (name, content_type, (body, pulled)) in cases {
        let sent = c
            .http
            .post(&url)
            .bearer_auth(&c.vendor_key)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await;
        // The server answers before the body ends and closes the
        // connection; the client may see the answer or only the close.
        let status = match sent {
            Ok(r) => {
                let status = r.status().as_u16();
                assert!(matches!(status, 400 | 413), "{name}: answered {status}");
                let b: serde_json::Value = r.json().await.unwrap_or_default();
                assert!(b["error"]["code"].is_string(), "{name}: {b}");
                status.to_string()
            }
            Err(e) => format!("closed ({e})"),
        };
        let read = pulled.load(Ordering::Relaxed);
        assert!(read < 64 * MB, "{name}: the server took {} MB of it", read / MB);
        c.wait_api_ready(Duration::from_secs(5)).await;
        report.push(format!("{name}: {status}, {} MB sent", read / MB));
    }
    let after = peak_kib(pid);
    println!(
        "API peak memory (VmHWM): {} MB before, {} MB after\n{report:#?}",
        before / 1024,
        after / 1024
    );
    assert!(after < 100 * 1024, "the API process peaked at {} MB", after / 1024);
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_closed_within_the_configured_timeouts() {
    let cluster = Cluster::new().await;
    let c = &cluster;
    start_api_with(
        c,
        &[
            ("IMAGE_QUEUE_API__SERVER__HEADER_READ_TIMEOUT_MS", "500"),
            ("IMAGE_QUEUE_API__SERVER__BODY_TIMEOUT_MS", "500"),
            ("IMAGE_QUEUE_API__SERVER__BODY_MIN_BYTES", "1024"),
        ],
    )
    .await;
    let limit = Duration::from_secs(3);
    let opened = Instant::now();

    // Connects and says nothing.
    let mut silent = TcpStream::connect(&c.api_addr).await.unwrap();
    // Trickles its headers, a byte every 50 ms, never ending them.
    let mut headers = TcpStream::connect(&c.api_addr).await.unwrap();
    headers
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
        .await
        .unwrap();
    let (mut headers_rd, mut headers_wr) = headers.into_split();
    let trickle_headers = tokio::spawn(async move {
        while headers_wr.write_all(b"a").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // An authenticated submit trickling its body.
    let mut body = TcpStream::connect(&c.api_addr).await.unwrap();
    let head = format!(
        "POST /api/image-queue/jobs HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100000\r\n\r\n{{\"operations\": [",
        c.vendor_key
    );
    body.write_all(head.as_bytes()).await.unwrap();
    let (mut body_rd, mut body_wr) = body.into_split();
    let trickle_body = tokio::spawn(async move {
        while body_wr.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });

    // Each is timed from when it connected.
    until_closed(&mut silent, limit).await;
    let silent_took = opened.elapsed();
    let headers_took = {
        let mut buf = [0u8; 1024];
        loop {
            match tokio::time::timeout_at((opened + limit).into(), headers_rd.read(&mut buf)).await {
                Err(_) => panic!("a connection trickling headers is still open"),
                Ok(Ok(0)) | Ok(Err(_)) => break opened.elapsed(),
                Ok(Ok(_)) => {}
            }
        }
    };
    let mut answer = Vec::new();
    let body_took = {
        let mut buf = [0u8; 4096];
        loop {
            match tokio::time::timeout_at((opened + limit).into(), body_rd.read(&mut buf)).await {
                Err(_) => panic!("a submit trickling its body is still open"),
                Ok(Ok(0)) | Ok(Err(_)) => break opened.elapsed(),
                Ok(Ok(n)) => answer.extend_from_slice(&buf[..n]),
            }
        }
    };
    trickle_headers.await.unwrap();
    trickle_body.await.unwrap();
    // Not closed for some other reason: each lasted its timeout.
    for took in [silent_took, headers_took, body_took] {
        assert!(took >= Duration::from_millis(400), "closed after {took:?}");
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "the slow submit was answered {answer}"
    );
    println!("closed after: silent {silent_took:?}, trickled headers {headers_took:?}, trickled body {body_took:?}");

    // The server itself is fine.
    let mut s = TcpStream::connect(&c.api_addr).await.unwrap();
    let (status, _) = exchange(&mut s, "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
    assert_eq!(status, 200);
    c.stop_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_cap_holds() {
    let cluster = Cluster::new().await;
    let c = &cluster;
    start_api_with(c, &[("IMAGE_QUEUE_API__SERVER__MAX_CONNECTIONS", "3")]).await;
    let keep_alive = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

    // Three kept-alive connections, each answered once and held open. The
    // readiness check's connection may not be released yet: retry a
    // refused one until the server has let it go.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut held = Vec::new();
    while held.len() < 3 {
        let mut s = TcpStream::connect(&c.api_addr).await.unwrap();
        match exchange(&mut s, keep_alive).await {
            (200, _) => held.push(s),
            (503, _) | (0, _) => {
                assert!(Instant::now() < deadline, "the server never had room for three");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (other, body) => panic!("answered {other}: {body}"),
        }
    }
    // A fourth is told so and closed, at once.
    let mut over = TcpStream::connect(&c.api_addr).await.unwrap();
    let (answer, _) = until_closed(&mut over, Duration::from_secs(3)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 503"), "over the cap: {answer:?}");
    assert!(answer.to_ascii_lowercase().contains("retry-after"), "{answer}");
    // The held ones still work.
    for s in held.iter_mut() {
        assert_eq!(exchange(s, keep_alive).await.0, 200);
    }
    // One closed, a new one is served.
    drop(held.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut s = TcpStream::connect(&c.api_addr).await.unwrap();
        if exchange(&mut s, keep_alive).await.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "a freed slot was never reused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.stop_all().await;
}
