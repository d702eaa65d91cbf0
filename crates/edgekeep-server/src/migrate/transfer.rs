//! Streams object files from the embedded bucket folder to the external S3
//! bucket and reads each one back to check its size and SHA-256.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::buffered::BufWriter;
use object_store::path::Path as ObjectPath;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;
use tokio_util::sync::CancellationToken;

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
    /// SHA-256 (lowercase hex) of the file: the listed one for a backup,
    /// which the source check compared with the file, and the file's own
    /// for an import file.
    pub sha256: String,
}

/// Uploads the file and checks both the file and the uploaded object
/// against the planned size and SHA-256. Returns the number of bytes
/// copied. When `cancel` fires, the upload is aborted and an error returned.
pub(super) async fn copy_and_verify(
    store: &Arc<dyn ObjectStore>,
    object: &ObjectCopy,
    cancel: &CancellationToken,
) -> anyhow::Result<u64> {
    let (size, sha256) = upload(store, object, cancel).await?;
    anyhow::ensure!(
        size == object.size && sha256 == object.sha256,
        "the source file {} of {} changed during the copy: it now has {size} bytes with \
         SHA-256 {sha256}, but {} bytes with SHA-256 {} were checked; make sure nothing writes \
         to the data folder, then run the migration again. Nothing was committed",
        object.path.display(),
        object.owner,
        object.size,
        object.sha256
    );
    let expected = &object.sha256;

    let (stored_size, stored_sha256) = tokio::select! {
        digest = digest(store, &object.key) => digest?,
        () = cancel.cancelled() => anyhow::bail!(interrupted(object)),
    };
    anyhow::ensure!(
        stored_size == object.size && stored_sha256 == *expected,
        "the copy of {} at {} reads back as {stored_size} bytes with SHA-256 {stored_sha256}, \
         but {} bytes with SHA-256 {expected} were expected; check the S3 service, nothing was \
         committed",
        object.owner,
        object.key,
        object.size
    );
    Ok(size)
}

fn interrupted(object: &ObjectCopy) -> String {
    format!(
        "the migration was interrupted by a signal while it copied {} to {}",
        object.owner, object.key
    )
}

/// Streams the file to the object and returns its size and SHA-256.
async fn upload(
    store: &Arc<dyn ObjectStore>,
    object: &ObjectCopy,
    cancel: &CancellationToken,
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
    loop {
        let chunk = tokio::select! {
            chunk = chunks.next() => chunk,
            () = cancel.cancelled() => {
                abort(&mut writer, object).await;
                anyhow::bail!(interrupted(object));
            }
        };
        let Some(chunk) = chunk else {
            break;
        };
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
            abort(&mut writer, object).await;
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

/// Aborts the upload, which removes the parts of a multipart upload
/// already sent; a failure is logged, because the caller reports its own.
async fn abort(writer: &mut BufWriter, object: &ObjectCopy) {
    if let Err(error) = writer.abort().await {
        tracing::warn!(key = object.key, error = %error, "failed to abort the upload");
    }
}

/// Reads the object back and returns its size and SHA-256.
pub(super) async fn digest(
    store: &Arc<dyn ObjectStore>,
    key: &str,
) -> anyhow::Result<(u64, String)> {
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

/// Reads a source file in chunks and returns its size and SHA-256, without
/// holding the whole file in memory.
pub(super) async fn file_digest(path: &Path) -> std::io::Result<(u64, String)> {
    let file = tokio::fs::File::open(path).await?;
    let mut chunks = ReaderStream::with_capacity(file, READ_CHUNK);
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk?;
        hasher.update(&chunk);
        size += chunk.len() as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}
