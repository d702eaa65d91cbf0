//! Moves an installation on the embedded default (SQLite and the embedded
//! S3 endpoint in one data folder) to PostgreSQL and an external S3
//! service, keeping every id, credential hash, token, job and backup file.
//!
//! The source is locked like a running server would lock it, which writes
//! the process id into `DATA/server.lock`, and is otherwise only read. One PostgreSQL transaction applies the migrations, checks that the
//! target is empty and can hold every source column, copies the tables,
//! advances the identity sequences and compares row counts. The objects are
//! copied and read back next, and the transaction commits only after every
//! object matched its listed size and SHA-256, so a failed run leaves no
//! backup listed whose file is missing and can be repeated.

mod cell;
mod plan;
mod source;
mod target;
mod transfer;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use object_store::ObjectStore;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DEFAULT_S3_REGION};
use crate::objects::Objects;
use crate::store::postgres;
pub use plan::SkippedBackup;
use source::{Source, SourceTable};
use transfer::ObjectCopy;

/// Time allowed for connecting to PostgreSQL, and again for the response to
/// the first query, so an address that accepts connections but never
/// responds fails the run instead of holding the source lock forever. The
/// server allows 10 s for a connection and 30 s for a pooled one.
const DATABASE_RESPONSE_TIMEOUT: Duration = Duration::from_secs(20);

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
    /// exist and contain no objects under `backups/`, `uploads/` or
    /// `staging/` other than identical copies of the files being moved.
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
    /// anything. Every backup file is read to compare its SHA-256 with the
    /// listing, so damaged backups show up, and the metadata is copied in a
    /// transaction that is rolled back, so type and constraint errors show
    /// up too.
    #[arg(long)]
    pub dry_run: bool,

    /// Leave out backups whose file is missing or differs from its listed
    /// size or SHA-256, and list them in the report. Their backup jobs are
    /// still copied. Without it such a backup stops the migration.
    #[arg(long)]
    pub skip_damaged: bool,
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
    /// Objects of `objects` that the target bucket already contained with
    /// the same size and SHA-256, such as from an interrupted run, and that
    /// were not copied again.
    pub objects_present: u64,
    /// Damaged backups left out with `--skip-damaged`.
    pub skipped: Vec<SkippedBackup>,
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
    let endpoint = check_s3_endpoint(&options.s3_endpoint)?;

    // Source: checked, then locked, so a wrong folder gets no lock file and
    // a running server is found before any target is contacted.
    let data_dir = &options.data_dir;
    source::check_database(data_dir)?;
    let _lock = crate::lock_data_dir(
        data_dir,
        "stop that server, then run the migration again (the source was not changed)",
    )?;
    let source = Source::open(data_dir)?;
    let tables = ordered_tables(source.tables().await?)?;

    // Target database: everything below runs in one transaction.
    let mut client = connect_database(&database_url, DATABASE_RESPONSE_TIMEOUT).await?;
    let transaction = client
        .transaction()
        .await
        .map_err(|e| anyhow::anyhow!("{}", postgres::describe(&e)))?;
    postgres::apply_migrations(&transaction).await?;
    target::check_empty(&transaction).await?;
    target::check_columns(&tables, &target::columns(&transaction).await?)?;
    let target_database = target::database_name(&transaction).await?;
    let storage = crate::open_external_s3(&config, &endpoint).await?;

    // Source files, each read whole, then the target bucket.
    let plan = plan::plan_objects(
        &source,
        data_dir,
        options.source_bucket.as_deref(),
        options.skip_damaged,
    )
    .await?;
    let present =
        plan::check_target_bucket(&storage.objects, &config.bucket, &endpoint, &plan.objects)
            .await?;

    let table_rows = copy_metadata(&transaction, &source, &tables, &plan.skipped).await?;
    let mut report = Report {
        dry_run: options.dry_run,
        data_dir: data_dir.clone(),
        source_bucket_dir: plan.bucket_dir,
        target_database,
        target_endpoint: endpoint,
        target_bucket: config.bucket.clone(),
        projects: rows_of(&table_rows, "projects"),
        devices: rows_of(&table_rows, "devices"),
        tokens: rows_of(&table_rows, "tokens"),
        jobs: rows_of(&table_rows, "jobs"),
        backups: rows_of(&table_rows, "backups"),
        tables: table_rows,
        objects: plan.objects.len() as u64,
        bytes: plan.objects.iter().map(|object| object.size).sum(),
        objects_present: present.len() as u64,
        skipped: plan.skipped,
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

    // Objects, and the commit only once every one of them verified. Only
    // the objects this run copies are deleted after a failure.
    let to_copy = objects_to_copy(plan.objects, &present);
    copy_objects(&storage.objects, &to_copy).await?;
    commit(transaction, &storage.objects, &to_copy).await?;
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        projects = report.projects,
        devices = report.devices,
        backups = report.backups,
        bytes = report.bytes,
        skipped = report.skipped.len(),
        "migration committed"
    );
    Ok(report)
}

