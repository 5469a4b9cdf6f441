//! S3-compatible object storage (AWS S3, MinIO, Cloudflare R2, …), the
//! client the upload stage uses for its `s3` backend.
//!
//! Each output is one `PutObject` of the whole image to a deterministic key
//! with its Content-Type set on the object, so a redelivered event replaces
//! what an earlier attempt stored instead of adding a second object. The
//! access keys come from the environment and live in [`SecretString`]s; they
//! are handed to the S3 client when it is built and never logged, put in an
//! event or put in an error. Whether a failure is worth retrying is decided
//! here, from the kind of failure alone, in [`retryable`].

use std::time::Duration;

use bytes::Bytes;
use image_queue_pipeline::StageError;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{Attribute, Attributes, ClientOptions, ObjectStore, PutOptions, PutPayload, RetryConfig};
use secrecy::{ExposeSecret, SecretString};

/// An access key pair (and, for temporary credentials, a session token).
#[derive(Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub session_token: Option<SecretString>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"[redacted]")
            .field("session_token", &self.session_token.as_ref().map(|_| "[redacted]"))
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("{0} is not set")]
    Missing(String),
}

/// Why an S3 client cannot be made from its settings.
#[derive(Debug, thiserror::Error)]
#[error("s3: the client's settings")]
pub struct S3ClientError(#[source] object_store::Error);

impl Credentials {
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Credentials {
        Credentials {
            access_key_id: access_key_id.into(),
            secret_access_key: SecretString::from(secret_access_key.into()),
            session_token: None,
        }
    }

    /// Reads the key pair from the environment variables named; the session
    /// token's variable is optional, as only temporary credentials have one.
    pub fn from_env(key_var: &str, secret_var: &str, token_var: &str) -> Result<Credentials, CredentialsError> {
        let read = |var: &str| {
            std::env::var(var)
                .ok()
                .filter(|v| !v.is_empty())
                .ok_or_else(|| CredentialsError::Missing(var.to_string()))
        };
        let mut c = Credentials::new(read(key_var)?, read(secret_var)?);
        c.session_token = (!token_var.is_empty())
            .then(|| read(token_var).ok())
            .flatten()
            .map(SecretString::from);
        Ok(c)
    }
}

/// The configuration defaults every S3 setting of ours shares (the upload
/// backend and the blob store): AWS's own region and variable names.
pub(crate) fn default_region() -> String {
    "us-east-1".into()
}

pub(crate) fn default_key_env() -> String {
    "AWS_ACCESS_KEY_ID".into()
}

pub(crate) fn default_secret_env() -> String {
    "AWS_SECRET_ACCESS_KEY".into()
}

pub(crate) fn default_token_env() -> String {
    "AWS_SESSION_TOKEN".into()
}

/// Where the bucket is and how to talk to it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub bucket: String,
    /// The service's URL for S3-compatible services; `None`: AWS S3.
    pub endpoint: Option<String>,
    pub region: String,
    /// Plain `http://` endpoints (a local MinIO); refused otherwise.
    pub allow_http: bool,
    /// Per request, and for the client's own retries together.
    pub timeout: Duration,
    /// The client's own retries of a connection error or 5xx within one
    /// attempt of the stage; the pipeline retries the event after that.
    pub retries: usize,
}

impl Settings {
    /// The URL of the bucket's root when the operator gives none: path
    /// style under the endpoint, or AWS's virtual-hosted style.
    pub fn default_public_base_url(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("{}/{}", e.trim_end_matches('/'), self.bucket),
            None => format!("https://{}.s3.{}.amazonaws.com", self.bucket, self.region),
        }
    }
}

/// What the service says about a stored object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

pub struct Client {
    store: AmazonS3,
    bucket: String,
    /// Kept only to scrub them from error texts, should a service ever
    /// echo one back.
    secrets: Vec<SecretString>,
}

/// An object-store client for the bucket in `settings`, and the secrets to
/// scrub from its errors.
pub(crate) fn build_store(
    settings: &Settings,
    credentials: Credentials,
) -> Result<(AmazonS3, Vec<SecretString>), S3ClientError> {
    let options = ClientOptions::new()
        .with_allow_http(settings.allow_http)
        .with_timeout(settings.timeout)
        .with_connect_timeout(settings.timeout.min(Duration::from_secs(10)));
    let retry = RetryConfig {
        max_retries: settings.retries,
        retry_timeout: settings.timeout,
        ..RetryConfig::default()
    };
    // `new()`, not `from_env()`: only what the configuration says, not
    // whatever AWS_* variables the process happens to have.
    let mut b = AmazonS3Builder::new()
        .with_bucket_name(&settings.bucket)
        .with_region(&settings.region)
        .with_access_key_id(&credentials.access_key_id)
        .with_secret_access_key(credentials.secret_access_key.expose_secret())
        .with_client_options(options)
        .with_retry(retry);
    if let Some(token) = &credentials.session_token {
        b = b.with_token(token.expose_secret());
    }
    if let Some(endpoint) = &settings.endpoint {
        b = b.with_endpoint(endpoint.trim_end_matches('/'));
    }
    let store = b.build().map_err(S3ClientError)?;
    let mut secrets = vec![credentials.secret_access_key];
    secrets.extend(credentials.session_token);
    Ok((store, secrets))
}

impl Client {
    pub fn new(settings: &Settings, credentials: Credentials) -> Result<Client, S3ClientError> {
        let (store, secrets) = build_store(settings, credentials)?;
        Ok(Client {
            store,
            bucket: settings.bucket.clone(),
            secrets,
        })
    }

