//! `image-queue up`: the whole system in one process, for a person at a
//! terminal.
//!
//! The order matters to that person: the data directory is locked first
//! (two `up`s, or two embedded Redis servers, must never share one), the
//! API's address is bound next (a taken port is an error naming it, before
//! anything is printed), and the banner comes last, when every URL it shows
//! answers. The secrets `up` makes (the demo vendor's key, the admin key,
//! the embedded Redis's password) are kept in the data directory, readable
//! by their owner only, and the Redis URL is written there too so that
//! every other command run with the same data directory finds it.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image_queue_api::Auth;
use image_queue_pipeline::redis_server::{Fsync, RedisServer};
use image_queue_pipeline::runner::StageRunner;
use image_queue_pipeline::{Pipeline, StageName};
use image_queue_stages::BgRemovalConfig;
use tracing::{error, info};

use crate::compose::REDIS_URL_FILE;
use crate::config::Config;

const LOCK_FILE: &str = "up.lock";
const DEMO_KEY_FILE: &str = "demo-vendor.key";
const ADMIN_KEY_FILE: &str = "admin.key";
const REDIS_PASSWORD_FILE: &str = "redis.password";

/// An exclusive `flock` on `<data_dir>/up.lock`, held while the file stays
/// open (by this process, or by the embedded redis-server that inherits
/// it); the file names the holders, for whoever finds it taken.
pub struct DataDirLock {
    file: File,
}

impl DataDirLock {
    pub fn acquire(data_dir: &Path) -> anyhow::Result<DataDirLock> {
        let path = data_dir.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let mut holder = String::new();
            file.read_to_string(&mut holder).ok();
            let holder = holder.trim();
            bail!(
                "the data directory {} is in use by another `image-queue up` ({}); stop it, or give this one \
                 another --data-dir",
                data_dir.display(),
                if holder.is_empty() { "process unknown" } else { holder }
            );
        }
        let mut lock = DataDirLock { file };
        lock.name_holders(None)?;
        Ok(lock)
    }

    /// Records who holds the lock: this process, and its redis-server.
    pub fn name_holders(&mut self, redis_pid: Option<u32>) -> anyhow::Result<()> {
        let mut text = format!("image-queue up pid {}", std::process::id());
        if let Some(pid) = redis_pid {
            text.push_str(&format!(", redis-server pid {pid}"));
        }
        self.file.set_len(0)?;
        self.file.rewind()?;
        self.file.write_all(text.as_bytes())?;
        Ok(())
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Writes `text` to a file only its owner may read.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// A random token of 32 hex digits (128 bits).
fn random_token() -> String {
    let bytes: [u8; 16] = rand::random();
    crate::models::hex_string(&bytes)
}

/// The secret kept in `path`, made (and kept, 0600) on first use.
fn kept_secret(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    if let Ok(s) = std::fs::read_to_string(path) {
        if !s.trim().is_empty() {
            return Ok(s.trim().to_string());
        }
    }
    let s = make();
    write_private(path, &s)?;
    Ok(s)
}

/// What the banner says about the bg-removal engine.
pub(crate) struct EngineChoice {
    pub(crate) summary: String,
    pub(crate) fell_back: bool,
}

pub async fn up(mut config: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let mut lock = DataDirLock::acquire(&config.data_dir)?;
    // Bound before anything is started or printed: if the address is
    // taken, say so and print no URL that would be another process's.
    let listener = tokio::net::TcpListener::bind(&config.listen).await.with_context(|| {
        format!(
            "cannot listen on {}: is another process using that address? Choose another with --listen",
            config.listen
        )
    })?;
    let engine = choose_engine(&mut config).await?;
    let mut embedded = None;
    if config.redis_url.is_empty() {
        let fsync: Fsync = config.redis_fsync.into();
        let password = kept_secret(&config.data_dir.join(REDIS_PASSWORD_FILE), random_token)?;
        let server =
            RedisServer::start_embedded(&config.data_dir.join("redis"), fsync, &password, Some(lock.raw_fd())).await?;
        lock.name_holders(server.pid())?;
        info!(url = %crate::compose::redact(&server.url()), "started an embedded redis-server");
        config.redis_url = server.url();
        embedded = Some(server);
    }
    write_private(&config.data_dir.join(REDIS_URL_FILE), &config.redis_url)?;
    let admin_from_file = config.admin_key.is_empty();
    if admin_from_file {
        config.admin_key = kept_secret(&config.data_dir.join(ADMIN_KEY_FILE), random_token)?;
    }
    // Before any stage runs, so that no count is recorded into the void.
    image_queue_api::metrics::install();
    let p = crate::compose::connect(&config).await?;
    let shutdown = crate::signals::shutdown_on_signal();
    let demo_key = demo_vendor(&config, &p).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for name in StageName::ALL {
        let stage = crate::compose::build_stage(name, &config, &p).await?;
        let runner = StageRunner::new(p.clone(), stage, config.runner(name));
        let s = shutdown.clone();
        tasks.spawn(async move { runner.run(s).await.map_err(anyhow::Error::from) });
    }
    {
        let (config, p, s) = (config.clone(), p.clone(), shutdown.clone());
        tasks.spawn(async move { crate::compose::serve_api_on(&config, p, listener, s).await });
    }
    {
        let (config, p, s) = (config.clone(), p.clone(), shutdown.clone());
        tasks.spawn(async move { crate::compose::deliver_webhooks(&config, p, s).await });
    }
    print!(
        "{}",
        banner(&config, &demo_key, admin_from_file, &engine, embedded.is_some())
    );
    std::io::stdout().flush().ok();
    let mut result = Ok(());
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                error!(error = %e, "a component failed; shutting down");
                shutdown.cancel();
                result = Err(e);
            }
            Err(e) => {
                shutdown.cancel();
                result = Err(e.into());
            }
        }
    }
    if let Some(mut server) = embedded {
        server.stop().await.ok();
        // Its port is free again: nobody should try it.
        std::fs::remove_file(config.data_dir.join(REDIS_URL_FILE)).ok();
    }
    drop(lock);
    result
}

