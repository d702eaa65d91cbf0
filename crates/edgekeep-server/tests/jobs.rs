//! Job workflows against a server on loopback: the real REST and agent
//! clients, pre-signed uploads and downloads, and `.dat` validation.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use edgekeep_api::agent::{AgentJob, JobResult, ProgressReport};
use edgekeep_api::{Backup, Client, JobState};

use common::StoreChoice;

const POLL: Duration = Duration::from_secs(5);

async fn wait_final(client: &Client, job_id: i64) -> edgekeep_api::Job {
    tokio::time::timeout(
        Duration::from_secs(20),
        client.wait_for_job(job_id, Duration::from_millis(100), |_| {}),
    )
    .await
    .expect("job finished in time")
    .unwrap()
}

fn ok_result(summary: &edgekeep_archive::PackSummary) -> JobResult {
    JobResult {
        ok: true,
        reason: None,
        size: Some(summary.file_size),
        checksum: Some(summary.sha256.clone()),
    }
}

/// Runs one backup through the agent protocol and returns the listed backup.
async fn run_backup(
    server: &common::TestServer,
    project_id: i64,
    device: &edgekeep_api::Device,
    agent: &edgekeep_api::AgentClient,
) -> Backup {
    let client = server.client();
    let job_id = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let job = agent
        .next_job(&common::facts(), POLL)
        .await
        .unwrap()
        .unwrap();
    let AgentJob::Backup {
        job_id: handed,
        upload_url,
    } = job
    else {
        panic!("expected a backup job, got {job:?}");
    };
    assert_eq!(handed, job_id);
    assert!(
        upload_url.contains(&format!("staging/jobs/{job_id}.dat")),
        "{upload_url}"
    );
    assert!(upload_url.contains("X-Amz-Expires=3600"), "{upload_url}");

    let reply = agent
        .report_progress(
            job_id,
            &ProgressReport {
                progress: 0.5,
                message: "uploading".into(),
            },
        )
        .await
        .unwrap();
    assert!(!reply.cancelled);
    let (path, summary) = common::make_archive(server.data_dir(), &device.uid);
    assert_eq!(common::put_file(&upload_url, &path).await, 200);
    agent
        .report_result(job_id, &ok_result(&summary))
        .await
        .unwrap();

    let job = client.job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    let backups = client.list_backups(project_id, device.id).await.unwrap();
    backups
        .into_iter()
        .find(|b| Some(b.timestamp) == job.timestamp)
        .expect("backup listed")
}

async fn backup_is_validated_and_listed(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let backup = run_backup(&server, project_id, &device, &agent).await;

    assert_eq!(backup.backup_type, "MASTER");
    assert_eq!(backup.device_id, device.id);
    assert_eq!(backup.source_device_uid, device.uid);
    assert_eq!(backup.source_device_id, Some(device.id));
    assert_eq!(backup.entry_count, 2);
    assert_eq!(backup.arch, "x86_64");

    // The staging object is gone and the download URL serves the same file.
    let client = server.client();
    let staging = server.data_dir().join(format!(
        "objects/edgekeep/staging/jobs/{}.dat",
        backup.job_id
    ));
    assert!(!staging.exists());
    let url = client
        .download_url(project_id, device.id, "MASTER", backup.timestamp)
        .await
        .unwrap();
    assert!(url.contains("X-Amz-Expires=604800"), "{url}");
    let bytes = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, backup.size);
    let device_view = client.device(project_id, device.id).await.unwrap();
    assert!(device_view.online);
    assert_eq!(device_view.hostname.as_deref(), Some("gateway-1"));
    server.stop().await;
}

async fn backups_list_newest_first_with_unique_timestamps(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let first = run_backup(&server, project_id, &device, &agent).await;
    let second = run_backup(&server, project_id, &device, &agent).await;
    assert!(second.timestamp > first.timestamp);
    let listed = server
        .client()
        .list_backups(project_id, device.id)
        .await
        .unwrap();
    let timestamps: Vec<i64> = listed.iter().map(|b| b.timestamp).collect();
    assert_eq!(timestamps, vec![second.timestamp, first.timestamp]);
    server.stop().await;
}

