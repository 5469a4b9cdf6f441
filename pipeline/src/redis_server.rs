//! A `redis-server` child process on a free port with its own data
//! directory: what `image-queue up` runs when no Redis URL is given, and
//! what every test starts so that tests run in parallel and may kill and
//! restart their Redis.
//!
//! `up`'s server ([`RedisServer::start_embedded`]) also asks for a password
//! (from a 0600 file next to its data, never on the command line, where
//! `ps` would show it), dies with the process that started it however that
//! one ends (Linux's parent-death signal), and may keep a descriptor of its
//! parent's open (the data directory's lock), so that the lock is held for
//! as long as either of them lives.

use std::io;
use std::net::TcpListener;
use std::os::fd::RawFd;
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
    embedded: Option<Embedded>,
    /// The primary's port, for a replica.
    replica_of: Option<u16>,
}

/// What `up`'s own server adds to a test server.
#[derive(Debug, Clone)]
struct Embedded {
    password: String,
    /// A descriptor of ours the child keeps open (not closed on exec).
    keep_open: Option<RawFd>,
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
        Self::launch(dir, port, fsync, None).await
    }

    /// Starts a replica of `primary` on a free port, with its data under
    /// `dir`. It is ready to serve when this returns; its first sync with
    /// the primary may still be under way.
    pub async fn start_replica(dir: &Path, primary: &RedisServer, fsync: Fsync) -> io::Result<RedisServer> {
        Self::launch(dir, free_port()?, fsync, Some(primary.port)).await
    }

    async fn launch(dir: &Path, port: u16, fsync: Fsync, replica_of: Option<u16>) -> io::Result<RedisServer> {
        std::fs::create_dir_all(dir)?;
        let mut server = RedisServer {
            child: None,
            port,
            dir: dir.to_path_buf(),
            fsync,
            embedded: None,
            replica_of,
        };
        server.spawn().await?;
        Ok(server)
    }

    /// Starts `up`'s server on a free port: with `password` required, dying
    /// with this process whatever ends it (on Linux), and holding
    /// `keep_open` open for as long as it runs.
    pub async fn start_embedded(
        dir: &Path,
        fsync: Fsync,
        password: &str,
        keep_open: Option<RawFd>,
    ) -> io::Result<RedisServer> {
        std::fs::create_dir_all(dir)?;
        let mut last_err = None;
        for _ in 0..5 {
            let mut server = RedisServer {
                child: None,
                port: free_port()?,
                dir: dir.to_path_buf(),
                fsync,
                replica_of: None,
                embedded: Some(Embedded {
                    password: password.to_string(),
                    keep_open,
                }),
            };
            match server.spawn().await {
                Ok(()) => return Ok(server),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| io::Error::other("redis-server did not start")))
    }

    async fn spawn(&mut self) -> io::Result<()> {
        let mut cmd = Command::new("redis-server");
        if let Some(e) = &self.embedded {
            // A config file must come first; it carries the password so
            // that no command line shows it.
            let conf = self.dir.join("auth.conf");
            write_private(&conf, &format!("requirepass \"{}\"\n", e.password))?;
            cmd.arg(&conf);
            let keep_open = e.keep_open;
            let parent = std::process::id();
            // The parent-death signal fires when the *thread* that forked
            // exits: `up` starts its server from the main thread, which
            // lives as long as the process.
            // SAFETY: between fork and exec the closure only makes
            // async-signal-safe system calls (prctl, getppid, fcntl).
            unsafe {
                cmd.pre_exec(move || {
                    #[cfg(target_os = "linux")]
                    {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong, 0, 0, 0) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                        // The parent may have died before the signal was
                        // asked for: then nobody would send it.
                        if libc::getppid() as u32 != parent {
                            return Err(io::Error::other("the parent exited"));
                        }
                    }
                    let _ = parent;
                    if let Some(fd) = keep_open {
                        if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                    Ok(())
                });
            }
        }
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--logfile", ""])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--daemonize", "no", "--maxmemory-policy", "noeviction"]);
        if let Some(primary) = self.replica_of {
            cmd.args(["--replicaof", "127.0.0.1"]).arg(primary.to_string());
        }
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

    /// The URL to connect with, with the password when one is required.
    pub fn url(&self) -> String {
        match &self.embedded {
            Some(e) => format!("redis://:{}@127.0.0.1:{}/", e.password, self.port),
            None => format!("redis://127.0.0.1:{}/", self.port),
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
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

/// Writes a file only its owner may read.
fn write_private(path: &Path, text: &str) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An older file keeps its mode through `open`: set it anyway.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())
}

/// A TCP port free at the time of asking.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
