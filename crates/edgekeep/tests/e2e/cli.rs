//! The `edgekeep` CLI drives the whole workflow against a real server.

use std::process::{Command, Output};

use serde_json::Value;

use crate::harness::*;

fn edgekeep(server: &Server, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("EDGEKEEP_URL", &server.api)
        .env("EDGEKEEP_TOKEN", &server.token)
        .output()
        .unwrap()
}

/// Runs a CLI command with `--json`, asserts it succeeded and parses its
/// output.
fn edgekeep_json(server: &Server, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let output = edgekeep(server, &all);
    assert!(
        output.status.success(),
        "edgekeep {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "edgekeep {args:?} printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

async fn cli_backs_up_downloads_uploads_and_restores(store: StoreChoice) {
    let server = Server::start(&store);
    let project = edgekeep_json(&server, &["project", "create", "plant"])["id"]
        .as_i64()
        .unwrap();
    let p = project.to_string();

    // Register two devices and start their agents with the printed codes.
    let mut agents = Vec::new();
    let mut ids = Vec::new();
    for name in ["gw-a", "gw-b"] {
        let created = edgekeep_json(&server, &["device", "create", "--project", &p, name]);
        let code = created["activationCode"].as_str().unwrap();
        let id = created["device"]["id"].as_i64().unwrap();
        let dir = server.device_dir(name);
        lay_out_device(&dir, name, "");
        let agent = Agent::start(&server, &dir, Some(code));
        wait_online(&server, project, id, &agent).await;
        agents.push(agent);
        ids.push(id.to_string());
    }
    let (a, b) = (ids[0].as_str(), ids[1].as_str());

    let job = edgekeep_json(
        &server,
        &["backup", "create", "--project", &p, "--device", a, "--wait"],
    );
    assert_eq!(job["state"], "succeeded", "{job}");
    let timestamp = job["timestamp"].as_i64().unwrap().to_string();
    let list = edgekeep_json(&server, &["backup", "list", "--project", &p, "--device", a]);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0]["timestamp"].to_string(), timestamp);

    let file = server.dir.path().join("a.dat");
    let downloaded = edgekeep_json(
        &server,
        &[
            "backup",
            "download",
            "--project",
            &p,
            "--device",
            a,
            "--timestamp",
            &timestamp,
            "--out",
            file.to_str().unwrap(),
        ],
    );
    assert_eq!(downloaded["size"], list[0]["size"]);
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(
        hex::encode(sha2_digest(&bytes)),
        list[0]["checksum"].as_str().unwrap()
    );

    let imported = edgekeep_json(
        &server,
        &[
            "backup",
            "upload",
            "--project",
            &p,
            "--device",
            b,
            file.to_str().unwrap(),
            "--wait",
        ],
    );
    assert_eq!(imported["state"], "succeeded", "{imported}");
    let list_b = edgekeep_json(&server, &["backup", "list", "--project", &p, "--device", b]);
    assert_eq!(list_b[0]["checksum"], list[0]["checksum"]);

    let restored = edgekeep_json(
        &server,
        &[
            "backup",
            "restore",
            "--project",
            &p,
            "--device",
            b,
            "--timestamp",
            &timestamp,
            "--source-device",
            a,
            "--wait",
        ],
    );
    assert_eq!(restored["state"], "succeeded", "{restored}");
    assert_eq!(
        std::fs::read_to_string(agents[1].state().join("config/tags.csv")).unwrap(),
        std::fs::read_to_string(agents[0].state().join("config/tags.csv")).unwrap()
    );

    let jobs = edgekeep_json(&server, &["job", "list", "--project", &p]);
    let states: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, ["succeeded", "succeeded", "succeeded"]);
}

#[test]
fn cli_without_token_says_how_to_set_it() {
    let output = Command::new(BIN)
        .args(["project", "list", "--url", "http://127.0.0.1:9"])
        .env_remove("EDGEKEEP_TOKEN")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("EDGEKEEP_TOKEN"), "{stderr}");
}

async fn cli_failed_job_exits_nonzero_with_reason(store: StoreChoice) {
    let server = Server::start(&store);
    let project = edgekeep_json(&server, &["project", "create", "plant"])["id"]
        .as_i64()
        .unwrap();
    let p = project.to_string();
    let device =
        edgekeep_json(&server, &["device", "create", "--project", &p, "gw"])["device"]["id"]
            .as_i64()
            .unwrap()
            .to_string();
    let garbage = server.dir.path().join("garbage.dat");
    std::fs::write(&garbage, b"EDGEKEEP but nothing of an archive after it").unwrap();
    let output = edgekeep(
        &server,
        &[
            "backup",
            "upload",
            "--project",
            &p,
            "--device",
            &device,
            garbage.to_str().unwrap(),
            "--wait",
        ],
    );
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("failed"), "{stderr}");
    assert!(stderr.contains("422"), "{stderr}");
}

async fn cli_rejects_non_archive_before_upload(store: StoreChoice) {
    let server = Server::start(&store);
    let project = edgekeep_json(&server, &["project", "create", "plant"])["id"].to_string();
    let device =
        edgekeep_json(&server, &["device", "create", "--project", &project, "gw"])["device"]["id"]
            .to_string();
    let text = server.dir.path().join("notes.txt");
    std::fs::write(&text, "plain text").unwrap();
    let args = [
        "backup",
        "upload",
        "--project",
        &project,
        "--device",
        &device,
    ];
    let output = edgekeep(&server, &[&args[..], &[text.to_str().unwrap()]].concat());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not an edgekeep .dat archive"), "{stderr}");
    let jobs = edgekeep_json(&server, &["job", "list", "--project", &project]);
    assert_eq!(
        jobs.as_array().unwrap().len(),
        0,
        "no import job was queued"
    );
}

async fn cli_exit_codes_and_json_errors(store: StoreChoice) {
    let server = Server::start(&store);
    let output = edgekeep(&server, &["job", "show", "9999", "--json"]);
    assert_eq!(output.status.code(), Some(3), "not found");
    let error: Value = serde_json::from_slice(&output.stderr).unwrap();
    assert_eq!(error["status"], 404);
    assert!(
        error["message"].as_str().unwrap().contains("9999"),
        "{error}"
    );

    let output = Command::new(BIN)
        .args(["project", "list"])
        .env("EDGEKEEP_URL", &server.api)
        .env("EDGEKEEP_TOKEN", "ek_wrong")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(4), "rejected token");

    let output = Command::new(BIN)
        .args([
            "project",
            "list",
            "--url",
            "http://127.0.0.1:9",
            "--token",
            "ek_x",
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(6), "server unreachable");
}

async fn cli_download_to_stdout_streams_archive(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let device = client.create_device(project, "d").await.unwrap().device.id;
    let bytes = crate::imports::valid_archive(server.dir.path(), &server.dir.path().join("a.dat"));
    let job = crate::imports::import(&server, project, device, bytes.clone()).await;
    let timestamp = job.timestamp.unwrap().to_string();
    let (p, d) = (project.to_string(), device.to_string());
    let args = ["backup", "download", "--project", &p, "--device", &d];
    let output = edgekeep(
        &server,
        &[&args[..], &["--timestamp", &timestamp, "-o", "-"]].concat(),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(output.stdout, bytes);
}

e2e_tests!(
    cli_backs_up_downloads_uploads_and_restores,
    cli_failed_job_exits_nonzero_with_reason,
    cli_rejects_non_archive_before_upload,
    cli_exit_codes_and_json_errors,
    cli_download_to_stdout_streams_archive,
);
