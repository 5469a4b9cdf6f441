//! What the stages do with images that would otherwise ship bad or twice:
//! a cutout whose mask is doubtful (bg-removal's quality guard), and a
//! small image whose variants are the same bytes (resize and upload).

mod support;

use image::{ImageFormat, Rgba, RgbaImage};
use image_queue_pipeline::{Outcome, Stage};
use image_queue_stages::bg_removal::OnDoubtfulMask;
use image_queue_stages::{BgRemovalConfig, ResizeConfig, UploadConfig};
use support::{context, encode, event_for, product_photo};

/// A photo with no plain backdrop: busy to its very edges.
fn busy_photo(w: u32, h: u32) -> RgbaImage {
    RgbaImage::from_fn(w, h, |x, y| {
        Rgba([(x * 37 % 256) as u8, (y * 53 % 256) as u8, ((x * y) % 256) as u8, 255])
    })
}

#[tokio::test]
async fn a_doubtful_mask_ships_the_original_with_a_warning_by_default() {
    let (ctx, _dir) = context();
    let stage = BgRemovalConfig::default().build(ctx.clone()).unwrap();
    let original = encode(&busy_photo(120, 90), ImageFormat::Png);
    let ev = event_for(&ctx, "busy", 0, original.clone()).await;
    let Outcome::Done(ev) = stage.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    let warnings = ev.notes["warnings"].as_array().expect("a warnings note");
    assert!(
        warnings[0].as_str().unwrap().contains("removed almost nothing"),
        "{warnings:?}"
    );
    assert_eq!(ev.notes["bg_removed"], false);
    assert!(ev.notes["mask"]["coverage"].as_f64().unwrap() > 0.97, "{:?}", ev.notes);
    // The original, byte for byte: not a cutout of it.
    assert_eq!(ctx.working_image(&ev).await.unwrap().as_ref(), &original[..]);

    // "keep" ships the cutout, still with the warning.
    let keep = BgRemovalConfig::default()
        .build(ctx.clone())
        .unwrap()
        .on_doubtful_mask(OnDoubtfulMask::Keep);
    let ev = event_for(&ctx, "busy", 1, original.clone()).await;
    let Outcome::Done(ev) = keep.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    assert!(ev.notes["warnings"].as_array().is_some_and(|w| w.len() == 1));
    let cut = image::load_from_memory(&ctx.working_image(&ev).await.unwrap()).unwrap();
    assert_eq!(cut.color(), image::ColorType::Rgba8, "a cutout PNG");

    // "fail" fails the image, permanently, saying why.
    let fail = BgRemovalConfig::default()
        .build(ctx.clone())
        .unwrap()
        .on_doubtful_mask(OnDoubtfulMask::Fail);
    let ev = event_for(&ctx, "busy", 2, original).await;
    let e = fail.handle(ev).await.expect_err("a failure");
    assert!(
        !e.is_retryable() && e.message.contains("removed almost nothing"),
        "{e:?}"
    );

    // A uniform image: border-key removes everything, a near-empty mask.
    let blank = encode(
        &RgbaImage::from_pixel(80, 60, Rgba([250, 250, 250, 255])),
        ImageFormat::Png,
    );
    let ev = event_for(&ctx, "blank", 0, blank).await;
    let Outcome::Done(ev) = stage.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    assert!(
        ev.notes["warnings"][0].as_str().unwrap().contains("near-empty"),
        "{:?}",
        ev.notes
    );

    // A product on a plain backdrop is a good cutout: no warning.
    let ev = event_for(&ctx, "product", 0, encode(&product_photo(160, 120), ImageFormat::Png)).await;
    let Outcome::Done(ev) = stage.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    assert!(ev.notes.get("warnings").is_none(), "{:?}", ev.notes);
    assert!(ev.notes.get("bg_removed").is_none());
}

#[tokio::test]
async fn identical_variants_of_a_small_image_are_made_and_stored_once() {
    let (ctx, dir) = context();
    let resize = ResizeConfig::default().build(ctx.clone()).unwrap();
    // 600×450 fits large (1600) and medium (800) whole: the same bytes.
    let ev = event_for(&ctx, "small", 0, encode(&product_photo(600, 450), ImageFormat::Png)).await;
    let Outcome::Done(ev) = resize.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    let (large, medium, thumb) = (&ev.outputs["large"], &ev.outputs["medium"], &ev.outputs["thumb"]);
    assert_eq!((large.width, large.height), (600, 450));
    assert_eq!(large.blob, medium.blob, "one blob for both");
    assert_ne!(large.blob, thumb.blob);

    let media = dir.path().join("media");
    let upload = UploadConfig::Local {
        dir: media.clone(),
        public_base_url: "http://shop.example/media".into(),
    }
    .build(ctx.clone())
    .unwrap();
    let Outcome::Done(ev) = upload.handle(ev).await.unwrap() else {
        panic!("deferred")
    };
    assert_eq!(ev.outputs["large"].url, ev.outputs["medium"].url);
    assert_ne!(ev.outputs["large"].url, ev.outputs["thumb"].url);
    let files = walk(&media);
    assert_eq!(files.len(), 2, "{files:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
