//! How well the rembg pool uses its instances: a backlog of 1024×1024
//! images through three real rembg servers (u2netp), against each server
//! alone. Prints, as Markdown, each server's images/s alone, the pool's
//! images/s against the sum of those, and the share of the pool run each
//! server had a request in flight (its busy fraction, as the pool sees it).
//!
//! `cargo bench --bench rembg_pool` (needs `scripts/install-rembg.sh`).
//! `cargo bench --bench rembg_pool -- 60` sends 60 images through the pool
//! (default 30; each server alone gets a third of that).

#[path = "../stages/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;
use image::ImageFormat;
use image_queue_stages::rembg::{RembgConfig, RembgPool};
use support::{encode, product_photo, RembgServer, REMBG_START_TIMEOUT};

const INSTANCES: usize = 3;

fn pool(urls: Vec<String>) -> RembgPool {
    RembgConfig {
        urls,
        model: "u2netp".into(),
        timeout_ms: 600_000,
        wait_ready_ms: REMBG_START_TIMEOUT.as_millis() as u64,
        ..RembgConfig::default()
    }
    .build()
    .unwrap()
}

/// Sends `n` images at once (a backlog: the pool queues what its instances
/// cannot take yet) and waits for all; returns the wall time.
async fn drain(pool: &RembgPool, png: &Bytes, n: usize) -> Duration {
    let started = Instant::now();
    let done = join_all((0..n).map(|_| pool.remove(png.clone()))).await;
    for r in done {
        r.unwrap();
    }
    started.elapsed()
}

fn main() {
    let images: usize = std::env::args().skip(1).find_map(|a| a.parse().ok()).unwrap_or(30);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run(images));
}

async fn run(images: usize) {
    let png = Bytes::from(encode(&product_photo(1024, 1024), ImageFormat::Png));
    let servers = join_all((0..INSTANCES).map(|_| RembgServer::start(None))).await;
    let urls: Vec<String> = servers.iter().map(|s| s.url()).collect();

    // Each alone, one after the other, after a warm-up request (rembg
    // loads its model on the first).
    let alone_n = (images / INSTANCES).max(2);
    let mut alone = Vec::new();
    for url in &urls {
        let p = pool(vec![url.clone()]);
        drain(&p, &png, 1).await;
        let took = drain(&p, &png, alone_n).await;
        alone.push(alone_n as f64 / took.as_secs_f64());
    }
    let sum: f64 = alone.iter().sum();

    // All together, through one pool.
    let p = pool(urls.clone());
    drain(&p, &png, INSTANCES).await;
    let before = p.status();
    let took = drain(&p, &png, images).await;
    let after = p.status();
    let rate = images as f64 / took.as_secs_f64();

    println!(
        "{images} images of 1024×1024 through {INSTANCES} rembg servers (u2netp), max_per_instance {}",
        RembgConfig::default().max_per_instance
    );
    println!();
    println!("| rembg server | images/s alone | images in the pool run | busy in the pool run |");
    println!("| --- | ---: | ---: | ---: |");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let busy = (a.busy - b.busy).as_secs_f64() / took.as_secs_f64();
        println!(
            "| {} | {:.2} | {} | {:.1}% |",
            i + 1,
            alone[i],
            a.served - b.served,
            busy * 100.0
        );
    }
    println!();
    println!("| | images/s |");
    println!("| --- | ---: |");
    println!("| sum of the servers alone | {sum:.2} |");
    println!("| the pool | {rate:.2} ({:.0}% of the sum) |", rate / sum * 100.0);
    drop(servers);
}
