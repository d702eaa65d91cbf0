//! Running one backup or restore job and reporting its progress.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgekeep_api::agent::{AgentJob, DeviceFacts, JobResult, ProgressReport};
use edgekeep_api::{AgentClient, AgentTimeouts};
use edgekeep_archive::SourceInfo;
use tokio::sync::watch;

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

/// Runs `job` and returns the result to report. The progress reporter has
/// stopped, with no post in flight, when this returns, so no progress
/// reaches the server after the result.
pub(crate) async fn run_job(context: Arc<JobContext>, job: AgentJob) -> JobResult {
    let job_id = job.job_id();
    let (reporter, reporter_task) = ProgressReporter::start(context.client.clone(), job_id);
    let outcome = match job {
        AgentJob::Backup { upload_url, .. } => {
            tracing::info!(job_id, kind = "backup", "job started");
            run_backup(&context, job_id, &upload_url, &reporter).await
        }
        AgentJob::Restore {
            download_url,
            size,
            checksum,
            restore_identity,
            ..
        } => {
            tracing::info!(
                job_id,
                kind = "restore",
                size,
                restore_identity,
                "job started"
            );
            let job = RestoreJob {
                download_url,
                size,
                checksum,
                restore_identity,
            };
            run_restore(&context, job_id, &job, &reporter).await
        }
    };
    reporter_task.stop().await;
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

/// The parameters of a restore job.
struct RestoreJob {
    download_url: String,
    size: u64,
    checksum: String,
    /// Whether the server marked the backup as this device's own.
    restore_identity: bool,
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
    let packed = {
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

    // Upload: 0.5 to 1.0. The operator sees the entries left out of the
    // backup in every later progress message.
    let upload_message = match packed.skipped_note() {
        Some(note) => format!("uploading; {note}"),
        None => "uploading".to_string(),
    };
    reporter.set(0.5, upload_message.clone());
    let upload_reporter = reporter.clone();
    let cancelled = reporter.cancelled.clone();
    let uploaded = upload(
        &context.http,
        upload_url,
        out,
        cancelled,
        move |sent, total| {
            upload_reporter.set(0.5 + 0.5 * fraction(sent, total), upload_message.clone());
        },
    )
    .await;
    reporter.check_cancelled()?;
    uploaded?;
    let summary = packed.summary;
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
    job: &RestoreJob,
    reporter: &ProgressReporter,
) -> Result<JobResult> {
    let archive = context.home.archive_path(job_id);
    let result = download_and_restore(context, job_id, job, reporter, &archive).await;
    let _ = remove_any(&archive);
    result
}

async fn download_and_restore(
    context: &Arc<JobContext>,
    job_id: i64,
    job: &RestoreJob,
    reporter: &ProgressReporter,
    archive: &std::path::Path,
) -> Result<JobResult> {
    // Download: 0 to 0.5 of the progress.
    download(
        &context.http,
        &job.download_url,
        archive,
        job.size,
        &job.checksum,
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
    let restore_identity = job.restore_identity;
    tokio::task::spawn_blocking(move || {
        let target = RestoreTarget {
            config: &context.config,
            state_dir: &context.state_dir,
            home: &context.home,
            device_uid: &context.device_uid,
            restore_identity,
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

/// Maximum time of the last post after the job ended, which delays the result.
/// Other posts are bounded by the client's progress timeout. A post that
/// times out is dropped, the server may still record it, and the client
/// moves on to the next server.
const FINAL_POST_TIMEOUT: Duration = Duration::from_secs(5);

/// Posts the latest progress at most once a second and raises `cancelled`
/// when the server replies that an operator cancelled the job.
#[derive(Clone)]
pub(crate) struct ProgressReporter {
    latest: Arc<Mutex<Option<(f64, String)>>>,
    cancelled: Arc<AtomicBool>,
}

/// The task that posts progress; [`ReporterTask::stop`] ends it.
pub(crate) struct ReporterTask {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl ReporterTask {
    /// Stops the reporter after it posted the newest progress, and waits
    /// until that post has its reply, so a result sent after this is the
    /// job's last message.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(true);
        if let Err(err) = self.task.await {
            tracing::warn!(error = %err, "the progress task ended abnormally");
        }
    }
}

impl ProgressReporter {
    fn start(client: AgentClient, job_id: i64) -> (Self, ReporterTask) {
        let reporter = ProgressReporter {
            latest: Arc::new(Mutex::new(Some((0.0, "started".to_string())))),
            cancelled: Arc::new(AtomicBool::new(false)),
        };
        let (stop, stopped) = watch::channel(false);
        let poster = reporter.clone();
        let task = tokio::spawn(async move { poster.post_loop(client, job_id, stopped).await });
        (reporter, ReporterTask { stop, task })
    }

    fn set(&self, progress: f64, message: impl Into<String>) {
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some((progress, message.into()));
    }

    fn check_cancelled(&self) -> Result<()> {
        if self.cancelled.load(Ordering::SeqCst) {
            return Err(Error::Cancelled);
        }
        Ok(())
    }

    async fn post_loop(self, client: AgentClient, job_id: i64, mut stopped: watch::Receiver<bool>) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The final post shares the server list with `client`, so its
        // timeout moves the job's result on to the next server too.
        let final_timeouts = AgentTimeouts {
            progress: client.timeouts().progress.min(FINAL_POST_TIMEOUT),
            ..client.timeouts()
        };
        let final_client = client.clone().with_timeouts(final_timeouts);
        let mut failures = 0u32;
        let mut last = (0.0, "started".to_string());
        let mut last_sent: Option<tokio::time::Instant> = None;
        loop {
            // Only the wait is cut short by a stop; a post runs to its reply.
            let stopping = tokio::select! {
                biased;
                _ = stopped.wait_for(|stop| *stop) => true,
                _ = interval.tick() => false,
            };

            // Send new progress, or repeat the last one every few seconds so a
            // long step without progress still learns of a cancellation. A
            // stop sends the newest progress once more, so a job shorter than
            // a second still leaves its last message.
            let update = self.latest.lock().unwrap_or_else(|e| e.into_inner()).take();
            let repeat_due = last_sent.is_none_or(|sent| sent.elapsed() >= CANCEL_CHECK_INTERVAL);
            let (progress, message) = match update {
                Some(update) => update,
                None if stopping => return,
                None if repeat_due => last.clone(),
                None => continue,
            };
            last = (progress, message.clone());
            last_sent = Some(tokio::time::Instant::now());
            let report = ProgressReport { progress, message };
            let poster = if stopping { &final_client } else { &client };
            match poster.report_progress(job_id, &report).await {
                Ok(reply) if reply.cancelled => {
                    tracing::info!(job_id, "the job was cancelled; stopping it");
                    self.cancelled.store(true, Ordering::SeqCst);
                }
                Ok(_) => failures = 0,
                Err(err) => {
                    // Progress is advisory; count failures and log the first.
                    failures += 1;
                    if failures == 1 {
                        tracing::warn!(
                            job_id,
                            error = %err,
                            next_server = client.base_url(),
                            "reporting progress failed"
                        );
                    }
                }
            }
            if stopping {
                return;
            }
        }
    }
}
