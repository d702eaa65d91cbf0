//! Error statuses of the LEM-compatible API: 400, 401, 403 and 404.

use edgekeep_api::CreateToken;
use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::*;

async fn call(
    server: &Server,
    token: Option<&str>,
    method: reqwest::Method,
    path_and_query: &str,
) -> (StatusCode, Value) {
    let mut request =
        reqwest::Client::new().request(method, format!("{}{path_and_query}", server.api));
    if let Some(token) = token {
        request = request.header("X-AuthToken", token);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body["code"],
        status.as_str(),
        "envelope code matches the status: {body}"
    );
    assert_eq!(body["content"], Value::Null);
    (status, body)
}

fn message(body: &Value) -> String {
    body["message"].as_str().unwrap_or_default().to_string()
}

async fn tokens_missing_unknown_revoked_or_expired_get_401(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let list = format!("/api/v1/backup/list?projectId={project}&deviceId=1");

    let (status, _) = call(&server, None, reqwest::Method::GET, &list).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = call(&server, Some("ek_0000"), reqwest::Method::GET, &list).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    let revoked = client
        .create_token(&CreateToken {
            name: "old".into(),
            project_ids: None,
            expires_at: None,
        })
        .await
        .unwrap();
    client.revoke_token(revoked.info.id).await.unwrap();
    let (status, body) = call(&server, Some(&revoked.token), reqwest::Method::GET, &list).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(message(&body).contains("revoked"), "{body}");

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let expired = client
        .create_token(&CreateToken {
            name: "short".into(),
            project_ids: None,
            expires_at: Some(now + 1000),
        })
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let (status, body) = call(&server, Some(&expired.token), reqwest::Method::GET, &list).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(message(&body).contains("expired"), "{body}");
}

async fn scoped_token_gets_403_for_other_project(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let mine = client.create_project("mine").await.unwrap().id;
    let other = client.create_project("other").await.unwrap().id;
    let device = client.create_device(other, "d").await.unwrap().device.id;
    let scoped = client
        .create_token(&CreateToken {
            name: "line".into(),
            project_ids: Some(vec![mine]),
            expires_at: None,
        })
        .await
        .unwrap();

    let path = format!("/api/v1/backup/init-backup?projectId={other}&deviceId={device}");
    let (status, body) = call(&server, Some(&scoped.token), reqwest::Method::POST, &path).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert!(
        message(&body).contains(&other.to_string()),
        "names the project: {body}"
    );
    let own = format!("/api/v1/backup/list?projectId={mine}&deviceId=999");
    let (status, _) = call(&server, Some(&scoped.token), reqwest::Method::GET, &own).await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the scope covers its own project"
    );
}

async fn unknown_project_device_or_backup_gets_404(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let device = client.create_device(project, "d").await.unwrap().device.id;
    let token = Some(server.token.as_str());

    let (status, body) = call(
        &server,
        token,
        reqwest::Method::GET,
        &format!("/api/v1/backup/list?projectId=9999&deviceId={device}"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(message(&body).contains("9999"), "{body}");
    let (status, body) = call(
        &server,
        token,
        reqwest::Method::POST,
        &format!("/api/v1/backup/init-backup?projectId={project}&deviceId=777"),
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(message(&body).contains("777"), "{body}");
    let (status, _) = call(&server, token, reqwest::Method::POST, &format!("/api/v1/backup/get?projectId={project}&deviceId={device}&backupType=MASTER&timestamp=123")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = call(&server, token, reqwest::Method::POST, &format!("/api/v1/backup/init-restore?projectId={project}&deviceId={device}&backupType=MASTER&timestamp=123")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn missing_or_invalid_parameter_gets_400_naming_it(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let device = client.create_device(project, "d").await.unwrap().device.id;
    let token = Some(server.token.as_str());

    let (status, body) = call(
        &server,
        token,
        reqwest::Method::POST,
        &format!("/api/v1/backup/init-backup?projectId={project}"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&body).contains("deviceId"), "{body}");
    let (status, body) = call(
        &server,
        token,
        reqwest::Method::GET,
        &format!("/api/v1/backup/list?projectId=abc&deviceId={device}"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&body).contains("projectId"), "{body}");
    let (status, body) = call(
        &server,
        token,
        reqwest::Method::POST,
        &format!("/api/v1/backup/get?projectId={project}&deviceId={device}&backupType=MASTER"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&body).contains("timestamp"), "{body}");
    let (status, body) = call(
        &server,
        token,
        reqwest::Method::POST,
        &format!("/api/v1/backup/put?projectId={project}&deviceId={device}&backupType=PARTIAL"),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(message(&body).contains("backupType"), "{body}");
}

e2e_tests!(
    tokens_missing_unknown_revoked_or_expired_get_401,
    scoped_token_gets_403_for_other_project,
    unknown_project_device_or_backup_gets_404,
    missing_or_invalid_parameter_gets_400_naming_it,
);