/// Checks the `--s3-endpoint` URL and returns it without a trailing slash.
/// Unlike the server's option, migrate's has no embedded default.
fn check_s3_endpoint(endpoint: &str) -> anyhow::Result<String> {
    let endpoint = endpoint.trim().trim_end_matches('/');
    anyhow::ensure!(
        endpoint.starts_with("http://") || endpoint.starts_with("https://"),
        "--s3-endpoint {endpoint:?} is not an http:// or https:// URL; give the URL of the \
         external S3 service that receives the backup files, such as https://s3.example.com"
    );
    Ok(endpoint.to_string())
}

/// Connects to PostgreSQL and waits for the response to a first query, each
/// within `timeout`. The error names the host and port, never the password.
async fn connect_database(url: &str, timeout: Duration) -> anyhow::Result<tokio_postgres::Client> {
    let timed_out = |step: &str| {
        anyhow::anyhow!(
            "PostgreSQL at {} did not respond to {step} within {} s; check that --database-url \
             names a running PostgreSQL server and that nothing else listens at that port. \
             Nothing was copied",
            database_address(url),
            timeout.as_secs_f64()
        )
    };
    let client = tokio::time::timeout(timeout, postgres::connect_client(url))
        .await
        .map_err(|_| timed_out("the connection request"))??;
    tokio::time::timeout(timeout, client.simple_query("SELECT 1"))
        .await
        .map_err(|_| timed_out("the first query"))?
        .map_err(|e| anyhow::anyhow!("{}", postgres::describe(&e)))?;
    Ok(client)
}

/// Describes the host and port of a PostgreSQL URL, without the user or
/// password.
fn database_address(url: &str) -> String {
    use tokio_postgres::config::Host;

    let Ok(config) = url.parse::<tokio_postgres::Config>() else {
        return "the address of --database-url".to_string();
    };
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("host {host} port {port}")
}

/// Copies every table, leaves out the rows of skipped backups, advances the
/// identity sequences and compares the row counts with the source.
async fn copy_metadata(
    transaction: &tokio_postgres::Transaction<'_>,
    source: &Source,
    tables: &[SourceTable],
    skipped: &[SkippedBackup],
) -> anyhow::Result<Vec<TableRows>> {
    let mut table_rows = Vec::with_capacity(tables.len());
    for table in tables {
        let mut rows = target::copy_table(transaction, source, table).await?;
        if table.name == "backups" {
            rows -= target::delete_backups(transaction, skipped).await?;
        }
        tracing::info!(table = table.name, rows, "copied table");
        table_rows.push(TableRows {
            table: table.name.clone(),
            rows,
        });
    }
    target::advance_sequences(transaction, source, tables).await?;
    verify_counts(transaction, source, &table_rows, skipped.len() as u64).await?;
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

/// Compares the row count of every table in the target with the source,
/// less the `skipped_backups` rows left out of `backups`.
async fn verify_counts(
    transaction: &tokio_postgres::Transaction<'_>,
    source: &Source,
    copied: &[TableRows],
    skipped_backups: u64,
) -> anyhow::Result<()> {
    for table in copied {
        let in_source = source.count(&table.table).await?;
        let left_out = if table.table == "backups" {
            skipped_backups
        } else {
            0
        };
        let in_target = target::count(transaction, &table.table).await?;
        anyhow::ensure!(
            in_source == in_target + left_out,
            "the table {} has {in_source} rows in the source and {left_out} left out, but \
             {in_target} in the target after the copy; nothing was committed",
            table.table
        );
    }
    Ok(())
}

/// Returns the planned objects that the target bucket does not contain yet.
fn objects_to_copy(planned: Vec<ObjectCopy>, present: &BTreeSet<String>) -> Vec<ObjectCopy> {
    planned
        .into_iter()
        .filter(|object| !present.contains(&object.key))
        .collect()
}

/// Copies and verifies every object. On a failure, or on SIGINT or SIGTERM,
/// the upload in progress is aborted and the objects copied so far are
/// removed again before the error is returned.
async fn copy_objects(objects: &Objects, planned: &[ObjectCopy]) -> anyhow::Result<()> {
    let cancel = CancellationToken::new();
    let signals = cancel_on_signal(cancel.clone())?;
    let result = copy_each(objects, planned, &cancel).await;
    // NOTE: tokio keeps its handlers once installed, so a signal after the
    // copy no longer ends the process and the commit runs to completion.
    signals.abort();
    result
}

/// Cancels `cancel` on the first SIGINT or SIGTERM.
fn cancel_on_signal(cancel: CancellationToken) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};

    let mut interrupt = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        tracing::warn!(
            signal = name,
            "stopping the copy and deleting the objects this run copied"
        );
        cancel.cancel();
    }))
}

