//! Starts a single-node Garage S3 cluster on free loopback ports in a
//! temporary folder, with one bucket and one key that may read, write and
//! own it, and stops it on drop.
//!
//! The binary is `$EDGEKEEP_TEST_GARAGE`, or `garage` on `PATH`. Written
//! against Garage 2.5.0.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Variable that names the Garage binary used by the tests.
pub const GARAGE_VARIABLE: &str = "EDGEKEEP_TEST_GARAGE";

/// Region that the test cluster signs for, different from the usual
/// `us-east-1` so that a client which ignores `--s3-region` fails.
pub const GARAGE_REGION: &str = "garage";

const KEY_NAME: &str = "edgekeep-test";
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Starts tried before giving up, because another process may take one of
/// the free ports between the probe and Garage's bind.
const START_ATTEMPTS: usize = 3;

/// A running single-node Garage cluster.
pub struct Garage {
    /// S3 endpoint, such as `http://127.0.0.1:41234`.
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub access_key: String,
    pub secret_key: String,
    binary: PathBuf,
    config: PathBuf,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for Garage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Garage")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("access_key", &self.access_key)
            .finish_non_exhaustive()
    }
}

impl Garage {
    /// Starts a cluster with a bucket named `bucket`. Returns `None`, after
    /// printing a one-line skip notice, when no Garage binary is found and
    /// `CI` is not `true`. With `CI=true`, a missing binary is a panic whose
    /// message explains how to install it.
    pub fn start(bucket: &str) -> Option<Garage> {
        let binary = find_binary()?;
        for attempt in 1..=START_ATTEMPTS {
            let mut garage = Garage::spawn(binary.clone(), bucket);
            match garage.wait_for_rpc() {
                Ok(()) => {
                    garage.set_up();
                    return Some(garage);
                }
                Err(exit) if attempt < START_ATTEMPTS => {
                    eprintln!("garage exited at start ({exit}), retrying on other ports");
                }
                Err(exit) => panic!("garage exited with {exit}:\n{}", garage.log()),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// Returns the Garage server log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("garage.log")).unwrap_or_default()
    }

    fn spawn(binary: PathBuf, bucket: &str) -> Garage {
        let dir = tempfile::Builder::new()
            .prefix("edgekeep-garage-")
            .tempdir()
            .unwrap();
        let rpc_port = free_port();
        let s3_port = free_port();
        let config = dir.path().join("garage.toml");
        std::fs::write(&config, config_text(dir.path(), rpc_port, s3_port)).unwrap();

        let log = std::fs::File::create(dir.path().join("garage.log")).unwrap();
        let child = Command::new(&binary)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {}: {e}", binary.display()));
        Garage {
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            region: GARAGE_REGION.to_string(),
            bucket: bucket.to_string(),
            access_key: String::new(),
            secret_key: String::new(),
            binary,
            config,
            child: Some(child),
            dir,
        }
    }

    /// Assigns the node a role, applies the layout, and creates the bucket
    /// and the key.
    fn set_up(&mut self) {
        let node = self.cli(&["node", "id", "-q"]);
        let (node_id, _address) = node
            .trim()
            .split_once('@')
            .unwrap_or_else(|| panic!("invalid output of garage node id: {node}"));
        self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", node_id]);
        self.cli(&["layout", "apply", "--version", "1"]);
        self.cli(&["bucket", "create", &self.bucket.clone()]);
        let created = self.cli(&["key", "create", KEY_NAME]);
        let (access_key, secret_key) = parse_key(&created).unwrap_or_else(|| {
            panic!("no key id and secret key in the output of key create:\n{created}")
        });
        self.access_key = access_key;
        self.secret_key = secret_key;
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &self.bucket.clone(),
            "--key",
            KEY_NAME,
        ]);
    }

    /// Polls `garage status` until the daemon accepts RPC connections.
    /// Returns the exit status when the daemon exits first, such as when
    /// its port was taken.
    fn wait_for_rpc(&mut self) -> Result<(), std::process::ExitStatus> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let output = self.run(&["status"]);
            if output.status.success() {
                return Ok(());
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                return Err(status);
            }
            assert!(
                Instant::now() < deadline,
                "garage did not answer `garage status` within {START_TIMEOUT:?}: {}\n{}",
                String::from_utf8_lossy(&output.stderr),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs a `garage` CLI command against this cluster and returns its
    /// standard output; a failure is a panic with both outputs.
    fn cli(&self, args: &[&str]) -> String {
        let output = self.run(args);
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(
            output.status.success(),
            "garage {} failed with {}:\n{stdout}\n{}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        stdout
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("failed to run {}: {e}", self.binary.display()))
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn config_text(dir: &Path, rpc_port: u16, s3_port: u16) -> String {
    let mut secret = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut secret);
    format!(
        r#"metadata_dir = "{meta}"
data_dir = "{data}"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{GARAGE_REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
        meta = dir.join("meta").display(),
        data = dir.join("data").display(),
        secret = hex::encode(secret),
    )
}

/// Returns a port that was free a moment ago. Another process may take it
/// before Garage binds it, which then fails the start with a bind error.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Reads the `Key ID:` and `Secret key:` lines of `garage key create`.
fn parse_key(output: &str) -> Option<(String, String)> {
    let field = |label: &str| {
        output.lines().find_map(|line| {
            let (name, value) = line.split_once(':')?;
            (name.trim().eq_ignore_ascii_case(label)).then(|| value.trim().to_string())
        })
    };
    Some((field("Key ID")?, field("Secret key")?))
}

/// Returns the Garage binary, or `None` after printing why the Garage
/// variant is skipped.
fn find_binary() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(GARAGE_VARIABLE) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{GARAGE_VARIABLE} names {}, which is not a file",
            path.display()
        );
        return Some(path);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("garage"))
            .find(|candidate| candidate.is_file())
    });
    if on_path.is_some() {
        return on_path;
    }
    let install = "install it with `cargo install --locked garage --version 2.5.0` or set \
                   EDGEKEEP_TEST_GARAGE to its path";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("garage is not on PATH and CI=true requires the Garage tests; {install}");
    }
    // Written to stderr directly, because the test harness hides `println!`
    // output of passing tests.
    let line = format!("skipped the Garage variant: garage is not on PATH; {install}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    None
}
