//! The process-wide decode budget, measured on the real binary: a resize
//! worker sent ten 7000×7000 16-bit RGBA PNGs (a few hundred KB each, about
//! 390 MB each once decoded at 16 bits) keeps its peak resident memory
//! (`VmHWM` in `/proc/<pid>/status`) within its configured budget plus a
//! fixed allowance for the process itself, however many images it is
//! allowed to work on at once.

mod common;

use std::io::Cursor;
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use image::{DynamicImage, ImageBuffer, ImageFormat, Rgba};
use image_queue_pipeline::blob::blob_key;
use image_queue_pipeline::redis_server::Fsync;
use image_queue_pipeline::{NewImage, NewJob, Operation, Source, StageName};
use tokio::process::{Child, Command};

const MIB: u64 = 1 << 20;

/// The worker's configured decode budget: room for one of these images
/// (7000 × 7000 × (4 + 8) bytes, about 561 MiB) but not two.
const BUDGET: u64 = 768 * MIB;

/// What the process may hold besides the budgeted pixels: the binary, its
/// threads and allocator, the compressed inputs, the scaler's intermediate
/// rows, the encoded variants.
const ALLOWANCE: u64 = 128 * MIB;

fn worker(env: &TestEnv, stage: StageName, concurrency: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_image-queue"))
        .args([
            "worker",
            "--stage",
            stage.as_str(),
            "--concurrency",
            &concurrency.to_string(),
        ])
        .env("REDIS_URL", env.redis.url())
        .env("DATABASE_URL", env.database_url())
        .env("IMAGE_QUEUE_DATA_DIR", env.dir.path())
        .env("IMAGE_QUEUE_DECODE__MEMORY_BUDGET", BUDGET.to_string())
        .env("IMAGE_QUEUE_PIPELINE__READ_BLOCK_MS", "200")
        // Images wait their turn for the budget within the handler's time:
        // on a busy test machine ten of these take minutes.
        .env("IMAGE_QUEUE_PIPELINE__TIMEOUT_MS", "600000")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("run the image-queue binary")
}

/// A 7000×7000 RGBA PNG at 16 bits per channel, one flat colour, so it
/// compresses to a few hundred KB.
fn heavy_png() -> Vec<u8> {
    let img: ImageBuffer<Rgba<u16>, Vec<u16>> =
        ImageBuffer::from_pixel(7000, 7000, Rgba([40_000, 20_000, 10_000, 65_535]));
    let mut out = Vec::new();
    DynamicImage::ImageRgba16(img)
        .write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
        .unwrap();
    out
}

/// The peak resident set of a process so far, in bytes.
fn vm_hwm(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading the worker's status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/<pid>/status");
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_sent_ten_huge_16_bit_pngs_stays_within_its_decode_budget() {
    let env = TestEnv::start(Fsync::Off).await;
    let mut others: Vec<Child> = [StageName::RateCheck, StageName::Upload, StageName::DbCommit]
        .into_iter()
        .map(|s| worker(&env, s, 2))
        .collect();
    // Four images at once are allowed by the runner; only the budget stops
    // a second from being decoded beside the first.
    let mut resize = worker(&env, StageName::Resize, 4);
    let pid = resize.id().unwrap();

    let png = Bytes::from(tokio::task::spawn_blocking(heavy_png).await.unwrap());
    assert!(png.len() < 2 * MIB as usize, "the test image is {} bytes", png.len());
    let mut ids = Vec::new();
    for _ in 0..2 {
        let id = NewJob::new_id();
        let mut images = Vec::new();
        for i in 0..5 {
            let key = blob_key(&id, i, "original");
            env.pipeline.blobs.put(&key, png.clone()).await.unwrap();
            images.push(NewImage {
                source: Source::Blob(key),
                record_id: format!("sku-{i}"),
            });
        }
        let submitted = env
            .jobs
            .submit(NewJob {
                id,
                vendor: "vendor-a".into(),
                operations: vec![Operation::Resize],
                images,
                idempotency_key: None,
                fingerprint: None,
                traceparent: None,
            })
            .await
            .unwrap();
        ids.push(submitted.job_id);
    }
    let views = env.wait_terminal(&ids, Duration::from_secs(1200)).await;
    for v in &views {
        assert_eq!(v.status.as_str(), "completed", "{v:?}");
    }
    let peak = vm_hwm(pid);
    println!(
        "resize worker peak VmHWM {} MiB with a {} MiB decode budget (limit {} MiB)",
        peak / MIB,
        BUDGET / MIB,
        (BUDGET + ALLOWANCE) / MIB
    );
    assert!(
        peak <= BUDGET + ALLOWANCE,
        "the worker peaked at {} MiB, over its {} MiB budget + {} MiB",
        peak / MIB,
        BUDGET / MIB,
        ALLOWANCE / MIB
    );
    resize.kill().await.ok();
    for c in &mut others {
        c.kill().await.ok();
    }
}
