//! The fetcher against a real HTTP server on loopback: hostile URLs are
//! refused before any connection is made (the server counts every request
//! it receives, and must see none), redirects are checked hop by hop, and
//! bodies are capped while they stream.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;
use image_queue_stages::fetch::Fetcher;
use image_queue_stages::FetchConfig;

const IMAGE: &[u8] = b"\x89PNG\r\n\x1a\nnot really, but bytes all the same";

#[derive(Clone, Default)]
struct Hits(Arc<AtomicUsize>);

impl Hits {
    fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

async fn image(State(h): State<Hits>) -> &'static [u8] {
    h.0.fetch_add(1, Ordering::SeqCst);
    IMAGE
}

#[derive(serde::Deserialize)]
struct To {
    to: String,
}

async fn redirect(State(h): State<Hits>, Query(q): Query<To>) -> Response {
    h.0.fetch_add(1, Ordering::SeqCst);
    (StatusCode::FOUND, [(header::LOCATION, q.to)]).into_response()
}

/// `/chain/n` redirects n times before answering.
async fn chain(State(h): State<Hits>, Path(n): Path<u32>) -> Response {
    h.0.fetch_add(1, Ordering::SeqCst);
    if n == 0 {
        return IMAGE.into_response();
    }
    (StatusCode::FOUND, [(header::LOCATION, format!("/chain/{}", n - 1))]).into_response()
}

/// `n` bytes streamed in 1 KiB chunks, with no Content-Length: only
/// counting the body as it arrives can stop it.
async fn chunked(State(h): State<Hits>, Path(n): Path<usize>) -> Response {
    h.0.fetch_add(1, Ordering::SeqCst);
    let chunks =
        (0..n.div_ceil(1024)).map(move |i| Ok::<_, std::io::Error>(Bytes::from(vec![7u8; 1024.min(n - i * 1024)])));
    Body::from_stream(futures::stream::iter(chunks)).into_response()
}

/// A server on `addr` (port 0 for any); `None` if the address is not
/// available here (IPv6 loopback may be missing).
async fn serve(addr: &str) -> Option<(SocketAddr, Hits)> {
    let listener = tokio::net::TcpListener::bind(addr).await.ok()?;
    let local = listener.local_addr().ok()?;
    let hits = Hits::default();
    let app = Router::new()
        .route("/img", get(image))
        .route("/redirect", get(redirect))
        .route("/chain/{n}", get(chain))
        .route("/chunked/{n}", get(chunked))
        .with_state(hits.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.ok() });
    Some((local, hits))
}

fn fetcher(allow: &[&str], max_bytes: u64) -> Fetcher {
    FetchConfig {
        allow_networks: allow.iter().map(|s| s.to_string()).collect(),
        max_bytes,
        connect_timeout_ms: 2_000,
        total_timeout_ms: 10_000,
        ..FetchConfig::default()
    }
    .build()
    .unwrap()
}

/// Asserts a permanent refusal whose message says why.
async fn refused(f: &Fetcher, url: &str, why: &str) {
    match f.fetch(url).await {
        Ok(b) => panic!("{url} was fetched ({} bytes)", b.len()),
        Err(e) => {
            assert!(!e.is_retryable(), "{url}: refused as retryable: {}", e.message);
            assert!(e.message.contains(why), "{url}: {:?} does not say {why:?}", e.message);
        }
    }
}

