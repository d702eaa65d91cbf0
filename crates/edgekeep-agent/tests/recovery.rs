//! Crash recovery: each journal phase, replayed by hand, then recovered.

mod common;

use common::{Device, IDENTITY_CONFIG, snapshot_tree};
use edgekeep_agent::{
    INTERRUPTED_BEFORE_SWAP_REASON, INTERRUPTED_REASON, Journal, JournalPhase, exchange_paths,
    recover,
};

/// Prepares `device` as a restore would just before the swap: its state
/// populated as "old", and a complete new state in the staging folder.
fn stage_by_hand(device: &Device, job_id: i64) -> (common::TreeSnapshot, common::TreeSnapshot) {
    device.populate("old");
    let staging = device.home.staging_path(job_id);
    std::fs::create_dir(&staging).unwrap();
    common::write(&staging, "config/connectors.json", "new");
    common::write(&staging, "flows/main.flow", "new flow");
    (snapshot_tree(&device.state), snapshot_tree(&staging))
}

fn write_journal(device: &Device, job_id: i64, phase: JournalPhase) -> Journal {
    let staging = device.home.staging_path(job_id);
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&staging).unwrap());
    let mut journal = Journal::new(job_id, &device.state, &staging, inode);
    journal.phase = phase;
    journal.write(&device.home).unwrap();
    journal
}

fn assert_rolled_back(device: &Device, job_id: i64, recovered: Option<Journal>) {
    let journal = recovered.expect("a journal was found");
    assert_eq!(journal.job_id, job_id);
    assert_eq!(journal.phase, JournalPhase::RolledBack);
    let result = journal.result();
    assert!(!result.ok);
    assert_eq!(result.reason.as_deref(), Some(INTERRUPTED_REASON));
    assert!(!device.home.staging_path(job_id).exists());
}

#[test]
fn swapping_before_swap_keeps_state() {
    let device = Device::new("uid-a", IDENTITY_CONFIG);
    let (old, _) = stage_by_hand(&device, 1);
    write_journal(&device, 1, JournalPhase::Swapping);

    let recovered = recover(&device.home, &device.state, None).unwrap();
    assert_eq!(snapshot_tree(&device.state), old);
    assert_rolled_back(&device, 1, recovered);
}

#[test]
fn swapping_after_swap_swaps_back() {
    let device = Device::new("uid-a", IDENTITY_CONFIG);
    let (old, new) = stage_by_hand(&device, 2);
    write_journal(&device, 2, JournalPhase::Swapping);
    exchange_paths(&device.home.staging_path(2), &device.state).unwrap();
    assert_eq!(snapshot_tree(&device.state), new);

    let recovered = recover(&device.home, &device.state, None).unwrap();
    assert_eq!(snapshot_tree(&device.state), old);
    assert_rolled_back(&device, 2, recovered);
}

#[test]
fn swapped_swaps_back() {
    let device = Device::new("uid-a", IDENTITY_CONFIG);
    let (old, _) = stage_by_hand(&device, 3);
    let mut journal = write_journal(&device, 3, JournalPhase::Swapping);
    exchange_paths(&device.home.staging_path(3), &device.state).unwrap();
    journal
        .advance(&device.home, JournalPhase::Swapped)
        .unwrap();

    let recovered = recover(&device.home, &device.state, None).unwrap();
    assert_eq!(snapshot_tree(&device.state), old);
    assert_rolled_back(&device, 3, recovered);

    // A second start before the report changes nothing.
    let again = recover(&device.home, &device.state, None).unwrap();
    assert_eq!(snapshot_tree(&device.state), old);
    assert_rolled_back(&device, 3, again);
    edgekeep_agent::remove_journal(&device.home).unwrap();
    assert!(
        recover(&device.home, &device.state, None)
            .unwrap()
            .is_none()
    );
}

