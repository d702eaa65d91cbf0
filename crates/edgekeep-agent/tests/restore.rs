//! Restores through staging, swap and rollback, against real archives.

mod common;

use std::sync::atomic::AtomicBool;

use common::{Device, IDENTITY_CONFIG, Node, read, snapshot_tree, write};
use edgekeep_agent::{Error, Journal, JournalPhase, restore_archive};

fn restore(device: &Device, job_id: i64, archive: &std::path::Path) -> edgekeep_agent::Result<()> {
    let cancelled = AtomicBool::new(false);
    restore_archive(device.target(), job_id, archive, &cancelled, &mut |_| {}).map(|_| ())
}

#[test]
fn restore_onto_other_device_keeps_its_identity() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");

    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");
    let before = snapshot_tree(&target.state);
    restore(&target, 7, &archive).unwrap();
    let after = snapshot_tree(&target.state);

    // The backup's configuration is in place.
    assert_eq!(
        read(&target.state, "config/connectors.json"),
        "{\"line\": \"a\"}"
    );
    assert_eq!(read(&target.state, "flows/main.flow"), "flow of a");
    assert_eq!(read(&target.state, "identity/ca.crt"), "CA a");
    // The target's identity paths are byte for byte its own, modes included.
    for id in ["identity/device.crt", "identity/hostname"] {
        assert_eq!(after[id], before[id], "{id}");
    }
    // Excluded and unlisted paths stay as they were.
    for kept in ["logs/agent.log", "config/scratch.tmp", "unlisted/notes.txt"] {
        assert_eq!(after[kept], before[kept], "{kept}");
    }
    assert_eq!(
        after["config/current.json"],
        Node::Symlink {
            target: "connectors.json".into()
        }
    );
    // The rollback copy and the staging folder are gone; the journal waits
    // for the report.
    assert_eq!(target.home_leftovers(), ["journal.json"]);
    let journal = Journal::read(&target.home).unwrap().unwrap();
    assert_eq!(journal.phase, JournalPhase::Committed);
    assert!(journal.result().ok);
}

#[test]
fn restore_onto_same_device_restores_identity() {
    let device = Device::new("uid-a", IDENTITY_CONFIG);
    device.populate("a");
    let expected = snapshot_tree(&device.state);
    let archive = device.pack("a.dat");

    // The device changes after the backup, identity included.
    write(&device.state, "identity/device.crt", "CERT reissued");
    write(&device.state, "identity/hostname", "gw-renamed");
    write(&device.state, "config/connectors.json", "{}");
    write(&device.state, "flows/new.flow", "added later");

    restore(&device, 8, &archive).unwrap();
    let after = snapshot_tree(&device.state);
    assert_eq!(
        after["identity/device.crt"],
        expected["identity/device.crt"]
    );
    assert_eq!(after["identity/hostname"], expected["identity/hostname"]);
    assert_eq!(
        after["config/connectors.json"],
        expected["config/connectors.json"]
    );
    assert!(!after.contains_key("flows/new.flow"));
    assert_eq!(after, expected);
}

#[test]
fn corrupt_archive_leaves_state_unchanged() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");
    let mut bytes = std::fs::read(&archive).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&archive, bytes).unwrap();

    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");
    let before = snapshot_tree(&target.state);
    let err = restore(&target, 9, &archive).unwrap_err();
    assert!(matches!(err, Error::Archive(_)), "{err}");
    assert_eq!(snapshot_tree(&target.state), before);
    assert!(
        target.home_leftovers().is_empty(),
        "{:?}",
        target.home_leftovers()
    );
}

#[test]
fn failing_post_restore_rolls_back() {
    let config = format!(
        "{IDENTITY_CONFIG}\n[hooks]\npost_restore = {{ command = [\"sh\", \"-c\", \
         \"echo service failed >&2; exit 4\"] }}\n"
    );
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");

    let target = Device::new("uid-b", &config);
    target.populate("b");
    let before = snapshot_tree(&target.state);
    let err = restore(&target, 10, &archive).unwrap_err().to_string();
    assert!(err.contains("post_restore"), "{err}");
    assert!(err.contains("service failed"), "{err}");

    assert_eq!(snapshot_tree(&target.state), before);
    let journal = Journal::read(&target.home).unwrap().unwrap();
    assert_eq!(journal.phase, JournalPhase::RolledBack);
    let result = journal.result();
    assert!(!result.ok);
    assert!(
        result
            .reason
            .unwrap()
            .contains("previous state was put back")
    );
    assert_eq!(target.home_leftovers(), ["journal.json"]);
}

#[test]
fn incompatible_arch_is_rejected() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");

    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");
    let before = snapshot_tree(&target.state);
    let mut target_info = target.target();
    target_info.arch = "sparc64";
    let cancelled = AtomicBool::new(false);
    let err = restore_archive(target_info, 11, &archive, &cancelled, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("sparc64"), "{err}");
    assert!(err.contains(std::env::consts::ARCH), "{err}");
    assert_eq!(snapshot_tree(&target.state), before);
    assert!(target.home_leftovers().is_empty());
}

#[test]
fn older_platform_version_is_rejected() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");

    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");
    let before = snapshot_tree(&target.state);
    let mut target_info = target.target();
    target_info.platform_version = "2.9.3";
    let cancelled = AtomicBool::new(false);
    let err = restore_archive(target_info, 12, &archive, &cancelled, &mut |_| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("2.14.0"), "{err}");
    assert!(err.contains("2.9.3"), "{err}");
    assert_eq!(snapshot_tree(&target.state), before);
    assert!(target.home_leftovers().is_empty());
}

#[test]
fn cancelled_restore_changes_nothing() {
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");

    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");
    let before = snapshot_tree(&target.state);
    let cancelled = AtomicBool::new(true);
    let err = restore_archive(target.target(), 13, &archive, &cancelled, &mut |_| {}).unwrap_err();
    assert!(matches!(err, Error::Cancelled), "{err}");
    assert_eq!(snapshot_tree(&target.state), before);
    assert!(target.home_leftovers().is_empty());
}

#[test]
fn missing_include_path_is_named() {
    let device = Device::new("uid-a", IDENTITY_CONFIG);
    device.populate("a");
    std::fs::remove_dir_all(device.state.join("flows")).unwrap();
    let out = device.root.path().join("a.dat");
    let err = edgekeep_agent::pack_state(
        &device.config,
        &device.state,
        &device.source(),
        device.home.dir(),
        &out,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("flows"), "{err}");
    assert!(!out.exists());
}
