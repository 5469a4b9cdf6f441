//! resize: makes the configured variants of an image (the seed's "image
//! processing").
//!
//! Each variant fits the image within a long side, never upscaling, and is
//! encoded in its own format. Transparency is kept where the format has it.
//! Scaling is Lanczos3 with `fast_image_resize` (SIMD, and alpha-aware, so
//! a cutout's transparent pixels do not bleed dark fringes into its edge).
//! The image was decoded upright (EXIF orientation applied) and the
//! encoders write no metadata, so variants carry no EXIF.

use std::io::Cursor;

use async_trait::async_trait;
use bytes::Bytes;
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
    /// JPEG and WebP quality, 1–100.
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
    pub fn build(&self, ctx: StageContext) -> Result<ResizeStage, std::convert::Infallible> {
        Ok(ResizeStage {
            limits: ctx.limits.clone(),
            ctx,
            config: self.clone(),
        })
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

/// Lanczos3 scaling to exactly `w`×`h`, keeping an alpha channel if any.
pub fn scale(img: &DynamicImage, w: u32, h: u32) -> Result<DynamicImage, StageError> {
    use fast_image_resize::images::Image as FirImage;
    use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
    let alpha = img.color().has_alpha();
    let (pixel, raw) = if alpha {
        (PixelType::U8x4, img.to_rgba8().into_raw())
    } else {
        (PixelType::U8x3, img.to_rgb8().into_raw())
    };
    let src = FirImage::from_vec_u8(img.width(), img.height(), raw, pixel)
        .map_err(|e| StageError::permanent(format!("scaling: {e}")))?;
    let mut dst = FirImage::new(w, h, pixel);
    Resizer::new()
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
        )
        .map_err(|e| StageError::permanent(format!("scaling to {w}×{h}: {e}")))?;
    let out = dst.into_vec();
    Ok(if alpha {
        DynamicImage::ImageRgba8(image::RgbaImage::from_raw(w, h, out).expect("w×h RGBA pixels"))
    } else {
        DynamicImage::ImageRgb8(image::RgbImage::from_raw(w, h, out).expect("w×h RGB pixels"))
    })
}

pub fn encode(img: &DynamicImage, format: Encoding, quality: u8) -> Result<Vec<u8>, StageError> {
    let mut out = Vec::new();
    let mut cur = Cursor::new(&mut out);
    let r = match format {
        Encoding::Png => img.write_to(&mut cur, ImageFormat::Png),
        Encoding::Webp => {
            // Lossy, at the configured quality; RGBA when the image has
            // transparency (a cutout), so it survives.
            let q = quality.clamp(1, 100) as f32;
            let mem = if img.color().has_alpha() {
                let rgba = img.to_rgba8();
                webp::Encoder::from_rgba(rgba.as_raw(), rgba.width(), rgba.height()).encode(q)
            } else {
                let rgb = img.to_rgb8();
                webp::Encoder::from_rgb(rgb.as_raw(), rgb.width(), rgb.height()).encode(q)
            };
            out.extend_from_slice(&mem);
            return Ok(out);
        }
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

    fn measures(&self) -> std::collections::BTreeMap<String, f64> {
        crate::cpu_measures("resize")
    }

    async fn handle(&self, mut event: ImageEvent) -> Result<Outcome, StageError> {
        let bytes = self.ctx.working_image(&event).await?;
        let limits = self.limits.clone();
        let config = self.config.clone();
        // Held until the closure is done with the pixels, even if this
        // future is dropped (a timeout) while the work runs on.
        let admitted = limits.admit(&bytes).await?;
        let variants = cpu("resize", move || {
            let _admitted = admitted;
            let img = decode(&bytes, &limits)?;
            let mut made: Vec<(Variant, u32, u32, Option<Vec<u8>>)> = Vec::new();
            for v in &config.variants {
                let (w, h) = fit(img.width(), img.height(), v.long_side);
                // A small image fits several variants whole: the same size
                // in the same format would be the same bytes, made and
                // stored once (None: see the earlier one).
                if made
                    .iter()
                    .any(|(o, ow, oh, _)| (*ow, *oh, o.format) == (w, h, v.format))
                {
                    made.push((v.clone(), w, h, None));
                    continue;
                }
                let scaled = if (w, h) == (img.width(), img.height()) {
                    img.clone()
                } else {
                    scale(&img, w, h)?
                };
                made.push((v.clone(), w, h, Some(encode(&scaled, v.format, config.quality)?)));
            }
            Ok(made)
        })
        .await?;
        for (v, w, h, data) in variants {
            let same = |o: &&OutputRef| (o.width, o.height, o.content_type.as_str()) == (w, h, v.format.content_type());
            let out = match data {
                Some(data) => {
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
                    OutputRef {
                        blob: Some(key),
                        url: None,
                        content_type: v.format.content_type().into(),
                        width: w,
                        height: h,
                        bytes: len,
                    }
                }
                None => event
                    .outputs
                    .values()
                    .find(|o| same(o) && o.blob.is_some())
                    .cloned()
                    .ok_or_else(|| StageError::permanent(format!("variant {} lost its twin", v.name)))?,
            };
            event.outputs.insert(v.name.clone(), out);
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

    fn cutout(w: u32, h: u32) -> DynamicImage {
        DynamicImage::ImageRgba8(image::RgbaImage::from_fn(w, h, |x, y| {
            let inside = x > w / 4 && x < w * 3 / 4 && y > h / 4 && y < h * 3 / 4;
            if inside {
                image::Rgba([220, 40, 30, 255])
            } else {
                image::Rgba([0, 0, 0, 0])
            }
        }))
    }

    #[test]
    fn cutouts_stay_transparent_through_scaling_and_lossy_webp() {
        let img = cutout(800, 600);
        let small = scale(&img, 200, 150).unwrap();
        let px = small.to_rgba8();
        assert_eq!(px.get_pixel(0, 0)[3], 0);
        assert_eq!(px.get_pixel(100, 75)[3], 255);
        // Alpha-aware scaling: edge pixels keep the subject's colour rather
        // than darkening towards the transparent black around it.
        let edge = px.get_pixel(50, 75);
        if edge[3] > 0 {
            assert!(edge[0] > 150, "{edge:?}");
        }
        let webp = encode(&small, Encoding::Webp, 80).unwrap();
        let back = image::load_from_memory_with_format(&webp, ImageFormat::WebP)
            .unwrap()
            .to_rgba8();
        assert_eq!(back.dimensions(), (200, 150));
        assert_eq!(back.get_pixel(0, 0)[3], 0);
        assert!(back.get_pixel(100, 75)[3] >= 250);
    }

    #[test]
    fn webp_is_lossy_at_the_configured_quality() {
        let photo = DynamicImage::ImageRgb8(image::RgbImage::from_fn(400, 300, |x, y| {
            image::Rgb([(x ^ y) as u8, (x * 3) as u8, (y * 5 + x) as u8])
        }));
        let low = encode(&photo, Encoding::Webp, 30).unwrap();
        let high = encode(&photo, Encoding::Webp, 95).unwrap();
        assert!(low.len() < high.len(), "{} vs {}", low.len(), high.len());
        // Lossy WebP is a VP8 chunk (lossless would be VP8L).
        assert_eq!(&low[12..16], b"VP8 ");
    }
}
