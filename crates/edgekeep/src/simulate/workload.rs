//! The job workload: one backup per device, then a random mix of backups,
//! restores and restores from other devices, at most one job per device at a
//! time, each followed through the jobs API until it ends.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgekeep_api::client::is_retryable;
use edgekeep_api::{ApiError, BACKUP_TYPE_MASTER, Client, Job, JobKind, JobState};
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use super::servers::Servers;

/// Share of restores that restore another device's backup (configuration
/// cloning); the rest restore one of the device's own backups.
pub const CLONE_SHARE: f64 = 0.25;

/// Conflicts accepted after a lost response while the lost job is looked up.
const MAX_CONFLICTS: usize = 3;

/// Candidates of one tick from which the watcher lists the succeeded jobs
/// instead of reading each job.
const LIST_MIN_CANDIDATES: usize = 16;

/// Maximum ratio of ended jobs to candidates for listing the succeeded jobs.
/// An estimate: one read request costs about as much as a few dozen list
/// entries.
const LIST_FACTOR: usize = 32;

/// Job reads the watcher keeps in flight at once. Many jobs end within one
/// tick under load, and each read waits on a busy server.
const LOOKUP_CONCURRENCY: usize = 64;

/// A device of the simulation, as the workload uses it.
#[derive(Debug, Clone, Copy)]
pub struct SimDevice {
    /// Position in the fleet, which seeds the device's generated state and
    /// its choice of jobs.
    pub index: usize,
    pub id: i64,
}

/// The outcome of one job the workload requested.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobOutcome {
    /// `None` when no server accepted the request.
    pub job_id: Option<i64>,
    pub kind: JobKind,
    pub device_id: i64,
    /// For a restore: the device whose backup was restored.
    pub source_device_id: Option<i64>,
    /// The backup the job made or restored, once known.
    pub timestamp: Option<i64>,
    /// The final state, or the last state seen when the run stopped first;
    /// `None` when the request failed or the job could not be read.
    pub state: Option<JobState>,
    /// Time from queueing to the end of the job by the server's clock.
    pub latency_ms: Option<i64>,
    /// Failure reason of the job, or the error of the request.
    pub reason: Option<String>,
}

impl JobOutcome {
    /// Describes `job` as it is now, for jobs the workload did not request.
    pub fn from_job(job: &Job) -> Self {
        JobOutcome {
            job_id: Some(job.id),
            kind: job.kind,
            device_id: job.device_id,
            source_device_id: job.source_device_id,
            timestamp: job.timestamp,
            state: Some(job.state),
            latency_ms: job.finished_at.map(|end| end - job.created_at),
            reason: job.reason.clone(),
        }
    }
}

/// Counters the progress lines print while the workload runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub ended: AtomicUsize,
    pub succeeded: AtomicUsize,
    /// Jobs found through the jobs API after a request whose response was
    /// lost, instead of being requested again.
    pub adopted: AtomicU64,
}

/// A job to request for a device.
#[derive(Debug, Clone, Copy)]
enum JobRequest {
    Backup,
    Restore {
        source_device_id: i64,
        timestamp: i64,
    },
}

impl JobRequest {
    fn kind(self) -> JobKind {
        match self {
            JobRequest::Backup => JobKind::Backup,
            JobRequest::Restore { .. } => JobKind::Restore,
        }
    }

    /// Sends the request to one server; returns the id of the queued job.
    async fn send(self, client: &Client, project_id: i64, device_id: i64) -> Result<i64, ApiError> {
        let job = match self {
            JobRequest::Backup => client.init_backup(project_id, device_id).await?,
            JobRequest::Restore {
                source_device_id,
                timestamp,
            } => {
                // A device's own backup is restored as LEM clients do it,
                // without sourceDeviceId.
                let source = (source_device_id != device_id).then_some(source_device_id);
                client
                    .init_restore(project_id, device_id, BACKUP_TYPE_MASTER, timestamp, source)
                    .await?
            }
        };
        job.ok_or_else(|| ApiError {
            status: 200,
            message: format!(
                "{} accepted the {} request for device {device_id} without naming the job in \
                 the {} header",
                client.base_url(),
                self.kind().as_str(),
                edgekeep_api::JOB_ID_HEADER
            ),
        })
    }

    /// True when `job` is what this request would have queued.
    fn matches(self, job: &Job) -> bool {
        match self {
            JobRequest::Backup => job.kind == JobKind::Backup,
            JobRequest::Restore { timestamp, .. } => {
                job.kind == JobKind::Restore && job.timestamp == Some(timestamp)
            }
        }
    }
}

