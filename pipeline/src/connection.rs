//! Connections to wherever `endpoint.rs` says Redis is, all of one type,
//! `Conn`, so nothing above this module knows the topology.
//!
//! - One node: redis-rs' `ConnectionManager` (reconnects to its address).
//! - Sentinel: `FollowingPrimary`, a multiplexed connection to the primary
//!   the Sentinels name. A command that finds the primary gone (connection
//!   lost or refused, READONLY from a demoted primary, MASTERDOWN,
//!   UNBLOCKED from a blocked read on a primary turned replica) fails as
//!   usual and drops the connection; the next command asks the Sentinels
//!   again and checks with `ROLE` that the node it reaches really is the
//!   primary. redis-rs' own Sentinel client resolves once and
//!   `ConnectionManager` keeps one address, so neither follows a failover.
//! - Cluster: redis-rs' cluster connection, which follows MOVED and ASK and
//!   refreshes its slot map; every key of the pipeline shares one hash tag
//!   (`keys.rs`), so each command and script lands on one node.
//!
//! Callers keep their own retry policies: a failover shows them errors for
//! a few seconds, as a restart of a single node does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::{Cmd, RedisError, RedisFuture, RedisResult, Value};

use crate::endpoint::{Endpoint, HostPort, SentinelEndpoint};

/// How long connecting to one node may take before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// After a failed look-up of the primary, callers get that failure back
/// for this long instead of each asking every Sentinel again.
const RESOLVE_BACKOFF: Duration = Duration::from_millis(250);

/// A connection to the pipeline's Redis, whatever its topology. Cheap to
/// clone; clones share the underlying connection.
#[derive(Clone)]
pub struct Conn(Inner);

#[derive(Clone)]
enum Inner {
    Single(ConnectionManager),
    Sentinel(FollowingPrimary),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Endpoint {
    /// A new connection; `response_timeout` `None` for blocking commands
    /// (`XREADGROUP … BLOCK`, `WAIT`), which hold their connection.
    pub async fn connect(&self, response_timeout: Option<Duration>) -> RedisResult<Conn> {
        let inner = match self {
            Endpoint::Single(url) => Inner::Single(
                ConnectionManager::new_with_config(
                    redis::Client::open(url.as_str())?,
                    ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(Duration::from_secs(5)))
                        .set_response_timeout(response_timeout)
                        .set_max_delay(Duration::from_secs(2)),
                )
                .await?,
            ),
            Endpoint::Sentinel(s) => {
                let following = FollowingPrimary::new(s.clone(), response_timeout);
                // Fail at start when no Sentinel knows the primary, as a
                // single node that is not there does.
                following.current().await?;
                Inner::Sentinel(following)
            }
            Endpoint::Cluster(c) => {
                let mut builder = redis::cluster::ClusterClientBuilder::new(c.seed_urls())
                    .connection_timeout(CONNECT_TIMEOUT)
                    .retries(8);
                if let Some(t) = response_timeout {
                    builder = builder.response_timeout(t);
                }
                Inner::Cluster(builder.build()?.get_async_connection().await?)
            }
        };
        Ok(Conn(inner))
    }

    /// A subscriber connection. On a cluster any node hears every
    /// `PUBLISH`; under Sentinel the primary does (and its replicas, which
    /// get the messages replicated). Callers re-subscribe when the stream
    /// ends, which asks again where to go.
    pub async fn pubsub(&self) -> RedisResult<redis::aio::PubSub> {
        match self {
            Endpoint::Single(url) => redis::Client::open(url.as_str())?.get_async_pubsub().await,
            Endpoint::Sentinel(s) => {
                let primary = resolve_primary(s).await?;
                redis::Client::open(s.node_url(&primary))?.get_async_pubsub().await
            }
            Endpoint::Cluster(c) => {
                let mut last = None;
                for url in c.seed_urls() {
                    let attempt = async { redis::Client::open(url.as_str())?.get_async_pubsub().await };
                    match tokio::time::timeout(CONNECT_TIMEOUT, attempt).await {
                        Ok(Ok(pubsub)) => return Ok(pubsub),
                        Ok(Err(e)) => last = Some(e),
                        Err(_) => last = Some(timed_out("connecting to a cluster node")),
                    }
                }
                Err(last.unwrap_or_else(|| timed_out("no cluster seed")))
            }
        }
    }
}

