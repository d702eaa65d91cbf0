//! `edgekeep migrate` moves an embedded installation (SQLite and the
//! embedded S3 endpoint) to PostgreSQL and Garage: every backup stays
//! listed, downloadable and restorable, agents keep their credentials, and
//! a running source or a non-empty target is rejected.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use edgekeep_api::{Backup, Client, CreateToken, JobState};
use edgekeep_server::store::postgres;
use futures::StreamExt;
use object_store::ObjectStore;
use object_store::aws::{AmazonS3, AmazonS3Builder};

use crate::garage::Garage;
use crate::harness::*;
use crate::imports::import;

/// Runs `edgekeep migrate` on `data_dir` towards the stores of `target`,
/// given through the same variables a server reads, plus `args`.
async fn migrate(data_dir: &Path, target: &StoreChoice, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command
        .args(["migrate", "--data-dir"])
        .arg(data_dir)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    target.configure(&mut command);
    tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap()
}

fn describe(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn report(output: &Output) -> serde_json::Value {
    assert!(output.status.success(), "{}", describe(output));
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(output)))
}

fn garage_client(garage: &Garage) -> AmazonS3 {
    AmazonS3Builder::new()
        .with_endpoint(&garage.endpoint)
        .with_allow_http(true)
        .with_region(&garage.region)
        .with_bucket_name(&garage.bucket)
        .with_access_key_id(&garage.access_key)
        .with_secret_access_key(&garage.secret_key)
        .build()
        .unwrap()
}

async fn bucket_keys(garage: &Garage) -> Vec<String> {
    let client = garage_client(garage);
    let mut keys: Vec<String> = client
        .list(None)
        .map(|meta| meta.unwrap().location.to_string())
        .collect()
        .await;
    keys.sort();
    keys
}

fn file_digest(path: &Path) -> String {
    hex::encode(sha2_digest(&std::fs::read(path).unwrap()))
}

async fn backups_by_device(
    client: &Client,
    project: i64,
    devices: &[i64],
) -> BTreeMap<i64, Vec<Backup>> {
    let mut lists = BTreeMap::new();
    for device in devices {
        lists.insert(
            *device,
            client.list_backups(project, *device).await.unwrap(),
        );
    }
    lists
}