/// Settings of one workload run.
#[derive(Debug, Clone, Copy)]
pub struct WorkloadOptions {
    pub project_id: i64,
    /// Total backup and restore jobs to request.
    pub jobs: usize,
    /// Share of the jobs after each device's first backup that are restores.
    pub restore_share: f64,
    /// Time after which no job is requested or followed any more.
    pub deadline: Instant,
}

/// Runs the workload on `devices` until `options.jobs` jobs have ended, the
/// deadline passes or `stop` turns true. Returns every job's outcome.
pub async fn run(
    servers: Arc<Servers>,
    devices: &[SimDevice],
    options: WorkloadOptions,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
) -> Vec<JobOutcome> {
    let watcher = Arc::new(Watcher::new(
        servers.clone(),
        options.project_id,
        devices.len(),
    ));
    let watcher_task = tokio::spawn(watcher.clone().run());
    let workload = Arc::new(Workload {
        servers,
        watcher,
        options,
        remaining: AtomicUsize::new(options.jobs),
        device_ids: devices.iter().map(|device| device.id).collect(),
        backups: Mutex::new(HashMap::new()),
        progress,
        stop,
    });
    let workers: Vec<_> = devices
        .iter()
        .map(|device| tokio::spawn(workload.clone().run_device(*device)))
        .collect();
    let mut outcomes = Vec::with_capacity(options.jobs);
    for worker in workers {
        match worker.await {
            Ok(device_outcomes) => outcomes.extend(device_outcomes),
            Err(err) => tracing::error!(error = %err, "a device worker panicked"),
        }
    }
    watcher_task.abort();
    outcomes
}

/// State shared by the device workers.
struct Workload {
    servers: Arc<Servers>,
    watcher: Arc<Watcher>,
    options: WorkloadOptions,
    /// Jobs not yet requested.
    remaining: AtomicUsize,
    device_ids: Vec<i64>,
    /// Timestamps of the successful backups, by device id.
    backups: Mutex<HashMap<i64, Vec<i64>>>,
    progress: Arc<Progress>,
    stop: watch::Receiver<bool>,
}

impl Workload {
    /// Requests jobs for one device, one at a time, while jobs remain.
    async fn run_device(self: Arc<Self>, device: SimDevice) -> Vec<JobOutcome> {
        let mut rng = StdRng::seed_from_u64(device.index as u64);
        let mut known = HashSet::new();
        let mut outcomes = Vec::new();
        while !self.stopped() && self.claim_job() {
            let request = if outcomes.is_empty() {
                JobRequest::Backup
            } else {
                self.choose(&mut rng, device.id)
            };
            let outcome = self.drive(device, request, &mut known).await;
            if let (JobKind::Backup, Some(JobState::Succeeded), Some(timestamp)) =
                (outcome.kind, outcome.state, outcome.timestamp)
            {
                let mut backups = self.backups.lock().unwrap_or_else(|e| e.into_inner());
                backups.entry(device.id).or_default().push(timestamp);
            }
            // A request that no server accepted ends here too; a job still
            // open at the deadline or stop does not.
            if outcome.job_id.is_none() || outcome.state.is_some_and(JobState::is_final) {
                self.progress.ended.fetch_add(1, Ordering::Relaxed);
            }
            if outcome.state == Some(JobState::Succeeded) {
                self.progress.succeeded.fetch_add(1, Ordering::Relaxed);
            }
            outcomes.push(outcome);
        }
        outcomes
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow() || Instant::now() >= self.options.deadline
    }

