//! Background removal's throughput: the in-process U²-Net engine on ONNX
//! Runtime against rembg's own Python API, same model file (u2netp.onnx),
//! same images, same ONNX Runtime library and thread count, in one run.
//!
//! Prints, as Markdown: the cold start (session open and first image) of
//! each; per image size (0.3 to 12 megapixels, JPEG photos made from
//! scikit-image's astronaut portrait) the median time of each step, decode,
//! pre-processing, inference, post-processing and PNG encode; and images/s
//! with 1, 3 and 6 images in flight. The ways take turns round by round, so
//! that load from elsewhere on the machine falls on all of them alike.
//!
//! Ways: `after` is the engine as the stage builds it by default; `before`
//! is the engine's old arrangement on the current code (one session spread
//! over every core, runs taking turns); `rembg` is
//! `benches/bg_removal_rembg.py` (rembg's `remove()` from threads sharing
//! one session, as a Python service would run it); `tract` (with `--tract`)
//! is the pure-Rust runtime.
//!
//! `cargo bench --bench bg_removal [-- --rounds 3 --images 12 --tract --no-steps]`
//! (`--images`: the backlog of 1.2-megapixel images, half as many of 12;
//! `--no-steps`: throughput only)
//! (needs `scripts/install-rembg.sh` and `scripts/fetch-test-images.sh`).

#[path = "../stages/tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::{DynamicImage, ImageFormat};
use image_queue_stages::decode::{decode, DecodeLimits};
use image_queue_stages::onnxruntime::{ExecutionProvider, OnnxRuntimeConfig, SessionSettings};
use image_queue_stages::u2net::{Runtime, U2net};
use serde_json::Value;
use support::{models_dir, onnxruntime_library, repo_root};

const SIZES: [(u32, u32); 4] = [(640, 480), (1280, 960), (2000, 1500), (4000, 3000)];
const CONCURRENCY: [usize; 3] = [1, 3, 6];
const STEPS: [&str; 5] = ["decode", "preprocess", "inference", "postprocess", "encode"];

struct Args {
    rounds: usize,
    images: usize,
    tract: bool,
    steps: bool,
}

fn args() -> Args {
    let mut a = Args {
        rounds: 3,
        images: 12,
        tract: false,
        steps: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--rounds" => a.rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N"),
            "--images" => a.images = it.next().and_then(|v| v.parse().ok()).expect("--images N"),
            "--tract" => a.tract = true,
            "--no-steps" => a.steps = false,
            _ => {} // cargo bench passes --bench
        }
    }
    a
}

/// One in-process way of running the stage's work.
struct Ours {
    name: &'static str,
    model: Arc<U2net>,
}

impl Ours {
    /// What the stage does with one image: decode, cut out, encode; the
    /// seconds of each step, in [`STEPS`] order (waiting for a session is
    /// counted in inference).
    fn run(&self, jpeg: &[u8]) -> [f64; 5] {
        let t = Instant::now();
        let img = decode(jpeg, &DecodeLimits::default()).unwrap();
        let decoded = t.elapsed();
        let (cut, steps) = self.model.cutout_timed(&img).unwrap();
        let t = Instant::now();
        // As the stage encodes the cutout.
        let mut png = Vec::new();
        DynamicImage::ImageRgba8(cut)
            .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        std::hint::black_box(png);
        [
            decoded,
            steps.preprocess,
            steps.wait + steps.inference,
            steps.postprocess,
            t.elapsed(),
        ]
        .map(|d| d.as_secs_f64())
    }

    /// Images/s for `images` with `concurrency` of them in flight.
    fn throughput(&self, images: &[Vec<u8>], concurrency: usize) -> f64 {
        let next = AtomicUsize::new(0);
        let started = Instant::now();
        std::thread::scope(|s| {
            for _ in 0..concurrency {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(jpeg) = images.get(i) else { break };
                    self.run(jpeg);
                });
            }
        });
        images.len() as f64 / started.elapsed().as_secs_f64()
    }
}

/// rembg's Python API in a child process (benches/bg_removal_rembg.py).
struct Rembg {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    ready: Value,
}

impl Rembg {
    fn start(threads: usize, first: &Path) -> Rembg {
        let python = support::rembg_bin().parent().unwrap().join("python");
        let mut child = Command::new(python)
            .arg(repo_root().join("benches/bg_removal_rembg.py"))
            .arg(threads.to_string())
            .arg(first)
            .env("U2NET_HOME", models_dir())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting rembg's Python: run scripts/install-rembg.sh");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let ready = serde_json::from_str(&line).unwrap_or_else(|e| panic!("rembg's side said {line:?}: {e}"));
        Rembg {
            child,
            stdin,
            stdout,
            ready,
        }
    }

