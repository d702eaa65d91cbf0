//! Restores through staging, swap and rollback, against real archives.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt};
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

#[test]
fn forged_source_uid_keeps_identity() {
    // Another device packs its state but claims the target's uid.
    let attacker = Device::new("uid-b", IDENTITY_CONFIG);
    attacker.populate("attacker");
    let archive = attacker.pack("forged.dat");

    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");
    let before = snapshot_tree(&target.state);
    let mut target_info = target.target();
    target_info.restore_identity = false;
    let cancelled = AtomicBool::new(false);
    restore_archive(target_info, 14, &archive, &cancelled, &mut |_| {}).unwrap();

    let after = snapshot_tree(&target.state);
    for id in ["identity/device.crt", "identity/hostname"] {
        assert_eq!(after[id], before[id], "{id}");
    }
    assert_eq!(read(&target.state, "flows/main.flow"), "flow of attacker");
}

#[test]
fn own_backup_without_server_mark_keeps_identity() {
    let device = Device::new("uid-a", IDENTITY_CONFIG);
    device.populate("a");
    let archive = device.pack("a.dat");
    write(&device.state, "identity/device.crt", "CERT reissued");

    let mut target_info = device.target();
    target_info.restore_identity = false;
    let cancelled = AtomicBool::new(false);
    restore_archive(target_info, 15, &archive, &cancelled, &mut |_| {}).unwrap();
    assert_eq!(read(&device.state, "identity/device.crt"), "CERT reissued");
    assert_eq!(read(&device.state, "identity/hostname"), "gw-a");
}

/// Adds a FIFO, a socket and a symlink leaving the state below `config`.
/// Returns the socket's listener, which must stay open while it is checked.
fn add_unarchivable_entries(device: &Device) -> std::os::unix::net::UnixListener {
    let fifo = std::ffi::CString::new(
        device
            .state
            .join("config/control.fifo")
            .into_os_string()
            .into_encoded_bytes(),
    )
    .unwrap();
    // SAFETY: the path is a valid NUL-terminated string.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o640) }, 0);
    std::os::unix::fs::symlink("/etc/hostname", device.state.join("config/host-link")).unwrap();
    std::os::unix::net::UnixListener::bind(device.state.join("config/gateway.sock")).unwrap()
}

#[test]
fn restore_keeps_entries_backup_skips() {
    let device = Device::new("uid-a", IDENTITY_CONFIG);
    device.populate("a");
    let _listener = add_unarchivable_entries(&device);
    let out = device.root.path().join("a.dat");
    let packed = edgekeep_agent::pack_state(
        &device.config,
        &device.state,
        &device.source(),
        device.home.dir(),
        &out,
    )
    .unwrap();
    let mut skipped: Vec<&str> = packed.skipped.iter().map(|s| s.path.as_str()).collect();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "config/control.fifo",
            "config/gateway.sock",
            "config/host-link"
        ]
    );
    let note = packed.skipped_note().unwrap();
    assert!(note.contains("3 entries"), "{note}");
    assert!(note.contains("config/host-link"), "{note}");

    let fifo_inode = std::fs::symlink_metadata(device.state.join("config/control.fifo"))
        .unwrap()
        .ino();
    restore(&device, 16, &out).unwrap();

    let fifo = std::fs::symlink_metadata(device.state.join("config/control.fifo")).unwrap();
    assert!(fifo.file_type().is_fifo());
    assert_eq!(fifo.ino(), fifo_inode);
    let socket = std::fs::symlink_metadata(device.state.join("config/gateway.sock")).unwrap();
    assert!(socket.file_type().is_socket());
    assert_eq!(
        std::fs::read_link(device.state.join("config/host-link")).unwrap(),
        std::path::Path::new("/etc/hostname")
    );
    // The socket still reaches the listener after the swap.
    std::os::unix::net::UnixStream::connect(device.state.join("config/gateway.sock")).unwrap();
    assert_eq!(read(&device.state, "flows/main.flow"), "flow of a");
}

#[test]
fn include_symlink_leaving_state_is_skipped_and_kept() {
    let config = r#"include = ["config", "flows"]"#;
    let device = Device::new("uid-a", config);
    device.populate("a");
    let outside = device.root.path().join("outside-flows");
    std::fs::create_dir(&outside).unwrap();
    write(&outside, "main.flow", "flow kept outside");
    std::fs::remove_dir_all(device.state.join("flows")).unwrap();
    std::os::unix::fs::symlink(&outside, device.state.join("flows")).unwrap();

    let out = device.root.path().join("a.dat");
    let packed = edgekeep_agent::pack_state(
        &device.config,
        &device.state,
        &device.source(),
        device.home.dir(),
        &out,
    )
    .unwrap();
    assert_eq!(packed.skipped.len(), 1);
    assert_eq!(packed.skipped[0].path, "flows");
    assert!(
        packed.skipped[0].reason.contains("absolute"),
        "{}",
        packed.skipped[0].reason
    );

    write(&device.state, "config/connectors.json", "changed later");
    restore(&device, 17, &out).unwrap();
    assert_eq!(
        std::fs::read_link(device.state.join("flows")).unwrap(),
        outside
    );
    assert_eq!(read(&device.state, "flows/main.flow"), "flow kept outside");
    assert_eq!(
        read(&device.state, "config/connectors.json"),
        "{\"line\": \"a\"}"
    );
}

#[test]
fn hook_appending_to_kept_file_leaves_rollback_copy() {
    // On the new state the hook appends to an excluded log, then fails, so
    // the rollback puts the previous state back. On the previous state it
    // does nothing.
    let script = "if grep -q '\"a\"' config/connectors.json; then \
                  echo appended >> logs/agent.log; exit 1; fi";
    let config = format!(
        "{IDENTITY_CONFIG}\n[hooks]\npost_restore = {{ command = [\"sh\", \"-c\", {script:?}] }}\n"
    );
    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");

    let target = Device::new("uid-b", &config);
    target.populate("b");
    let before = snapshot_tree(&target.state);
    let err = restore(&target, 24, &archive).unwrap_err().to_string();
    assert!(err.contains("post_restore"), "{err}");

    assert_eq!(read(&target.state, "logs/agent.log"), "log of b");
    assert_eq!(snapshot_tree(&target.state), before);
}

#[test]
fn kept_file_is_copy_with_same_mtime() {
    use std::os::unix::fs::PermissionsExt;

    let source = Device::new("uid-a", IDENTITY_CONFIG);
    source.populate("a");
    let archive = source.pack("a.dat");
    let target = Device::new("uid-b", IDENTITY_CONFIG);
    target.populate("b");
    let log = target.state.join("logs/agent.log");
    std::fs::set_permissions(&log, std::fs::Permissions::from_mode(0o640)).unwrap();
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::new(1_600_000_000, 123_456_789);
    std::fs::File::options()
        .write(true)
        .open(&log)
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let old = std::fs::metadata(&log).unwrap();
    restore(&target, 25, &archive).unwrap();

    let new = std::fs::metadata(&log).unwrap();
    assert_ne!(new.ino(), old.ino(), "the kept log shares its inode");
    assert_eq!(new.nlink(), 1);
    assert_eq!(new.mode() & 0o7777, 0o640);
    assert_eq!(new.modified().unwrap(), mtime);
    assert_eq!(read(&target.state, "logs/agent.log"), "log of b");
}
