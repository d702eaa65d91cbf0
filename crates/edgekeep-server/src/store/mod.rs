//! The metadata store: projects, devices, tokens, jobs and backups.
//!
//! [`Store`] uses only plain Rust and wire types. [`SqliteStore`] and
//! [`PostgresStore`] implement it with the same behaviour. Secrets arrive already
//! hashed, so the store never receives a token, credential or activation
//! code.

pub mod postgres;
mod sqlite;

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

use async_trait::async_trait;
use edgekeep_api::agent::DeviceFacts;
use edgekeep_api::{Backup, Device, Job, JobKind, JobState, Project, TokenInfo};
use tokio_util::sync::CancellationToken;

use crate::error::Result;

/// A job as stored: the wire fields plus the object it uses.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub job: Job,
    /// The object a backup or import uploads to, or a restore downloads.
    pub object_key: Option<String>,
}

/// Fields of a job about to be queued.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub kind: JobKind,
    pub project_id: i64,
    pub device_id: i64,
    pub backup_type: String,
    pub timestamp: Option<i64>,
    pub source_device_id: Option<i64>,
    pub requested_by: String,
    pub created_at: i64,
    pub expires_at: i64,
    /// The object key; `{id}` is replaced with the new job's id.
    pub object_key: Option<String>,
}

/// A listed backup and the object that contains it.
#[derive(Debug, Clone, PartialEq)]
pub struct BackupRecord {
    pub backup: Backup,
    pub object_key: String,
}

/// Filter of [`Store::list_jobs`]; `None` fields match everything.
#[derive(Debug, Clone, Default)]
pub struct JobFilter {
    pub project_id: Option<i64>,
    pub device_id: Option<i64>,
    pub state: Option<JobState>,
    /// Projects a scoped token may see.
    pub project_scope: Option<Vec<i64>>,
}

/// A token as stored, for authentication.
#[derive(Debug, Clone)]
pub struct TokenRecord {
    pub info: TokenInfo,
}

/// End of the reason given to a job that sent no progress for too long.
pub const STALLED_REASON_END: &str = "seconds, the agent may have stopped; the job can be retried";

/// A request to wake waiting long polls after a job was queued through
/// another replica.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobWakeup {
    /// A job was queued for this device.
    Device(i64),
    /// Notifications may have been missed, such as while the listener
    /// reconnected, so every waiting poll should look for a job.
    All,
}

/// Name of the administrator token that the server creates on first start.
pub const ADMIN_TOKEN_NAME: &str = "admin";

#[async_trait]
pub trait Store: Send + Sync {
    // Projects.

    async fn create_project(&self, name: &str, now: i64) -> Result<Project>;
    /// Lists projects, only those in `scope` when it is given.
    async fn list_projects(&self, scope: Option<Vec<i64>>) -> Result<Vec<Project>>;
    async fn project(&self, project_id: i64) -> Result<Option<Project>>;

    // Devices. `Device::online` is always false here: the service layer
    // computes it from open polls and `last_seen_at`.

    async fn create_device(
        &self,
        project_id: i64,
        name: &str,
        uid: &str,
        activation_hash: &str,
        activation_expires_at: i64,
        now: i64,
    ) -> Result<Device>;
    async fn list_devices(&self, project_id: i64) -> Result<Vec<Device>>;
    async fn device(&self, project_id: i64, device_id: i64) -> Result<Option<Device>>;
    async fn device_by_uid(&self, project_id: i64, uid: &str) -> Result<Option<Device>>;
    /// Stores a new activation code hash and clears the credential, so the
    /// old agent stops working.
    async fn reset_activation(&self, device_id: i64, hash: &str, expires_at: i64) -> Result<()>;
    /// Activates the device whose unexpired activation code has this hash:
    /// the code is consumed and the credential hash stored. Returns `None`
    /// when no device matches.
    async fn activate_device(
        &self,
        activation_hash: &str,
        credential_hash: &str,
        facts: &DeviceFacts,
        now: i64,
    ) -> Result<Option<Device>>;
    async fn device_by_credential(&self, credential_hash: &str) -> Result<Option<Device>>;
    /// Stores the facts a polling agent sent and marks the device seen.
    async fn record_poll(
        &self,
        device_id: i64,
        facts: Option<&DeviceFacts>,
        now: i64,
    ) -> Result<()>;

    // Tokens.

