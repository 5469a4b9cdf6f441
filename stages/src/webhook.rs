//! Sending vendors' webhooks: the HTTP half of
//! `image_queue_pipeline::webhooks`, which decides when and how often.
//!
//! Each call is a JSON POST signed with the vendor's secret, the way
//! payment providers sign theirs, so receivers can reuse what they know:
//! `Image-Queue-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of
//! "<t>.<body>">`. The timestamp inside the signed text lets a receiver
//! refuse replays of an old call. `Image-Queue-Delivery` (the job id) is the
//! same on every attempt, for receivers to deduplicate. URLs go through the
//! same address rules as image fetching: a webhook cannot reach our network.

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use image_queue_pipeline::webhooks::{Webhook, WebhookSender};
use image_queue_pipeline::StageError;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use sha2::Sha256;

use crate::fetch::Fetcher;

/// The signature header's value for `body` sent at `unix_secs`.
pub fn signature(secret: &str, unix_secs: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(unix_secs.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={unix_secs},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends webhooks with an SSRF-safe client (see [`crate::fetch`]).
pub struct HttpWebhookSender {
    fetcher: Fetcher,
}

impl HttpWebhookSender {
    pub fn new(fetcher: Fetcher) -> Self {
        HttpWebhookSender { fetcher }
    }
}

#[async_trait]
impl WebhookSender for HttpWebhookSender {
    async fn send(&self, hook: &Webhook, delivery_id: &str, body: &[u8]) -> Result<u16, StageError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut headers = HeaderMap::new();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let sig = signature(&hook.secret, now, body);
        headers.insert("image-queue-signature", HeaderValue::from_str(&sig).expect("ascii"));
        if let Ok(id) = HeaderValue::from_str(delivery_id) {
            headers.insert("image-queue-delivery", id);
        }
        headers.insert("image-queue-event", HeaderValue::from_static("job.finished"));
        self.fetcher
            .post(&hook.url, headers, body.to_vec())
            .await
            .map_err(|e| StageError {
                message: format!("webhook: {}", e.message),
                ..e
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_timestamp_dot_body() {
        // HMAC-SHA256("whsec_test", "1700000000.{}"), computed independently
        // (Python's hmac module).
        assert_eq!(
            signature("whsec_test", 1_700_000_000, b"{}"),
            "t=1700000000,v1=35495024f4ef3f94e5a93e22221544c4b75e9a42300cd965ab81cb85cd994e91"
        );
    }
}
