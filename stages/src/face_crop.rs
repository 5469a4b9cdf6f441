//! face-crop: crops a portrait around its face.
//!
//! Faces are found with SeetaFace's frontal detector (the `rustface` crate;
//! the model is embedded in the binary). The crop frames the largest face
//! with a configured margin and aspect ratio (square by default), the face
//! centred horizontally and its centre a third of the way down, as
//! portraits are usually framed; it never leaves the image. When no face is
//! found the image is left uncropped (a product shot sent through face-crop
//! must not lose both ends) with a warning, or centre-cropped with
//! `no_face = "center"`; either way it records `face_found: false`.
//! Large images are downscaled for detection (the detector's time grows
//! with the pixel count, and faces small enough to vanish at that size are
//! no subject for a portrait crop), and the box is mapped back.

use std::sync::OnceLock;

use async_trait::async_trait;
use bytes::Bytes;
use image::imageops::FilterType;
use image::DynamicImage;
use image_queue_pipeline::{ImageEvent, Outcome, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};

use crate::decode::{decode, DecodeLimits};
use crate::{cpu, StageContext};

/// SeetaFace's frontal face detection model (BSD 2-Clause; see
/// `stages/models/`).
static SEETA_MODEL: &[u8] = include_bytes!("../models/seeta_fd_frontal_v1.0.bin");

fn model() -> &'static rustface::Model {
    static MODEL: OnceLock<rustface::Model> = OnceLock::new();
    MODEL.get_or_init(|| rustface::read_model(SEETA_MODEL).expect("the embedded SeetaFace model parses"))
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaceCropConfig {
    /// Width divided by height of the crop.
    pub aspect: f32,
    /// Space kept around the face on each side, as a fraction of the face's
    /// size (1.0: the crop is at least three faces wide and high).
    pub margin: f32,
    /// Where the face's centre sits, as a fraction of the crop's height
    /// from its top.
    pub face_y: f32,
    /// Images are downscaled to this long side for detection.
    pub detect_max_side: u32,
    /// Smallest face looked for, in pixels of the downscaled image.
    pub min_face: u32,
    /// Smallest face looked for, as a share of the image's shorter side: a
    /// face smaller than that is no portrait's subject, and not looking
    /// for one spares the detector most of its work (it scans every scale
    /// from the smallest face up).
    pub min_face_share: f32,
    /// The detector's score threshold: higher finds fewer false faces.
    pub score_threshold: f64,
    /// What to do with an image without a face.
    pub no_face: NoFace,
}

/// What face-crop does with an image in which it finds no face.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoFace {
    /// Leave it uncropped, with a warning.
    #[default]
    Keep,
    /// Crop its centre to the configured aspect ratio.
    Center,
}

impl Default for FaceCropConfig {
    fn default() -> Self {
        FaceCropConfig {
            aspect: 1.0,
            margin: 1.0,
            face_y: 1.0 / 3.0,
            detect_max_side: 800,
            min_face: 24,
            min_face_share: 0.08,
            score_threshold: 2.0,
            no_face: NoFace::default(),
        }
    }
}

impl FaceCropConfig {
    pub fn build(&self, ctx: StageContext) -> Result<FaceCropStage, std::convert::Infallible> {
        // Parse the model now, not in the first image's time budget.
        let _ = model();
        Ok(FaceCropStage {
            limits: ctx.limits.clone(),
            ctx,
            config: self.clone(),
        })
    }
}

pub struct FaceCropStage {
    ctx: StageContext,
    limits: DecodeLimits,
    config: FaceCropConfig,
}

/// A rectangle in image pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Rect {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

fn sane_aspect(aspect: f32) -> f32 {
    if aspect.is_finite() && aspect > 0.0 {
        aspect
    } else {
        1.0
    }
}

