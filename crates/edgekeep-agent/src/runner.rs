//! The job loop: activation, crash recovery, long polling with backoff, and
//! a clean stop on SIGINT or SIGTERM.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use edgekeep_api::agent::{DeviceFacts, JobResult};
use edgekeep_api::client::{is_retryable, parse_server_urls};
use edgekeep_api::{AgentClient, AgentTimeouts};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::config::AgentConfig;
use crate::error::{Error, IoContext, Result};
use crate::home::{AgentHome, Credential};
use crate::jobs::{JobContext, run_job};
use crate::journal::{recover, remove_journal};

/// How long the server may hold a poll open.
const POLL_WAIT: Duration = Duration::from_secs(25);
const BACKOFF_START: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Options of `edgekeep agent`.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Base URL of the server, or a comma-separated list of the base URLs
    /// of server replicas. The agent uses one at a time and moves on to the
    /// next when a call gets no response or a 502, 503 or 504.
    pub server_url: String,
    /// One-time code that activates this device. It is needed once, while the
    /// home contains no credential.
    pub activation_code: Option<String>,
    pub state_dir: PathBuf,
    pub config_path: Option<PathBuf>,
    /// The agent home; by default the state folder's sibling
    /// `<state-dir-name>.edgekeep-agent`.
    pub home: Option<PathBuf>,
    /// HTTP client for server calls and transfers; a new one when `None`.
    /// Agents that share a process share one to save memory.
    pub http: Option<reqwest::Client>,
    /// Request timeouts of the server calls. A call that times out moves the
    /// agent on to the next server.
    pub timeouts: AgentTimeouts,
}

/// Collects the facts this device reports to the server.
pub fn device_facts(config: &AgentConfig) -> DeviceFacts {
    DeviceFacts {
        arch: std::env::consts::ARCH.to_string(),
        platform_version: config.platform_version(),
        agent_version: crate::AGENT_VERSION.to_string(),
        hostname: hostname(),
    }
}

fn hostname() -> String {
    let mut buffer = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, and gethostname
    // writes at most that many bytes.
    let rc = unsafe { libc::gethostname(buffer.as_mut_ptr().cast(), buffer.len()) };
    if rc != 0 {
        return "unknown".to_string();
    }
    let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
    String::from_utf8_lossy(&buffer[..end]).into_owned()
}

/// Runs the agent until SIGINT or SIGTERM, or until its credential is
/// revoked.
pub async fn run(options: AgentOptions) -> Result<()> {
    let shutdown = watch_shutdown_signals()?;
    run_until(options, shutdown).await
}

/// Runs the agent until `shutdown` turns true or the credential is revoked.
/// It installs no signal handlers, so one process can run several agents.
pub async fn run_until(options: AgentOptions, shutdown: watch::Receiver<bool>) -> Result<()> {
    // Resolve the servers, the state, the config and the home.
    check_server_urls(&options.server_url)?;
    let state_dir = options
        .state_dir
        .canonicalize()
        .at("opening state folder", &options.state_dir)?;
    let config = match &options.config_path {
        Some(path) => AgentConfig::load(path)?,
        None => AgentConfig::default(),
    };
    let home_dir = match &options.home {
        Some(dir) => dir.clone(),
        None => AgentHome::default_dir(&state_dir)?,
    };
    let home = AgentHome::open(&home_dir, &state_dir)?;
    let facts = device_facts(&config);

    // Settle any restore that a stop interrupted before anything else, so
    // the state is whole even when activation fails.
    // Then delete the work files of jobs that a kill cut short.
    let recovered = {
        let (home, state_dir) = (home.clone(), state_dir.clone());
        let post_restore = config.hooks.post_restore.clone();
        tokio::task::spawn_blocking(move || {
            let recovered = recover(&home, &state_dir, post_restore.as_ref())?;
            let keep = recovered.as_ref().map(|journal| journal.staging.as_path());
            home.remove_leftovers(keep)?;
            Ok::<_, Error>(recovered)
        })
        .await
        .expect("the recovery task does not panic")?
    };

    // Activate once, then report the settled restore.
    let http = options
        .http
        .clone()
        .unwrap_or_else(edgekeep_api::client::agent_http_client);
    let mut client = AgentClient::with_http(http.clone(), &options.server_url, None)
        .with_timeouts(options.timeouts);
    let Some(credential) = load_or_activate(&client, &home, &options, &facts, &shutdown).await?
    else {
        tracing::info!("agent stopped before activation");
        return Ok(());
    };
    client.set_credential(credential.credential.clone());
    tracing::info!(
        device_id = credential.device_id,
        device_uid = %credential.device_uid,
        servers = %client.base_urls().join(","),
        state_dir = %state_dir.display(),
        home = %home.dir().display(),
        "agent started"
    );
    if let Some(journal) = recovered {
        report_with_retry(&client, journal.job_id, &journal.result(), &shutdown).await?;
        remove_journal(&home)?;
    }

    let context = Arc::new(JobContext {
        client: client.clone(),
        http,
        config,
        state_dir,
        home,
        device_uid: credential.device_uid.clone(),
        device_name: credential.device_name.clone(),
        facts: facts.clone(),
    });
    poll_jobs(&context, &shutdown).await
}