async fn backup_with_wrong_checksum_fails(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let client = server.client();
    let job_id = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let Some(AgentJob::Backup { upload_url, .. }) =
        agent.next_job(&common::facts(), POLL).await.unwrap()
    else {
        panic!("expected a backup job");
    };
    let (path, summary) = common::make_archive(server.data_dir(), &device.uid);
    common::put_file(&upload_url, &path).await;
    let mut result = ok_result(&summary);
    result.checksum = Some("00".repeat(32));
    agent.report_result(job_id, &result).await.unwrap();

    let job = client.job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.reason.as_deref().unwrap().contains("SHA-256"),
        "{:?}",
        job.reason
    );
    assert!(
        client
            .list_backups(project_id, device.id)
            .await
            .unwrap()
            .is_empty()
    );
    server.stop().await;
}

async fn corrupt_backup_upload_fails_job(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let client = server.client();
    let job_id = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let Some(AgentJob::Backup { upload_url, .. }) =
        agent.next_job(&common::facts(), POLL).await.unwrap()
    else {
        panic!("expected a backup job");
    };
    let junk = server.data_dir().join("junk.dat");
    std::fs::write(&junk, b"not an archive").unwrap();
    common::put_file(&upload_url, &junk).await;
    let result = JobResult {
        ok: true,
        reason: None,
        size: Some(14),
        checksum: Some("ab".into()),
    };
    agent.report_result(job_id, &result).await.unwrap();

    let job = client.job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.reason.as_deref().unwrap().contains("failed validation"),
        "{:?}",
        job.reason
    );
    let staging = server
        .data_dir()
        .join(format!("objects/edgekeep/staging/jobs/{job_id}.dat"));
    assert!(!staging.exists());
    server.stop().await;
}

async fn restore_onto_other_device(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, source, source_agent) = common::project_with_agent(&server, "gw-1").await;
    let backup = run_backup(&server, project_id, &source, &source_agent).await;
    let (target, target_agent) = common::add_agent(&server, project_id, "gw-2").await;
    let client = server.client();

    // A wrong source device is a 404.
    let error = client
        .init_restore(
            project_id,
            target.id,
            "MASTER",
            backup.timestamp,
            Some(target.id),
        )
        .await
        .unwrap_err();
    assert_eq!(error.status, 404);

    let job_id = client
        .init_restore(
            project_id,
            target.id,
            "MASTER",
            backup.timestamp,
            Some(source.id),
        )
        .await
        .unwrap()
        .unwrap();
    let job = target_agent
        .next_job(&common::facts(), POLL)
        .await
        .unwrap()
        .unwrap();
    let AgentJob::Restore {
        job_id: handed,
        download_url,
        size,
        checksum,
        ..
    } = job
    else {
        panic!("expected a restore job, got {job:?}");
    };
    assert_eq!(handed, job_id);
    assert_eq!(size, backup.size);
    assert_eq!(checksum, backup.checksum);
    let bytes = reqwest::get(&download_url)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.len() as u64, size);

    target_agent
        .report_result(
            job_id,
            &JobResult {
                ok: true,
                reason: None,
                size: None,
                checksum: None,
            },
        )
        .await
        .unwrap();
    let job = client.job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.source_device_id, Some(source.id));
    assert_eq!(job.timestamp, Some(backup.timestamp));
    server.stop().await;
}

