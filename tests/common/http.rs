//! The real API on a loopback port, for tests that speak HTTP to it.

use image_queue_api::{app, ApiConfig, AppState, Auth};
use image_queue_pipeline::JobStore;
use tokio_util::sync::CancellationToken;

use super::TestEnv;

pub const ADMIN_KEY: &str = "test-admin-key-0123456789";

pub struct Api {
    pub base: String,
    /// A key of vendor `vendor-a`.
    pub vendor_key: String,
    pub client: reqwest::Client,
    stop: CancellationToken,
}

impl Drop for Api {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Api {
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }
}

impl TestEnv {
    /// Serves the API (admin key [`ADMIN_KEY`]) until the returned value drops.
    pub async fn serve_api(&self) -> Api {
        let auth = Auth::new(self.pipeline.clone(), Some(ADMIN_KEY));
        let vendor_key = auth.add_vendor("vendor-a").await.expect("creating a vendor key");
        let state = AppState {
            jobs: JobStore::new(self.pipeline.clone(), 3600),
            blobs: self.pipeline.blobs.clone(),
            auth,
            config: ApiConfig::default(),
            media_dir: Some(self.media_dir()),
            progress: image_queue_api::events::ProgressHub::new(self.pipeline.clone()),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(async move {
            axum::serve(
                listener,
                app(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
            )
            .with_graceful_shutdown(async move { s.cancelled().await })
            .await
            .unwrap();
        });
        Api {
            base,
            vendor_key,
            client: reqwest::Client::new(),
            stop,
        }
    }
}

/// Waits until the API process at `addr` answers `GET /readyz` with 200.
pub async fn wait_ready(http: &reqwest::Client, addr: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !http
        .get(format!("http://{addr}/readyz"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(std::time::Instant::now() < deadline, "the API never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A JSON `GET` with a bearer key.
pub async fn get_json(http: &reqwest::Client, url: &str, key: &str) -> serde_json::Value {
    http.get(url)
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
