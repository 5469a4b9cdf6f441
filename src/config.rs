//! The one configuration of every command: a TOML file, overridden by
//! `IMAGE_QUEUE_*` environment variables, overridden by flags.
//!
//! Environment variables name a key by its path, upper-cased, with `__`
//! between levels: `IMAGE_QUEUE_REDIS_URL` sets `redis_url`,
//! `IMAGE_QUEUE_PIPELINE__TIMEOUT_MS` sets `pipeline.timeout_ms`,
//! `IMAGE_QUEUE_CONCURRENCY__BG_REMOVAL` sets `concurrency.bg-removal`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use image_queue_api::ApiConfig;
use image_queue_pipeline::webhooks::WebhookDeliveryConfig;
use image_queue_pipeline::{RunnerConfig, StageName};
use image_queue_stages::bg_removal::OnDoubtfulMask;
use image_queue_stages::decode::DecodeLimits;
use image_queue_stages::{
    BgRemovalConfig, DbCommitConfig, FaceCropConfig, FetchConfig, RateCheckConfig, ResizeConfig, UploadConfig,
};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where the API listens (the seed's port).
    pub listen: String,
    /// The URL clients reach the API at; result URLs start with it.
    /// Empty: `http://<listen>`.
    pub public_url: String,
    /// Data of the embedded Redis, SQLite, blobs and media.
    pub data_dir: PathBuf,
    /// Redis to use. Empty: `up` starts its own `redis-server` under
    /// `data_dir`; the other commands need one.
    pub redis_url: String,
    /// Fsync policy of the embedded Redis: `always` or `everysec`.
    pub redis_fsync: RedisFsync,
    /// Replicas a submitted job must reach before it is accepted.
    pub redis: image_queue_pipeline::ReplicationConfig,
    /// Results database: `sqlite://…`, `mysql://…` or `postgres://…`.
    /// Empty: SQLite under `data_dir`.
    pub database_url: String,
    /// Prefix (and hash tag) of every Redis key.
    pub key_prefix: String,
    /// The admin key for operator routes. Empty: admin routes refuse all.
    pub admin_key: String,
    /// How long job records are kept, in seconds.
    pub job_retention_secs: u64,
    /// Blobs between stages. Empty: `<data_dir>/blobs`.
    pub blob_dir: PathBuf,
    /// Blobs between stages in an S3-compatible bucket instead of
    /// `blob_dir`, for workers on hosts that share no disk.
    pub blobs: Option<image_queue_stages::s3_blobs::BlobsConfig>,
    /// Local upload backend's directory. Empty: `<data_dir>/media`.
    pub media_dir: PathBuf,
    /// Events (batches for db-commit) handled at once, per stage, per process.
    pub concurrency: BTreeMap<String, usize>,
    pub pipeline: RunnerConfig,
    pub api: ApiConfig,
    pub fetch: FetchConfig,
    pub decode: DecodeLimits,
    pub rate_check: RateCheckConfig,
    pub bg_removal: BgRemovalConfig,
    /// Whether `bg_removal` was configured (file or environment); when it
    /// was not, `up` picks the engine for the machine.
    #[serde(skip)]
    pub bg_removal_configured: bool,
    /// `bg_removal.on_doubtful_mask`, kept apart from the engine's own
    /// keys (each engine's section refuses keys it does not know).
    #[serde(skip)]
    pub on_doubtful_mask: OnDoubtfulMask,
    pub face_crop: FaceCropConfig,
    pub resize: ResizeConfig,
    pub db_commit: DbCommitConfig,
    /// Where results are uploaded. Absent: files under `media_dir`, served
    /// by the API under `/media/`.
    pub upload: Option<UploadConfig>,
    /// Delivery of vendors' webhooks (set with `vendors webhook`).
    pub webhooks: WebhookDeliveryConfig,
}

