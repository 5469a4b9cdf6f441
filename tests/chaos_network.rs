//! Chaos: a TCP proxy between the workers and Redis that, every 0.5 to 1.5 s,
//! delays traffic, stalls half of the connections (longer than
//! the claim idle time, so stalled workers' entries are taken over while
//! they still hold them) or resets every connection, while at least a
//! thousand images flow. Every accepted job must end exactly once, with
//! nothing committed or uploaded twice.

mod chaos;
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chaos::*;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does to traffic at the moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    Pass,
    /// Every chunk waits this long before it is forwarded.
    Delay(Duration),
    /// Connections whose number has this parity forward nothing.
    Stall(u64),
}

struct Proxy {
    port: u16,
    fault: watch::Sender<Fault>,
    /// Bumped to reset every open connection.
    resets: watch::Sender<u64>,
}

impl Proxy {
    async fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (fault, _) = watch::channel(Fault::Pass);
        let (resets, _) = watch::channel(0u64);
        let (f, r) = (fault.clone(), resets.clone());
        let seq = Arc::new(AtomicU64::new(0));
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let (f, mut r) = (f.subscribe(), r.subscribe());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    // A zero linger makes closing a reset (RST), not a FIN.
                    client.set_zero_linger().ok();
                    server.set_zero_linger().ok();
                    client.set_nodelay(true).ok();
                    server.set_nodelay(true).ok();
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::select! {
                        _ = pipe(cr, sw, f.clone(), n) => {}
                        _ = pipe(sr, cw, f, n) => {}
                        _ = r.changed() => {}
                    }
                });
            }
        });
        Proxy { port, fault, resets }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn set(&self, f: Fault) {
        self.fault.send_replace(f);
    }

    fn reset_all(&self) {
        self.resets.send_modify(|n| *n += 1);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut fault: watch::Receiver<Fault>,
    conn: u64,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            let f = *fault.borrow_and_update();
            match f {
                Fault::Pass => break,
                Fault::Delay(d) => {
                    tokio::time::sleep(d).await;
                    break;
                }
                Fault::Stall(parity) if conn % 2 == parity => {
                    if fault.changed().await.is_err() {
                        return;
                    }
                }
                Fault::Stall(_) => break,
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[derive(Debug, Default)]
struct Injected {
    delays: usize,
    stalls: usize,
    resets: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_stalls_and_resets_between_workers_and_redis_lose_and_duplicate_nothing() {
    let mut cluster = Cluster::new().await;
    let proxy = Proxy::start(cluster.env.redis.port()).await;
    cluster.worker_redis_url = proxy.url();
    let c = &cluster;
    let proxy = &proxy;
    c.start_standard_workers().await;
    c.start_api().await;
    let announcements = Announcements::listen(&c.env).await;
    let load = Load::standard();
    let ran = run(c, Flow::standard(4), |stop| async move {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut injected = Injected::default();
        while pause(&stop, Duration::from_millis(rng.random_range(500..1_500))).await {
            // The kinds take turns (their lengths stay random), so that
            // the 15 s over which the load is submitted always see at
            // least six faults: at the longest, a turn of all three
            // takes 7.5 s.
            let lasts = match (injected.delays + injected.stalls + injected.resets) % 3 {
                0 => {
                    injected.delays += 1;
                    proxy.set(Fault::Delay(Duration::from_millis(rng.random_range(20..200))));
                    Duration::from_millis(rng.random_range(1_000..2_000))
                }
                1 => {
                    injected.stalls += 1;
                    proxy.set(Fault::Stall(rng.random_range(0..2)));
                    // Longer than the claim idle time (1.5 s).
                    Duration::from_millis(rng.random_range(2_000..4_000))
                }
                _ => {
                    injected.resets += 1;
                    proxy.reset_all();
                    Duration::ZERO
                }
            };
            pause(&stop, lasts).await;
            proxy.set(Fault::Pass);
            c.assert_workers_alive().await;
        }
        injected
    })
    .await;
    let (accepted, injected, flowed) = (ran.accepted, ran.faults, ran.flowed);

    c.assert_workers_alive().await;
    let checked = check_invariants(
        c,
        &accepted,
        load,
        &announcements,
        Announced::ExactlyOnce,
        Duration::from_secs(60),
    )
    .await;
    let total = injected.delays + injected.stalls + injected.resets;
    assert!(total >= 5, "only {total} faults: the load finished too soon");
    println!(
        "{} images in {} jobs, {injected:?} injected between workers and Redis, all done in {flowed:.1?}; {} result rows, {} objects",
        checked.images, checked.jobs, checked.rows, checked.objects
    );
    c.stop_all().await;
}
