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
