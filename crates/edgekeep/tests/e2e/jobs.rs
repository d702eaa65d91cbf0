//! Device jobs: one at a time per device, and waiting for offline devices.

use edgekeep_api::JobState;
use reqwest::StatusCode;

use crate::harness::*;

async fn second_job_on_busy_device_gets_409(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    // No agent runs, so the first job stays queued.
    let device = client
        .create_device(project, "offline")
        .await
        .unwrap()
        .device
        .id;
    let first = client.init_backup(project, device).await.unwrap().unwrap();
    assert_eq!(client.job(first).await.unwrap().state, JobState::Queued);

    let error = client.init_backup(project, device).await.unwrap_err();
    assert_eq!(error.status, 409);
    assert!(
        error.message.contains(&first.to_string()),
        "names the active job: {}",
        error.message
    );
    let response = reqwest::Client::new()
        .post(format!(
            "{}/api/v1/backup/init-backup?projectId={project}&deviceId={device}",
            server.api
        ))
        .header("X-AuthToken", &server.token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "409");

    // Once the first job is cancelled the device takes a new one.
    let cancelled = client.cancel_job(first).await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert!(client.init_backup(project, device).await.unwrap().is_some());
}

async fn job_for_offline_device_runs_when_agent_returns(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let (activation, mut agent) = add_device(&server, project, "gw", "").await;
    let device = activation.device.id;
    agent.kill();

    let job = client.init_backup(project, device).await.unwrap().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert_eq!(client.job(job).await.unwrap().state, JobState::Queued);
    assert!(
        client
            .list_backups(project, device)
            .await
            .unwrap()
            .is_empty()
    );

    // The agent comes back with its stored credential and no activation code.
    let agent = Agent::start(&server, &agent.dir, None);
    let finished = wait_job(&server, job).await;
    assert_eq!(
        finished.state,
        JobState::Succeeded,
        "{finished:?}\n{}",
        agent.log()
    );
    let list = client.list_backups(project, device).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].job_id, job);
}

async fn jobs_survive_server_restart(store: StoreChoice) {
    let mut server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let device = client
        .create_device(project, "later")
        .await
        .unwrap()
        .device
        .id;
    let job = client.init_backup(project, device).await.unwrap().unwrap();

    server.kill();
    server.spawn();
    let client = server.client();
    let found = client.job(job).await.unwrap();
    assert_eq!(found.state, JobState::Queued);
    assert_eq!(found.device_id, device);
    assert_eq!(client.list_projects().await.unwrap().len(), 1);
}

/// True when the process ignores SIGPIPE, read from `SigIgn` in
/// /proc/PID/status (SIGPIPE is signal 13, so bit 12 of the mask).
fn ignores_sigpipe(pid: u32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mask = status
        .lines()
        .find_map(|line| line.strip_prefix("SigIgn:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    mask & (1 << 12) != 0
}

/// A dropped storage or server connection must never kill the agent or the
/// server through SIGPIPE, because they run unattended.
async fn agent_and_server_survive_broken_pipes(store: StoreChoice) {
    let server = Server::start(&store);
    let project = server.client().create_project("p").await.unwrap().id;
    let (_, agent) = add_device(&server, project, "gw", "").await;
    assert!(ignores_sigpipe(agent.pid()), "the agent ignores SIGPIPE");
    assert!(ignores_sigpipe(server.pid()), "the server ignores SIGPIPE");
}

e2e_tests!(
    agent_and_server_survive_broken_pipes,
    second_job_on_busy_device_gets_409,
    job_for_offline_device_runs_when_agent_returns,
    jobs_survive_server_restart,
);
