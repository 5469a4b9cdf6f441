//! Cloudinary's signed Upload API, the client the upload stage uses for its
//! `cloudinary` backend.
//!
//! An upload is a multipart POST to `<api_base>/v1_1/<cloud>/image/upload`
//! signed with the account's API secret: the SHA-1 (hex) of every sent
//! parameter except `file`, `cloud_name`, `resource_type` and `api_key`,
//! sorted by name and joined as `k=v&k=v`, with the secret appended. Each
//! output gets a deterministic `public_id` and `overwrite=true`, so a
//! redelivered event replaces the asset an earlier attempt uploaded instead
//! of adding a second one. The secret lives in a [`SecretString`] and is
//! never logged or put in an error.

use std::time::Duration;

use bytes::Bytes;
use image_queue_pipeline::StageError;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha1::{Digest, Sha1};

/// An account's credentials, from a `cloudinary://<key>:<secret>@<cloud>` URL.
#[derive(Clone)]
pub struct Credentials {
    pub cloud_name: String,
    pub api_key: String,
    pub api_secret: SecretString,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("cloud_name", &self.cloud_name)
            .field("api_key", &self.api_key)
            .field("api_secret", &"[redacted]")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{0} is not set")]
    Missing(String),
    #[error("a Cloudinary URL has the form cloudinary://<api_key>:<api_secret>@<cloud_name>")]
    Malformed,
}

impl Credentials {
    /// Parses a `CLOUDINARY_URL`. The error never repeats the URL, which
    /// holds the secret.
    pub fn from_url(url: &str) -> Result<Credentials, CredentialsError> {
        let rest = url
            .trim()
            .strip_prefix("cloudinary://")
            .ok_or(CredentialsError::Malformed)?;
        let (userinfo, cloud) = rest.rsplit_once('@').ok_or(CredentialsError::Malformed)?;
        let (key, secret) = userinfo.split_once(':').ok_or(CredentialsError::Malformed)?;
        let cloud = cloud.trim_end_matches('/');
        if key.is_empty() || secret.is_empty() || cloud.is_empty() || cloud.contains('/') {
            return Err(CredentialsError::Malformed);
        }
        Ok(Credentials {
            cloud_name: cloud.to_string(),
            api_key: key.to_string(),
            api_secret: SecretString::from(secret.to_string()),
        })
    }

    /// Reads the URL from the environment variable `var`.
    pub fn from_env(var: &str) -> Result<Credentials, CredentialsError> {
        let url = std::env::var(var).map_err(|_| CredentialsError::Missing(var.to_string()))?;
        Credentials::from_url(&url)
    }
}

/// The signature of a set of parameters, as Cloudinary computes it.
pub fn sign(params: &[(&str, String)], secret: &SecretString) -> String {
    let mut signed: Vec<&(&str, String)> = params
        .iter()
        .filter(|(k, _)| !matches!(*k, "file" | "cloud_name" | "resource_type" | "api_key"))
        .collect();
    signed.sort_by(|a, b| a.0.cmp(b.0));
    let joined = signed
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut h = Sha1::new();
    h.update(joined.as_bytes());
    h.update(secret.expose_secret().as_bytes());
    hex::encode(h.finalize())
}

/// What Cloudinary says about a stored asset.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Uploaded {
    pub secure_url: String,
    pub public_id: String,
    pub version: u64,
    #[serde(default)]
    pub asset_id: String,
}

pub struct Client {
    http: reqwest::Client,
    api_base: String,
    credentials: Credentials,
}

impl Client {
    pub fn new(api_base: &str, credentials: Credentials, timeout: Duration) -> Result<Client, reqwest::Error> {
        let http = reqwest::Client::builder().timeout(timeout).build()?;
        Ok(Client {
            http,
            api_base: api_base.trim_end_matches('/').to_string(),
            credentials,
        })
    }

    /// Uploads an image under `folder/public_id`, replacing what is there.
    pub async fn upload(
        &self,
        folder: &str,
        public_id: &str,
        file_name: &str,
        content_type: &str,
        bytes: Bytes,
    ) -> Result<Uploaded, StageError> {
        let timestamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
            .to_string();
        let mut params: Vec<(&str, String)> = vec![
            ("overwrite", "true".into()),
            ("public_id", public_id.into()),
            ("timestamp", timestamp),
        ];
        if !folder.is_empty() {
            params.push(("folder", folder.into()));
        }
        let signature = sign(&params, &self.credentials.api_secret);
        let content_type = if content_type.is_empty() {
            "application/octet-stream"
        } else {
            content_type
        };
        let file = reqwest::multipart::Part::stream(bytes)
            .file_name(file_name.to_string())
            .mime_str(content_type)
            .map_err(|e| StageError::permanent(format!("cloudinary: content type {content_type:?}: {e}")))?;
        let mut form = reqwest::multipart::Form::new()
            .part("file", file)
            .text("api_key", self.credentials.api_key.clone())
            .text("signature", signature);
        for (k, v) in params {
            form = form.text(k, v);
        }
        let url = format!("{}/v1_1/{}/image/upload", self.api_base, self.credentials.cloud_name);
        let resp = self
            .http
            .post(&url)
            .multipart(form)
            .send()
            .await
            .map_err(|e| StageError::retryable(format!("cloudinary: {}", e.without_url())))?;
        let status = resp.status();
        let retry_after = crate::fetch::retry_after(resp.headers());
        if status.is_success() {
            return resp
                .json::<Uploaded>()
                .await
                .map_err(|e| StageError::retryable(format!("cloudinary: unreadable answer: {}", e.without_url())));
        }
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| body.chars().take(200).collect());
        let text = format!("cloudinary: {status}: {message}");
        // 420 is Cloudinary's own "rate limited"; like 429 and 5xx it
        // passes. Any other 4xx is about this request and would recur.
        let err = if status.as_u16() == 420 || status.as_u16() == 429 || status.is_server_error() {
            StageError::retryable(text)
        } else {
            StageError::permanent(text)
        };
        Err(match retry_after {
            Some(after) => err.with_retry_after(after),
            None => err,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_the_documented_example() {
        // Cloudinary's documented example of a signature.
        let params = [
            ("public_id", "sample_image".to_string()),
            ("timestamp", "1315060510".to_string()),
        ];
        assert_eq!(
            sign(&params, &SecretString::from("abcd")),
            "b4ad47fb4e25c7bf5f92a20089f9db59bc302313"
        );
    }

    #[test]
    fn signing_ignores_unsigned_parameters_and_order() {
        let secret = SecretString::from("abcd");
        let a = [
            ("timestamp", "1315060510".to_string()),
            ("api_key", "123".to_string()),
            ("public_id", "sample_image".to_string()),
            ("resource_type", "image".to_string()),
        ];
        assert_eq!(sign(&a, &secret), "b4ad47fb4e25c7bf5f92a20089f9db59bc302313");
    }

    #[test]
    fn parses_cloudinary_urls_without_echoing_secrets() {
        let c = Credentials::from_url("cloudinary://1234:s3cr3t@demo").unwrap();
        assert_eq!((c.cloud_name.as_str(), c.api_key.as_str()), ("demo", "1234"));
        assert_eq!(c.api_secret.expose_secret(), "s3cr3t");
        assert!(!format!("{c:?}").contains("s3cr3t"));
        let e = Credentials::from_url("cloudinary://1234@demo").unwrap_err();
        assert!(!e.to_string().contains("1234"));
        assert!(Credentials::from_url("https://1234:x@demo").is_err());
    }
}
