//! Serving the router on a socket, with the limits a public server needs
//! and `axum::serve` lacks: a deadline for a request's headers (which is
//! also how long an idle kept-alive connection is kept), a least pace for
//! request bodies, and a cap on open connections. A client that connects
//! and says nothing, trickles its headers or trickles its body is closed;
//! a connection over the cap is answered 503 and closed at once, so open
//! descriptors stay bounded whatever clients do.
//!
//! This module owns the accept loop and the connections; what a request
//! means is the router's business.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::ConnectInfo;
use axum::Router;
use futures::Stream;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tower::ServiceExt;

use crate::ApiConfigError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Longest a client may take to send a request's headers, counted from
    /// when the server waits for them: on a new connection, and after each
    /// answer on a kept-alive one, so it is also the idle timeout.
    pub header_read_timeout_ms: u64,
    /// A request body must bring at least `body_min_bytes` in every
    /// `body_timeout_ms` (or end): slower, the request fails with 400 and
    /// its connection closes.
    pub body_timeout_ms: u64,
    pub body_min_bytes: u64,
    /// Most connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
    /// How long shutdown waits for requests in flight (event streams
    /// included) before it closes their connections.
    pub shutdown_grace_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            header_read_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            body_min_bytes: 16 * 1024,
            max_connections: 1024,
            shutdown_grace_ms: 10_000,
        }
    }
}

impl ServerConfig {
    pub fn validate(&self) -> Result<(), ApiConfigError> {
        if self.header_read_timeout_ms == 0 || self.body_timeout_ms == 0 {
            return Err(ApiConfigError::ZeroTimeout);
        }
        if self.max_connections == 0 {
            return Err(ApiConfigError::NoConnections);
        }
        Ok(())
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then lets
/// requests in flight finish for up to `shutdown_grace_ms`. Each request
/// carries its peer's [`ConnectInfo`], as `into_make_service_with_connect_info`
/// would attach it.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    cfg: &ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    cfg.validate().map_err(std::io::Error::other)?;
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(Duration::from_millis(cfg.header_read_timeout_ms));
    let slots = Arc::new(Semaphore::new(cfg.max_connections));
    let pace = Pace {
        window: Duration::from_millis(cfg.body_timeout_ms),
        min_bytes: cfg.body_min_bytes,
    };
    let graceful = GracefulShutdown::new();
    let busy = over_capacity_answer();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of descriptors, most likely: wait for some to be
                    // freed rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            refuse(stream, &busy);
            continue;
        };
        stream.set_nodelay(true).ok();
        let router = router.clone();
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let mut req = req.map(|body| pace.wrap(Body::new(body)));
            req.extensions_mut().insert(ConnectInfo(peer));
            router.clone().oneshot(req)
        });
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection closed with an error");
            }
            drop(slot);
        });
    }
    drop(listener);
    let grace = Duration::from_millis(cfg.shutdown_grace_ms);
    if tokio::time::timeout(grace, graceful.shutdown()).await.is_err() {
        tracing::warn!("requests still in flight at shutdown were cut off");
    }
    Ok(())
}

/// The answer to a connection over the cap, written once and reused.
fn over_capacity_answer() -> Vec<u8> {
    let body =
        r#"{"error":{"code":"unavailable","message":"the server is at its connection limit; try again shortly"}}"#;
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Tells a connection over the cap why, without waiting for it, and
/// closes it: a client that does not read cannot hold the loop.
fn refuse(stream: TcpStream, answer: &[u8]) {
    let _ = stream.try_write(answer);
    tracing::debug!("refused a connection over the cap");
}

/// The least pace of a request body.
#[derive(Debug, Clone, Copy)]
struct Pace {
    window: Duration,
    min_bytes: u64,
}

impl Pace {
    fn wrap(self, body: Body) -> Body {
        Body::from_stream(PacedBody {
            inner: body.into_data_stream(),
            pace: self,
            got: 0,
            deadline: Box::pin(tokio::time::sleep(self.window)),
        })
    }
}

/// A body that fails once a window passes without `min_bytes` arriving.
struct PacedBody {
    inner: BodyDataStream,
    pace: Pace,
    /// Bytes arrived in the current window.
    got: u64,
    deadline: Pin<Box<Sleep>>,
}

#[derive(Debug, thiserror::Error)]
#[error("the request body arrived too slowly (less than {min_bytes} bytes in {window_ms} ms)")]
pub struct BodyTooSlow {
    min_bytes: u64,
    window_ms: u128,
}

impl Stream for PacedBody {
    type Item = Result<Bytes, axum::Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_next(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                this.got += chunk.len() as u64;
                if this.got >= this.pace.min_bytes {
                    this.got = 0;
                    this.deadline.as_mut().reset(Instant::now() + this.pace.window);
                }
                Poll::Ready(Some(Ok(chunk)))
            }
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(axum::Error::new(BodyTooSlow {
                    min_bytes: this.pace.min_bytes,
                    window_ms: this.pace.window.as_millis(),
                })))),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}
