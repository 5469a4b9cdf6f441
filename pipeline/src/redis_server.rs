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
//!
//! The same launcher runs the other roles a high-availability test needs:
//! a replica, a Redis Cluster node and a Sentinel.

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
    role: Role,
}

/// What kind of server a `redis-server` process is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// A data node (a primary, or a replica with `replica_of`).
    Data,
    /// A Redis Cluster node (`cluster-enabled yes`).
    ClusterNode,
    /// A Sentinel monitoring the primary on `primary_port` as `service`.
    Sentinel {
        service: String,
        primary_port: u16,
        quorum: u32,
        down_after_ms: u64,
    },
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
        Self::launch(dir, port, fsync, None, Role::Data).await
    }

    /// Starts a replica of `primary` on a free port, with its data under
    /// `dir`. It is ready to serve when this returns; its first sync with
    /// the primary may still be under way.
    pub async fn start_replica(dir: &Path, primary: &RedisServer, fsync: Fsync) -> io::Result<RedisServer> {
        Self::launch(dir, free_port()?, fsync, Some(primary.port), Role::Data).await
    }

    /// Starts a replica of the primary on `primary_port`, on `port`.
    pub async fn start_replica_on(dir: &Path, port: u16, primary_port: u16, fsync: Fsync) -> io::Result<RedisServer> {
        Self::launch(dir, port, fsync, Some(primary_port), Role::Data).await
    }

    /// Starts a Redis Cluster node on a free port (not yet part of a
    /// cluster: `redis-cli --cluster create` joins nodes).
    pub async fn start_cluster_node(dir: &Path, fsync: Fsync) -> io::Result<RedisServer> {
        Self::launch(dir, free_port()?, fsync, None, Role::ClusterNode).await
    }

    /// Starts a Sentinel on a free port, monitoring the primary on
    /// `primary_port` under the name `service`.
    pub async fn start_sentinel(
        dir: &Path,
        service: &str,
        primary_port: u16,
        quorum: u32,
        down_after_ms: u64,
    ) -> io::Result<RedisServer> {
        let role = Role::Sentinel {
            service: service.to_string(),
            primary_port,
            quorum,
            down_after_ms,
        };
        Self::launch(dir, free_port()?, Fsync::Off, None, role).await
    }

    async fn launch(
        dir: &Path,
        port: u16,
        fsync: Fsync,
        replica_of: Option<u16>,
        role: Role,
    ) -> io::Result<RedisServer> {
        std::fs::create_dir_all(dir)?;
        let mut server = RedisServer {
            child: None,
            port,
            dir: dir.to_path_buf(),
            fsync,
            embedded: None,
            replica_of,
            role,
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
                role: Role::Data,
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
        let mut ready_marker = "Ready to accept connections";
        if let Role::Sentinel {
            service,
            primary_port,
            quorum,
            down_after_ms,
        } = &self.role
        {
            // A Sentinel rewrites its config file: it must be its own.
            let conf = self.dir.join("sentinel.conf");
            if !conf.exists() {
                std::fs::write(
                    &conf,
                    format!(
                        "sentinel monitor {service} 127.0.0.1 {primary_port} {quorum}\n\
                         sentinel down-after-milliseconds {service} {down_after_ms}\n\
                         sentinel failover-timeout {service} {}\n",
                        down_after_ms * 4
                    ),
                )?;
            }
            cmd.arg(&conf).arg("--sentinel");
            ready_marker = "+monitor master";
        }
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
            .args(["--bind", "127.0.0.1", "--logfile", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir);
        if !matches!(self.role, Role::Sentinel { .. }) {
            // A replica that (re)joins syncs at once, not after the
            // default 5 s spent waiting for others to join too.
            cmd.args([
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                "--repl-diskless-sync-delay",
                "0",
            ]);
        }
        if self.role == Role::ClusterNode {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .arg("--cluster-config-file")
                .arg(self.dir.join("nodes.conf"));
        }
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
                if line.contains(ready_marker) {
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

    /// Makes the next `restart` start the server as a replica of the
    /// primary on `primary_port` (or as a primary, for `None`).
    pub fn set_replica_of(&mut self, primary_port: Option<u16>) {
        self.replica_of = primary_port;
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
