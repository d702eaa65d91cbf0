//! Restores that fail or are interrupted leave the target as it was, and a
//! successful one keeps every detail of the state.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use edgekeep_api::JobState;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

use crate::harness::*;

/// Reads the state tree of an agent started by the harness.
fn state_tree(agent: &Agent) -> std::collections::BTreeMap<std::path::PathBuf, String> {
    tree(&agent.state())
}

async fn restore_of_corrupt_backup_leaves_target_unchanged(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let (a, _agent_a) = add_device(&server, project, "gw-a", "").await;
    let (b, agent_b) = add_device(&server, project, "gw-b", "").await;
    let backup = backup(&server, project, a.device.id).await;

    // Damage the stored object behind the server's back.
    let s3 = server.s3_client(None);
    let stored = ObjectPath::from(format!(
        "backups/{project}/{}/MASTER/{}-{}.dat",
        a.device.id, backup.timestamp, backup.job_id
    ));
    let mut bytes = s3
        .get(&stored)
        .await
        .expect("the backup is stored under its key")
        .bytes()
        .await
        .unwrap()
        .to_vec();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    s3.put(&stored, PutPayload::from(bytes)).await.unwrap();

    let before = state_tree(&agent_b);
    let job = client
        .init_restore(
            project,
            b.device.id,
            "MASTER",
            backup.timestamp,
            Some(a.device.id),
        )
        .await
        .unwrap()
        .unwrap();
    let job = wait_job(&server, job).await;
    assert_eq!(job.state, JobState::Failed, "{job:?}");
    assert!(job.reason.is_some());
    assert_eq!(
        state_tree(&agent_b),
        before,
        "the target is exactly as before"
    );
}

async fn restore_killed_halfway_leaves_target_unchanged(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let (a, _agent_a) = add_device(&server, project, "gw-a", "").await;

    // The post-restore hook runs after the new state is swapped in; the
    // agent is killed while it runs.
    let dir_b = server.device_dir("gw-b");
    let marker = dir_b.join("post-restore-started");
    let hook = format!(
        "[hooks]\npost_restore = {{ command = [\"sh\", \"-c\", \"touch '{}'; sleep 60\"], \
         timeout_secs = 120 }}\n",
        marker.display()
    );
    let (b, mut agent_b) = add_device(&server, project, "gw-b", &hook).await;
    let backup = backup(&server, project, a.device.id).await;
    let before = state_tree(&agent_b);

    let job = client
        .init_restore(
            project,
            b.device.id,
            "MASTER",
            backup.timestamp,
            Some(a.device.id),
        )
        .await
        .unwrap()
        .unwrap();
    let deadline = Instant::now() + STEP_TIMEOUT;
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "the hook never ran:\n{}",
            agent_b.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_ne!(state_tree(&agent_b), before, "the new state was swapped in");
    agent_b.kill();

    // The next start puts the previous state back and reports the job.
    let agent_b = Agent::start(&server, &agent_b.dir, None);
    let job = wait_job(&server, job).await;
    assert_eq!(job.state, JobState::Failed, "{job:?}\n{}", agent_b.log());
    assert_eq!(
        state_tree(&agent_b),
        before,
        "the target is exactly as before"
    );
}

/// Adds files that tar-like formats get wrong: empty folders, modes, a
/// non-UTF-8 name, a name over 100 bytes, symlinks and deep nesting.
fn add_odd_files(state: &Path) {
    let odd = state.join("odd");
    std::fs::create_dir_all(odd.join("empty")).unwrap();
    std::fs::create_dir_all(odd.join("private")).unwrap();
    std::fs::create_dir_all(odd.join("a/b/c/d/e/f")).unwrap();
    std::fs::write(odd.join("a/b/c/d/e/f/deep.txt"), "deep\n").unwrap();
    std::fs::write(odd.join("secret.key"), "k").unwrap();
    std::fs::write(odd.join("run.sh"), "#!/bin/sh\necho hi\n").unwrap();
    std::fs::write(odd.join("frozen.cfg"), "read only\n").unwrap();
    std::fs::write(
        odd.join(OsStr::from_bytes(b"caf\xe9-latin1.txt")),
        "latin-1 name\n",
    )
    .unwrap();
    let long = "n".repeat(150) + ".json";
    std::fs::write(odd.join(&long), "{}\n").unwrap();
    std::os::unix::fs::symlink("../config/tags.csv", odd.join("tags-link")).unwrap();
    std::os::unix::fs::symlink("a/b", odd.join("dir-link")).unwrap();
    for (path, mode) in [
        ("secret.key", 0o600),
        ("run.sh", 0o755),
        ("frozen.cfg", 0o444),
        ("private", 0o700),
        ("empty", 0o750),
    ] {
        std::fs::set_permissions(odd.join(path), std::fs::Permissions::from_mode(mode)).unwrap();
    }
}

async fn round_trip_keeps_modes_empty_folders_and_odd_names(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let (a, agent_a) = add_device(&server, project, "gw-a", "").await;
    let (b, agent_b) = add_device(&server, project, "gw-b", "").await;
    add_odd_files(&agent_a.state());

    let backup = backup(&server, project, a.device.id).await;
    let job = client
        .init_restore(
            project,
            b.device.id,
            "MASTER",
            backup.timestamp,
            Some(a.device.id),
        )
        .await
        .unwrap()
        .unwrap();
    let job = wait_job(&server, job).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}\n{}", agent_b.log());

    let expected = tree(&agent_a.state().join("odd"));
    let actual = tree(&agent_b.state().join("odd"));
    assert_eq!(actual, expected);
    assert_eq!(
        expected.len(),
        16,
        "every odd path was compared: {expected:#?}"
    );
    assert_eq!(
        tree(&agent_b.state().join("config")),
        tree(&agent_a.state().join("config"))
    );
}

e2e_tests!(
    restore_of_corrupt_backup_leaves_target_unchanged,
    restore_killed_halfway_leaves_target_unchanged,
    round_trip_keeps_modes_empty_folders_and_odd_names,
);