    fn ask(&mut self, req: Value) -> Value {
        writeln!(self.stdin, "{req}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("rembg's side said {line:?}: {e}"))
    }

    fn steps(&mut self, path: &Path) -> [f64; 5] {
        let r = self.ask(serde_json::json!({ "steps": path }));
        STEPS.map(|s| r[s].as_f64().unwrap())
    }

    fn throughput(&mut self, paths: &[PathBuf], concurrency: usize) -> f64 {
        let r = self.ask(serde_json::json!({ "batch": paths, "concurrency": concurrency }));
        paths.len() as f64 / r["seconds"].as_f64().unwrap()
    }
}

impl Drop for Rembg {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn load(settings: SessionSettings) -> (Arc<U2net>, Duration) {
    let t = Instant::now();
    let model = U2net::shared_with(
        &models_dir().join("u2netp.onnx"),
        Runtime::Onnxruntime,
        Some(&onnxruntime_library()),
        &settings,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (model, t.elapsed())
}

fn main() {
    let args = args();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let dir = tempfile::tempdir().unwrap();
    let astronaut = image::open(repo_root().join("stages/tests/data/astronaut.png"))
        .expect("run scripts/fetch-test-images.sh")
        .to_rgb8();
    let mut files: Vec<(String, PathBuf, Vec<u8>)> = Vec::new();
    for (w, h) in SIZES {
        let img = DynamicImage::ImageRgb8(image::imageops::resize(
            &astronaut,
            w,
            h,
            image::imageops::FilterType::Lanczos3,
        ));
        let path = dir.path().join(format!("astronaut-{w}x{h}.jpg"));
        img.save_with_format(&path, ImageFormat::Jpeg).unwrap();
        let label = format!("{w}×{h} ({:.1} MP)", (w * h) as f64 / 1e6);
        files.push((label, path.clone(), std::fs::read(&path).unwrap()));
    }

    // Cold starts first, each on a fresh process-wide load.
    let mut rembg = Rembg::start(cores, &files[0].1);
    let default = OnnxRuntimeConfig::default().settings();
    let (after, after_load) = load(default);
    let t = Instant::now();
    let after = Ours {
        name: "after",
        model: after,
    };
    after.run(&files[0].2);
    let after_first = t.elapsed();
    let before = Ours {
        name: "before",
        model: load(SessionSettings {
            sessions: 1,
            threads: cores,
            provider: ExecutionProvider::Cpu,
        })
        .0,
    };
    let ours = [&after, &before];

    println!(
        "Machine: {cores} cores; ONNX Runtime {} (rembg's virtualenv); `after` = {} session(s) × {} thread(s), \
         `before` = 1 session × {cores} threads, rembg = 1 session × {cores} threads; {} rounds.",
        rembg.ready["onnxruntime"].as_str().unwrap_or("?"),
        default.sessions,
        default.threads,
        args.rounds
    );
    println!();
    println!("| cold start | session(s) open | first image ({}) |", files[0].0);
    println!("| --- | ---: | ---: |");
    println!(
        "| after (sessions warmed up when loaded) | {:.0} ms | {:.0} ms |",
        after_load.as_secs_f64() * 1e3,
        after_first.as_secs_f64() * 1e3
    );
    println!(
        "| rembg | {:.0} ms | {:.0} ms |",
        rembg.ready["session"].as_f64().unwrap() * 1e3,
        rembg.ready["first_image"].as_f64().unwrap() * 1e3
    );
    println!();

    // Steps, one image at a time, ways taking turns.
    let mut tract = args.tract.then(|| Ours {
        name: "tract",
        model: U2net::shared(&models_dir().join("u2netp.onnx")).unwrap(),
    });
    if args.steps {
        println!(
            "| image | way | {} | total ms | × rembg |",
            STEPS.join(" ms | ") + " ms"
        );
        println!("| --- | --- |{} ---: | ---: |", " ---: |".repeat(STEPS.len()));
    }
    for (label, path, jpeg) in files.iter().filter(|_| args.steps) {
        let mut times: Vec<Vec<[f64; 5]>> = vec![Vec::new(); 4];
        for _ in 0..args.rounds {
            for (i, w) in ours.iter().enumerate() {
                times[i].push(w.run(jpeg));
            }
            times[2].push(rembg.steps(path));
            if let Some(t) = tract.as_mut().filter(|_| label.starts_with("1280")) {
                times[3].push(t.run(jpeg));
            }
        }
        let medians: Vec<Option<[f64; 5]>> = times
            .iter()
            .map(|v| (!v.is_empty()).then(|| std::array::from_fn(|s| median(v.iter().map(|r| r[s]).collect()))))
            .collect();
        let total = |m: &[f64; 5]| m.iter().sum::<f64>();
        let rembg_total = total(medians[2].as_ref().unwrap());
        for (name, m) in ["after", "before", "rembg", "tract"].iter().zip(&medians) {
            let Some(m) = m else { continue };
            let cells: Vec<String> = m.iter().map(|s| format!("{:.0}", s * 1e3)).collect();
            println!(
                "| {label} | {name} | {} | {:.0} | {:.2} |",
                cells.join(" | "),
                total(m) * 1e3,
                total(m) / rembg_total
            );
        }
    }
    println!();

    // Throughput: a backlog of images, 1, 3 and 6 in flight.
    for (label, path, jpeg) in [&files[1], &files[3]] {
        let n = if label.starts_with("4000") {
            (args.images / 2).max(2)
        } else {
            args.images
        };
        let jpegs = vec![jpeg.clone(); n];
        let paths = vec![path.clone(); n];
        println!("{n} images of {label}, images/s (median of {} rounds):", args.rounds);
        println!();
        println!("| in flight | after | before | rembg | after ÷ rembg | after ÷ before |");
        println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
        for c in CONCURRENCY {
            let mut rates: [Vec<f64>; 3] = Default::default();
            for _ in 0..args.rounds {
                for (i, w) in ours.iter().enumerate() {
                    rates[i].push(w.throughput(&jpegs, c));
                }
                rates[2].push(rembg.throughput(&paths, c));
            }
            let [a, b, r] = rates.map(median);
            println!("| {c} | {a:.2} | {b:.2} | {r:.2} | {:.2} | {:.2} |", a / r, a / b);
        }
        println!();
    }
    if let Some(t) = &tract {
        let jpegs = vec![files[1].2.clone(); 2 * cores];
        println!("tract, {} images of {}:", jpegs.len(), files[1].0);
        println!();
        println!("| in flight | images/s |");
        println!("| ---: | ---: |");
        for c in [1, cores] {
            println!("| {c} | {:.2} |", t.throughput(&jpegs, c));
        }
        println!("({})", t.name);
    }
}
