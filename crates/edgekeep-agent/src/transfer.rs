//! Streaming the archive to and from pre-signed URLs.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio_util::io::ReaderStream;

use crate::error::{Error, IoContext, Result};
use crate::runner::Backoff;

/// Strips the query, which contains the signature, from a pre-signed URL.
pub(crate) fn redact(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// How long a transfer keeps retrying after connection errors and 5xx
/// responses. The pre-signed URLs of a job stay valid for an hour, well past
/// this window.
pub(crate) const RETRY_WINDOW: Duration = Duration::from_secs(120);

/// A failed transfer attempt.
pub(crate) enum Failure {
    /// A connection error or a 5xx response: worth another attempt.
    Retryable(Error),
    /// Anything else, reported as it is.
    Final(Error),
}

/// Uploads `file` with one PUT, streamed from disk with its Content-Length.
/// A connection error or 5xx response starts the PUT again from the start
/// of the file, with backoff, for up to [`RETRY_WINDOW`]. `progress`
/// receives the bytes sent so far.
pub(crate) async fn upload(
    http: &reqwest::Client,
    url: &str,
    file: &Path,
    cancelled: Arc<AtomicBool>,
    progress: impl Fn(u64, u64) + Send + Sync + 'static,
) -> Result<()> {
    let progress: Arc<dyn Fn(u64, u64) + Send + Sync> = Arc::new(progress);
    with_retries("upload to", url, RETRY_WINDOW, &cancelled, || {
        upload_once(http, url, file, cancelled.clone(), progress.clone())
    })
    .await
}

async fn upload_once(
    http: &reqwest::Client,
    url: &str,
    file: &Path,
    cancelled: Arc<AtomicBool>,
    progress: Arc<dyn Fn(u64, u64) + Send + Sync>,
) -> Result<(), Failure> {
    let handle = tokio::fs::File::open(file)
        .await
        .at("opening", file)
        .map_err(Failure::Final)?;
    let size = handle
        .metadata()
        .await
        .at("reading", file)
        .map_err(Failure::Final)?
        .len();
    let mut sent = 0u64;
    let stream_cancelled = cancelled.clone();
    let stream = ReaderStream::with_capacity(handle, 256 * 1024).map(move |chunk| {
        if stream_cancelled.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("the job was cancelled"));
        }
        if let Ok(bytes) = &chunk {
            sent += bytes.len() as u64;
            progress(sent, size);
        }
        chunk
    });
    let sent = http
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await;
    if cancelled.load(Ordering::SeqCst) {
        return Err(Failure::Final(Error::Cancelled));
    }
    let response = sent.map_err(|e| send_failure("upload to", url, e))?;
    check_status(response, "upload to", url).await
}

/// Classifies an error of sending a request or reading its response.
fn send_failure(what: &str, url: &str, error: reqwest::Error) -> Failure {
    let retryable = !error.is_builder();
    let error = Error::Transfer(format!(
        "{what} {} failed: {}; check that the device reaches the storage endpoint",
        redact(url),
        error.without_url()
    ));
    if retryable {
        Failure::Retryable(error)
    } else {
        Failure::Final(error)
    }
}

/// Runs `attempt` until it succeeds, fails for good, the job is cancelled,
/// or the next retry would start after `window`. Retries wait 1 s, 2 s, 4 s
/// and so on up to 30 s, each shortened by up to 25 % at random.
pub(crate) async fn with_retries<F, Fut>(
    what: &str,
    url: &str,
    window: Duration,
    cancelled: &AtomicBool,
    mut attempt: F,
) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let started = Instant::now();
    let mut backoff = Backoff::default();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let err = match attempt().await {
            Ok(()) => return Ok(()),
            Err(Failure::Final(err)) => return Err(err),
            Err(Failure::Retryable(err)) => err,
        };
        if cancelled.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        let delay = backoff.next_delay();
        if started.elapsed() + delay > window {
            tracing::warn!(url = redact(url), attempts, error = %err, "{what} failed; giving up");
            return Err(Error::Transfer(format!(
                "{err} (gave up after {attempts} attempts in {} s)",
                started.elapsed().as_secs()
            )));
        }
        tracing::warn!(
            url = redact(url),
            attempt = attempts,
            retry_in_ms = delay.as_millis() as u64,
            error = %err,
            "{what} failed; retrying"
        );
        sleep_unless_cancelled(delay, cancelled).await;
    }
}

/// Sleeps for `delay`, waking every 100 ms to end early on cancellation.
async fn sleep_unless_cancelled(delay: Duration, cancelled: &AtomicBool) {
    let until = Instant::now() + delay;
    while !cancelled.load(Ordering::SeqCst) && Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        tokio::time::sleep(left.min(Duration::from_millis(100))).await;
    }
}

