//! Crash recovery: each journal phase, replayed by hand, then recovered.

mod common;

use common::{Device, IDENTITY_CONFIG, snapshot_tree};
use edgekeep_agent::{INTERRUPTED_REASON, Journal, JournalPhase, exchange_paths, recover};

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

    let recovered = recover(&device.home, &device.state).unwrap();
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

    let recovered = recover(&device.home, &device.state).unwrap();
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

    let recovered = recover(&device.home, &device.state).unwrap();
    assert_eq!(snapshot_tree(&device.state), old);
    assert_rolled_back(&device, 3, recovered);

    // A second start before the report changes nothing.
    let again = recover(&device.home, &device.state).unwrap();
    assert_eq!(snapshot_tree(&device.state), old);
    assert_rolled_back(&device, 3, again);
    edgekeep_agent::remove_journal(&device.home).unwrap();
    assert!(recover(&device.home, &device.state).unwrap().is_none());
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

    let recovered = recover(&device.home, &device.state).unwrap().unwrap();
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
    let err = recover(&device.home, &other).unwrap_err().to_string();
    assert!(err.contains("elsewhere"), "{err}");
}

/// Environment variable that makes `restore_runner_for_kill_test` act as the
/// agent that the kill test stops: state folder, home, archive and config
/// path, one per line.
const RUNNER_ENV: &str = "EDGEKEEP_TEST_RESTORE_RUNNER";

#[test]
#[ignore = "runs only as the child process of hook_outliving_agent_is_killed_on_recovery"]
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
    // The post_restore hook sleeps until the parent test kills this process.
    let _ = edgekeep_agent::restore_archive(target, 18, archive, &cancelled, &mut |_| {});
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
    let mut runner = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["restore_runner_for_kill_test", "--exact", "--ignored"])
        .env(RUNNER_ENV, spec)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
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
    let recovered = recover(&target.home, &target.state).unwrap();
    assert!(
        !is_running(child_pid),
        "sleep {child_pid} outlived recovery"
    );
    assert_eq!(snapshot_tree(&target.state), before);
    assert_rolled_back(&target, 18, recovered);
}
