//! Input limits, timeouts and cleanups that keep a hostile or broken client
//! from corrupting state or taking the server down.

#[macro_use]
mod common;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use edgekeep_api::agent::{AgentJob, JobResult, ProgressReport};
use edgekeep_api::{AgentClient, Backup, Client, Device, Job, JobKind, JobState};
use edgekeep_server::store::{BackupRecord, NewJob};
use edgekeep_server::{SqliteStore, Store};

use common::StoreChoice;

const POLL: Duration = Duration::from_secs(5);

async fn wait_final(client: &Client, job_id: i64) -> Job {
    tokio::time::timeout(
        Duration::from_secs(20),
        client.wait_for_job(job_id, Duration::from_millis(100), |_| {}),
    )
    .await
    .expect("job finished in time")
    .unwrap()
}

/// Queues a backup, lets the agent claim it and returns the job id and its
/// upload URL.
async fn claim_backup(
    client: &Client,
    project_id: i64,
    device: &Device,
    agent: &AgentClient,
) -> (i64, String) {
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
    let AgentJob::Backup { upload_url, .. } = job else {
        panic!("expected a backup job, got {job:?}");
    };
    (job_id, upload_url)
}

/// Runs a backup whose archive records `archive_uid` as its source and
/// returns the finished job.
async fn backup_with_source(
    server: &common::TestServer,
    project_id: i64,
    device: &Device,
    agent: &AgentClient,
    archive_uid: &str,
) -> Job {
    let client = server.client();
    let (job_id, upload_url) = claim_backup(&client, project_id, device, agent).await;
    let (path, summary) = common::make_archive(server.data_dir(), archive_uid);
    assert_eq!(common::put_file(&upload_url, &path).await, 200);
    let result = JobResult {
        ok: true,
        reason: None,
        size: Some(summary.file_size),
        checksum: Some(summary.sha256.clone()),
    };
    agent.report_result(job_id, &result).await.unwrap();
    client.job(job_id).await.unwrap()
}

