//! Every model family the in-process engine runs (U²-Net, IS-Net,
//! BiRefNet) makes the mask rembg's own session for that family makes, on
//! both runtimes: within 1/255 mean absolute difference, on a generated
//! product photo and a real photograph. The models are small ones made for
//! the test with each family's input and output signature
//! (`support/model_families.py`, which also runs rembg's sessions:
//! `u2net_custom`, `dis_custom`, and BiRefNet's with the model's path), so
//! every pre- and post-processing step counts and nothing large is
//! downloaded; u2netp itself is checked on the real model in
//! `u2net_vs_rembg.rs`. Needs `scripts/install-rembg.sh` and
//! `scripts/fetch-test-images.sh`.

mod support;

use std::path::Path;

use image::{DynamicImage, GrayImage, ImageFormat};
use image_queue_stages::onnxruntime::{ExecutionProvider, SessionSettings};
use image_queue_stages::u2net::{ModelKind, Runtime, U2net};
use support::{encode, mad, onnxruntime_library, product_photo, rembg_python, repo_root};

fn load_mask(path: &Path) -> GrayImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_luma8()
}

#[test]
fn each_model_family_makes_rembgs_mask() {
    let dir = tempfile::tempdir().unwrap();
    let astronaut_path = repo_root().join("stages/tests/data/astronaut.png");
    let astronaut = image::open(&astronaut_path)
        .unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-test-images.sh", astronaut_path.display()));
    let images = [DynamicImage::ImageRgba8(product_photo(640, 480)), astronaut];
    let mut args = vec![dir.path().to_path_buf()];
    for (i, img) in images.iter().enumerate() {
        let path = dir.path().join(format!("image-{i}.png"));
        std::fs::write(&path, encode(&img.to_rgba8(), ImageFormat::Png)).unwrap();
        args.push(path);
    }
    let script = repo_root().join("stages/tests/support/model_families.py");
    let made = std::process::Command::new(rembg_python())
        .arg(&script)
        .args(&args)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{} failed (scripts/install-rembg.sh installs rembg and onnx): {}",
        script.display(),
        String::from_utf8_lossy(&made.stderr)
    );

    let library = onnxruntime_library();
    let settings = SessionSettings {
        sessions: 1,
        threads: 2,
        provider: ExecutionProvider::Cpu,
    };
    for kind in ModelKind::ALL {
        let model = dir.path().join(format!("tiny-{}.onnx", kind.as_str()));
        // rembg's names tell the family; these made-up names do too.
        assert_eq!(ModelKind::from_file_name(&model), Some(kind));
        for runtime in [Runtime::Onnxruntime, Runtime::Tract] {
            let engine = U2net::shared_model(&model, Some(kind), runtime, Some(&library), &settings)
                .unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(engine.kind(), kind);
            for (i, img) in images.iter().enumerate() {
                let theirs = load_mask(&dir.path().join(format!("{}-{i}.png", kind.as_str())));
                let ours = engine.mask(img).unwrap();
                let d = mad(&ours, &theirs);
                eprintln!(
                    "{}, {}, image {i}: mask MAD vs rembg {d:.4}/255",
                    kind.as_str(),
                    runtime.as_str()
                );
                assert!(
                    d <= 1.0,
                    "{} on {}: the mask of image {i} differs from rembg's by {d:.3}/255 on average",
                    kind.as_str(),
                    runtime.as_str()
                );
            }
        }
    }

    // The families' processing differs where it matters: BiRefNet's model
    // run as if it were IS-Net (same input size, other normalisation, no
    // sigmoid) gives another mask, so the comparison above can fail.
    let model = dir.path().join("tiny-birefnet.onnx");
    let wrong = U2net::shared_model(
        &model,
        Some(ModelKind::Isnet),
        Runtime::Onnxruntime,
        Some(&library),
        &settings,
    )
    .unwrap();
    let theirs = load_mask(&dir.path().join("birefnet-1.png"));
    let d = mad(&wrong.mask(&images[1]).unwrap(), &theirs);
    assert!(
        d > 5.0,
        "processing for the wrong family came within {d:.3}/255 of rembg's mask"
    );
}