#[test]
fn committed_keeps_new_state() {
    let device = Device::new("uid-a", IDENTITY_CONFIG);
    let (_, new) = stage_by_hand(&device, 4);
    let mut journal = write_journal(&device, 4, JournalPhase::Swapping);
    exchange_paths(&device.home.staging_path(4), &device.state).unwrap();
    journal
        .advance(&device.home, JournalPhase::Swapped)
        .unwrap();
    journal
        .advance(&device.home, JournalPhase::Committed)
        .unwrap();

    let recovered = recover(&device.home, &device.state, None).unwrap().unwrap();
    assert_eq!(snapshot_tree(&device.state), new);
    assert_eq!(recovered.phase, JournalPhase::Committed);
    assert!(recovered.result().ok);
    assert!(!device.home.staging_path(4).exists());
}

#[test]
fn journal_for_other_state_is_rejected() {
    let device = Device::new("uid-a", IDENTITY_CONFIG);
    stage_by_hand(&device, 5);
    write_journal(&device, 5, JournalPhase::Swapped);
    let other = device.root.path().join("elsewhere");
    let err = recover(&device.home, &other, None).unwrap_err().to_string();
    assert!(err.contains("elsewhere"), "{err}");
}

/// Environment variable that makes `restore_runner_for_kill_test` act as the
/// agent that a kill test stops: state folder, home, archive and config
/// path, one per line. An optional fifth line is a marker path: the runner
/// then writes that file and blocks once unpacking into staging started.
const RUNNER_ENV: &str = "EDGEKEEP_TEST_RESTORE_RUNNER";

#[test]
#[ignore = "runs only as the child process of the kill tests"]
fn restore_runner_for_kill_test() {
    let Ok(spec) = std::env::var(RUNNER_ENV) else {
        return;
    };
    let paths: Vec<&str> = spec.lines().collect();
    let state = std::path::Path::new(paths[0]);
    let home = edgekeep_agent::AgentHome::open(std::path::Path::new(paths[1]), state).unwrap();
    let config = edgekeep_agent::AgentConfig::load(std::path::Path::new(paths[3])).unwrap();
    let target = edgekeep_agent::RestoreTarget {
        config: &config,
        state_dir: state,
        home: &home,
        device_uid: "uid-b",
        restore_identity: false,
        arch: std::env::consts::ARCH,
        platform_version: "2.14.0",
    };
    let cancelled = std::sync::atomic::AtomicBool::new(false);
    let archive = std::path::Path::new(paths[2]);
    let staging = home.staging_path(18);
    let blocked_marker = paths.get(4).map(std::path::Path::new);
    let mut progress = |_| {
        if let Some(marker) = blocked_marker
            && staging.exists()
        {
            std::fs::write(marker, "unpacking").unwrap();
            std::thread::sleep(std::time::Duration::from_secs(120));
        }
    };
    // The runner blocks in unpacking or in a post_restore hook until the
    // parent test kills this process.
    let _ = edgekeep_agent::restore_archive(target, 18, archive, &cancelled, &mut progress);
}

/// Starts this test binary as `restore_runner_for_kill_test` with `spec`.
fn spawn_runner(spec: &str) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["restore_runner_for_kill_test", "--exact", "--ignored"])
        .env(RUNNER_ENV, spec)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// True while process `pid` exists and is not a zombie.
fn is_running(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next();
    !matches!(state, None | Some("Z") | Some("X"))
}

fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = std::time::Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "timed out waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn read_pid(path: &std::path::Path) -> i32 {
    std::fs::read_to_string(path)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn hook_outliving_agent_is_killed_on_recovery() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");

    // The hook leaves a background sleep in its process group, then waits.
    let marks = tempfile::tempdir().unwrap();
    let marks_dir = marks.path().display();
    let script = format!(
        "sleep 60 & echo $! > {marks_dir}/child.pid; echo $$ > {marks_dir}/hook.tmp; \
         mv {marks_dir}/hook.tmp {marks_dir}/hook.pid; wait"
    );
    let config = format!(
        "{IDENTITY_CONFIG}\n[hooks]\npost_restore = {{ command = [\"sh\", \"-c\", {script:?}], \
         timeout_secs = 120 }}\n"
    );
    let target = Device::new("uid-b", &config);
    target.populate("b");
    let before = snapshot_tree(&target.state);
    let config_path = target.root.path().join("agent.toml");
    std::fs::write(&config_path, &config).unwrap();

    // Run the restore in a child process until the hook runs after the swap.
    let spec = [
        target.state.display().to_string(),
        target.home.dir().display().to_string(),
        archive.display().to_string(),
        config_path.display().to_string(),
    ]
    .join("\n");
    let mut runner = spawn_runner(&spec);
    let hook_pid_path = marks.path().join("hook.pid");
    wait_until("the hook runs with its group journaled", || {
        hook_pid_path.exists()
            && Journal::read(&target.home)
                .ok()
                .flatten()
                .is_some_and(|journal| journal.hook.is_some())
    });
    let hook_pid = read_pid(&hook_pid_path);
    let child_pid = read_pid(&marks.path().join("child.pid"));
    assert!(is_running(hook_pid));

    // SIGKILL the agent: the hook dies with it, its background child does not.
    runner.kill().unwrap();
    runner.wait().unwrap();
    wait_until("the hook dies with the agent", || !is_running(hook_pid));
    assert!(is_running(child_pid), "the background sleep already exited");

    // Recovery kills the rest of the group before swapping back.
    let recovered = recover(&target.home, &target.state, None).unwrap();
    assert!(
        !is_running(child_pid),
        "sleep {child_pid} outlived recovery"
    );
    assert_eq!(snapshot_tree(&target.state), before);
    assert_rolled_back(&target, 18, recovered);
}

/// Creates a device whose hooks log to files in `marks`, and returns it with
/// its config path. `pre_restore` appends "pre" to pre.log. `post_restore`
/// appends "previous" to post.log on the previous state (flavour "b"). On
/// the restored state (flavour "a") it appends "new", records its pid in
/// hook.pid and sleeps.
fn device_with_logging_hooks(marks: &std::path::Path) -> (Device, std::path::PathBuf) {
    let marks = marks.display();
    let pre = format!("echo pre >> {marks}/pre.log");
    let post = format!(
        "if grep -q '\"a\"' config/connectors.json; then echo new >> {marks}/post.log; \
         echo $$ > {marks}/hook.tmp; mv {marks}/hook.tmp {marks}/hook.pid; exec sleep 60; \
         else echo previous >> {marks}/post.log; fi"
    );
    let config = format!(
        "{IDENTITY_CONFIG}\n[hooks]\npre_restore = {{ command = [\"sh\", \"-c\", {pre:?}] }}\n\
         post_restore = {{ command = [\"sh\", \"-c\", {post:?}], timeout_secs = 120 }}\n"
    );
    let device = Device::new("uid-b", &config);
    device.populate("b");
    let config_path = device.root.path().join("agent.toml");
    std::fs::write(&config_path, &config).unwrap();
    (device, config_path)
}

fn runner_spec(
    device: &Device,
    archive: &std::path::Path,
    config_path: &std::path::Path,
) -> String {
    [
        device.state.display().to_string(),
        device.home.dir().display().to_string(),
        archive.display().to_string(),
        config_path.display().to_string(),
    ]
    .join("\n")
}

fn read_or_empty(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[test]
fn kill_during_unpack_runs_post_restore_once() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");
    let marks = tempfile::tempdir().unwrap();
    let (target, config_path) = device_with_logging_hooks(marks.path());
    let before = snapshot_tree(&target.state);

    // Block the restore in unpacking, after pre_restore, then SIGKILL it.
    let blocked = marks.path().join("unpacking");
    let spec = format!(
        "{}\n{}",
        runner_spec(&target, &archive, &config_path),
        blocked.display()
    );
    let mut runner = spawn_runner(&spec);
    wait_until("the restore blocks in unpacking", || blocked.exists());
    let journal = Journal::read(&target.home).unwrap().unwrap();
    assert_eq!(journal.phase, JournalPhase::Staging);
    assert!(journal.pre_restore_started);
    runner.kill().unwrap();
    runner.wait().unwrap();
    assert_eq!(read_or_empty(&marks.path().join("pre.log")), "pre\n");
    assert_eq!(read_or_empty(&marks.path().join("post.log")), "");

    // Recovery runs post_restore on the unchanged state, once.
    let post_restore = target.config.hooks.post_restore.as_ref();
    let recovered = recover(&target.home, &target.state, post_restore)
        .unwrap()
        .unwrap();
    assert_eq!(read_or_empty(&marks.path().join("post.log")), "previous\n");
    assert_eq!(snapshot_tree(&target.state), before);
    assert_eq!(recovered.phase, JournalPhase::RolledBack);
    assert!(recovered.post_restore_done);
    let result = recovered.result();
    assert!(!result.ok);
    assert_eq!(
        result.reason.as_deref(),
        Some(INTERRUPTED_BEFORE_SWAP_REASON)
    );
    assert!(!target.home.staging_path(18).exists());

    // A second start before the report runs nothing again.
    let again = recover(&target.home, &target.state, post_restore)
        .unwrap()
        .unwrap();
    assert_eq!(again.phase, JournalPhase::RolledBack);
    assert_eq!(read_or_empty(&marks.path().join("post.log")), "previous\n");
}

