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
    /// Starts writing a blob piece by piece, so an upload of many
    /// megabytes goes to the store as it arrives instead of into memory.
    /// Nothing is visible under `key` until [`BlobWriter::commit`].
    async fn writer(&self, key: &str) -> io::Result<Box<dyn BlobWriter>>;
    /// Removes every blob of a job.
    async fn delete_job(&self, job: &str) -> io::Result<()>;
    /// Removes jobs' blobs last written before `max_age` ago; returns how
    /// many jobs it removed.
    async fn sweep(&self, max_age: Duration) -> io::Result<usize>;
}

/// A blob being written; dropped without `commit`, it leaves nothing
/// behind under its key (a partial file may remain for the sweep).
#[async_trait]
pub trait BlobWriter: Send {
    async fn write(&mut self, chunk: &[u8]) -> io::Result<()>;
    /// Makes the blob visible under its key, whole.
    async fn commit(self: Box<Self>) -> io::Result<()>;
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

    async fn writer(&self, key: &str) -> io::Result<Box<dyn BlobWriter>> {
        let path = self.path(key)?;
        if let Some(dir) = path.parent() {
            tokio::fs::create_dir_all(dir).await?;
        }
        let tmp = path.with_extension(format!("tmp-{}", rand::random::<u64>()));
        let file = tokio::fs::File::create(&tmp).await?;
        Ok(Box::new(LocalBlobWriter {
            file: tokio::io::BufWriter::with_capacity(256 * 1024, file),
            tmp: Some(tmp),
            path,
        }))
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

/// Writes aside, renames on commit, removes the partial file if dropped.
struct LocalBlobWriter {
    file: tokio::io::BufWriter<tokio::fs::File>,
    tmp: Option<PathBuf>,
    path: PathBuf,
}

#[async_trait]
impl BlobWriter for LocalBlobWriter {
    async fn write(&mut self, chunk: &[u8]) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.write_all(chunk).await
    }

    async fn commit(mut self: Box<Self>) -> io::Result<()> {
        use tokio::io::AsyncWriteExt;
        self.file.flush().await?;
        let tmp = self.tmp.take().expect("committed once");
        tokio::fs::rename(&tmp, &self.path).await
    }
}

impl Drop for LocalBlobWriter {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            // An abandoned upload (refused, or its client gone): best effort,
            // the sweep removes what this misses.
            let _ = std::fs::remove_file(tmp);
        }
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

    #[tokio::test]
    async fn a_writer_shows_its_blob_only_once_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalBlobStore::new(dir.path()).unwrap();
        let mut w = store.writer("j2/0/original").await.unwrap();
        w.write(b"ab").await.unwrap();
        w.write(b"cd").await.unwrap();
        assert!(store.get("j2/0/original").await.is_err());
        w.commit().await.unwrap();
        assert_eq!(&store.get("j2/0/original").await.unwrap()[..], b"abcd");

        // Dropped without commit: no blob and no partial file left.
        let mut w = store.writer("j2/1/original").await.unwrap();
        w.write(b"xyz").await.unwrap();
        drop(w);
        assert!(store.get("j2/1/original").await.is_err());
        let left: Vec<_> = std::fs::read_dir(dir.path().join("j2/1")).unwrap().collect();
        assert!(left.is_empty(), "{left:?}");
        assert!(store.writer("../x").await.is_err());
    }
}
