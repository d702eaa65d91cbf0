//! Streaming the archive to and from pre-signed URLs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use crate::error::{Error, IoContext, Result};

/// Strips the query, which contains the signature, from a pre-signed URL.
pub(crate) fn redact(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()
        .expect("the TLS backend initialises")
}

/// Uploads `file` with one PUT, streamed from disk with its Content-Length.
/// `progress` receives the bytes sent so far.
pub(crate) async fn upload(
    http: &reqwest::Client,
    url: &str,
    file: &Path,
    cancelled: Arc<AtomicBool>,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> Result<()> {
    let handle = tokio::fs::File::open(file).await.at("opening", file)?;
    let size = handle.metadata().await.at("reading", file)?.len();
    let mut sent = 0u64;
    let stream = ReaderStream::with_capacity(handle, 256 * 1024).map(move |chunk| {
        if cancelled.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the job was cancelled"));
        }
        if let Ok(bytes) = &chunk {
            sent += bytes.len() as u64;
            progress(sent, size);
        }
        chunk
    });
    let response = http
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .map_err(|e| {
            Error::Transfer(format!(
                "upload to {} failed: {}; check that the device reaches the storage endpoint",
                redact(url),
                e.without_url()
            ))
        })?;
    check_status(response, "upload to", url).await
}

async fn check_status(response: reqwest::Response, what: &str, url: &str) -> Result<()> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    let excerpt: String = body.chars().take(300).collect();
    Err(Error::Transfer(format!(
        "{what} {} returned HTTP {status}: {excerpt}",
        redact(url)
    )))
}

/// Downloads `url` into `out`, checking that it is `size` bytes with SHA-256
/// `checksum`. `progress` receives the bytes received so far.
pub(crate) async fn download(
    http: &reqwest::Client,
    url: &str,
    out: &Path,
    size: u64,
    checksum: &str,
    cancelled: &AtomicBool,
    progress: impl Fn(u64, u64),
) -> Result<()> {
    let transfer_err = |e: reqwest::Error| {
        Error::Transfer(format!(
            "download from {} failed: {}; check that the device reaches the storage endpoint",
            redact(url),
            e.without_url()
        ))
    };
    let response = http.get(url).send().await.map_err(transfer_err)?;
    if !response.status().is_success() {
        return check_status(response, "download from", url).await;
    }

    // Stream to disk, hashing on the way, and stop at the first extra byte.
    let mut file = tokio::fs::File::create(out).await.at("creating", out)?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        if cancelled.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        let chunk = chunk.map_err(transfer_err)?;
        received += chunk.len() as u64;
        if received > size {
            return Err(Error::Transfer(format!(
                "download from {} is longer than the expected {size} bytes; the backup file \
                 changed in storage",
                redact(url)
            )));
        }
        hasher.update(&chunk);
        file.write_all(&chunk).await.at("writing", out)?;
        progress(received, size);
    }
    file.sync_all().await.at("fsyncing", out)?;

    if received != size {
        return Err(Error::Transfer(format!(
            "download from {} ended after {received} of {size} bytes; the job fails and can be \
             started again",
            redact(url)
        )));
    }
    let actual = hex::encode(hasher.finalize());
    if !actual.eq_ignore_ascii_case(checksum) {
        return Err(Error::Transfer(format!(
            "downloaded file has SHA-256 {actual}, the server listed {checksum}; the backup \
             file changed in storage"
        )));
    }
    Ok(())
}
