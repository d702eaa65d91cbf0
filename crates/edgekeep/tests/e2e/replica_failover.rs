//! Two server replicas on one PostgreSQL database and one Garage bucket,
//! and one agent given both addresses. When the replica the agent talks to
//! is killed with SIGKILL, the agent moves to the other one, and every
//! backup still succeeds and is listed once. Replicas need a shared
//! database and S3 service, so these tests run on PostgreSQL with Garage
//! only.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use edgekeep_api::JobState;

use crate::harness::*;

/// Maximum time from a replica's death to the end of the next backup: the
/// agent loses about a second to its first retry, the rest is the job.
const FAILOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// Two replicas, a project and a device whose agent has both replicas'
/// addresses, the first one first.
struct Fleet {
    first: Server,
    second: Server,
    project: i64,
    device: i64,
    agent: Agent,
}

/// Starts two replicas on a fresh PostgreSQL database and Garage bucket,
/// and an agent for a new device with both addresses. Returns `None` when
/// PostgreSQL or Garage is missing outside CI.
async fn fleet() -> Option<Fleet> {
    let store = StoreChoice::postgres().await?;
    let first = Server::start(&store);
    let second = Server::start(&store);
    let client = first.client();
    let project = client.create_project("plant").await.unwrap().id;
    let activation = client.create_device(project, "press-a").await.unwrap();
    let device = activation.device.id;

    let dir = first.device_dir("press-a");
    lay_out_device(&dir, "press-a", "");
    let servers = format!("{},{}", first.api, second.api);
    let agent = Agent::start_with_servers(&servers, &dir, Some(&activation.activation_code));
    wait_online(&second, project, device, &agent).await;
    Some(Fleet {
        first,
        second,
        project,
        device,
        agent,
    })
}

/// Waits for a job through the live replica and checks that it succeeded
/// within [`FAILOVER_TIMEOUT`] of `since`.
async fn assert_succeeds(fleet: &Fleet, job_id: i64, since: Instant) {
    let job = wait_job(&fleet.second, job_id).await;
    assert_eq!(
        job.state,
        JobState::Succeeded,
        "job {job_id}: {job:?}\nagent log:\n{}\nlive replica log:\n{}",
        fleet.agent.log(),
        fleet.second.log()
    );
    let elapsed = since.elapsed();
    assert!(
        elapsed < FAILOVER_TIMEOUT,
        "job {job_id} took {elapsed:?} after the replica died; agent log:\n{}",
        fleet.agent.log()
    );
}

/// Checks that the device's backups are those of `job_ids`, each listed
/// once.
async fn assert_listed_once(fleet: &Fleet, job_ids: &[i64]) {
    let listed = fleet
        .second
        .client()
        .list_backups(fleet.project, fleet.device)
        .await
        .unwrap();
    let mut listed_jobs: Vec<i64> = listed.iter().map(|backup| backup.job_id).collect();
    listed_jobs.sort_unstable();
    let mut expected = job_ids.to_vec();
    expected.sort_unstable();
    assert_eq!(listed_jobs, expected, "{listed:?}");
    let timestamps: BTreeSet<i64> = listed.iter().map(|backup| backup.timestamp).collect();
    assert_eq!(timestamps.len(), listed.len(), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_through_other_replica_after_kill() {
    let Some(mut fleet) = fleet().await else {
        return;
    };

    // A first backup through the replica the agent polls.
    let first_backup = backup(&fleet.first, fleet.project, fleet.device).await;

    // Kill that replica while the agent's long poll waits on it, then ask
    // the other one for a backup.
    fleet.first.kill();
    let killed_at = Instant::now();
    let job_id = fleet
        .second
        .client()
        .init_backup(fleet.project, fleet.device)
        .await
        .unwrap()
        .unwrap();
    assert_succeeds(&fleet, job_id, killed_at).await;
    assert_listed_once(&fleet, &[first_backup.job_id, job_id]).await;

    // The agent keeps working through the live replica.
    let third = backup(&fleet.second, fleet.project, fleet.device).await;
    assert_listed_once(&fleet, &[first_backup.job_id, job_id, third.job_id]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn backup_handed_out_by_killed_replica_succeeds() {
    let Some(mut fleet) = fleet().await else {
        return;
    };
    let first_backup = backup(&fleet.first, fleet.project, fleet.device).await;

    // Queue a backup through the replica the agent polls and kill it at
    // once: it dies while it hands the job out, while the agent runs it, or
    // while it validates the upload. Whichever it is, the agent finishes
    // the job through the other replica.
    let job_id = fleet
        .first
        .client()
        .init_backup(fleet.project, fleet.device)
        .await
        .unwrap()
        .unwrap();
    fleet.first.kill();
    let killed_at = Instant::now();
    assert_succeeds(&fleet, job_id, killed_at).await;
    assert_listed_once(&fleet, &[first_backup.job_id, job_id]).await;

    let jobs = fleet
        .second
        .client()
        .list_jobs(Some(fleet.project), Some(fleet.device), None)
        .await
        .unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:?}");
    assert!(
        jobs.iter().all(|job| job.state == JobState::Succeeded),
        "{jobs:?}"
    );
}