impl Default for Config {
    fn default() -> Self {
        let concurrency = StageName::ALL
            .into_iter()
            .map(|s| (s.as_str().to_string(), default_concurrency(s)))
            .collect();
        Config {
            listen: "127.0.0.1:3001".into(),
            public_url: String::new(),
            data_dir: PathBuf::from("./data"),
            redis_url: String::new(),
            redis_fsync: RedisFsync::Always,
            redis: Default::default(),
            database_url: String::new(),
            key_prefix: "iq".into(),
            admin_key: String::new(),
            job_retention_secs: 7 * 86_400,
            blob_dir: PathBuf::new(),
            blobs: None,
            media_dir: PathBuf::new(),
            concurrency,
            pipeline: RunnerConfig::default(),
            api: ApiConfig::default(),
            fetch: FetchConfig::default(),
            decode: DecodeLimits::default(),
            rate_check: RateCheckConfig::default(),
            bg_removal: BgRemovalConfig::default(),
            bg_removal_configured: false,
            on_doubtful_mask: OnDoubtfulMask::default(),
            face_crop: FaceCropConfig::default(),
            resize: ResizeConfig::default(),
            db_commit: DbCommitConfig::default(),
            upload: None,
            webhooks: WebhookDeliveryConfig::default(),
        }
    }
}

/// How the embedded Redis persists what it acknowledges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RedisFsync {
    /// Every write on disk before it is acknowledged: nothing accepted is
    /// lost on a crash.
    Always,
    /// Once a second: up to about a second of writes may be lost.
    Everysec,
}

impl From<RedisFsync> for image_queue_pipeline::redis_server::Fsync {
    fn from(f: RedisFsync) -> Self {
        match f {
            RedisFsync::Always => Self::Always,
            RedisFsync::Everysec => Self::EverySec,
        }
    }
}

/// The seed's concurrency: 3 bg-removal, 3 face-crop, 5 image processing.
/// rate-check does next to nothing per image, but it is the one FIFO in
/// front of fair admission: a vendor's burst must pass it in a few reads,
/// or another vendor's image waits behind the whole burst there.
fn default_concurrency(stage: StageName) -> usize {
    match stage {
        StageName::RateCheck => 256,
        StageName::BgRemoval => 3,
        StageName::FaceCrop => 3,
        StageName::Resize => 5,
        StageName::Upload => 8,
        StageName::DbCommit => 2,
    }
}

impl Config {
    /// Reads the file (if any), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut tree = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                text.parse::<toml::Table>()
                    .with_context(|| format!("parsing {}", path.display()))?
            }
            None => toml::Table::new(),
        };
        for (name, value) in std::env::vars() {
            let Some(path) = name.strip_prefix("IMAGE_QUEUE_") else {
                continue;
            };
            if path == "CONFIG" || path.is_empty() {
                continue;
            }
            set_path(&mut tree, path, &value)?;
        }
        let on_doubtful_mask = take_on_doubtful_mask(&mut tree)?;
        let bg_removal_configured = tree.contains_key("bg_removal");
        let mut config: Config = toml::Value::Table(tree).try_into().context("invalid configuration")?;
        config.bg_removal_configured = bg_removal_configured;
        config.on_doubtful_mask = on_doubtful_mask;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        for (stage, n) in &self.concurrency {
            if StageName::parse(stage).is_none() {
                bail!("concurrency.{stage}: no such stage (stages: rate-check, bg-removal, face-crop, resize, upload, db-commit)");
            }
            if *n == 0 {
                bail!("concurrency.{stage} must be at least 1");
            }
        }
        Ok(())
    }

    pub fn concurrency(&self, stage: StageName) -> usize {
        self.concurrency
            .get(stage.as_str())
            .copied()
            .unwrap_or_else(|| default_concurrency(stage))
    }

    pub fn runner(&self, stage: StageName) -> RunnerConfig {
        RunnerConfig {
            concurrency: self.concurrency(stage),
            ..self.pipeline.clone()
        }
    }

    pub fn database_url(&self) -> String {
        if self.database_url.is_empty() {
            format!("sqlite://{}/image-queue.db?mode=rwc", self.data_dir.display())
        } else {
            self.database_url.clone()
        }
    }

    pub fn blob_dir(&self) -> PathBuf {
        if self.blob_dir.as_os_str().is_empty() {
            self.data_dir.join("blobs")
        } else {
            self.blob_dir.clone()
        }
    }

    pub fn media_dir(&self) -> PathBuf {
        if self.media_dir.as_os_str().is_empty() {
            self.data_dir.join("media")
        } else {
            self.media_dir.clone()
        }
    }

    /// A model file's path: as given when absolute, else under `data_dir`
    /// (never the working directory, so that `up` started anywhere finds
    /// the models of its data directory).
    pub fn model_path(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.data_dir.join(path)
        }
    }

    /// Resolves the configured model path against `data_dir`; called once
    /// `data_dir` is final (after the flags).
    pub fn resolve_paths(&mut self) {
        let resolved = match &self.bg_removal {
            BgRemovalConfig::U2net { model, .. } => Some(self.model_path(model)),
            _ => None,
        };
        if let (Some(path), BgRemovalConfig::U2net { model, .. }) = (resolved, &mut self.bg_removal) {
            *model = path;
        }
    }

    pub fn public_url(&self) -> String {
        if self.public_url.is_empty() {
            format!("http://{}", self.listen)
        } else {
            self.public_url.trim_end_matches('/').to_string()
        }
    }
}