async fn copy_each(
    objects: &Objects,
    planned: &[ObjectCopy],
    cancel: &CancellationToken,
) -> anyhow::Result<()> {
    let store: Arc<dyn ObjectStore> = Arc::new(objects.store().clone());
    for (index, object) in planned.iter().enumerate() {
        if cancel.is_cancelled() {
            remove_copies(objects, &planned[..index]).await;
            anyhow::bail!(
                "the migration was interrupted by a signal; the objects this run copied were \
                 deleted and nothing was committed, so the migration can run again"
            );
        }
        match transfer::copy_and_verify(&store, object, cancel).await {
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
                if cancel.is_cancelled() {
                    anyhow::bail!(
                        "{error:#}; the objects this run copied were deleted and nothing was \
                         committed, so the migration can run again"
                    );
                }
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

    #[tokio::test]
    async fn connect_database_times_out_on_silent_listener() {
        // A listener that accepts connections and never responds.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = tokio::spawn(async move {
            let mut sockets = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                sockets.push(socket);
            }
        });

        let url = format!("postgres://edgekeep:hunter2@127.0.0.1:{port}/edgekeep");
        let started = Instant::now();
        let error = connect_database(&url, Duration::from_secs(1))
            .await
            .unwrap_err()
            .to_string();
        assert!(started.elapsed() < Duration::from_secs(5), "{error}");
        assert!(
            error.contains(&format!(
                "PostgreSQL at host 127.0.0.1 port {port} did not respond"
            )),
            "{error}"
        );
        assert!(error.contains("within 1 s"), "{error}");
        assert!(!error.contains("hunter2"), "{error}");
        accepted.abort();
    }

    #[test]
    fn database_address_omits_credentials() {
        assert_eq!(
            database_address("postgres://edgekeep:secret@db.internal:6432/fleet"),
            "host db.internal port 6432"
        );
        assert_eq!(
            database_address("postgres://edgekeep@db.internal/fleet"),
            "host db.internal port 5432"
        );
        assert_eq!(
            database_address("not a url at all"),
            "the address of --database-url"
        );
    }

    #[test]
    fn s3_endpoint_needs_http_url() {
        assert_eq!(
            check_s3_endpoint(" https://s3.example.com/ ").unwrap(),
            "https://s3.example.com"
        );
        let error = check_s3_endpoint("notaurl").unwrap_err().to_string();
        assert!(
            error.contains("--s3-endpoint \"notaurl\" is not an http:// or https:// URL"),
            "{error}"
        );
        assert!(error.contains("such as https://s3.example.com"), "{error}");
        assert!(!error.contains("embedded"), "{error}");
    }

    #[test]
    fn quote_doubles_quotes() {
        assert_eq!(quote("jobs"), "\"jobs\"");
        assert_eq!(quote("a\"b"), "\"a\"\"b\"");
    }
}