/// Turns a response other than 2xx into a failure that names the status;
/// 5xx is retryable.
async fn check_status(response: reqwest::Response, what: &str, url: &str) -> Result<(), Failure> {
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let body = response.text().await.unwrap_or_default();
    let excerpt: String = body.chars().take(300).collect();
    let error = Error::Transfer(format!(
        "{what} {} returned HTTP {status}: {excerpt}",
        redact(url)
    ));
    if status.is_server_error() {
        Err(Failure::Retryable(error))
    } else {
        Err(Failure::Final(error))
    }
}

/// Downloads `url` into `out`, checking that it is `size` bytes with SHA-256
/// `checksum`. A connection error or 5xx response starts the download again
/// from the start, with backoff, for up to [`RETRY_WINDOW`]. `progress`
/// receives the bytes received so far.
pub(crate) async fn download(
    http: &reqwest::Client,
    url: &str,
    out: &Path,
    size: u64,
    checksum: &str,
    cancelled: &AtomicBool,
    progress: impl Fn(u64, u64),
) -> Result<()> {
    let target = DownloadTarget {
        out,
        size,
        checksum,
    };
    with_retries("download from", url, RETRY_WINDOW, cancelled, || {
        download_once(http, url, &target, cancelled, &progress)
    })
    .await
}

/// The destination file of a download, with its expected size and SHA-256.
struct DownloadTarget<'a> {
    out: &'a Path,
    size: u64,
    checksum: &'a str,
}

async fn download_once(
    http: &reqwest::Client,
    url: &str,
    target: &DownloadTarget<'_>,
    cancelled: &AtomicBool,
    progress: &impl Fn(u64, u64),
) -> Result<(), Failure> {
    let (out, size) = (target.out, target.size);
    let response = http
        .get(url)
        .send()
        .await
        .map_err(|e| send_failure("download from", url, e))?;
    if !response.status().is_success() {
        return check_status(response, "download from", url).await;
    }

    // Stream to disk, hashing on the way, and stop at the first extra byte.
    let mut file = tokio::fs::File::create(out)
        .await
        .at("creating", out)
        .map_err(Failure::Final)?;
    let mut hasher = Sha256::new();
    let mut received = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        if cancelled.load(Ordering::SeqCst) {
            return Err(Failure::Final(Error::Cancelled));
        }
        let chunk = chunk.map_err(|e| send_failure("download from", url, e))?;
        received += chunk.len() as u64;
        if received > size {
            return Err(Failure::Final(Error::Transfer(format!(
                "download from {} is longer than the expected {size} bytes; the backup file \
                 changed in storage",
                redact(url)
            ))));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .at("writing", out)
            .map_err(Failure::Final)?;
        progress(received, size);
    }
    file.sync_all()
        .await
        .at("fsyncing", out)
        .map_err(Failure::Final)?;
    check_download(url, target, received, &hex::encode(hasher.finalize())).map_err(Failure::Final)
}

/// Checks the length and SHA-256 of a complete download.
fn check_download(
    url: &str,
    target: &DownloadTarget<'_>,
    received: u64,
    actual: &str,
) -> Result<()> {
    let (size, checksum) = (target.size, target.checksum);
    if received != size {
        return Err(Error::Transfer(format!(
            "download from {} ended after {received} of {size} bytes; the job fails and can be \
             started again",
            redact(url)
        )));
    }
    if !actual.eq_ignore_ascii_case(checksum) {
        return Err(Error::Transfer(format!(
            "downloaded file has SHA-256 {actual}, the server listed {checksum}; the backup \
             file changed in storage"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn retries_end_after_window() {
        let cancelled = AtomicBool::new(false);
        let mut attempts = 0;
        let started = Instant::now();
        let err = with_retries(
            "upload to",
            "http://127.0.0.1:9/x?sig=1",
            Duration::from_secs(2),
            &cancelled,
            || {
                attempts += 1;
                async {
                    Err(Failure::Retryable(Error::Transfer(
                        "connection refused".to_string(),
                    )))
                }
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(attempts, 2);
        assert!(err.contains("connection refused"), "{err}");
        assert!(err.contains("gave up after 2 attempts"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn final_failure_is_not_retried() {
        let cancelled = AtomicBool::new(false);
        let mut attempts = 0;
        let err = with_retries(
            "download from",
            "http://127.0.0.1:9/x",
            RETRY_WINDOW,
            &cancelled,
            || {
                attempts += 1;
                async { Err(Failure::Final(Error::Transfer("HTTP 403".to_string()))) }
            },
        )
        .await
        .unwrap_err()
        .to_string();
        assert_eq!(attempts, 1);
        assert_eq!(err, "HTTP 403");
    }
}
