//! The agent protocol: activation, the long poll, progress and results.

use std::sync::Arc;
use std::time::Duration;

use edgekeep_api::agent::{
    ActivateRequest, ActivateResponse, AgentJob, DeviceFacts, JobResult, ProgressReply,
    ProgressReport,
};
use edgekeep_api::{Device, JobKind, JobState};

use super::{MAX_WAIT_SECS, Manager};
use crate::auth::{CREDENTIAL_PREFIX, generate_secret, hash_secret};
use crate::error::{Error, Result};
use crate::objects::AGENT_URL_EXPIRY;
use crate::store::JobRecord;

/// Reason given to a running job whose device polls again without reporting.
const RESTARTED_REASON: &str = "the agent restarted while the job was running; \
     check the agent log on the device and run the job again";

/// Maximum length of a progress message, in characters; longer messages are
/// cut.
pub const MAX_PROGRESS_MESSAGE_CHARS: usize = 200;
/// Maximum length of each device fact, such as the hostname, in characters.
pub const MAX_FACT_CHARS: usize = 255;

/// Checks that every device fact fits in [`MAX_FACT_CHARS`].
fn check_facts(facts: &DeviceFacts) -> Result<()> {
    let fields = [
        ("arch", &facts.arch),
        ("platformVersion", &facts.platform_version),
        ("agentVersion", &facts.agent_version),
        ("hostname", &facts.hostname),
    ];
    for (name, value) in fields {
        let length = value.chars().count();
        if length > MAX_FACT_CHARS {
            return Err(Error::BadRequest(format!(
                "invalid device fact {name}: {length} characters, at most {MAX_FACT_CHARS} allowed"
            )));
        }
    }
    Ok(())
}

/// Closes the poll registration when the long poll ends or its request is
/// dropped, and marks the device seen at that moment.
struct PollGuard {
    manager: Arc<Manager>,
    device_id: i64,
}

impl Drop for PollGuard {
    fn drop(&mut self) {
        self.manager.close_poll(self.device_id);
        let store = self.manager.store.clone();
        let device_id = self.device_id;
        tokio::spawn(async move {
            if let Err(error) = store.record_poll(device_id, None, crate::now_ms()).await {
                tracing::warn!(device_id, error = %error, "failed to record the end of a poll");
            }
        });
    }
}

impl Manager {
    /// Trades a one-time activation code for a device credential.
    pub async fn activate(&self, request: &ActivateRequest) -> Result<ActivateResponse> {
        check_facts(&request.facts)?;
        let credential = generate_secret(CREDENTIAL_PREFIX);
        let device = self
            .store
            .activate_device(
                &hash_secret(&request.activation_code),
                &hash_secret(&credential),
                &request.facts,
                crate::now_ms(),
            )
            .await?
            .ok_or_else(|| {
                Error::Unauthorized(
                    "unknown, used or expired activation code; issue a new one with \
                     POST /api/v1/projects/{projectId}/devices/{deviceId}/activation-code"
                        .into(),
                )
            })?;
        tracing::info!(
            device_id = device.id,
            project_id = device.project_id,
            "activated device"
        );
        Ok(ActivateResponse {
            project_id: device.project_id,
            device_id: device.id,
            device_uid: device.uid,
            device_name: device.name,
            credential,
        })
    }

