//! Redis topologies for the high-availability tests, all real
//! `redis-server` processes on free ports: a primary with a replica
//! watched by three Sentinels, and a three-master Redis Cluster made with
//! `redis-cli --cluster create`. Waits are on the servers' own state
//! (what the Sentinels report, `cluster_state:ok`), never on a guess.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};

use image_queue_pipeline::redis_server::{Fsync, RedisServer};

/// The name the Sentinels monitor the primary under.
pub const SERVICE: &str = "iq-primary";

async fn conn(port: u16) -> redis::RedisResult<redis::aio::MultiplexedConnection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}/"))?
        .get_multiplexed_async_connection()
        .await
}

/// `127.0.0.1:p1,127.0.0.1:p2,…`, the hosts of a multi-host URL.
fn host_list(ports: &[u16]) -> String {
    let hosts: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    hosts.join(",")
}

/// Polls `check` every 50 ms until it holds, failing with `what` after
/// `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A primary, a replica and three Sentinels (quorum 2).
pub struct SentinelSet {
    /// The data nodes: whichever is primary now, ask [`Self::primary_port`].
    pub nodes: Vec<RedisServer>,
    pub sentinel_ports: Vec<u16>,
    /// The Sentinels' processes not handed out with [`Self::take_sentinel`].
    sentinels: Vec<RedisServer>,
}

impl SentinelSet {
    pub async fn start(dir: &Path, fsync: Fsync, down_after_ms: u64) -> SentinelSet {
        let primary = RedisServer::start(&dir.join("node-0"), fsync)
            .await
            .expect("redis-server must be installed to run these tests (apt-get install redis-server)");
        let replica = RedisServer::start_replica(&dir.join("node-1"), &primary, fsync)
            .await
            .unwrap();
        wait_synced(replica.port()).await;
        let mut sentinels = Vec::new();
        for i in 0..3 {
            sentinels.push(
                RedisServer::start_sentinel(
                    &dir.join(format!("sentinel-{i}")),
                    SERVICE,
                    primary.port(),
                    2,
                    down_after_ms,
                )
                .await
                .expect("redis-server --sentinel (Sentinel mode of redis-server) must start"),
            );
        }
        let set = SentinelSet {
            nodes: vec![primary, replica],
            sentinel_ports: sentinels.iter().map(|s| s.port()).collect(),
            sentinels,
        };
        set.wait_sentinels_agree(1).await;
        set
    }

    /// The URL every process is given.
    pub fn url(&self) -> String {
        format!("redis+sentinel://{}/{SERVICE}", host_list(&self.sentinel_ports))
    }

    /// One Sentinel's process, for a holder that keeps it running (a test
    /// environment); the set goes on addressing it by its port.
    pub fn take_sentinel(&mut self) -> RedisServer {
        self.sentinels.pop().expect("a Sentinel left")
    }

    /// The port of the node the first answering Sentinel names primary.
    pub async fn primary_port(&self) -> u16 {
        for &port in &self.sentinel_ports {
            if let Ok(mut c) = conn(port).await {
                let addr: redis::RedisResult<(String, u16)> = redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(SERVICE)
                    .query_async(&mut c)
                    .await;
                if let Ok((_, port)) = addr {
                    return port;
                }
            }
        }
        panic!("no Sentinel names a primary");
    }

    /// Waits until every Sentinel knows the other two and `replicas`
    /// replicas of the primary in sync, which a failover needs.
    pub async fn wait_sentinels_agree(&self, replicas: usize) {
        for &port in &self.sentinel_ports {
            wait_until(
                "the Sentinels to know each other and the replicas",
                Duration::from_secs(60),
                || async move {
                    let Ok(mut c) = conn(port).await else { return false };
                    let others: redis::RedisResult<Vec<redis::Value>> = redis::cmd("SENTINEL")
                        .arg("sentinels")
                        .arg(SERVICE)
                        .query_async(&mut c)
                        .await;
                    let known: redis::RedisResult<Vec<std::collections::HashMap<String, String>>> =
                        redis::cmd("SENTINEL")
                            .arg("replicas")
                            .arg(SERVICE)
                            .query_async(&mut c)
                            .await;
                    let healthy = known.map(|list| {
                        list.iter()
                            .filter(|r| {
                                r.get("flags").is_some_and(|f| f == "slave")
                                    && r.get("master-link-status").is_some_and(|l| l == "ok")
                            })
                            .count()
                    });
                    others.is_ok_and(|o| o.len() >= 2) && healthy.is_ok_and(|n| n >= replicas)
                },
            )
            .await;
        }
    }

    /// SIGKILLs the primary; returns its port.
    pub async fn kill_primary(&mut self) -> u16 {
        let old = self.primary_port().await;
        let victim = self
            .nodes
            .iter_mut()
            .find(|n| n.port() == old)
            .expect("the primary is one of ours");
        victim.kill().await.unwrap();
        old
    }

