//! Starting and stopping the server and agent processes of the quickstart.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::process::{Child, Command};

/// A child process that is stopped with SIGTERM when dropped or stopped.
pub struct Process {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Process {
    /// Starts `edgekeep ARGS` with its output in `log`.
    pub fn spawn(
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("cannot find the edgekeep executable")?;
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(exe);
        command
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .with_context(|| format!("cannot start the {name}"))?;
        Ok(Process {
            name: name.to_string(),
            child,
            log,
        })
    }

    /// Fails with the end of the log if the process has exited.
    pub fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!(
                "the {} exited with {status}; the end of {}:\n{}",
                self.name,
                self.log.display(),
                log_tail(&self.log, 15)
            );
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to 10 s before killing.
    pub async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) with a pid of our own child has no memory effects.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Returns the last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Endpoints the server writes to `DATA/endpoints.json` once it listens.
#[derive(Debug, serde::Deserialize)]
pub struct Endpoints {
    pub api: String,
    pub s3: String,
}

/// Waits until the server has written its endpoints and `/healthz` returns 200.
pub async fn wait_for_server(
    server: &mut Process,
    data_dir: &Path,
    timeout: Duration,
) -> anyhow::Result<Endpoints> {
    let deadline = Instant::now() + timeout;
    let file = data_dir.join("endpoints.json");
    loop {
        server.check_running()?;
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(endpoints) = serde_json::from_str::<Endpoints>(&text)
        {
            let health = reqwest::get(format!("{}/healthz", endpoints.api)).await;
            if health.is_ok_and(|r| r.status().is_success()) {
                return Ok(endpoints);
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "the server did not respond within {}s; see {}",
                timeout.as_secs(),
                server.log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
