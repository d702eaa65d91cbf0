//! The job loop against a loopback stub of the agent protocol and of
//! pre-signed storage URLs. The real server cannot be a dependency of the
//! agent crate, so the stub serves the few calls the agent makes.

mod common;

use std::collections::{HashMap, VecDeque};
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Device, IDENTITY_CONFIG, read, snapshot_tree};
use edgekeep_agent::{AgentOptions, JournalPhase};
use edgekeep_api::AgentTimeouts;
use edgekeep_api::agent::{AgentJob, JobResult};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CREDENTIAL: &str = "device-credential-secret";

#[derive(Default)]
struct Stub {
    jobs: VecDeque<AgentJob>,
    /// Number of results to wait for before polls get a 401 response.
    expected_results: usize,
    results: Vec<(i64, JobResult)>,
    progress: Vec<(i64, f64)>,
    /// Objects behind the storage URLs, by path.
    objects: HashMap<String, Vec<u8>>,
    /// Paths and Content-Length headers of the PUT requests.
    puts: Vec<(String, Option<u64>)>,
    activations: u32,
    /// Requests that carried a credential other than [`CREDENTIAL`].
    unauthorized: u32,
    /// Whether progress replies report the job as cancelled.
    cancel_jobs: bool,
    /// Delay before a storage download is served.
    download_delay: Duration,
    /// Failures served to the next storage requests, one each.
    storage_failures: VecDeque<StorageFailure>,
    /// Storage requests received, failed ones included.
    storage_requests: u32,
    /// Delay before a progress report is recorded and its reply sent.
    progress_delay: Duration,
    /// Messages of the progress reports.
    progress_messages: Vec<String>,
    /// "progress JOB" and "result JOB" in the order they were recorded.
    events: Vec<String>,
    /// Statuses served to the next result reports, one each, in place of a
    /// 200. The reports are recorded all the same.
    result_statuses: VecDeque<u16>,
    /// Host header of each result report, naming the stub that got it.
    result_hosts: Vec<String>,
}

/// How the stub fails a storage request.
#[derive(Debug, Clone, Copy)]
enum StorageFailure {
    /// Respond with this HTTP status.
    Status(u16),
    /// Close the connection without a response.
    Drop,
}

struct Request {
    method: String,
    path: String,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

async fn start_stub(stub: Arc<Mutex<Stub>>) -> String {
    start_stoppable_stub(stub).await.0
}

/// Starts a stub and returns its URL and the task that accepts its
/// connections. Aborting the task closes the listening socket, so later
/// connections are refused, as by a server that was killed.
async fn start_stoppable_stub(stub: Arc<Mutex<Stub>>) -> (String, tokio::task::JoinHandle<()>) {
    start_stub_hanging_on(stub, None).await
}

/// Starts a stub that reads each request whose path ends with `hang_on` and
/// never responds to it, as a server that hangs in that call. It records
/// nothing for such a request and serves every other one.
async fn start_stub_hanging_on(
    stub: Arc<Mutex<Stub>>,
    hang_on: Option<&'static str>,
) -> (String, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(serve_or_hang(stream, stub.clone(), hang_on));
        }
    });
    (format!("http://{address}"), task)
}

/// Starts a server that accepts connections and reads the requests but
/// never responds, as a stopped (`kill -STOP`) server does.
async fn start_frozen_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let _request = read_request(&mut stream).await;
                std::future::pending::<()>().await;
            });
        }
    });
    format!("http://{address}")
}

async fn serve_or_hang(mut stream: TcpStream, stub: Arc<Mutex<Stub>>, hang_on: Option<&str>) {
    let Some(request) = read_request(&mut stream).await else {
        return;
    };
    let path = request.path.split('?').next().unwrap_or_default();
    if hang_on.is_some_and(|suffix| path.ends_with(suffix)) {
        std::future::pending::<()>().await;
    }
    serve_request(stream, request, stub).await;
}