impl Conn {
    /// Counts the connections made so far (0 for topologies that manage
    /// their own): a command and a later `WAIT` count for one another only
    /// when they went over the same connection.
    pub fn generation(&self) -> u64 {
        match &self.0 {
            Inner::Sentinel(f) => f.shared.latest.load(std::sync::atomic::Ordering::Acquire),
            _ => 0,
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match &mut self.0 {
            Inner::Single(c) => c.req_packed_command(cmd),
            Inner::Cluster(c) => c.req_packed_command(cmd),
            Inner::Sentinel(f) => Box::pin(async move {
                let (generation, mut c) = f.current().await?;
                let reply = c.req_packed_command(cmd).await;
                f.check(generation, &reply).await;
                reply
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match &mut self.0 {
            Inner::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            Inner::Sentinel(f) => Box::pin(async move {
                let (generation, mut c) = f.current().await?;
                let reply = c.req_packed_commands(pipeline, offset, count).await;
                f.check(generation, &reply).await;
                reply
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match &self.0 {
            Inner::Single(c) => c.get_db(),
            Inner::Cluster(c) => c.get_db(),
            Inner::Sentinel(f) => f.shared.endpoint.db,
        }
    }
}

/// A connection to whichever node the Sentinels currently name primary.
#[derive(Clone)]
struct FollowingPrimary {
    shared: Arc<Following>,
}

struct Following {
    endpoint: SentinelEndpoint,
    config: redis::AsyncConnectionConfig,
    state: tokio::sync::Mutex<FollowState>,
    /// The generation of the newest connection made.
    latest: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct FollowState {
    current: Option<(u64, MultiplexedConnection)>,
    failed: Option<(Instant, RedisError)>,
}

impl FollowingPrimary {
    fn new(endpoint: SentinelEndpoint, response_timeout: Option<Duration>) -> Self {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(response_timeout);
        FollowingPrimary {
            shared: Arc::new(Following {
                endpoint,
                config,
                state: Default::default(),
                latest: Default::default(),
            }),
        }
    }

    /// The live connection, or a new one to the primary the Sentinels name.
    async fn current(&self) -> RedisResult<(u64, MultiplexedConnection)> {
        let mut state = self.shared.state.lock().await;
        if let Some((generation, conn)) = &state.current {
            return Ok((*generation, conn.clone()));
        }
        if let Some((at, e)) = &state.failed {
            if at.elapsed() < RESOLVE_BACKOFF {
                return Err(e.clone());
            }
        }
        let connected = async {
            let primary = resolve_primary(&self.shared.endpoint).await?;
            let url = self.shared.endpoint.node_url(&primary);
            let mut conn = redis::Client::open(url)?
                .get_multiplexed_async_connection_with_config(&self.shared.config)
                .await?;
            // A Sentinel that has not noticed a failover yet may name a
            // node that is a replica by now.
            let role: Vec<Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
            match role.first() {
                Some(Value::BulkString(r)) if r.as_slice() == b"master" => Ok((primary, conn)),
                _ => Err(RedisError::from((
                    redis::ErrorKind::Io,
                    "the node the Sentinels name is not a primary (yet)",
                    format!("{}:{}", primary.host, primary.port),
                ))),
            }
        }
        .await;
        match connected {
            Ok((primary, conn)) => {
                let generation = self.shared.latest.fetch_add(1, std::sync::atomic::Ordering::AcqRel) + 1;
                state.current = Some((generation, conn.clone()));
                state.failed = None;
                tracing::info!(primary = %format!("{}:{}", primary.host, primary.port), "connected to the Redis primary");
                Ok((generation, conn))
            }
            Err(e) => {
                state.failed = Some((Instant::now(), e.clone()));
                Err(e)
            }
        }
    }

    /// Drops the connection a failed reply shows is no longer the
    /// primary's, unless a newer one replaced it meanwhile.
    async fn check<T>(&self, generation: u64, reply: &RedisResult<T>) {
        let Err(e) = reply else { return };
        if !primary_lost(e) {
            return;
        }
        let mut state = self.shared.state.lock().await;
        if state.current.as_ref().is_some_and(|(g, _)| *g == generation) {
            tracing::warn!(error = %e, "lost the Redis primary; asking the Sentinels again");
            state.current = None;
        }
    }
}

/// Whether an error means the connection no longer reaches a writable
/// primary.
fn primary_lost(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_timeout()
        || matches!(e.code(), Some("READONLY" | "MASTERDOWN" | "UNBLOCKED" | "LOADING"))
}

/// Asks the Sentinels, in turn, where the primary is.
async fn resolve_primary(s: &SentinelEndpoint) -> RedisResult<HostPort> {
    let mut last = None;
    for sentinel in &s.sentinels {
        let ask = async {
            let mut conn = redis::Client::open(s.sentinel_url(sentinel))?
                .get_multiplexed_async_connection()
                .await?;
            let addr: Option<(String, u16)> = redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&s.service)
                .query_async(&mut conn)
                .await?;
            addr.map(|(host, port)| HostPort { host, port }).ok_or_else(|| {
                RedisError::from((
                    redis::ErrorKind::MasterNameNotFoundBySentinel,
                    "a Sentinel does not monitor the named primary",
                    s.service.clone(),
                ))
            })
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, ask).await {
            Ok(Ok(primary)) => return Ok(primary),
            Ok(Err(e)) => last = Some(e),
            Err(_) => last = Some(timed_out("asking a Sentinel")),
        }
    }
    Err(last.unwrap_or_else(|| timed_out("no Sentinel")))
}

fn timed_out(what: &'static str) -> RedisError {
    RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, what))
}
