//! REST API behaviour through the axum router, called without a listener.

#[macro_use]
mod common;

use axum::body::Body;
use http::{Method, Request, StatusCode};
use serde_json::Value;
use tower::ServiceExt;

use common::StoreChoice;
use edgekeep_server::api;
use edgekeep_server::auth::{TOKEN_PREFIX, generate_secret, hash_secret};

struct Reply {
    status: StatusCode,
    job_id: Option<i64>,
    body: Value,
}

impl Reply {
    fn message(&self) -> &str {
        self.body["message"].as_str().unwrap_or("")
    }
}

async fn call(
    server: &common::TestServer,
    method: Method,
    uri: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Reply {
    let mut request = Request::builder().method(method).uri(uri);
    if let Some(token) = token {
        request = request.header("X-AuthToken", token);
    }
    let body = body.map_or(Body::empty(), |b| Body::from(b.to_string()));
    let request = request.body(body).unwrap();
    let response = api::router(server.server.manager.clone())
        .oneshot(request)
        .await
        .unwrap();
    let status = response.status();
    let job_id = response
        .headers()
        .get("X-Edgekeep-Job-Id")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Reply {
        status,
        job_id,
        body,
    }
}

async fn admin(
    server: &common::TestServer,
    method: Method,
    uri: &str,
    body: Option<Value>,
) -> Reply {
    call(server, method, uri, Some(common::ADMIN_TOKEN), body).await
}

/// Creates a project and a device; returns their ids.
async fn project_and_device(server: &common::TestServer) -> (i64, i64) {
    let project = admin(
        server,
        Method::POST,
        "/api/v1/projects",
        Some(serde_json::json!({"name": "plant"})),
    )
    .await;
    let project_id = project.body["content"]["id"].as_i64().unwrap();
    let device = admin(
        server,
        Method::POST,
        &format!("/api/v1/projects/{project_id}/devices"),
        Some(serde_json::json!({"name": "gw"})),
    )
    .await;
    (
        project_id,
        device.body["content"]["device"]["id"].as_i64().unwrap(),
    )
}

async fn healthz_returns_ok_envelope(store: StoreChoice) {
    let server = common::start(&store).await;
    let reply = call(&server, Method::GET, "/healthz", None, None).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body["code"], "200");
    assert_eq!(reply.body["content"], "ok");
    server.stop().await;
}

