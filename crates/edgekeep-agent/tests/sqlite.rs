//! SQLite databases packed while another thread writes them in WAL mode.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Device, snapshot_tree, write};
use edgekeep_agent::restore_archive;
use rusqlite::Connection;

const CONFIG: &str = r#"
include = ["config", "data"]
[[sqlite]]
path = "data/historian.db"
"#;

/// Writes rows in small transactions until `stop` is set.
fn spawn_writer(
    path: std::path::PathBuf,
    stop: Arc<AtomicBool>,
    rows: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut db = Connection::open(path).unwrap();
        db.busy_timeout(Duration::from_secs(10)).unwrap();
        let payload = "x".repeat(500);
        while !stop.load(Ordering::SeqCst) {
            let tx = db.transaction().unwrap();
            for _ in 0..20 {
                tx.execute(
                    "INSERT INTO readings (tag, value, note) VALUES ('line-1', random(), ?1)",
                    [&payload],
                )
                .unwrap();
            }
            tx.commit().unwrap();
            rows.fetch_add(20, Ordering::SeqCst);
        }
    })
}

#[test]
fn sqlite_snapshot_under_wal_writes_restores_intact() {
    let device = Device::new("uid-a", CONFIG);
    write(&device.state, "config/app.json", "{}");
    std::fs::create_dir_all(device.state.join("data")).unwrap();
    let db_path = device.state.join("data/historian.db");
    {
        let db = Connection::open(&db_path).unwrap();
        db.query_row("PRAGMA journal_mode=WAL", [], |_| Ok(()))
            .unwrap();
        db.execute_batch(
            "CREATE TABLE readings (id INTEGER PRIMARY KEY, tag TEXT, value INTEGER, note TEXT);
             CREATE INDEX readings_tag ON readings (tag, value);",
        )
        .unwrap();
    }

    // Pack several times while the writer runs, so snapshots overlap writes.
    let stop = Arc::new(AtomicBool::new(false));
    let rows = Arc::new(AtomicU64::new(0));
    let writer = spawn_writer(db_path.clone(), stop.clone(), rows.clone());
    while rows.load(Ordering::SeqCst) < 2_000 {
        std::thread::sleep(Duration::from_millis(10));
    }
    let rows_before_packing = rows.load(Ordering::SeqCst);
    let mut archive = device.pack("first.dat");
    for round in 0..3 {
        archive = device.pack(&format!("round-{round}.dat"));
    }
    let rows_after_packing = rows.load(Ordering::SeqCst);
    assert!(std::fs::metadata(device.state.join("data/historian.db-wal")).is_ok());
    stop.store(true, Ordering::SeqCst);
    writer.join().unwrap();
    assert!(
        rows_after_packing > rows_before_packing,
        "the writer made no progress while packing"
    );

    // The archive contains the database but none of its side files.
    let manifest = edgekeep_archive::read_manifest(&archive).unwrap();
    let paths: Vec<String> = manifest
        .entries
        .iter()
        .map(|e| e.path.to_string())
        .collect();
    assert!(
        paths.contains(&"data/historian.db".to_string()),
        "{paths:?}"
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.ends_with("-wal") || p.ends_with("-shm")),
        "{paths:?}"
    );

    // Restore onto a second device that has a stale WAL beside its database.
    let target = Device::new("uid-b", CONFIG);
    write(&target.state, "config/app.json", "{\"old\": true}");
    write(&target.state, "data/historian.db", "not a database");
    write(&target.state, "data/historian.db-wal", "stale wal");
    let cancelled = AtomicBool::new(false);
    restore_archive(target.target(), 1, &archive, &cancelled, &mut |_| {}).unwrap();
    let after = snapshot_tree(&target.state);
    assert!(!after.contains_key("data/historian.db-wal"));
    assert!(!after.contains_key("data/historian.db-shm"));

    let restored = Connection::open(target.state.join("data/historian.db")).unwrap();
    let check: String = restored
        .query_row("PRAGMA integrity_check", [], |row| row.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let count: u64 = restored
        .query_row("SELECT count(*) FROM readings", [], |row| row.get(0))
        .unwrap();
    assert!(count >= rows_before_packing, "{count} rows restored");
    assert!(count <= rows_after_packing + 20, "{count} rows restored");
    assert_eq!(count % 20, 0, "a transaction was torn: {count} rows");
}
