//! `edgekeep quickstart` runs the whole workflow and exits 0.

use std::process::Command;

use crate::harness::{BIN, StoreChoice};

async fn quickstart_passes_every_check(store: StoreChoice) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(BIN);
    command.args(["quickstart", "--dir"]).arg(dir.path());
    // The server that quickstart starts inherits the store variables.
    store.configure(&mut command);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
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

e2e_tests!(quickstart_passes_every_check);