async fn missing_parameter_is_named(store: StoreChoice) {
    let server = common::start(&store).await;
    let (project_id, _) = project_and_device(&server).await;
    let reply = admin(
        &server,
        Method::POST,
        &format!("/api/v1/backup/init-backup?projectId={project_id}"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.body["code"], "400");
    assert_eq!(reply.message(), "missing query parameter deviceId");

    let reply = admin(&server, Method::GET, "/api/v1/backup/list?deviceId=1", None).await;
    assert_eq!(reply.message(), "missing query parameter projectId");
    server.stop().await;
}

async fn invalid_parameter_is_named(store: StoreChoice) {
    let server = common::start(&store).await;
    let reply = admin(
        &server,
        Method::GET,
        "/api/v1/backup/list?projectId=abc&deviceId=1",
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.message().contains("projectId"), "{}", reply.message());
    server.stop().await;
}

async fn unknown_backup_type_is_400(store: StoreChoice) {
    let server = common::start(&store).await;
    let (p, d) = project_and_device(&server).await;
    let reply = admin(
        &server,
        Method::POST,
        &format!("/api/v1/backup/get?projectId={p}&deviceId={d}&backupType=DIFF&timestamp=1"),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(
        reply.message().contains("backupType"),
        "{}",
        reply.message()
    );
    server.stop().await;
}

async fn missing_and_unknown_tokens_are_401(store: StoreChoice) {
    let server = common::start(&store).await;
    let missing = call(&server, Method::GET, "/api/v1/projects", None, None).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(missing.body["code"], "401");
    let unknown = call(
        &server,
        Method::GET,
        "/api/v1/projects",
        Some(&generate_secret(TOKEN_PREFIX)),
        None,
    )
    .await;
    assert_eq!(unknown.status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

async fn revoked_and_expired_tokens_are_401(store: StoreChoice) {
    let server = common::start(&store).await;
    let created = admin(
        &server,
        Method::POST,
        "/api/v1/tokens",
        Some(serde_json::json!({"name": "ci"})),
    )
    .await;
    let token = created.body["content"]["token"]
        .as_str()
        .unwrap()
        .to_string();
    let token_id = created.body["content"]["info"]["id"].as_i64().unwrap();
    assert_eq!(
        call(&server, Method::GET, "/api/v1/projects", Some(&token), None)
            .await
            .status,
        StatusCode::OK
    );

    let revoked = admin(
        &server,
        Method::DELETE,
        &format!("/api/v1/tokens/{token_id}"),
        None,
    )
    .await;
    assert_eq!(revoked.status, StatusCode::OK);
    let reply = call(&server, Method::GET, "/api/v1/projects", Some(&token), None).await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.message().contains("revoked"), "{}", reply.message());

    let expired = generate_secret(TOKEN_PREFIX);
    let store = server.server.manager.store();
    let now = edgekeep_server::now_ms();
    store
        .create_token(
            "old",
            &hash_secret(&expired),
            false,
            None,
            Some(now - 1000),
            now - 5000,
        )
        .await
        .unwrap();
    let reply = call(
        &server,
        Method::GET,
        "/api/v1/projects",
        Some(&expired),
        None,
    )
    .await;
    assert_eq!(reply.status, StatusCode::UNAUTHORIZED);
    assert!(reply.message().contains("expired"), "{}", reply.message());
    server.stop().await;
}

async fn scoped_token_gets_403_on_other_project(store: StoreChoice) {
    let server = common::start(&store).await;
    let (p1, d1) = project_and_device(&server).await;
    let (p2, d2) = project_and_device(&server).await;
    let created = admin(
        &server,
        Method::POST,
        "/api/v1/tokens",
        Some(serde_json::json!({"name": "line1", "projectIds": [p1]})),
    )
    .await;
    let token = created.body["content"]["token"]
        .as_str()
        .unwrap()
        .to_string();

    let own = call(
        &server,
        Method::GET,
        &format!("/api/v1/backup/list?projectId={p1}&deviceId={d1}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(own.status, StatusCode::OK);
    let other = call(
        &server,
        Method::GET,
        &format!("/api/v1/backup/list?projectId={p2}&deviceId={d2}"),
        Some(&token),
        None,
    )
    .await;
    assert_eq!(other.status, StatusCode::FORBIDDEN);
    assert_eq!(other.body["code"], "403");

    let projects = call(&server, Method::GET, "/api/v1/projects", Some(&token), None).await;
    assert_eq!(projects.body["content"].as_array().unwrap().len(), 1);
    let tokens = call(&server, Method::GET, "/api/v1/tokens", Some(&token), None).await;
    assert_eq!(tokens.status, StatusCode::FORBIDDEN);
    server.stop().await;
}

async fn unknown_resources_are_404(store: StoreChoice) {
    let server = common::start(&store).await;
    let (p, d) = project_and_device(&server).await;
    for uri in [
        format!("/api/v1/backup/list?projectId=999&deviceId={d}"),
        format!("/api/v1/backup/list?projectId={p}&deviceId=999"),
        format!("/api/v1/projects/{p}/devices/999"),
        "/api/v1/jobs/999".to_string(),
        "/api/v1/nothing".to_string(),
    ] {
        let reply = admin(&server, Method::GET, &uri, None).await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(reply.body["code"], "404", "{uri}");
    }
    let missing_backup = admin(
        &server,
        Method::POST,
        &format!(
            "/api/v1/backup/init-restore?projectId={p}&deviceId={d}&backupType=MASTER&timestamp=5"
        ),
        None,
    )
    .await;
    assert_eq!(missing_backup.status, StatusCode::NOT_FOUND);
    server.stop().await;
}

async fn second_job_on_busy_device_is_409(store: StoreChoice) {
    let server = common::start(&store).await;
    let (p, d) = project_and_device(&server).await;
    let uri = format!("/api/v1/backup/init-backup?projectId={p}&deviceId={d}");
    let first = admin(&server, Method::POST, &uri, None).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body["content"], Value::Null);
    let job_id = first.job_id.expect("job id header");

    let second = admin(&server, Method::POST, &uri, None).await;
    assert_eq!(second.status, StatusCode::CONFLICT);
    assert!(
        second.message().contains(&format!("device {d}")),
        "{}",
        second.message()
    );
    assert!(
        second.message().contains(&format!("job {job_id}")),
        "{}",
        second.message()
    );

    // Cancelling the first frees the device.
    let cancelled = admin(
        &server,
        Method::POST,
        &format!("/api/v1/jobs/{job_id}/cancel"),
        None,
    )
    .await;
    assert_eq!(cancelled.body["content"]["state"], "cancelled");
    let third = admin(&server, Method::POST, &uri, None).await;
    assert_eq!(third.status, StatusCode::OK);
    server.stop().await;
}

async fn jobs_list_filters_and_orders(store: StoreChoice) {
    let server = common::start(&store).await;
    let (p, d) = project_and_device(&server).await;
    let first = admin(
        &server,
        Method::POST,
        &format!("/api/v1/backup/init-backup?projectId={p}&deviceId={d}"),
        None,
    )
    .await;
    admin(
        &server,
        Method::POST,
        &format!("/api/v1/jobs/{}/cancel", first.job_id.unwrap()),
        None,
    )
    .await;
    let second = admin(
        &server,
        Method::POST,
        &format!("/api/v1/backup/init-backup?projectId={p}&deviceId={d}"),
        None,
    )
    .await;

    let all = admin(
        &server,
        Method::GET,
        &format!("/api/v1/jobs?projectId={p}"),
        None,
    )
    .await;
    let ids: Vec<i64> = all.body["content"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![second.job_id.unwrap(), first.job_id.unwrap()]);
    let queued = admin(&server, Method::GET, "/api/v1/jobs?state=queued", None).await;
    assert_eq!(queued.body["content"].as_array().unwrap().len(), 1);
    assert_eq!(queued.body["content"][0]["requestedBy"], "admin");
    let invalid = admin(&server, Method::GET, "/api/v1/jobs?state=done", None).await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    assert!(invalid.message().contains("state"));
    server.stop().await;
}

async fn timestamps_unique_under_concurrency(store: StoreChoice) {
    let server = common::start(&store).await;
    let (p, _) = project_and_device(&server).await;
    let store = server.server.manager.store().clone();
    let now = edgekeep_server::now_ms();
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.next_timestamp(p, now).await.unwrap() })
        })
        .collect();
    let mut values = Vec::new();
    for task in tasks {
        values.push(task.await.unwrap());
    }
    values.sort();
    values.dedup();
    assert_eq!(values.len(), 50);
    assert!(values[0] >= now);
    server.stop().await;
}

