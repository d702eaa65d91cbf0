//! The CLI groups that drive the REST API.

pub mod backup;
pub mod device;
pub mod job;
pub mod project;
pub mod token;
pub mod transfer;

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use edgekeep_api::{Client, Job, JobKind, JobState};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// Server address, API token and output format shared by the CLI groups.
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Base URL of the edgekeep server.
    #[arg(
        long,
        env = "EDGEKEEP_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// API token sent as X-AuthToken.
    #[arg(long, env = "EDGEKEEP_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print results as JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Connection {
    pub fn client(&self) -> anyhow::Result<Client> {
        let token = self.token.as_deref().context(
            "no API token: pass --token or set EDGEKEEP_TOKEN to the token the server printed",
        )?;
        Ok(Client::new(&self.url, token))
    }

    /// Prints `value` as JSON with `--json`, else runs `human`.
    pub fn print<T: Serialize>(&self, value: &T, human: impl FnOnce(&T)) -> anyhow::Result<()> {
        if self.json {
            println!("{}", serde_json::to_string_pretty(value)?);
        } else {
            human(value);
        }
        Ok(())
    }
}

pub use edgekeep_server::config::parse_duration;

/// Formats epoch milliseconds as RFC 3339 UTC, such as `2026-12-04T16:00:00Z`.
pub fn format_time(millis: i64) -> String {
    edgekeep_server::format_time(millis)
}

pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Follows a job until it ends, with a progress bar on a terminal, and fails
/// unless it succeeded.
pub async fn follow_job(client: &Client, job_id: i64, timeout: Duration) -> anyhow::Result<Job> {
    warn_if_device_offline(client, job_id).await?;
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("job {prefix} [{bar:30}] {percent:>3}% {msg}")
            .expect("the template is valid")
            .progress_chars("=> "),
    );
    bar.set_prefix(job_id.to_string());
    let wait = client.wait_for_job(job_id, Duration::from_millis(500), |job| {
        bar.set_position((job.progress.clamp(0.0, 1.0) * 1000.0) as u64);
        let step = job.message.clone().unwrap_or_default();
        bar.set_message(format!("{} {step}", job.state.as_str()));
    });
    let job = match tokio::time::timeout(timeout, wait).await {
        Ok(job) => job?,
        Err(_) => {
            bar.abandon();
            anyhow::bail!(
                "job {job_id} did not finish within {}s; it keeps running, follow it with \
                 `edgekeep job wait {job_id}`",
                timeout.as_secs()
            );
        }
    };
    bar.finish_and_clear();
    if job.state != JobState::Succeeded {
        anyhow::bail!(
            "job {job_id} {}: {}",
            job.state.as_str(),
            job.reason.as_deref().unwrap_or("no reason recorded")
        );
    }
    Ok(job)
}

/// Tells the user when a queued device job waits for an offline device, so
/// `--wait` does not look stuck.
async fn warn_if_device_offline(client: &Client, job_id: i64) -> anyhow::Result<()> {
    let job = client.job(job_id).await?;
    if job.state != JobState::Queued || job.kind == JobKind::Import {
        return Ok(());
    }
    let device = client.device(job.project_id, job.device_id).await?;
    if device.online {
        return Ok(());
    }
    let since = device
        .last_seen_at
        .map(|t| format!(" since {}", format_time(t)))
        .unwrap_or_else(|| " and has never connected".to_string());
    eprintln!(
        "device {} ({}) is offline{since}; job {job_id} waits for it until {}",
        device.id,
        device.name,
        format_time(job.expires_at)
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_bytes_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
