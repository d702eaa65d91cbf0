//! Moves an installation on the embedded default (SQLite and the embedded
//! S3 endpoint in one data folder) to PostgreSQL and an external S3
//! service, keeping every id, credential hash, token, job and backup file.
//!
//! The source is locked like a running server would lock it and is only
//! read. One PostgreSQL transaction applies the migrations, checks that the
//! target is empty and can hold every source column, copies the tables,
//! advances the identity sequences and compares row counts. The objects are
//! copied and read back next, and the transaction commits only after every
//! object matched its listed size and SHA-256, so a failed run leaves no
//! backup listed whose file is missing and can be repeated.

mod cell;
mod source;
mod target;
mod transfer;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use object_store::ObjectStore;
use serde::Serialize;

use crate::config::{Config, DEFAULT_S3_REGION};
use crate::objects::Objects;
use crate::store::postgres;
use source::{Source, SourceTable};
use transfer::ObjectCopy;

/// Tables in the order they are copied, so every foreign key points at a
/// row already copied.
const COPY_ORDER: [&str; 6] = [
    "projects",
    "devices",
    "tokens",
    "jobs",
    "backups",
    "project_clock",
];

/// Options of `edgekeep migrate`. The target options have the names and
/// variables of `edgekeep server`'s, so one environment serves both.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateOptions {
    /// Data folder of the embedded installation to move, as given to
    /// `edgekeep server`. It is only read.
    #[arg(long, env = "EDGEKEEP_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Bucket folder under DATA/objects that contains the backup files; by
    /// default the only folder there.
    #[arg(long)]
    pub source_bucket: Option<String>,

    /// PostgreSQL URL of the new metadata store, such as
    /// `postgres://edgekeep:PASSWORD@db:5432/edgekeep`. The database must
    /// exist and contain no projects, devices, tokens or jobs.
    #[arg(
        long,
        env = "EDGEKEEP_DATABASE_URL",
        hide_env_values = true,
        required_unless_present = "database_url_file"
    )]
    pub database_url: Option<String>,

    /// File whose first line is the PostgreSQL URL, for a URL that contains
    /// a password.
    #[arg(
        long,
        env = "EDGEKEEP_DATABASE_URL_FILE",
        conflicts_with = "database_url"
    )]
    pub database_url_file: Option<PathBuf>,

    /// URL of the external S3 service that receives the backup files, such
    /// as `https://s3.example.com`.
    #[arg(long, env = "EDGEKEEP_S3_ENDPOINT")]
    pub s3_endpoint: String,

    /// Region that requests to the external S3 service are signed for.
    #[arg(long, env = "EDGEKEEP_S3_REGION", default_value = DEFAULT_S3_REGION)]
    pub s3_region: String,

    /// Address the bucket as a host name (`https://BUCKET.HOST/KEY`)
    /// instead of as the first path segment.
    #[arg(long, env = "EDGEKEEP_S3_VIRTUAL_HOSTED")]
    pub s3_virtual_hosted: bool,

    /// Bucket on the external S3 service that receives the objects. It must
    /// exist and must not contain objects under the keys being copied.
    #[arg(long, env = "EDGEKEEP_BUCKET", default_value = "edgekeep")]
    pub bucket: String,

    /// S3 access key of the external service; without it,
    /// `AWS_ACCESS_KEY_ID`.
    #[arg(long, env = "EDGEKEEP_S3_ACCESS_KEY")]
    pub s3_access_key: Option<String>,

    /// S3 secret key; needed with `--s3-access-key`. Without both,
    /// `AWS_SECRET_ACCESS_KEY`.
    #[arg(long, env = "EDGEKEEP_S3_SECRET_KEY", hide_env_values = true)]
    pub s3_secret_key: Option<String>,

    /// File whose first line is the S3 secret key.
    #[arg(
        long,
        env = "EDGEKEEP_S3_SECRET_KEY_FILE",
        conflicts_with = "s3_secret_key"
    )]
    pub s3_secret_key_file: Option<PathBuf>,

    /// Check both sides and report what would be moved, without copying
    /// anything. The metadata is copied in a transaction that is rolled
    /// back, so type and constraint errors show up too.
    #[arg(long)]
    pub dry_run: bool,
}

