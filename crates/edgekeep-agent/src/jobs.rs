//! Running one backup or restore job and reporting its progress.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgekeep_api::AgentClient;
use edgekeep_api::agent::{AgentJob, DeviceFacts, JobResult, ProgressReport};
use edgekeep_archive::SourceInfo;

use crate::config::AgentConfig;
use crate::error::{Error, Result};
use crate::fsutil::remove_any;
use crate::home::AgentHome;
use crate::pack::pack_state_for_job;
use crate::restore::{RestoreTarget, restore_archive};
use crate::transfer::{download, upload};

/// Everything a job needs, shared by the job loop and the job's tasks.
pub(crate) struct JobContext {
    pub client: AgentClient,
    pub http: reqwest::Client,
    pub config: AgentConfig,
    pub state_dir: PathBuf,
    pub home: AgentHome,
    pub device_uid: String,
    pub device_name: String,
    pub facts: DeviceFacts,
}

/// Runs `job` and returns the result to report.
pub(crate) async fn run_job(context: Arc<JobContext>, job: AgentJob) -> JobResult {
    let job_id = job.job_id();
    let reporter = ProgressReporter::start(context.client.clone(), job_id);
    let outcome = match job {
        AgentJob::Backup { upload_url, .. } => {
            tracing::info!(job_id, kind = "backup", "job started");
            run_backup(&context, job_id, &upload_url, &reporter).await
        }
        AgentJob::Restore {
            download_url,
            size,
            checksum,
            ..
        } => {
            tracing::info!(job_id, kind = "restore", size, "job started");
            run_restore(&context, job_id, &download_url, size, &checksum, &reporter).await
        }
    };
    reporter.stop();
    match outcome {
        Ok(result) => result,
        Err(err) => {
            tracing::warn!(job_id, error = %err, "job failed");
            JobResult {
                ok: false,
                reason: Some(err.to_string()),
                size: None,
                checksum: None,
            }
        }
    }
}

async fn run_backup(
    context: &Arc<JobContext>,
    job_id: i64,
    upload_url: &str,
    reporter: &ProgressReporter,
) -> Result<JobResult> {
    let out = context.home.archive_path(job_id);
    let result = pack_and_upload(context, job_id, upload_url, reporter, &out).await;
    let _ = remove_any(&out);
    result
}

async fn pack_and_upload(
    context: &Arc<JobContext>,
    job_id: i64,
    upload_url: &str,
    reporter: &ProgressReporter,
    out: &std::path::Path,
) -> Result<JobResult> {
    // Pack on a blocking thread: 0 to 0.5 of the progress.
    let summary = {
        let context = context.clone();
        let out = out.to_path_buf();
        let reporter = reporter.clone();
        tokio::task::spawn_blocking(move || {
            let source = SourceInfo {
                device_uid: context.device_uid.clone(),
                device_name: context.device_name.clone(),
                arch: context.facts.arch.clone(),
                platform_version: context.facts.platform_version.clone(),
                agent_version: context.facts.agent_version.clone(),
                hostname: context.facts.hostname.clone(),
            };
            let mut progress = |p: edgekeep_archive::Progress| {
                reporter.set(0.5 * fraction(p.done_bytes, p.total_bytes), "packing");
            };
            pack_state_for_job(
                &context.config,
                &context.state_dir,
                &source,
                context.home.dir(),
                &out,
                Some(job_id),
                &mut progress,
            )
        })
        .await
        .expect("the packing task does not panic")?
    };
    reporter.check_cancelled()?;

    // Upload: 0.5 to 1.0.
    let upload_reporter = reporter.clone();
    let cancelled = reporter.cancelled.clone();
    let uploaded = upload(
        &context.http,
        upload_url,
        out,
        cancelled,
        move |sent, total| {
            upload_reporter.set(0.5 + 0.5 * fraction(sent, total), "uploading");
        },
    )
    .await;
    reporter.check_cancelled()?;
    uploaded?;
    tracing::info!(job_id, size = summary.file_size, "backup uploaded");
    Ok(JobResult {
        ok: true,
        reason: None,
        size: Some(summary.file_size),
        checksum: Some(summary.sha256),
    })
}