async fn long_poll_wakes_when_job_queued(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let client = server.client();
    let started = Instant::now();
    let poll = tokio::spawn(async move {
        agent
            .next_job(&common::facts(), Duration::from_secs(30))
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let job_id = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let job = poll.await.unwrap().unwrap().expect("a job");
    assert_eq!(job.job_id(), job_id);
    assert!(started.elapsed() < Duration::from_secs(5));
    server.stop().await;
}

async fn long_poll_returns_none_after_wait(store: StoreChoice) {
    let server = common::start(&store).await;
    let (_, _, agent) = common::project_with_agent(&server, "gw-1").await;
    let started = Instant::now();
    let job = agent
        .next_job(&common::facts(), Duration::from_secs(1))
        .await
        .unwrap();
    assert!(job.is_none());
    assert!(started.elapsed() >= Duration::from_millis(900));
    server.stop().await;
}

async fn poll_during_running_job_fails_it(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let client = server.client();
    let job_id = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    agent
        .next_job(&common::facts(), POLL)
        .await
        .unwrap()
        .unwrap();
    assert!(
        agent
            .next_job(&common::facts(), Duration::from_secs(0))
            .await
            .unwrap()
            .is_none()
    );
    let job = client.job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.reason.as_deref().unwrap().contains("agent restarted"),
        "{:?}",
        job.reason
    );
    server.stop().await;
}

/// Creates a device and activates it. Returns the project id, the device
/// and its credential, so a test can act as several agent processes of it.
async fn activated_device(server: &common::TestServer) -> (i64, edgekeep_api::Device, String) {
    let client = server.client();
    let project = client.create_project("plant").await.unwrap();
    let activation = client.create_device(project.id, "gw-1").await.unwrap();
    let response = edgekeep_api::AgentClient::new(&server.server.api_url, None)
        .activate(&activation.activation_code, &common::facts())
        .await
        .unwrap();
    (project.id, activation.device, response.credential)
}

fn failure(reason: &str) -> JobResult {
    JobResult {
        ok: false,
        reason: Some(reason.into()),
        size: None,
        checksum: None,
    }
}

async fn lost_hand_out_is_handed_out_again(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, credential) = activated_device(&server).await;
    let client = server.client();
    let url = &server.server.api_url;
    let agent = edgekeep_api::AgentClient::new(url, Some(credential.clone()));

    // The agent process receives a first job and ends it.
    let first = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let received = agent.next_job(&common::facts(), POLL).await.unwrap();
    assert_eq!(received.map(|job| job.job_id()), Some(first));
    assert_eq!(agent.last_received_job(), Some(first));
    agent
        .report_result(first, &failure("pre-backup hook exited with status 3"))
        .await
        .unwrap();

    // The server hands out a second job, but the response never arrives.
    let second = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let manager = &server.server.manager;
    let stored_device = manager
        .store()
        .device(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let lost = manager
        .next_job(&stored_device, None, 0, None)
        .await
        .unwrap();
    assert_eq!(lost.map(|job| job.job_id()), Some(second));
    assert_eq!(client.job(second).await.unwrap().state, JobState::Running);

    // The next poll names the first job as the last one received, so the
    // second one is handed out again instead of failed.
    let again = agent.next_job(&common::facts(), POLL).await.unwrap();
    let Some(AgentJob::Backup { job_id, upload_url }) = again else {
        panic!("expected the backup job again, got {again:?}");
    };
    assert_eq!(job_id, second);
    assert!(
        upload_url.contains(&format!("staging/jobs/{second}.dat")),
        "{upload_url}"
    );
    let job = client.job(second).await.unwrap();
    assert_eq!(job.state, JobState::Running);
    assert_eq!(job.reason, None);

    // A new agent process names no job, so the running job is failed.
    let restarted = edgekeep_api::AgentClient::new(url, Some(credential.clone()));
    assert_eq!(restarted.last_received_job(), None);
    let polled = restarted
        .next_job(&common::facts(), Duration::from_secs(0))
        .await
        .unwrap();
    assert!(polled.is_none());
    let job = client.job(second).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.reason.as_deref().unwrap().contains("agent restarted"),
        "{:?}",
        job.reason
    );

    // A last job id that is not a number is rejected and named.
    let response = reqwest::Client::new()
        .post(format!(
            "{url}/agent/v1/jobs/next?waitSecs=0&lastJobId=seven"
        ))
        .bearer_auth(&credential)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: serde_json::Value = response.json().await.unwrap();
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("lastJobId"), "{message}");
    server.stop().await;
}

