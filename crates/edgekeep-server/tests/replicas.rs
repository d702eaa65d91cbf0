//! Two server replicas on one PostgreSQL database: heartbeats and job
//! wake-ups must reach the replica a device talks to. SQLite serves one
//! server only, so these tests run on PostgreSQL alone.

#[macro_use]
mod common;

use std::time::{Duration, Instant};

use edgekeep_api::agent::{AgentJob, ProgressReport};
use edgekeep_api::{AgentClient, JobState};
use edgekeep_server::store::postgres;

use common::{StoreChoice, TestServer};

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
