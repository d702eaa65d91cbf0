//! Server-side job work: validating and listing uploaded files, watching
//! for imports and expiring jobs that waited too long.

use std::sync::Arc;
use std::time::Duration;

use edgekeep_api::{Backup, Job, JobKind, JobState};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::service::Manager;
use crate::service::backups::backup_key;
use crate::store::{BackupRecord, JobRecord};

/// How often queued jobs are checked for expiry.
const SWEEP_INTERVAL: Duration = Duration::from_secs(5);
/// How often pending imports are checked for their file.
const IMPORT_POLL_INTERVAL: Duration = Duration::from_secs(1);
/// How often `uploads/` and `staging/` are swept for objects of ended jobs.
const STRAY_SWEEP_INTERVAL: Duration = Duration::from_secs(30);
/// Age below which the sweep keeps an object of an ended or unknown job,
/// so an upload that races with its job's start is not deleted.
pub const STRAY_OBJECT_GRACE: Duration = Duration::from_secs(60);

/// How often `backups/` is swept for copies that no backup lists. Such a
/// copy is left when a replica stops between copying a verified upload to
/// its final key and listing it. The sweep lists every backup's key, so it
/// runs less often than the upload sweep.
const BACKUP_COPY_SWEEP_INTERVAL: Duration = Duration::from_secs(600);

/// Returns the job id in a listed backup's key,
/// `backups/{projectId}/{deviceId}/{backupType}/{timestamp}-{jobId}.dat`.
fn backup_copy_job_id(key: &str) -> Option<i64> {
    let name = key.strip_prefix("backups/")?.rsplit('/').next()?;
    let (_timestamp, job_id) = name.strip_suffix(".dat")?.split_once('-')?;
    job_id.parse().ok()
}

/// Returns the job id in an upload key: `uploads/{id}.dat` or
/// `staging/jobs/{id}.dat`.
fn upload_job_id(key: &str) -> Option<i64> {
    key.strip_prefix("uploads/")
        .or_else(|| key.strip_prefix("staging/jobs/"))?
        .strip_suffix(".dat")?
        .parse()
        .ok()
}

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
        match error {
            // Internal errors can name server paths, so they stay in the log.
            Error::Internal(error) => {
                tracing::error!(
                    error = format!("{error:#}"),
                    "failed to list an uploaded file"
                );
                Rejected(
                    "the server could not list the file because of an internal error; the \
                     server log has the details"
                        .to_string(),
                )
            }
            other => Rejected(format!("the server could not list the file: {other}")),
        }
    }
}

