//! `image-queue config`: the effective configuration as TOML a person can
//! read and paste back: every key of every section with its value, the
//! keys of the engines and backends not chosen as comments (so that they
//! can be found, and pasting the output never pins a choice `up` would
//! otherwise make), and every secret masked.

use image_queue_stages::bg_removal::default_model;
use image_queue_stages::s3_blobs::BlobsConfig;
use image_queue_stages::{BgRemovalConfig, UploadConfig};

use crate::config::Config;

const MASK: &str = "***";

impl Config {
    pub fn to_display_toml(&self) -> anyhow::Result<String> {
        let mut tree = toml::Table::try_from(self)?;
        let bg = tree.remove("bg_removal");
        let upload = tree.remove("upload");
        let blobs = tree.remove("blobs");
        mask_table(&mut tree);
        let mut out = toml::to_string_pretty(&tree)?;

        out.push_str("\n[bg_removal]\n");
        out.push_str(&format!(
            "# What ships when a cutout's mask looks wrong (near-empty, near-full or mostly uncertain):\n\
             # \"original\" (the image untouched, with a warning), \"keep\" (the cutout, with a warning) or \"fail\".\n\
             on_doubtful_mask = \"{}\"\n",
            self.on_doubtful_mask.as_str()
        ));
        let chosen = if self.bg_removal_configured {
            bg.and_then(|v| v.as_table().cloned()).map(|mut t| {
                mask_table(&mut t);
                t
            })
        } else {
            None
        };
        let chosen_engine = chosen
            .as_ref()
            .and_then(|t| t.get("engine"))
            .and_then(|e| e.as_str())
            .map(str::to_string);
        match &chosen {
            Some(t) => out.push_str(&toml::to_string_pretty(t)?),
            None => out.push_str(
                "# No engine set: `up` picks one for this machine (u2net on onnxruntime when the model and ONNX\n\
                 # Runtime are there, else u2net on tract, else border-key); uncomment one to choose it.\n",
            ),
        }
        for (engine, sample) in engine_samples() {
            if chosen_engine.as_deref() == Some(engine) {
                continue;
            }
            out.push_str("#\n");
            out.push_str(&commented(&sample));
        }

        out.push('\n');
        match upload.and_then(|v| v.as_table().cloned()) {
            Some(t) => out.push_str(&masked_section("upload", t)?),
            None => {
                out.push_str(
                    "# [upload] is not set: results are files under media_dir, served by the API under /media/.\n\
                     # The backends, with their defaults:\n# [upload]\n",
                );
                for sample in upload_samples() {
                    out.push_str(&commented(&sample));
                    out.push_str("#\n");
                }
            }
        }

        out.push('\n');
        match blobs.and_then(|v| v.as_table().cloned()) {
            Some(t) => out.push_str(&masked_section("blobs", t)?),
            None => {
                out.push_str(
                    "# [blobs] is not set: blobs between stages are files under blob_dir. For workers on hosts\n\
                     # that share no disk, a bucket (with its defaults):\n# [blobs]\n",
                );
                let sample = toml::from_str::<BlobsConfig>("backend = \"s3\"\nbucket = \"\"")
                    .ok()
                    .and_then(|c| toml::to_string_pretty(&c).ok())
                    .unwrap_or_default();
                out.push_str(&commented(&format!(
                    "{sample}# endpoint = \"http://127.0.0.1:9000\"  (absent: AWS S3)\n"
                )));
            }
        }
        Ok(out)
    }
}

/// A configured section as TOML, under its name, secrets masked.
fn masked_section(name: &str, mut table: toml::Table) -> anyhow::Result<String> {
    mask_table(&mut table);
    let mut wrapped = toml::Table::new();
    wrapped.insert(name.into(), toml::Value::Table(table));
    Ok(toml::to_string_pretty(&wrapped)?)
}

