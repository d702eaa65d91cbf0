//! Setting up the simulated fleet: the project, the devices and their
//! activation codes, the device folders, and one in-process agent per
//! device.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use edgekeep_api::client::is_retryable;
use edgekeep_api::{ApiError, DeviceActivation};
use futures::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::Instrument;

use super::devices::{DeviceFolder, StateShape};
use super::servers::Servers;
use super::workload::SimDevice;

/// Devices created, or folders written, at the same time during setup.
const SETUP_CONCURRENCY: usize = 16;

/// How long stopped agents get to finish their current job.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Interval of the setup progress lines.
const SETUP_PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

/// The project the simulated devices are created in.
#[derive(Debug, Clone)]
pub enum ProjectChoice {
    Existing(i64),
    New(String),
}

/// Returns the id of the project, creating it when asked.
pub async fn open_project(servers: &Servers, project: &ProjectChoice) -> anyhow::Result<i64> {
    match project {
        ProjectChoice::Existing(id) => {
            let id = *id;
            servers
                .call(|client| async move { client.list_devices(id).await })
                .await
                .with_context(|| format!("failed to open project {id}; check --project-id"))?;
            Ok(id)
        }
        // Creating a project is not repeated on another address, because a
        // lost response would leave a second project behind.
        ProjectChoice::New(name) => {
            let client = servers.rotation().next().await;
            let project = client
                .create_project(name)
                .await
                .with_context(|| format!("failed to create project {name:?}"))?;
            eprintln!("created project {} ({name})", project.id);
            Ok(project.id)
        }
    }
}

/// A simulated device once created: its ids, activation code and folder.
pub struct CreatedDevice {
    pub device: SimDevice,
    pub activation_code: String,
    pub folder: DeviceFolder,
}

/// Creates `count` devices named `sim-TAG-INDEX` in the project and writes
/// their folders under `run_dir`.
pub async fn create_devices(
    servers: &Arc<Servers>,
    project_id: i64,
    run_dir: &Path,
    tag: &str,
    count: usize,
    shape: StateShape,
) -> anyhow::Result<Vec<CreatedDevice>> {
    let created = futures::stream::iter(0..count)
        .map(|index| {
            let servers = servers.clone();
            let name = format!("sim-{tag}-{index:05}");
            let folder = DeviceFolder::new(run_dir, index);
            async move {
                let activation = create_device(&servers, project_id, &name)
                    .await
                    .with_context(|| format!("failed to create device {name}"))?;
                let layout = folder.clone();
                tokio::task::spawn_blocking(move || layout.lay_out(index, shape))
                    .await
                    .context("the folder task panicked")??;
                anyhow::Ok(CreatedDevice {
                    device: SimDevice {
                        index,
                        id: activation.device.id,
                    },
                    activation_code: activation.activation_code,
                    folder,
                })
            }
        })
        .buffered(SETUP_CONCURRENCY);
    let mut created = std::pin::pin!(created);

    let mut devices = Vec::with_capacity(count);
    let mut last_line = Instant::now();
    while let Some(device) = created.next().await {
        devices.push(device?);
        if last_line.elapsed() >= SETUP_PROGRESS_INTERVAL {
            eprintln!("created {}/{count} devices", devices.len());
            last_line = Instant::now();
        }
    }
    eprintln!("created {count} devices in project {project_id}");
    Ok(devices)
}

/// Creates one device. When a response is lost and the retry finds the name
/// taken, the lost request created the device, so a new activation code is
/// issued for it instead.
async fn create_device(
    servers: &Servers,
    project_id: i64,
    name: &str,
) -> Result<DeviceActivation, ApiError> {
    let mut rotation = servers.rotation();
    let mut uncertain = false;
    loop {
        let client = rotation.next().await;
        match client.create_device(project_id, name).await {
            Ok(activation) => return Ok(activation),
            Err(err) if is_retryable(&err) => {
                uncertain = true;
                rotation.failed(client, &err)?;
            }
            Err(err) if err.status == 409 && uncertain => break,
            Err(err) => return Err(err),
        }
    }
    let devices = servers
        .call(|client| async move { client.list_devices(project_id).await })
        .await?;
    let device = devices
        .into_iter()
        .find(|device| device.name == name)
        .ok_or_else(|| ApiError {
            status: 409,
            message: format!(
                "device name {name:?} is taken, but no device of project {project_id} has it"
            ),
        })?;
    servers
        .call(|client| async move { client.new_activation_code(project_id, device.id).await })
        .await
}