/// Checks that the comma-separated server list has at least one entry and
/// that each entry is a server base URL (see [`invalid_server_url`]).
fn check_server_urls(list: &str) -> Result<()> {
    let urls = parse_server_urls(list);
    if urls.is_empty() {
        return Err(Error::ServerList(list.to_string()));
    }
    for entry in urls {
        if let Some(reason) = invalid_server_url(&entry) {
            return Err(Error::ServerUrl { entry, reason });
        }
    }
    Ok(())
}

/// Returns why `entry` cannot be a server base URL, or `None` when it can.
/// The agent appends its call paths to the URL, so a query or fragment
/// would swallow them.
fn invalid_server_url(entry: &str) -> Option<String> {
    let url = match reqwest::Url::parse(entry) {
        Ok(url) => url,
        Err(err) => return Some(format!("it is not a URL ({err})")),
    };
    if !matches!(url.scheme(), "http" | "https") {
        return Some(format!("the scheme is {}, not http or https", url.scheme()));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Some("it has no host".to_string());
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Some("it has a query or fragment".to_string());
    }
    None
}

/// Long-polls for jobs and runs them one at a time until shutdown.
async fn poll_jobs(context: &Arc<JobContext>, shutdown: &watch::Receiver<bool>) -> Result<()> {
    let mut backoff = Backoff::default();
    let mut shutdown_changed = shutdown.clone();
    loop {
        if *shutdown.borrow() {
            tracing::info!("agent stopped");
            return Ok(());
        }
        let polled = tokio::select! {
            polled = context.client.next_job(&context.facts, POLL_WAIT) => polled,
            _ = shutdown_changed.changed() => continue,
        };
        match polled {
            Ok(None) => backoff.reset(),
            Ok(Some(job)) => {
                backoff.reset();
                let job_id = job.job_id();
                let result = run_job(context.clone(), job).await;
                report_with_retry(&context.client, job_id, &result, shutdown).await?;
                if crate::journal::Journal::read(&context.home)?.is_some() {
                    remove_journal(&context.home)?;
                }
            }
            Err(err) if err.status == 401 => {
                tracing::error!(error = %err, "the server rejected the device credential");
                return Err(Error::Credential(format!(
                    "the server rejected the device credential ({err}): it was revoked or a new \
                     activation code was issued; restart the agent with --activation-code"
                )));
            }
            Err(err) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    error = %err,
                    retry_in_ms = delay.as_millis() as u64,
                    next_server = context.client.base_url(),
                    "polling for jobs failed"
                );
                if !is_retryable(&err) {
                    tracing::debug!(status = err.status, "the poll error is not a server error");
                }
                sleep_or_shutdown(delay, shutdown).await;
            }
        }
    }
}

/// Reports a job result, retrying network errors and 5xx with backoff. A
/// shutdown ends the retries; the server then fails the job when the agent
/// polls again.
///
/// A 4xx response is logged and not returned, so the agent goes on polling:
/// a 404 or 409 means the server no longer takes a result for the job (it
/// ended, or was deleted), and retrying cannot change that. A revoked
/// credential shows up as a 401 at the next poll, which stops the agent.
async fn report_with_retry(
    client: &AgentClient,
    job_id: i64,
    result: &JobResult,
    shutdown: &watch::Receiver<bool>,
) -> Result<()> {
    let mut backoff = Backoff::default();
    loop {
        match client.report_result(job_id, result).await {
            Ok(()) => {
                tracing::info!(job_id, ok = result.ok, "reported job result");
                return Ok(());
            }
            Err(err) if is_retryable(&err) && !*shutdown.borrow() => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    job_id,
                    error = %err,
                    retry_in_ms = delay.as_millis() as u64,
                    next_server = client.base_url(),
                    "reporting the job result failed"
                );
                sleep_or_shutdown(delay, shutdown).await;
            }
            Err(err) if (400..500).contains(&err.status) => {
                tracing::warn!(
                    job_id,
                    status = err.status,
                    error = %err,
                    "the server did not take the job result; polling for the next job"
                );
                return Ok(());
            }
            Err(err) => {
                tracing::error!(job_id, error = %err, "reporting the job result failed");
                return Err(err.into());
            }
        }
    }
}

async fn sleep_or_shutdown(delay: Duration, shutdown: &watch::Receiver<bool>) {
    let mut shutdown = shutdown.clone();
    tokio::select! {
        _ = tokio::time::sleep(delay) => {}
        _ = shutdown.wait_for(|stop| *stop) => {}
    }
}

/// Turns SIGINT and SIGTERM into a flag the loop checks between jobs.
fn watch_shutdown_signals() -> Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (sender, receiver) = watch::channel(false);
    let mut interrupt = signal(SignalKind::interrupt()).at("listening for", "SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).at("listening for", "SIGTERM")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => tracing::info!("SIGINT received; stopping after the current job"),
            _ = terminate.recv() => tracing::info!("SIGTERM received; stopping after the current job"),
        }
        let _ = sender.send(true);
    });
    Ok(receiver)
}