/// Each bg-removal engine's keys with their defaults, as TOML lines;
/// optional keys that are absent by default are added as comments.
fn engine_samples() -> Vec<(&'static str, String)> {
    let ser = |c: &BgRemovalConfig| toml::to_string_pretty(c).unwrap_or_default();
    let u2net = BgRemovalConfig::U2net {
        model: default_model(),
        model_kind: None,
        runtime: Default::default(),
        onnxruntime_library: None,
        onnxruntime: Default::default(),
    };
    let rembg = toml::from_str::<BgRemovalConfig>("engine = \"rembg\"").unwrap_or_default();
    vec![
        ("border-key", ser(&BgRemovalConfig::default())),
        (
            "u2net",
            format!(
                "{}# (model: relative paths are under data_dir; runtime: \"tract\" or \"onnxruntime\")\n\
                 # model_kind = \"u2net\"  (\"u2net\", \"isnet\" or \"birefnet\"; absent: told by the model file's name)\n\
                 # onnxruntime_library = \"/path/to/libonnxruntime.so\"  (absent: $ORT_DYLIB_PATH, else the loader's search)\n",
                ser(&u2net)
            ),
        ),
        (
            "rembg",
            format!(
                "{}# bgc = \"255,255,255,255\"\n# extras = \"{{}}\"\n",
                ser(&rembg)
            ),
        ),
    ]
}

/// Each upload backend's keys with their defaults.
fn upload_samples() -> Vec<String> {
    [
        "backend = \"local\"\ndir = \"\"\npublic_base_url = \"\"",
        "backend = \"s3\"\nbucket = \"\"",
        "backend = \"cloudinary\"",
    ]
    .into_iter()
    .filter_map(|s| toml::from_str::<UploadConfig>(s).ok())
    .filter_map(|c| {
        let text = toml::to_string_pretty(&c).ok()?;
        Some(match c {
            UploadConfig::S3 { .. } => format!("{text}# endpoint = \"http://127.0.0.1:9000\"  (absent: AWS S3)\n"),
            _ => text,
        })
    })
    .collect()
}

/// Every line commented out (TOML a person can uncomment); lines that are
/// comments already stay as they are.
fn commented(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.starts_with('#') {
                format!("{l}\n")
            } else {
                format!("# {l}\n")
            }
        })
        .collect()
}

/// Whether a key names a secret (not the name of a variable holding one).
fn is_secret_key(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    if k.ends_with("_env") {
        return false;
    }
    k == "admin_key"
        || k.ends_with("api_key")
        || k.contains("secret")
        || k.contains("password")
        || k.contains("token")
        || k.contains("credential")
}

fn mask_table(t: &mut toml::Table) {
    for (k, v) in t.iter_mut() {
        mask_value(k, v);
    }
}

fn mask_value(key: &str, v: &mut toml::Value) {
    match v {
        toml::Value::Table(t) => mask_table(t),
        toml::Value::Array(a) => a.iter_mut().for_each(|v| mask_value(key, v)),
        toml::Value::String(s) if !s.is_empty() => {
            if is_secret_key(key) {
                *s = MASK.into();
            } else if let Some(masked) = image_queue_pipeline::endpoint::mask_passwords(s, MASK) {
                *s = masked;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_wherever_they_are() {
        let mut c = Config {
            admin_key: "admin-secret-1".into(),
            database_url: "postgres://app:db-secret-2@db.internal/shop".into(),
            redis_url: "redis://:redis-secret-3@127.0.0.1:6379/".into(),
            ..Config::default()
        };
        c.bg_removal_configured = true;
        let out = c.to_display_toml().unwrap();
        for secret in ["admin-secret-1", "db-secret-2", "redis-secret-3"] {
            assert!(!out.contains(secret), "{secret} printed:\n{out}");
        }
        assert!(out.contains("postgres://app:***@db.internal/shop"), "{out}");
        // What is printed parses back (commented keys and all).
        let back: toml::Table = out.parse().unwrap();
        assert!(back.contains_key("bg_removal"));
    }
}