async fn read_request(stream: &mut TcpStream) -> Option<Request> {
    let mut buffer = Vec::new();
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end;
        }
        let mut chunk = [0u8; 8192];
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut start = lines.next()?.split(' ');
    let method = start.next()?.to_string();
    let path = start.next()?.to_string();
    let headers: HashMap<String, String> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers
        .get("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let mut body = buffer[head_end + 4..].to_vec();
    while body.len() < length {
        let mut chunk = vec![0u8; 64 * 1024];
        let read = stream.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        body.extend_from_slice(&chunk[..read]);
    }
    Some(Request {
        method,
        path,
        headers,
        body,
    })
}

async fn serve_request(mut stream: TcpStream, request: Request, stub: Arc<Mutex<Stub>>) {
    if request.path.starts_with("/store/") {
        let failure = {
            let mut stub = stub.lock().unwrap();
            stub.storage_requests += 1;
            stub.storage_failures.pop_front()
        };
        match failure {
            Some(StorageFailure::Drop) => return,
            Some(StorageFailure::Status(status)) => {
                let head = format!(
                    "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = stream.write_all(head.as_bytes()).await;
                return;
            }
            None => {}
        }
    }
    if request.method == "GET" && request.path.starts_with("/store/") {
        let delay = stub.lock().unwrap().download_delay;
        tokio::time::sleep(delay).await;
    }
    if request.path.ends_with("/progress") {
        let delay = stub.lock().unwrap().progress_delay;
        tokio::time::sleep(delay).await;
    }
    if request.path.starts_with("/agent/v1/jobs/next") {
        // Return an empty queue after a short wait, as a long poll would.
        let empty = stub.lock().unwrap().jobs.is_empty();
        if empty {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let (status, body) = route(&request, &mut stub.lock().unwrap());
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nContent-Type: application/json\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(&body).await;
}

fn envelope(content: Value) -> (u16, Vec<u8>) {
    (
        200,
        json!({"code": "200", "content": content})
            .to_string()
            .into_bytes(),
    )
}

fn route(request: &Request, stub: &mut Stub) -> (u16, Vec<u8>) {
    let path = request.path.split('?').next().unwrap().to_string();
    if let Some(object) = path.strip_prefix("/store/") {
        return match request.method.as_str() {
            "PUT" => {
                let length = request
                    .headers
                    .get("content-length")
                    .and_then(|v| v.parse().ok());
                stub.puts.push((object.to_string(), length));
                stub.objects
                    .insert(object.to_string(), request.body.clone());
                (200, Vec::new())
            }
            _ => match stub.objects.get(object) {
                Some(bytes) => (200, bytes.clone()),
                None => (404, Vec::new()),
            },
        };
    }
    if path == "/agent/v1/activate" {
        stub.activations += 1;
        return envelope(json!({
            "projectId": 1, "deviceId": 2, "deviceUid": "uid-b",
            "deviceName": "line-2", "credential": CREDENTIAL,
        }));
    }
    let authorized = request.headers.get("authorization").map(String::as_str)
        == Some(&format!("Bearer {CREDENTIAL}"));
    if !authorized {
        stub.unauthorized += 1;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["agent", "v1", "jobs", "next"] => {
            if stub.jobs.is_empty() && stub.results.len() >= stub.expected_results {
                let body = json!({"code": "401", "message": "credential revoked", "content": null});
                return (401, body.to_string().into_bytes());
            }
            envelope(serde_json::to_value(stub.jobs.pop_front()).unwrap())
        }
        ["agent", "v1", "jobs", id, "progress"] => {
            let report: Value = serde_json::from_slice(&request.body).unwrap();
            let progress = report["progress"].as_f64().unwrap();
            stub.progress.push((id.parse().unwrap(), progress));
            let message = report["message"].as_str().unwrap().to_string();
            stub.progress_messages.push(message);
            stub.events.push(format!("progress {id}"));
            envelope(json!({"cancelled": stub.cancel_jobs}))
        }
        ["agent", "v1", "jobs", id, "result"] => {
            let result: JobResult = serde_json::from_slice(&request.body).unwrap();
            stub.results.push((id.parse().unwrap(), result));
            stub.events.push(format!("result {id}"));
            let host = request.headers.get("host").cloned().unwrap_or_default();
            stub.result_hosts.push(host);
            match stub.result_statuses.pop_front() {
                Some(status) => {
                    let message = format!("job {id} is not running; poll for the next job");
                    let body =
                        json!({"code": status.to_string(), "message": message, "content": null});
                    (status, body.to_string().into_bytes())
                }
                None => envelope(Value::Null),
            }
        }
        _ => (
            404,
            json!({"code": "404", "message": "no route", "content": null})
                .to_string()
                .into_bytes(),
        ),
    }
}

fn options(server_url: &str, device: &Device, config: &str, code: Option<&str>) -> AgentOptions {
    let config_path = device.root.path().join("agent.toml");
    std::fs::write(&config_path, config).unwrap();
    AgentOptions {
        server_url: server_url.to_string(),
        activation_code: code.map(str::to_string),
        state_dir: device.state.clone(),
        config_path: Some(config_path),
        home: Some(device.home.dir().to_path_buf()),
        http: None,
        timeouts: AgentTimeouts::default(),
    }
}

async fn run_until_revoked(options: AgentOptions) -> String {
    let run = tokio::time::timeout(Duration::from_secs(60), edgekeep_agent::run(options));
    run.await
        .expect("the agent finishes its jobs within 60 s")
        .unwrap_err()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_activates_backs_up_and_restores() {
    // Device A's backup is the archive the restore job downloads.
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = std::fs::read(source.pack("a.dat")).unwrap();
    let checksum = hex::encode(Sha256::digest(&archive));

    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");
    let identity_before = snapshot_tree(&target.state)["identity/device.crt"].clone();

    let stub = Arc::new(Mutex::new(Stub::default()));
    let server_url = start_stub(stub.clone()).await;
    {
        let mut stub = stub.lock().unwrap();
        stub.objects.insert("backups/a.dat".into(), archive.clone());
        stub.jobs.push_back(AgentJob::Backup {
            job_id: 11,
            upload_url: format!("{server_url}/store/jobs/11.dat?X-Amz-Signature=abc"),
        });
        stub.jobs.push_back(AgentJob::Restore {
            job_id: 12,
            download_url: format!("{server_url}/store/backups/a.dat?X-Amz-Signature=def"),
            size: archive.len() as u64,
            checksum: checksum.clone(),
            restore_identity: false,
        });
        stub.expected_results = 2;
    }

    let config = format!("platform_version = \"2.14.0\"\n{IDENTITY_CONFIG}");
    let message = run_until_revoked(options(&server_url, &target, &config, Some("code-1"))).await;
    assert!(message.contains("revoked"), "{message}");

    let stub = stub.lock().unwrap();
    assert_eq!(stub.activations, 1);
    assert_eq!(stub.unauthorized, 0);

    // The backup arrived with one PUT carrying its length, and verifies.
    let (backup_id, backup) = &stub.results[0];
    assert_eq!(*backup_id, 11);
    assert!(backup.ok, "{:?}", backup.reason);
    let uploaded = &stub.objects["jobs/11.dat"];
    assert_eq!(
        stub.puts,
        [("jobs/11.dat".to_string(), Some(uploaded.len() as u64))]
    );
    assert_eq!(backup.size, Some(uploaded.len() as u64));
    assert_eq!(backup.checksum, Some(hex::encode(Sha256::digest(uploaded))));
    let uploaded_path = target.root.path().join("uploaded.dat");
    std::fs::write(&uploaded_path, uploaded).unwrap();
    let verified = edgekeep_archive::verify(&uploaded_path, &mut |_| {}).unwrap();
    assert_eq!(verified.manifest.source.device_uid, "uid-b");

    // The restore put device A's state in place and kept B's identity.
    let (restore_id, restore) = &stub.results[1];
    assert_eq!(*restore_id, 12);
    assert!(restore.ok, "{:?}", restore.reason);
    assert_eq!(read(&target.state, "flows/main.flow"), "flow of a");
    assert_eq!(
        snapshot_tree(&target.state)["identity/device.crt"],
        identity_before
    );

    // Only the credential is left in the home, readable by the owner only.
    assert_eq!(target.home_leftovers(), ["credential.json"]);
    let mode = std::fs::metadata(target.home.credential_path())
        .unwrap()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    assert!(stub.progress.iter().all(|(_, p)| (0.0..=1.0).contains(p)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_reports_interrupted_restore_on_start() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("old");
    let before = snapshot_tree(&device.state);

    // A restore stopped right after the swap.
    let staging = device.home.staging_path(21);
    std::fs::create_dir(&staging).unwrap();
    common::write(&staging, "config/connectors.json", "new");
    let inode = std::fs::metadata(&staging).unwrap().ino();
    let mut journal = edgekeep_agent::Journal::new(21, &device.state, &staging, inode);
    journal.write(&device.home).unwrap();
    edgekeep_agent::exchange_paths(&staging, &device.state).unwrap();
    journal
        .advance(&device.home, JournalPhase::Swapped)
        .unwrap();

    let stub = Arc::new(Mutex::new(Stub {
        expected_results: 1,
        ..Stub::default()
    }));
    let server_url = start_stub(stub.clone()).await;
    let message = run_until_revoked(options(
        &server_url,
        &device,
        IDENTITY_CONFIG,
        Some("code-2"),
    ))
    .await;
    assert!(message.contains("revoked"), "{message}");

    let stub = stub.lock().unwrap();
    assert_eq!(stub.results.len(), 1);
    let (job_id, result) = &stub.results[0];
    assert_eq!(*job_id, 21);
    assert!(!result.ok);
    assert_eq!(
        result.reason.as_deref(),
        Some(edgekeep_agent::INTERRUPTED_REASON)
    );
    assert_eq!(snapshot_tree(&device.state), before);
    assert_eq!(device.home_leftovers(), ["credential.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_without_credential_or_code_fails() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    let options = options("http://127.0.0.1:9", &device, IDENTITY_CONFIG, None);
    let message = edgekeep_agent::run(options).await.unwrap_err().to_string();
    assert!(message.contains("--activation-code"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_activation_code_activates_once() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    let stub = Arc::new(Mutex::new(Stub::default()));
    let server_url = start_stub(stub.clone()).await;
    for _ in 0..2 {
        let options = options(&server_url, &device, IDENTITY_CONFIG, Some("code-3"));
        let message = run_until_revoked(options).await;
        assert!(message.contains("revoked"), "{message}");
    }
    assert_eq!(stub.lock().unwrap().activations, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_code_for_other_device_is_rejected() {
    let device = Device::new("uid-x", IDENTITY_CONFIG);
    device.populate("x");
    let stored = edgekeep_agent::Credential {
        server_url: "http://127.0.0.1:1".into(),
        project_id: 1,
        device_id: 9,
        device_uid: "uid-x".into(),
        device_name: "line-9".into(),
        credential: "old".into(),
        activation_code_sha256: None,
    };
    device.home.save_credential(&stored).unwrap();
    let stub = Arc::new(Mutex::new(Stub::default()));
    let server_url = start_stub(stub.clone()).await;

    let options = options(&server_url, &device, IDENTITY_CONFIG, Some("code-4"));
    let message = edgekeep_agent::run(options).await.unwrap_err().to_string();
    assert!(message.contains("uid-b"), "{message}");
    assert!(message.contains("uid-x"), "{message}");
    assert_eq!(device.home.load_credential().unwrap(), Some(stored));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_restore_leaves_state_unchanged() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = std::fs::read(source.pack("a.dat")).unwrap();
    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");
    let before = snapshot_tree(&target.state);

    let stub = Arc::new(Mutex::new(Stub {
        cancel_jobs: true,
        download_delay: Duration::from_millis(1500),
        expected_results: 1,
        ..Stub::default()
    }));
    let server_url = start_stub(stub.clone()).await;
    {
        let mut stub = stub.lock().unwrap();
        stub.objects.insert("backups/a.dat".into(), archive.clone());
        stub.jobs.push_back(AgentJob::Restore {
            job_id: 31,
            download_url: format!("{server_url}/store/backups/a.dat"),
            size: archive.len() as u64,
            checksum: hex::encode(Sha256::digest(&archive)),
            restore_identity: false,
        });
    }
    let config = format!("platform_version = \"2.14.0\"\n{IDENTITY_CONFIG}");
    let message = run_until_revoked(options(&server_url, &target, &config, Some("code-5"))).await;
    assert!(message.contains("revoked"), "{message}");

    let stub = stub.lock().unwrap();
    let (job_id, result) = &stub.results[0];
    assert_eq!(*job_id, 31);
    assert!(!result.ok);
    assert_eq!(result.reason.as_deref(), Some("the job was cancelled"));
    assert_eq!(snapshot_tree(&target.state), before);
    assert_eq!(target.home_leftovers(), ["credential.json"]);
}

/// Runs one backup job 41 against `stub` and returns its result.
async fn run_backup_job(stub: &Arc<Mutex<Stub>>, device: &Device) -> JobResult {
    let server_url = start_stub(stub.clone()).await;
    {
        let mut stub = stub.lock().unwrap();
        stub.jobs.push_back(AgentJob::Backup {
            job_id: 41,
            upload_url: format!("{server_url}/store/jobs/41.dat?X-Amz-Signature=abc"),
        });
        stub.expected_results = 1;
    }
    let options = options(&server_url, device, IDENTITY_CONFIG, Some("code-6"));
    let message = run_until_revoked(options).await;
    assert!(message.contains("revoked"), "{message}");
    let stub = stub.lock().unwrap();
    assert_eq!(stub.results.len(), 1);
    assert_eq!(stub.results[0].0, 41);
    stub.results[0].1.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_retries_after_storage_outage() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    let stub = Arc::new(Mutex::new(Stub {
        storage_failures: [StorageFailure::Status(503), StorageFailure::Drop].into(),
        ..Stub::default()
    }));
    let result = run_backup_job(&stub, &device).await;
    assert!(result.ok, "{:?}", result.reason);

    // The third PUT carried the whole file from its start.
    let stub = stub.lock().unwrap();
    assert_eq!(stub.storage_requests, 3);
    let uploaded = &stub.objects["jobs/41.dat"];
    assert_eq!(result.size, Some(uploaded.len() as u64));
    assert_eq!(result.checksum, Some(hex::encode(Sha256::digest(uploaded))));
    let uploaded_path = device.root.path().join("uploaded.dat");
    std::fs::write(&uploaded_path, uploaded).unwrap();
    edgekeep_archive::verify(&uploaded_path, &mut |_| {}).unwrap();
    assert_eq!(device.home_leftovers(), ["credential.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_rejection_is_not_retried() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    let stub = Arc::new(Mutex::new(Stub {
        storage_failures: [StorageFailure::Status(403)].into(),
        ..Stub::default()
    }));
    let result = run_backup_job(&stub, &device).await;
    assert!(!result.ok);
    let reason = result.reason.unwrap();
    assert!(reason.contains("403"), "{reason}");
    assert!(!reason.contains("X-Amz-Signature"), "{reason}");
    assert_eq!(stub.lock().unwrap().storage_requests, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn download_retries_after_storage_outage() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = std::fs::read(source.pack("a.dat")).unwrap();
    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");

    let stub = Arc::new(Mutex::new(Stub {
        storage_failures: [StorageFailure::Drop, StorageFailure::Status(502)].into(),
        expected_results: 1,
        ..Stub::default()
    }));
    let server_url = start_stub(stub.clone()).await;
    {
        let mut stub = stub.lock().unwrap();
        stub.objects.insert("backups/a.dat".into(), archive.clone());
        stub.jobs.push_back(AgentJob::Restore {
            job_id: 42,
            download_url: format!("{server_url}/store/backups/a.dat"),
            size: archive.len() as u64,
            checksum: hex::encode(Sha256::digest(&archive)),
            restore_identity: false,
        });
    }
    let config = format!("platform_version = \"2.14.0\"\n{IDENTITY_CONFIG}");
    let message = run_until_revoked(options(&server_url, &target, &config, Some("code-7"))).await;
    assert!(message.contains("revoked"), "{message}");

    let stub = stub.lock().unwrap();
    let (job_id, result) = &stub.results[0];
    assert_eq!(*job_id, 42);
    assert!(result.ok, "{:?}", result.reason);
    assert_eq!(stub.storage_requests, 3);
    assert_eq!(read(&target.state, "flows/main.flow"), "flow of a");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_stops_before_result() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    // A slow progress reply keeps a post in flight when the short job ends.
    let stub = Arc::new(Mutex::new(Stub {
        progress_delay: Duration::from_millis(400),
        ..Stub::default()
    }));
    let result = run_backup_job(&stub, &device).await;
    assert!(result.ok, "{:?}", result.reason);

    let stub = stub.lock().unwrap();
    assert!(
        stub.events.contains(&"progress 41".to_string()),
        "{:?}",
        stub.events
    );
    assert_eq!(
        stub.events.last().map(String::as_str),
        Some("result 41"),
        "{:?}",
        stub.events
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_progress_names_skipped_entries() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    std::os::unix::fs::symlink("/etc/hostname", device.state.join("config/host-link")).unwrap();
    let stub = Arc::new(Mutex::new(Stub::default()));
    let result = run_backup_job(&stub, &device).await;
    assert!(result.ok, "{:?}", result.reason);

    let stub = stub.lock().unwrap();
    let last = stub.progress_messages.last().unwrap();
    assert!(last.contains("left out 1 entry"), "{last}");
    assert!(last.contains("config/host-link"), "{last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_start_removes_leftover_work_files() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    std::fs::write(device.home.archive_path(61), vec![0u8; 4096]).unwrap();
    common::write(
        &device.home.staging_path(62),
        "config/connectors.json",
        "{}",
    );
    std::fs::create_dir(device.home.dir().join("sqlite-Xy12ab")).unwrap();
    let before = snapshot_tree(&device.state);

    let stub = Arc::new(Mutex::new(Stub::default()));
    let server_url = start_stub(stub.clone()).await;
    let options = options(&server_url, &device, IDENTITY_CONFIG, Some("code-8"));
    let message = run_until_revoked(options).await;
    assert!(message.contains("revoked"), "{message}");
    assert_eq!(device.home_leftovers(), ["credential.json"]);
    assert_eq!(snapshot_tree(&device.state), before);
}

/// Returns the address of a loopback port that nothing listens on.
async fn closed_port() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{address}")
}

fn backup_job(job_id: i64, server_url: &str) -> AgentJob {
    AgentJob::Backup {
        job_id,
        upload_url: format!("{server_url}/store/jobs/{job_id}.dat?X-Amz-Signature=abc"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_skips_closed_port_in_server_list() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    let stub = Arc::new(Mutex::new(Stub::default()));
    let server_url = start_stub(stub.clone()).await;

    // The first start activates with the one server address.
    let first_start = options(&server_url, &device, IDENTITY_CONFIG, Some("code-9"));
    let message = run_until_revoked(first_start).await;
    assert!(message.contains("revoked"), "{message}");

    // A restart with a list whose first server is down keeps the stored
    // credential and works through the second one.
    {
        let mut stub = stub.lock().unwrap();
        stub.jobs.push_back(backup_job(71, &server_url));
        stub.expected_results = 1;
    }
    let servers = format!("{},{server_url}", closed_port().await);
    let started = std::time::Instant::now();
    let message = run_until_revoked(options(&servers, &device, IDENTITY_CONFIG, None)).await;
    assert!(message.contains("revoked"), "{message}");
    let elapsed = started.elapsed();

    let stub = stub.lock().unwrap();
    assert_eq!(stub.activations, 1);
    assert_eq!(stub.unauthorized, 0);
    assert_eq!(stub.results.len(), 1);
    assert_eq!(stub.results[0].0, 71);
    assert!(stub.results[0].1.ok, "{:?}", stub.results[0].1.reason);
    // One failed call and one backoff of at most a second, then the job.
    assert!(elapsed < Duration::from_secs(8), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_moves_on_when_server_stops() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    // Two stubs share one job queue, as two replicas share one database.
    let stub = Arc::new(Mutex::new(Stub {
        expected_results: 2,
        ..Stub::default()
    }));
    let (first_url, first_task) = start_stoppable_stub(stub.clone()).await;
    let second_url = start_stub(stub.clone()).await;
    stub.lock()
        .unwrap()
        .jobs
        .push_back(backup_job(81, &first_url));

    let servers = format!("{first_url},{second_url}");
    let options = options(&servers, &device, IDENTITY_CONFIG, Some("code-10"));
    let agent = tokio::spawn(run_until_revoked(options));

    // Stop the first stub once it has the first result, then queue a job.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while stub.lock().unwrap().results.is_empty() {
        assert!(std::time::Instant::now() < deadline, "no first result");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first_task.abort();
    let _ = first_task.await;
    stub.lock()
        .unwrap()
        .jobs
        .push_back(backup_job(82, &second_url));

    let message = agent.await.unwrap();
    assert!(message.contains("revoked"), "{message}");
    let stub = stub.lock().unwrap();
    let ids: Vec<i64> = stub.results.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [81, 82]);
    assert!(stub.results.iter().all(|(_, result)| result.ok));
    let hosts = [
        first_url.trim_start_matches("http://"),
        second_url.trim_start_matches("http://"),
    ];
    assert_eq!(stub.result_hosts, hosts);
    assert_eq!(stub.activations, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_polling_after_rejected_result() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    let stub = Arc::new(Mutex::new(Stub {
        expected_results: 3,
        result_statuses: [409, 404].into(),
        ..Stub::default()
    }));
    let server_url = start_stub(stub.clone()).await;
    {
        let mut stub = stub.lock().unwrap();
        for job_id in [91, 92, 93] {
            stub.jobs.push_back(backup_job(job_id, &server_url));
        }
    }

    let options = options(&server_url, &device, IDENTITY_CONFIG, Some("code-11"));
    let message = run_until_revoked(options).await;

    // The agent reported each result once and went on to the next job,
    // and stopped only on the revoked credential.
    assert!(message.contains("revoked"), "{message}");
    let stub = stub.lock().unwrap();
    let ids: Vec<i64> = stub.results.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [91, 92, 93]);
    assert_eq!(device.home_leftovers(), ["credential.json"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_server_list_is_rejected() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    let options = options(" , ", &device, IDENTITY_CONFIG, Some("code-12"));
    let message = edgekeep_agent::run(options).await.unwrap_err().to_string();
    assert!(message.contains("invalid server list"), "{message}");
    assert!(message.contains("separated by commas"), "{message}");
}

/// Timeouts short enough that a test waits for a few of them in seconds.
fn short_timeouts() -> AgentTimeouts {
    AgentTimeouts {
        activate: Duration::from_secs(1),
        poll_margin: Duration::from_secs(1),
        progress: Duration::from_secs(1),
        result: Duration::from_secs(1),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn activation_leaves_frozen_server_for_next() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    let stub = Arc::new(Mutex::new(Stub {
        expected_results: 1,
        ..Stub::default()
    }));
    let live_url = start_stub(stub.clone()).await;
    stub.lock()
        .unwrap()
        .jobs
        .push_back(backup_job(101, &live_url));

    let servers = format!("{},{live_url}", start_frozen_server().await);
    let mut options = options(&servers, &device, IDENTITY_CONFIG, Some("code-13"));
    options.timeouts = short_timeouts();
    let started = std::time::Instant::now();
    let message = run_until_revoked(options).await;
    let elapsed = started.elapsed();

    assert!(message.contains("revoked"), "{message}");
    let stub = stub.lock().unwrap();
    assert_eq!(stub.activations, 1);
    assert_eq!(stub.results.len(), 1);
    assert_eq!(stub.results[0].0, 101);
    assert!(stub.results[0].1.ok, "{:?}", stub.results[0].1.reason);
    // One activation timeout of 1 s and one backoff of at most 1 s.
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_leaves_frozen_server_for_next() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    // Both stubs share one job queue. The first serves activation and polls
    // but never responds to a progress report.
    let stub = Arc::new(Mutex::new(Stub {
        expected_results: 1,
        ..Stub::default()
    }));
    let (first_url, _first_task) = start_stub_hanging_on(stub.clone(), Some("/progress")).await;
    let second_url = start_stub(stub.clone()).await;
    stub.lock()
        .unwrap()
        .jobs
        .push_back(backup_job(102, &first_url));

    let servers = format!("{first_url},{second_url}");
    let mut options = options(&servers, &device, IDENTITY_CONFIG, Some("code-14"));
    options.timeouts = short_timeouts();
    let started = std::time::Instant::now();
    let message = run_until_revoked(options).await;
    let elapsed = started.elapsed();

    assert!(message.contains("revoked"), "{message}");
    let stub = stub.lock().unwrap();
    // Only the second stub records progress, so recorded progress for the
    // job means a report reached it after the first timed out.
    assert!(
        stub.progress.iter().any(|(job_id, _)| *job_id == 102),
        "{:?}",
        stub.events
    );
    let ids: Vec<i64> = stub.results.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [102]);
    assert!(stub.results[0].1.ok, "{:?}", stub.results[0].1.reason);
    assert_eq!(
        stub.result_hosts,
        [second_url.trim_start_matches("http://")]
    );
    // One progress timeout of 1 s, not the default 30 s.
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn result_leaves_frozen_server_for_next() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    // The first stub serves everything but never responds to a result.
    let stub = Arc::new(Mutex::new(Stub {
        expected_results: 1,
        ..Stub::default()
    }));
    let (first_url, _first_task) = start_stub_hanging_on(stub.clone(), Some("/result")).await;
    let second_url = start_stub(stub.clone()).await;
    stub.lock()
        .unwrap()
        .jobs
        .push_back(backup_job(103, &first_url));

    let servers = format!("{first_url},{second_url}");
    let mut options = options(&servers, &device, IDENTITY_CONFIG, Some("code-15"));
    options.timeouts = short_timeouts();
    let started = std::time::Instant::now();
    let message = run_until_revoked(options).await;
    let elapsed = started.elapsed();

    assert!(message.contains("revoked"), "{message}");
    let stub = stub.lock().unwrap();
    let ids: Vec<i64> = stub.results.iter().map(|(id, _)| *id).collect();
    assert_eq!(ids, [103]);
    assert!(stub.results[0].1.ok, "{:?}", stub.results[0].1.reason);
    assert_eq!(
        stub.result_hosts,
        [second_url.trim_start_matches("http://")]
    );
    // One result timeout of 1 s and one backoff of at most 1 s, not the
    // default 15 minutes.
    assert!(elapsed < Duration::from_secs(15), "took {elapsed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_activation_on_frozen_server() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    // The default activation timeout of 30 s would outlast the test.
    let frozen = start_frozen_server().await;
    let options = options(&frozen, &device, IDENTITY_CONFIG, Some("code-16"));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let agent = tokio::spawn(edgekeep_agent::run_until(options, stopped));

    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = std::time::Instant::now();
    stop.send(true).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), agent)
        .await
        .expect("the agent stops within 5 s of the shutdown")
        .unwrap();

    assert!(outcome.is_ok(), "{outcome:?}");
    assert!(stopping.elapsed() < Duration::from_secs(2));
    assert!(device.home.load_credential().unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_server_entry_is_rejected() {
    let device = Device::new("uid-b", IDENTITY_CONFIG);
    device.populate("b");
    for (list, entry) in [
        ("10.0.0.5:8080", "10.0.0.5:8080"),
        ("localhost:8080", "localhost:8080"),
        ("ftp://10.0.0.5", "ftp://10.0.0.5"),
        (
            "http://127.0.0.1:1, manager.plant.example",
            "manager.plant.example",
        ),
        (
            "http://127.0.0.1:1?replica=1",
            "http://127.0.0.1:1?replica=1",
        ),
    ] {
        let options = options(list, &device, IDENTITY_CONFIG, Some("code-17"));
        let started = std::time::Instant::now();
        let message = edgekeep_agent::run(options).await.unwrap_err().to_string();
        assert!(message.contains(&format!("{entry:?}")), "{list}: {message}");
        assert!(message.contains("http://HOST:PORT"), "{list}: {message}");
        assert!(started.elapsed() < Duration::from_secs(1), "{list}");
    }
    assert!(device.home.load_credential().unwrap().is_none());
}
