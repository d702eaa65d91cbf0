//! `edgekeep quickstart`: runs the whole backup and restore workflow on this
//! machine, against a real server and real agents, and checks the result.

mod compare;
mod gateway;
mod lem;
mod processes;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use edgekeep_api::{BACKUP_TYPE_MASTER, Client, DOWNLOAD_URL_EXPIRY_SECS, Device};
use rand::RngCore;
use reqwest::Method;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::cli::parse_duration;
use lem::LemClient;
use processes::Process;

#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Folder for the server data, device states and logs. Default: a new
    /// temporary folder, removed afterwards when every check passed.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the folder even when every check passed.
    #[arg(long)]
    keep: bool,
    /// Give up when one step takes longer than this, such as 120s.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    step_timeout: Duration,
}

/// One example device: its server record and state folder.
struct Gateway {
    device: Device,
    state: PathBuf,
}

/// The results of the checks, printed at the end.
#[derive(Default)]
struct Checks {
    results: Vec<(String, Result<(), String>)>,
}

impl Checks {
    fn pass(&mut self, name: impl Into<String>) {
        let name = name.into();
        println!("  ok: {name}");
        self.results.push((name, Ok(())));
    }

    fn fail(&mut self, name: impl Into<String>, why: impl Into<String>) {
        let (name, why) = (name.into(), why.into());
        println!("  FAILED: {name}: {why}");
        self.results.push((name, Err(why)));
    }

    fn check(&mut self, name: impl Into<String>, result: anyhow::Result<()>) -> bool {
        match result {
            Ok(()) => {
                self.pass(name);
                true
            }
            Err(err) => {
                self.fail(name, format!("{err:#}"));
                false
            }
        }
    }

    fn failed(&self) -> Vec<&(String, Result<(), String>)> {
        self.results.iter().filter(|(_, r)| r.is_err()).collect()
    }
}

pub async fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    let (root, temporary) = match &args.dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            (dir.canonicalize()?, None)
        }
        None => {
            let dir = tempfile::Builder::new()
                .prefix("edgekeep-quickstart-")
                .tempdir()?;
            (dir.path().to_path_buf(), Some(dir))
        }
    };
    println!("edgekeep quickstart in {}", root.display());

    let mut checks = Checks::default();
    let outcome = Workflow::new(&root, args.step_timeout)
        .run(&mut checks)
        .await;
    if let Err(err) = &outcome {
        checks.fail("workflow", format!("{err:#}"));
    }

    let failed = checks.failed();
    println!();
    if failed.is_empty() {
        println!("all {} checks passed", checks.results.len());
        match temporary {
            Some(dir) if !args.keep => drop(dir),
            Some(dir) => println!("kept {}", dir.keep().display()),
            None => println!("kept {}", root.display()),
        }
        return Ok(());
    }
    if let Some(dir) = temporary {
        let _ = dir.keep();
    }
    println!(
        "{} of {} checks failed:",
        failed.len(),
        checks.results.len()
    );
    for (name, result) in &failed {
        println!(
            "  {name}: {}",
            result.as_ref().err().map(String::as_str).unwrap_or("")
        );
    }
    println!("logs and states are in {}", root.display());
    anyhow::bail!("{} checks failed", failed.len())
}

struct Workflow {
    root: PathBuf,
    timeout: Duration,
    processes: Vec<Process>,
}

impl Workflow {
    fn new(root: &Path, timeout: Duration) -> Self {
        Workflow {
            root: root.to_path_buf(),
            timeout,
            processes: Vec::new(),
        }
    }

    async fn run(mut self, checks: &mut Checks) -> anyhow::Result<()> {
        let result = self.run_steps(checks).await;
        for process in self.processes.drain(..).rev() {
            process.stop().await;
        }
        result
    }