async fn run_restore(
    context: &Arc<JobContext>,
    job_id: i64,
    download_url: &str,
    size: u64,
    checksum: &str,
    reporter: &ProgressReporter,
) -> Result<JobResult> {
    let archive = context.home.archive_path(job_id);
    let result = download_and_restore(
        context,
        job_id,
        download_url,
        size,
        checksum,
        reporter,
        &archive,
    )
    .await;
    let _ = remove_any(&archive);
    result
}

async fn download_and_restore(
    context: &Arc<JobContext>,
    job_id: i64,
    download_url: &str,
    size: u64,
    checksum: &str,
    reporter: &ProgressReporter,
    archive: &std::path::Path,
) -> Result<JobResult> {
    // Download: 0 to 0.5 of the progress.
    download(
        &context.http,
        download_url,
        archive,
        size,
        checksum,
        &reporter.cancelled,
        |received, total| {
            reporter.set(0.5 * fraction(received, total), "downloading");
        },
    )
    .await?;
    reporter.check_cancelled()?;

    // Verify, stage, swap and commit on a blocking thread.
    let context = context.clone();
    let archive = archive.to_path_buf();
    let reporter = reporter.clone();
    tokio::task::spawn_blocking(move || {
        let target = RestoreTarget {
            config: &context.config,
            state_dir: &context.state_dir,
            home: &context.home,
            device_uid: &context.device_uid,
            arch: &context.facts.arch,
            platform_version: &context.facts.platform_version,
        };
        let mut progress = |value: f64| reporter.set(value, "restoring");
        restore_archive(target, job_id, &archive, &reporter.cancelled, &mut progress)
    })
    .await
    .expect("the restore task does not panic")?;
    Ok(JobResult {
        ok: true,
        reason: None,
        size: None,
        checksum: None,
    })
}

fn fraction(done: u64, total: u64) -> f64 {
    if total == 0 {
        1.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    }
}

/// Maximum time between progress reports while a step reports no progress.
const CANCEL_CHECK_INTERVAL: Duration = Duration::from_secs(5);

/// Posts the latest progress at most once a second and raises `cancelled`
/// when the server replies that an operator cancelled the job.
#[derive(Clone)]
pub(crate) struct ProgressReporter {
    latest: Arc<Mutex<Option<(f64, &'static str)>>>,
    cancelled: Arc<AtomicBool>,
    stopped: Arc<AtomicBool>,
}

impl ProgressReporter {
    fn start(client: AgentClient, job_id: i64) -> Self {
        let reporter = ProgressReporter {
            latest: Arc::new(Mutex::new(Some((0.0, "started")))),
            cancelled: Arc::new(AtomicBool::new(false)),
            stopped: Arc::new(AtomicBool::new(false)),
        };
        let task = reporter.clone();
        tokio::spawn(async move { task.post_loop(client, job_id).await });
        reporter
    }

    fn set(&self, progress: f64, message: &'static str) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some((progress, message));
    }

    fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn check_cancelled(&self) -> Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    async fn post_loop(self, client: AgentClient, job_id: i64) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        let mut last = (0.0, "started");
        let mut last_sent: Option<tokio::time::Instant> = None;
        while !self.stopped.load(Ordering::SeqCst) {
            interval.tick().await;

            // Send new progress, or repeat the last one every few seconds so a
            // long step without progress still learns of a cancellation.
            let update = self.latest.lock().unwrap_or_else(|e| e.into_inner()).take();
            let repeat_due = last_sent.is_none_or(|sent| sent.elapsed() >= CANCEL_CHECK_INTERVAL);
            let (progress, message) = match update {
                Some(update) => update,
                None if repeat_due => last,
                None => continue,
            };
            last = (progress, message);
            last_sent = Some(tokio::time::Instant::now());
            let report = ProgressReport {
                progress,
                message: message.to_string(),
            };
            match client.report_progress(job_id, &report).await {
                Ok(reply) if reply.cancelled => {
                    tracing::info!(job_id, "the job was cancelled; stopping it");
                    self.cancelled.store(true, Ordering::SeqCst);
                }
                Ok(_) => failures = 0,
                Err(err) => {
                    // Progress is advisory; count failures and log the first.
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(job_id, error = %err, "reporting progress failed");
                    }
                }
            }
        }
    }
}
