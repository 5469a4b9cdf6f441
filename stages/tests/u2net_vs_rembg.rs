//! The in-process U²-Net engine, on both runtimes (tract and ONNX Runtime,
//! the latter with one session over every core and with a pool of
//! single-threaded sessions), makes the mask a real rembg server makes with
//! the same model (u2netp) and image: within 1/255 mean absolute difference,
//! also with more images in flight than sessions. Needs
//! `scripts/install-rembg.sh` (rembg, the model, and ONNX Runtime's shared
//! library in rembg's virtualenv) and `scripts/fetch-test-images.sh` (a
//! real photograph).

mod support;

use std::time::Instant;

use image::{DynamicImage, ImageFormat};
use image_queue_pipeline::{Outcome, Stage};
use image_queue_stages::onnxruntime::{ExecutionProvider, SessionSettings};
use image_queue_stages::rembg::RembgConfig;
use image_queue_stages::u2net::{Runtime, U2net};
use image_queue_stages::BgRemovalConfig;
use support::{
    context, encode, event_for, mad, models_dir, onnxruntime_library, product_photo, working, RembgServer,
    REMBG_START_TIMEOUT,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_mask_matches_rembgs() {
    let server = RembgServer::start(None).await;
    let rembg = RembgConfig {
        urls: vec![server.url()],
        model: "u2netp".into(),
        only_mask: true,
        wait_ready_ms: REMBG_START_TIMEOUT.as_millis() as u64,
        ..RembgConfig::default()
    }
    .build()
    .unwrap();
    let model_path = models_dir().join("u2netp.onnx");
    let library = onnxruntime_library();
    let tract = U2net::shared(&model_path).unwrap();
    let onnxruntime =
        U2net::shared_on(&model_path, Runtime::Onnxruntime, Some(&library)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(onnxruntime.runtime(), Runtime::Onnxruntime);
    let settings = |sessions, threads| SessionSettings {
        sessions,
        threads,
        provider: ExecutionProvider::Cpu,
    };
    let wide = U2net::shared_with(&model_path, Runtime::Onnxruntime, Some(&library), &settings(1, 2)).unwrap();
    let pool = U2net::shared_with(&model_path, Runtime::Onnxruntime, Some(&library), &settings(2, 1)).unwrap();
    assert_eq!(pool.onnxruntime_settings(), Some(settings(2, 1)));
    // The CPU build has no CUDA: asking for it is a startup error saying
    // what to install, never a silent fall back to the CPU.
    let cuda = SessionSettings {
        provider: ExecutionProvider::Cuda,
        ..settings(1, 1)
    };
    let e = U2net::shared_with(&model_path, Runtime::Onnxruntime, Some(&library), &cuda)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("no CUDA execution provider") && e.contains("onnxruntime-gpu"),
        "{e}"
    );

    let astronaut_path = support::repo_root().join("stages/tests/data/astronaut.png");
    let astronaut = image::open(&astronaut_path)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-test-images.sh", astronaut_path.display()))
        .to_rgba8();
    for (name, img) in [("product photo", product_photo(640, 480)), ("astronaut", astronaut)] {
        let png = encode(&img, ImageFormat::Png);
        let (theirs, _) = rembg.remove(png.into()).await.unwrap();
        let theirs = image::load_from_memory(&theirs).unwrap().to_luma8();
        let img = DynamicImage::ImageRgba8(img);
        for model in [&tract, &onnxruntime, &wide, &pool] {
            let runtime = match model.onnxruntime_settings() {
                None => "tract".to_string(),
                Some(s) => format!("onnxruntime, {} session(s) × {} thread(s)", s.sessions, s.threads),
            };
            let started = Instant::now();
            let ours = model.mask(&img).unwrap();
            let took = started.elapsed();
            let d = mad(&ours, &theirs);
            eprintln!("{name}, {runtime}: mask MAD vs rembg {d:.4}/255, in-process mask in {took:?}");
            assert!(
                d <= 1.0,
                "{name}: the {runtime} mask differs from rembg's by {d:.3}/255 on average"
            );
        }
        // Five images at once through two sessions: each waits its turn and
        // gets its own image's mask.
        let alone = pool.mask(&img).unwrap();
        let at_once: Vec<_> = std::thread::scope(|s| {
            let running: Vec<_> = (0..5).map(|_| s.spawn(|| pool.mask(&img).unwrap())).collect();
            running.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for m in at_once {
            assert_eq!(mad(&m, &alone), 0.0, "{name}: a mask made beside others differs");
        }
    }

    // Through the stage, on each runtime: a cutout with the engine named.
    let (ctx, _dir) = context();
    for runtime in [Runtime::Tract, Runtime::Onnxruntime] {
        let stage = BgRemovalConfig::U2net {
            model_kind: None,
            model: model_path.clone(),
            runtime,
            onnxruntime_library: Some(library.clone()),
            onnxruntime: Default::default(),
        }
        .build(ctx.clone())
        .unwrap();
        let ev = event_for(
            &ctx,
            runtime.as_str(),
            0,
            encode(&product_photo(400, 300), ImageFormat::Jpeg),
        )
        .await;
        let Outcome::Done(ev) = stage.handle(ev).await.unwrap() else {
            panic!("deferred")
        };
        assert_eq!(ev.notes["bg_engine"], "u2net");
        assert_eq!(ev.notes["bg_runtime"], runtime.as_str());
        let cut = working(&ctx, &ev).await;
        assert_eq!(cut.get_pixel(0, 0)[3], 0);
        assert!(cut.get_pixel(200, 150)[3] >= 250);
    }

    // What `up` picks: ONNX Runtime when its library loads, else tract.
    let (chosen, why) = BgRemovalConfig::detect_with(&model_path, Some(&library));
    assert!(
        matches!(
            chosen,
            BgRemovalConfig::U2net {
                runtime: Runtime::Onnxruntime,
                ..
            }
        ),
        "{chosen:?}: {why}"
    );
    let (chosen, why) = BgRemovalConfig::detect_with(
        &model_path,
        Some(std::path::Path::new("/nonexistent/libonnxruntime.so")),
    );
    assert!(
        matches!(
            chosen,
            BgRemovalConfig::U2net {
                runtime: Runtime::Tract,
                ..
            }
        ),
        "{chosen:?}: {why}"
    );
    assert!(why.contains("/nonexistent/libonnxruntime.so"), "{why}");
}
