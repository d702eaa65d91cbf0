//! The PostgreSQL side: schema checks, the copy of each table through a
//! binary `COPY`, the identity sequences and the row counts, all inside the
//! caller's transaction.

use std::collections::{BTreeMap, BTreeSet};

use tokio_postgres::Transaction;
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::{ToSql, Type};

use super::SkippedBackup;
use super::cell::Conversion;
use super::quote;
use super::source::{Source, SourceTable};
use crate::store::postgres::describe;

/// Rows read from SQLite and written to the `COPY` stream at a time.
const BATCH_ROWS: usize = 1000;

/// Tables that must be empty in the target, with the noun for messages.
const OWNED_TABLES: [(&str, &str); 4] = [
    ("projects", "project"),
    ("devices", "device"),
    ("tokens", "token"),
    ("jobs", "job"),
];

/// Converts a PostgreSQL error into one message with its causes, because
/// `tokio_postgres::Error` alone shows only its kind, such as "db error".
fn flatten(error: tokio_postgres::Error) -> anyhow::Error {
    anyhow::anyhow!("{}", describe(&error))
}

/// Rejects a target that already contains any project, device, token or
/// job, so two installations are never mixed.
pub(super) async fn check_empty(transaction: &Transaction<'_>) -> anyhow::Result<()> {
    let mut counts = Vec::new();
    for (table, noun) in OWNED_TABLES {
        let sql = format!("SELECT COUNT(*) FROM {}", quote(table));
        let count: i64 = transaction
            .query_one(&sql, &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(flatten)?;
        counts.push((count, noun));
    }
    if counts.iter().all(|(count, _)| *count == 0) {
        return Ok(());
    }
    let described = counts
        .iter()
        .map(|(count, noun)| plural(*count, noun))
        .collect::<Vec<_>>()
        .join(", ");
    anyhow::bail!(
        "the target database is not empty: it contains {described}; point --database-url at a \
         new database"
    )
}

/// Formats a count with its noun, such as `1 token` or `3 jobs`.
pub(super) fn plural(count: i64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

/// Reads the column names of every table in the target schema.
pub(super) async fn columns(
    transaction: &Transaction<'_>,
) -> anyhow::Result<BTreeMap<String, BTreeSet<String>>> {
    let rows = transaction
        .query(
            "SELECT table_name::TEXT, column_name::TEXT FROM information_schema.columns
             WHERE table_schema = current_schema()",
            &[],
        )
        .await
        .map_err(flatten)?;
    let mut tables: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for row in rows {
        let table: String = row.try_get(0).map_err(flatten)?;
        let column: String = row.try_get(1).map_err(flatten)?;
        tables.entry(table).or_default().insert(column);
    }
    Ok(tables)
}

/// Rejects the copy when a source table or column has no counterpart in
/// the target, because it would be dropped without a trace. Every missing
/// one is named.
pub(super) fn check_columns(
    source: &[SourceTable],
    target: &BTreeMap<String, BTreeSet<String>>,
) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for table in source {
        match target.get(&table.name) {
            None => missing.push(format!("table {}", table.name)),
            Some(columns) => missing.extend(
                table
                    .columns
                    .iter()
                    .filter(|column| !columns.contains(*column))
                    .map(|column| format!("column {}.{column}", table.name)),
            ),
        }
    }
    anyhow::ensure!(
        missing.is_empty(),
        "the source database has data that the PostgreSQL schema cannot hold ({}), so copying \
         would lose it; nothing was copied. Run the migration with an edgekeep version whose \
         PostgreSQL migrations add it",
        missing.join(", ")
    );
    Ok(())
}

/// Copies every row of `table` through a binary `COPY` and returns how
/// many were written.
pub(super) async fn copy_table(
    transaction: &Transaction<'_>,
    source: &Source,
    table: &SourceTable,
) -> anyhow::Result<u64> {
    let column_list = table
        .columns
        .iter()
        .map(|column| quote(column))
        .collect::<Vec<_>>()
        .join(", ");
    let name = quote(&table.name);

    // The target's column types decide how each SQLite value converts.
    let probe = transaction
        .prepare(&format!("SELECT {column_list} FROM {name} LIMIT 0"))
        .await
        .map_err(flatten)?;
    let types: Vec<Type> = probe.columns().iter().map(|c| c.type_().clone()).collect();
    let mut conversions = Vec::with_capacity(types.len());
    for (ty, column) in types.iter().zip(&table.columns) {
        let conversion = Conversion::for_type(ty).ok_or_else(|| {
            anyhow::anyhow!(
                "the PostgreSQL column {}.{column} has the type {ty}, which the migration \
                 cannot fill from SQLite; nothing was copied",
                table.name
            )
        })?;
        conversions.push(conversion);
    }

    let sink = transaction
        .copy_in(&format!(
            "COPY {name} ({column_list}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .map_err(flatten)?;
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &types));
    let mut after = i64::MIN;
    let mut read = 0u64;
    loop {
        let rows = source
            .read_rows(table, &conversions, after, BATCH_ROWS)
            .await?;
        let Some((last, _)) = rows.last() else {
            break;
        };
        after = *last;
        for (_, cells) in &rows {
            let values: Vec<&(dyn ToSql + Sync)> = cells
                .iter()
                .map(|cell| cell as &(dyn ToSql + Sync))
                .collect();
            writer
                .as_mut()
                .write(&values)
                .await
                .map_err(|e| copy_error(&table.name, e))?;
        }
        read += rows.len() as u64;
    }
    let written = writer
        .as_mut()
        .finish()
        .await
        .map_err(|e| copy_error(&table.name, e))?;
    anyhow::ensure!(
        written == read,
        "PostgreSQL took {written} rows of the table {} but the source has {read}; nothing was \
         copied",
        table.name
    );
    Ok(written)
}

fn copy_error(table: &str, error: tokio_postgres::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "failed to copy the table {table} into PostgreSQL: {}; nothing was copied",
        describe(&error)
    )
}

