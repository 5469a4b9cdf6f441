//! One image asking for all three operations, through the real stages in
//! order (bg-removal, face-crop, resize), on a real photograph with a face,
//! with each background-removal engine: a pool of real rembg servers, and
//! U²-Net in process on tract and on ONNX Runtime. Each must leave a
//! transparent cutout, a crop around the face and WebP variants that keep
//! the transparency. Needs `scripts/install-rembg.sh` and
//! `scripts/fetch-test-images.sh`.

mod support;

use std::sync::Arc;

use image::{GenericImageView, ImageFormat};
use image_queue_pipeline::{Operation, Outcome, Stage};
use image_queue_stages::rembg::RembgConfig;
use image_queue_stages::u2net::Runtime;
use image_queue_stages::{BgRemovalConfig, FaceCropConfig, ResizeConfig};
use support::{context, encode, event_for, models_dir, onnxruntime_library, working, RembgServer, REMBG_START_TIMEOUT};

async fn run(stage: &Arc<dyn Stage>, ev: image_queue_pipeline::ImageEvent) -> image_queue_pipeline::ImageEvent {
    match stage.handle(ev).await {
        Ok(Outcome::Done(ev)) => ev,
        Ok(Outcome::Deferred { reason, .. }) => panic!("deferred: {reason}"),
        Err(e) => panic!("{}: {e}", stage.name()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_operations_with_each_engine_on_a_real_portrait() {
    let path = support::repo_root().join("stages/tests/data/astronaut.png");
    let photo = image::open(&path)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-test-images.sh", path.display()))
        .to_rgba8();
    let server = RembgServer::start(None).await;
    let model = models_dir().join("u2netp.onnx");
    let engines = [
        (
            "rembg pool",
            BgRemovalConfig::Rembg(RembgConfig {
                urls: vec![server.url()],
                model: "u2netp".into(),
                wait_ready_ms: REMBG_START_TIMEOUT.as_millis() as u64,
                ..RembgConfig::default()
            }),
        ),
        (
            "u2net on tract",
            BgRemovalConfig::U2net {
                model_kind: None,
                model: model.clone(),
                runtime: Runtime::Tract,
                onnxruntime_library: None,
                onnxruntime: Default::default(),
            },
        ),
        (
            "u2net on onnxruntime",
            BgRemovalConfig::U2net {
                model_kind: None,
                model: model.clone(),
                runtime: Runtime::Onnxruntime,
                onnxruntime_library: Some(onnxruntime_library()),
                onnxruntime: Default::default(),
            },
        ),
    ];
    let (ctx, _dir) = context();
    let face_crop: Arc<dyn Stage> = Arc::new(FaceCropConfig::default().build(ctx.clone()).unwrap());
    let resize: Arc<dyn Stage> = Arc::new(ResizeConfig::default().build(ctx.clone()).unwrap());
    for (i, (name, config)) in engines.into_iter().enumerate() {
        let bg: Arc<dyn Stage> = Arc::new(config.build(ctx.clone()).unwrap_or_else(|e| panic!("{name}: {e}")));
        let mut ev = event_for(&ctx, "three-ops", i as u32, encode(&photo, ImageFormat::Jpeg)).await;
        ev.ops = vec![Operation::BgRemoval, Operation::FaceCrop, Operation::Resize];

        // The cutout: the sky behind the astronaut gone, her face kept.
        let ev = run(&bg, ev).await;
        let cut = working(&ctx, &ev).await;
        assert_eq!(cut.dimensions(), (512, 512), "{name}");
        for (x, y) in [(0, 0), (511, 0), (500, 20)] {
            assert!(
                cut.get_pixel(x, y)[3] <= 5,
                "{name}: backdrop at ({x},{y}) kept: {:?}",
                cut.get_pixel(x, y)
            );
        }
        assert!(cut.get_pixel(225, 130)[3] >= 250, "{name}: the face is not opaque");

        // The crop: square, around the face, found on the cutout.
        let ev = run(&face_crop, ev).await;
        assert_eq!(ev.notes["face_found"], true, "{name}: {:?}", ev.notes);
        let crop = ev.notes["crop_box"].clone();
        let (w, h) = (crop["w"].as_u64().unwrap(), crop["h"].as_u64().unwrap());
        assert_eq!(w, h, "{name}: square by default");

        // The variants: WebP, never upscaled past the crop, alpha kept.
        let ev = run(&resize, ev).await;
        assert_eq!(
            ev.outputs.keys().map(String::as_str).collect::<Vec<_>>(),
            ["large", "medium", "thumb"],
            "{name}"
        );
        for (variant, out) in &ev.outputs {
            assert_eq!(out.content_type, "image/webp", "{name} {variant}");
            let bytes = ctx.blobs.get(out.blob.as_deref().unwrap()).await.unwrap();
            assert_eq!(image::guess_format(&bytes).unwrap(), ImageFormat::WebP);
            let img = image::load_from_memory(&bytes).unwrap();
            assert!(img.width() as u64 <= w, "{name} {variant}: upscaled");
            assert_eq!((img.width(), img.height()), (out.width, out.height));
            assert!(img.color().has_alpha(), "{name} {variant}: transparency dropped");
        }
        let large = image::load_from_memory(
            &ctx.blobs
                .get(ev.outputs["large"].blob.as_deref().unwrap())
                .await
                .unwrap(),
        )
        .unwrap();
        assert!(
            large.pixels().any(|(_, _, p)| p[3] == 0),
            "{name}: the cropped cutout has no transparent pixel left"
        );
        eprintln!(
            "{name}: cutout, face crop {crop}, variants {:?}",
            ev.outputs
                .iter()
                .map(|(k, o)| format!("{k} {}x{}", o.width, o.height))
                .collect::<Vec<_>>()
        );
    }
}