impl Manager {
    /// Validates a running job's uploaded object and lists it as a backup,
    /// or fails the job with the reason and deletes the object.
    ///
    /// `expected` is the size and SHA-256 the agent reported, if any.
    /// `lease_owner` is the lease under which this replica claimed an
    /// import. When the lease is no longer this replica's by the time the
    /// file has verified, this replica leaves the job alone.
    pub(crate) async fn accept_upload(
        &self,
        record: &JobRecord,
        expected: Option<(u64, String)>,
        lease_owner: Option<&str>,
    ) -> Result<()> {
        let job_id = record.job.id;
        let validation = self.start_validating(job_id, lease_owner);
        let verified = self.verify_upload(record, expected).await;

        // A replica that paused for longer than the heartbeat timeout may
        // have lost the import to another replica meanwhile.
        if !validation.still_held().await? {
            tracing::warn!(
                job_id,
                "another replica took over the validation of this import; leaving it to that replica"
            );
            return Ok(());
        }
        let listed = match verified {
            Ok(verified) => self.list_verified(record, verified).await,
            Err(rejected) => Err(rejected),
        };
        match listed {
            Ok(backup) => {
                tracing::info!(
                    job_id,
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

    /// Checks the size of the job's uploaded object, downloads it, verifies
    /// it completely and checks it against the agent's report and the
    /// device's identity.
    async fn verify_upload(
        &self,
        record: &JobRecord,
        expected: Option<(u64, String)>,
    ) -> Result<edgekeep_archive::Verified, Rejected> {
        let job = &record.job;
        let key = record
            .object_key
            .as_deref()
            .ok_or_else(|| Error::internal("job has no object key", job.id))?;

        // Check the size before downloading anything.
        let size = self.objects.head(key).await?.ok_or_else(|| {
            Rejected(format!(
                "no file arrived at {key}; upload the file before reporting the job"
            ))
        })?;
        if size > self.max_backup_size {
            return Err(Rejected(format!(
                "the uploaded file is {size} bytes, larger than the maximum backup size of {} \
                 bytes; raise --max-backup-size or make the backup smaller",
                self.max_backup_size
            )));
        }

        // Download and verify the whole file.
        let temp = tempfile::NamedTempFile::new_in(&self.temp_dir)
            .map_err(|e| Error::internal("failed to create a temporary file", e))?;
        self.objects.download(key, temp.path()).await?;
        let path = temp.path().to_path_buf();
        let temp_path = path.display().to_string();
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
                    // The reason reaches API clients, so the server's
                    // temporary path is replaced.
                    let error = e.to_string().replace(&temp_path, "the uploaded file");
                    Rejected(format!(
                        "{status}the uploaded file failed validation: {error}"
                    ))
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

        // A device's own backup must name that device as its source, or a
        // device could list state under another device's identity.
        let source = &verified.manifest.source;
        if job.kind == JobKind::Backup {
            let device = self
                .store
                .device(job.project_id, job.device_id)
                .await?
                .ok_or_else(|| {
                    Error::internal("device of a running job not found", job.device_id)
                })?;
            if source.device_uid != device.uid {
                return Err(Rejected(format!(
                    "the archive names another device (uid {}) as its source, but device {} \
                     (uid {}) uploaded it; a backup job accepts only the device's own state",
                    source.device_uid, device.id, device.uid
                )));
            }
        }
        Ok(verified)
    }

    /// Picks the backup's timestamp, copies the verified object to its final
    /// key and lists it, which also marks the job succeeded. Only one call
    /// lists a job's backup: the store lists it only while the job runs.
    async fn list_verified(
        &self,
        record: &JobRecord,
        verified: edgekeep_archive::Verified,
    ) -> Result<Backup, Rejected> {
        let job = &record.job;
        let key = record
            .object_key
            .as_deref()
            .ok_or_else(|| Error::internal("job has no object key", job.id))?;

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
        let final_key = backup_key(
            job.project_id,
            job.device_id,
            &job.backup_type,
            timestamp,
            job.id,
        );
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
    /// claimed under a new lease, validated and listed. An import that
    /// another replica claimed first is skipped.
    pub async fn check_imports(&self) -> Result<()> {
        for record in self.store.pending_imports().await? {
            let Some(key) = record.object_key.as_deref() else {
                continue;
            };
            if self.objects.head(key).await?.is_none() {
                continue;
            }
            let lease_owner = self.new_lease_owner();
            let claimed = self
                .store
                .claim_import(record.job.id, &lease_owner, crate::now_ms())
                .await?;
            if !claimed {
                continue;
            }
            tracing::info!(
                job_id = record.job.id,
                key,
                lease_owner,
                "validating imported file"
            );
            self.accept_upload(&record, None, Some(&lease_owner))
                .await?;
        }
        Ok(())
    }

    /// Deletes every object under `uploads/` and `staging/` whose job is
    /// final or unknown and that is older than `grace`, so a file PUT to a
    /// URL after its job ended does not stay. With the embedded S3 store,
    /// also removes the side files of deleted objects. Returns how many
    /// objects were deleted.
    pub async fn sweep_stray_objects(&self, grace: Duration) -> Result<usize> {
        let cutoff = crate::now_ms() - grace.as_millis() as i64;
        let mut deleted = 0;
        for prefix in ["uploads/", "staging/"] {
            for object in self.objects.list(prefix).await? {
                if object.modified_ms > cutoff {
                    continue;
                }
                let job_active = match upload_job_id(&object.key) {
                    Some(job_id) => self.store.job(job_id).await?.is_some_and(|record| {
                        matches!(record.job.state, JobState::Queued | JobState::Running)
                            && record.object_key.as_deref() == Some(object.key.as_str())
                    }),
                    None => false,
                };
                if job_active {
                    continue;
                }
                self.objects.delete(&object.key).await?;
                tracing::info!(
                    key = %object.key,
                    size = object.size,
                    "deleted an upload whose job has ended or is unknown"
                );
                deleted += 1;
            }
        }

        if let Some((objects_dir, bucket)) = self.embedded_bucket_dir.clone() {
            let removed = tokio::task::spawn_blocking(move || {
                crate::s3::remove_orphaned_side_files(&objects_dir, &bucket, grace)
            })
            .await
            .map_err(|e| Error::internal("side file sweep task failed", e))?
            .map_err(|e| Error::internal("failed to remove orphaned S3 side files", e))?;
            if removed > 0 {
                tracing::info!(removed, "removed side files of deleted objects");
            }
        }
        Ok(deleted)
    }

    /// Deletes each object under `backups/` that no backup lists, that is
    /// older than `grace` and whose job is no longer queued or running.
    /// Returns how many objects were deleted.
    pub async fn sweep_unlisted_backup_copies(&self, grace: Duration) -> Result<usize> {
        let cutoff = crate::now_ms() - grace.as_millis() as i64;
        let objects = self.objects.list("backups/").await?;
        let listed: std::collections::HashSet<String> =
            self.store.backup_object_keys().await?.into_iter().collect();
        let mut deleted = 0;
        for object in objects {
            if object.modified_ms > cutoff || listed.contains(&object.key) {
                continue;
            }
            // Keys in another layout are left alone, and so is the copy of a
            // job that another replica is still listing.
            let Some(job_id) = backup_copy_job_id(&object.key) else {
                continue;
            };
            let job_active = self.store.job(job_id).await?.is_some_and(|record| {
                matches!(record.job.state, JobState::Queued | JobState::Running)
            });
            if job_active {
                continue;
            }
            self.objects.delete(&object.key).await?;
            tracing::info!(
                key = %object.key,
                job_id,
                size = object.size,
                "deleted a backup copy that no backup lists"
            );
            deleted += 1;
        }
        Ok(deleted)
    }

    /// Fails each running backup or restore job whose agent sent no progress
    /// report, and no result, within the heartbeat timeout, and deletes its
    /// uploaded file. The heartbeat times live in the store, so a job counts
    /// as alive on every replica once any replica received its progress.
    /// Returns the failed job ids.
    pub async fn fail_stalled_jobs(&self) -> Result<Vec<i64>> {
        let now = crate::now_ms();
        let timeout_ms = i64::try_from(self.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
        let stalled_before = now.saturating_sub(timeout_ms);
        let failed = self.store.fail_stalled_jobs(stalled_before, now).await?;
        for record in &failed {
            let job = &record.job;
            tracing::warn!(
                job_id = job.id,
                device_id = job.device_id,
                kind = job.kind.as_str(),
                reason = job.reason.as_deref().unwrap_or_default(),
                "job failed"
            );
            if job.kind != JobKind::Restore
                && let Some(key) = &record.object_key
            {
                self.objects.delete_quietly(key).await;
            }
        }
        Ok(failed.iter().map(|record| record.job.id).collect())
    }

    /// Moves each running import whose validation lease has expired (no
    /// heartbeat for the heartbeat timeout) back to queued, so that any
    /// replica validates its file again. The replica that held the lease
    /// stopped or lost its database connection. Returns the requeued job ids.
    pub async fn requeue_stalled_imports(&self) -> Result<Vec<i64>> {
        let timeout_ms = i64::try_from(self.heartbeat_timeout.as_millis()).unwrap_or(i64::MAX);
        let stalled_before = crate::now_ms().saturating_sub(timeout_ms);
        let requeued = self.store.requeue_stalled_imports(stalled_before).await?;
        for record in &requeued {
            tracing::info!(
                job_id = record.job.id,
                "requeued an import whose validation lease expired; it will be validated again"
            );
        }
        Ok(requeued.iter().map(|record| record.job.id).collect())
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

/// Runs the expiry, heartbeat and import lease sweeper and the import
/// watcher until `shutdown`. The sweeper runs at once and then every 5
/// seconds, so an import that a stopped replica left running is requeued
/// within seconds of its lease expiring.
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
                if let Err(error) = manager.fail_stalled_jobs().await {
                    tracing::warn!(error = %error, "heartbeat sweep failed; retrying");
                }
                if let Err(error) = manager.requeue_stalled_imports().await {
                    tracing::warn!(error = %error, "import lease sweep failed; retrying");
                }
            })
            .await
        })
    };
    let mut tasks = vec![sweeper];
    if let Some(listener) = spawn_job_listener(manager.clone(), shutdown.clone()) {
        tasks.push(listener);
    }
    let watcher = tokio::spawn(async move {
        let mut last_stray_sweep: Option<tokio::time::Instant> = None;
        let mut last_copy_sweep: Option<tokio::time::Instant> = None;
        every(IMPORT_POLL_INTERVAL, shutdown, || {
            let sweep_due = last_stray_sweep.is_none_or(|at| at.elapsed() >= STRAY_SWEEP_INTERVAL);
            if sweep_due {
                last_stray_sweep = Some(tokio::time::Instant::now());
            }
            let copy_sweep_due =
                last_copy_sweep.is_none_or(|at| at.elapsed() >= BACKUP_COPY_SWEEP_INTERVAL);
            if copy_sweep_due {
                last_copy_sweep = Some(tokio::time::Instant::now());
            }
            let manager = &manager;
            async move {
                if let Err(error) = manager.check_imports().await {
                    tracing::warn!(error = %error, "import check failed; retrying");
                }
                if sweep_due
                    && let Err(error) = manager.sweep_stray_objects(STRAY_OBJECT_GRACE).await
                {
                    tracing::warn!(error = %error, "sweep of stray uploads failed; retrying");
                }
                if copy_sweep_due
                    && let Err(error) = manager
                        .sweep_unlisted_backup_copies(STRAY_OBJECT_GRACE)
                        .await
                {
                    tracing::warn!(error = %error, "sweep of unlisted backup copies failed; retrying");
                }
            }
        })
        .await
    });
    tasks.push(watcher);
    tasks
}

/// Wakes this server's long polls for jobs queued through other replicas,
/// when the store is shared (PostgreSQL). Returns `None` when it is not.
pub fn spawn_job_listener(
    manager: Arc<Manager>,
    shutdown: CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    let mut wakeups = manager.store.listen_for_jobs(shutdown)?;
    Some(tokio::spawn(async move {
        while let Some(wakeup) = wakeups.recv().await {
            manager.wake_polls(wakeup);
        }
    }))
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
