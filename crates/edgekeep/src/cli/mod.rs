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

/// Where the server is, which token to use and how to print results.
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

/// Formats epoch milliseconds as UTC `YYYY-MM-DD HH:MM:SS`.
pub fn format_time(millis: i64) -> String {
    let secs = millis.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Converts days since 1970-01-01 to a proleptic Gregorian date (Howard
/// Hinnant's `civil_from_days` algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
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
        .map(|t| format!(" since {} UTC", format_time(t)))
        .unwrap_or_else(|| " and has never connected".to_string());
    eprintln!(
        "device {} ({}) is offline{since}; job {job_id} waits for it until {} UTC",
        device.id,
        device.name,
        format_time(job.expires_at)
    );
    Ok(())
}

/// Parses durations such as `90s`, `30m`, `24h` or `7d`.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("invalid duration {value:?}: expected a number and s, m, h or d"))?;
    let seconds = match unit {
        "" | "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        "d" => number * 86_400,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {value:?}: use s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_time_epoch_and_leap_day() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00");
        assert_eq!(format_time(1_796_400_000_123), "2026-12-04 16:00:00");
    }

    #[test]
    fn parse_duration_units() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Ok(Duration::from_secs(1800)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn format_bytes_units() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(3 * 1024 * 1024 * 1024), "3.0 GiB");
    }
}
