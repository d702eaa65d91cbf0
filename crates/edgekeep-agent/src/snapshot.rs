//! Consistent copies of live SQLite databases through SQLite's online backup
//! API.

use std::path::Path;
use std::time::Duration;

use rusqlite::backup::Backup;
use rusqlite::{Connection, OpenFlags};

use crate::error::{Error, Result};

/// Pages copied per backup step.
const PAGES_PER_STEP: std::os::raw::c_int = 256;

/// Copies the database at `source` into a new file at `out`.
///
/// The source connection keeps one read transaction open for the whole
/// copy, so the snapshot is a single consistent state. In WAL mode writers in
/// other connections and processes keep working meanwhile. In
/// rollback-journal mode that read transaction makes their commits wait for
/// the copy. A busy or locked step is retried by `run_to_completion`, and
/// opening waits up to 10 s for locks.
pub(crate) fn snapshot_database(source: &Path, out: &Path) -> Result<()> {
    let sqlite_err = |source_err| Error::Sqlite {
        path: source.to_path_buf(),
        source: source_err,
    };
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let src = Connection::open_with_flags(source, flags).map_err(sqlite_err)?;
    src.busy_timeout(Duration::from_secs(10))
        .map_err(sqlite_err)?;

    // Pin one snapshot: a read transaction that has read the schema.
    src.execute_batch("BEGIN").map_err(sqlite_err)?;
    src.query_row("SELECT count(*) FROM sqlite_schema", [], |row| {
        row.get::<_, i64>(0)
    })
    .map_err(sqlite_err)?;

    let mut dst = Connection::open(out).map_err(|e| Error::Sqlite {
        path: out.to_path_buf(),
        source: e,
    })?;
    {
        let backup = Backup::new(&src, &mut dst).map_err(sqlite_err)?;
        backup
            .run_to_completion(PAGES_PER_STEP, Duration::from_millis(5), None)
            .map_err(sqlite_err)?;
    }
    src.execute_batch("COMMIT").map_err(sqlite_err)?;

    // The copy keeps the source's journal mode in its header. Checkpoint and
    // close it so it is one self-contained file.
    dst.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
        .map_err(sqlite_err)?;
    dst.close().map_err(|(_, e)| sqlite_err(e))?;
    for suffix in crate::selection::SQLITE_SIDE_FILES {
        let side = format!("{}{suffix}", out.display());
        let _ = std::fs::remove_file(side);
    }
    Ok(())
}
