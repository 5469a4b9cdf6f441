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

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use ort::environment::Environment;
use ort::session::Session;

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

/// Opens `model` in the ONNX Runtime at `library`, with ONNX Runtime's
/// default options: every graph optimisation, and one run spread over the
/// machine's cores, as rembg runs it.
pub fn session(library: &Path, model: &Path) -> Result<Session, OnnxRuntimeError> {
    let env = environment(library)?;
    let fail = |message: String| OnnxRuntimeError::Session {
        model: model.to_path_buf(),
        message,
    };
    Session::builder(env)
        .map_err(|e| fail(e.to_string()))?
        .commit_from_file(model)
        .map_err(|e| fail(e.to_string()))
}