async fn repeated_result_report_matches_outcome(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let client = server.client();

    // A success repeated for a listed backup is accepted and lists nothing
    // more; a failure for it is a conflict.
    let backup = run_backup(&server, project_id, &device, &agent).await;
    let repeated = JobResult {
        ok: true,
        reason: None,
        size: Some(backup.size),
        checksum: Some(backup.checksum.clone()),
    };
    agent.report_result(backup.job_id, &repeated).await.unwrap();
    let listed = client.list_backups(project_id, device.id).await.unwrap();
    assert_eq!(listed, vec![backup.clone()]);
    let error = agent
        .report_result(backup.job_id, &failure("late failure"))
        .await
        .unwrap_err();
    assert_eq!(error.status, 409);
    assert!(error.message.contains("succeeded, not running"), "{error}");
    let job = client.job(backup.job_id).await.unwrap();
    assert_eq!(job.state, JobState::Succeeded);

    // A failure repeated for a failed job is accepted and keeps the first
    // reason; a success for it is a conflict.
    let job_id = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    agent.next_job(&common::facts(), POLL).await.unwrap();
    agent
        .report_result(job_id, &failure("upload failed"))
        .await
        .unwrap();
    agent
        .report_result(job_id, &failure("upload failed again"))
        .await
        .unwrap();
    let job = client.job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.reason.as_deref(), Some("upload failed"));
    let error = agent.report_result(job_id, &repeated).await.unwrap_err();
    assert_eq!(error.status, 409);
    assert!(error.message.contains("failed, not running"), "{error}");
    server.stop().await;
}

async fn cancelled_running_job_tells_agent(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let client = server.client();
    let job_id = client
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    agent
        .next_job(&common::facts(), POLL)
        .await
        .unwrap()
        .unwrap();
    let job = client.cancel_job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Cancelled);
    let reply = agent
        .report_progress(
            job_id,
            &ProgressReport {
                progress: 0.2,
                message: "packing".into(),
            },
        )
        .await
        .unwrap();
    assert!(reply.cancelled);
    let error = client.cancel_job(job_id).await.unwrap_err();
    assert_eq!(error.status, 409);
    server.stop().await;
}

async fn agent_cannot_touch_other_devices_job(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let (_, other_agent) = common::add_agent(&server, project_id, "gw-2").await;
    let job_id = server
        .client()
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    agent
        .next_job(&common::facts(), POLL)
        .await
        .unwrap()
        .unwrap();
    let error = other_agent
        .report_progress(
            job_id,
            &ProgressReport {
                progress: 0.1,
                message: "x".into(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(error.status, 404);
    server.stop().await;
}

async fn activation_code_is_single_use(store: StoreChoice) {
    let server = common::start(&store).await;
    let client = server.client();
    let project = client.create_project("plant").await.unwrap();
    let activation = client.create_device(project.id, "gw").await.unwrap();
    let agent = edgekeep_api::AgentClient::new(&server.server.api_url, None);
    agent
        .activate(&activation.activation_code, &common::facts())
        .await
        .unwrap();
    let error = agent
        .activate(&activation.activation_code, &common::facts())
        .await
        .unwrap_err();
    assert_eq!(error.status, 401);
    server.stop().await;
}

async fn new_activation_code_revokes_old_credential(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    server
        .client()
        .new_activation_code(project_id, device.id)
        .await
        .unwrap();
    let error = agent
        .next_job(&common::facts(), Duration::from_secs(0))
        .await
        .unwrap_err();
    assert_eq!(error.status, 401);
    server.stop().await;
}

async fn import_lists_valid_upload(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, _agent) = common::project_with_agent(&server, "gw-1").await;
    let client = server.client();
    let (url, job_id) = client
        .upload_url(project_id, device.id, "MASTER", Some(1_700_000_000_000))
        .await
        .unwrap();
    let job_id = job_id.expect("job id header");
    assert!(url.contains(&format!("uploads/{job_id}.dat")), "{url}");
    assert!(url.contains("X-Amz-Expires=86400"), "{url}");

    let (path, summary) = common::make_archive(server.data_dir(), &device.uid);
    assert_eq!(common::put_file(&url, &path).await, 200);
    let job = wait_final(&client, job_id).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    let backups = client.list_backups(project_id, device.id).await.unwrap();
    assert_eq!(backups.len(), 1);
    assert_eq!(backups[0].timestamp, 1_700_000_000_000);
    assert_eq!(backups[0].checksum, summary.sha256);
    assert_eq!(backups[0].source_device_id, Some(device.id));

    // The same timestamp cannot be used twice.
    let error = client
        .upload_url(project_id, device.id, "MASTER", Some(1_700_000_000_000))
        .await
        .unwrap_err();
    assert_eq!(error.status, 409);
    server.stop().await;
}

async fn import_of_foreign_archive_has_no_source_id(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, _agent) = common::project_with_agent(&server, "gw-1").await;
    let client = server.client();
    let (url, job_id) = client
        .upload_url(project_id, device.id, "MASTER", None)
        .await
        .unwrap();
    let (path, _) = common::make_archive(server.data_dir(), "uid-from-another-tenant");
    common::put_file(&url, &path).await;
    let job = wait_final(&client, job_id.unwrap()).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    let backups = client.list_backups(project_id, device.id).await.unwrap();
    assert_eq!(backups[0].source_device_uid, "uid-from-another-tenant");
    assert_eq!(backups[0].source_device_id, None);
    server.stop().await;
}

async fn invalid_import_fails_and_is_not_listed(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, _agent) = common::project_with_agent(&server, "gw-1").await;
    let client = server.client();
    let (url, job_id) = client
        .upload_url(project_id, device.id, "MASTER", None)
        .await
        .unwrap();
    let job_id = job_id.unwrap();
    let junk = server.data_dir().join("junk.dat");
    std::fs::write(&junk, vec![7u8; 4096]).unwrap();
    common::put_file(&url, &junk).await;

    let job = wait_final(&client, job_id).await;
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.unwrap();
    assert!(reason.starts_with("422 "), "{reason}");
    assert!(
        client
            .list_backups(project_id, device.id)
            .await
            .unwrap()
            .is_empty()
    );
    let upload = server
        .data_dir()
        .join(format!("objects/edgekeep/uploads/{job_id}.dat"));
    assert!(!upload.exists());
    server.stop().await;
}