impl MigrateOptions {
    /// Returns the server configuration of the target stores, so the
    /// database URL, S3 endpoint and credentials are read and checked as
    /// `edgekeep server` reads them.
    pub fn target_config(&self) -> Config {
        let mut config = Config::new(&self.data_dir);
        config.database_url = self.database_url.clone();
        config.database_url_file = self.database_url_file.clone();
        config.s3_endpoint = Some(self.s3_endpoint.clone());
        config.s3_region = self.s3_region.clone();
        config.s3_virtual_hosted = self.s3_virtual_hosted;
        config.bucket = self.bucket.clone();
        config.s3_access_key = self.s3_access_key.clone();
        config.s3_secret_key = self.s3_secret_key.clone();
        config.s3_secret_key_file = self.s3_secret_key_file.clone();
        config
    }
}

/// The outcome of a migration, or what a dry run would move.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Report {
    pub dry_run: bool,
    pub data_dir: PathBuf,
    /// The embedded bucket folder the objects come from, or `None` when
    /// nothing refers to an object.
    pub source_bucket_dir: Option<PathBuf>,
    /// Name of the PostgreSQL database.
    pub target_database: String,
    pub target_endpoint: String,
    pub target_bucket: String,
    /// Rows per table, in copy order.
    pub tables: Vec<TableRows>,
    pub projects: u64,
    pub devices: u64,
    pub tokens: u64,
    pub jobs: u64,
    pub backups: u64,
    /// Objects copied: backup files and files of pending imports.
    pub objects: u64,
    pub bytes: u64,
    pub seconds: f64,
}

/// The number of rows of one table.
#[derive(Debug, Clone, Serialize)]
pub struct TableRows {
    pub table: String,
    pub rows: u64,
}

/// Moves the installation in `options.data_dir` to the target stores, or
/// only checks both sides with `options.dry_run`.
pub async fn run(options: &MigrateOptions) -> anyhow::Result<Report> {
    let started = Instant::now();
    let config = options.target_config();
    let database_url = config.configured_database_url()?.ok_or_else(|| {
        anyhow::anyhow!("missing --database-url: give the PostgreSQL URL of the new metadata store")
    })?;
    let endpoint = config
        .configured_s3_endpoint()?
        .ok_or_else(|| anyhow::anyhow!("missing --s3-endpoint: give the S3 service URL"))?;

    // Source: lock the folder first, so a running server is found before
    // anything else happens.
    let data_dir = &options.data_dir;
    anyhow::ensure!(
        data_dir.join("edgekeep.db").is_file(),
        "no embedded metadata database at {}; give --data-dir the folder that edgekeep server \
         used, which contains edgekeep.db and objects/",
        data_dir.join("edgekeep.db").display()
    );
    let _lock = crate::lock_data_dir(
        data_dir,
        "stop that server, then run the migration again (the source was not changed)",
    )?;
    let source = Source::open(data_dir)?;
    let tables = ordered_tables(source.tables().await?)?;
    let (source_bucket_dir, objects) =
        plan_objects(&source, data_dir, options.source_bucket.as_deref()).await?;

    // Target database: everything below runs in one transaction.
    let mut client = postgres::connect_client(&database_url).await?;
    let transaction = client
        .transaction()
        .await
        .map_err(|e| anyhow::anyhow!("{}", postgres::describe(&e)))?;
    postgres::apply_migrations(&transaction).await?;
    target::check_empty(&transaction).await?;
    target::check_columns(&tables, &target::columns(&transaction).await?)?;
    let target_database = target::database_name(&transaction).await?;

    // Target bucket.
    let storage = crate::open_external_s3(&config, &endpoint).await?;
    check_keys_free(&storage.objects, &config.bucket, &objects).await?;

    let table_rows = copy_metadata(&transaction, &source, &tables).await?;
    let mut report = Report {
        dry_run: options.dry_run,
        data_dir: data_dir.clone(),
        source_bucket_dir,
        target_database,
        target_endpoint: endpoint,
        target_bucket: config.bucket.clone(),
        projects: rows_of(&table_rows, "projects"),
        devices: rows_of(&table_rows, "devices"),
        tokens: rows_of(&table_rows, "tokens"),
        jobs: rows_of(&table_rows, "jobs"),
        backups: rows_of(&table_rows, "backups"),
        tables: table_rows,
        objects: objects.len() as u64,
        bytes: objects.iter().map(|object| object.size).sum(),
        seconds: 0.0,
    };
    if options.dry_run {
        transaction
            .rollback()
            .await
            .map_err(|e| anyhow::anyhow!("{}", postgres::describe(&e)))?;
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }

    // Objects, and the commit only once every one of them verified.
    copy_objects(&storage.objects, &objects).await?;
    commit(transaction, &storage.objects, &objects).await?;
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        projects = report.projects,
        devices = report.devices,
        backups = report.backups,
        bytes = report.bytes,
        "migration committed"
    );
    Ok(report)
}

