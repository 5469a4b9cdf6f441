//! Chaos: a corpus of hostile input sent to the API process (decompression
//! bombs, huge declared dimensions, truncated and polyglot files, malformed
//! JSON, wrong content types, an oversize body, private-network and
//! non-HTTP URLs). Each request must be refused with a 4xx in the API's
//! error shape, or, when only decoding or fetching can tell, accepted and
//! then failed by the pipeline with a stated error, without retries; the
//! API keeps serving, a good job submitted afterwards completes, and
//! nothing is left pending.

mod chaos;
mod common;

use std::io::Cursor;
use std::time::Duration;

use chaos::*;
use image::{DynamicImage, GrayImage, ImageFormat};
use image_queue_pipeline::StageName;

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
    let mut conn = c.env.pipeline.conn.clone();
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