#[test]
fn kill_after_swap_runs_post_restore_once() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");
    let marks = tempfile::tempdir().unwrap();
    let (target, config_path) = device_with_logging_hooks(marks.path());
    let before = snapshot_tree(&target.state);

    // Let the restore swap and start post_restore on the new state, then
    // SIGKILL it.
    let mut runner = spawn_runner(&runner_spec(&target, &archive, &config_path));
    let hook_pid_path = marks.path().join("hook.pid");
    wait_until("post_restore runs on the new state", || {
        hook_pid_path.exists()
            && Journal::read(&target.home)
                .ok()
                .flatten()
                .is_some_and(|journal| journal.hook.is_some())
    });
    let journal = Journal::read(&target.home).unwrap().unwrap();
    assert_eq!(journal.phase, JournalPhase::Swapped);
    assert!(journal.pre_restore_started);
    let hook_pid = read_pid(&hook_pid_path);
    runner.kill().unwrap();
    runner.wait().unwrap();
    wait_until("the hook dies with the agent", || !is_running(hook_pid));
    assert_eq!(read_or_empty(&marks.path().join("post.log")), "new\n");

    // Recovery swaps back, then runs post_restore on the previous state once.
    let post_restore = target.config.hooks.post_restore.as_ref();
    let recovered = recover(&target.home, &target.state, post_restore).unwrap();
    assert_eq!(snapshot_tree(&target.state), before);
    assert_eq!(
        read_or_empty(&marks.path().join("post.log")),
        "new\nprevious\n"
    );
    assert_rolled_back(&target, 18, recovered);

    let again = recover(&target.home, &target.state, post_restore).unwrap();
    assert_rolled_back(&target, 18, again);
    assert_eq!(
        read_or_empty(&marks.path().join("post.log")),
        "new\nprevious\n"
    );
    assert_eq!(read_or_empty(&marks.path().join("pre.log")), "pre\n");
}

#[test]
fn version_1_journal_recovers_without_post_restore() {
    let marks = tempfile::tempdir().unwrap();
    let (device, _) = device_with_logging_hooks(marks.path());
    let old = snapshot_tree(&device.state);
    let staging = device.home.staging_path(6);
    std::fs::create_dir(&staging).unwrap();
    common::write(&staging, "config/connectors.json", "new");
    let inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&staging).unwrap());
    exchange_paths(&staging, &device.state).unwrap();

    // The layout a version 1 agent wrote: no staging phase, no hook flags.
    let journal = serde_json::json!({
        "version": 1,
        "jobId": 6,
        "phase": "swapped",
        "stateDir": device.state,
        "staging": staging,
        "stagingInode": inode,
        "reason": null,
    });
    std::fs::write(device.home.journal_path(), journal.to_string()).unwrap();
    let read = Journal::read(&device.home).unwrap().unwrap();
    assert_eq!(read.version, 2);
    assert!(!read.pre_restore_started);
    assert!(!read.post_restore_done);

    let post_restore = device.config.hooks.post_restore.as_ref();
    let recovered = recover(&device.home, &device.state, post_restore).unwrap();
    assert_eq!(snapshot_tree(&device.state), old);
    assert_rolled_back(&device, 6, recovered);
    assert_eq!(read_or_empty(&marks.path().join("post.log")), "");
}