/// Copies every table, advances the identity sequences and compares the
/// row counts with the source.
async fn copy_metadata(
    transaction: &tokio_postgres::Transaction<'_>,
    source: &Source,
    tables: &[SourceTable],
) -> anyhow::Result<Vec<TableRows>> {
    let mut table_rows = Vec::with_capacity(tables.len());
    for table in tables {
        let rows = target::copy_table(transaction, source, table).await?;
        tracing::info!(table = table.name, rows, "copied table");
        table_rows.push(TableRows {
            table: table.name.clone(),
            rows,
        });
    }
    target::advance_sequences(transaction, source, tables).await?;
    verify_counts(transaction, source, &table_rows).await?;
    Ok(table_rows)
}

/// Commits the metadata. When PostgreSQL rejects the commit, the copied
/// objects are deleted again.
async fn commit(
    transaction: tokio_postgres::Transaction<'_>,
    objects: &Objects,
    copied: &[ObjectCopy],
) -> anyhow::Result<()> {
    let Err(error) = transaction.commit().await else {
        return Ok(());
    };
    let reason = postgres::describe(&error);
    // Only an error reported by PostgreSQL itself proves that nothing was
    // committed. After a lost connection the metadata may be there, and its
    // objects must stay.
    if error.as_db_error().is_none() {
        anyhow::bail!(
            "the commit of the metadata to PostgreSQL did not complete: {reason}; the copied \
             objects were kept. If the target database contains no projects, delete those \
             objects from the bucket and run the migration again"
        );
    }
    remove_copies(objects, copied).await;
    anyhow::bail!(
        "PostgreSQL rejected the commit of the metadata: {reason}; the copied objects were \
         deleted and the source was not changed, so the migration can run again"
    )
}

/// Puts the source tables in [`COPY_ORDER`], rejecting a table this version
/// does not know, whose rows would otherwise be left behind.
fn ordered_tables(found: Vec<SourceTable>) -> anyhow::Result<Vec<SourceTable>> {
    let unknown: Vec<&str> = found
        .iter()
        .map(|table| table.name.as_str())
        .filter(|name| !COPY_ORDER.contains(name))
        .collect();
    anyhow::ensure!(
        unknown.is_empty(),
        "the source database has tables that this edgekeep version does not copy ({}); nothing \
         was copied. Run the migration with the edgekeep version that created them",
        unknown.join(", ")
    );
    let mut ordered = Vec::with_capacity(COPY_ORDER.len());
    for name in COPY_ORDER {
        let table = found
            .iter()
            .find(|table| table.name == name)
            .ok_or_else(|| {
                anyhow::anyhow!("the source database has no table {name}; check --data-dir")
            })?;
        ordered.push(table.clone());
    }
    Ok(ordered)
}

/// Lists the files to copy: one per listed backup, which must be present
/// with its listed size, and one per queued or running import whose file
/// already arrived.
async fn plan_objects(
    source: &Source,
    data_dir: &std::path::Path,
    source_bucket: Option<&str>,
) -> anyhow::Result<(Option<PathBuf>, Vec<ObjectCopy>)> {
    let referenced = source.referenced_objects().await?;
    if referenced.is_empty() {
        return Ok((None, Vec::new()));
    }
    let Some(bucket_dir) = source::bucket_dir(data_dir, source_bucket)? else {
        // Without a bucket folder no import file can have arrived either.
        if referenced.iter().all(|object| object.listed.is_none()) {
            return Ok((None, Vec::new()));
        }
        anyhow::bail!(
            "the source database lists backups, but {} has no bucket folder; check --data-dir",
            data_dir.join("objects").display()
        );
    };

    let mut objects = Vec::with_capacity(referenced.len());
    for object in referenced {
        let path = source::object_path(&bucket_dir, &object.key)?;
        let metadata = match std::fs::metadata(&path) {
            Ok(metadata) if metadata.is_file() => Some(metadata),
            Ok(_) => None,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => {
                return Err(anyhow::Error::from(error).context(format!(
                    "failed to read {} of {}",
                    path.display(),
                    object.owner
                )));
            }
        };
        match (metadata, object.listed) {
            (Some(metadata), Some((size, checksum))) => {
                anyhow::ensure!(
                    metadata.len() == size,
                    "the file {} of {} has {} bytes, but {size} are listed; the source \
                     installation is damaged, nothing was copied",
                    path.display(),
                    object.owner,
                    metadata.len()
                );
                objects.push(ObjectCopy {
                    key: object.key,
                    path,
                    owner: object.owner,
                    size,
                    checksum: Some(checksum.to_lowercase()),
                });
            }
            (Some(metadata), None) => objects.push(ObjectCopy {
                key: object.key,
                path,
                owner: object.owner,
                size: metadata.len(),
                checksum: None,
            }),
            (None, Some(_)) => anyhow::bail!(
                "the file {} of {} is missing; the source installation is damaged, nothing was \
                 copied",
                path.display(),
                object.owner
            ),
            (None, None) => {
                tracing::info!(
                    owner = object.owner,
                    key = object.key,
                    "no file has arrived for this import yet; its job is copied as it is"
                );
            }
        }
    }
    Ok((Some(bucket_dir), objects))
}

