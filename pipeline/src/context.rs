//! The handle every part of the pipeline shares: Redis connections, keys,
//! scripts and the blob store.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::blob::BlobStore;
use crate::keys::Keys;
use crate::scripts::Scripts;

#[derive(Clone)]
pub struct Pipeline {
    pub client: redis::Client,
    /// Shared, multiplexed and reconnecting: for every command that does not
    /// block. Concurrent callers' commands are pipelined on it.
    pub conn: ConnectionManager,
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

    pub async fn connect(redis_url: &str, prefix: &str, blobs: Arc<dyn BlobStore>) -> redis::RedisResult<Pipeline> {
        let client = redis::Client::open(redis_url)?;
        let conn = ConnectionManager::new_with_config(
            client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(Some(Duration::from_secs(10)))
                .set_max_delay(Duration::from_secs(2)),
        )
        .await?;
        Ok(Pipeline {
            client,
            conn,
            keys: Keys::new(prefix),
            scripts: Arc::new(Scripts::new()),
            blobs,
        })
    }

    /// A connection of its own for blocking reads (`XREADGROUP ... BLOCK`,
    /// `SUBSCRIBE`): a blocking command holds its connection, and the
    /// default response timeout would cut it off.
    pub async fn blocking_connection(&self) -> redis::RedisResult<ConnectionManager> {
        ConnectionManager::new_with_config(
            self.client.clone(),
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(Duration::from_secs(5)))
                .set_response_timeout(None)
                .set_max_delay(Duration::from_secs(2)),
        )
        .await
    }
}