/// Sends a raw request with the administrator token and returns the status
/// and the JSON body.
async fn raw_request(
    server: &common::TestServer,
    method: reqwest::Method,
    path_and_query: &str,
) -> (u16, serde_json::Value) {
    let response = reqwest::Client::new()
        .request(method, format!("{}{path_and_query}", server.server.api_url))
        .header(edgekeep_api::AUTH_TOKEN_HEADER, &server.admin_token)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// Path of the `.internal.json` side file s3s-fs keeps for `key`.
fn side_file(data_dir: &Path, key: &str) -> std::path::PathBuf {
    data_dir.join("objects").join(format!(
        ".bucket-{}.object-{}.internal.json",
        URL_SAFE_NO_PAD.encode("edgekeep"),
        URL_SAFE_NO_PAD.encode(key)
    ))
}

async fn put_rejects_timestamp_out_of_range(store: StoreChoice) {
    let server = common::start(&store).await;
    let client = server.client();
    let project = client.create_project("plant").await.unwrap();
    let device = client
        .create_device(project.id, "gw-1")
        .await
        .unwrap()
        .device;
    let now = edgekeep_server::now_ms();

    for timestamp in [i64::MAX, 0, -5, now + 10 * 60_000] {
        let error = client
            .upload_url(project.id, device.id, "MASTER", Some(timestamp))
            .await
            .unwrap_err();
        assert_eq!(
            error.status, 400,
            "timestamp {timestamp}: {}",
            error.message
        );
        assert!(error.message.contains("timestamp"), "{}", error.message);
        assert!(
            error.message.contains("one minute ahead"),
            "{}",
            error.message
        );
    }
    let accepted = client
        .upload_url(project.id, device.id, "MASTER", Some(now))
        .await;
    assert!(accepted.is_ok(), "{accepted:?}");
    server.stop().await;
}

async fn healthz_runs_store_query(store: StoreChoice) {
    let server = common::start(&store).await;
    let (status, body) = raw_request(&server, reqwest::Method::GET, "/healthz").await;
    assert_eq!(status, 200);
    assert_eq!(body["content"], "ok");
    server.stop().await;
}

async fn backup_naming_other_device_fails(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let (other, _) = common::add_agent(&server, project_id, "gw-2").await;

    let job = backup_with_source(&server, project_id, &device, &agent, &other.uid).await;
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.unwrap_or_default();
    assert!(reason.contains("names another device"), "{reason}");
    assert!(reason.contains(&other.uid), "{reason}");
    let backups = server
        .client()
        .list_backups(project_id, device.id)
        .await
        .unwrap();
    assert!(backups.is_empty(), "{backups:?}");
    server.stop().await;
}

/// Queues a restore of `backup` onto `device`, claims it and returns its
/// `restore_identity` flag after reporting success.
async fn restore_identity_of(
    client: &Client,
    project_id: i64,
    backup: &Backup,
    device: &Device,
    agent: &AgentClient,
) -> bool {
    let job_id = client
        .init_restore(project_id, device.id, "MASTER", backup.timestamp, None)
        .await
        .unwrap()
        .unwrap();
    let job = agent
        .next_job(&common::facts(), POLL)
        .await
        .unwrap()
        .unwrap();
    let AgentJob::Restore {
        restore_identity, ..
    } = job
    else {
        panic!("expected a restore job, got {job:?}");
    };
    let result = JobResult {
        ok: true,
        reason: None,
        size: None,
        checksum: None,
    };
    agent.report_result(job_id, &result).await.unwrap();
    restore_identity
}

async fn restore_identity_only_for_own_backup(store: StoreChoice) {
    let server = common::start(&store).await;
    let client = server.client();
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let (other, other_agent) = common::add_agent(&server, project_id, "gw-2").await;

    let job = backup_with_source(&server, project_id, &device, &agent, &device.uid).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.reason);
    let own = client
        .list_backups(project_id, device.id)
        .await
        .unwrap()
        .remove(0);
    assert!(restore_identity_of(&client, project_id, &own, &device, &agent).await);
    assert!(!restore_identity_of(&client, project_id, &own, &other, &other_agent).await);

    // An import listed under the device names the device as its source but
    // was not made by it.
    let (url, import_id) = client
        .upload_url(project_id, device.id, "MASTER", None)
        .await
        .unwrap();
    let import_id = import_id.expect("put returns the import job id");
    let (path, _) = common::make_archive(server.data_dir(), &device.uid);
    assert_eq!(common::put_file(&url, &path).await, 200);
    let import = wait_final(&client, import_id).await;
    assert_eq!(import.state, JobState::Succeeded, "{:?}", import.reason);
    let imported = client
        .list_backups(project_id, device.id)
        .await
        .unwrap()
        .into_iter()
        .find(|b| b.job_id == import_id)
        .unwrap();
    assert!(!restore_identity_of(&client, project_id, &imported, &device, &agent).await);
    server.stop().await;
}

