//! Test helpers: a private MariaDB server, and the database servers the
//! tests expect to find running.
//!
//! Tests that change server settings (a tiny `max_allowed_packet`) or stop
//! the server mid-run cannot share the developer's MariaDB with other tests,
//! so they start their own `mariadbd` on a throwaway data directory. Missing
//! software or servers fail the test with what to install; they never skip
//! it, so a green run means the database paths were exercised.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long a server may take to start before the test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(90);

/// A `mariadbd` of the test's own, on a temporary data directory and a free
/// TCP port. It can be stopped and started again on the same data and port,
/// so a connection URL stays valid across an outage.
pub struct PrivateMariaDb {
    dir: tempfile::TempDir,
    port: u16,
    max_allowed_packet: String,
    child: Option<Child>,
}

fn find_program(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            let p = dir.join(name);
            if p.exists() {
                return p;
            }
        }
    }
    panic!("`{name}` not found: these tests need a MariaDB server installed (e.g. `apt-get install mariadb-server`)");
}

impl PrivateMariaDb {
    /// Initialises a data directory and starts the server with the given
    /// `max_allowed_packet` (e.g. `"64K"`).
    pub fn start(max_allowed_packet: &str) -> PrivateMariaDb {
        let dir = tempfile::tempdir().expect("creating a temporary directory");
        let datadir = dir.path().join("data");
        // A temporary directory of its own: servers set up side by side in
        // a shared /tmp can collide on their temporary tables' names.
        let tmpdir = dir.path().join("tmp");
        std::fs::create_dir_all(&tmpdir).expect("creating the server's temporary directory");
        let out = Command::new(find_program("mariadb-install-db"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", datadir.display()))
            .arg(format!("--tmpdir={}", tmpdir.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .args(user_args())
            .output()
            .expect("running mariadb-install-db");
        assert!(
            out.status.success(),
            "mariadb-install-db failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut db = PrivateMariaDb {
            dir,
            port: image_queue_pipeline::redis_server::free_port().expect("a free port"),
            max_allowed_packet: max_allowed_packet.to_string(),
            child: None,
        };
        db.start_server();
        db
    }

    /// `mysql://` URL of the `test` database (created by [`Self::create_test_db`]).
    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/test", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn start_server(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let d = self.dir.path();
        let mut child = Command::new(find_program("mariadbd"))
            .arg("--no-defaults")
            .arg(format!("--datadir={}", d.join("data").display()))
            .arg(format!("--socket={}", d.join("mysqld.sock").display()))
            .arg(format!("--pid-file={}", d.join("mysqld.pid").display()))
            .arg(format!("--tmpdir={}", d.join("tmp").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg("--skip-networking=0")
            .arg(format!("--max-allowed-packet={}", self.max_allowed_packet))
            .arg("--innodb-buffer-pool-size=32M")
            .arg("--skip-log-bin")
            .args(user_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mariadbd");
        // Ready means the server said so on stderr; keep draining stderr
        // afterwards so the server never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel::<Result<(), String>>();
        std::thread::spawn(move || {
            let mut log = String::new();
            let mut told = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if !told {
                    log.push_str(&line);
                    log.push('\n');
                    if line.contains("ready for connections") {
                        told = true;
                        let _ = tx.send(Ok(()));
                    }
                }
            }
            if !told {
                let _ = tx.send(Err(log));
            }
        });
        match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(log)) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mariadbd exited before it was ready:\n{log}");
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("mariadbd was not ready after {START_TIMEOUT:?}");
            }
        }
        self.child = Some(child);
    }

    /// Stops the server cleanly and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling our own child process.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let _ = child.wait();
        }
    }

    /// Starts the stopped server again, on the same data and port.
    pub fn restart(&mut self) {
        self.stop();
        self.start_server();
    }

    /// Restarts with another `max_allowed_packet`, as an operator might.
    pub fn restart_with_packet(&mut self, max_allowed_packet: &str) {
        self.stop();
        self.max_allowed_packet = max_allowed_packet.to_string();
        self.start_server();
    }

    /// Creates the `test` database [`Self::url`] names.
    pub async fn create_test_db(&self) {
        use sqlx::Connection;
        let url = format!("mysql://root@127.0.0.1:{}/", self.port);
        let mut c = sqlx::MySqlConnection::connect(&url)
            .await
            .expect("connecting to mariadbd");
        sqlx::query("CREATE DATABASE IF NOT EXISTS test")
            .execute(&mut c)
            .await
            .unwrap();
        c.close().await.ok();
    }
}

impl Drop for PrivateMariaDb {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// mariadbd refuses to run as root unless told to.
fn user_args() -> Vec<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        vec!["--user=root".into()]
    } else {
        vec![]
    }
}

/// The developer's shared MariaDB, overridable with `TEST_MYSQL_URL`.
pub fn shared_mysql_url() -> String {
    std::env::var("TEST_MYSQL_URL").unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// The developer's shared PostgreSQL, overridable with `TEST_POSTGRES_URL`.
pub fn shared_postgres_url() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A database of the test's own on a shared server, so that its migrations
/// and rows never meet another test's (or another checkout's). Dropped by
/// [`ScratchDb::drop_db`]; one left behind by a failed test is harmless.
pub struct ScratchDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl ScratchDb {
    /// `server_url` names any existing database on the server.
    pub async fn create(server_url: &str) -> ScratchDb {
        use sqlx::Connection;
        sqlx::any::install_default_drivers();
        let name = format!("iq_test_{}", uuid_hex());
        let (scheme, _) = server_url.split_once("://").unwrap();
        let base = server_url.rsplit_once('/').unwrap().0;
        let what = if scheme.starts_with("postgres") {
            "PostgreSQL (e.g. `apt-get install postgresql`, listening on 127.0.0.1:5432 with trust auth for `postgres`; or set TEST_POSTGRES_URL)"
        } else {
            "MariaDB (e.g. `apt-get install mariadb-server`, listening on 127.0.0.1:3306 with password-less `root`; or set TEST_MYSQL_URL)"
        };
        let mut c = sqlx::AnyConnection::connect(server_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach {server_url}: {e}\nthese tests need a running {what}"));
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut c)
            .await
            .unwrap_or_else(|e| panic!("creating a scratch database on {server_url}: {e}"));
        c.close().await.ok();
        ScratchDb {
            url: format!("{base}/{name}"),
            admin_url: server_url.to_string(),
            name,
        }
    }

    pub async fn drop_db(self) {
        use sqlx::Connection;
        let mut c = sqlx::AnyConnection::connect(&self.admin_url).await.unwrap();
        let force = if self.admin_url.starts_with("postgres") {
            " WITH (FORCE)"
        } else {
            ""
        };
        sqlx::query(&format!("DROP DATABASE IF EXISTS {}{force}", self.name))
            .execute(&mut c)
            .await
            .unwrap();
    }
}

/// A random id, unique enough to keep parallel tests apart.
pub fn uuid_hex() -> String {
    use rand::Rng;
    let n: u64 = rand::rng().random();
    format!("{n:016x}")
}
