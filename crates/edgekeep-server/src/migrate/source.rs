//! The embedded installation being moved: `DATA/edgekeep.db`, opened read
//! only, and the bucket folder of the embedded S3 endpoint.

use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::cell::{Cell, Conversion};
use super::quote;
use crate::store::SqliteStore;

/// A table of the source database and its columns in schema order.
#[derive(Debug, Clone)]
pub(super) struct SourceTable {
    pub name: String,
    pub columns: Vec<String>,
}

/// A source row: its SQLite rowid, for messages and paging, and its values.
pub(super) type SourceRow = (i64, Vec<Cell>);

/// The source database, read inside one read transaction so every query
/// reads the same snapshot.
pub(super) struct Source {
    connection: Arc<Mutex<Connection>>,
}

/// An object that a listed backup or a pending import refers to.
#[derive(Debug, Clone)]
pub(super) struct ReferencedObject {
    pub key: String,
    /// Description of the row that refers to it, for messages, such as
    /// `backup 1/4/MASTER/1796400000000`.
    pub owner: String,
    /// The backup row that lists the object; `None` for an import file,
    /// which is not validated yet.
    pub backup: Option<ListedBackup>,
}

/// A backup row: its key columns and the size and SHA-256 it lists.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct ListedBackup {
    pub project_id: i64,
    pub device_id: i64,
    pub backup_type: String,
    pub timestamp: i64,
    pub size: u64,
    /// SHA-256 in lowercase hex.
    pub checksum: String,
}

/// Checks that `DATA/edgekeep.db` is an edgekeep database with this
/// version's schema, without keeping it open. It runs before the data
/// folder is locked, so a wrong folder gets no lock file.
pub(super) fn check_database(data_dir: &Path) -> anyhow::Result<()> {
    let database = data_dir.join("edgekeep.db");
    anyhow::ensure!(
        database.is_file(),
        "no embedded metadata database at {}; give --data-dir the folder that edgekeep server \
         used, which contains edgekeep.db and objects/",
        database.display()
    );
    let connection = open_read_only(&database)?;
    check_schema_version(&connection, &database)
}

