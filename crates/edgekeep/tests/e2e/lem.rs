//! The five LEM-compatible steps, driven with nothing but `X-AuthToken`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::*;

/// Calls a LEM endpoint with a plain HTTP client and returns status and body.
async fn lem(
    server: &Server,
    method: reqwest::Method,
    path: &str,
    query: &[(&str, String)],
) -> (StatusCode, Value, Option<String>) {
    let response = reqwest::Client::new()
        .request(method, format!("{}{path}", server.api))
        .header("X-AuthToken", &server.token)
        .query(query)
        .send()
        .await
        .unwrap();
    let status = response.status();
    let job = response
        .headers()
        .get("X-Edgekeep-Job-Id")
        .map(|v| v.to_str().unwrap().to_string());
    (status, response.json().await.unwrap(), job)
}

async fn lem_steps_back_up_download_relocate_and_clone(store: StoreChoice) {
    let server = Server::start(&store);
    let project = server.client().create_project("plant").await.unwrap().id;
    let (a, agent_a) = add_device(&server, project, "gw-a", "").await;
    let (b, agent_b) = add_device(&server, project, "gw-b", "").await;
    let (c, _agent_c) = add_device(&server, project, "gw-c", "").await;
    let (a, b, c) = (a.device, b.device, c.device);
    let ids = |device: i64| {
        vec![
            ("projectId", project.to_string()),
            ("deviceId", device.to_string()),
        ]
    };

    // Make a backup of A while another connection writes to its historian.
    let db_path = agent_a.state().join("data/historian.db");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer_stop = stop.clone();
    let writer = std::thread::spawn(move || {
        let db = rusqlite::Connection::open(db_path).unwrap();
        db.busy_timeout(Duration::from_secs(10)).unwrap();
        let mut written = 0u64;
        while !writer_stop.load(std::sync::atomic::Ordering::Relaxed) {
            db.execute(
                "INSERT INTO samples (tag, value) VALUES ('w', ?1)",
                [written as f64],
            )
            .unwrap();
            written += 1;
        }
        written
    });
    let (status, body, job) = lem(
        &server,
        reqwest::Method::POST,
        "/api/v1/backup/init-backup",
        &ids(a.id),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, serde_json::json!({"code": "200", "content": null}));
    assert!(job.is_some(), "init-backup names its job in a header");

    // Poll the list until the backup appears.
    let deadline = std::time::Instant::now() + STEP_TIMEOUT;
    let entry = loop {
        let (status, body, _) = lem(
            &server,
            reqwest::Method::GET,
            "/api/v1/backup/list",
            &ids(a.id),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["code"], "200");
        if let Some(first) = body["content"].as_array().and_then(|l| l.first()) {
            break first.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backup never listed: {}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(
        writer.join().unwrap() > 0,
        "the writer wrote during the backup"
    );
    assert_eq!(entry["backupType"], "MASTER");
    let timestamp = entry["timestamp"].as_i64().unwrap();
    assert!(
        timestamp > 1_700_000_000_000,
        "timestamp is epoch milliseconds: {timestamp}"
    );
    assert_eq!(entry["sourceDeviceId"], a.id);

    // Get the download URL and fetch it with no auth header.
    let mut query = ids(a.id);
    query.push(("backupType", "MASTER".into()));
    query.push(("timestamp", timestamp.to_string()));
    let (status, body, _) = lem(&server, reqwest::Method::POST, "/api/v1/backup/get", &query).await;
    assert_eq!(status, StatusCode::OK);
    let url = body["content"].as_str().unwrap().to_string();
    assert!(url.contains("X-Amz-Expires=604800"), "{url}");
    assert!(url.contains("X-Amz-Signature="));
    let file = reqwest::get(&url).await.unwrap();
    assert_eq!(file.status(), StatusCode::OK);
    let bytes = file.bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, entry["size"].as_u64().unwrap());
    assert_eq!(
        hex::encode(sha2_digest(&bytes)),
        entry["checksum"].as_str().unwrap()
    );

    // Relocate the file onto C through a pre-signed PUT URL.
    let mut query = ids(c.id);
    query.push(("backupType", "MASTER".into()));
    let (status, body, _) = lem(&server, reqwest::Method::POST, "/api/v1/backup/put", &query).await;
    assert_eq!(status, StatusCode::OK);
    let put_url = body["content"].as_str().unwrap().to_string();
    let put = reqwest::Client::new()
        .put(&put_url)
        .body(bytes.to_vec())
        .send()
        .await
        .unwrap();
    assert!(put.status().is_success(), "PUT returned {}", put.status());
    let relocated = wait_listed(&server, project, c.id, 1).await;
    assert_eq!(relocated[0].checksum, entry["checksum"].as_str().unwrap());
    assert_eq!(relocated[0].source_device_id, Some(a.id));
    assert_ne!(
        relocated[0].timestamp, timestamp,
        "timestamps are unique per project"
    );

    // Restore A's backup onto B.
    let identity_before = identity(&agent_b.state());
    let logs_before = std::fs::read(agent_b.state().join("logs/gateway.log")).unwrap();
    let mut query = ids(b.id);
    query.push(("backupType", "MASTER".into()));
    query.push(("timestamp", timestamp.to_string()));
    query.push(("sourceDeviceId", a.id.to_string()));
    let (status, body, job) = lem(
        &server,
        reqwest::Method::POST,
        "/api/v1/backup/init-restore",
        &query,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body, serde_json::json!({"code": "200", "content": null}));
    let job = wait_job(&server, job.unwrap().parse().unwrap()).await;
    assert_eq!(
        job.state,
        edgekeep_api::JobState::Succeeded,
        "{job:?}\n{}",
        agent_b.log()
    );

    // B now contains A's configuration and historian but keeps its identity.
    let state_b = agent_b.state();
    assert_eq!(
        std::fs::read(state_b.join("config/connectors/plc.json")).unwrap(),
        std::fs::read(agent_a.state().join("config/connectors/plc.json")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(state_b.join("config/tags.csv")).unwrap(),
        "tag,address\ngw-a.pressure,40001\ngw-a.speed,40002\n"
    );
    assert_eq!(identity(&state_b), identity_before, "B keeps its identity");
    assert_eq!(
        std::fs::read(state_b.join("logs/gateway.log")).unwrap(),
        logs_before
    );
    let db = rusqlite::Connection::open(state_b.join("data/historian.db")).unwrap();
    let integrity: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(integrity, "ok");
    let rows: i64 = db
        .query_row("SELECT count(*) FROM samples", [], |r| r.get(0))
        .unwrap();
    assert!(rows >= 500, "the historian has its seed rows: {rows}");
    let tag: String = db
        .query_row("SELECT tag FROM samples WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(tag, "gw-a.pressure");
}

pub fn identity(state: &std::path::Path) -> Vec<Vec<u8>> {
    [
        "identity/device.crt",
        "identity/device.key",
        "identity/hostname",
    ]
    .iter()
    .map(|p| std::fs::read(state.join(p)).unwrap())
    .collect()
}

e2e_tests!(lem_steps_back_up_download_relocate_and_clone,);
