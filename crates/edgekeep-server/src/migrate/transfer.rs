//! Streams object files from the embedded bucket folder to the external S3
//! bucket and reads each one back to check its size and SHA-256.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

/// Bytes read from a source file at a time.
const READ_CHUNK: usize = 1 << 20;
/// Parts of one multipart upload in flight at a time. With the 10 MiB parts
/// of `BufWriter` this keeps at most about 40 MiB in memory.
const UPLOAD_CONCURRENCY: usize = 4;

/// An object to copy: its key, the source file and what the file must be.
#[derive(Debug, Clone)]
pub(super) struct ObjectCopy {
    pub key: String,
    pub path: PathBuf,
    /// Description of the row that refers to the object, for messages.
    pub owner: String,
    pub size: u64,
    /// The SHA-256 (lowercase hex) listed for a backup; `None` for an
    /// import file, which is checked against its source file instead.
    pub checksum: Option<String>,
}

/// Uploads the file and checks both the file and the uploaded object
/// against the listing. Returns the number of bytes copied.
pub(super) async fn copy_and_verify(
    store: &Arc<dyn ObjectStore>,
    object: &ObjectCopy,
) -> anyhow::Result<u64> {
    let (size, sha256) = upload(store, object).await?;
    anyhow::ensure!(
        size == object.size,
        "the source file {} of {} has {size} bytes, but {} are listed; the source \
         installation is damaged, nothing was committed",
        object.path.display(),
        object.owner,
        object.size
    );
    let expected = object.checksum.as_deref().unwrap_or(&sha256);
    anyhow::ensure!(
        sha256 == expected,
        "the source file {} of {} has SHA-256 {sha256}, but {expected} is listed; the source \
         installation is damaged, nothing was committed",
        object.path.display(),
        object.owner
    );

    let (stored_size, stored_sha256) = digest(store, &object.key).await?;
    anyhow::ensure!(
        stored_size == object.size && stored_sha256 == expected,
        "the copy of {} at {} reads back as {stored_size} bytes with SHA-256 {stored_sha256}, \
         but {} bytes with SHA-256 {expected} were expected; check the S3 service, nothing was \
         committed",
        object.owner,
        object.key,
        object.size
    );
    Ok(size)
}

/// Streams the file to the object and returns its size and SHA-256.
async fn upload(
    store: &Arc<dyn ObjectStore>,
    object: &ObjectCopy,
) -> anyhow::Result<(u64, String)> {
    let file = tokio::fs::File::open(&object.path).await.with_context(|| {
        format!(
            "failed to open {} of {}",
            object.path.display(),
            object.owner
        )
    })?;
    let mut chunks = ReaderStream::with_capacity(file, READ_CHUNK);
    let mut writer = BufWriter::new(store.clone(), ObjectPath::from(object.key.as_str()))
        .with_max_concurrency(UPLOAD_CONCURRENCY);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = chunks.next().await {
        let result = match chunk {
            Ok(chunk) => {
                hasher.update(&chunk);
                size += chunk.len() as u64;
                writer.put(chunk).await.map_err(anyhow::Error::from)
            }
            Err(error) => Err(anyhow::Error::from(error)
                .context(format!("failed to read {}", object.path.display()))),
        };
        if let Err(error) = result {
            // Abort removes the parts of a multipart upload already sent.
            if let Err(abort) = writer.abort().await {
                tracing::warn!(key = object.key, error = %abort, "failed to abort the upload");
            }
            return Err(error.context(format!("failed to copy {} to {}", object.owner, object.key)));
        }
    }
    writer.shutdown().await.with_context(|| {
        format!(
            "failed to complete the upload of {} to {}",
            object.owner, object.key
        )
    })?;
    Ok((size, hex::encode(hasher.finalize())))
}

/// Reads the object back and returns its size and SHA-256.
async fn digest(store: &Arc<dyn ObjectStore>, key: &str) -> anyhow::Result<(u64, String)> {
    let result = store
        .get(&ObjectPath::from(key))
        .await
        .with_context(|| format!("failed to read back the copied object {key}"))?;
    let mut stream = result.into_stream();
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.with_context(|| format!("failed to read back the copied object {key}"))?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}
