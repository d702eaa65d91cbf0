//! The service layer: every operation of the REST API and the agent
//! protocol, independent of HTTP so tests can call it directly.

mod agent;
pub mod backups;
mod resources;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::sync::{MutexGuard, PoisonError};
use std::time::Duration;

use edgekeep_api::Device;
use tokio::sync::Notify;

use crate::auth::{Caller, check_token, hash_secret};
use crate::error::{Error, Result};
use crate::objects::Objects;
use crate::store::{JobWakeup, Store};

/// A device counts as online for this long after its last poll ended.
pub const ONLINE_WINDOW_MS: i64 = 60_000;
/// Maximum wait of a long poll, in seconds.
pub const MAX_WAIT_SECS: u64 = 60;

/// Shared state of the server: the stores and the open device polls.
pub struct Manager {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) objects: Objects,
    pub(crate) job_ttl: Duration,
    pub(crate) activation_ttl: Duration,
    /// Folder for downloads under validation, on the data disk.
    pub(crate) temp_dir: PathBuf,
    /// Largest uploaded file that validation accepts, in bytes.
    pub(crate) max_backup_size: u64,
    /// Time without a progress report after which a running device job fails.
    pub(crate) heartbeat_timeout: Duration,
    /// Folder of the embedded S3 backend and its bucket, whose orphaned side
    /// files the sweep removes; `None` for an external S3 store.
    pub(crate) embedded_bucket_dir: Option<(PathBuf, String)>,
    polls: Mutex<HashMap<i64, DevicePolls>>,
    /// Random id of this server process, the first part of its import
    /// leases, so the jobs table shows which replica validates an import.
    replica_id: String,
    /// Number of import leases this process has taken, the second part of
    /// each lease, so every claim has its own lease.
    leases_taken: AtomicU64,
}

/// Open long polls of one device and the signal that wakes them.
#[derive(Default)]
struct DevicePolls {
    notify: Arc<Notify>,
    open: usize,
}

impl Manager {
    pub fn new(
        store: Arc<dyn Store>,
        objects: Objects,
        job_ttl: Duration,
        activation_ttl: Duration,
        temp_dir: PathBuf,
    ) -> Self {
        Manager {
            store,
            objects,
            job_ttl,
            activation_ttl,
            temp_dir,
            max_backup_size: crate::config::DEFAULT_MAX_BACKUP_SIZE,
            heartbeat_timeout: Duration::from_secs(120),
            embedded_bucket_dir: None,
            polls: Mutex::new(HashMap::new()),
            replica_id: uuid::Uuid::new_v4().simple().to_string(),
            leases_taken: AtomicU64::new(0),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn objects(&self) -> &Objects {
        &self.objects
    }

    /// Authenticates an `X-AuthToken` value.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Caller> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            return Err(Error::Unauthorized(format!(
                "missing {} header; send an API token",
                edgekeep_api::AUTH_TOKEN_HEADER
            )));
        };
        let record = self
            .store
            .token_by_hash(&hash_secret(token))
            .await?
            .ok_or_else(|| {
                Error::Unauthorized("unknown API token; check the token or create a new one".into())
            })?;
        check_token(&record.info, crate::now_ms())?;
        Ok(Caller::from_token(&record.info))
    }

    /// Authenticates a device credential from `Authorization: Bearer`.
    pub async fn authenticate_device(&self, credential: Option<&str>) -> Result<Device> {
        let Some(credential) = credential.filter(|c| !c.is_empty()) else {
            return Err(Error::Unauthorized(
                "missing device credential; send Authorization: Bearer CREDENTIAL".into(),
            ));
        };
        self.store
            .device_by_credential(&hash_secret(credential))
            .await?
            .ok_or_else(|| {
                Error::Unauthorized(
                    "unknown device credential; activate the agent again with a new activation code"
                        .into(),
                )
            })
    }

    /// Locks the poll registry. A panic while it was held leaves only
    /// counters behind, so the guard is recovered instead of failing every
    /// later poll.
    fn lock_polls(&self) -> MutexGuard<'_, HashMap<i64, DevicePolls>> {
        self.polls.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a sign of life of a running device job in the store, which
    /// every replica reads.
    pub(crate) async fn record_heartbeat(&self, job_id: i64) -> Result<()> {
        self.store.record_heartbeat(job_id, crate::now_ms()).await
    }

    /// Returns a new import lease of this replica, such as
    /// `3f2a...9c1b-17`: the replica id and a sequence number.
    pub(crate) fn new_lease_owner(&self) -> String {
        let sequence = self.leases_taken.fetch_add(1, Ordering::Relaxed) + 1;
        format!("{}-{sequence}", self.replica_id)
    }

    /// Records heartbeats for the job until the returned guard drops. The
    /// agent sends no progress while the server validates its upload, and
    /// validating a large file can take longer than the heartbeat timeout.
    /// For an import claimed under `lease_owner`, the heartbeats renew that
    /// lease, and they stop once the lease is no longer this replica's.
    pub(crate) fn start_validating(
        &self,
        job_id: i64,
        lease_owner: Option<&str>,
    ) -> ValidatingGuard {
        let lease_owner = lease_owner.map(str::to_string);
        let lost = Arc::new(AtomicBool::new(false));
        let interval = (self.heartbeat_timeout / 4).max(Duration::from_millis(50));
        let task = tokio::spawn(renew_while_validating(
            self.store.clone(),
            job_id,
            lease_owner.clone(),
            interval,
            lost.clone(),
        ));
        ValidatingGuard {
            task,
            store: self.store.clone(),
            job_id,
            lease_owner,
            lost,
        }
    }

    /// Sets `online` from open polls and the time of the last poll.
    pub(crate) fn with_online(&self, mut device: Device) -> Device {
        let open = self
            .polls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&device.id)
            .is_some_and(|polls| polls.open > 0);
        let recent = device
            .last_seen_at
            .is_some_and(|seen| crate::now_ms() - seen < ONLINE_WINDOW_MS);
        device.online = open || recent;
        device
    }

    /// Returns the signal that wakes the device's long polls.
    fn device_notify(&self, device_id: i64) -> Arc<Notify> {
        let mut polls = self.lock_polls();
        polls.entry(device_id).or_default().notify.clone()
    }

    /// Wakes a long poll of the device, if one is open, so it claims a job.
    pub(crate) fn wake_device(&self, device_id: i64) {
        self.device_notify(device_id).notify_one();
    }

    /// Wakes the open long polls that a job queued through another replica
    /// may concern. Devices with no open poll here are left alone.
    pub(crate) fn wake_polls(&self, wakeup: JobWakeup) {
        let polls = self.lock_polls();
        match wakeup {
            JobWakeup::Device(device_id) => {
                if let Some(entry) = polls.get(&device_id).filter(|entry| entry.open > 0) {
                    entry.notify.notify_waiters();
                }
            }
            JobWakeup::All => {
                for entry in polls.values().filter(|entry| entry.open > 0) {
                    entry.notify.notify_waiters();
                }
            }
        }
    }

    fn open_poll(&self, device_id: i64) -> Arc<Notify> {
        let mut polls = self.lock_polls();
        let entry = polls.entry(device_id).or_default();
        entry.open += 1;
        entry.notify.clone()
    }

    fn close_poll(&self, device_id: i64) {
        let mut polls = self.lock_polls();
        if let Some(entry) = polls.get_mut(&device_id) {
            entry.open = entry.open.saturating_sub(1);
        }
    }
}