/// Picks the bg-removal engine when none is configured: the fastest this
/// machine can run, so that `up` cuts out real subjects when the model is
/// there and still starts when nothing is.
pub(crate) async fn choose_engine(config: &mut Config) -> anyhow::Result<EngineChoice> {
    if config.bg_removal_configured {
        let name = match &config.bg_removal {
            BgRemovalConfig::BorderKey { .. } => "border-key".to_string(),
            BgRemovalConfig::Rembg(r) => format!("rembg ({} server(s))", r.urls.len()),
            BgRemovalConfig::U2net { model, runtime, .. } => {
                format!("u2net on {} ({})", runtime.as_str(), model.display())
            }
        };
        return Ok(EngineChoice {
            fell_back: false,
            summary: format!("{name}, as configured in [bg_removal]"),
        });
    }
    let model = config.model_path(&image_queue_stages::bg_removal::default_model());
    // Loading the model takes a moment: off the runtime.
    let (chosen, why) = tokio::task::spawn_blocking(move || BgRemovalConfig::detect(&model)).await?;
    info!(reason = %why, "bg-removal engine chosen (set [bg_removal] to choose it yourself)");
    let fell_back = matches!(chosen, BgRemovalConfig::BorderKey { .. });
    config.bg_removal = chosen;
    Ok(EngineChoice {
        summary: why,
        fell_back,
    })
}

fn banner(config: &Config, demo_key: &str, admin_from_file: bool, engine: &EngineChoice, embedded: bool) -> String {
    let base = config.public_url();
    let dir = &config.data_dir;
    let kept = |f: &str| dir.join(f).display().to_string();
    let admin = if admin_from_file {
        format!("{}  (kept in {})", config.admin_key, kept(ADMIN_KEY_FILE))
    } else {
        "as configured (admin_key)".to_string()
    };
    let mut engine_lines = format!("  Background removal {}\n", engine.summary);
    if engine.fell_back {
        engine_lines.push_str(
            "    FELL BACK to border-key, which only suits products shot on a plain, even backdrop: on other\n    \
             photos it leaves the background in place. For real cutouts install the U2-Net model and ONNX\n    \
             Runtime (scripts/up.sh does it all; or scripts/install-rembg.sh, or `image-queue models fetch`),\n    \
             then start `up` again.\n",
        );
    }
    let results = match &config.upload {
        None => format!(
            "files under {}, served at {base}/media/; URLs recorded in {}",
            config.media_dir().display(),
            crate::compose::redact(&config.database_url())
        ),
        Some(_) => format!(
            "uploaded as [upload] configures; URLs recorded in {}",
            crate::compose::redact(&config.database_url())
        ),
    };
    let redis = if embedded {
        format!(
            "{} (embedded, data in {}; the URL with its password is in {}, where every command run with this \
             --data-dir finds it)",
            crate::compose::redact(&config.redis_url),
            dir.join("redis").display(),
            kept(REDIS_URL_FILE)
        )
    } else {
        crate::compose::redact(&config.redis_url)
    };
    format!(
        "\nimage-queue is up at {base}/\n\n\
         \x20 API                {base}/api/image-queue/\n\
         \x20 Vendor page        {base}/\n\
         \x20 Dashboard          {base}/dashboard  (the admin key opens dead letters and job lookup)\n\
         \x20 Demo vendor key    {demo_key}  (kept in {demo})\n\
         \x20 Admin key          {admin}\n\
         {engine_lines}\
         \x20 Results            {results}\n\
         \x20 Redis              {redis}\n\n\
         Submit a job as the demo vendor:\n\n\
         \x20 curl -s -X POST {base}/api/image-queue/jobs \\\n\
         \x20   -H 'Authorization: Bearer {demo_key}' \\\n\
         \x20   -F images=@photo.jpg -F record_id=sku-1 -F operations=bg-removal,face-crop,resize\n\n\
         Then follow it with: curl -s -H 'Authorization: Bearer {demo_key}' {base}/api/image-queue/job/<job_id>\n\n",
        demo = kept(DEMO_KEY_FILE),
    )
}

/// On first run, creates the `demo` vendor and keeps its key in the data
/// directory so `up` can show a ready-to-paste command every time.
async fn demo_vendor(config: &Config, p: &Pipeline) -> anyhow::Result<String> {
    let path: PathBuf = config.data_dir.join(DEMO_KEY_FILE);
    if let Ok(key) = std::fs::read_to_string(&path) {
        if !key.trim().is_empty() {
            return Ok(key.trim().to_string());
        }
    }
    let key = Auth::new(p.clone(), None)
        .add_vendor("demo")
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    write_private(&path, &key)?;
    Ok(key)
}
