//! Starts a real server on loopback ports in a temporary data folder.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use edgekeep_api::agent::DeviceFacts;
use edgekeep_api::{AgentClient, Client};
use edgekeep_archive::{ArchivePath, PackItem, PackSummary, SourceInfo};
use edgekeep_server::{Config, RunningServer};

#[macro_use]
mod database;
pub mod garage;

pub use database::StoreChoice;

pub struct TestServer {
    pub server: RunningServer,
    pub dir: tempfile::TempDir,
    pub admin_token: String,
}

impl TestServer {
    pub fn client(&self) -> Client {
        Client::new(&self.server.api_url, &self.admin_token)
    }

    pub fn data_dir(&self) -> &Path {
        self.dir.path()
    }

    pub async fn stop(self) -> tempfile::TempDir {
        self.server.shutdown().await;
        self.dir
    }
}

pub const ADMIN_TOKEN: &str = "ek_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// Builds a configuration on loopback ports chosen by the kernel.
pub fn test_config(data_dir: &Path) -> Config {
    let mut config = Config::new(data_dir);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.s3_listen = "127.0.0.1:0".parse().unwrap();
    config.admin_token = Some(ADMIN_TOKEN.to_string());
    config
}

pub async fn start(store: &StoreChoice) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    start_with(dir, store, |_| {}).await
}

pub async fn start_with(
    dir: tempfile::TempDir,
    store: &StoreChoice,
    adjust: impl FnOnce(&mut Config),
) -> TestServer {
    let mut config = test_config(dir.path());
    config.database_url = store.database_url();
    adjust(&mut config);
    let server = edgekeep_server::start(config).await.unwrap();
    TestServer {
        server,
        dir,
        admin_token: ADMIN_TOKEN.to_string(),
    }
}

pub fn facts() -> DeviceFacts {
    DeviceFacts {
        arch: "x86_64".into(),
        platform_version: "3.1.0".into(),
        agent_version: "0.1.0".into(),
        hostname: "gateway-1".into(),
    }
}

/// Creates a project and a device and activates an agent for it. Returns
/// the project id, the device and the agent client.
pub async fn project_with_agent(
    server: &TestServer,
    device_name: &str,
) -> (i64, edgekeep_api::Device, AgentClient) {
    let client = server.client();
    let project = client.create_project("plant").await.unwrap();
    let (device, agent) = add_agent(server, project.id, device_name).await;
    (project.id, device, agent)
}

pub async fn add_agent(
    server: &TestServer,
    project_id: i64,
    device_name: &str,
) -> (edgekeep_api::Device, AgentClient) {
    let client = server.client();
    let activation = client.create_device(project_id, device_name).await.unwrap();
    let mut agent = AgentClient::new(&server.server.api_url, None);
    let response = agent
        .activate(&activation.activation_code, &facts())
        .await
        .unwrap();
    agent.set_credential(response.credential);
    (activation.device, agent)
}

/// Packs a small device state into a `.dat` file recording `device_uid` as
/// its source.
pub fn make_archive(dir: &Path, device_uid: &str) -> (PathBuf, PackSummary) {
    let state = dir.join(format!("state-{device_uid}"));
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("flows.json"), br#"{"flows": [1, 2, 3]}"#).unwrap();
    std::fs::write(state.join("tags.csv"), "tag,address\nt1,40001\n").unwrap();
    let items = ["flows.json", "tags.csv"].map(|name| PackItem {
        path: ArchivePath::from_bytes(name.as_bytes()),
        source: state.join(name),
    });
    let source = SourceInfo {
        device_uid: device_uid.to_string(),
        device_name: "gateway-1".into(),
        arch: "x86_64".into(),
        platform_version: "3.1.0".into(),
        agent_version: "0.1.0".into(),
        hostname: "gateway-1".into(),
    };
    let out = dir.join(format!("{device_uid}.dat"));
    let summary = edgekeep_archive::pack(&items, &source, &out, &mut |_| {}).unwrap();
    (out, summary)
}

/// PUTs a file to a pre-signed URL with no other authentication.
pub async fn put_file(url: &str, path: &Path) -> reqwest::StatusCode {
    let body = std::fs::read(path).unwrap();
    reqwest::Client::new()
        .put(url)
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
}

/// Polls `check` every 100 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        if let Some(value) = check().await {
            return Some(value);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}