/// The agents running in this process, one task per device.
pub struct Agents {
    tasks: Vec<(i64, JoinHandle<edgekeep_agent::Result<()>>)>,
    stop: watch::Sender<bool>,
}

impl Agents {
    /// Starts one agent per device. Device `i` gets the server list rotated
    /// by `i`, so the agents spread their long polls over the replicas.
    pub fn start(devices: &[CreatedDevice], server_urls: &[String]) -> Self {
        let (stop, stopped) = watch::channel(false);
        let http = edgekeep_api::client::agent_http_client();
        let tasks = devices
            .iter()
            .map(|created| {
                let mut urls = server_urls.to_vec();
                let shift = created.device.index % urls.len();
                urls.rotate_left(shift);
                let options = edgekeep_agent::AgentOptions {
                    server_url: urls.join(","),
                    activation_code: Some(created.activation_code.clone()),
                    state_dir: created.folder.state(),
                    config_path: Some(created.folder.config()),
                    home: Some(created.folder.home()),
                    http: Some(http.clone()),
                    timeouts: edgekeep_api::AgentTimeouts::default(),
                };
                let span = tracing::info_span!(
                    "device",
                    index = created.device.index,
                    device_id = created.device.id
                );
                let agent = edgekeep_agent::run_until(options, stopped.clone()).instrument(span);
                (created.device.id, tokio::spawn(agent))
            })
            .collect();
        Agents { tasks, stop }
    }

    /// Returns an error naming the first agent that already stopped.
    pub async fn check_running(&mut self) -> anyhow::Result<()> {
        let Some(position) = self.tasks.iter().position(|(_, task)| task.is_finished()) else {
            return Ok(());
        };
        let (device_id, task) = self.tasks.swap_remove(position);
        let reason = match task.await {
            Ok(Ok(())) => "it stopped without an error".to_string(),
            Ok(Err(err)) => err.to_string(),
            Err(err) => format!("it panicked: {err}"),
        };
        anyhow::bail!("the agent of device {device_id} stopped during setup: {reason}")
    }

    /// Stops every agent after its current job and returns the errors of
    /// those that failed, as `device ID: error`.
    pub async fn stop(self) -> Vec<String> {
        let _ = self.stop.send(true);
        let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
        let mut errors = Vec::new();
        for (device_id, mut task) in self.tasks {
            match tokio::time::timeout_at(deadline, &mut task).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => errors.push(format!("device {device_id}: {err}")),
                Ok(Err(err)) => errors.push(format!("device {device_id}: panicked: {err}")),
                Err(_) => {
                    task.abort();
                    errors.push(format!(
                        "device {device_id}: the agent did not stop within {} s",
                        AGENT_STOP_TIMEOUT.as_secs()
                    ));
                }
            }
        }
        errors
    }
}

/// Waits until every device of `devices` is online, failing when an agent
/// stops, the deadline passes or `stop` turns true.
pub async fn wait_online(
    servers: &Servers,
    project_id: i64,
    devices: &[CreatedDevice],
    agents: &mut Agents,
    deadline: Instant,
    stop: &watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let ours: std::collections::HashSet<i64> =
        devices.iter().map(|created| created.device.id).collect();
    let mut last_line = Instant::now();
    loop {
        agents.check_running().await?;
        let listed = servers
            .call(|client| async move { client.list_devices(project_id).await })
            .await?;
        let online = listed
            .iter()
            .filter(|device| device.online && ours.contains(&device.id))
            .count();
        if online == ours.len() {
            eprintln!("{online}/{} devices online", ours.len());
            return Ok(());
        }
        if *stop.borrow() {
            anyhow::bail!(
                "interrupted while {online}/{} devices were online",
                ours.len()
            );
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "only {online}/{} devices came online before the timeout; raise --timeout or \
                 check the warnings above",
                ours.len()
            );
        }
        if last_line.elapsed() >= SETUP_PROGRESS_INTERVAL {
            eprintln!("{online}/{} devices online", ours.len());
            last_line = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
