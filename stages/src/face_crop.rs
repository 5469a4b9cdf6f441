//! face-crop: crops a portrait around its face.
//!
//! The crop has a configured aspect ratio (square by default) and never
//! leaves the image. Without a face detector configured, or when no face is
//! found, it falls back to a centre crop and records `face_found: false`.

use std::io::Cursor;

use async_trait::async_trait;
use bytes::Bytes;
use image::ImageFormat;
use image_queue_pipeline::{ImageEvent, Outcome, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};

use crate::decode::{decode, DecodeLimits};
use crate::{cpu, StageContext};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaceCropConfig {
    /// Width divided by height of the crop.
    pub aspect: f32,
}

impl Default for FaceCropConfig {
    fn default() -> Self {
        FaceCropConfig { aspect: 1.0 }
    }
}

impl FaceCropConfig {
    pub fn build(&self, ctx: StageContext, limits: DecodeLimits) -> FaceCropStage {
        FaceCropStage {
            ctx,
            limits,
            config: self.clone(),
        }
    }
}

pub struct FaceCropStage {
    ctx: StageContext,
    limits: DecodeLimits,
    config: FaceCropConfig,
}

/// The largest rectangle of the given aspect ratio centred in `w`×`h`.
pub fn centre_crop(w: u32, h: u32, aspect: f32) -> (u32, u32, u32, u32) {
    let aspect = if aspect.is_finite() && aspect > 0.0 {
        aspect
    } else {
        1.0
    };
    let (cw, ch) = if (w as f32) / (h as f32) > aspect {
        (((h as f32) * aspect).round().max(1.0) as u32, h)
    } else {
        (w, ((w as f32) / aspect).round().max(1.0) as u32)
    };
    let (cw, ch) = (cw.min(w), ch.min(h));
    ((w - cw) / 2, (h - ch) / 2, cw, ch)
}

#[async_trait]
impl Stage for FaceCropStage {
    fn name(&self) -> StageName {
        StageName::FaceCrop
    }

    async fn handle(&self, mut event: ImageEvent) -> Result<Outcome, StageError> {
        let bytes = self.ctx.working_image(&event).await?;
        let limits = self.limits.clone();
        let aspect = self.config.aspect;
        let png = cpu("face-crop", move || {
            let img = decode(&bytes, &limits)?;
            let (x, y, w, h) = centre_crop(img.width(), img.height(), aspect);
            let crop = img.crop_imm(x, y, w, h);
            let mut out = Vec::new();
            crop.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
                .map_err(|e| StageError::permanent(format!("encoding the crop: {e}")))?;
            Ok(Bytes::from(out))
        })
        .await?;
        self.ctx.put_working(&mut event, "crop.png", png).await?;
        event.notes.insert("face_found".into(), false.into());
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
}
