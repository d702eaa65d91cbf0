//! Server-side job work: validating and listing uploaded files, watching
//! for imports and expiring jobs that waited too long.

use std::sync::Arc;
use std::time::Duration;

use edgekeep_api::{Backup, Job, JobKind};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::service::Manager;
use crate::service::backups::backup_key;
use crate::store::{BackupRecord, JobRecord};

/// How often queued jobs are checked for expiry.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often pending imports are checked for their file.
const IMPORT_POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Returns the reason stored on a job that expires while queued.
pub fn expiry_reason(job: &Job) -> String {
    let at = crate::format_time(job.expires_at);
    match job.kind {
        JobKind::Import => format!(
            "no file arrived at uploads/{}.dat before the upload URL expired at {at}",
            job.id
        ),
        _ => format!(
            "device {} stayed offline until the job expired at {at}",
            job.device_id
        ),
    }
}

/// Why an uploaded file was not listed: the job's failure reason.
struct Rejected(String);

impl From<Error> for Rejected {
    fn from(error: Error) -> Self {
        Rejected(format!("the server could not list the file: {error}"))
    }
}

impl Manager {
    /// Validates a running job's uploaded object and lists it as a backup,
    /// or fails the job with the reason and deletes the object.
    ///
    /// `expected` is the size and SHA-256 the agent reported, if any.
    pub(crate) async fn accept_upload(
        &self,
        record: &JobRecord,
        expected: Option<(u64, String)>,
    ) -> Result<()> {
        match self.list_upload(record, expected).await {
            Ok(backup) => {
                tracing::info!(
                    job_id = record.job.id,
                    device_id = backup.device_id,
                    timestamp = backup.timestamp,
                    size = backup.size,
                    "listed backup"
                );
                Ok(())
            }
            Err(Rejected(reason)) => self.fail_job(record, &reason).await,
        }
    }

    async fn list_upload(
        &self,
        record: &JobRecord,
        expected: Option<(u64, String)>,
    ) -> Result<Backup, Rejected> {
        let job = &record.job;
        let key = record
            .object_key
            .as_deref()
            .ok_or_else(|| Error::internal("job has no object key", job.id))?;

        // Download and verify the whole file.
        let temp = tempfile::NamedTempFile::new_in(&self.temp_dir)
            .map_err(|e| Error::internal("failed to create a temporary file", e))?;
        self.objects.download(key, temp.path()).await?;
        let path = temp.path().to_path_buf();
        let verified =
            tokio::task::spawn_blocking(move || edgekeep_archive::verify(&path, &mut |_| {}))
                .await
                .map_err(|e| Error::internal("verification task failed", e))?
                .map_err(|e| {
                    let status = if job.kind == JobKind::Import {
                        "422 "
                    } else {
                        ""
                    };
                    Rejected(format!("{status}the uploaded file failed validation: {e}"))
                })?;
        drop(temp);
        if let Some((size, checksum)) = expected
            && (size != verified.file_size || checksum != verified.sha256)
        {
            return Err(Rejected(format!(
                "the agent reported {size} bytes with SHA-256 {checksum}, but the server \
                 received {} bytes with SHA-256 {}",
                verified.file_size, verified.sha256
            )));
        }

        // Pick the timestamp: the one given to `put`, or the project clock.
        let now = crate::now_ms();
        let timestamp = match job.timestamp.filter(|_| job.kind == JobKind::Import) {
            Some(timestamp) => {
                if self
                    .store
                    .backup(job.project_id, &job.backup_type, timestamp)
                    .await?
                    .is_some()
                {
                    return Err(Rejected(format!(
                        "timestamp {timestamp} was taken by another {} backup in project {} \
                         while the file was uploading; upload it again without a timestamp",
                        job.backup_type, job.project_id
                    )));
                }
                timestamp
            }
            None => self.store.next_timestamp(job.project_id, now).await?,
        };

        // Copy to the final key and list it.
        let source = &verified.manifest.source;
        let source_device_id = self
            .store
            .device_by_uid(job.project_id, &source.device_uid)
            .await?
            .map(|d| d.id);
        let final_key = backup_key(job.project_id, job.device_id, &job.backup_type, timestamp);
        let backup = Backup {
            timestamp,
            backup_type: job.backup_type.clone(),
            project_id: job.project_id,
            device_id: job.device_id,
            size: verified.file_size,
            checksum: verified.sha256.clone(),
            source_device_uid: source.device_uid.clone(),
            source_device_name: source.device_name.clone(),
            source_device_id,
            arch: source.arch.clone(),
            platform_version: source.platform_version.clone(),
            agent_version: source.agent_version.clone(),
            format_version: verified.manifest.format_version,
            entry_count: verified.manifest.entry_count(),
            state_size: verified.manifest.state_size(),
            job_id: job.id,
            created_at: now,
        };
        self.objects.copy(key, &final_key).await?;
        let listed = BackupRecord {
            backup: backup.clone(),
            object_key: final_key.clone(),
        };
        if let Err(error) = self.store.insert_backup(listed, now).await {
            self.objects.delete_quietly(&final_key).await;
            return Err(match error {
                Error::Conflict(message) => Rejected(message),
                other => other.into(),
            });
        }
        self.objects.delete_quietly(key).await;
        Ok(backup)
    }

    /// Checks every pending import once: an import whose file arrived is
    /// validated and listed.
    pub async fn check_imports(&self) -> Result<()> {
        for record in self.store.pending_imports().await? {
            let Some(key) = record.object_key.as_deref() else {
                continue;
            };
            if self.objects.head(key).await?.is_none() {
                continue;
            }
            if !self.store.start_job(record.job.id, crate::now_ms()).await? {
                continue;
            }
            tracing::info!(job_id = record.job.id, key, "validating imported file");
            self.accept_upload(&record, None).await?;
        }
        Ok(())
    }

    /// Expires queued jobs past their expiry and deletes stray uploads.
    pub async fn expire_jobs(&self) -> Result<()> {
        for record in self.store.expire_jobs(crate::now_ms()).await? {
            let job = &record.job;
            tracing::info!(
                job_id = job.id,
                device_id = job.device_id,
                kind = job.kind.as_str(),
                "job expired"
            );
            if job.kind == JobKind::Import
                && let Some(key) = &record.object_key
            {
                self.objects.delete_quietly(key).await;
            }
        }
        Ok(())
    }
}

/// Runs the expiry sweeper and the import watcher until `shutdown`.
pub fn spawn_background(
    manager: Arc<Manager>,
    shutdown: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let sweeper = {
        let manager = manager.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            every(SWEEP_INTERVAL, shutdown, || async {
                if let Err(error) = manager.expire_jobs().await {
                    tracing::warn!(error = %error, "job expiry sweep failed; retrying");
                }
            })
            .await
        })
    };
    let watcher = tokio::spawn(async move {
        every(IMPORT_POLL_INTERVAL, shutdown, || async {
            if let Err(error) = manager.check_imports().await {
                tracing::warn!(error = %error, "import check failed; retrying");
            }
        })
        .await
    });
    vec![sweeper, watcher]
}

async fn every<F, Fut>(interval: Duration, shutdown: CancellationToken, mut task: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticker.tick() => task().await,
        }
    }
}
