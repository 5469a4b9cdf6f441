//! ONNX Runtime for the in-process `u2net` engine: finding its shared
//! library, loading it once per process, and opening a model in it.
//!
//! ONNX Runtime is the inference library rembg itself runs, several times
//! faster on U²-Net than tract. It is not built into the binary: the
//! `libonnxruntime.so` of the onnxruntime wheel on PyPI (or of ONNX
//! Runtime's own releases, version 1.17 or later) is loaded at startup from
//! the configured path, else `$ORT_DYLIB_PATH`, else wherever the dynamic
//! loader finds `libonnxruntime.so`. A process can hold one ONNX Runtime
//! only, so every model shares the first library loaded.
//!
//! A session runs on the CPU by default, or on CUDA when configured and the
//! loaded library is a GPU build (`onnxruntime-gpu`); which one runs is
//! logged when the session opens. How many sessions the engine keeps and how
//! many threads each spreads a run over is [`OnnxRuntimeConfig`]'s.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::ep::{ExecutionProvider as _, CUDA};
use ort::session::Session;
use serde::{Deserialize, Serialize};

/// How to get the library, for every error that means it is not there.
pub const LIBRARY_HELP: &str = "get ONNX Runtime's shared library (1.17 or later) from the onnxruntime wheel on PyPI \
     (`pip install onnxruntime` puts it in site-packages/onnxruntime/capi/libonnxruntime.so.*; the virtualenv \
     scripts/install-rembg.sh makes has it) or from ONNX Runtime's GitHub releases, then give its path in \
     bg_removal's `onnxruntime_library` or in ORT_DYLIB_PATH";

/// The environment variable ort itself reads, kept as the default so a
/// library configured for other ONNX Runtime programs is found too.
pub const LIBRARY_ENV: &str = "ORT_DYLIB_PATH";

/// The name the dynamic loader searches for when no path is given.
const LIBRARY_NAME: &str = "libonnxruntime.so";

#[derive(Debug, thiserror::Error)]
pub enum OnnxRuntimeError {
    #[error("ONNX Runtime's shared library {} does not exist: {LIBRARY_HELP}", .0.display())]
    Missing(PathBuf),
    #[error("loading ONNX Runtime from {}: {message}; {LIBRARY_HELP}", .path.display())]
    Load { path: PathBuf, message: String },
    #[error(
        "ONNX Runtime is already loaded from {} in this process, so {} cannot be: use one library everywhere",
        .loaded.display(), .requested.display()
    )]
    Conflict { loaded: PathBuf, requested: PathBuf },
    #[error("opening the model {} in ONNX Runtime: {message}", .model.display())]
    Session { model: PathBuf, message: String },
    #[error(
        "the ONNX Runtime at {} has no CUDA execution provider: point `onnxruntime_library` or ORT_DYLIB_PATH \
         at the libonnxruntime.so of a GPU build (the onnxruntime-gpu wheel), or set `provider = \"cpu\"`",
        .0.display()
    )]
    NoCuda(PathBuf),
}

/// Where ONNX Runtime runs the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutionProvider {
    /// ONNX Runtime's own CPU kernels.
    #[default]
    Cpu,
    /// NVIDIA GPUs, through a GPU build of ONNX Runtime; a startup error
    /// when the loaded library has no CUDA support.
    Cuda,
}

impl ExecutionProvider {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionProvider::Cpu => "cpu",
            ExecutionProvider::Cuda => "cuda",
        }
    }
}

/// How the engine runs the model on ONNX Runtime (`[bg_removal.onnxruntime]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxRuntimeConfig {
    /// Sessions, each running one image at a time. Absent: one per core on
    /// the CPU, so that images in flight run side by side instead of taking
    /// turns; one on CUDA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions: Option<usize>,
    /// Threads one run is spread over. Absent: the cores shared out among
    /// the sessions (at least one each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    #[serde(default)]
    pub provider: ExecutionProvider,
}

/// [`OnnxRuntimeConfig`] with its defaults filled in for this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionSettings {
    pub sessions: usize,
    pub threads: usize,
    pub provider: ExecutionProvider,
}

impl OnnxRuntimeConfig {
    pub fn settings(&self) -> SessionSettings {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let sessions = self
            .sessions
            .unwrap_or(match self.provider {
                ExecutionProvider::Cpu => cores,
                ExecutionProvider::Cuda => 1,
            })
            .max(1);
        SessionSettings {
            sessions,
            threads: self.threads.unwrap_or(cores / sessions).max(1),
            provider: self.provider,
        }
    }
}

/// The library to load: `configured`, else `$ORT_DYLIB_PATH`, else the bare
/// name for the dynamic loader to search.
pub fn library_path(configured: Option<&Path>) -> PathBuf {
    if let Some(p) = configured.filter(|p| !p.as_os_str().is_empty()) {
        return p.to_path_buf();
    }
    match std::env::var_os(LIBRARY_ENV) {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(LIBRARY_NAME),
    }
}

/// The process's ONNX Runtime environment, loading `library` the first time.
fn environment(library: &Path) -> Result<&'static Environment, OnnxRuntimeError> {
    static LOADED: OnceLock<(PathBuf, &'static Environment)> = OnceLock::new();
    static LOADING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = LOADING.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((loaded, env)) = LOADED.get() {
        return if loaded == library {
            Ok(env)
        } else {
            Err(OnnxRuntimeError::Conflict {
                loaded: loaded.clone(),
                requested: library.to_path_buf(),
            })
        };
    }
    // A path with a directory must exist; a bare name is the loader's to find.
    if library.components().count() > 1 && !library.is_file() {
        return Err(OnnxRuntimeError::Missing(library.to_path_buf()));
    }
    let load = |message: String| OnnxRuntimeError::Load {
        path: library.to_path_buf(),
        message,
    };
    let env = ort::init_from(library)
        .map_err(|e| load(e.to_string()))?
        .with_name("image-queue")
        .with_telemetry(false)
        .build()
        .map_err(|e| load(e.to_string()))?;
    // Lives as long as the process: sessions need it, and there is one.
    let env: &'static Environment = Box::leak(Box::new(env));
    let _ = LOADED.set((library.to_path_buf(), env));
    Ok(env)
}

/// Opens `model` in the ONNX Runtime at `library`: every graph
/// optimisation (ONNX Runtime's default, as rembg runs it), a run spread
/// over `settings.threads` threads that sleep rather than spin between runs
/// (spinning takes cores from the other sessions and stages), on
/// `settings.provider`.
pub fn session(library: &Path, model: &Path, settings: &SessionSettings) -> Result<Session, OnnxRuntimeError> {
    let env = environment(library)?;
    let fail = |message: String| OnnxRuntimeError::Session {
        model: model.to_path_buf(),
        message,
    };
    let mut builder = Session::builder(env)
        .map_err(|e| fail(e.to_string()))?
        .with_intra_threads(settings.threads)
        .map_err(|e| fail(e.to_string()))?
        .with_inter_threads(1)
        .map_err(|e| fail(e.to_string()))?
        .with_intra_op_spinning(false)
        .map_err(|e| fail(e.to_string()))?;
    if settings.provider == ExecutionProvider::Cuda {
        if !CUDA::is_available().unwrap_or(false) {
            return Err(OnnxRuntimeError::NoCuda(library.to_path_buf()));
        }
        builder = builder
            .with_execution_providers([CUDA::default().build().error_on_failure()])
            .map_err(|e| fail(format!("enabling CUDA: {e}")))?;
    }
    builder.commit_from_file(model).map_err(|e| fail(e.to_string()))
}
