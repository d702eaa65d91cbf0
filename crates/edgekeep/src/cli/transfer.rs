//! Downloads from and uploads to pre-signed URLs, with progress bars.

use std::path::Path;

use anyhow::Context;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::AsyncWriteExt;

fn byte_bar(total: Option<u64>, label: &str) -> ProgressBar {
    let bar = match total {
        Some(total) => ProgressBar::new(total),
        None => ProgressBar::new_spinner(),
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .expect("the template is valid")
        .progress_chars("=> "),
    );
    bar.set_prefix(label.to_string());
    bar
}

/// Strips the query, which carries the signature, from a URL for messages.
pub fn redact(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}

/// Downloads `url` to `out` with a plain GET (the URL carries its own
/// authorisation) and returns the number of bytes written. The file appears
/// under its name only once complete.
pub async fn download(url: &str, out: &Path, quiet: bool) -> anyhow::Result<u64> {
    let response = reqwest::get(url)
        .await
        .with_context(|| format!("GET {} failed", redact(url)))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!(
            "GET {} returned HTTP {status}: {}",
            redact(url),
            body.chars().take(300).collect::<String>()
        );
    }
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        byte_bar(response.content_length(), "download")
    };

    let partial = out.with_extension("partial");
    let mut file = tokio::fs::File::create(&partial)
        .await
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let mut written = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.with_context(|| format!("download of {} broke off", redact(url)))?;
        file.write_all(&chunk)
            .await
            .with_context(|| format!("cannot write {}", partial.display()))?;
        written += chunk.len() as u64;
        bar.set_position(written);
    }
    file.sync_all().await?;
    drop(file);
    tokio::fs::rename(&partial, out)
        .await
        .with_context(|| format!("cannot move the download to {}", out.display()))?;
    bar.finish_and_clear();
    Ok(written)
}

/// Streams `url` to standard output, for piping a backup into another tool.
pub async fn download_to_stdout(url: &str) -> anyhow::Result<u64> {
    let response = reqwest::get(url)
        .await
        .with_context(|| format!("GET {} failed", redact(url)))?;
    let status = response.status();
    if !status.is_success() {
        anyhow::bail!("GET {} returned HTTP {status}", redact(url));
    }
    // The CLI runs one task, so blocking writes to stdout hold up nothing.
    let mut stdout = std::io::stdout().lock();
    let mut written = 0u64;
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.with_context(|| format!("download of {} broke off", redact(url)))?;
        std::io::Write::write_all(&mut stdout, &chunk)?;
        written += chunk.len() as u64;
    }
    std::io::Write::flush(&mut stdout)?;
    Ok(written)
}

/// Uploads the file at `path` to `url` with one streamed PUT.
pub async fn upload(url: &str, path: &Path, quiet: bool) -> anyhow::Result<u64> {
    let file = tokio::fs::File::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let size = file.metadata().await?.len();
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        byte_bar(Some(size), "upload")
    };
    let progress = bar.clone();
    let stream =
        tokio_util::io::ReaderStream::with_capacity(file, 256 * 1024).inspect(move |chunk| {
            if let Ok(chunk) = chunk {
                progress.inc(chunk.len() as u64);
            }
        });
    let response = reqwest::Client::new()
        .put(url)
        .header(reqwest::header::CONTENT_LENGTH, size)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("PUT {} failed", redact(url)))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        anyhow::bail!(
            "PUT {} returned HTTP {status}: {}",
            redact(url),
            body.chars().take(300).collect::<String>()
        );
    }
    bar.finish_and_clear();
    Ok(size)
}
