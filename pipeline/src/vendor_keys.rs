//! Vendors' API keys as Redis keeps them: a hash from a key's SHA-256 (hex)
//! to the vendor id. Only hashes come here; making keys, hashing them and
//! deciding who a request is belong to the API's `auth`.

use std::collections::BTreeMap;

use redis::AsyncCommands;

use crate::context::Pipeline;

/// Records a key (by its hash) for `vendor`.
pub async fn add(p: &Pipeline, key_hash: &str, vendor: &str) -> redis::RedisResult<()> {
    let mut conn = p.conn.clone();
    conn.hset(p.keys.vendor_keys(), key_hash, vendor).await
}

/// Removes every key of `vendor`; returns how many.
pub async fn revoke(p: &Pipeline, vendor: &str) -> redis::RedisResult<usize> {
    let mut conn = p.conn.clone();
    let all: Vec<(String, String)> = conn.hgetall(p.keys.vendor_keys()).await?;
    let mine: Vec<String> = all.into_iter().filter(|(_, v)| v == vendor).map(|(h, _)| h).collect();
    if !mine.is_empty() {
        let _: () = conn.hdel(p.keys.vendor_keys(), &mine).await?;
    }
    Ok(mine.len())
}

/// Vendors with at least one key, with their key counts.
pub async fn list(p: &Pipeline) -> redis::RedisResult<Vec<(String, usize)>> {
    let mut conn = p.conn.clone();
    let all: Vec<(String, String)> = conn.hgetall(p.keys.vendor_keys()).await?;
    let mut counts = BTreeMap::new();
    for (_, v) in all {
        *counts.entry(v).or_insert(0) += 1;
    }
    Ok(counts.into_iter().collect())
}

/// The vendor whose key has this hash, if any.
pub async fn vendor_of(p: &Pipeline, key_hash: &str) -> redis::RedisResult<Option<String>> {
    let mut conn = p.conn.clone();
    conn.hget(p.keys.vendor_keys(), key_hash).await
}