async fn stray_uploads_are_swept(store: StoreChoice) {
    let server = common::start(&store).await;
    let client = server.client();
    let manager = &server.server.manager;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;

    // An import fails on an invalid file, then its URL, still within its
    // expiry, stores a second file.
    let (url, import_id) = client
        .upload_url(project_id, device.id, "MASTER", None)
        .await
        .unwrap();
    let import_id = import_id.expect("put returns the import job id");
    let garbage = server.data_dir().join("garbage.dat");
    std::fs::write(&garbage, b"not an archive").unwrap();
    assert_eq!(common::put_file(&url, &garbage).await, 200);
    let failed = wait_final(&client, import_id).await;
    assert_eq!(failed.state, JobState::Failed);
    assert_eq!(common::put_file(&url, &garbage).await, 200);
    let late_key = format!("uploads/{import_id}.dat");

    // A running backup's upload stays, and an object of no job goes.
    let (backup_id, upload_url) = claim_backup(&client, project_id, &device, &agent).await;
    assert_eq!(common::put_file(&upload_url, &garbage).await, 200);
    let running_key = format!("staging/jobs/{backup_id}.dat");
    let unknown_key = "uploads/unknown.dat";
    manager
        .objects()
        .put(unknown_key, bytes::Bytes::from_static(b"x"))
        .await
        .unwrap();
    assert!(side_file(server.data_dir(), &late_key).exists());

    // Within the grace period nothing is deleted.
    let kept = manager
        .sweep_stray_objects(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(kept, 0);

    let deleted = manager.sweep_stray_objects(Duration::ZERO).await.unwrap();
    assert_eq!(deleted, 2);
    let objects = manager.objects();
    assert_eq!(objects.head(&late_key).await.unwrap(), None);
    assert_eq!(objects.head(unknown_key).await.unwrap(), None);
    assert!(objects.head(&running_key).await.unwrap().is_some());
    assert!(!side_file(server.data_dir(), &late_key).exists());
    assert!(!side_file(server.data_dir(), unknown_key).exists());
    assert!(side_file(server.data_dir(), &running_key).exists());
    server.stop().await;
}

async fn unlisted_backup_copies_are_swept(store: StoreChoice) {
    let server = common::start(&store).await;
    let client = server.client();
    let manager = &server.server.manager;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let finished = backup_with_source(&server, project_id, &device, &agent, &device.uid).await;
    assert_eq!(finished.state, JobState::Succeeded, "{:?}", finished.reason);
    let listed = client.list_backups(project_id, device.id).await.unwrap();
    let listed_key = format!(
        "backups/{project_id}/{}/MASTER/{}-{}.dat",
        device.id, listed[0].timestamp, finished.id
    );

    // A replica that stopped between copying and listing left a copy of the
    // finished job. A running job's copy and a key in another layout stay.
    let (running_id, _) = claim_backup(&client, project_id, &device, &agent).await;
    let prefix = format!("backups/{project_id}/{}/MASTER", device.id);
    let orphan_key = format!("{prefix}/1700000000000-{}.dat", finished.id);
    let running_key = format!("{prefix}/1700000000001-{running_id}.dat");
    let other_layout_key = format!("{prefix}/1700000000002.dat");
    let objects = manager.objects();
    for key in [&orphan_key, &running_key, &other_layout_key] {
        objects
            .put(key, bytes::Bytes::from_static(b"copy"))
            .await
            .unwrap();
    }

    let kept = manager
        .sweep_unlisted_backup_copies(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(kept, 0);
    let deleted = manager
        .sweep_unlisted_backup_copies(Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(objects.head(&orphan_key).await.unwrap(), None);
    assert!(objects.head(&listed_key).await.unwrap().is_some());
    assert!(objects.head(&running_key).await.unwrap().is_some());
    assert!(objects.head(&other_layout_key).await.unwrap().is_some());
    server.stop().await;
}

async fn oversized_upload_fails_job(store: StoreChoice) {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_with(dir, &store, |config| config.max_backup_size = 100).await;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;

    let job = backup_with_source(&server, project_id, &device, &agent, &device.uid).await;
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.unwrap_or_default();
    assert!(
        reason.contains("maximum backup size of 100 bytes"),
        "{reason}"
    );
    let (path, _) = common::make_archive(server.data_dir(), &device.uid);
    let size = std::fs::metadata(path).unwrap().len();
    assert!(reason.contains(&format!("is {size} bytes")), "{reason}");
    server.stop().await;
}

async fn stalled_job_fails_after_heartbeat_timeout(store: StoreChoice) {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_with(dir, &store, |config| {
        config.job_heartbeat_timeout = Duration::from_millis(800);
    })
    .await;
    let client = server.client();
    let manager = &server.server.manager;
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let (job_id, _) = claim_backup(&client, project_id, &device, &agent).await;

    // Progress reports keep the job alive.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let report = ProgressReport {
            progress: 0.5,
            message: "uploading".into(),
        };
        agent.report_progress(job_id, &report).await.unwrap();
        assert!(manager.fail_stalled_jobs().await.unwrap().is_empty());
    }

    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(manager.fail_stalled_jobs().await.unwrap(), vec![job_id]);
    let job = client.job(job_id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.unwrap_or_default();
    assert!(
        reason.starts_with(&format!("device {} sent no progress for", device.id)),
        "{reason}"
    );
    assert!(reason.contains("the job can be retried"), "{reason}");
    server.stop().await;
}

async fn second_server_on_data_dir_fails(store: StoreChoice) {
    let server = common::start(&store).await;
    let mut config = common::test_config(server.data_dir());
    config.database_url = store.database_url();
    let error = edgekeep_server::start(config).await.err().unwrap();
    let message = format!("{error:#}");
    assert!(
        message.contains(&server.data_dir().display().to_string()),
        "{message}"
    );
    assert!(
        message.contains(&format!("pid {}", std::process::id())),
        "{message}"
    );

    // The lock goes with the server.
    let dir = server.stop().await;
    let restarted = common::start_with(dir, &store, |_| {}).await;
    restarted.stop().await;
}

async fn names_are_checked(store: StoreChoice) {
    let server = common::start(&store).await;
    let client = server.client();
    for name in ["", "  ", &"p".repeat(201), "line\nbreak", "bell\u{7}"] {
        let error = client.create_project(name).await.unwrap_err();
        assert_eq!(error.status, 400, "{name:?}: {}", error.message);
        assert!(error.message.contains("project name"), "{}", error.message);
    }
    let project = client.create_project(&"p".repeat(200)).await.unwrap();
    let error = client.create_device(project.id, "gw\t1").await.unwrap_err();
    assert_eq!(error.status, 400);
    assert!(error.message.contains("device name"), "{}", error.message);

    let first = client
        .create_device(project.id, "gw-1")
        .await
        .unwrap()
        .device;
    let error = client.create_device(project.id, "gw-1").await.unwrap_err();
    assert_eq!(error.status, 409);
    assert!(
        error.message.contains(&format!("device {}", first.id)),
        "{}",
        error.message
    );
    server.stop().await;
}

async fn repeated_query_parameter_is_rejected(store: StoreChoice) {
    let server = common::start(&store).await;
    let client = server.client();
    let project = client.create_project("plant").await.unwrap();
    let device = client
        .create_device(project.id, "gw-1")
        .await
        .unwrap()
        .device;
    let path = format!(
        "/api/v1/backup/list?projectId={}&deviceId={}&deviceId=2",
        project.id, device.id
    );
    let (status, body) = raw_request(&server, reqwest::Method::GET, &path).await;
    assert_eq!(status, 400);
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("deviceId is repeated"), "{message}");
    server.stop().await;
}

async fn progress_report_is_checked(store: StoreChoice) {
    let server = common::start(&store).await;
    let client = server.client();
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let (job_id, _) = claim_backup(&client, project_id, &device, &agent).await;

    for progress in [1.5, -0.1] {
        let report = ProgressReport {
            progress,
            message: "uploading".into(),
        };
        let error = agent.report_progress(job_id, &report).await.unwrap_err();
        assert_eq!(error.status, 400, "{progress}");
        assert!(error.message.contains("progress"), "{}", error.message);
    }
    let report = ProgressReport {
        progress: 1.0,
        message: "é".repeat(500),
    };
    agent.report_progress(job_id, &report).await.unwrap();
    let job = client.job(job_id).await.unwrap();
    assert_eq!(job.message, Some("é".repeat(200)));
    assert_eq!(job.progress, 1.0);
    server.stop().await;
}

async fn long_device_fact_is_rejected(store: StoreChoice) {
    let server = common::start(&store).await;
    let (_, _, agent) = common::project_with_agent(&server, "gw-1").await;
    let mut facts = common::facts();
    facts.hostname = "h".repeat(256);
    let error = agent
        .next_job(&facts, Duration::from_secs(1))
        .await
        .unwrap_err();
    assert_eq!(error.status, 400);
    assert!(error.message.contains("hostname"), "{}", error.message);

    facts.hostname = "h".repeat(255);
    let polled = agent.next_job(&facts, Duration::from_secs(1)).await;
    assert!(polled.is_ok(), "{polled:?}");
    server.stop().await;
}

async fn import_failure_hides_server_paths(store: StoreChoice) {
    let server = common::start(&store).await;
    let client = server.client();
    let (project_id, device, _) = common::project_with_agent(&server, "gw-1").await;
    let (url, import_id) = client
        .upload_url(project_id, device.id, "MASTER", None)
        .await
        .unwrap();
    let import_id = import_id.expect("put returns the import job id");
    let garbage = server.data_dir().join("garbage.dat");
    std::fs::write(&garbage, b"not an archive").unwrap();
    assert_eq!(common::put_file(&url, &garbage).await, 200);

    let job = wait_final(&client, import_id).await;
    assert_eq!(job.state, JobState::Failed);
    let reason = job.reason.unwrap_or_default();
    assert!(reason.contains("failed validation"), "{reason}");
    assert!(
        !reason.contains(&server.data_dir().display().to_string()),
        "{reason}"
    );
    assert!(!reason.contains("/tmp"), "{reason}");
    server.stop().await;
}

async fn method_not_allowed_has_envelope(store: StoreChoice) {
    let server = common::start(&store).await;
    let (status, body) = raw_request(&server, reqwest::Method::DELETE, "/api/v1/projects").await;
    assert_eq!(status, 405);
    assert_eq!(body["code"], "405");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("DELETE"), "{message}");
    assert!(message.contains("GET"), "{message}");
    assert!(message.contains("POST"), "{message}");
    server.stop().await;
}

