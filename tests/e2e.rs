//! The pages as a person uses them: starts `image-queue up` on a free port
//! with a data directory of its own, then runs `e2e/pages.test.mjs` in real
//! headless Chromium (the vendor page submits and follows a job; the
//! dashboard shows the pipeline while jobs flow and deletes a dead letter).
//! Screenshots are written under the target directory; their paths are
//! printed.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ADMIN_KEY: &str = "e2e-admin-key-0123456789";

/// Stops `image-queue up` gracefully when dropped, whatever the test did.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn require(ok: bool, what: &str) {
    assert!(ok, "{what}");
}

#[test]
fn vendor_page_and_dashboard_in_headless_chromium() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let e2e = root.join("e2e");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    require(
        Command::new("node")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success()),
        "node is needed for the page tests: apt-get install nodejs npm",
    );
    require(
        Path::new(&chromium).exists(),
        "Chromium is needed for the page tests: apt-get install chromium (or set CHROMIUM)",
    );
    require(
        e2e.join("node_modules/playwright-core").exists(),
        "the page tests' packages are missing: run `npm ci` in e2e/",
    );

    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("http://{listen}");
    let mut child = Command::new(env!("CARGO_BIN_EXE_image-queue"))
        .args(["up", "--listen", &listen, "--data-dir"])
        .arg(dir.path().join("data"))
        .env("IMAGE_QUEUE_ADMIN_KEY", ADMIN_KEY)
        .env("IMAGE_QUEUE_REDIS_FSYNC", "everysec")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("starting image-queue up");
    // `up` prints its banner once every component has started.
    let stdout = child.stdout.take().unwrap();
    let server = Server(child);
    let mut lines = BufReader::new(stdout).lines();
    let up = lines.any(|l| l.is_ok_and(|l| l.contains("image-queue is up")));
    assert!(up, "image-queue up exited before it was up");
    std::thread::spawn(move || for _ in lines {});
    wait_ready(&base);
    let vendor_key = std::fs::read_to_string(dir.path().join("data/demo-vendor.key"))
        .unwrap()
        .trim()
        .to_string();

    let mut images = Vec::new();
    for (i, (w, h)) in [(320, 240), (240, 320)].into_iter().enumerate() {
        let path = dir.path().join(format!("product-{i}.png"));
        std::fs::write(&path, common::product_png(w, h)).unwrap();
        images.push(path.display().to_string());
    }
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("screenshots");
    std::fs::create_dir_all(&shots).unwrap();

    let out = Command::new("node")
        .args(["--test", "--test-reporter=spec", "pages.test.mjs"])
        .current_dir(&e2e)
        .env("BASE_URL", &base)
        .env("VENDOR_KEY", &vendor_key)
        .env("ADMIN_KEY", ADMIN_KEY)
        .env("IMAGES", images.join(":"))
        .env("SCREENSHOT_DIR", &shots)
        .env("CHROMIUM", &chromium)
        .output()
        .expect("running node");
    println!("{}", String::from_utf8_lossy(&out.stdout));
    eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    drop(server);
    assert!(out.status.success(), "the page tests failed (output above)");
    let shot = shots.join("dashboard.png");
    assert!(shot.exists(), "no dashboard screenshot at {}", shot.display());
    println!("dashboard screenshot: {}", shot.display());
    println!("vendor page screenshot: {}", shots.join("vendor.png").display());
}

/// Polls `/readyz` until the API answers: the banner comes as the API's
/// task starts, a moment before its socket is bound.
fn wait_ready(base: &str) {
    let addr = base.trim_start_matches("http://");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(addr) {
            use std::io::{Read, Write};
            let req = format!("GET /readyz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
            let mut resp = String::new();
            if s.write_all(req.as_bytes()).is_ok() && s.read_to_string(&mut resp).is_ok() && resp.contains(" 200 ") {
                return;
            }
        }
        assert!(Instant::now() < deadline, "the API at {base} never became ready");
        std::thread::sleep(Duration::from_millis(100));
    }
}