    async fn create_token(
        &self,
        name: &str,
        hash: &str,
        admin: bool,
        project_ids: Option<Vec<i64>>,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<TokenInfo>;
    /// Stores `hash` as the administrator token's hash, creating the token
    /// when none exists.
    async fn set_admin_token(&self, hash: &str, now: i64) -> Result<TokenInfo>;
    /// Stores `hash` as the administrator token's hash only when no
    /// unrevoked administrator token exists, in one atomic step. Returns
    /// the token when this call stored it, or `None` when one existed.
    /// Replicas that start at the same moment on an empty database store
    /// one token between them.
    async fn create_admin_token_if_missing(
        &self,
        hash: &str,
        now: i64,
    ) -> Result<Option<TokenInfo>>;
    async fn admin_token_exists(&self) -> Result<bool>;
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>>;
    async fn list_tokens(&self) -> Result<Vec<TokenInfo>>;
    /// Revokes the token; returns false when no token has this id.
    async fn revoke_token(&self, token_id: i64, now: i64) -> Result<bool>;

    // Jobs.

    /// Queues a job. A second queued or running backup or restore job on the
    /// same device is an [`Error::Conflict`](crate::Error::Conflict).
    async fn insert_job(&self, job: NewJob) -> Result<JobRecord>;
    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>>;
    /// Lists jobs newest first.
    async fn list_jobs(&self, filter: JobFilter) -> Result<Vec<Job>>;
    /// Moves the device's oldest queued backup or restore job to running and
    /// records its first heartbeat at `now`.
    async fn claim_next_job(&self, device_id: i64, now: i64) -> Result<Option<JobRecord>>;
    /// Fails every running backup or restore job of the device and returns
    /// their ids.
    async fn fail_running_jobs(&self, device_id: i64, reason: &str, now: i64) -> Result<Vec<i64>>;
    /// Moves the device's running backup or restore jobs whose id is above
    /// `last_received_job_id` back to queued, clearing their start and
    /// heartbeat, and returns their ids. Their agent polls again without
    /// having received them, so their hand-out never arrived. A job that
    /// another call moved on meanwhile is left alone.
    async fn requeue_unreceived_jobs(
        &self,
        device_id: i64,
        last_received_job_id: i64,
    ) -> Result<Vec<i64>>;
    async fn update_progress(&self, job_id: i64, progress: f64, message: &str) -> Result<()>;
    /// Records a sign of life of a running job at `now`, such as a progress
    /// report. Does nothing when the job is not running.
    async fn record_heartbeat(&self, job_id: i64, now: i64) -> Result<()>;
    /// Fails, in one atomic step, every running backup or restore job whose
    /// last heartbeat is at or before `stalled_before`, and returns them. A
    /// job with no heartbeat counts from its start. The reason names the
    /// device and the seconds since the heartbeat, followed by
    /// [`STALLED_REASON_END`]. Replicas that run this at the same moment fail
    /// each job once.
    async fn fail_stalled_jobs(&self, stalled_before: i64, now: i64) -> Result<Vec<JobRecord>>;
    /// Moves a job from `from` to a final state. Returns false when the job
    /// was no longer in `from`.
    async fn finish_job(
        &self,
        job_id: i64,
        from: JobState,
        to: JobState,
        reason: Option<&str>,
        now: i64,
    ) -> Result<bool>;
    /// Claims a queued import job for validation: moves it to running under
    /// the lease `lease_owner`, with its first heartbeat at `now`. Returns
    /// false when the job was not queued, such as when another replica
    /// claimed it first.
    async fn claim_import(&self, job_id: i64, lease_owner: &str, now: i64) -> Result<bool>;
    /// Renews the lease of a running import job: records a heartbeat at
    /// `now` if the job is still running under `lease_owner`. Returns false
    /// when it is not, because the job ended or was requeued and claimed
    /// again.
    async fn renew_import_lease(&self, job_id: i64, lease_owner: &str, now: i64) -> Result<bool>;
    /// Moves every running import job whose last heartbeat is at or before
    /// `stalled_before` back to queued and clears its lease, in one atomic
    /// step, and returns them. The replica that validated them stopped, so
    /// any replica may claim them again. A job with no heartbeat counts from
    /// its start.
    async fn requeue_stalled_imports(&self, stalled_before: i64) -> Result<Vec<JobRecord>>;
    /// Expires queued jobs whose `expires_at` has passed and returns them.
    async fn expire_jobs(&self, now: i64) -> Result<Vec<JobRecord>>;
    /// Starts listening for jobs queued through other replicas that share
    /// this store, until `shutdown`. Returns `None` for a store that only one
    /// server uses (SQLite), where the in-process wake-up is enough.
    fn listen_for_jobs(
        &self,
        shutdown: CancellationToken,
    ) -> Option<tokio::sync::mpsc::Receiver<JobWakeup>> {
        let _ = shutdown;
        None
    }
    /// Queued import jobs, oldest first.
    async fn pending_imports(&self) -> Result<Vec<JobRecord>>;

    // Backups.

    /// Returns the project's next backup timestamp: `max(now, last + 1)`.
    async fn next_timestamp(&self, project_id: i64, now: i64) -> Result<i64>;
    /// Lists the backup and marks its job succeeded, in one transaction. A
    /// timestamp already taken in the project is an
    /// [`Error::Conflict`](crate::Error::Conflict).
    async fn insert_backup(&self, record: BackupRecord, now: i64) -> Result<()>;
    async fn backup(
        &self,
        project_id: i64,
        backup_type: &str,
        timestamp: i64,
    ) -> Result<Option<BackupRecord>>;
    /// Lists the device's backups newest first.
    async fn list_backups(&self, project_id: i64, device_id: i64) -> Result<Vec<Backup>>;
    /// Returns the object key of every listed backup.
    async fn backup_object_keys(&self) -> Result<Vec<String>>;
}