    async fn run_steps(&mut self, checks: &mut Checks) -> anyhow::Result<()> {
        std::fs::create_dir_all(self.root.join("logs"))?;

        // Start a server on free loopback ports with a fresh data folder.
        println!("\n1. Start a server on free loopback ports");
        let token = format!("ek_{}", random_hex(32));
        let data_dir = self.root.join("server");
        std::fs::create_dir_all(&data_dir)?;
        let data_arg = data_dir.to_str().context("the folder path is not UTF-8")?;
        let mut server = Process::spawn(
            "server",
            &[
                "server",
                "--data-dir",
                data_arg,
                "--listen",
                "127.0.0.1:0",
                "--s3-listen",
                "127.0.0.1:0",
            ],
            &[("EDGEKEEP_ADMIN_TOKEN", &token)],
            self.root.join("logs/server.log"),
        )?;
        let endpoints = processes::wait_for_server(&mut server, &data_dir, self.timeout).await?;
        self.processes.push(server);
        println!("  API {} and S3 {}", endpoints.api, endpoints.s3);
        let client = Client::new(&endpoints.api, &token);

        // Create a project and three devices, and start their agents.
        println!("\n2. Create a project and three gateways, start their agents");
        let project = client.create_project("plant-1").await?;
        println!("  project {} ({})", project.id, project.name);
        let mut gateways = Vec::new();
        for (letter, name) in [
            ("a", "press-line-a"),
            ("b", "press-line-b"),
            ("c", "press-line-c"),
        ] {
            gateways.push(self.add_gateway(&client, project.id, letter, name).await?);
        }
        self.wait_online(&client, project.id, &gateways).await?;
        checks.pass("three agents activated and online");

        let lem = LemClient::new(&endpoints.api, &token);
        let [a, b, c] = &gateways[..] else {
            unreachable!("three gateways were added")
        };
        self.lem_workflow(checks, &lem, project.id, a, b, c).await
    }

    async fn add_gateway(
        &mut self,
        client: &Client,
        project_id: i64,
        letter: &'static str,
        name: &str,
    ) -> anyhow::Result<Gateway> {
        let activation = client.create_device(project_id, name).await?;
        let folder = self.root.join("devices").join(name);
        let state = folder.join("state");
        std::fs::create_dir_all(&state)?;
        gateway::lay_out(&state, letter)?;
        let config = folder.join("agent.toml");
        std::fs::write(&config, gateway::AGENT_CONFIG)?;
        println!(
            "  device {} ({name}), state in {}",
            activation.device.id,
            state.display()
        );

        let server_url = client.base_url().to_string();
        let agent = Process::spawn(
            &format!("agent of {name}"),
            &[
                "agent",
                "--server",
                &server_url,
                "--activation-code",
                &activation.activation_code,
                "--state-dir",
                state.to_str().context("the folder path is not UTF-8")?,
                "--config",
                config.to_str().context("the folder path is not UTF-8")?,
            ],
            &[],
            self.root.join(format!("logs/agent-{name}.log")),
        )?;
        self.processes.push(agent);
        Ok(Gateway {
            device: activation.device,
            state,
        })
    }

