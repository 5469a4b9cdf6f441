//! Who is calling: vendors by API key, operators by the admin key.
//!
//! A vendor key is 32 random bytes (hex), shown once when created and
//! stored only as its SHA-256, in a Redis hash from hash to vendor id. The
//! vendor of a request always comes from its key, never from its body.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;
use image_queue_pipeline::{vendor_keys, Pipeline};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AppState;

/// The vendor a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vendor(pub String);

/// A request carrying the admin key.
#[derive(Debug, Clone)]
pub struct Admin;

#[derive(Clone)]
pub struct Auth {
    p: Pipeline,
    admin_key_hash: Option<[u8; 32]>,
}

fn sha256(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

/// Vendor ids appear in keys and paths: a safe alphabet only.
pub fn valid_vendor_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl Auth {
    pub fn new(p: Pipeline, admin_key: Option<&str>) -> Self {
        Auth {
            p,
            admin_key_hash: admin_key.filter(|k| !k.is_empty()).map(sha256),
        }
    }

    /// Creates a key for a vendor; returns the key, which is not kept.
    pub async fn add_vendor(&self, vendor: &str) -> Result<String, ApiError> {
        if !valid_vendor_id(vendor) {
            return Err(ApiError::Unprocessable(
                "vendor ids are 1–64 letters, digits, '-' or '_'".into(),
            ));
        }
        let key = hex::encode(rand::random::<[u8; 32]>());
        vendor_keys::add(&self.p, &hex::encode(sha256(&key)), vendor).await?;
        Ok(key)
    }

    /// Revokes every key of a vendor; returns how many.
    pub async fn revoke_vendor(&self, vendor: &str) -> Result<usize, ApiError> {
        Ok(vendor_keys::revoke(&self.p, vendor).await?)
    }

    /// Vendors with at least one key, with their key counts.
    pub async fn list_vendors(&self) -> Result<Vec<(String, usize)>, ApiError> {
        Ok(vendor_keys::list(&self.p).await?)
    }

    async fn vendor_of(&self, key: &str) -> Result<Option<String>, ApiError> {
        Ok(vendor_keys::vendor_of(&self.p, &hex::encode(sha256(key))).await?)
    }

    fn is_admin(&self, key: &str) -> bool {
        self.admin_key_hash.is_some_and(|h| bool::from(h.ct_eq(&sha256(key))))
    }

    /// Whether a request carries the admin key, for routes that answer
    /// everyone but show operators more.
    pub fn is_admin_request(&self, headers: &HeaderMap) -> bool {
        bearer(headers).is_some_and(|k| self.is_admin(k))
    }
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get("authorization")?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl FromRequestParts<AppState> for Vendor {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        match state.auth.vendor_of(key).await? {
            Some(v) => Ok(Vendor(v)),
            None => Err(ApiError::Unauthorized),
        }
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        let key = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        if state.auth.is_admin(key) {
            return Ok(Admin);
        }
        // A valid vendor key is known but not allowed here; anything else
        // is not known at all.
        match state.auth.vendor_of(key).await? {
            Some(_) => Err(ApiError::Forbidden),
            None => Err(ApiError::Unauthorized),
        }
    }
}
