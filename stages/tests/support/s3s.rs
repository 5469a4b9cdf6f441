//! A real `s3s-fs` S3-protocol server for tests, shared by the upload
//! stage's tests and the end-to-end ones: one per test, on a free port over
//! a temporary directory, with one bucket and an access key pair. A missing
//! `s3s-fs` fails the test with how to install it; it is never skipped.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::ObjectStore;

pub const BUCKET: &str = "shop-media";
pub const ACCESS_KEY: &str = "AKIAIQTESTKEY";
pub const SECRET_KEY: &str = "iq-test-secret-Zq8vT3nW";

/// The `s3s-fs` binary: `$S3S_FS`, else on the PATH, else where
/// `cargo install` puts it.
fn s3s_fs_bin() -> PathBuf {
    let candidates: Vec<PathBuf> = match std::env::var_os("S3S_FS") {
        Some(p) => vec![PathBuf::from(p)],
        None => {
            let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).collect())
                .unwrap_or_default();
            if let Some(home) = std::env::var_os("CARGO_HOME") {
                dirs.push(PathBuf::from(home).join("bin"));
            }
            if let Some(home) = std::env::var_os("HOME") {
                dirs.push(PathBuf::from(home).join(".cargo/bin"));
            }
            dirs.into_iter().map(|d| d.join("s3s-fs")).collect()
        }
    };
    candidates.into_iter().find(|p| p.is_file()).unwrap_or_else(|| {
        panic!(
            "`s3s-fs` not found: these tests need the s3s-fs S3 server; install it with \
                 `cargo install s3s-fs --version 0.14.1 --features binary --locked` (or set S3S_FS)"
        )
    })
}

/// A real `s3s-fs`, killed when dropped. It can be stopped and started
/// again on the same directory and port.
pub struct S3Server {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl S3Server {
    /// Starts a server whose root holds one empty bucket, [`BUCKET`].
    pub fn start() -> S3Server {
        let dir = tempfile::tempdir().unwrap();
        // s3s-fs keeps each bucket as a directory under its root.
        std::fs::create_dir_all(dir.path().join("root").join(BUCKET)).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s = S3Server { dir, port, child: None };
        s.restart();
        s
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("s3s-fs.log")).unwrap_or_default()
    }

    /// Starts the server and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::File::create(self.dir.path().join("s3s-fs.log")).unwrap();
        let bin = s3s_fs_bin();
        let mut child = Command::new(&bin)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(self.dir.path().join("root"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
        let started = Instant::now();
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("s3s-fs exited with {status} before it listened:\n{}", self.log());
            }
            if started.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("s3s-fs not listening after 30 s:\n{}", self.log());
            }
            // s3s-fs announces readiness nowhere but by listening.
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    /// Kills the server, as a crash or an outage would.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// A client of our own, to read back what was stored.
    pub fn reader(&self) -> AmazonS3 {
        AmazonS3Builder::new()
            .with_endpoint(self.endpoint())
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_bucket_name(BUCKET)
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .unwrap()
    }

    /// Every key in the bucket.
    pub async fn keys(&self) -> BTreeSet<String> {
        self.reader()
            .list(None)
            .map_ok(|m| m.location.to_string())
            .try_collect()
            .await
            .unwrap()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.stop();
    }
}