/// Exponential backoff from 1 s to 30 s, each delay shortened by up to 25 %
/// at random.
#[derive(Debug, Default)]
pub(crate) struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub(crate) fn next_delay(&mut self) -> Duration {
        let base = BACKOFF_START
            .saturating_mul(1 << self.attempt.min(5))
            .min(BACKOFF_MAX);
        self.attempt += 1;
        // Jitter spreads the reconnects of many devices after an outage.
        let jitter = rand::thread_rng().gen_range(0.0..0.25);
        base.mul_f64(1.0 - jitter)
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }
}

fn code_digest(code: &str) -> String {
    hex::encode(Sha256::digest(code.as_bytes()))
}

/// Returns the stored credential, activating with the code when there is
/// none or when a new code for the same device was given. Returns `None`
/// when `shutdown` turns true before an activation succeeded.
async fn load_or_activate(
    client: &AgentClient,
    home: &AgentHome,
    options: &AgentOptions,
    facts: &DeviceFacts,
    shutdown: &watch::Receiver<bool>,
) -> Result<Option<Credential>> {
    let stored = home.load_credential()?;
    let code = options.activation_code.as_deref().filter(|c| !c.is_empty());
    let code = match (stored, code) {
        (Some(stored), None) => return Ok(Some(stored)),
        (Some(stored), Some(code))
            if stored.activation_code_sha256.as_deref() == Some(code_digest(code).as_str()) =>
        {
            return Ok(Some(stored));
        }
        (None, None) => {
            return Err(Error::Credential(format!(
                "{} contains no device credential; start the agent once with --activation-code \
                 (or EDGEKEEP_ACTIVATION_CODE) from `edgekeep device create`",
                home.dir().display()
            )));
        }
        (stored, Some(code)) => (stored, code),
    };
    let (stored, code) = code;

    // Activate, retrying only while the server is unreachable. A shutdown
    // ends the call in flight, which may wait for its timeout otherwise.
    let mut backoff = Backoff::default();
    let mut stopping = shutdown.clone();
    let activated = loop {
        let activation = tokio::select! {
            activation = client.activate(code, facts) => activation,
            _ = stopping.wait_for(|stop| *stop) => return Ok(None),
        };
        match activation {
            Ok(activated) => break activated,
            Err(_) if *shutdown.borrow() => return Ok(None),
            Err(err) if is_retryable(&err) => {
                let delay = backoff.next_delay();
                tracing::warn!(
                    error = %err,
                    retry_in_ms = delay.as_millis() as u64,
                    next_server = client.base_url(),
                    "activation failed"
                );
                sleep_or_shutdown(delay, shutdown).await;
            }
            Err(err) => {
                return Err(Error::Credential(format!(
                    "activation failed: {err}; ask for a new activation code"
                )));
            }
        }
    };
    if let Some(stored) = stored
        && stored.device_uid != activated.device_uid
    {
        return Err(Error::Credential(format!(
            "the activation code is for device {} ({}), but {} contains the credential of device \
             {} ({}); delete that file to move this agent to the other device",
            activated.device_id,
            activated.device_uid,
            home.credential_path().display(),
            stored.device_id,
            stored.device_uid
        )));
    }
    let credential = Credential {
        server_url: options.server_url.clone(),
        project_id: activated.project_id,
        device_id: activated.device_id,
        device_uid: activated.device_uid,
        device_name: activated.device_name,
        credential: activated.credential,
        activation_code_sha256: Some(code_digest(code)),
    };
    home.save_credential(&credential)?;
    tracing::info!(device_id = credential.device_id, "device activated");
    Ok(Some(credential))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap() {
        let mut backoff = Backoff::default();
        let first = backoff.next_delay();
        assert!(first > Duration::from_millis(750), "{first:?}");
        assert!(first <= Duration::from_secs(1), "{first:?}");
        for _ in 0..10 {
            backoff.next_delay();
        }
        let capped = backoff.next_delay();
        assert!(capped > Duration::from_millis(22_500), "{capped:?}");
        assert!(capped <= BACKOFF_MAX, "{capped:?}");
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_secs(1));
    }

    #[test]
    fn server_url_check_accepts_base_urls() {
        for entry in [
            "http://10.0.0.5:8080",
            "https://manager.plant.example",
            "http://[::1]:8080",
            "https://proxy.plant.example/edgekeep",
        ] {
            assert_eq!(invalid_server_url(entry), None, "{entry}");
        }
    }

    #[test]
    fn server_url_check_rejects_other_entries() {
        for (entry, reason) in [
            ("10.0.0.5:8080", "not a URL"),
            ("localhost:8080", "scheme is localhost"),
            ("ftp://10.0.0.5", "scheme is ftp"),
            ("http://", "not a URL"),
            ("file:///var/lib/edgekeep", "scheme is file"),
            ("http://10.0.0.5:8080?x=1", "query or fragment"),
            ("http://10.0.0.5:8080#top", "query or fragment"),
        ] {
            let found = invalid_server_url(entry);
            assert!(
                found.as_deref().is_some_and(|found| found.contains(reason)),
                "{entry}: expected {reason:?}, got {found:?}"
            );
        }
    }
}
