//! A `redis-server` child process on a free port with its own data
//! directory: what `image-queue up` runs when no Redis URL is given, and
//! what every test starts so that tests run in parallel and may kill and
//! restart their Redis.

use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// How the child persists its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// `appendfsync always`: nothing acknowledged is ever lost.
    Always,
    /// `appendfsync everysec`: up to about a second may be lost on a crash.
    EverySec,
    /// No append-only file: for throwaway test data.
    Off,
}

pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: PathBuf,
    fsync: Fsync,
}

impl RedisServer {
    /// Starts `redis-server` with its data under `dir` on a free port.
    pub async fn start(dir: &Path, fsync: Fsync) -> io::Result<RedisServer> {
        let mut last_err = None;
        for _ in 0..5 {
            let port = free_port()?;
            match Self::start_on(dir, port, fsync).await {
                Ok(server) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    /// Starts `redis-server` on a given port.
    pub async fn start_on(dir: &Path, port: u16, fsync: Fsync) -> io::Result<RedisServer> {
        std::fs::create_dir_all(dir)?;
        let mut server = RedisServer {
            child: None,
            port,
            dir: dir.to_path_buf(),
            fsync,
        };
        server.spawn().await?;
        Ok(server)
    }

    async fn spawn(&mut self) -> io::Result<()> {
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--logfile", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--maxmemory-policy", "noeviction"]);
        match self.fsync {
            Fsync::Always => cmd.args(["--appendonly", "yes", "--appendfsync", "always"]),
            Fsync::EverySec => cmd.args(["--appendonly", "yes", "--appendfsync", "everysec"]),
            Fsync::Off => cmd.args(["--appendonly", "no"]),
        };
        // A process group of its own: a Ctrl-C at the terminal must not stop
        // Redis before the workers that still write to it.
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot run redis-server ({e}); install it, e.g. `apt-get install redis-server`"),
            )
        })?;
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout).lines();
        // Wait for the server's own word that it is ready, not a guess.
        let ready = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await? {
                if line.contains("Ready to accept connections") {
                    return Ok(true);
                }
            }
            Ok::<_, io::Error>(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => {
                // Keep draining its log so the pipe never fills and blocks it.
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                self.child = Some(child);
                Ok(())
            }
            _ => {
                child.kill().await.ok();
                Err(io::Error::other(format!(
                    "redis-server on port {} did not become ready",
                    self.port
                )))
            }
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills the server with SIGKILL: no shutdown, no final fsync.
    pub async fn kill(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts the server again on the same port and data directory.
    pub async fn restart(&mut self) -> io::Result<()> {
        self.kill().await?;
        let mut last = Ok(());
        // The port may linger for a moment after a kill.
        for _ in 0..50 {
            last = self.spawn().await;
            if last.is_ok() {
                return last;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        last
    }

    /// Stops the server gracefully (SIGTERM), letting it flush.
    pub async fn stop(&mut self) -> io::Result<()> {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                // SAFETY: sending a signal to our own child's pid.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            child.wait().await?;
        }
        Ok(())
    }
}

/// A TCP port free at the time of asking.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