/// Rejects a target bucket that already contains one of the keys to copy,
/// so no object of another installation is overwritten.
async fn check_keys_free(
    objects: &Objects,
    bucket: &str,
    planned: &[ObjectCopy],
) -> anyhow::Result<()> {
    // One listing per top-level folder of the keys, such as `backups/`.
    let prefixes: std::collections::BTreeSet<&str> = planned
        .iter()
        .filter_map(|object| object.key.split_once('/').map(|(folder, _)| folder))
        .collect();
    let mut existing = std::collections::HashSet::new();
    for prefix in prefixes {
        for object in objects.list(&format!("{prefix}/")).await? {
            existing.insert(object.key);
        }
    }
    for object in planned.iter().filter(|object| !object.key.contains('/')) {
        if objects.head(&object.key).await?.is_some() {
            existing.insert(object.key.clone());
        }
    }
    let occupied: Vec<&str> = planned
        .iter()
        .map(|object| object.key.as_str())
        .filter(|key| existing.contains(*key))
        .collect();
    if let Some(first) = occupied.first() {
        anyhow::bail!(
            "the target bucket {bucket} already contains {} of the objects to copy, such as \
             {first}; give --bucket an empty bucket, or delete them if an interrupted migration \
             left them there",
            occupied.len()
        );
    }
    Ok(())
}

/// Compares the row count of every table in the target with the source.
async fn verify_counts(
    transaction: &tokio_postgres::Transaction<'_>,
    source: &Source,
    copied: &[TableRows],
) -> anyhow::Result<()> {
    for table in copied {
        let in_source = source.count(&table.table).await?;
        let in_target = target::count(transaction, &table.table).await?;
        anyhow::ensure!(
            in_source == in_target,
            "the table {} has {in_source} rows in the source but {in_target} in the target after \
             the copy; nothing was committed",
            table.table
        );
    }
    Ok(())
}

/// Copies and verifies every object. On a failure, the objects copied so
/// far are removed again before the error is returned.
async fn copy_objects(objects: &Objects, planned: &[ObjectCopy]) -> anyhow::Result<()> {
    let store: Arc<dyn ObjectStore> = Arc::new(objects.store().clone());
    for (index, object) in planned.iter().enumerate() {
        match transfer::copy_and_verify(&store, object).await {
            Ok(size) => tracing::info!(
                key = object.key,
                owner = object.owner,
                size,
                done = index + 1,
                total = planned.len(),
                "copied and verified object"
            ),
            Err(error) => {
                remove_copies(objects, &planned[..=index]).await;
                return Err(error);
            }
        }
    }
    Ok(())
}

/// Deletes copied objects after a failure; a delete that fails is logged.
async fn remove_copies(objects: &Objects, copied: &[ObjectCopy]) {
    for object in copied {
        objects.delete_quietly(&object.key).await;
    }
}

fn rows_of(tables: &[TableRows], name: &str) -> u64 {
    tables
        .iter()
        .find(|table| table.table == name)
        .map_or(0, |table| table.rows)
}

/// Quotes an SQL identifier; both SQLite and PostgreSQL accept the result.
fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(name: &str) -> SourceTable {
        SourceTable {
            name: name.to_string(),
            columns: vec!["id".to_string()],
        }
    }

    #[test]
    fn ordered_tables_follow_foreign_keys() {
        let found = [
            "backups",
            "jobs",
            "project_clock",
            "devices",
            "tokens",
            "projects",
        ]
        .map(table)
        .to_vec();
        let names: Vec<String> = ordered_tables(found)
            .unwrap()
            .into_iter()
            .map(|table| table.name)
            .collect();
        assert_eq!(names, COPY_ORDER);
    }

    #[test]
    fn ordered_tables_reject_unknown_table() {
        let mut found = COPY_ORDER.map(table).to_vec();
        found.push(table("labels"));
        let error = ordered_tables(found).unwrap_err().to_string();
        assert!(error.contains("(labels)"), "{error}");
    }

    #[test]
    fn quote_doubles_quotes() {
        assert_eq!(quote("jobs"), "\"jobs\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}
