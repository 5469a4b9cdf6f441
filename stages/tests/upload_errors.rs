//! What a failed upload tells the vendor: the object's key and what went
//! wrong, never where the media directory lives on the server.

mod support;

use image::ImageFormat;
use image_queue_pipeline::Stage;
use image_queue_stages::UploadConfig;
use support::{context, encode, event_for, product_photo};

#[tokio::test]
async fn a_local_upload_error_names_no_server_path() {
    let (ctx, dir) = context();
    // The media directory's parent is a file: nothing can be created there.
    let blocker = dir.path().join("not-a-directory");
    std::fs::write(&blocker, b"x").unwrap();
    let media = blocker.join("media");
    let stage = UploadConfig::Local {
        dir: media,
        public_base_url: "http://127.0.0.1:3001/media".into(),
    }
    .build(ctx.clone())
    .unwrap();
    let png = encode(&product_photo(8, 8), ImageFormat::Png);
    let mut ev = event_for(&ctx, "job-1", 0, png).await;
    ev.ops.clear();
    let err = match stage.handle(ev).await {
        Ok(_) => panic!("stored under a file"),
        Err(e) => e,
    };
    let root = dir.path().to_string_lossy().to_string();
    assert!(!err.message.contains(&root), "{}", err.message);
    assert!(!err.message.contains("not-a-directory"), "{}", err.message);
    assert!(
        err.message.contains("job-1"),
        "the error names the object: {}",
        err.message
    );
    assert!(err.is_retryable(), "{}", err.message);
}
