//! `edgekeep quickstart` runs the whole workflow and exits 0.

use std::process::Command;

use crate::harness::BIN;

#[test]
fn quickstart_passes_every_check() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(BIN)
        .args(["quickstart", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "quickstart failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("checks passed"), "{stdout}");
    assert!(!stdout.contains("FAILED"), "{stdout}");
    assert!(
        stdout.contains("> POST /api/v1/backup/init-restore?"),
        "{stdout}"
    );
}