async fn invalid_json_body_is_400(store: StoreChoice) {
    let server = common::start(&store).await;
    let reply = admin(
        &server,
        Method::POST,
        "/api/v1/projects",
        Some(serde_json::json!({"title": 1})),
    )
    .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert!(reply.message().contains("name"), "{}", reply.message());
    server.stop().await;
}

async fn first_start_creates_admin_token(store: StoreChoice) {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start_with(dir, &store, |c| c.admin_token = None).await;
    let tokens = server.server.manager.store().list_tokens().await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].admin);
    assert_eq!(tokens[0].name, "admin");
    let dir = server.stop().await;

    // A configured token replaces the generated one's hash.
    let server = common::start_with(dir, &store, |_| {}).await;
    let tokens = server.server.manager.store().list_tokens().await.unwrap();
    assert_eq!(tokens.len(), 1);
    let reply = admin(&server, Method::GET, "/api/v1/tokens", None).await;
    assert_eq!(reply.status, StatusCode::OK);
    let endpoints: Value =
        serde_json::from_slice(&std::fs::read(server.data_dir().join("endpoints.json")).unwrap())
            .unwrap();
    assert_eq!(endpoints["api"], server.server.api_url.as_str());
    assert_eq!(endpoints["s3"], server.server.s3_url.as_str());
    server.stop().await;
}

store_tests!(
    healthz_returns_ok_envelope,
    missing_parameter_is_named,
    invalid_parameter_is_named,
    unknown_backup_type_is_400,
    missing_and_unknown_tokens_are_401,
    revoked_and_expired_tokens_are_401,
    scoped_token_gets_403_on_other_project,
    unknown_resources_are_404,
    second_job_on_busy_device_is_409,
    jobs_list_filters_and_orders,
    timestamps_unique_under_concurrency,
    invalid_json_body_is_400,
    first_start_creates_admin_token,
);