    /// Waits for the device's next job (the long poll) and returns it, or
    /// `None` once `wait_secs` (at most 60) pass without one.
    ///
    /// `last_received_job_id` is the last job the polling agent process
    /// received. The device's running jobs with a larger id never reached
    /// it, such as when the replica that handed one out died before the
    /// response left, so they are queued and handed out again. Its other
    /// running jobs, or all of them when the agent names no job, are failed,
    /// because the agent restarted or gave them up.
    pub async fn next_job(
        self: &Arc<Self>,
        device: &Device,
        facts: Option<&DeviceFacts>,
        wait_secs: u64,
        last_received_job_id: Option<i64>,
    ) -> Result<Option<AgentJob>> {
        if let Some(facts) = facts {
            check_facts(facts)?;
        }
        let now = crate::now_ms();
        self.store.record_poll(device.id, facts, now).await?;
        if let Some(last_received) = last_received_job_id {
            self.requeue_unreceived_jobs(device.id, last_received)
                .await?;
        }
        self.fail_interrupted_jobs(device.id, now).await?;

        let notify = self.open_poll(device.id);
        let _guard = PollGuard {
            manager: self.clone(),
            device_id: device.id,
        };
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(wait_secs.min(MAX_WAIT_SECS));
        loop {
            // Register for the wake-up before looking, so a job queued in
            // between is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            if let Some(job) = self.claim_job(device.id).await? {
                return Ok(Some(job));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    async fn requeue_unreceived_jobs(&self, device_id: i64, last_received: i64) -> Result<()> {
        let requeued = self
            .store
            .requeue_unreceived_jobs(device_id, last_received)
            .await?;
        for job_id in requeued {
            tracing::info!(
                job_id,
                device_id,
                last_received_job_id = last_received,
                "handing out a job again because its agent never received it"
            );
        }
        Ok(())
    }

    async fn fail_interrupted_jobs(&self, device_id: i64, now: i64) -> Result<()> {
        let failed = self
            .store
            .fail_running_jobs(device_id, RESTARTED_REASON, now)
            .await?;
        for job_id in failed {
            tracing::warn!(
                job_id,
                device_id,
                "failed a job because its agent restarted"
            );
            self.objects
                .delete_quietly(&super::backups::staging_key(job_id))
                .await;
        }
        Ok(())
    }

    /// Claims the oldest queued job and signs its URL. A job whose URL
    /// cannot be made fails, and the next one is tried.
    async fn claim_job(&self, device_id: i64) -> Result<Option<AgentJob>> {
        while let Some(record) = self
            .store
            .claim_next_job(device_id, crate::now_ms())
            .await?
        {
            let job_id = record.job.id;
            match self.agent_job(&record).await {
                Ok(job) => {
                    tracing::info!(
                        job_id,
                        device_id,
                        kind = record.job.kind.as_str(),
                        "handed job to device"
                    );
                    return Ok(Some(job));
                }
                Err(error) => {
                    let reason = format!("the server could not prepare the job: {error}");
                    tracing::warn!(job_id, device_id, %reason, "failed job at hand-out");
                    self.store
                        .finish_job(
                            job_id,
                            JobState::Running,
                            JobState::Failed,
                            Some(&reason),
                            crate::now_ms(),
                        )
                        .await?;
                }
            }
        }
        Ok(None)
    }

    async fn agent_job(&self, record: &JobRecord) -> Result<AgentJob> {
        let job = &record.job;
        let key = record
            .object_key
            .as_deref()
            .ok_or_else(|| Error::internal("job has no object key", job.id))?;
        match job.kind {
            JobKind::Backup => Ok(AgentJob::Backup {
                job_id: job.id,
                upload_url: self.objects.signed_put(key, AGENT_URL_EXPIRY).await?,
            }),
            JobKind::Restore => {
                let timestamp = job.timestamp.unwrap_or_default();
                let backup = self
                    .store
                    .backup(job.project_id, &job.backup_type, timestamp)
                    .await?
                    .ok_or_else(|| {
                        Error::NotFound(format!("backup {timestamp} is no longer listed"))
                    })?;
                // The archive's own device uid can be forged, so the identity
                // in it is trusted only for a backup this device made itself.
                let made_by = self.store.job(backup.backup.job_id).await?;
                let restore_identity = made_by.is_some_and(|made_by| {
                    made_by.job.kind == JobKind::Backup && made_by.job.device_id == job.device_id
                });
                Ok(AgentJob::Restore {
                    job_id: job.id,
                    download_url: self.objects.signed_get(key, AGENT_URL_EXPIRY).await?,
                    size: backup.backup.size,
                    checksum: backup.backup.checksum,
                    restore_identity,
                })
            }
            JobKind::Import => Err(Error::internal("import jobs run on the server", job.id)),
        }
    }

    /// Returns the job if it belongs to the device.
    async fn device_job(&self, device: &Device, job_id: i64) -> Result<JobRecord> {
        self.store
            .job(job_id)
            .await?
            .filter(|r| r.job.device_id == device.id && r.job.kind != JobKind::Import)
            .ok_or_else(|| {
                Error::NotFound(format!("job {job_id} not found for device {}", device.id))
            })
    }

    fn not_running(job_id: i64, state: JobState) -> Error {
        Error::Conflict(format!(
            "job {job_id} is {}, not running; poll for the next job",
            state.as_str()
        ))
    }

    pub async fn report_progress(
        &self,
        device: &Device,
        job_id: i64,
        report: &ProgressReport,
    ) -> Result<ProgressReply> {
        if !(report.progress.is_finite() && (0.0..=1.0).contains(&report.progress)) {
            return Err(Error::BadRequest(format!(
                "invalid progress {}: expected a number from 0 to 1",
                report.progress
            )));
        }
        let record = self.device_job(device, job_id).await?;
        match record.job.state {
            JobState::Cancelled => return Ok(ProgressReply { cancelled: true }),
            JobState::Running => {}
            other => return Err(Self::not_running(job_id, other)),
        }
        self.record_heartbeat(job_id).await?;
        let message: String = report
            .message
            .chars()
            .take(MAX_PROGRESS_MESSAGE_CHARS)
            .collect();
        self.store
            .update_progress(job_id, report.progress, &message)
            .await?;
        Ok(ProgressReply { cancelled: false })
    }

    /// Records a job's result. A successful backup is validated and listed
    /// before this returns; a failed validation fails the job.
    ///
    /// A report that repeats the recorded outcome (a success for a
    /// succeeded job, a failure for a failed one) is accepted again. An
    /// agent repeats its report on another replica when the first replica
    /// recorded it and died before it sent its response.
    pub async fn report_result(
        &self,
        device: &Device,
        job_id: i64,
        result: &JobResult,
    ) -> Result<()> {
        let record = self.device_job(device, job_id).await?;
        let is_backup = record.job.kind == JobKind::Backup;
        match record.job.state {
            JobState::Running => {}
            JobState::Cancelled => {
                if is_backup {
                    self.objects
                        .delete_quietly(&super::backups::staging_key(job_id))
                        .await;
                }
                return Ok(());
            }
            JobState::Succeeded if result.ok => {
                tracing::info!(
                    job_id,
                    device_id = device.id,
                    "repeated result report of a succeeded job"
                );
                return Ok(());
            }
            JobState::Failed if !result.ok => {
                tracing::info!(
                    job_id,
                    device_id = device.id,
                    "repeated result report of a failed job"
                );
                return Ok(());
            }
            other => return Err(Self::not_running(job_id, other)),
        }

        if !result.ok {
            let reason = result
                .reason
                .clone()
                .unwrap_or_else(|| "the agent reported a failure without a reason".to_string());
            self.fail_job(&record, &reason).await?;
            return Ok(());
        }
        if !is_backup {
            self.store
                .finish_job(
                    job_id,
                    JobState::Running,
                    JobState::Succeeded,
                    None,
                    crate::now_ms(),
                )
                .await?;
            tracing::info!(job_id, device_id = device.id, "restore succeeded");
            return Ok(());
        }
        let expected = match (result.size, &result.checksum) {
            (Some(size), Some(checksum)) => (size, checksum.to_lowercase()),
            _ => {
                let reason = "the agent reported success without the file size and checksum";
                self.fail_job(&record, reason).await?;
                return Ok(());
            }
        };
        self.accept_upload(&record, Some(expected), None).await
    }

    /// Fails a running job and deletes its uploaded object, if any. A job
    /// that has ended meanwhile, such as one whose repeated result report
    /// another request listed first, keeps its state and object.
    pub(crate) async fn fail_job(&self, record: &JobRecord, reason: &str) -> Result<()> {
        let job = &record.job;
        let failed = self
            .store
            .finish_job(
                job.id,
                JobState::Running,
                JobState::Failed,
                Some(reason),
                crate::now_ms(),
            )
            .await?;
        if !failed {
            tracing::info!(
                job_id = job.id,
                device_id = job.device_id,
                reason,
                "not failing the job: it has already ended"
            );
            return Ok(());
        }
        tracing::warn!(
            job_id = job.id,
            device_id = job.device_id,
            kind = job.kind.as_str(),
            reason,
            "job failed"
        );
        if job.kind != JobKind::Restore
            && let Some(key) = &record.object_key
        {
            self.objects.delete_quietly(key).await;
        }
        Ok(())
    }
}