store_tests!(
    put_rejects_timestamp_out_of_range,
    healthz_runs_store_query,
    backup_naming_other_device_fails,
    restore_identity_only_for_own_backup,
    stray_uploads_are_swept,
    unlisted_backup_copies_are_swept,
    oversized_upload_fails_job,
    stalled_job_fails_after_heartbeat_timeout,
    second_server_on_data_dir_fails,
    names_are_checked,
    repeated_query_parameter_is_rejected,
    progress_report_is_checked,
    long_device_fact_is_rejected,
    import_failure_hides_server_paths,
    method_not_allowed_has_envelope,
);

// The tests below pin SQLite store behaviour.

/// Runs one job to the end through the API and returns it.
async fn finished_jobs_show_final_step_run()
-> Vec<(JobKind, JobState, Option<String>, Option<String>)> {
    let server = common::start(&StoreChoice::Sqlite).await;
    let client = server.client();
    let (project_id, device, agent) = common::project_with_agent(&server, "gw-1").await;
    let mut seen = Vec::new();

    let backup = backup_with_source(&server, project_id, &device, &agent, &device.uid).await;
    seen.push((backup.kind, backup.state, backup.message, backup.reason));

    let listed = client
        .list_backups(project_id, device.id)
        .await
        .unwrap()
        .remove(0);
    restore_identity_of(&client, project_id, &listed, &device, &agent).await;
    let restore = client
        .list_jobs(Some(project_id), Some(device.id), None)
        .await
        .unwrap()
        .remove(0);
    seen.push((restore.kind, restore.state, restore.message, restore.reason));

    let (url, import_id) = client
        .upload_url(project_id, device.id, "MASTER", None)
        .await
        .unwrap();
    let import_id = import_id.expect("put returns the import job id");
    let (path, _) = common::make_archive(server.data_dir(), &device.uid);
    assert_eq!(common::put_file(&url, &path).await, 200);
    let import = wait_final(&client, import_id).await;
    seen.push((import.kind, import.state, import.message, import.reason));

    let (job_id, _) = claim_backup(&client, project_id, &device, &agent).await;
    let failure = JobResult {
        ok: false,
        reason: Some("pre-backup hook exited with status 3".into()),
        size: None,
        checksum: None,
    };
    agent.report_result(job_id, &failure).await.unwrap();
    let failed = client.job(job_id).await.unwrap();
    seen.push((failed.kind, failed.state, failed.message, failed.reason));
    server.stop().await;
    seen
}

