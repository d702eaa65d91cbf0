//! Starts the real `edgekeep` binary as a server and as agents on loopback,
//! with fresh folders, and stops them when dropped.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use edgekeep_api::{Backup, Client, DeviceActivation, Job};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use tempfile::TempDir;

pub use crate::database::StoreChoice;

pub const BIN: &str = env!("CARGO_BIN_EXE_edgekeep");

/// Maximum wait for any one step, generous for a loaded 2-core CI machine.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Server {
    pub dir: TempDir,
    pub api: String,
    pub s3: String,
    pub token: String,
    /// The metadata store; a PostgreSQL database lives as long as this.
    pub store: StoreChoice,
    child: Option<Child>,
}

impl Server {
    pub fn start(store: &StoreChoice) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("edgekeep-e2e-")
            .tempdir()
            .unwrap();
        let token = format!("ek_{}", "ab".repeat(32));
        let mut server = Server {
            dir,
            api: String::new(),
            s3: String::new(),
            token,
            store: store.clone(),
            child: None,
        };
        server.spawn();
        server
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    /// Starts the server process on the existing data folder.
    pub fn spawn(&mut self) {
        let data = self.data_dir();
        std::fs::create_dir_all(&data).unwrap();
        let _ = std::fs::remove_file(data.join("endpoints.json"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("server.log"))
            .unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["server", "--data-dir"])
            .arg(&data)
            .args(["--listen", "127.0.0.1:0"])
            .env("EDGEKEEP_ADMIN_TOKEN", &self.token)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        self.store.configure(&mut command);
        match self.store.garage() {
            Some(garage) => command
                .args(["--s3-endpoint", &garage.endpoint])
                .args(["--s3-region", &garage.region])
                .args(["--bucket", &garage.bucket]),
            None => command.args(["--s3-listen", "127.0.0.1:0"]),
        };
        let child = command.spawn().unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            if let Ok(text) = std::fs::read_to_string(data.join("endpoints.json"))
                && let Ok(value) = serde_json::from_str::<serde_json::Value>(&text)
            {
                self.api = value["api"].as_str().unwrap().to_string();
                self.s3 = value["s3"].as_str().unwrap().to_string();
                break;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("server exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "server did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn client(&self) -> Client {
        Client::new(&self.api, &self.token)
    }

    /// Returns the bucket that contains the server's objects.
    pub fn bucket(&self) -> &str {
        self.store
            .garage()
            .map_or("edgekeep", |garage| garage.bucket.as_str())
    }

    /// Returns an S3 client on the server's bucket with the server's access
    /// key, and `secret` in place of its secret key when given: the
    /// generated key of the embedded endpoint, or the Garage key.
    pub fn s3_client(&self, secret: Option<&str>) -> AmazonS3 {
        let (access_key, secret_key, region) = match self.store.garage() {
            Some(garage) => (
                garage.access_key.clone(),
                garage.secret_key.clone(),
                garage.region.clone(),
            ),
            None => {
                let path = self.data_dir().join("s3-credentials.json");
                let text = std::fs::read_to_string(&path).unwrap();
                let credentials: serde_json::Value = serde_json::from_str(&text).unwrap();
                (
                    credentials["accessKey"].as_str().unwrap().to_string(),
                    credentials["secretKey"].as_str().unwrap().to_string(),
                    "us-east-1".to_string(),
                )
            }
        };
        AmazonS3Builder::new()
            .with_endpoint(&self.s3)
            .with_allow_http(true)
            .with_region(region)
            .with_bucket_name(self.bucket())
            .with_access_key_id(access_key)
            .with_secret_access_key(secret.unwrap_or(&secret_key))
            .build()
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server runs").id()
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the server with SIGTERM, as an operator would, and waits until
    /// it has exited.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill(2) only sends a signal to the child, which has not
        // been waited for, so its pid is still ours.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + STEP_TIMEOUT;
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!(
                    "the server did not stop within {STEP_TIMEOUT:?}: {}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Makes a folder for a device's state, config and agent home.
    pub fn device_dir(&self, name: &str) -> PathBuf {
        let dir = self.dir.path().join("devices").join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An agent process for one device folder (state in `DIR/state`, config in
/// `DIR/agent.toml`).
pub struct Agent {
    pub dir: PathBuf,
    child: Option<Child>,
}

impl Agent {
    pub fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub fn start(server: &Server, dir: &Path, activation_code: Option<&str>) -> Agent {
        Agent::start_with_servers(&server.api, dir, activation_code)
    }

    /// Starts an agent given `servers`, one base URL or several separated by
    /// commas, as `--server`.
    pub fn start_with_servers(servers: &str, dir: &Path, activation_code: Option<&str>) -> Agent {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("agent.log"))
            .unwrap();
        let mut command = Command::new(BIN);
        command
            .args(["agent", "--server", servers, "--state-dir"])
            .arg(dir.join("state"))
            .arg("--config")
            .arg(dir.join("agent.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        if let Some(code) = activation_code {
            command.args(["--activation-code", code]);
        }
        Agent {
            dir: dir.to_path_buf(),
            child: Some(command.spawn().unwrap()),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the agent runs").id()
    }

    /// Kills the agent at once, as a power cut would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Agent config used by the tests: the whole gateway state with one SQLite
/// database, logs excluded, three identity files.
pub const AGENT_CONFIG: &str = r#"
platform_version = "2.14.0"
include = ["config", "data", "identity", "odd"]
exclude = ["logs/**"]
identity = ["identity/device.crt", "identity/device.key", "identity/hostname"]

[[sqlite]]
path = "data/historian.db"
"#;

/// Writes a small gateway state into `DIR/state` and the agent config into
/// `DIR/agent.toml`. `name` makes the identity and configuration unique.
pub fn lay_out_device(dir: &Path, name: &str, extra_config: &str) {
    let state = dir.join("state");
    for sub in ["config/connectors", "data", "identity", "logs", "odd"] {
        std::fs::create_dir_all(state.join(sub)).unwrap();
    }
    std::fs::write(
        state.join("config/connectors/plc.json"),
        format!("{{\"name\": \"plc-{name}\", \"host\": \"192.0.2.10\", \"port\": 502}}\n"),
    )
    .unwrap();
    std::fs::write(
        state.join("config/tags.csv"),
        format!("tag,address\n{name}.pressure,40001\n{name}.speed,40002\n"),
    )
    .unwrap();
    std::fs::write(
        state.join("identity/device.crt"),
        format!("CERT OF {name}\n"),
    )
    .unwrap();
    std::fs::write(
        state.join("identity/device.key"),
        format!("KEY OF {name}\n"),
    )
    .unwrap();
    std::fs::set_permissions(
        state.join("identity/device.key"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    std::fs::write(state.join("identity/hostname"), format!("{name}\n")).unwrap();
    std::fs::write(state.join("logs/gateway.log"), format!("log of {name}\n")).unwrap();

    let db = rusqlite::Connection::open(state.join("data/historian.db")).unwrap();
    db.pragma_update(None, "journal_mode", "WAL").unwrap();
    db.execute_batch(
        "CREATE TABLE samples (id INTEGER PRIMARY KEY, tag TEXT NOT NULL, value REAL NOT NULL);",
    )
    .unwrap();
    for i in 0..500 {
        db.execute(
            "INSERT INTO samples (tag, value) VALUES (?1, ?2)",
            (format!("{name}.pressure"), f64::from(i)),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join("agent.toml"),
        format!("{AGENT_CONFIG}\n{extra_config}"),
    )
    .unwrap();
}

/// Creates a device, lays out its folder and starts its agent.
pub async fn add_device(
    server: &Server,
    project: i64,
    name: &str,
    extra_config: &str,
) -> (DeviceActivation, Agent) {
    let activation = server.client().create_device(project, name).await.unwrap();
    let dir = server.device_dir(name);
    lay_out_device(&dir, name, extra_config);
    let agent = Agent::start(server, &dir, Some(&activation.activation_code));
    wait_online(server, project, activation.device.id, &agent).await;

    // The server shows a device online as soon as it is activated, a moment
    // before the agent has stored its credential. Tests that kill the agent
    // and start it again without a code need that credential on disk.
    let credential = dir.join("state.edgekeep-agent/credential.json");
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !credential.exists() {
        assert!(
            Instant::now() < deadline,
            "no credential stored:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (activation, agent)
}

pub async fn wait_online(server: &Server, project: i64, device: i64, agent: &Agent) {
    let client = server.client();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let found = client.device(project, device).await.unwrap();
        if found.online {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "device {device} never came online; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls a job until it ends.
pub async fn wait_job(server: &Server, job_id: i64) -> Job {
    let client = server.client();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let job = client.job(job_id).await.unwrap();
        if job.state.is_final() {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {job_id} still {:?} after {STEP_TIMEOUT:?}; server log:\n{}",
            job.state,
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `list` until it contains `count` backups.
pub async fn wait_listed(server: &Server, project: i64, device: i64, count: usize) -> Vec<Backup> {
    let client = server.client();
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        let list = client.list_backups(project, device).await.unwrap();
        if list.len() >= count {
            return list;
        }
        assert!(
            Instant::now() < deadline,
            "device {device} has {} backups, expected {count}; server log:\n{}",
            list.len(),
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Takes a backup of `device` through its agent and returns it.
pub async fn backup(server: &Server, project: i64, device: i64) -> Backup {
    let client = server.client();
    let job_id = client.init_backup(project, device).await.unwrap().unwrap();
    let job = wait_job(server, job_id).await;
    assert_eq!(
        job.state,
        edgekeep_api::JobState::Succeeded,
        "backup job: {job:?}"
    );
    let list = client.list_backups(project, device).await.unwrap();
    list.into_iter()
        .find(|b| b.job_id == job_id)
        .expect("the backup job's backup is listed")
}

/// Reads every path under `root` with its kind, mode and content, for
/// before/after equality.
pub fn tree(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out);
    out
}

fn walk(root: &Path, relative: &Path, out: &mut BTreeMap<PathBuf, String>) {
    for entry in std::fs::read_dir(root.join(relative)).unwrap() {
        let entry = entry.unwrap();
        let path = relative.join(entry.file_name());
        let full = root.join(&path);
        let meta = std::fs::symlink_metadata(&full).unwrap();
        let mode = meta.mode() & 0o7777;
        let value = if meta.is_dir() {
            walk(root, &path, out);
            format!("dir {mode:o}")
        } else if meta.file_type().is_symlink() {
            format!("symlink {}", std::fs::read_link(&full).unwrap().display())
        } else {
            let content = std::fs::read(&full).unwrap();
            format!("file {mode:o} {}", hex::encode(sha2_digest(&content)))
        };
        out.insert(path, value);
    }
}

pub fn sha2_digest(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}
