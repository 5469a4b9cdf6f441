//! Per-image times of the image stages at 1024×1024, printed as a Markdown
//! table: in-process U²-Net on tract and on ONNX Runtime against a real
//! rembg server on the same model (u2netp), with each one's ratio to rembg,
//! face detection and crop, and every resize variant.
//!
//! `cargo bench --bench images` (needs `scripts/install-rembg.sh` and
//! `scripts/fetch-test-images.sh`). Each figure is the median of several
//! runs after a warm-up, one image at a time; the background-removal ways
//! take turns, round by round.

#[path = "../stages/tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat};
use image_queue_stages::face_crop::{crop_around, detect_faces, FaceCropConfig};
use image_queue_stages::rembg::RembgConfig;
use image_queue_stages::resize::{encode as encode_variant, fit, scale, ResizeConfig};
use image_queue_stages::u2net::{Runtime, U2net};
use support::{encode, models_dir, onnxruntime_library, product_photo, RembgServer, REMBG_START_TIMEOUT};

const RUNS: usize = 7;

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64() * 1000.0
}

fn time(mut f: impl FnMut()) -> f64 {
    f();
    let mut v = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        f();
        v.push(t.elapsed());
    }
    median(v)
}

fn main() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(run());
}

async fn run() {
    let photo = DynamicImage::ImageRgba8(product_photo(1024, 1024));
    let photo_png = bytes::Bytes::from(encode(&photo.to_rgba8(), ImageFormat::Png));
    let astronaut = image::open(support::repo_root().join("stages/tests/data/astronaut.png"))
        .expect("run scripts/fetch-test-images.sh")
        .resize_exact(1024, 1024, FilterType::Lanczos3);
    let mut rows: Vec<(String, f64)> = Vec::new();

    // Background removal, same model three ways.
    let model_path = models_dir().join("u2netp.onnx");
    let model = U2net::shared(&model_path).unwrap();
    let ort_model = U2net::shared_on(&model_path, Runtime::Onnxruntime, Some(&onnxruntime_library()))
        .unwrap_or_else(|e| panic!("{e}"));
    let server = RembgServer::start(None).await;
    let pool = RembgConfig {
        urls: vec![server.url()],
        model: "u2netp".into(),
        wait_ready_ms: REMBG_START_TIMEOUT.as_millis() as u64,
        ..RembgConfig::default()
    }
    .build()
    .unwrap();
    let cutout = |m: &U2net| {
        m.cutout(&photo).unwrap();
    };
    // What the stage does around the model, for the comparison with rembg,
    // which decodes and encodes PNG too.
    let stage_like = |m: &U2net| {
        let img = image::load_from_memory(&photo_png).unwrap();
        let cut = DynamicImage::ImageRgba8(m.cutout(&img).unwrap());
        std::hint::black_box(encode(&cut.to_rgba8(), ImageFormat::Png));
    };
    // The ways take turns, one image each per round, so that load from
    // elsewhere on the machine falls on all of them alike.
    let mut times: [Vec<Duration>; 4] = Default::default();
    for round in 0..=RUNS {
        let mut took = [Duration::ZERO; 4];
        let t = Instant::now();
        cutout(&model);
        took[0] = t.elapsed();
        let t = Instant::now();
        cutout(&ort_model);
        took[1] = t.elapsed();
        let t = Instant::now();
        stage_like(&ort_model);
        took[2] = t.elapsed();
        let t = Instant::now();
        pool.remove(photo_png.clone()).await.unwrap();
        took[3] = t.elapsed();
        // Round 0 is the warm-up: model loads, caches, rembg's first session.
        if round > 0 {
            for (v, d) in times.iter_mut().zip(took) {
                v.push(d);
            }
        }
    }
    drop(server);
    let [tract_t, ort_t, ort_stage_t, rembg_t] = times.map(median);
    let rembg_ms = rembg_t;
    let bg: Vec<(String, f64)> = vec![
        (
            "bg-removal, in-process u2net (u2netp, tract): mask + cutout".into(),
            tract_t,
        ),
        (
            "bg-removal, in-process u2net (u2netp, onnxruntime): mask + cutout".into(),
            ort_t,
        ),
        (
            "bg-removal, in-process u2net (u2netp, onnxruntime): PNG decode + mask + cutout + PNG encode".into(),
            ort_stage_t,
        ),
        (
            "bg-removal, rembg server (u2netp, onnxruntime), one instance, over HTTP".into(),
            rembg_t,
        ),
    ];
    println!("| bg-removal, one 1024×1024 image | median ms | × rembg |");
    println!("| --- | ---: | ---: |");
    for (what, ms) in &bg {
        println!("| {what} | {ms:.1} | {:.2} |", ms / rembg_ms);
    }
    println!();
    rows.extend(bg);

    // Face crop: detection (downscaled to 800) and the crop.
    let fc = FaceCropConfig::default();
    rows.push((
        "face-crop: detect (SeetaFace) + crop, a portrait".into(),
        time(|| {
            let faces = detect_faces(&astronaut, &fc);
            let r = crop_around(1024, 1024, faces[0], &fc);
            std::hint::black_box(astronaut.crop_imm(r.x, r.y, r.w, r.h));
        }),
    ));
    rows.push((
        "face-crop: detect, no face (the product photo)".into(),
        time(|| {
            assert!(detect_faces(&photo, &fc).is_empty());
        }),
    ));

    // Resize: every default variant, for an opaque photo and a cutout.
    let rc = ResizeConfig::default();
    let opaque = DynamicImage::ImageRgb8(photo.to_rgb8());
    let cut = DynamicImage::ImageRgba8(model.cutout(&photo).unwrap());
    for (what, img) in [("opaque photo", &opaque), ("cutout with alpha", &cut)] {
        for v in &rc.variants {
            let (w, h) = fit(1024, 1024, v.long_side);
            rows.push((
                format!("resize {what}: {} ({w}×{h} {:?}, q{})", v.name, v.format, rc.quality),
                time(|| {
                    let s = if (w, h) == (1024, 1024) {
                        img.clone()
                    } else {
                        scale(img, w, h).unwrap()
                    };
                    encode_variant(&s, v.format, rc.quality).unwrap();
                }),
            ));
        }
    }

    println!("| step, one 1024×1024 image | median ms |");
    println!("| --- | ---: |");
    for (what, ms) in rows {
        println!("| {what} | {ms:.1} |");
    }
}
