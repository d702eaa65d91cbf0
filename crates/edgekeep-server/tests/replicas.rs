//! Two server replicas on one PostgreSQL database: heartbeats and job
//! wake-ups must reach the replica a device talks to. SQLite serves one
//! server only, so these tests run on PostgreSQL alone.

#[macro_use]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use edgekeep_api::agent::{AgentJob, JobResult, ProgressReport};
use edgekeep_api::{AgentClient, Client, Job, JobState};
use edgekeep_archive::{ArchivePath, PackItem, PackSummary, SourceInfo};
use edgekeep_server::store::postgres;

use common::{StoreChoice, TestServer};

/// Access key of the first replica's embedded S3 endpoint, which the second
/// replica uses as its external S3 service in [`replicas_sharing_objects`].
const SHARED_S3_ACCESS_KEY: &str = "EKSHAREDTESTKEY";
const SHARED_S3_SECRET_KEY: &str = "shared-test-secret-key-0123456789abcdef";

/// Starts two servers on one fresh PostgreSQL database, each with its own
/// data folder and embedded S3 endpoint. Returns `None` when PostgreSQL is
/// unreachable outside CI.
async fn two_replicas(
    heartbeat_timeout: Duration,
) -> Option<(StoreChoice, TestServer, TestServer)> {
    let store = StoreChoice::postgres().await?;
    let mut servers = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        let server = common::start_with(dir, &store, |config| {
            config.job_heartbeat_timeout = heartbeat_timeout;
        })
        .await;
        servers.push(server);
    }
    let second = servers.pop().unwrap();
    let first = servers.pop().unwrap();
    Some((store, first, second))
}

/// Starts two servers on one fresh PostgreSQL database that also share their
/// objects: the second uses the first one's embedded S3 endpoint as its
/// external S3 service, as replicas share one S3 bucket in production.
/// Returns `None` when PostgreSQL is unreachable outside CI.
async fn replicas_sharing_objects(
    heartbeat_timeout: Duration,
) -> Option<(StoreChoice, TestServer, TestServer)> {
    let store = StoreChoice::postgres().await?;
    let first = common::start_with(tempfile::tempdir().unwrap(), &store, |config| {
        config.job_heartbeat_timeout = heartbeat_timeout;
        config.s3_access_key = Some(SHARED_S3_ACCESS_KEY.into());
        config.s3_secret_key = Some(SHARED_S3_SECRET_KEY.into());
    })
    .await;
    let endpoint = first.server.s3_url.clone();
    let second = common::start_with(tempfile::tempdir().unwrap(), &store, |config| {
        config.job_heartbeat_timeout = heartbeat_timeout;
        config.s3_endpoint = Some(endpoint);
        config.s3_access_key = Some(SHARED_S3_ACCESS_KEY.into());
        config.s3_secret_key = Some(SHARED_S3_SECRET_KEY.into());
    })
    .await;
    Some((store, first, second))
}

/// Creates a device through `server` and activates it. Returns the project
/// id, the device id and the device credential, so a test can build agent
/// clients for any replica.
async fn activated_device(server: &TestServer) -> (i64, edgekeep_api::Device, String) {
    let client = server.client();
    let project = client.create_project("plant").await.unwrap();
    let activation = client.create_device(project.id, "gw-1").await.unwrap();
    let response = AgentClient::new(&server.server.api_url, None)
        .activate(&activation.activation_code, &common::facts())
        .await
        .unwrap();
    (project.id, activation.device, response.credential)
}