    /// Waits until the Sentinels name a primary other than `old`; returns
    /// its port.
    pub async fn await_promotion(&self, old: u16) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = self.primary_port().await;
            if now != old {
                return now;
            }
            assert!(Instant::now() < deadline, "the Sentinels never promoted the replica");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Restarts the killed node on `old` as a replica of the primary on
    /// `new`, and waits until it is in sync and the Sentinels know it.
    pub async fn rejoin(&mut self, old: u16, new: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port() == old).unwrap();
        node.set_replica_of(Some(new));
        node.restart().await.unwrap();
        wait_synced(old).await;
        self.wait_sentinels_agree(1).await;
    }
}

/// Waits until the replica on `port` has a live link to its primary.
pub async fn wait_synced(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = match conn(port).await {
            Ok(mut c) => {
                redis::cmd("INFO")
                    .arg("replication")
                    .query_async::<String>(&mut c)
                    .await
            }
            Err(e) => Err(e),
        };
        if info.as_ref().is_ok_and(|i| i.contains("master_link_status:up")) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the replica on port {port} never synced with its primary: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Redis Cluster of three masters, no replicas.
pub struct LocalCluster {
    /// The nodes' ports, in the order they were started.
    pub ports: Vec<u16>,
    /// The processes not handed out with [`Self::take_server`].
    servers: Vec<RedisServer>,
}

impl LocalCluster {
    pub async fn start(dir: &Path) -> LocalCluster {
        let mut nodes = Vec::new();
        for i in 0..3 {
            nodes.push(
                RedisServer::start_cluster_node(&dir.join(format!("cluster-{i}")), Fsync::Off)
                    .await
                    .expect("redis-server must be installed to run these tests (apt-get install redis-server)"),
            );
        }
        let mut create = std::process::Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed to make a cluster (apt-get install redis-tools)");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = LocalCluster {
            ports: nodes.iter().map(|n| n.port()).collect(),
            servers: nodes,
        };
        for &port in &cluster.ports {
            wait_until("the cluster to be ready", Duration::from_secs(60), || async move {
                let Ok(mut c) = conn(port).await else { return false };
                let info: redis::RedisResult<String> = redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await;
                info.is_ok_and(|i| i.contains("cluster_state:ok"))
            })
            .await;
        }
        cluster
    }

    pub fn url(&self) -> String {
        format!("redis+cluster://{}", host_list(&self.ports))
    }

    /// One node's process, for a holder that keeps it running (a test
    /// environment); the cluster goes on addressing it by its port.
    pub fn take_server(&mut self) -> RedisServer {
        self.servers.pop().expect("a server left")
    }

    /// The slot a key (or hash tag) hashes to.
    pub async fn slot_of(&self, key: &str) -> u16 {
        let mut c = conn(self.ports[0]).await.unwrap();
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    async fn node_id(port: u16) -> String {
        let mut c = conn(port).await.unwrap();
        redis::cmd("CLUSTER").arg("MYID").query_async(&mut c).await.unwrap()
    }

    /// The index of the node serving `slot`.
    pub async fn owner_of(&self, slot: u16) -> usize {
        let mut c = conn(self.ports[0]).await.unwrap();
        let shards: Vec<(i64, i64, Vec<redis::Value>)> =
            redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c).await.unwrap();
        for (from, to, first) in shards {
            if (from..=to).contains(&(slot as i64)) {
                let port: i64 = redis::from_redis_value(first[1].clone()).unwrap();
                return self.ports.iter().position(|&p| p as i64 == port).unwrap();
            }
        }
        panic!("no node serves slot {slot}");
    }

    /// Moves `slot` and its keys to node `to`, as `redis-cli --cluster
    /// reshard` does: IMPORTING/MIGRATING, MIGRATE in batches, then the
    /// new owner announced to every node. Returns the keys moved.
    pub async fn migrate_slot(&self, slot: u16, to: usize) -> usize {
        let from = self.owner_of(slot).await;
        assert_ne!(from, to, "slot {slot} is already on node {to}");
        let (src_port, dst_port) = (self.ports[from], self.ports[to]);
        let (src_id, dst_id) = (Self::node_id(src_port).await, Self::node_id(dst_port).await);
        let mut src = conn(src_port).await.unwrap();
        let mut dst = conn(dst_port).await.unwrap();
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("IMPORTING")
            .arg(&src_id)
            .query_async(&mut dst)
            .await
            .unwrap();
        let _: () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("MIGRATING")
            .arg(&dst_id)
            .query_async(&mut src)
            .await
            .unwrap();
        let mut moved = 0;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(50)
                .query_async(&mut src)
                .await
                .unwrap();
            if keys.is_empty() {
                break;
            }
            moved += keys.len();
            let _: redis::Value = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(dst_port)
                .arg("")
                .arg(0)
                .arg(10_000)
                .arg("REPLACE")
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut src)
                .await
                .unwrap();
        }
        for &port in &self.ports {
            let mut c = conn(port).await.unwrap();
            let _: () = redis::cmd("CLUSTER")
                .arg("SETSLOT")
                .arg(slot)
                .arg("NODE")
                .arg(&dst_id)
                .query_async(&mut c)
                .await
                .unwrap();
        }
        moved
    }
}