async fn queued_job_expires_when_device_offline(store: StoreChoice) {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_with(dir, &store, |c| c.job_ttl = Duration::from_secs(1)).await;
    let client = server.client();
    let project = client.create_project("plant").await.unwrap();
    let device = client.create_device(project.id, "gw").await.unwrap().device;
    let job_id = client
        .init_backup(project.id, device.id)
        .await
        .unwrap()
        .unwrap();
    let job = wait_final(&client, job_id).await;
    assert_eq!(job.state, JobState::Expired);
    let reason = job.reason.unwrap();
    assert!(
        reason.contains(&format!("device {} stayed offline", device.id)),
        "{reason}"
    );
    server.stop().await;
}

async fn jobs_and_backups_survive_restart(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let backup = run_backup(&server, project_id, &device, &agent).await;
    let queued = server
        .client()
        .init_backup(project_id, device.id)
        .await
        .unwrap()
        .unwrap();
    let dir = server.stop().await;

    let server = common::start_with(dir, &store, |_| {}).await;
    let client = server.client();
    assert_eq!(client.job(queued).await.unwrap().state, JobState::Queued);
    let listed = client.list_backups(project_id, device.id).await.unwrap();
    assert_eq!(listed, vec![backup]);
    server.stop().await;
}

store_tests!(
    backup_is_validated_and_listed,
    backups_list_newest_first_with_unique_timestamps,
    backup_with_wrong_checksum_fails,
    corrupt_backup_upload_fails_job,
    restore_onto_other_device,
    long_poll_wakes_when_job_queued,
    long_poll_returns_none_after_wait,
    poll_during_running_job_fails_it,
    cancelled_running_job_tells_agent,
    agent_cannot_touch_other_devices_job,
    activation_code_is_single_use,
    new_activation_code_revokes_old_credential,
    import_lists_valid_upload,
    import_of_foreign_archive_has_no_source_id,
    invalid_import_fails_and_is_not_listed,
    queued_job_expires_when_device_offline,
    jobs_and_backups_survive_restart,
    lost_hand_out_is_handed_out_again,
    repeated_result_report_matches_outcome,
);