/// Records a heartbeat of the job every `interval`, renewing the import
/// lease `lease_owner` when there is one. Sets `lost` and returns once the
/// lease is no longer this replica's.
async fn renew_while_validating(
    store: Arc<dyn Store>,
    job_id: i64,
    lease_owner: Option<String>,
    interval: Duration,
    lost: Arc<AtomicBool>,
) {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        let now = crate::now_ms();
        let renewed = match &lease_owner {
            Some(owner) => store.renew_import_lease(job_id, owner, now).await,
            None => store.record_heartbeat(job_id, now).await.map(|()| true),
        };
        match renewed {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(
                    job_id,
                    lease_owner = lease_owner.as_deref().unwrap_or_default(),
                    "the import ended or another replica took over its lease; stopping its heartbeats"
                );
                lost.store(true, Ordering::SeqCst);
                return;
            }
            Err(error) => {
                tracing::warn!(job_id, error = %error, "failed to record a heartbeat during validation");
            }
        }
    }
}

/// Stops the heartbeats of a job under validation when dropped.
pub(crate) struct ValidatingGuard {
    task: tokio::task::JoinHandle<()>,
    store: Arc<dyn Store>,
    job_id: i64,
    lease_owner: Option<String>,
    /// Set by the heartbeat task when a renewal found the lease gone.
    lost: Arc<AtomicBool>,
}

impl ValidatingGuard {
    /// Returns whether this replica may still finish the job: always true
    /// for a device job, and for an import whether its lease is still this
    /// replica's, checked by renewing it now.
    pub(crate) async fn still_held(&self) -> Result<bool> {
        let Some(owner) = &self.lease_owner else {
            return Ok(true);
        };
        if self.lost.load(Ordering::SeqCst) {
            return Ok(false);
        }
        self.store
            .renew_import_lease(self.job_id, owner, crate::now_ms())
            .await
    }
}

impl Drop for ValidatingGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks a `backupType` value: `MASTER` is the only backup type.
pub fn check_backup_type(value: &str) -> Result<()> {
    if value == edgekeep_api::BACKUP_TYPE_MASTER {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "invalid query parameter backupType {value:?}: expected {}",
            edgekeep_api::BACKUP_TYPE_MASTER
        )))
    }
}