#[tokio::test]
async fn finished_jobs_show_final_step() {
    let seen = finished_jobs_show_final_step_run().await;
    let hook_failure = "pre-backup hook exited with status 3".to_string();
    let expected = vec![
        (
            JobKind::Backup,
            JobState::Succeeded,
            Some("backup listed".to_string()),
            None,
        ),
        (
            JobKind::Restore,
            JobState::Succeeded,
            Some("restored".to_string()),
            None,
        ),
        (
            JobKind::Import,
            JobState::Succeeded,
            Some("import listed".to_string()),
            None,
        ),
        (
            JobKind::Backup,
            JobState::Failed,
            Some(hook_failure.clone()),
            Some(hook_failure),
        ),
    ];
    assert_eq!(seen, expected);
}

#[tokio::test]
async fn exhausted_backup_clock_is_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("edgekeep.db")).unwrap();
    let now = edgekeep_server::now_ms();
    let project = store.create_project("plant", now).await.unwrap();
    let device = store
        .create_device(project.id, "gw-1", "uid-1", "hash", now + 1000, now)
        .await
        .unwrap();
    let job = store
        .insert_job(NewJob {
            kind: JobKind::Import,
            project_id: project.id,
            device_id: device.id,
            backup_type: "MASTER".into(),
            timestamp: Some(i64::MAX),
            source_device_id: None,
            requested_by: "test".into(),
            created_at: now,
            expires_at: now + 1000,
            object_key: Some("uploads/{id}.dat".into()),
        })
        .await
        .unwrap();
    assert!(store.claim_import(job.job.id, "test", now).await.unwrap());
    let record = BackupRecord {
        backup: Backup {
            timestamp: i64::MAX,
            backup_type: "MASTER".into(),
            project_id: project.id,
            device_id: device.id,
            size: 10,
            checksum: "ab".repeat(32),
            source_device_uid: "uid-1".into(),
            source_device_name: "gw-1".into(),
            source_device_id: Some(device.id),
            arch: "x86_64".into(),
            platform_version: "3.1.0".into(),
            agent_version: "0.1.0".into(),
            format_version: 1,
            entry_count: 1,
            state_size: 10,
            job_id: job.job.id,
            created_at: now,
        },
        object_key: "backups/x.dat".into(),
    };
    store.insert_backup(record, now).await.unwrap();

    let error = store.next_timestamp(project.id, now).await.unwrap_err();
    assert!(error.to_string().contains("exhausted"), "{error}");
    // The store keeps working after the failed call.
    let again = store.next_timestamp(project.id, now).await.unwrap_err();
    assert!(again.to_string().contains("exhausted"), "{again}");
    assert!(store.project(project.id).await.unwrap().is_some());
}

#[tokio::test]
async fn leftover_temp_files_are_deleted_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let temp = dir.path().join("tmp");
    std::fs::create_dir_all(temp.join("nested")).unwrap();
    std::fs::write(temp.join(".tmpAbC123"), vec![0u8; 4096]).unwrap();
    std::fs::write(temp.join("nested/part"), b"x").unwrap();

    let server = common::start_with(dir, &StoreChoice::Sqlite, |_| {}).await;
    let left: Vec<_> = std::fs::read_dir(server.data_dir().join("tmp"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    server.stop().await;
}

#[tokio::test]
async fn failed_first_start_creates_no_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = common::test_config(dir.path());
    config.admin_token = None;
    config.listen = taken.local_addr().unwrap();
    let error = match edgekeep_server::start(config).await {
        Ok(_) => panic!("the server started on a port that is taken"),
        Err(error) => format!("{error:#}"),
    };
    assert!(error.contains("failed to bind the API listener"), "{error}");

    // The next start creates the token and prints it.
    let mut config = common::test_config(dir.path());
    config.admin_token = None;
    let server = edgekeep_server::start(config).await.unwrap();
    assert!(server.admin_token_created);
    server.shutdown().await;
}
