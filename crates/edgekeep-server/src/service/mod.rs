//! The service layer: every operation of the REST API and the agent
//! protocol, independent of HTTP so tests can call it directly.

mod agent;
pub mod backups;
mod resources;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::sync::{MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use edgekeep_api::Device;
use tokio::sync::Notify;

use crate::auth::{Caller, check_token, hash_secret};
use crate::error::{Error, Result};
use crate::objects::Objects;
use crate::store::Store;

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
    /// Time of the last sign of life of each running device job: its
    /// hand-out or its last progress report. Kept in memory, so after a
    /// restart each running job starts a full timeout from the first sweep.
    // NOTE: replicas on one database do not share these times, so a replica
    // would fail jobs whose agents report to another replica.
    heartbeats: Mutex<HashMap<i64, Instant>>,
    /// Running jobs whose upload the server is validating; the agent waits
    /// for the result call meanwhile and sends no progress.
    validating: Mutex<HashSet<i64>>,
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
            heartbeats: Mutex::new(HashMap::new()),
            validating: Mutex::new(HashSet::new()),
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

    fn lock_heartbeats(&self) -> MutexGuard<'_, HashMap<i64, Instant>> {
        self.heartbeats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a sign of life of a running device job.
    pub(crate) fn record_heartbeat(&self, job_id: i64) {
        self.lock_heartbeats().insert(job_id, Instant::now());
    }

    /// Returns how long ago the job last showed a sign of life. A job not
    /// seen before, such as one left running by the last server, counts from
    /// now.
    pub(crate) fn heartbeat_age(&self, job_id: i64) -> Duration {
        self.lock_heartbeats()
            .entry(job_id)
            .or_insert_with(Instant::now)
            .elapsed()
    }

    /// Marks the job as under validation until the returned guard drops.
    pub(crate) fn start_validating(&self, job_id: i64) -> ValidatingGuard<'_> {
        self.validating
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(job_id);
        ValidatingGuard {
            manager: self,
            job_id,
        }
    }

    pub(crate) fn is_validating(&self, job_id: i64) -> bool {
        self.validating
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&job_id)
    }

    /// Forgets the heartbeats of jobs that are no longer running.
    pub(crate) fn retain_heartbeats(&self, running: &[i64]) {
        self.lock_heartbeats().retain(|id, _| running.contains(id));
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

/// Removes a job from the validating set when dropped.
pub(crate) struct ValidatingGuard<'a> {
    manager: &'a Manager,
    job_id: i64,
}

impl Drop for ValidatingGuard<'_> {
    fn drop(&mut self) {
        self.manager
            .validating
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.job_id);
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
