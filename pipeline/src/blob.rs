//! Where image bytes live between stages.
//!
//! Stream entries carry blob keys, never bytes. A blob key is
//! `<job>/<image>/<name>`; all of a job's blobs are removed together when it
//! ends, and a sweep removes whatever a crash left behind after a TTL. The
//! local store suits one host; several hosts need a shared directory (or an
//! object store behind the same trait).

use std::io;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

#[async_trait]
pub trait BlobStore: Send + Sync + 'static {
    async fn put(&self, key: &str, bytes: Bytes) -> io::Result<()>;
    async fn get(&self, key: &str) -> io::Result<Bytes>;
    /// Removes every blob of a job.
    async fn delete_job(&self, job: &str) -> io::Result<()>;
    /// Removes jobs' blobs last written before `max_age` ago; returns how
    /// many jobs it removed.
    async fn sweep(&self, max_age: Duration) -> io::Result<usize>;
}

/// The blob key of a job's image's named blob.
pub fn blob_key(job: &str, image: u32, name: &str) -> String {
    format!("{job}/{image}/{name}")
}

/// Blobs as files under a directory.
#[derive(Debug, Clone)]
pub struct LocalBlobStore {
    root: PathBuf,
}

impl LocalBlobStore {
    pub fn new(root: impl Into<PathBuf>) -> io::Result<Self> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(LocalBlobStore { root })
    }

    fn path(&self, key: &str) -> io::Result<PathBuf> {
        let rel = Path::new(key);
        // Keys come from our own events, but a key is a path: refuse anything
        // that could step outside the root.
        if key.is_empty() || rel.components().any(|c| !matches!(c, Component::Normal(_))) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid blob key {key:?}"),
            ));
        }
        Ok(self.root.join(rel))
    }
}

#[async_trait]
impl BlobStore for LocalBlobStore {
    async fn put(&self, key: &str, bytes: Bytes) -> io::Result<()> {
        let path = self.path(key)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        // Write aside and rename, so a reader never sees half a blob.
        let tmp = path.with_extension(format!("tmp-{}", rand::random::<u64>()));
        tokio::fs::write(&tmp, &bytes).await?;
        tokio::fs::rename(&tmp, &path).await
    }

    async fn get(&self, key: &str) -> io::Result<Bytes> {
        Ok(Bytes::from(tokio::fs::read(self.path(key)?).await?))
    }

    async fn delete_job(&self, job: &str) -> io::Result<()> {
        match tokio::fs::remove_dir_all(self.path(job)?).await {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    async fn sweep(&self, max_age: Duration) -> io::Result<usize> {
        let mut removed = 0;
        let cutoff = SystemTime::now() - max_age;
        let mut dir = tokio::fs::read_dir(&self.root).await?;
        while let Some(entry) = dir.next_entry().await? {
            let modified = entry.metadata().await?.modified()?;
            if modified < cutoff {
                tokio::fs::remove_dir_all(entry.path()).await.ok();
                removed += 1;
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete_and_refuse_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path()).unwrap();
        store.put("j1/0/original", Bytes::from_static(b"abc")).await.unwrap();
        assert_eq!(&store.get("j1/0/original").await.unwrap()[..], b"abc");
        assert!(store.get("../etc/passwd").await.is_err());
        assert!(store.put("/abs", Bytes::new()).await.is_err());
        store.delete_job("j1").await.unwrap();
        assert!(store.get("j1/0/original").await.is_err());
    }
}