/// Takes `bg_removal.on_doubtful_mask` out of the tree (the engine's own
/// section refuses keys it does not know); a section left with no other key
/// is no engine choice, and goes too.
fn take_on_doubtful_mask(tree: &mut toml::Table) -> anyhow::Result<OnDoubtfulMask> {
    let Some(toml::Value::Table(bg)) = tree.get_mut("bg_removal") else {
        return Ok(OnDoubtfulMask::default());
    };
    let policy = match bg.remove("on_doubtful_mask") {
        Some(v) => v
            .try_into()
            .context("bg_removal.on_doubtful_mask must be \"keep\", \"original\" or \"fail\"")?,
        None => OnDoubtfulMask::default(),
    };
    if bg.is_empty() {
        tree.remove("bg_removal");
    }
    Ok(policy)
}

/// Sets `a__b__c` (upper-case, `_` inside names) in a TOML tree. Stage
/// names under `concurrency` use dashes, the rest underscores.
fn set_path(tree: &mut toml::Table, path: &str, raw: &str) -> anyhow::Result<()> {
    let parts: Vec<String> = path.split("__").map(|p| p.to_ascii_lowercase()).collect();
    let mut table = tree;
    for (i, part) in parts.iter().enumerate() {
        let key = if i > 0 && parts[0] == "concurrency" {
            part.replace('_', "-")
        } else {
            part.clone()
        };
        if i == parts.len() - 1 {
            let value = parse_scalar(raw);
            table.insert(key, value);
            return Ok(());
        }
        let entry = table
            .entry(key.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry
            .as_table_mut()
            .with_context(|| format!("IMAGE_QUEUE_{path}: {key} is not a section"))?;
    }
    Ok(())
}

fn parse_scalar(raw: &str) -> toml::Value {
    if let Ok(i) = raw.parse::<i64>() {
        return toml::Value::Integer(i);
    }
    if let Ok(f) = raw.parse::<f64>() {
        return toml::Value::Float(f);
    }
    match raw {
        "true" => toml::Value::Boolean(true),
        "false" => toml::Value::Boolean(false),
        _ => {
            // Lists and tables may be given in TOML syntax.
            if raw.starts_with('[') || raw.starts_with('{') {
                if let Ok(t) = format!("v = {raw}").parse::<toml::Table>() {
                    if let Some(v) = t.get("v") {
                        return v.clone();
                    }
                }
            }
            toml::Value::String(raw.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_paths_reach_nested_keys() {
        let mut t = toml::Table::new();
        set_path(&mut t, "PIPELINE__TIMEOUT_MS", "500").unwrap();
        set_path(&mut t, "CONCURRENCY__BG_REMOVAL", "6").unwrap();
        set_path(&mut t, "REDIS_URL", "redis://x/").unwrap();
        let c: Config = toml::Value::Table(t).try_into().unwrap();
        assert_eq!(c.pipeline.timeout_ms, 500);
        assert_eq!(c.concurrency(StageName::BgRemoval), 6);
        assert_eq!(c.concurrency(StageName::Resize), 5);
        assert_eq!(c.redis_url, "redis://x/");
    }

    #[test]
    fn the_fsync_policy_is_one_of_two_and_concurrency_is_set_per_stage() {
        let c: Config = toml::from_str("redis_fsync = \"everysec\"\n").unwrap();
        assert_eq!(c.redis_fsync, RedisFsync::Everysec);
        let e = toml::from_str::<Config>("redis_fsync = \"sometimes\"\n").unwrap_err();
        assert!(
            e.to_string().contains("always") && e.to_string().contains("everysec"),
            "{e}"
        );
        // A key nothing would honour is refused, not ignored.
        let e = toml::from_str::<Config>("[pipeline]\nconcurrency = 9\n").unwrap_err();
        assert!(e.to_string().contains("concurrency"), "{e}");
        let c: Config = toml::from_str("[concurrency]\nresize = 9\n").unwrap();
        assert_eq!(c.runner(StageName::Resize).concurrency, 9);
    }

    #[test]
    fn on_doubtful_mask_sits_beside_any_engine_and_alone_chooses_none() {
        let mut t: toml::Table = "[bg_removal]\non_doubtful_mask = \"fail\"\n".parse().unwrap();
        assert_eq!(take_on_doubtful_mask(&mut t).unwrap(), OnDoubtfulMask::Fail);
        assert!(!t.contains_key("bg_removal"), "no engine was chosen");
        let mut t: toml::Table = "[bg_removal]\nengine = \"border-key\"\non_doubtful_mask = \"keep\"\n"
            .parse()
            .unwrap();
        assert_eq!(take_on_doubtful_mask(&mut t).unwrap(), OnDoubtfulMask::Keep);
        let c: Config = toml::Value::Table(t).try_into().unwrap();
        assert!(matches!(c.bg_removal, BgRemovalConfig::BorderKey { .. }));
        let mut t: toml::Table = "[bg_removal]\non_doubtful_mask = \"maybe\"\n".parse().unwrap();
        assert!(take_on_doubtful_mask(&mut t).is_err());
    }

    #[test]
    fn models_resolve_under_the_data_directory() {
        let mut c: Config = toml::from_str("data_dir = \"/srv/iq\"\n[bg_removal]\nengine = \"u2net\"\n").unwrap();
        c.resolve_paths();
        match &c.bg_removal {
            BgRemovalConfig::U2net { model, .. } => assert_eq!(model, Path::new("/srv/iq/models/u2netp.onnx")),
            other => panic!("{other:?}"),
        }
        let mut c: Config =
            toml::from_str("[bg_removal]\nengine = \"u2net\"\nmodel = \"/opt/m/u2netp.onnx\"\n").unwrap();
        c.resolve_paths();
        match &c.bg_removal {
            BgRemovalConfig::U2net { model, .. } => assert_eq!(model, Path::new("/opt/m/u2netp.onnx")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn an_upload_section_picks_the_backend() {
        let c: Config = toml::from_str("[upload]\nbackend = \"cloudinary\"\nfolder = \"shop\"\n").unwrap();
        match c.upload {
            Some(UploadConfig::Cloudinary {
                credentials_env,
                api_base,
                folder,
                ..
            }) => {
                assert_eq!(credentials_env, "CLOUDINARY_URL");
                assert_eq!(api_base, "https://api.cloudinary.com");
                assert_eq!(folder, "shop");
            }
            other => panic!("{other:?}"),
        }
        assert!(toml::from_str::<Config>("").unwrap().upload.is_none());
    }

    #[test]
    fn an_s3_upload_section_takes_its_keys_from_the_environment_by_default() {
        let c: Config = toml::from_str(
            "[upload]\nbackend = \"s3\"\nbucket = \"media\"\nendpoint = \"http://127.0.0.1:9000\"\nallow_http = true\n",
        )
        .unwrap();
        match c.upload {
            Some(UploadConfig::S3 {
                bucket,
                endpoint,
                region,
                prefix,
                public_base_url,
                access_key_id_env,
                secret_access_key_env,
                allow_http,
                ..
            }) => {
                assert_eq!(bucket, "media");
                assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:9000"));
                assert_eq!(region, "us-east-1");
                assert_eq!((prefix.as_str(), public_base_url.as_str()), ("", ""));
                assert_eq!(access_key_id_env, "AWS_ACCESS_KEY_ID");
                assert_eq!(secret_access_key_env, "AWS_SECRET_ACCESS_KEY");
                assert!(allow_http);
            }
            other => panic!("{other:?}"),
        }
        // A secret in the file itself is refused, not silently ignored.
        let e = toml::from_str::<Config>("[upload]\nbackend = \"s3\"\nbucket = \"m\"\nsecret_access_key = \"x\"\n");
        assert!(e.is_err());
    }
}