#[tokio::test(flavor = "multi_thread")]
async fn migrated_backups_stay_downloadable_and_restorable() {
    let Some(target) = StoreChoice::postgres().await else {
        return;
    };
    let database_url = target.database_url().unwrap();
    let garage = target.garage().unwrap();

    // An embedded installation: two projects, a scoped token, three devices
    // with agents and two backups each.
    let mut old = Server::start(&StoreChoice::Sqlite);
    let client = old.client();
    let project = client.create_project("plant-1").await.unwrap().id;
    let other_project = client.create_project("plant-2").await.unwrap().id;
    let spare = client.create_device(other_project, "spare").await.unwrap();
    let scoped = client
        .create_token(&CreateToken {
            name: "plant-1 scripts".into(),
            project_ids: Some(vec![project]),
            expires_at: None,
        })
        .await
        .unwrap();
    let mut devices = Vec::new();
    let mut agents = Vec::new();
    for name in ["gw-a", "gw-b", "gw-c"] {
        let (activation, agent) = add_device(&old, project, name, "").await;
        devices.push(activation.device.id);
        agents.push(agent);
    }
    // Incompressible content larger than one 10 MiB upload part, so gw-a's
    // backups are copied as multipart uploads.
    let mut firmware = vec![0u8; 24 << 20];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut firmware);
    std::fs::write(agents[0].state().join("odd/firmware.bin"), &firmware).unwrap();
    for device in &devices {
        for _ in 0..2 {
            backup(&old, project, *device).await;
        }
    }

    // gw-a's oldest backup relocated onto gw-c through `put`.
    let (gw_a, gw_b, gw_c) = (devices[0], devices[1], devices[2]);
    let oldest = client
        .list_backups(project, gw_a)
        .await
        .unwrap()
        .pop()
        .unwrap();
    let url = client
        .download_url(project, gw_a, "MASTER", oldest.timestamp)
        .await
        .unwrap();
    let relocated = reqwest::get(url)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let job = import(&old, project, gw_c, relocated.clone()).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");

    // A `put` onto gw-b whose file arrives only after the server stopped, so
    // its import job is still queued at migration time.
    let (_, pending) = client
        .upload_url(project, gw_b, "MASTER", None)
        .await
        .unwrap();
    let pending = pending.expect("put names its import job");

    let before = backups_by_device(&client, project, &devices).await;
    assert_eq!(before.values().map(Vec::len).sum::<usize>(), 7);
    let jobs = client.list_jobs(None, None, None).await.unwrap();
    let last_job = jobs.iter().map(|job| job.id).max().unwrap();
    old.stop();
    for agent in &mut agents {
        agent.kill();
    }
    let pending_file = old
        .data_dir()
        .join(format!("objects/edgekeep/uploads/{pending}.dat"));
    std::fs::create_dir_all(pending_file.parent().unwrap()).unwrap();
    std::fs::write(&pending_file, &relocated).unwrap();
    let source_db = old.data_dir().join("edgekeep.db");
    let source_digest = file_digest(&source_db);

    // A dry run checks both sides and leaves the target as it was.
    let dry = report(&migrate(&old.data_dir(), &target, &["--dry-run", "--json"]).await);
    assert_eq!(dry["dryRun"], true);
    assert_eq!(dry["backups"], 7);
    assert_eq!(dry["objects"], 8);
    let database = postgres::connect_client(&database_url).await.unwrap();
    let tables: Option<String> = database
        .query_one("SELECT to_regclass('projects')::TEXT", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, None, "the dry run created no table");
    assert_eq!(bucket_keys(garage).await, Vec::<String>::new());
    let dry = migrate(&old.data_dir(), &target, &["--dry-run"]).await;
    assert!(dry.status.success(), "{}", describe(&dry));
    let text = String::from_utf8_lossy(&dry.stdout);
    let backups_line = text
        .lines()
        .find(|line| line.trim_start().starts_with("backups "));
    assert_eq!(
        backups_line.map(|line| line.split_whitespace().collect::<Vec<_>>()),
        Some(vec!["backups", "7", "rows"]),
        "{text}"
    );
    assert!(text.contains("Dry run: would copy 8 objects ("), "{text}");

    // An object under one of the keys with other content, and one under
    // `uploads/` that the migration does not copy, stop the migration
    // before anything is copied, and both are named.
    let taken_key = format!(
        "backups/{project}/{gw_a}/MASTER/{}-{}.dat",
        oldest.timestamp, oldest.job_id
    );
    let taken = object_store::path::Path::from(taken_key.as_str());
    let foreign = object_store::path::Path::from("uploads/999999.dat");
    let s3 = garage_client(garage);
    s3.put(&taken, b"another installation".to_vec().into())
        .await
        .unwrap();
    s3.put(&foreign, b"another upload".to_vec().into())
        .await
        .unwrap();
    let output = migrate(&old.data_dir(), &target, &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "the target bucket {} contains 1 object under the keys to copy, with other content \
             than the source files: {taken}",
            garage.bucket
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "1 object under backups/, uploads/, staging/ that this migration does not copy, \
             which a server on this bucket would treat as its own or delete: uploads/999999.dat"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("aws s3 rm s3://"), "{stderr}");
    assert_eq!(
        bucket_keys(garage).await,
        vec![taken.to_string(), foreign.to_string()]
    );
    s3.delete(&foreign).await.unwrap();

    // The file that an interrupted run copied before it was killed: the
    // same content under the same key is accepted and not copied again.
    let source_file = old.data_dir().join("objects/edgekeep").join(&taken_key);
    s3.put(&taken, std::fs::read(&source_file).unwrap().into())
        .await
        .unwrap();

    // The migration.
    let moved = report(&migrate(&old.data_dir(), &target, &["--json"]).await);
    assert_eq!(moved["dryRun"], false);
    assert_eq!(moved["projects"], 2);
    assert_eq!(moved["devices"], 4);
    assert_eq!(moved["tokens"], 2);
    assert_eq!(moved["jobs"], jobs.len() as u64);
    assert_eq!(moved["backups"], 7);
    assert_eq!(moved["objects"], 8);
    assert_eq!(moved["objectsPresent"], 1);
    assert_eq!(moved["skipped"], serde_json::json!([]));
    let listed_bytes: u64 = before.values().flatten().map(|b| b.size).sum();
    assert_eq!(moved["bytes"], listed_bytes + relocated.len() as u64);
    assert!(
        relocated.len() > 24 << 20,
        "the relocated backup spans several parts"
    );
    assert_eq!(
        file_digest(&source_db),
        source_digest,
        "the source is unchanged"
    );
    assert_eq!(bucket_keys(garage).await.len(), 8);

    // The administrator token and the device credentials moved as hashes.
    let admin_hash: String = database
        .query_one("SELECT hash FROM tokens WHERE admin", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(admin_hash, edgekeep_server::auth::hash_secret(&old.token));
    let spare_code: Option<String> = database
        .query_one(
            "SELECT activation_code_hash FROM devices WHERE id = $1",
            &[&spare.device.id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        spare_code,
        Some(edgekeep_server::auth::hash_secret(&spare.activation_code))
    );

    // A server on the new stores with a new data folder, and the agents
    // restarted with their old home and the new address.
    let new = Server::start(&target);
    let new_client = new.client();
    let mut new_agents = Vec::new();
    for (device, agent) in devices.iter().zip(&agents) {
        let restarted = Agent::start(&new, &agent.dir, None);
        wait_online(&new, project, *device, &restarted).await;
        new_agents.push(restarted);
    }
    let scoped_client = Client::new(&new.api, &scoped.token);
    assert_eq!(
        scoped_client.list_backups(project, gw_a).await.unwrap(),
        before[&gw_a]
    );

    // The queued import finds its copied file and lists it.
    let job = wait_job(&new, pending).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}\n{}", new.log());
    let after = backups_by_device(&new_client, project, &devices).await;
    assert_eq!(after[&gw_a], before[&gw_a]);
    assert_eq!(after[&gw_c], before[&gw_c]);
    assert_eq!(after[&gw_b].len(), before[&gw_b].len() + 1);
    assert_eq!(after[&gw_b][1..], before[&gw_b][..]);

    // Every backup downloads with its listed checksum and restores onto
    // its device.
    for (device, backups) in &after {
        for backup in backups {
            let url = new_client
                .download_url(project, *device, "MASTER", backup.timestamp)
                .await
                .unwrap();
            let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
            assert_eq!(bytes.len() as u64, backup.size);
            assert_eq!(hex::encode(sha2_digest(&bytes)), backup.checksum);

            let job = new_client
                .init_restore(project, *device, "MASTER", backup.timestamp, Some(*device))
                .await
                .unwrap()
                .unwrap();
            assert!(job > last_job, "job ids continue after the copied ones");
            let job = wait_job(&new, job).await;
            assert_eq!(job.state, JobState::Succeeded, "{job:?}");
        }
    }
    let project_after = new_client.create_project("plant-3").await.unwrap().id;
    assert_eq!(project_after, other_project + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_rejects_non_empty_target() {
    let Some(target) = StoreChoice::postgres().await else {
        return;
    };
    let mut old = Server::start(&StoreChoice::Sqlite);
    old.client().create_project("plant-1").await.unwrap();
    old.stop();

    // A server that ran once on the target stored its administrator token.
    let mut used = Server::start(&target);
    used.stop();

    let output = migrate(&old.data_dir(), &target, &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(
            "the target database is not empty: it contains 0 projects, 0 devices, 1 token, \
             0 jobs; point --database-url at a new database"
        ),
        "{stderr}"
    );
    let garage = target.garage().unwrap();
    assert_eq!(bucket_keys(garage).await, Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_rejects_column_target_lacks() {
    let Some(target) = StoreChoice::postgres().await else {
        return;
    };
    let mut old = Server::start(&StoreChoice::Sqlite);
    old.client().create_project("plant-1").await.unwrap();
    old.stop();

    // A column that a later SQLite migration might add without a
    // PostgreSQL counterpart.
    let source = rusqlite::Connection::open(old.data_dir().join("edgekeep.db")).unwrap();
    source
        .execute_batch("ALTER TABLE jobs ADD COLUMN priority INTEGER")
        .unwrap();
    drop(source);

    let output = migrate(&old.data_dir(), &target, &[]).await;
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the PostgreSQL schema cannot hold (column jobs.priority)"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was copied"), "{stderr}");

    // The rolled-back transaction also took the migrations with it.
    let database = postgres::connect_client(&target.database_url().unwrap())
        .await
        .unwrap();
    let tables: Option<String> = database
        .query_one("SELECT to_regclass('projects')::TEXT", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_rejects_running_source() {
    let server = Server::start(&StoreChoice::Sqlite);

    // The lock is taken before either target is contacted, so these
    // addresses are never used.
    let mut command = Command::new(BIN);
    command
        .args(["migrate", "--data-dir"])
        .arg(server.data_dir())
        .args(["--database-url", "postgres://edgekeep@127.0.0.1:9/edgekeep"])
        .args(["--s3-endpoint", "http://127.0.0.1:9"])
        .args(["--s3-access-key", "GKUNUSED", "--s3-secret-key", "unused"])
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("in use by another process (pid {})", server.pid())),
        "{stderr}"
    );
    assert!(
        stderr.contains("stop that server, then run the migration again"),
        "{stderr}"
    );
    let health = reqwest::get(format!("{}/healthz", server.api))
        .await
        .unwrap();
    assert!(health.status().is_success(), "the server still runs");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_reports_and_skips_damaged_backups() {
    let Some(target) = StoreChoice::postgres().await else {
        return;
    };
    let garage = target.garage().unwrap();

    // One device with three backups: one keeps its file, one gets changed
    // bytes of the same size and one loses its file.
    let mut old = Server::start(&StoreChoice::Sqlite);
    let client = old.client();
    let project = client.create_project("plant-1").await.unwrap().id;
    let (activation, mut agent) = add_device(&old, project, "gw-a", "").await;
    let device = activation.device.id;
    let mut backups = Vec::new();
    for _ in 0..3 {
        backups.push(backup(&old, project, device).await);
    }
    let jobs = client.list_jobs(None, None, None).await.unwrap().len() as u64;
    old.stop();
    agent.kill();

    let key_of = |backup: &Backup| {
        format!(
            "backups/{project}/{device}/MASTER/{}-{}.dat",
            backup.timestamp, backup.job_id
        )
    };
    let bucket_dir = old.data_dir().join("objects/edgekeep");
    let (intact, changed, missing) = (&backups[0], &backups[1], &backups[2]);
    let changed_file = bucket_dir.join(key_of(changed));
    let mut bytes = std::fs::read(&changed_file).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&changed_file, &bytes).unwrap();
    let changed_digest = hex::encode(sha2_digest(&bytes));
    std::fs::remove_file(bucket_dir.join(key_of(missing))).unwrap();

    // The dry run reads every file and lists both damaged backups.
    let expected_lines = [
        format!(
            "  project {project} device {device} MASTER backup {} ({}): the file has SHA-256 \
             {changed_digest}, but {} is listed",
            changed.timestamp,
            key_of(changed),
            changed.checksum
        ),
        format!(
            "  project {project} device {device} MASTER backup {} ({}): the file is missing",
            missing.timestamp,
            key_of(missing)
        ),
    ];
    for args in [&["--dry-run"][..], &[]] {
        let output = migrate(&old.data_dir(), &target, args).await;
        assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("2 of the 3 listed backups are damaged in the source"),
            "{args:?}: {stderr}"
        );
        for line in &expected_lines {
            assert!(stderr.contains(line.as_str()), "{args:?}: {stderr}");
        }
        assert!(
            stderr.contains("run the migration with --skip-damaged"),
            "{args:?}: {stderr}"
        );
        assert_eq!(bucket_keys(garage).await, Vec::<String>::new());
    }

    // With --skip-damaged the dry run and the migration leave both out.
    let dry = report(
        &migrate(
            &old.data_dir(),
            &target,
            &["--dry-run", "--skip-damaged", "--json"],
        )
        .await,
    );
    assert_eq!(dry["backups"], 1);
    assert_eq!(dry["skipped"].as_array().unwrap().len(), 2);
    let moved = report(&migrate(&old.data_dir(), &target, &["--skip-damaged", "--json"]).await);
    assert_eq!(moved["backups"], 1);
    assert_eq!(moved["objects"], 1);
    assert_eq!(moved["jobs"], jobs, "the jobs of skipped backups stay");
    let skipped: Vec<(String, i64)> = moved["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|backup| {
            (
                backup["key"].as_str().unwrap().to_string(),
                backup["timestamp"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        skipped,
        vec![
            (key_of(changed), changed.timestamp),
            (key_of(missing), missing.timestamp)
        ]
    );
    assert_eq!(bucket_keys(garage).await, vec![key_of(intact)]);

    // A server on the new stores lists only the intact backup.
    let new = Server::start(&target);
    let listed = new.client().list_backups(project, device).await.unwrap();
    assert_eq!(listed, vec![intact.clone()]);
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_leaves_foreign_folder_without_lock_file() {
    let dir = tempfile::tempdir().unwrap();
    let other = rusqlite::Connection::open(dir.path().join("edgekeep.db")).unwrap();
    other
        .execute_batch("CREATE TABLE readings (id INTEGER PRIMARY KEY)")
        .unwrap();
    drop(other);

    let mut command = Command::new(BIN);
    command
        .args(["migrate", "--data-dir"])
        .arg(dir.path())
        .args(["--database-url", "postgres://edgekeep@127.0.0.1:9/edgekeep"])
        .args(["--s3-endpoint", "http://127.0.0.1:9"])
        .args(["--s3-access-key", "GKUNUSED", "--s3-secret-key", "unused"])
        .stdin(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output().unwrap())
        .await
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is it an edgekeep database?"), "{stderr}");
    assert!(!dir.path().join("server.lock").exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_interrupted_deletes_its_copies() {
    let Some(target) = StoreChoice::postgres().await else {
        return;
    };
    let garage = target.garage().unwrap();

    // Backups of incompressible content, so the copy takes long enough for
    // a signal to arrive after the first object.
    let mut old = Server::start(&StoreChoice::Sqlite);
    let client = old.client();
    let project = client.create_project("plant-1").await.unwrap().id;
    let (activation, mut agent) = add_device(&old, project, "gw-a", "").await;
    let mut firmware = vec![0u8; 24 << 20];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut firmware);
    std::fs::write(agent.state().join("odd/firmware.bin"), &firmware).unwrap();
    for _ in 0..4 {
        backup(&old, project, activation.device.id).await;
    }
    old.stop();
    agent.kill();

    let mut command = Command::new(BIN);
    command
        .args(["migrate", "--data-dir"])
        .arg(old.data_dir())
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    target.configure(&mut command);
    let stderr = tokio::task::spawn_blocking(move || {
        use std::io::{BufRead, Read};

        let mut child = command.spawn().unwrap();
        let mut reader = std::io::BufReader::new(child.stderr.take().unwrap());
        let mut text = String::new();
        let mut line = String::new();
        while reader.read_line(&mut line).unwrap() > 0 {
            text.push_str(&line);
            if line.contains("copied and verified object") {
                break;
            }
            line.clear();
        }
        // SAFETY: kill(2) only sends a signal to the child, which has not
        // been waited for, so its pid is still ours.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGINT);
        }
        reader.read_to_string(&mut text).unwrap();
        let status = child.wait().unwrap();
        (status, text)
    })
    .await
    .unwrap();
    let (status, stderr) = stderr;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("the migration was interrupted by a signal"),
        "{stderr}"
    );
    assert!(
        stderr.contains("the objects this run copied were deleted"),
        "{stderr}"
    );
    assert_eq!(bucket_keys(garage).await, Vec::<String>::new());
    let database = postgres::connect_client(&target.database_url().unwrap())
        .await
        .unwrap();
    let tables: Option<String> = database
        .query_one("SELECT to_regclass('projects')::TEXT", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, None, "nothing was committed");
}