    /// Takes one job from the remaining count; false when none is left.
    fn claim_job(&self) -> bool {
        self.remaining
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |left| {
                left.checked_sub(1)
            })
            .is_ok()
    }

    /// Picks the next job of `device_id`: a backup, a restore of one of its
    /// own backups, or a restore of another device's backup.
    fn choose(&self, rng: &mut StdRng, device_id: i64) -> JobRequest {
        if !rng.gen_bool(self.options.restore_share) {
            return JobRequest::Backup;
        }
        let backups = self.backups.lock().unwrap_or_else(|e| e.into_inner());
        let own = backups.get(&device_id).filter(|list| !list.is_empty());
        let clone = rng.gen_bool(CLONE_SHARE) || own.is_none();
        let source = if clone {
            // A few random draws find another device with a backup in a
            // fleet where most devices have one. Without a find, the device
            // restores its own backup.
            (0..8)
                .map(|_| self.device_ids[rng.gen_range(0..self.device_ids.len())])
                .find(|id| *id != device_id && backups.get(id).is_some_and(|l| !l.is_empty()))
                .or(own.map(|_| device_id))
        } else {
            Some(device_id)
        };
        let Some(source_device_id) = source else {
            return JobRequest::Backup;
        };
        let list = &backups[&source_device_id];
        JobRequest::Restore {
            source_device_id,
            timestamp: list[rng.gen_range(0..list.len())],
        }
    }

    /// Requests one job and follows it until it ends, the deadline passes or
    /// the run stops.
    async fn drive(
        &self,
        device: SimDevice,
        request: JobRequest,
        known: &mut HashSet<i64>,
    ) -> JobOutcome {
        let mut outcome = JobOutcome {
            job_id: None,
            kind: request.kind(),
            device_id: device.id,
            source_device_id: match request {
                JobRequest::Backup => None,
                JobRequest::Restore {
                    source_device_id, ..
                } => Some(source_device_id),
            },
            timestamp: match request {
                JobRequest::Backup => None,
                JobRequest::Restore { timestamp, .. } => Some(timestamp),
            },
            state: None,
            latency_ms: None,
            reason: None,
        };
        let job_id = match self.submit(device, request, known).await {
            Ok(job_id) => job_id,
            Err(err) => {
                tracing::warn!(device_id = device.id, kind = request.kind().as_str(), error = %err, "requesting a job failed");
                outcome.reason = Some(err.to_string());
                return outcome;
            }
        };
        known.insert(job_id);
        outcome.job_id = Some(job_id);
        match self
            .watcher
            .wait(job_id, self.options.deadline, self.stop.clone())
            .await
        {
            Ok(job) => {
                outcome.state = Some(job.state);
                outcome.timestamp = job.timestamp;
                outcome.latency_ms = job.finished_at.map(|end| end - job.created_at);
                outcome.reason = job.reason;
            }
            Err(err) => outcome.reason = Some(err.to_string()),
        }
        outcome
    }

    /// Requests `request` through the servers in turn and returns the job
    /// id. After a transport error or 5xx the job may exist although its
    /// response was lost. So before each retry, the device's jobs are
    /// searched for one this worker does not know yet, which is then
    /// returned instead of requesting another.
    async fn submit(
        &self,
        device: SimDevice,
        request: JobRequest,
        known: &HashSet<i64>,
    ) -> Result<i64, ApiError> {
        let project_id = self.options.project_id;
        let mut rotation = self.servers.rotation();
        let mut uncertain = false;
        let mut conflicts = 0;
        loop {
            let client = rotation.next().await;
            if uncertain {
                match find_lost_job(&client, project_id, device.id, request, known).await {
                    Ok(Some(job_id)) => {
                        tracing::info!(
                            job_id,
                            device_id = device.id,
                            "found the job of a request whose response was lost"
                        );
                        self.progress.adopted.fetch_add(1, Ordering::Relaxed);
                        return Ok(job_id);
                    }
                    Ok(None) => {}
                    Err(err) if is_retryable(&err) => {
                        rotation.failed(client, &err)?;
                        continue;
                    }
                    Err(err) => return Err(err),
                }
            }
            match request.send(&client, project_id, device.id).await {
                Ok(job_id) => return Ok(job_id),
                Err(err) if is_retryable(&err) => {
                    uncertain = true;
                    rotation.failed(client, &err)?;
                }
                // The lost request queued the job after all, and the next
                // attempt finds it through the jobs list.
                Err(err) if err.status == 409 && uncertain && conflicts < MAX_CONFLICTS => {
                    conflicts += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }
}

/// Returns the newest job of `device_id` that `request` would have queued and
/// that is not in `known`.
async fn find_lost_job(
    client: &Client,
    project_id: i64,
    device_id: i64,
    request: JobRequest,
    known: &HashSet<i64>,
) -> Result<Option<i64>, ApiError> {
    let jobs = client
        .list_jobs(Some(project_id), Some(device_id), None)
        .await?;
    Ok(jobs
        .iter()
        .find(|job| !known.contains(&job.id) && request.matches(job))
        .map(|job| job.id))
}

/// Follows every requested job with two list calls per tick (queued and
/// running jobs of the project) instead of one call per job, and reads a job
/// once it left both lists.
struct Watcher {
    servers: Arc<Servers>,
    project_id: i64,
    interval: Duration,
    waiting: Mutex<HashMap<i64, oneshot::Sender<Job>>>,
    /// Jobs handed to their waiters so far.
    ended: AtomicUsize,
}

impl Watcher {
    fn new(servers: Arc<Servers>, project_id: i64, devices: usize) -> Self {
        // Half a second for small fleets; larger fleets list more jobs per
        // tick, so they tick less often.
        let interval = Duration::from_millis((devices as u64 / 2).clamp(500, 2000));
        Watcher {
            servers,
            project_id,
            interval,
            waiting: Mutex::new(HashMap::new()),
            ended: AtomicUsize::new(0),
        }
    }

    /// Waits until job `job_id` ends. At the deadline or on stop it returns
    /// the job as it is then.
    async fn wait(
        &self,
        job_id: i64,
        deadline: Instant,
        mut stop: watch::Receiver<bool>,
    ) -> Result<Job, ApiError> {
        let (sender, ended) = oneshot::channel();
        self.lock().insert(job_id, sender);
        tokio::select! {
            job = ended => {
                if let Ok(job) = job {
                    return Ok(job);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
        self.lock().remove(&job_id);
        self.servers
            .call(|client| async move { client.job(job_id).await })
            .await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i64, oneshot::Sender<Job>>> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn run(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u64;
        loop {
            ticks.tick().await;
            if self.lock().is_empty() {
                continue;
            }
            match self.check().await {
                Ok(()) => failures = 0,
                Err(err) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(30) {
                        tracing::warn!(error = %err, failures, "checking the jobs failed");
                    }
                }
            }
        }
    }

    /// Reads the jobs that are neither queued nor running any more and hands
    /// each one that ended to its waiter.
    async fn check(&self) -> Result<(), ApiError> {
        let project_id = Some(self.project_id);
        let mut active = HashSet::new();
        for state in [JobState::Running, JobState::Queued] {
            let jobs = self
                .servers
                .call(|client| async move { client.list_jobs(project_id, None, Some(state)).await })
                .await?;
            active.extend(jobs.into_iter().map(|job| job.id));
        }
        let mut candidates: HashSet<i64> = self
            .lock()
            .keys()
            .copied()
            .filter(|id| !active.contains(id))
            .collect();

        // Under load many jobs end in one tick, and one list of the
        // project's succeeded jobs then costs less than a read per job. That
        // list grows with every job that ended, so it is used only while it
        // is at most LIST_FACTOR times longer than the candidates.
        let ended = self.ended.load(Ordering::Relaxed);
        if candidates.len() >= LIST_MIN_CANDIDATES && ended <= candidates.len() * LIST_FACTOR {
            let succeeded = self
                .servers
                .call(|client| async move {
                    client
                        .list_jobs(project_id, None, Some(JobState::Succeeded))
                        .await
                })
                .await?;
            for job in succeeded {
                if candidates.remove(&job.id) {
                    self.hand_over(job);
                }
            }
        }

        // A job that moved from queued to running between the two lists is
        // in neither, so each remaining candidate is read before it counts
        // as ended.
        let mut reads = futures::stream::iter(candidates)
            .map(|job_id| {
                self.servers
                    .call(move |client| async move { client.job(job_id).await })
            })
            .buffer_unordered(LOOKUP_CONCURRENCY);
        while let Some(job) = reads.next().await {
            let job = job?;
            if job.state.is_final() {
                self.hand_over(job);
            }
        }
        Ok(())
    }

    /// Sends an ended job to its waiter, if one still waits.
    fn hand_over(&self, job: Job) {
        if let Some(sender) = self.lock().remove(&job.id) {
            self.ended.fetch_add(1, Ordering::Relaxed);
            let _ = sender.send(job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: JobKind, timestamp: Option<i64>) -> Job {
        Job {
            id: 1,
            kind,
            state: JobState::Queued,
            project_id: 1,
            device_id: 1,
            backup_type: BACKUP_TYPE_MASTER.to_string(),
            timestamp,
            source_device_id: None,
            progress: 0.0,
            message: None,
            reason: None,
            requested_by: "admin".to_string(),
            created_at: 0,
            started_at: None,
            finished_at: None,
            expires_at: 0,
        }
    }

    #[test]
    fn restore_request_matches_only_its_backup() {
        let request = JobRequest::Restore {
            source_device_id: 2,
            timestamp: 100,
        };
        assert!(request.matches(&job(JobKind::Restore, Some(100))));
        assert!(!request.matches(&job(JobKind::Restore, Some(101))));
        assert!(!request.matches(&job(JobKind::Backup, None)));
    }

    #[test]
    fn backup_request_matches_backup_jobs() {
        assert!(JobRequest::Backup.matches(&job(JobKind::Backup, None)));
        assert!(!JobRequest::Backup.matches(&job(JobKind::Restore, Some(1))));
    }
}
