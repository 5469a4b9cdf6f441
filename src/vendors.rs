//! `image-queue vendors`: vendors' API keys, weights and webhooks.

use anyhow::{bail, Context};
use image_queue_api::Auth;
use image_queue_pipeline::webhooks::Webhooks;
use image_queue_pipeline::JobStore;

use crate::cli::VendorAction;
use crate::config::Config;

pub async fn command(config: &Config, action: VendorAction) -> anyhow::Result<()> {
    let p = crate::compose::connect(config).await?;
    let auth = Auth::new(p.clone(), None);
    match action {
        VendorAction::Add { vendor, weight } => {
            let key = auth.add_vendor(&vendor).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            if let Some(w) = weight {
                JobStore::new(p, config.job_retention_secs)
                    .set_weight(&vendor, w)
                    .await?;
            }
            println!("{key}");
        }
        VendorAction::List => {
            for (v, n) in auth.list_vendors().await.map_err(|e| anyhow::anyhow!("{e}"))? {
                println!("{v}\t{n} key(s)");
            }
        }
        VendorAction::Revoke { vendor } => {
            let n = auth.revoke_vendor(&vendor).await.map_err(|e| anyhow::anyhow!("{e}"))?;
            eprintln!("revoked {n} key(s) of {vendor}");
        }
        VendorAction::Webhook { vendor, url, remove } => {
            let hooks = Webhooks::new(p);
            if remove {
                let had = hooks.remove(&vendor).await?;
                eprintln!("{}", if had { "webhook removed" } else { "no webhook was set" });
            } else {
                let url = url.expect("clap requires it");
                let parsed = url::Url::parse(&url).with_context(|| format!("webhook URL {url:?}"))?;
                if !matches!(parsed.scheme(), "http" | "https") {
                    bail!("webhook URLs must be http or https");
                }
                println!("{}", hooks.set(&vendor, &url).await?);
            }
        }
    }
    Ok(())
}