/// Moves each identity sequence of a copied table past the highest copied
/// id, and past the highest id SQLite ever handed out, so new rows never
/// reuse an id.
pub(super) async fn advance_sequences(
    transaction: &Transaction<'_>,
    source: &Source,
    tables: &[SourceTable],
) -> anyhow::Result<()> {
    let identities = transaction
        .query(
            "SELECT table_name::TEXT, column_name::TEXT FROM information_schema.columns
             WHERE table_schema = current_schema() AND is_identity = 'YES'",
            &[],
        )
        .await
        .map_err(flatten)?;
    for row in identities {
        let table: String = row.try_get(0).map_err(flatten)?;
        let column: String = row.try_get(1).map_err(flatten)?;
        if !tables.iter().any(|copied| copied.name == table) {
            continue;
        }
        let sql = format!("SELECT MAX({}) FROM {}", quote(&column), quote(&table));
        let copied: Option<i64> = transaction
            .query_one(&sql, &[])
            .await
            .and_then(|row| row.try_get(0))
            .map_err(flatten)?;
        let handed_out = source.last_autoincrement_id(&table).await?;
        let Some(last) = copied.max(handed_out).filter(|last| *last > 0) else {
            continue;
        };
        // The first argument is parsed as a possibly quoted table name, the
        // second is taken as a column name as it is.
        transaction
            .query_one(
                "SELECT setval(pg_get_serial_sequence($1, $2), $3)",
                &[&quote(&table), &column, &last],
            )
            .await
            .map_err(flatten)?;
        tracing::debug!(table, column, last, "advanced the identity sequence");
    }
    Ok(())
}

/// Deletes the copied rows of the backups left out of the migration and
/// returns how many were deleted, which is one per skipped backup.
pub(super) async fn delete_backups(
    transaction: &Transaction<'_>,
    skipped: &[SkippedBackup],
) -> anyhow::Result<u64> {
    for backup in skipped {
        let deleted = transaction
            .execute(
                "DELETE FROM backups WHERE project_id = $1 AND backup_type = $2 \
                 AND timestamp = $3",
                &[&backup.project_id, &backup.backup_type, &backup.timestamp],
            )
            .await
            .map_err(flatten)?;
        anyhow::ensure!(
            deleted == 1,
            "failed to leave out the damaged backup {} of project {}: {deleted} rows matched; \
             nothing was committed",
            backup.timestamp,
            backup.project_id
        );
    }
    Ok(skipped.len() as u64)
}

/// Counts the rows of `table` in the target.
pub(super) async fn count(transaction: &Transaction<'_>, table: &str) -> anyhow::Result<u64> {
    let sql = format!("SELECT COUNT(*) FROM {}", quote(table));
    let count: i64 = transaction
        .query_one(&sql, &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(flatten)?;
    Ok(u64::try_from(count)?)
}

/// Returns the name of the database the transaction runs in.
pub(super) async fn database_name(transaction: &Transaction<'_>) -> anyhow::Result<String> {
    transaction
        .query_one("SELECT current_database()::TEXT", &[])
        .await
        .and_then(|row| row.try_get(0))
        .map_err(flatten)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str, columns: &[&str]) -> SourceTable {
        SourceTable {
            name: name.to_string(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn check_columns_names_every_missing_column() {
        let mut target = BTreeMap::new();
        target.insert(
            "jobs".to_string(),
            BTreeSet::from(["id".to_string(), "kind".to_string()]),
        );
        let source = [
            table("jobs", &["id", "kind", "priority", "owner"]),
            table("labels", &["id"]),
        ];
        let error = check_columns(&source, &target).unwrap_err().to_string();
        assert!(error.contains("column jobs.priority"), "{error}");
        assert!(error.contains("column jobs.owner"), "{error}");
        assert!(error.contains("table labels"), "{error}");
        assert!(error.contains("nothing was copied"), "{error}");
    }

    #[test]
    fn check_columns_accepts_extra_target_columns() {
        let mut target = BTreeMap::new();
        target.insert(
            "jobs".to_string(),
            BTreeSet::from(["id".to_string(), "heartbeat_at".to_string()]),
        );
        assert!(check_columns(&[table("jobs", &["id"])], &target).is_ok());
    }

    #[test]
    fn plural_counts() {
        assert_eq!(plural(1, "token"), "1 token");
        assert_eq!(plural(0, "project"), "0 projects");
        assert_eq!(plural(3, "job"), "3 jobs");
    }
}
