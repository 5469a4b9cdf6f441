//! The handle every part of the pipeline shares: Redis connections, keys,
//! scripts and the blob store. Which Redis topology is behind the
//! connections is `endpoint.rs`'s and `connection.rs`'s business.

use std::sync::Arc;
use std::time::Duration;

use crate::blob::BlobStore;
use crate::connection::Conn;
use crate::endpoint::Endpoint;
use crate::keys::Keys;
use crate::lua::Scripts;

#[derive(Clone)]
pub struct Pipeline {
    /// Where Redis is: one node, a Sentinel-watched primary or a cluster.
    pub endpoint: Arc<Endpoint>,
    /// Shared, multiplexed and reconnecting (following a failover): for
    /// every command that does not block. Concurrent callers' commands are
    /// pipelined on it.
    pub(crate) conn: Conn,
    pub keys: Keys,
    pub scripts: Arc<Scripts>,
    pub blobs: Arc<dyn BlobStore>,
}

impl Pipeline {
    /// Whether Redis answers and takes a write (a short-lived probe key):
    /// a Redis out of memory, loading, read-only or refusing the
    /// credentials answers PING all the same, and would fail every write.
    pub async fn probe_writable(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        redis::cmd("SET")
            .arg(self.keys.ready_probe())
            .arg(1)
            .arg("PX")
            .arg(10_000)
            .query_async::<()>(&mut conn)
            .await
    }

    /// The CPU seconds Redis has used (user and system), for benchmarks.
    pub async fn redis_cpu_seconds(&self) -> redis::RedisResult<f64> {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(info
            .lines()
            .filter_map(|l| l.trim().split_once(':'))
            .filter(|(k, _)| *k == "used_cpu_sys" || *k == "used_cpu_user")
            .map(|(_, v)| v.parse::<f64>().unwrap_or(0.0))
            .sum())
    }

    /// Deletes every key under this pipeline's prefix (a benchmark's
    /// private prefix, when it is done; one node's keys, on a cluster).
    pub async fn delete_every_key(&self) -> redis::RedisResult<()> {
        let mut conn = self.conn.clone();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(self.keys.every_key_pattern())
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
            if !keys.is_empty() {
                let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await?;
            }
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    pub async fn connect(redis_url: &str, prefix: &str, blobs: Arc<dyn BlobStore>) -> redis::RedisResult<Pipeline> {
        let endpoint = Endpoint::parse(redis_url).map_err(|e| {
            redis::RedisError::from((
                redis::ErrorKind::InvalidClientConfig,
                "invalid Redis URL",
                e.to_string(),
            ))
        })?;
        let conn = endpoint.connect(Some(Duration::from_secs(10))).await?;
        Ok(Pipeline {
            endpoint: Arc::new(endpoint),
            conn,
            keys: Keys::new(prefix),
            scripts: Arc::new(Scripts::new()),
            blobs,
        })
    }

    /// A connection of its own for blocking reads (`XREADGROUP ... BLOCK`,
    /// `SUBSCRIBE`): a blocking command holds its connection, and the
    /// default response timeout would cut it off.
    pub async fn blocking_connection(&self) -> redis::RedisResult<Conn> {
        self.endpoint.connect(None).await
    }

    /// A connection of its own with the given response timeout (`WAIT`).
    pub async fn dedicated_connection(&self, response_timeout: Duration) -> redis::RedisResult<Conn> {
        self.endpoint.connect(Some(response_timeout)).await
    }

    /// A subscriber connection to `channels`; when its stream ends, call
    /// again (under Sentinel or on a cluster that may be another node).
    pub async fn subscribe(&self, channels: &[String]) -> redis::RedisResult<redis::aio::PubSub> {
        let mut pubsub = self.endpoint.pubsub().await?;
        for c in channels {
            pubsub.subscribe(c).await?;
        }
        Ok(pubsub)
    }
}
