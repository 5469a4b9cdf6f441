//! resize: makes the configured variants of an image (the seed's "image
//! processing").
//!
//! Each variant fits the image within a long side, never upscaling, and is
//! encoded in its own format. Transparency is kept where the format has it.

use std::io::Cursor;

use async_trait::async_trait;
use bytes::Bytes;
use image::imageops::FilterType;
use image::{DynamicImage, ImageFormat};
use image_queue_pipeline::{ImageEvent, Outcome, OutputRef, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};

use crate::decode::{decode, DecodeLimits};
use crate::{cpu, StageContext};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    Webp,
    Jpeg,
    Png,
}

impl Encoding {
    pub fn extension(self) -> &'static str {
        match self {
            Encoding::Webp => "webp",
            Encoding::Jpeg => "jpg",
            Encoding::Png => "png",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Webp => "image/webp",
            Encoding::Jpeg => "image/jpeg",
            Encoding::Png => "image/png",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    pub name: String,
    /// The longest side, in pixels.
    pub long_side: u32,
    pub format: Encoding,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ResizeConfig {
    pub variants: Vec<Variant>,
    /// JPEG quality, 1–100.
    pub quality: u8,
}

impl Default for ResizeConfig {
    fn default() -> Self {
        let v = |name: &str, long_side| Variant {
            name: name.into(),
            long_side,
            format: Encoding::Webp,
        };
        ResizeConfig {
            variants: vec![v("large", 1600), v("medium", 800), v("thumb", 200)],
            quality: 85,
        }
    }
}

impl ResizeConfig {
    pub fn build(&self, ctx: StageContext, limits: DecodeLimits) -> ResizeStage {
        ResizeStage {
            ctx,
            limits,
            config: self.clone(),
        }
    }
}

pub struct ResizeStage {
    ctx: StageContext,
    limits: DecodeLimits,
    config: ResizeConfig,
}

/// Fits `w`×`h` within a long side, never upscaling.
pub fn fit(w: u32, h: u32, long_side: u32) -> (u32, u32) {
    let long = w.max(h);
    if long <= long_side {
        return (w, h);
    }
    let s = long_side as f64 / long as f64;
    (
        ((w as f64) * s).round().max(1.0) as u32,
        ((h as f64) * s).round().max(1.0) as u32,
    )
}

pub fn encode(img: &DynamicImage, format: Encoding, quality: u8) -> Result<Vec<u8>, StageError> {
    let mut out = Vec::new();
    let mut cur = Cursor::new(&mut out);
    let r = match format {
        Encoding::Png => img.write_to(&mut cur, ImageFormat::Png),
        Encoding::Webp => DynamicImage::ImageRgba8(img.to_rgba8()).write_to(&mut cur, ImageFormat::WebP),
        Encoding::Jpeg => {
            let rgb = DynamicImage::ImageRgb8(img.to_rgb8());
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut cur, quality.clamp(1, 100)).encode_image(&rgb)
        }
    };
    r.map_err(|e| StageError::permanent(format!("encoding {format:?}: {e}")))?;
    Ok(out)
}

#[async_trait]
impl Stage for ResizeStage {
    fn name(&self) -> StageName {
        StageName::Resize
    }

    async fn handle(&self, mut event: ImageEvent) -> Result<Outcome, StageError> {
        let bytes = self.ctx.working_image(&event).await?;
        let limits = self.limits.clone();
        let config = self.config.clone();
        let variants = cpu("resize", move || {
            let img = decode(&bytes, &limits)?;
            config
                .variants
                .iter()
                .map(|v| {
                    let (w, h) = fit(img.width(), img.height(), v.long_side);
                    let scaled = if (w, h) == (img.width(), img.height()) {
                        img.clone()
                    } else {
                        img.resize_exact(w, h, FilterType::Lanczos3)
                    };
                    Ok((v.clone(), w, h, encode(&scaled, v.format, config.quality)?))
                })
                .collect::<Result<Vec<_>, StageError>>()
        })
        .await?;
        for (v, w, h, data) in variants {
            let key = image_queue_pipeline::blob::blob_key(
                &event.job,
                event.image,
                &format!("{}.{}", v.name, v.format.extension()),
            );
            let len = data.len() as u64;
            self.ctx
                .blobs
                .put(&key, Bytes::from(data))
                .await
                .map_err(|e| StageError::retryable(format!("writing blob {key}: {e}")))?;
            event.outputs.insert(
                v.name.clone(),
                OutputRef {
                    blob: Some(key),
                    url: None,
                    content_type: v.format.content_type().into(),
                    width: w,
                    height: h,
                    bytes: len,
                },
            );
        }
        Ok(Outcome::Done(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_never_upscales() {
        assert_eq!(fit(4000, 2000, 1600), (1600, 800));
        assert_eq!(fit(100, 50, 1600), (100, 50));
        assert_eq!(fit(2000, 4000, 200), (100, 200));
    }
}
