//! `image-queue up` as a person meets it, against the real binary: the
//! banner only once the API's address is bound (and none, but an error
//! naming the address, when it is taken), the keys it makes and keeps, the
//! CLI finding its Redis through the data directory, one `up` per data
//! directory, no redis-server outliving a killed `up`; and `config`
//! showing every key with no secret.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_image-queue");

/// The binary with none of the caller's configuration.
fn bin() -> Command {
    let mut c = Command::new(BIN);
    for var in ["REDIS_URL", "DATABASE_URL", "IMAGE_QUEUE_CONFIG"] {
        c.env_remove(var);
    }
    for (k, _) in std::env::vars() {
        if k.starts_with("IMAGE_QUEUE_") {
            c.env_remove(k);
        }
    }
    c.env("RUST_LOG", "warn");
    c
}

/// A child killed (SIGKILL) when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        self.0.kill().ok();
        self.0.wait().ok();
    }
}

fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

fn start_up(data: &Path, listen: &str) -> Child {
    bin()
        .args(["up", "--listen", listen, "--data-dir"])
        .arg(data)
        .env("IMAGE_QUEUE_REDIS_FSYNC", "everysec")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running image-queue up")
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Whether a process is gone (or a zombie nobody has reaped yet).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn up_binds_then_shows_everything_a_person_needs_and_dies_whole() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let listen = free_addr();
    let mut child = start_up(&data, &listen);
    let up_pid = child.id();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut stderr = child.stderr.take().unwrap();
    let up = Killed(child);
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::stderr()));

    // The banner's first line: the address already answers.
    let first = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.contains("image-queue is up"))
        .expect("up exited before its banner");
    assert!(first.contains(&listen), "{first}");
    std::net::TcpStream::connect(&listen).expect("the banner came before the API was bound");
    let mut banner = first;
    for l in lines.by_ref().map_while(Result::ok) {
        banner.push_str(&l);
        banner.push('\n');
        if l.contains("Then follow it with") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    println!("{banner}");

    // The keys it made, kept for their owner only, and shown.
    let demo = std::fs::read_to_string(data.join("demo-vendor.key")).unwrap();
    let admin = std::fs::read_to_string(data.join("admin.key")).unwrap();
    for f in ["demo-vendor.key", "admin.key", "redis.password", "redis.url"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    assert!(banner.contains(demo.trim()), "no demo key in the banner");
    assert!(banner.contains(admin.trim()), "no admin key in the banner");
    for needle in [
        &format!("http://{listen}/api/image-queue/"),
        &format!("http://{listen}/dashboard"),
        "Vendor page",
        "Redis",
        "redis.url",
        "media",
    ] {
        assert!(banner.contains(needle), "no {needle:?} in the banner");
    }
    // No model in a fresh data directory: border-key, and it says what
    // that means.
    assert!(banner.contains("FELL BACK to border-key"), "{banner}");
    assert!(banner.contains("plain"), "{banner}");
    let password = std::fs::read_to_string(data.join("redis.password")).unwrap();
    assert!(!banner.contains(password.trim()), "the Redis password is printed");

    // The CLI finds up's Redis (password and all) through the data directory.
    let out = bin()
        .arg("--data-dir")
        .arg(&data)
        .args(["vendors", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("demo\t1 key(s)"));
    let out = bin()
        .arg("--data-dir")
        .arg(&data)
        .args(["stats", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The embedded Redis wants its password.
    let url = std::fs::read_to_string(data.join("redis.url")).unwrap();
    let bare = url.replace(&format!(":{}@", password.trim()), "");
    assert_ne!(bare, url, "{url}");
    let out = bin().args(["--redis-url", &bare, "vendors", "list"]).output().unwrap();
    assert!(!out.status.success(), "Redis answered without a password");

    // A second up on the same data directory refuses, naming the holder.
    let out = bin()
        .args(["up", "--listen", &free_addr(), "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("pid {up_pid}")), "{err}");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("image-queue is up"));

    // Killed outright, up takes its redis-server with it.
    let lock = std::fs::read_to_string(data.join("up.lock")).unwrap();
    let redis_pid: u32 = lock
        .split("redis-server pid ")
        .nth(1)
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("no redis-server pid in the lock file: {lock:?}"));
    assert!(!gone(redis_pid));
    drop(up); // SIGKILL, then reaped
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gone(redis_pid) {
        assert!(
            Instant::now() < deadline,
            "redis-server {redis_pid} outlived its up by 10 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The data directory is free again.
    let mut again = start_up(&data, &free_addr());
    let mut lines = BufReader::new(again.stdout.take().unwrap()).lines();
    let _again = Killed(again);
    assert!(
        lines.any(|l| l.is_ok_and(|l| l.contains("image-queue is up"))),
        "up did not start again on the freed data directory"
    );
}

#[test]
fn up_on_a_taken_port_prints_no_banner_and_names_the_address() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = bin()
        .args(["up", "--listen", &addr, "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.trim().is_empty(), "printed with the port taken: {stdout}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("cannot listen on {addr}")), "{err}");
}

#[test]
fn config_lists_every_engine_key_and_no_secret() {
    let out = bin()
        .arg("config")
        .env("IMAGE_QUEUE_ADMIN_KEY", "admin-s3cret")
        .env("DATABASE_URL", "postgres://shop:db-s3cret@db.internal/shop")
        .env("REDIS_URL", "redis://:redis-s3cret@127.0.0.1:6379/")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(!text.contains("s3cret"), "a secret is printed:\n{text}");
    for needle in [
        "model = \"models/u2netp.onnx\"",
        "runtime = \"tract\"",
        "onnxruntime_library",
        "engine = \"border-key\"",
        "engine = \"rembg\"",
        "tolerance",
        "on_doubtful_mask = \"original\"",
        "no_face = \"keep\"",
        "backend = \"s3\"",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    // No engine was chosen: printing one would pin it when pasted back.
    assert!(
        !text.lines().any(|l| l.starts_with("engine =")),
        "an engine is set:\n{text}"
    );
    text.parse::<toml::Table>().expect("what config prints is TOML");

    let help = bin().args(["up", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(!help.contains("seed"), "{help}");
}

#[test]
fn up_finds_the_model_in_its_data_directory_wherever_it_is_started() {
    // The model as scripts/install-rembg.sh leaves it.
    let models = std::env::var_os("U2NET_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("models"));
    let model = models.join("u2netp.onnx");
    assert!(
        model.is_file(),
        "{} is missing: run scripts/install-rembg.sh",
        model.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The offline route: a copy given by path, checked, put under data_dir.
    let out = bin()
        .arg("--data-dir")
        .arg(&data)
        .args(["models", "fetch", "--from"])
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(data.join("models/u2netp.onnx").is_file());
    let bad = dir.path().join("not-the-model.onnx");
    std::fs::write(&bad, b"nope").unwrap();
    let out = bin()
        .arg("--data-dir")
        .arg(dir.path().join("other"))
        .args(["models", "fetch", "--from"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a file that is not the model was taken");

    // Started from elsewhere, up still finds it: no border-key fallback.
    let elsewhere = tempfile::tempdir().unwrap();
    let listen = free_addr();
    let mut child = bin()
        .current_dir(elsewhere.path())
        .args(["up", "--listen", &listen, "--data-dir"])
        .arg(&data)
        .env("IMAGE_QUEUE_REDIS_FSYNC", "everysec")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let _up = Killed(child);
    let engine = lines
        .map_while(Result::ok)
        .find(|l| l.contains("Background removal"))
        .expect("up exited before its banner");
    assert!(engine.contains("u2net on"), "{engine}");
    assert!(
        engine.contains(&data.join("models/u2netp.onnx").display().to_string()),
        "{engine}"
    );

    // After a cutout, `stats` shows the bg-removal worker's inference time
    // and rate, to size the pool by.
    let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("stages/tests/data/astronaut.png");
    let photo =
        std::fs::read(&photo).unwrap_or_else(|e| panic!("{}: {e}: run scripts/fetch-test-images.sh", photo.display()));
    let demo = std::fs::read_to_string(data.join("demo-vendor.key")).unwrap();
    let submitted = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let form = reqwest::multipart::Form::new()
            .text("operations", "bg-removal")
            .part(
                "images",
                reqwest::multipart::Part::bytes(photo)
                    .file_name("astronaut.png")
                    .mime_str("image/png")
                    .unwrap(),
            )
            .text("record_id", "sku-1");
        let r = reqwest::Client::new()
            .post(format!("http://{listen}/api/image-queue/jobs"))
            .bearer_auth(demo.trim())
            .multipart(form)
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.text().await.unwrap_or_default())
    });
    assert_eq!(submitted.0, 202, "{}", submitted.1);
    let deadline = Instant::now() + Duration::from_secs(180);
    let line = loop {
        let out = bin().arg("--data-dir").arg(&data).arg("stats").output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(line) = text.lines().find(|l| l.starts_with("bg-removal worker")) {
            break line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no bg-removal worker figures in stats:\n{text}"
        );
        // A heartbeat carries the figures: they come within seconds.
        std::thread::sleep(Duration::from_millis(500));
    };
    println!("{line}");
    assert!(line.contains("ms/image") && line.contains("images/s"), "{line}");
    // And /metrics, per worker, named by an opaque tag, not its host.
    let metrics = tokio::runtime::Runtime::new().unwrap().block_on(async {
        reqwest::get(format!("http://{listen}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("image_queue_worker_inference_ms{") || l.starts_with("image_queue_worker_images_per_second{")
        })
        .collect();
    assert_eq!(series.len(), 2, "{metrics}");
    assert!(series.iter().all(|l| l.contains("stage=\"bg-removal\"")), "{series:?}");
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    assert!(
        host.trim().is_empty() || !series.iter().any(|l| l.contains(host.trim())),
        "{series:?}"
    );
}

#[test]
fn logs_off_a_terminal_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let out = bin()
        .env("RUST_LOG", "info")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("migrate")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains("migrations applied"), "{log}");
    assert!(!log.contains('\x1b'), "ANSI escapes in a redirected log: {log:?}");
}