    /// Stores `bytes` at `key`, replacing what is there.
    pub async fn put(&self, key: &str, content_type: &str, bytes: Bytes) -> Result<Stored, StageError> {
        let location =
            Path::parse(key).map_err(|e| StageError::permanent(format!("s3: {key:?} is not a valid key: {e}")))?;
        let content_type = if content_type.is_empty() {
            "application/octet-stream"
        } else {
            content_type
        };
        let mut attributes = Attributes::new();
        attributes.insert(Attribute::ContentType, content_type.to_string().into());
        let opts = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        match self.store.put_opts(&location, PutPayload::from(bytes), opts).await {
            Ok(r) => Ok(Stored {
                e_tag: r.e_tag,
                version: r.version,
            }),
            Err(e) => {
                let text = self.scrub(format!("s3: storing {key} in bucket {}: {}", self.bucket, describe(&e)));
                Err(if retryable(&e) {
                    StageError::retryable(text)
                } else {
                    StageError::permanent(text)
                })
            }
        }
    }

    fn scrub(&self, mut text: String) -> String {
        for s in &self.secrets {
            let s = s.expose_secret();
            if !s.is_empty() {
                text = text.replace(s, "[redacted]");
            }
        }
        text
    }
}

/// Whether a failed request may succeed if tried again: the service or the
/// way to it failing (5xx, 429, 408, timeouts, refused or dropped
/// connections) passes; the request itself being refused (4xx: access
/// denied, no such bucket, a bad key) or a misconfiguration would recur.
pub fn retryable(e: &object_store::Error) -> bool {
    use object_store::Error as E;
    match e {
        E::NotFound { .. }
        | E::PermissionDenied { .. }
        | E::Unauthenticated { .. }
        | E::Precondition { .. }
        | E::AlreadyExists { .. }
        | E::NotModified { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::InvalidPath { .. }
        | E::UnknownConfigurationKey { .. } => false,
        _ => {
            // object_store keeps its HTTP error types private but for the
            // transport error, so: a transport error anywhere in the chain
            // passes; otherwise the status in the text decides.
            if source_chain(e).any(|s| s.is::<object_store::client::HttpError>()) {
                return true;
            }
            let text = e.to_string();
            if text.contains("redirect without LOCATION") {
                // A bucket in another region than configured.
                return false;
            }
            match status_in(&text) {
                Some(s) => s >= 500 || s == 408 || s == 429,
                // Anything unrecognised: let the pipeline's bounded retries
                // and dead-letter queue decide rather than dropping it.
                None => true,
            }
        }
    }
}

fn source_chain<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(e), |e| e.source())
}

/// The HTTP status object_store writes in its error texts.
fn status_in(text: &str) -> Option<u16> {
    let rest = &text[text.find("status code: ")? + "status code: ".len()..];
    rest.get(..3)?.parse().ok()
}

/// A short account of a failure: the status and S3's own error code and
/// message when the service answered, object_store's text otherwise.
fn describe(e: &object_store::Error) -> String {
    let text = e.to_string();
    let code = xml_element(&text, "Code");
    let message = xml_element(&text, "Message");
    match (status_in(&text), code) {
        (Some(status), Some(code)) => match message {
            Some(m) => format!("HTTP {status}, {code}: {m}"),
            None => format!("HTTP {status}, {code}"),
        },
        _ => text.chars().take(400).collect(),
    }
}

fn xml_element<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&format!("</{name}>"))?;
    Some(text[start..start + len].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_status_and_the_s3_error_in_object_store_texts() {
        let t = "Error performing PUT http://h/b/k in 3ms - Server returned non-2xx status code: 403 Forbidden: \
                 <?xml version=\"1.0\"?><Error><Code>SignatureDoesNotMatch</Code><Message>no</Message></Error>";
        assert_eq!(status_in(t), Some(403));
        assert_eq!(xml_element(t, "Code"), Some("SignatureDoesNotMatch"));
        assert_eq!(xml_element(t, "Message"), Some("no"));
        assert_eq!(status_in("Server returned error response: <Error/>"), None);
    }

    #[test]
    fn credentials_never_print_their_secrets() {
        let mut c = Credentials::new("AKIDEXAMPLE", "wJalrXUtnFEMI");
        c.session_token = Some(SecretString::from("tok3n".to_string()));
        let d = format!("{c:?}");
        assert!(d.contains("AKIDEXAMPLE"));
        assert!(!d.contains("wJalrXUtnFEMI") && !d.contains("tok3n"), "{d}");
    }

    #[test]
    fn missing_credentials_name_the_variable() {
        let e = Credentials::from_env("IQ_NO_SUCH_KEY_VAR", "IQ_NO_SUCH_SECRET_VAR", "").unwrap_err();
        assert_eq!(e.to_string(), "IQ_NO_SUCH_KEY_VAR is not set");
    }

    #[test]
    fn the_default_public_url_is_the_buckets_root() {
        let mut s = Settings {
            bucket: "media".into(),
            endpoint: Some("http://127.0.0.1:9000/".into()),
            region: "us-east-1".into(),
            allow_http: true,
            timeout: Duration::from_secs(1),
            retries: 0,
        };
        assert_eq!(s.default_public_base_url(), "http://127.0.0.1:9000/media");
        s.endpoint = None;
        s.region = "eu-west-3".into();
        assert_eq!(s.default_public_base_url(), "https://media.s3.eu-west-3.amazonaws.com");
    }
}