/// The largest rectangle of the given aspect ratio centred in `w`×`h`.
pub fn centre_crop(w: u32, h: u32, aspect: f32) -> (u32, u32, u32, u32) {
    let aspect = sane_aspect(aspect);
    let (cw, ch) = if (w as f32) / (h as f32) > aspect {
        (((h as f32) * aspect).round().max(1.0) as u32, h)
    } else {
        (w, ((w as f32) / aspect).round().max(1.0) as u32)
    };
    let (cw, ch) = (cw.min(w), ch.min(h));
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// The crop around `face` in a `w`×`h` image: big enough for the face and
/// its margin (shrunk to the largest that fits when the image is smaller),
/// placed to put the face where configured, then moved inside the image.
pub fn crop_around(w: u32, h: u32, face: Rect, c: &FaceCropConfig) -> Rect {
    let aspect = sane_aspect(c.aspect) as f64;
    let m = 1.0 + 2.0 * c.margin.max(0.0) as f64;
    let mut cw = (face.w as f64 * m).max(face.h as f64 * m * aspect);
    let mut ch = cw / aspect;
    // Never larger than the image: scale down, keeping the aspect.
    let fit = (w as f64 / cw).min(h as f64 / ch).min(1.0);
    cw = (cw * fit).round().clamp(1.0, w as f64);
    ch = (ch * fit).round().clamp(1.0, h as f64);
    let fx = face.x as f64 + face.w as f64 / 2.0;
    let fy = face.y as f64 + face.h as f64 / 2.0;
    let x = (fx - cw / 2.0).round().clamp(0.0, w as f64 - cw);
    let y = (fy - ch * c.face_y.clamp(0.0, 1.0) as f64)
        .round()
        .clamp(0.0, h as f64 - ch);
    Rect {
        x: x as u32,
        y: y as u32,
        w: cw as u32,
        h: ch as u32,
    }
}

/// The faces in `img`, largest first, in `img`'s own pixels.
pub fn detect_faces(img: &DynamicImage, c: &FaceCropConfig) -> Vec<Rect> {
    let (w, h) = (img.width(), img.height());
    let long = w.max(h);
    let scale = if long > c.detect_max_side.max(64) {
        c.detect_max_side.max(64) as f64 / long as f64
    } else {
        1.0
    };
    let gray = if scale < 1.0 {
        let (sw, sh) = (
            ((w as f64 * scale).round() as u32).max(1),
            ((h as f64 * scale).round() as u32).max(1),
        );
        img.resize_exact(sw, sh, FilterType::Triangle).to_luma8()
    } else {
        img.to_luma8()
    };
    let mut detector = rustface::create_detector_with_model(model().clone());
    let (gw, gh) = gray.dimensions();
    let share = (gw.min(gh) as f32 * c.min_face_share.clamp(0.0, 1.0)) as u32;
    detector.set_min_face_size(c.min_face.max(share).max(20));
    detector.set_score_thresh(c.score_threshold);
    detector.set_pyramid_scale_factor(0.8);
    detector.set_slide_window_step(4, 4);
    let faces = detector.detect(&rustface::ImageData::new(&gray, gw, gh));
    let mut out: Vec<Rect> = faces
        .iter()
        .filter_map(|f| {
            let b = f.bbox();
            // Boxes may poke out of the image: clip, then map back.
            let x0 = (b.x().max(0) as f64 / scale).round();
            let y0 = (b.y().max(0) as f64 / scale).round();
            let x1 = ((b.x() + b.width() as i32).min(gw as i32) as f64 / scale)
                .round()
                .min(w as f64);
            let y1 = ((b.y() + b.height() as i32).min(gh as i32) as f64 / scale)
                .round()
                .min(h as f64);
            (x1 > x0 && y1 > y0).then_some(Rect {
                x: x0 as u32,
                y: y0 as u32,
                w: (x1 - x0) as u32,
                h: (y1 - y0) as u32,
            })
        })
        .collect();
    out.sort_by_key(|r| std::cmp::Reverse(r.w as u64 * r.h as u64));
    out
}

/// What the stage found and did.
struct Cropped {
    /// The crop, or none when the image is left as it is.
    png: Option<Bytes>,
    face: Option<Rect>,
    faces: usize,
    crop: Option<Rect>,
}

#[async_trait]
impl Stage for FaceCropStage {
    fn name(&self) -> StageName {
        StageName::FaceCrop
    }

    fn measures(&self) -> std::collections::BTreeMap<String, f64> {
        crate::cpu_measures("face-crop")
    }

    async fn handle(&self, mut event: ImageEvent) -> Result<Outcome, StageError> {
        let bytes = self.ctx.working_image(&event).await?;
        let limits = self.limits.clone();
        let c = self.config.clone();
        let admitted = limits.admit(&bytes).await?;
        let out = cpu("face-crop", move || {
            let _admitted = admitted;
            let img = decode(&bytes, &limits)?;
            let faces = detect_faces(&img, &c);
            let crop = match (faces.first(), c.no_face) {
                (Some(&f), _) => crop_around(img.width(), img.height(), f, &c),
                (None, NoFace::Center) => {
                    let (x, y, w, h) = centre_crop(img.width(), img.height(), c.aspect);
                    Rect { x, y, w, h }
                }
                (None, NoFace::Keep) => {
                    return Ok(Cropped {
                        png: None,
                        face: None,
                        faces: 0,
                        crop: None,
                    })
                }
            };
            let png = crate::encode_working_png(&img.crop_imm(crop.x, crop.y, crop.w, crop.h), "the crop")?;
            Ok(Cropped {
                png: Some(png),
                face: faces.first().copied(),
                faces: faces.len(),
                crop: Some(crop),
            })
        })
        .await?;
        if let Some(png) = out.png {
            self.ctx.put_working(&mut event, "crop.png", png).await?;
        }
        event.notes.insert("face_found".into(), out.face.is_some().into());
        event.notes.insert("faces".into(), out.faces.into());
        if let Some(f) = out.face {
            event.notes.insert("face_box".into(), serde_json::to_value(f).unwrap());
        }
        match out.crop {
            Some(crop) => {
                event
                    .notes
                    .insert("crop_box".into(), serde_json::to_value(crop).unwrap());
            }
            None => crate::bg_removal::add_warning(
                &mut event,
                "face-crop found no face: the image was left uncropped".into(),
            ),
        }
        Ok(Outcome::Done(event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centre_crop_stays_inside() {
        assert_eq!(centre_crop(200, 100, 1.0), (50, 0, 100, 100));
        assert_eq!(centre_crop(100, 300, 1.0), (0, 100, 100, 100));
        assert_eq!(centre_crop(1, 1, 1.0), (0, 0, 1, 1));
    }

    fn inside(r: Rect, w: u32, h: u32) -> bool {
        r.w >= 1 && r.h >= 1 && r.x + r.w <= w && r.y + r.h <= h
    }

    fn contains(outer: Rect, inner: Rect) -> bool {
        inner.x >= outer.x
            && inner.y >= outer.y
            && inner.x + inner.w <= outer.x + outer.w
            && inner.y + inner.h <= outer.y + outer.h
    }

    #[test]
    fn crop_frames_the_face_and_never_leaves_the_image() {
        let c = FaceCropConfig::default();
        // A face in the middle of a big image: 3 faces wide, square, face
        // centre a third of the way down.
        let face = Rect {
            x: 900,
            y: 500,
            w: 100,
            h: 100,
        };
        let r = crop_around(2000, 2000, face, &c);
        assert_eq!((r.w, r.h), (300, 300));
        assert_eq!(r.x, 800);
        assert_eq!(r.y, 450);
        // Faces at every corner and edge, every aspect: inside, and the face
        // kept whole whenever the image can hold face and crop.
        for aspect in [1.0, 0.75, 4.0 / 3.0, 16.0 / 9.0] {
            let c = FaceCropConfig {
                aspect,
                ..FaceCropConfig::default()
            };
            for (x, y) in [(0, 0), (1900, 0), (0, 1400), (1900, 1400), (950, 0), (0, 700)] {
                let face = Rect { x, y, w: 100, h: 100 };
                let r = crop_around(2000, 1500, face, &c);
                assert!(inside(r, 2000, 1500), "{r:?}");
                assert!(contains(r, face), "{face:?} not in {r:?}");
                assert!(((r.w as f32 / r.h as f32) - aspect).abs() < 0.02, "{r:?} {aspect}");
            }
        }
        // A face filling a small image: the crop shrinks to fit.
        let r = crop_around(
            120,
            80,
            Rect {
                x: 10,
                y: 0,
                w: 100,
                h: 80,
            },
            &c,
        );
        assert!(inside(r, 120, 80) && r.w == r.h, "{r:?}");
    }

    #[test]
    fn no_face_in_a_plain_image() {
        let img = DynamicImage::ImageRgb8(image::RgbImage::from_fn(640, 480, |x, _| {
            image::Rgb([(x / 3) as u8, 120, 200])
        }));
        assert!(detect_faces(&img, &FaceCropConfig::default()).is_empty());
    }
}