/// Packs a device state with one file of `size` random bytes, so that
/// downloading and verifying it takes a noticeable time.
fn large_archive(dir: &Path, device_uid: &str, size: usize) -> (PathBuf, PackSummary) {
    let state = dir.join("large-state");
    std::fs::create_dir_all(&state).unwrap();
    let data: Vec<u8> = (0..size).map(|_| rand::random::<u8>()).collect();
    std::fs::write(state.join("historian.bin"), data).unwrap();
    let items = [PackItem {
        path: ArchivePath::from_bytes(b"historian.bin"),
        source: state.join("historian.bin"),
    }];
    let source = SourceInfo {
        device_uid: device_uid.to_string(),
        device_name: "gw-1".into(),
        arch: "x86_64".into(),
        platform_version: "3.1.0".into(),
        agent_version: "0.1.0".into(),
        hostname: "gateway-1".into(),
    };
    let out = dir.join("large.dat");
    let summary = edgekeep_archive::pack(&items, &source, &out, &mut |_| {}).unwrap();
    (out, summary)
}

/// Polls the job through `client` until it ends.
async fn wait_final(client: &Client, job_id: i64) -> Job {
    tokio::time::timeout(
        Duration::from_secs(30),
        client.wait_for_job(job_id, Duration::from_millis(100), |_| {}),
    )
    .await
    .expect("the job ended in time")
    .unwrap()
}

/// Creates a device through `first` and activates an agent that talks to
/// `agent_server`. Returns the project id, the device id and the agent.
async fn device_on(first: &TestServer, agent_server: &TestServer) -> (i64, i64, AgentClient) {
    let client = first.client();
    let project = client.create_project("plant").await.unwrap();
    let activation = client.create_device(project.id, "gw-1").await.unwrap();
    let mut agent = AgentClient::new(&agent_server.server.api_url, None);
    let response = agent
        .activate(&activation.activation_code, &common::facts())
        .await
        .unwrap();
    agent.set_credential(response.credential);
    (project.id, activation.device.id, agent)
}

/// Queues a backup through `first` while the agent long-polls its own
/// server. Returns the job id, the time from queueing to hand-out and the
/// job the agent received.
async fn queue_while_polling(
    first: &TestServer,
    project_id: i64,
    device_id: i64,
    agent: AgentClient,
) -> (i64, Duration, AgentJob) {
    let poll = tokio::spawn(async move {
        let job = agent
            .next_job(&common::facts(), Duration::from_secs(20))
            .await;
        (job, Instant::now())
    });
    // Let the poll reach the server and start waiting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued_at = Instant::now();
    let job_id = first
        .client()
        .init_backup(project_id, device_id)
        .await
        .unwrap()
        .unwrap();
    let (job, handed_at) = poll.await.unwrap();
    let job = job.unwrap().expect("a job before the 20 second wait ended");
    (job_id, handed_at.duration_since(queued_at), job)
}