#[tokio::test]
async fn hostile_urls_are_refused_before_connecting() {
    let (v4, hits) = serve("127.0.0.1:0").await.unwrap();
    let port = v4.port();
    let v6 = serve("[::1]:0").await;
    let f = fetcher(&[], 1 << 20);
    let mut table = vec![
        (format!("http://127.0.0.1:{port}/img"), "loopback"),
        ("http://10.0.0.1/img".to_string(), "private"),
        ("http://169.254.169.254/latest/meta-data".to_string(), "link-local"),
        (format!("http://[::1]:{port}/img"), "loopback"),
        (format!("http://[::ffff:127.0.0.1]:{port}/img"), "not fetched"),
        // 127.0.0.1 spelled as one decimal number, and in octal and hex.
        (format!("http://2130706433:{port}/img"), "loopback"),
        (format!("http://0177.0.0.1:{port}/img"), "loopback"),
        (format!("http://0x7f.1:{port}/img"), "loopback"),
        (format!("http://0.0.0.0:{port}/img"), "unspecified"),
        // A name resolving to loopback: refused at resolution.
        (format!("http://localhost:{port}/img"), "not fetched"),
        (format!("http://user:pw@example.com:{port}/img"), "credentials"),
        ("ftp://example.com/img.png".to_string(), "only http and https"),
        ("file:///etc/passwd".to_string(), "only http and https"),
        ("gopher://127.0.0.1:70/".to_string(), "only http and https"),
        ("not a url".to_string(), "invalid URL"),
    ];
    if let Some((addr, _)) = &v6 {
        table.push((format!("http://[::1]:{}/img", addr.port()), "loopback"));
    }
    for (url, why) in &table {
        refused(&f, url, why).await;
    }
    assert_eq!(hits.count(), 0, "a refused URL reached the server");
    if let Some((_, h6)) = &v6 {
        assert_eq!(h6.count(), 0, "a refused URL reached the IPv6 server");
    }
}

#[tokio::test]
async fn an_allow_listed_local_server_is_fetched() {
    let (addr, hits) = serve("127.0.0.1:0").await.unwrap();
    let f = fetcher(&["127.0.0.1/32"], 1 << 20);
    let body = f.fetch(&format!("http://{addr}/img")).await.unwrap();
    assert_eq!(&body[..], IMAGE);
    assert_eq!(hits.count(), 1);
    // The allow-list admits exactly what it names.
    refused(&f, "http://127.0.0.2/img", "loopback").await;
}

#[tokio::test]
async fn redirects_are_checked_at_every_hop() {
    let (addr, hits) = serve("127.0.0.1:0").await.unwrap();
    let v6 = serve("[::1]:0").await;
    let f = fetcher(&["127.0.0.1/32"], 1 << 20);
    let v6_port = v6.as_ref().map(|(a, _)| a.port()).unwrap_or(addr.port());
    let targets = [
        format!("http://[::1]:{v6_port}/img"),
        "http://169.254.169.254/latest/meta-data".to_string(),
        "http://10.0.0.1/img".to_string(),
        format!("http://[::ffff:10.0.0.1]:{}/img", addr.port()),
        "file:///etc/passwd".to_string(),
    ];
    for to in &targets {
        let url = format!("http://{addr}/redirect?to={}", urlencode(to));
        refused(&f, &url, "redirect").await;
    }
    // The allowed server answered each first hop; nothing went further.
    assert_eq!(hits.count(), targets.len());
    if let Some((_, h6)) = &v6 {
        assert_eq!(h6.count(), 0, "a redirect reached the IPv6 loopback server");
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn at_most_three_redirects_are_followed() {
    let (addr, _) = serve("127.0.0.1:0").await.unwrap();
    let f = fetcher(&["127.0.0.1/32"], 1 << 20);
    let body = f.fetch(&format!("http://{addr}/chain/3")).await.unwrap();
    assert_eq!(&body[..], IMAGE);
    refused(&f, &format!("http://{addr}/chain/4"), "redirect").await;
}

#[tokio::test]
async fn a_body_over_the_cap_is_cut_off_whatever_its_headers_say() {
    let (addr, _) = serve("127.0.0.1:0").await.unwrap();
    let f = fetcher(&["127.0.0.1/32"], 4096);
    let body = f.fetch(&format!("http://{addr}/chunked/4096")).await.unwrap();
    assert_eq!(body.len(), 4096);
    refused(&f, &format!("http://{addr}/chunked/4097"), "larger than 4096 bytes").await;
    refused(
        &f,
        &format!("http://{addr}/chunked/{}", 50 << 20),
        "larger than 4096 bytes",
    )
    .await;
}

#[tokio::test]
async fn a_refused_name_does_not_say_what_it_resolves_to() {
    let f = fetcher(&[], 1 << 20);
    let e = match f.fetch("http://localhost:9/img").await {
        Ok(_) => panic!("localhost was fetched"),
        Err(e) => e,
    };
    assert!(!e.is_retryable(), "{}", e.message);
    assert!(e.message.contains("host not allowed"), "{}", e.message);
    // What the name resolves to is the server's business, not the vendor's.
    for internal in ["127.0.0.1", "::1", "loopback"] {
        assert!(!e.message.contains(internal), "{}", e.message);
    }
}