    async fn wait_online(
        &mut self,
        client: &Client,
        project_id: i64,
        gateways: &[Gateway],
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + self.timeout;
        loop {
            for process in &mut self.processes {
                process.check_running()?;
            }
            let devices = client.list_devices(project_id).await?;
            let online = gateways
                .iter()
                .filter(|g| devices.iter().any(|d| d.id == g.device.id && d.online))
                .count();
            if online == gateways.len() {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{online} of {} agents came online within {}s; see the agent logs in {}",
                    gateways.len(),
                    self.timeout.as_secs(),
                    self.root.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs the LEM client's steps: back up A, download, relocate onto C,
    /// restore onto B, and check B.
    async fn lem_workflow(
        &mut self,
        checks: &mut Checks,
        lem: &LemClient,
        project: i64,
        a: &Gateway,
        b: &Gateway,
        c: &Gateway,
    ) -> anyhow::Result<()> {
        let backup = self.back_up(checks, lem, project, a).await?;
        let (file, bytes) = self.download(checks, lem, project, a, &backup).await?;
        self.relocate(checks, lem, project, c, &bytes, &backup, a.device.id)
            .await?;
        let identity_before = read_identity(&b.state)?;
        if self.restore(checks, lem, project, a, b, &backup).await? {
            self.check_clone(checks, &file, a, b, &identity_before)?;
        }
        Ok(())
    }

    /// Backs up device A while its historian is being written and returns
    /// the listed backup.
    async fn back_up(
        &mut self,
        checks: &mut Checks,
        lem: &LemClient,
        project: i64,
        a: &Gateway,
    ) -> anyhow::Result<Listed> {
        println!(
            "\n3. Back up {} while its historian is written",
            a.device.name
        );
        let writer = gateway::HistorianWriter::start(&a.state.join(gateway::HISTORIAN))?;
        let response = lem
            .call(
                Method::POST,
                "/api/v1/backup/init-backup",
                &ids(project, a),
                false,
            )
            .await?;
        response.content("init-backup")?;
        let backup = self.poll_list(lem, &ids(project, a)).await;
        let rows = writer.stop()?;
        let backup = backup?;
        println!("  the historian writer added {rows} rows meanwhile");
        checks.pass(format!("backup of {} listed", a.device.name));
        Ok(Listed {
            timestamp: backup["timestamp"]
                .as_i64()
                .context("the listed backup has no timestamp")?,
            checksum: backup["checksum"].as_str().unwrap_or_default().to_string(),
        })
    }

    /// Gets the download URL and fetches the file with no auth header.
    async fn download(
        &mut self,
        checks: &mut Checks,
        lem: &LemClient,
        project: i64,
        a: &Gateway,
        backup: &Listed,
    ) -> anyhow::Result<(PathBuf, Vec<u8>)> {
        println!("\n4. Download the backup with a plain GET");
        let mut query = ids(project, a);
        query.push(("backupType", BACKUP_TYPE_MASTER.to_string()));
        query.push(("timestamp", backup.timestamp.to_string()));
        let response = lem
            .call(Method::POST, "/api/v1/backup/get", &query, false)
            .await?;
        let url = response
            .content("get")?
            .as_str()
            .context("get returned no URL")?
            .to_string();
        let expiry = format!("X-Amz-Expires={DOWNLOAD_URL_EXPIRY_SECS}");
        checks.check(
            "download URL valid for 7 days",
            check(url.contains(&expiry), format!("the URL lacks {expiry}")),
        );

        let file = self.root.join(format!("backup-{}.dat", backup.timestamp));
        let bytes = reqwest::get(&url)
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        std::fs::write(&file, &bytes)?;
        let digest = hex::encode(Sha256::digest(&bytes));
        println!("  fetched {} bytes, sha256 {}", bytes.len(), &digest[..16]);
        checks.check(
            "downloaded file matches the listed checksum",
            check(
                digest == backup.checksum,
                format!("sha256 {digest}, listed {}", backup.checksum),
            ),
        );
        Ok((file, bytes.to_vec()))
    }

    /// Relocates the file onto device C through a pre-signed upload URL and
    /// waits until C lists it.
    #[allow(clippy::too_many_arguments)]
    async fn relocate(
        &mut self,
        checks: &mut Checks,
        lem: &LemClient,
        project: i64,
        c: &Gateway,
        bytes: &[u8],
        backup: &Listed,
        source_device_id: i64,
    ) -> anyhow::Result<()> {
        println!("\n5. Relocate the file onto {} through put", c.device.name);
        let mut query = ids(project, c);
        query.push(("backupType", BACKUP_TYPE_MASTER.to_string()));
        let response = lem
            .call(Method::POST, "/api/v1/backup/put", &query, false)
            .await?;
        let put_url = response
            .content("put")?
            .as_str()
            .context("put returned no URL")?
            .to_string();
        let status = reqwest::Client::new()
            .put(&put_url)
            .body(bytes.to_vec())
            .send()
            .await?
            .status();
        println!(
            "  PUT {} bytes to the upload URL: HTTP {status}",
            bytes.len()
        );

        let relocated = self.poll_list(lem, &ids(project, c)).await?;
        checks.check(
            format!("relocated backup listed under {}", c.device.name),
            check(
                relocated["checksum"] == backup.checksum.as_str()
                    && relocated["sourceDeviceId"] == source_device_id,
                format!("listed as {relocated}"),
            ),
        );
        Ok(())
    }

    /// Restores A's backup onto device B; returns whether the job succeeded.
    async fn restore(
        &mut self,
        checks: &mut Checks,
        lem: &LemClient,
        project: i64,
        a: &Gateway,
        b: &Gateway,
        backup: &Listed,
    ) -> anyhow::Result<bool> {
        println!(
            "\n6. Restore {}'s backup onto {}",
            a.device.name, b.device.name
        );
        let mut query = ids(project, b);
        query.push(("backupType", BACKUP_TYPE_MASTER.to_string()));
        query.push(("timestamp", backup.timestamp.to_string()));
        query.push(("sourceDeviceId", a.device.id.to_string()));
        let response = lem
            .call(Method::POST, "/api/v1/backup/init-restore", &query, false)
            .await?;
        response.content("init-restore")?;
        let job_id = response
            .job_id
            .context("init-restore did not name its job")?;
        let job = self.poll_job(lem, job_id).await?;
        let restored = job["state"] == "succeeded";
        checks.check(
            format!("restore onto {} succeeded", b.device.name),
            check(restored, format!("job ended as {job}")),
        );
        Ok(restored)
    }

    /// Polls `list` until it has an entry, printing the first and last call,
    /// and returns the newest.
    async fn poll_list(&self, lem: &LemClient, query: &[(&str, String)]) -> anyhow::Result<Value> {
        let deadline = Instant::now() + self.timeout;
        let mut polls = 0;
        loop {
            let response = lem
                .call(Method::GET, "/api/v1/backup/list", query, polls > 0)
                .await?;
            polls += 1;
            let list = response
                .content("list")?
                .as_array()
                .cloned()
                .unwrap_or_default();
            if !list.is_empty() {
                if polls > 1 {
                    println!("  ... polled list {polls} times until the backup appeared:");
                    println!("  < 200 {}", list[0]);
                }
                return Ok(list[0].clone());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "no backup appeared in list within {}s; see `edgekeep job list` and the logs \
                     in {}",
                    self.timeout.as_secs(),
                    self.root.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Polls the jobs API until the job ends.
    async fn poll_job(&self, lem: &LemClient, job_id: i64) -> anyhow::Result<Value> {
        let deadline = Instant::now() + self.timeout;
        let path = format!("/api/v1/jobs/{job_id}");
        let mut polls = 0;
        loop {
            let response = lem.call(Method::GET, &path, &[], polls > 0).await?;
            polls += 1;
            let job = response.content("job")?.clone();
            if !matches!(job["state"].as_str(), Some("queued" | "running")) {
                println!("  ... polled job {job_id} {polls} times until it ended:");
                println!("  < 200 {job}");
                return Ok(job);
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "job {job_id} did not end within {}s",
                    self.timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Checks that B's state equals the backup of A apart from B's own
    /// identity, and that the historian is a sound database.
    fn check_clone(
        &self,
        checks: &mut Checks,
        file: &Path,
        a: &Gateway,
        b: &Gateway,
        identity_before: &[(String, Vec<u8>)],
    ) -> anyhow::Result<()> {
        println!("\n7. Compare {}'s state with the backup", b.device.name);
        let expected_dir = self.root.join("expected");
        edgekeep_archive::unpack(file, &expected_dir, &mut |_| {})
            .context("cannot unpack the downloaded backup for comparison")?;
        let expected = compare::snapshot(&expected_dir)?;
        let actual = compare::snapshot(&b.state)?;
        let is_identity =
            |path: &Path| gateway::IDENTITY_PATHS.iter().any(|i| path == Path::new(i));
        // Excluded paths keep B's own content and are not in the backup.
        let not_in_backup = |path: &Path| {
            is_identity(path)
                || path.starts_with("logs")
                || path.starts_with("data/mqtt-buffer")
                || path.to_string_lossy().starts_with("data/historian.db-")
        };
        let differences = compare::differences(&expected, &actual, not_in_backup);
        checks.check(
            format!(
                "{} holds {}'s configuration, flows and historian",
                b.device.name, a.device.name
            ),
            check(differences.is_empty(), differences.join("; ")),
        );

        let identity_after = read_identity(&b.state)?;
        checks.check(
            format!("{} kept its own identity", b.device.name),
            check(
                identity_after == identity_before,
                "identity files changed".to_string(),
            ),
        );
        let source_identity = read_identity(&a.state)?;
        checks.check(
            format!(
                "{} did not take {}'s identity",
                b.device.name, a.device.name
            ),
            check(
                identity_after != source_identity,
                "identity equals the source's".to_string(),
            ),
        );

        let db = rusqlite::Connection::open(b.state.join(gateway::HISTORIAN))?;
        let integrity: String = db.query_row("PRAGMA integrity_check", [], |row| row.get(0))?;
        let rows: i64 = db.query_row("SELECT count(*) FROM samples", [], |row| row.get(0))?;
        checks.check(
            format!("restored historian passes integrity_check ({rows} samples)"),
            check(
                integrity == "ok",
                format!("integrity_check returned {integrity}"),
            ),
        );
        Ok(())
    }
}

/// The timestamp and checksum of a listed backup.
struct Listed {
    timestamp: i64,
    checksum: String,
}

/// Builds the `projectId` and `deviceId` query of a gateway.
fn ids(project: i64, gateway: &Gateway) -> Vec<(&'static str, String)> {
    vec![
        ("projectId", project.to_string()),
        ("deviceId", gateway.device.id.to_string()),
    ]
}

fn read_identity(state: &Path) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    gateway::IDENTITY_PATHS
        .iter()
        .map(|path| {
            let content = std::fs::read(state.join(path))
                .with_context(|| format!("cannot read {}", state.join(path).display()))?;
            Ok((path.to_string(), content))
        })
        .collect()
}

fn check(condition: bool, why: String) -> anyhow::Result<()> {
    if condition {
        Ok(())
    } else {
        Err(anyhow::anyhow!(why))
    }
}

fn random_hex(bytes: usize) -> String {
    let mut buffer = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buffer);
    hex::encode(buffer)
}