#[tokio::test]
async fn heartbeat_shared_between_replicas() {
    let timeout = Duration::from_millis(800);
    let Some((_store, first, second)) = two_replicas(timeout).await else {
        return;
    };
    let (project_id, device_id, agent) = device_on(&first, &first).await;
    let job_id = first
        .client()
        .init_backup(project_id, device_id)
        .await
        .unwrap()
        .unwrap();
    let job = agent
        .next_job(&common::facts(), Duration::from_secs(5))
        .await
        .unwrap()
        .expect("a job");
    assert_eq!(job.job_id(), job_id);

    // Progress reported to the first replica keeps the job alive on the
    // second one, for longer than the timeout in total.
    let report = ProgressReport {
        progress: 0.5,
        message: "uploading".into(),
    };
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let reply = agent.report_progress(job_id, &report).await.unwrap();
        assert!(!reply.cancelled);
        let failed = second.server.manager.fail_stalled_jobs().await.unwrap();
        assert_eq!(failed, Vec::<i64>::new());
    }
    let job = second.client().job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Running);

    // Once the reports stop, either replica fails the job, and only once.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let mut failed = second.server.manager.fail_stalled_jobs().await.unwrap();
    failed.extend(first.server.manager.fail_stalled_jobs().await.unwrap());
    let job = second.client().job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.unwrap_or_default();
    assert!(
        reason.starts_with(&format!("device {device_id} sent no progress for")),
        "{reason}"
    );
    assert!(reason.ends_with("the job can be retried"), "{reason}");
    // The background sweeps may have failed it first, but never twice.
    assert!(failed.len() <= 1, "failed more than once: {failed:?}");

    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn job_queued_on_one_replica_wakes_poll_on_other() {
    let Some((_store, first, second)) = two_replicas(Duration::from_secs(120)).await else {
        return;
    };
    let (project_id, device_id, agent) = device_on(&first, &second).await;

    let (job_id, delay, job) = queue_while_polling(&first, project_id, device_id, agent).await;
    assert_eq!(job.job_id(), job_id);
    assert!(
        delay < Duration::from_secs(1),
        "hand-out took {delay:?} after the job was queued"
    );

    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn job_listener_reconnects_and_wakes_polls() {
    let Some((store, first, second)) = two_replicas(Duration::from_secs(120)).await else {
        return;
    };
    let (project_id, device_id, agent) = device_on(&first, &second).await;
    let url = store.database_url().unwrap();
    let admin = postgres::connect_client(&url).await.unwrap();
    let listeners = || async {
        admin
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = $1",
                &[&postgres::LISTENER_APPLICATION_NAME],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let connected = common::eventually(Duration::from_secs(5), || async {
        (listeners().await == 2).then_some(())
    })
    .await;
    assert!(connected.is_some(), "both replicas should listen");

    // Drop every listener connection. A job queued before the second
    // replica reconnects sends a notification that no replica receives, so only the
    // wake-up after the reconnect hands it out.
    admin
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
            &[&postgres::LISTENER_APPLICATION_NAME],
        )
        .await
        .unwrap();
    let (job_id, delay, job) = queue_while_polling(&first, project_id, device_id, agent).await;
    assert_eq!(job.job_id(), job_id);
    assert!(
        delay < Duration::from_secs(5),
        "hand-out took {delay:?} after the job was queued"
    );
    let reconnected = common::eventually(Duration::from_secs(5), || async {
        (listeners().await == 2).then_some(())
    })
    .await;
    assert!(reconnected.is_some(), "both replicas should listen again");

    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn lost_hand_out_repeated_by_other_replica() {
    let Some((_store, first, second)) = two_replicas(Duration::from_secs(120)).await else {
        return;
    };
    let (project_id, device, credential) = activated_device(&first).await;
    let agent = AgentClient::new(&second.server.api_url, Some(credential));
    let client = first.client();

    // The agent process receives a first job from the second replica.
    let received = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let job = agent
        .next_job(&common::facts(), Duration::from_secs(5))
        .await;
    assert_eq!(job.unwrap().map(|job| job.job_id()), Some(received));
    let failure = JobResult {
        ok: false,
        reason: Some("pre-backup hook exited with status 3".into()),
        size: None,
        checksum: None,
    };
    agent.report_result(received, &failure).await.unwrap();

    // The first replica claims the next job in a long poll, and its
    // response is lost, as when the replica dies before it is sent.
    let lost = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let claimed = first
        .server
        .manager
        .next_job(&device, None, 0, None)
        .await
        .unwrap();
    assert_eq!(claimed.map(|job| job.job_id()), Some(lost));

    // The agent's next poll, on the other replica, carries the last received
    // id, so the job is handed out again and keeps running.
    let again = agent
        .next_job(&common::facts(), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(again.map(|job| job.job_id()), Some(lost));
    let job = second.client().job(lost).await.unwrap();
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.reason, None);
    let reply = agent
        .report_progress(
            lost,
            &ProgressReport {
                progress: 0.2,
                message: "packing".into(),
            },
        )
        .await
        .unwrap();
    assert!(!reply.cancelled);

    first.stop().await;
    second.stop().await;
}

#[tokio::test]
async fn replicas_started_together_create_one_admin_token() {
    let Some(store) = StoreChoice::postgres().await else {
        return;
    };
    let without_token = |config: &mut edgekeep_server::Config| config.admin_token = None;
    let (first, second) = tokio::join!(
        common::start_with(tempfile::tempdir().unwrap(), &store, without_token),
        common::start_with(tempfile::tempdir().unwrap(), &store, without_token)
    );
    let created = [
        first.server.admin_token_created,
        second.server.admin_token_created,
    ];
    assert_eq!(
        created.iter().filter(|created| **created).count(),
        1,
        "exactly one replica creates and prints the token: {created:?}"
    );
    let tokens = first.server.manager.store().list_tokens().await.unwrap();
    assert_eq!(tokens.len(), 1, "{tokens:?}");
    assert!(tokens[0].admin);
    assert_eq!(tokens[0].revoked_at, None);

    // A replica started later uses the stored token too.
    let third = common::start_with(tempfile::tempdir().unwrap(), &store, without_token).await;
    assert!(!third.server.admin_token_created);
    assert_eq!(
        third.server.manager.store().list_tokens().await.unwrap(),
        tokens
    );

    first.stop().await;
    second.stop().await;
    third.stop().await;
}

#[tokio::test]
async fn stale_import_lease_is_requeued_by_other_replica() {
    let timeout = Duration::from_secs(2);
    let Some((_store, first, second)) = replicas_sharing_objects(timeout).await else {
        return;
    };
    let client = first.client();
    let (project_id, device, _) = activated_device(&first).await;
    let (stale_url, stale) = client
        .upload_url(project_id, device.id, "MASTER", None)
        .await
        .unwrap();
    let (fresh_url, fresh) = client
        .upload_url(project_id, device.id, "MASTER", None)
        .await
        .unwrap();
    let (stale, fresh) = (stale.unwrap(), fresh.unwrap());

    // A replica that stopped long ago holds one import, and a live one,
    // which renews its lease below, holds the other.
    let store = first.server.manager.store().clone();
    let now = edgekeep_server::now_ms();
    assert!(
        store
            .claim_import(stale, "stopped-replica", now - 10_000)
            .await
            .unwrap()
    );
    assert!(
        store
            .claim_import(fresh, "live-replica", now)
            .await
            .unwrap()
    );
    let renewing = {
        let store = store.clone();
        tokio::spawn(async move {
            loop {
                let renewed = store
                    .renew_import_lease(fresh, "live-replica", edgekeep_server::now_ms())
                    .await
                    .unwrap();
                assert!(renewed, "the live replica lost its lease");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    // The second replica's sweep requeues only the stale lease. Its own
    // background sweep may have done so a moment earlier.
    let requeued = second
        .server
        .manager
        .requeue_stalled_imports()
        .await
        .unwrap();
    assert!(!requeued.contains(&fresh), "{requeued:?}");
    assert_ne!(client.job(stale).await.unwrap().state, JobState::Running);
    assert_eq!(client.job(fresh).await.unwrap().state, JobState::Running);

    // Both files arrive. A live replica claims and lists the requeued
    // import, while the import under a live lease is left alone.
    let (path, _) = common::make_archive(first.data_dir(), &device.uid);
    assert_eq!(common::put_file(&stale_url, &path).await, 200);
    assert_eq!(common::put_file(&fresh_url, &path).await, 200);
    let job = wait_final(&client, stale).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    tokio::time::sleep(timeout + Duration::from_millis(500)).await;
    let second_manager = &second.server.manager;
    assert_eq!(
        second_manager.requeue_stalled_imports().await.unwrap(),
        Vec::<i64>::new()
    );
    assert_eq!(client.job(fresh).await.unwrap().state, JobState::Running);

    // Once the live replica stops renewing, its import is requeued too and
    // validated by a replica that is still running.
    renewing.abort();
    let job = wait_final(&client, fresh).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    let listed = client.list_backups(project_id, device.id).await.unwrap();
    let mut job_ids: Vec<i64> = listed.iter().map(|backup| backup.job_id).collect();
    job_ids.sort_unstable();
    assert_eq!(job_ids, vec![stale, fresh]);

    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn result_retried_on_other_replica_lists_backup_once() {
    let Some((_store, first, second)) = replicas_sharing_objects(Duration::from_secs(120)).await
    else {
        return;
    };
    let (project_id, device, credential) = activated_device(&first).await;
    let to_first = AgentClient::new(&first.server.api_url, Some(credential.clone()));
    let to_second = AgentClient::new(&second.server.api_url, Some(credential));
    let client = first.client();
    let job_id = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let job = to_first
        .next_job(&common::facts(), Duration::from_secs(5))
        .await
        .unwrap();
    let Some(AgentJob::Backup { upload_url, .. }) = job else {
        panic!("expected a backup job, got {job:?}");
    };
    let (path, summary) = large_archive(first.data_dir(), &device.uid, 32 << 20);
    assert_eq!(common::put_file(&upload_url, &path).await, 200);

    // The agent reports to the first replica and, while that one still
    // validates the file, repeats the report on the second.
    let result = JobResult {
        ok: true,
        reason: None,
        size: Some(summary.file_size),
        checksum: Some(summary.sha256.clone()),
    };
    let (on_first, on_second) = tokio::join!(to_first.report_result(job_id, &result), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        to_second.report_result(job_id, &result).await
    });
    on_first.unwrap();
    on_second.unwrap();

    let job = client.job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    let listed = second
        .client()
        .list_backups(project_id, device.id)
        .await
        .unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].job_id, job_id);
    assert_eq!(Some(listed[0].timestamp), job.timestamp);
    assert_eq!(listed[0].checksum, summary.sha256);

    // The listed object is whole: the replica that lost the race deleted
    // only its own copy.
    let url = client
        .download_url(project_id, device.id, "MASTER", listed[0].timestamp)
        .await
        .unwrap();
    let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, summary.file_size);

    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn imports_racing_for_one_timestamp_keep_listed_file() {
    let Some((_store, first, second)) = replicas_sharing_objects(Duration::from_secs(120)).await
    else {
        return;
    };
    let (project_id, device, _) = activated_device(&first).await;
    let client = first.client();
    let timestamp = 1_700_000_000_000;
    let mut uploads = Vec::new();
    for name in ["one", "two"] {
        let (url, job_id) = client
            .upload_url(project_id, device.id, "MASTER", Some(timestamp))
            .await
            .unwrap();
        let dir = first.data_dir().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let (path, summary) = large_archive(&dir, &device.uid, 24 << 20);
        uploads.push((url, job_id.unwrap(), path, summary));
    }
    for (url, _, path, _) in &uploads {
        assert_eq!(common::put_file(url, path).await, 200);
    }

    // Both replicas validate at once, so both files reach the listing step
    // for the same timestamp. Their background sweeps may join in.
    let (on_first, on_second) = tokio::join!(
        first.server.manager.check_imports(),
        second.server.manager.check_imports()
    );
    on_first.unwrap();
    on_second.unwrap();
    let mut states = Vec::new();
    for (_, job_id, _, _) in &uploads {
        states.push(wait_final(&client, *job_id).await.state);
    }
    states.sort_by_key(|state| state.as_str());
    assert_eq!(states, [JobState::Failed, JobState::Succeeded]);

    // The listed backup's file is the winner's, whole.
    let listed = client.list_backups(project_id, device.id).await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let winner = uploads
        .iter()
        .find(|(_, job_id, _, _)| *job_id == listed[0].job_id)
        .expect("the listed backup comes from one of the imports");
    let url = client
        .download_url(project_id, device.id, "MASTER", timestamp)
        .await
        .unwrap();
    let response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    let bytes = response.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, winner.3.file_size);
    assert_eq!(listed[0].checksum, winner.3.sha256);

    second.stop().await;
    first.stop().await;
}
