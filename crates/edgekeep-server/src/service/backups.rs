//! The LEM-compatible backup operations: init-backup, list, get, put and
//! init-restore.

use edgekeep_api::{Backup, JobKind};

use super::{Manager, check_backup_type};
use crate::auth::Caller;
use crate::error::{Error, Result};
use crate::objects::{DOWNLOAD_URL_EXPIRY, UPLOAD_URL_EXPIRY};
use crate::store::{BackupRecord, JobRecord, NewJob};

/// How far ahead of the server clock a timestamp given to `put` may lie, in
/// milliseconds.
pub const MAX_TIMESTAMP_LEAD_MS: i64 = 60_000;

/// Checks a timestamp given to `put`: positive and at most
/// [`MAX_TIMESTAMP_LEAD_MS`] ahead of `now`, so the project clock that moves
/// past it stays near real time.
fn check_put_timestamp(timestamp: i64, now: i64) -> Result<()> {
    let latest = now.saturating_add(MAX_TIMESTAMP_LEAD_MS);
    if timestamp <= 0 || timestamp > latest {
        return Err(Error::BadRequest(format!(
            "invalid query parameter timestamp {timestamp}: expected milliseconds since the \
             Unix epoch from 1 to {latest} (at most one minute ahead of the server clock), or \
             omit it"
        )));
    }
    Ok(())
}

/// Object key of a device upload awaiting validation.
pub fn staging_key(job_id: i64) -> String {
    format!("staging/jobs/{job_id}.dat")
}

/// Object key of a listed backup. The id of the job that made it is part of
/// the key, so two imports validated at once for the same timestamp copy to
/// different keys, and the one that loses the listing deletes only its own
/// copy.
pub fn backup_key(
    project_id: i64,
    device_id: i64,
    backup_type: &str,
    timestamp: i64,
    job_id: i64,
) -> String {
    format!("backups/{project_id}/{device_id}/{backup_type}/{timestamp}-{job_id}.dat")
}

impl Manager {
    /// Queues a backup job on the device and returns its id.
    pub async fn init_backup(
        &self,
        caller: &Caller,
        project_id: i64,
        device_id: i64,
    ) -> Result<i64> {
        self.device(caller, project_id, device_id).await?;
        let record = self
            .queue_device_job(caller, JobKind::Backup, project_id, device_id, None)
            .await?;
        Ok(record.job.id)
    }

    /// Queues a restore of a listed backup onto the target device.
    pub async fn init_restore(
        &self,
        caller: &Caller,
        project_id: i64,
        device_id: i64,
        backup_type: &str,
        timestamp: i64,
        source_device_id: Option<i64>,
    ) -> Result<i64> {
        check_backup_type(backup_type)?;
        self.device(caller, project_id, device_id).await?;
        let backup = self
            .find_backup(project_id, backup_type, timestamp, source_device_id)
            .await?;
        let record = self
            .queue_device_job(
                caller,
                JobKind::Restore,
                project_id,
                device_id,
                Some(&backup),
            )
            .await?;
        Ok(record.job.id)
    }

    async fn queue_device_job(
        &self,
        caller: &Caller,
        kind: JobKind,
        project_id: i64,
        device_id: i64,
        backup: Option<&BackupRecord>,
    ) -> Result<JobRecord> {
        let now = crate::now_ms();
        let object_key = match backup {
            Some(backup) => backup.object_key.clone(),
            None => "staging/jobs/{id}.dat".to_string(),
        };
        let job = NewJob {
            kind,
            project_id,
            device_id,
            backup_type: backup.map_or(edgekeep_api::BACKUP_TYPE_MASTER.to_string(), |b| {
                b.backup.backup_type.clone()
            }),
            timestamp: backup.map(|b| b.backup.timestamp),
            source_device_id: backup.map(|b| b.backup.device_id),
            requested_by: caller.name.clone(),
            created_at: now,
            expires_at: now + self.job_ttl.as_millis() as i64,
            object_key: Some(object_key),
        };
        let record = self.store.insert_job(job).await?;
        tracing::info!(
            job_id = record.job.id,
            device_id,
            kind = kind.as_str(),
            "queued job"
        );
        self.wake_device(device_id);
        Ok(record)
    }

    /// Finds a backup by project, type and timestamp. With `device_id`, the
    /// backup must be listed under that device.
    async fn find_backup(
        &self,
        project_id: i64,
        backup_type: &str,
        timestamp: i64,
        device_id: Option<i64>,
    ) -> Result<BackupRecord> {
        let found = self
            .store
            .backup(project_id, backup_type, timestamp)
            .await?;
        match found {
            Some(record) if device_id.is_none_or(|d| d == record.backup.device_id) => Ok(record),
            _ => {
                let under = device_id.map_or(String::new(), |d| format!(" under device {d}"));
                Err(Error::NotFound(format!(
                    "no {backup_type} backup with timestamp {timestamp} in project {project_id}{under}; \
                     list the device's backups to find one"
                )))
            }
        }
    }

    pub async fn list_backups(
        &self,
        caller: &Caller,
        project_id: i64,
        device_id: i64,
    ) -> Result<Vec<Backup>> {
        self.device(caller, project_id, device_id).await?;
        self.store.list_backups(project_id, device_id).await
    }

    /// Returns a pre-signed GET URL of a backup, valid 7 days.
    pub async fn download_url(
        &self,
        caller: &Caller,
        project_id: i64,
        device_id: i64,
        backup_type: &str,
        timestamp: i64,
    ) -> Result<String> {
        check_backup_type(backup_type)?;
        self.device(caller, project_id, device_id).await?;
        let backup = self
            .find_backup(project_id, backup_type, timestamp, Some(device_id))
            .await?;
        self.objects
            .signed_get(&backup.object_key, DOWNLOAD_URL_EXPIRY)
            .await
    }

    /// Creates an import job and returns a pre-signed PUT URL for its file
    /// and the job's id. The file is listed under the device once it arrives
    /// and verifies.
    pub async fn upload_url(
        &self,
        caller: &Caller,
        project_id: i64,
        device_id: i64,
        backup_type: &str,
        timestamp: Option<i64>,
    ) -> Result<(String, i64)> {
        check_backup_type(backup_type)?;
        if let Some(timestamp) = timestamp {
            check_put_timestamp(timestamp, crate::now_ms())?;
        }
        self.device(caller, project_id, device_id).await?;
        if let Some(timestamp) = timestamp
            && self
                .store
                .backup(project_id, backup_type, timestamp)
                .await?
                .is_some()
        {
            return Err(Error::Conflict(format!(
                "timestamp {timestamp} already names a {backup_type} backup in project \
                 {project_id}; omit timestamp to get a new one"
            )));
        }

        let now = crate::now_ms();
        let job = NewJob {
            kind: JobKind::Import,
            project_id,
            device_id,
            backup_type: backup_type.to_string(),
            timestamp,
            source_device_id: None,
            requested_by: caller.name.clone(),
            created_at: now,
            expires_at: now + UPLOAD_URL_EXPIRY.as_millis() as i64,
            object_key: Some("uploads/{id}.dat".to_string()),
        };
        let record = self.store.insert_job(job).await?;
        let key = record
            .object_key
            .clone()
            .ok_or_else(|| Error::internal("import job has no object key", record.job.id))?;
        let url = self.objects.signed_put(&key, UPLOAD_URL_EXPIRY).await?;
        tracing::info!(job_id = record.job.id, device_id, "created import job");
        Ok((url, record.job.id))
    }
}