fn open_read_only(database: &Path) -> anyhow::Result<Connection> {
    // Read only: the source stays as it was, so a failed run can be
    // repeated. SQLite still reads a WAL left by a server that was killed.
    let connection = Connection::open_with_flags(
        database,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .with_context(|| {
        format!(
            "failed to open the source database {} read only",
            database.display()
        )
    })?;
    connection.busy_timeout(Duration::from_secs(10))?;
    Ok(connection)
}

impl Source {
    /// Opens `DATA/edgekeep.db` read only and checks that its schema is the
    /// one this version of edgekeep writes.
    pub(super) fn open(data_dir: &Path) -> anyhow::Result<Source> {
        let database = data_dir.join("edgekeep.db");
        let connection = open_read_only(&database)?;
        connection.execute_batch("BEGIN")?;
        check_schema_version(&connection, &database)?;
        Ok(Source {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// Runs `f` on the connection in a blocking thread.
    async fn call<T, F>(&self, f: F) -> anyhow::Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> anyhow::Result<T> + Send + 'static,
    {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let connection = connection.lock().unwrap_or_else(PoisonError::into_inner);
            f(&connection)
        })
        .await
        .context("the source database task failed")?
    }

    /// Lists the data tables, without `schema_migrations` and SQLite's own.
    pub(super) async fn tables(&self) -> anyhow::Result<Vec<SourceTable>> {
        self.call(|connection| {
            let mut statement = connection.prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table'
                   AND name NOT LIKE 'sqlite_%' AND name != 'schema_migrations'
                 ORDER BY name",
            )?;
            let names = statement
                .query_map([], |row| row.get::<_, String>(0))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut tables = Vec::with_capacity(names.len());
            for name in names {
                let mut statement =
                    connection.prepare("SELECT name FROM pragma_table_info(?1) ORDER BY cid")?;
                let columns = statement
                    .query_map([&name], |row| row.get::<_, String>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?;
                tables.push(SourceTable { name, columns });
            }
            Ok(tables)
        })
        .await
    }

    pub(super) async fn count(&self, table: &str) -> anyhow::Result<u64> {
        let sql = format!("SELECT COUNT(*) FROM {}", quote(table));
        self.call(move |connection| {
            let count: i64 = connection.query_row(&sql, [], |row| row.get(0))?;
            Ok(u64::try_from(count)?)
        })
        .await
    }

    /// Reads up to `limit` rows with a rowid above `after`, in rowid order,
    /// and converts each value for its PostgreSQL column.
    pub(super) async fn read_rows(
        &self,
        table: &SourceTable,
        conversions: &[Conversion],
        after: i64,
        limit: usize,
    ) -> anyhow::Result<Vec<SourceRow>> {
        let column_list = table
            .columns
            .iter()
            .map(|column| quote(column))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT rowid, {column_list} FROM {} WHERE rowid > ?1 ORDER BY rowid LIMIT ?2",
            quote(&table.name)
        );
        let table = table.clone();
        let conversions = conversions.to_vec();
        self.call(move |connection| {
            let mut statement = connection.prepare(&sql)?;
            let mut rows = statement.query(rusqlite::params![after, limit as i64])?;
            let mut batch = Vec::new();
            while let Some(row) = rows.next()? {
                let rowid: i64 = row.get(0)?;
                let mut cells = Vec::with_capacity(conversions.len());
                for (index, conversion) in conversions.iter().enumerate() {
                    let cell = conversion
                        .convert(row.get_ref(index + 1)?)
                        .map_err(|reason| {
                            anyhow::anyhow!(
                                "the column {} of row {rowid} in the source table {} {reason}; \
                             nothing was copied",
                                table.columns[index],
                                table.name
                            )
                        })?;
                    cells.push(cell);
                }
                batch.push((rowid, cells));
            }
            Ok(batch)
        })
        .await
    }

    /// Returns the highest id SQLite has handed out for `table`
    /// (`AUTOINCREMENT` never reuses one, even after a delete), or `None`.
    pub(super) async fn last_autoincrement_id(&self, table: &str) -> anyhow::Result<Option<i64>> {
        let table = table.to_string();
        self.call(move |connection| {
            let has_sequences: bool = connection.query_row(
                "SELECT COUNT(*) > 0 FROM sqlite_master WHERE name = 'sqlite_sequence'",
                [],
                |row| row.get(0),
            )?;
            if !has_sequences {
                return Ok(None);
            }
            let last = connection
                .query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = ?1",
                    [&table],
                    |row| row.get(0),
                )
                .optional()?;
            Ok(last)
        })
        .await
    }

    /// Lists the objects of listed backups and of import jobs still queued
    /// or running, whose file may have arrived.
    pub(super) async fn referenced_objects(&self) -> anyhow::Result<Vec<ReferencedObject>> {
        self.call(|connection| {
            let mut objects = Vec::new();
            let mut statement = connection.prepare(
                "SELECT project_id, device_id, backup_type, timestamp, size, checksum, object_key
                 FROM backups ORDER BY project_id, device_id, timestamp",
            )?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let (project, device, backup_type, timestamp): (i64, i64, String, i64) =
                    (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
                let size: i64 = row.get(4)?;
                let checksum: String = row.get(5)?;
                objects.push(ReferencedObject {
                    key: row.get(6)?,
                    owner: format!("backup {project}/{device}/{backup_type}/{timestamp}"),
                    backup: Some(ListedBackup {
                        project_id: project,
                        device_id: device,
                        backup_type,
                        timestamp,
                        size: u64::try_from(size)?,
                        checksum: checksum.to_lowercase(),
                    }),
                });
            }

            let mut statement = connection.prepare(
                "SELECT id, object_key FROM jobs
                 WHERE kind = 'import' AND state IN ('queued', 'running')
                   AND object_key IS NOT NULL
                 ORDER BY id",
            )?;
            let mut rows = statement.query([])?;
            while let Some(row) = rows.next()? {
                let job: i64 = row.get(0)?;
                objects.push(ReferencedObject {
                    key: row.get(1)?,
                    owner: format!("import job {job}"),
                    backup: None,
                });
            }
            Ok(objects)
        })
        .await
    }
}

