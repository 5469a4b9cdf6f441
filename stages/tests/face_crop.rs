//! face-crop on real photographs: a portrait (scikit-image's astronaut,
//! fetched by `scripts/fetch-test-images.sh`) and an image without a face.

mod support;

use image::ImageFormat;
use image_queue_pipeline::{Outcome, Stage};
use image_queue_stages::face_crop::NoFace;
use image_queue_stages::FaceCropConfig;
use serde_json::Value;
use support::{context, encode, event_for, product_photo, working};

fn astronaut() -> image::RgbaImage {
    let path = support::repo_root().join("stages/tests/data/astronaut.png");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}: run scripts/fetch-test-images.sh (it takes the photo from the scikit-image wheel on PyPI)",
            path.display()
        )
    });
    image::load_from_memory(&bytes).unwrap().to_rgba8()
}

fn rect(v: &Value) -> (u32, u32, u32, u32) {
    let g = |k: &str| v[k].as_u64().unwrap() as u32;
    (g("x"), g("y"), g("w"), g("h"))
}

#[tokio::test]
async fn crops_around_a_real_face_and_leaves_an_image_without_one_uncropped() {
    let (ctx, _dir) = context();
    let stage = FaceCropConfig::default().build(ctx.clone()).unwrap();
    let photo = astronaut();

    // The astronaut's face is in the upper left quarter of the 512×512 photo.
    let ev = event_for(&ctx, "face", 0, encode(&photo, ImageFormat::Png)).await;
    let Outcome::Done(ev) = stage.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    assert_eq!(ev.notes["face_found"], true, "{:?}", ev.notes);
    let (fx, fy, fw, fh) = rect(&ev.notes["face_box"]);
    let (cx, cy) = (fx + fw / 2, fy + fh / 2);
    assert!(
        (150..300).contains(&cx) && (60..200).contains(&cy),
        "face box {:?}",
        ev.notes["face_box"]
    );
    assert!((50..200).contains(&fw), "face box {:?}", ev.notes["face_box"]);
    let (x, y, w, h) = rect(&ev.notes["crop_box"]);
    assert_eq!(w, h, "square by default");
    assert!(x + w <= 512 && y + h <= 512);
    assert!(
        x <= fx && y <= fy && fx + fw <= x + w && fy + fh <= y + h,
        "the face is inside the crop"
    );
    let out = working(&ctx, &ev).await;
    assert_eq!(out.dimensions(), (w, h));

    // The same photo at 4× is downscaled for detection and the box mapped
    // back: it lands on the same face, four times as large.
    let big = image::imageops::resize(&photo, 2048, 2048, image::imageops::FilterType::Triangle);
    let ev = event_for(&ctx, "face", 1, encode(&big, ImageFormat::Jpeg)).await;
    let Outcome::Done(ev) = stage.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    assert_eq!(ev.notes["face_found"], true);
    let (bx, by, bw, _) = rect(&ev.notes["face_box"]);
    let (bcx, bcy) = (bx + bw / 2, by + bw / 2);
    assert!(
        bcx.abs_diff(cx * 4) < 60 && bcy.abs_diff(cy * 4) < 60,
        "{:?} vs {cx},{cy} ×4",
        ev.notes["face_box"]
    );
    assert!(bw.abs_diff(fw * 4) < fw, "{bw} vs {fw}×4");

    // A 4:5 portrait crop of the same.
    let stage45 = FaceCropConfig {
        aspect: 0.8,
        ..FaceCropConfig::default()
    }
    .build(ctx.clone())
    .unwrap();
    let ev = event_for(&ctx, "face", 2, encode(&photo, ImageFormat::Png)).await;
    let Outcome::Done(ev) = stage45.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    let (_, _, w, h) = rect(&ev.notes["crop_box"]);
    assert!(((w as f32 / h as f32) - 0.8).abs() < 0.02, "{w}×{h}");

    // No face: by default the image is left whole, with a warning.
    let ev = event_for(&ctx, "noface", 0, encode(&product_photo(640, 480), ImageFormat::Png)).await;
    let Outcome::Done(ev) = stage.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    assert_eq!(ev.notes["face_found"], false);
    assert!(ev.notes.get("face_box").is_none());
    assert!(ev.notes.get("crop_box").is_none(), "{:?}", ev.notes);
    let warnings = ev.notes["warnings"].as_array().expect("a warnings note");
    assert!(warnings[0].as_str().unwrap().contains("no face"), "{warnings:?}");
    let out = image::load_from_memory(&ctx.working_image(&ev).await.unwrap()).unwrap();
    assert_eq!((out.width(), out.height()), (640, 480), "uncropped");

    // With no_face = "center": a centre crop, and it says so.
    let centre = FaceCropConfig {
        no_face: NoFace::Center,
        ..FaceCropConfig::default()
    }
    .build(ctx.clone())
    .unwrap();
    let ev = event_for(&ctx, "noface", 1, encode(&product_photo(640, 480), ImageFormat::Png)).await;
    let Outcome::Done(ev) = centre.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    assert_eq!(ev.notes["face_found"], false);
    assert_eq!(rect(&ev.notes["crop_box"]), (80, 0, 480, 480));
    assert!(ev.notes.get("warnings").is_none());
    let out = working(&ctx, &ev).await;
    assert_eq!(out.dimensions(), (480, 480));
}