fn check_schema_version(connection: &Connection, database: &Path) -> anyhow::Result<()> {
    let version: i64 = connection
        .query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |row| row.get(0),
        )
        .with_context(|| {
            format!(
                "failed to read the schema version of {}; is it an edgekeep database?",
                database.display()
            )
        })?;
    let expected = SqliteStore::SCHEMA_VERSION;
    anyhow::ensure!(
        version <= expected,
        "the source database {} has schema version {version}, newer than version {expected} \
         of this edgekeep; run the migration with the edgekeep version that wrote it",
        database.display()
    );
    anyhow::ensure!(
        version == expected,
        "the source database {} has schema version {version}, older than version {expected} \
         of this edgekeep; start this version of edgekeep server on the data folder once, so \
         it upgrades the database, stop it and run the migration again",
        database.display()
    );
    Ok(())
}

/// Finds the bucket folder of the embedded endpoint under `DATA/objects`:
/// `requested`, or else the only bucket folder there. Returns `None` when
/// `DATA/objects` has no bucket folder.
pub(super) fn bucket_dir(
    data_dir: &Path,
    requested: Option<&str>,
) -> anyhow::Result<Option<PathBuf>> {
    let objects_dir = data_dir.join("objects");
    if let Some(bucket) = requested {
        let dir = objects_dir.join(bucket);
        anyhow::ensure!(
            dir.is_dir(),
            "no bucket folder {}; check --source-bucket",
            dir.display()
        );
        return Ok(Some(dir));
    }
    let entries = match std::fs::read_dir(&objects_dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => {
            return Err(error).with_context(|| format!("failed to read {}", objects_dir.display()));
        }
    };
    // s3s-fs keeps its side files and partial uploads as dot files next to
    // the bucket folders.
    let mut buckets = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("failed to read {}", objects_dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with('.') && entry.file_type()?.is_dir() {
            buckets.push(name);
        }
    }
    buckets.sort();
    match buckets.as_slice() {
        [] => Ok(None),
        [bucket] => Ok(Some(objects_dir.join(bucket))),
        several => anyhow::bail!(
            "{} holds several bucket folders ({}); name the one the embedded server used with \
             --source-bucket",
            objects_dir.display(),
            several.join(", ")
        ),
    }
}

/// Returns the file of `key` in the bucket folder, rejecting a key that
/// would leave it, such as one with `..`.
pub(super) fn object_path(bucket_dir: &Path, key: &str) -> anyhow::Result<PathBuf> {
    let relative = Path::new(key);
    let inside = !key.is_empty()
        && relative
            .components()
            .all(|component| matches!(component, Component::Normal(_)));
    anyhow::ensure!(
        inside,
        "the object key {key:?} in the source database is not a plain relative path; \
         nothing was copied"
    );
    Ok(bucket_dir.join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_path_rejects_escaping_keys() {
        let bucket = Path::new("/data/objects/edgekeep");
        assert_eq!(
            object_path(bucket, "backups/1/2/MASTER/5.dat").unwrap(),
            bucket.join("backups/1/2/MASTER/5.dat")
        );
        for key in [
            "../s3-credentials.json",
            "/etc/passwd",
            "backups/../../x",
            "",
        ] {
            assert!(object_path(bucket, key).is_err(), "{key}");
        }
    }

    #[test]
    fn bucket_dir_picks_the_only_bucket() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(bucket_dir(dir.path(), None).unwrap(), None);

        let objects = dir.path().join("objects");
        std::fs::create_dir_all(objects.join("edgekeep")).unwrap();
        std::fs::write(
            objects.join(".bucket-ZWRnZWtlZXA.object-eA.internal.json"),
            "{}",
        )
        .unwrap();
        assert_eq!(
            bucket_dir(dir.path(), None).unwrap(),
            Some(objects.join("edgekeep"))
        );

        std::fs::create_dir_all(objects.join("other")).unwrap();
        let error = bucket_dir(dir.path(), None).unwrap_err().to_string();
        assert!(error.contains("edgekeep, other"), "{error}");
        assert!(error.contains("--source-bucket"), "{error}");
        assert_eq!(
            bucket_dir(dir.path(), Some("other")).unwrap(),
            Some(objects.join("other"))
        );
        assert!(bucket_dir(dir.path(), Some("missing")).is_err());
    }
}
