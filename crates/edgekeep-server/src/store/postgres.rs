//! [`Store`] on PostgreSQL, for several server replicas that share one
//! database. Queries match [`SqliteStore`](super::SqliteStore) one for one;
//! where replicas could race, a single statement or a row lock keeps them
//! apart.

use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::GenericClient;
use deadpool_postgres::{Manager, ManagerConfig, Pool, PoolError, RecyclingMethod, Runtime};
use edgekeep_api::agent::DeviceFacts;
use edgekeep_api::{Backup, Device, Job, JobKind, JobState, Project, TokenInfo};
use tokio_postgres::config::Host;
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use super::{
    ADMIN_TOKEN_NAME, BackupRecord, JobFilter, JobRecord, JobWakeup, NewJob, STALLED_REASON_END,
    Store, TokenRecord,
};
use crate::error::{Error, Result};

mod listener;

pub use listener::LISTENER_APPLICATION_NAME;

/// Channel on which replicas announce queued backup and restore jobs. The
/// payload is the device id.
const JOBS_CHANNEL: &str = "edgekeep_jobs";

/// Numbered migrations, applied in order. Each runs once.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/postgres/0002_job_heartbeat.sql"),
    ),
];

/// Key of the transaction-level advisory lock that serialises migrations and
/// administrator token changes across replicas. Any constant works as long
/// as every replica uses the same one.
const SCHEMA_LOCK_KEY: i64 = 0x6564_6765_6b65_6570;

/// Connections per server process. A long poll uses no connection while it
/// waits, so a small pool serves many devices.
const POOL_SIZE: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const POOL_WAIT_TIMEOUT: Duration = Duration::from_secs(30);

const DEVICE_COLUMNS: &str = "id, project_id, name, uid, activated, last_seen_at, arch, \
     platform_version, agent_version, hostname, created_at";
const JOB_COLUMNS: &str = "id, kind, state, project_id, device_id, backup_type, timestamp, \
     source_device_id, progress, message, reason, requested_by, created_at, started_at, \
     finished_at, expires_at, object_key";
const BACKUP_COLUMNS: &str = "timestamp, backup_type, project_id, device_id, size, checksum, \
     source_device_uid, source_device_name, source_device_id, arch, platform_version, \
     agent_version, format_version, entry_count, state_size, job_id, created_at, object_key";
const TOKEN_COLUMNS: &str = "id, name, admin, project_ids, created_at, expires_at, revoked_at";

impl From<tokio_postgres::Error> for Error {
    fn from(error: tokio_postgres::Error) -> Self {
        Error::internal("metadata store query failed", describe(&error))
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(error: deadpool_postgres::PoolError) -> Self {
        Error::internal(
            "no PostgreSQL connection available for the metadata store",
            error,
        )
    }
}

/// A pool of connections to one PostgreSQL database.
#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    /// Connection settings, for the dedicated connection of the job listener.
    config: tokio_postgres::Config,
}

impl PostgresStore {
    /// Connects to the database at `url`, such as
    /// `postgres://edgekeep:PASSWORD@db.internal:5432/edgekeep`, and applies
    /// pending migrations.
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let mut config = parse_url(url)?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        let target = describe_target(&config);
        // NOTE: connections use no TLS, so a URL with `sslmode=require` fails
        // to connect. Keep the database on a trusted network.
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| anyhow::anyhow!("failed to build the PostgreSQL pool: {e}"))?;
        let store = PostgresStore { pool, config };
        store
            .migrate()
            .await
            .map_err(|e| unreachable_error(&target, e))?;
        tracing::info!(database = %target, "metadata store on PostgreSQL");
        Ok(store)
    }

    /// Applies pending migrations in one transaction.
    async fn migrate(&self) -> anyhow::Result<()> {
        let mut client = self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => flatten(e),
            other => flatten(other),
        })?;
        let transaction = client.transaction().await.map_err(flatten)?;
        apply_migrations(&transaction).await?;
        transaction.commit().await.map_err(flatten)?;
        Ok(())
    }
}

/// Applies pending migrations inside `transaction`, which the caller
/// commits. The advisory lock makes replicas that start together wait for
/// each other, so each migration runs once.
pub(crate) async fn apply_migrations(
    transaction: &tokio_postgres::Transaction<'_>,
) -> anyhow::Result<()> {
    transaction
        .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
        .await
        .map_err(flatten)?;
    // SET LOCAL keeps PostgreSQL's "already exists, skipping" notice out of
    // the log of every start, for this transaction only.
    transaction
        .batch_execute(
            "SET LOCAL client_min_messages = warning;
             CREATE TABLE IF NOT EXISTS schema_migrations (
                version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await
        .map_err(flatten)?;
    let current: i64 = transaction
        .query_one(
            "SELECT COALESCE(MAX(version), 0)::BIGINT FROM schema_migrations",
            &[],
        )
        .await
        .and_then(|row| row.try_get(0))
        .map_err(flatten)?;
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        transaction
            .batch_execute(sql)
            .await
            .map_err(|e| anyhow::anyhow!("database migration {version} failed: {e}"))?;
        transaction
            .execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[version, &crate::now_ms()],
            )
            .await
            .map_err(flatten)?;
        tracing::info!(version, "applied database migration");
    }
    Ok(())
}

/// Converts an error and its chain of causes into one message.
/// `tokio_postgres::Error` shows only its kind, such as "db error", and keeps
/// the server's message in its source.
fn flatten(error: impl std::error::Error) -> anyhow::Error {
    anyhow::anyhow!("{}", describe(&error))
}

/// Joins an error's message with those of its sources, skipping a source
/// whose message repeats the one before it.
pub(crate) fn describe(error: &dyn std::error::Error) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

fn parse_url(url: &str) -> anyhow::Result<tokio_postgres::Config> {
    // The parser's message never repeats the URL, so the password stays out
    // of the error.
    url.parse::<tokio_postgres::Config>().map_err(|e| {
        anyhow::anyhow!(
            "invalid PostgreSQL URL in --database-url: {e}; \
             expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"
        )
    })
}

/// Describes host, port and database of a connection configuration, without
/// the user or password.
fn describe_target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(name)) => name.clone(),
        Some(Host::Unix(path)) => path.display().to_string(),
        None => "localhost".to_string(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let database = config
        .get_dbname()
        .or(config.get_user())
        .unwrap_or("postgres");
    format!("host {host} port {port} database {database}")
}

fn unreachable_error(target: &str, error: anyhow::Error) -> anyhow::Error {
    anyhow::anyhow!(
        "failed to open the PostgreSQL metadata store at {target}: {error:#}; check that \
         PostgreSQL runs and accepts connections there, and that the user, password and \
         database in --database-url are right"
    )
}

/// Connects one client to `url` without a pool, for administration such as
/// creating a database. The error names host, port and database.
pub async fn connect_client(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = parse_url(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    let target = describe_target(&config);
    let (client, connection) = config
        .connect(NoTls)
        .await
        .map_err(|e| unreachable_error(&target, flatten(e)))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "PostgreSQL connection closed");
        }
    });
    Ok(client)
}

/// Returns `url` with its database replaced by `database`. Only the URL form
/// (`postgres://…/DATABASE?…`) is supported, not `key=value` strings.
pub fn database_url(url: &str, database: &str) -> anyhow::Result<String> {
    let authority_start = url
        .find("://")
        .map(|i| i + 3)
        .ok_or_else(|| anyhow::anyhow!("expected a postgres:// URL, not a key=value string"))?;
    let rest = &url[authority_start..];
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let query = rest[authority_end..]
        .find('?')
        .map_or("", |i| &rest[authority_end + i..]);
    Ok(format!(
        "{}{}/{database}{query}",
        &url[..authority_start],
        &rest[..authority_end]
    ))
}

fn is_unique_violation(error: &tokio_postgres::Error) -> bool {
    error.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

fn to_unsigned(value: i64, column: &str) -> Result<u64> {
    u64::try_from(value).map_err(|e| Error::internal(format!("invalid {column} {value}"), e))
}

fn to_signed(value: u64, column: &str) -> Result<i64> {
    i64::try_from(value).map_err(|e| Error::internal(format!("invalid {column} {value}"), e))
}

fn project_from_row(row: &Row) -> Result<Project> {
    Ok(Project {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        created_at: row.try_get(2)?,
    })
}

fn device_from_row(row: &Row) -> Result<Device> {
    Ok(Device {
        id: row.try_get(0)?,
        project_id: row.try_get(1)?,
        name: row.try_get(2)?,
        uid: row.try_get(3)?,
        online: false,
        activated: row.try_get(4)?,
        last_seen_at: row.try_get(5)?,
        arch: row.try_get(6)?,
        platform_version: row.try_get(7)?,
        agent_version: row.try_get(8)?,
        hostname: row.try_get(9)?,
        created_at: row.try_get(10)?,
    })
}

fn job_from_row(row: &Row) -> Result<JobRecord> {
    let kind: String = row.try_get(1)?;
    let state: String = row.try_get(2)?;
    let job = Job {
        id: row.try_get(0)?,
        kind: JobKind::parse(&kind)
            .ok_or_else(|| Error::internal("unknown job kind in the jobs table", &kind))?,
        state: JobState::parse(&state)
            .ok_or_else(|| Error::internal("unknown job state in the jobs table", &state))?,
        project_id: row.try_get(3)?,
        device_id: row.try_get(4)?,
        backup_type: row.try_get(5)?,
        timestamp: row.try_get(6)?,
        source_device_id: row.try_get(7)?,
        progress: row.try_get(8)?,
        message: row.try_get(9)?,
        reason: row.try_get(10)?,
        requested_by: row.try_get(11)?,
        created_at: row.try_get(12)?,
        started_at: row.try_get(13)?,
        finished_at: row.try_get(14)?,
        expires_at: row.try_get(15)?,
    };
    Ok(JobRecord {
        job,
        object_key: row.try_get(16)?,
    })
}

fn backup_from_row(row: &Row) -> Result<BackupRecord> {
    let format_version: i64 = row.try_get(12)?;
    let backup = Backup {
        timestamp: row.try_get(0)?,
        backup_type: row.try_get(1)?,
        project_id: row.try_get(2)?,
        device_id: row.try_get(3)?,
        size: to_unsigned(row.try_get(4)?, "size")?,
        checksum: row.try_get(5)?,
        source_device_uid: row.try_get(6)?,
        source_device_name: row.try_get(7)?,
        source_device_id: row.try_get(8)?,
        arch: row.try_get(9)?,
        platform_version: row.try_get(10)?,
        agent_version: row.try_get(11)?,
        format_version: u32::try_from(format_version)
            .map_err(|e| Error::internal(format!("invalid format_version {format_version}"), e))?,
        entry_count: to_unsigned(row.try_get(13)?, "entry_count")?,
        state_size: to_unsigned(row.try_get(14)?, "state_size")?,
        job_id: row.try_get(15)?,
        created_at: row.try_get(16)?,
    };
    Ok(BackupRecord {
        backup,
        object_key: row.try_get(17)?,
    })
}

fn token_from_row(row: &Row) -> Result<TokenInfo> {
    Ok(TokenInfo {
        id: row.try_get(0)?,
        name: row.try_get(1)?,
        admin: row.try_get(2)?,
        project_ids: row.try_get(3)?,
        created_at: row.try_get(4)?,
        expires_at: row.try_get(5)?,
        revoked_at: row.try_get(6)?,
    })
}

fn collect<T>(rows: Vec<Row>, convert: fn(&Row) -> Result<T>) -> Result<Vec<T>> {
    rows.iter().map(convert).collect()
}

async fn select_job(client: &impl GenericClient, job_id: i64) -> Result<Option<JobRecord>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
    client
        .query_opt(&sql, &[&job_id])
        .await?
        .as_ref()
        .map(job_from_row)
        .transpose()
}

async fn select_device(client: &impl GenericClient, device_id: i64) -> Result<Option<Device>> {
    let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1");
    client
        .query_opt(&sql, &[&device_id])
        .await?
        .as_ref()
        .map(device_from_row)
        .transpose()
}

/// Builds the 409 for a device that already has an active job.
/// Stores `hash` as the administrator token: replaces the existing one,
/// revoked or not, or inserts it.
async fn upsert_admin_token(
    client: &impl GenericClient,
    hash: &str,
    now: i64,
) -> Result<TokenInfo> {
    let updated = client
        .execute(
            "UPDATE tokens SET hash = $1, revoked_at = NULL, expires_at = NULL
             WHERE name = $2 AND admin",
            &[&hash, &ADMIN_TOKEN_NAME],
        )
        .await?;
    if updated == 0 {
        client
            .execute(
                "INSERT INTO tokens (name, hash, admin, created_at) VALUES ($1, $2, TRUE, $3)",
                &[&ADMIN_TOKEN_NAME, &hash, &now],
            )
            .await?;
    }
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1");
    let row = client.query_one(&sql, &[&hash]).await?;
    token_from_row(&row)
}

async fn active_job_conflict(client: &impl GenericClient, device_id: i64) -> Error {
    let active = client
        .query_opt(
            "SELECT id, kind, state FROM jobs WHERE device_id = $1
               AND kind IN ('backup', 'restore') AND state IN ('queued', 'running')",
            &[&device_id],
        )
        .await;
    let active = active.and_then(|row| {
        row.map(|row| {
            Ok::<_, tokio_postgres::Error>((
                row.try_get::<_, i64>(0)?,
                row.try_get::<_, String>(1)?,
                row.try_get::<_, String>(2)?,
            ))
        })
        .transpose()
    });
    match active {
        Ok(Some((id, kind, state))) => Error::Conflict(format!(
            "device {device_id} already has {kind} job {id} {state}; wait for it to finish or cancel it"
        )),
        Ok(None) => Error::Conflict(format!(
            "device {device_id} already has a backup or restore job queued or running"
        )),
        Err(e) => e.into(),
    }
}

impl PostgresStore {
    async fn insert_job_row(&self, job: &NewJob) -> Result<JobRecord> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        let inserted = transaction
            .query_one(
                "INSERT INTO jobs (kind, state, project_id, device_id, backup_type, timestamp,
                     source_device_id, requested_by, created_at, expires_at)
                 VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9) RETURNING id",
                &[
                    &job.kind.as_str(),
                    &job.project_id,
                    &job.device_id,
                    &job.backup_type,
                    &job.timestamp,
                    &job.source_device_id,
                    &job.requested_by,
                    &job.created_at,
                    &job.expires_at,
                ],
            )
            .await;
        let id: i64 = match inserted {
            Err(e) if is_unique_violation(&e) => {
                // The failed statement aborted the transaction, so the
                // active job is looked up outside it.
                transaction.rollback().await?;
                return Err(active_job_conflict(&client, job.device_id).await);
            }
            other => other?.try_get(0)?,
        };
        if let Some(key) = &job.object_key {
            let key = key.replace("{id}", &id.to_string());
            transaction
                .execute(
                    "UPDATE jobs SET object_key = $1 WHERE id = $2",
                    &[&key, &id],
                )
                .await?;
        }
        let record = select_job(&transaction, id)
            .await?
            .ok_or_else(|| Error::internal("job vanished after insert", id))?;
        // PostgreSQL delivers the notification on commit, so a replica that
        // wakes on it finds the job.
        if job.kind != JobKind::Import {
            transaction
                .execute(
                    "SELECT pg_notify($1, $2)",
                    &[&JOBS_CHANNEL, &job.device_id.to_string()],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(record)
    }

    async fn insert_backup_row(&self, record: &BackupRecord, now: i64) -> Result<()> {
        let b = &record.backup;
        let format_version = i64::from(b.format_version);
        let size = to_signed(b.size, "size")?;
        let entry_count = to_signed(b.entry_count, "entry_count")?;
        let state_size = to_signed(b.state_size, "state_size")?;
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        let sql = format!(
            "INSERT INTO backups ({BACKUP_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, \
             $10, $11, $12, $13, $14, $15, $16, $17, $18)"
        );
        let inserted = transaction
            .execute(
                &sql,
                &[
                    &b.timestamp,
                    &b.backup_type,
                    &b.project_id,
                    &b.device_id,
                    &size,
                    &b.checksum,
                    &b.source_device_uid,
                    &b.source_device_name,
                    &b.source_device_id,
                    &b.arch,
                    &b.platform_version,
                    &b.agent_version,
                    &format_version,
                    &entry_count,
                    &state_size,
                    &b.job_id,
                    &b.created_at,
                    &record.object_key,
                ],
            )
            .await;
        match inserted {
            Err(e) if is_unique_violation(&e) => {
                return Err(Error::Conflict(format!(
                    "timestamp {} already names a {} backup in project {}",
                    b.timestamp, b.backup_type, b.project_id
                )));
            }
            other => other?,
        };

        // Keep the clock ahead of explicit timestamps given to imports.
        transaction
            .execute(
                "INSERT INTO project_clock (project_id, last_timestamp) VALUES ($1, $2)
                 ON CONFLICT (project_id) DO UPDATE
                     SET last_timestamp = GREATEST(project_clock.last_timestamp, $2)",
                &[&b.project_id, &b.timestamp],
            )
            .await?;
        let updated = transaction
            .execute(
                "UPDATE jobs SET state = 'succeeded', timestamp = $1, progress = 1,
                     finished_at = $2, reason = NULL,
                     message = CASE kind WHEN 'import' THEN 'import listed' ELSE 'backup listed' END
                 WHERE id = $3 AND state = 'running'",
                &[&b.timestamp, &now, &b.job_id],
            )
            .await?;
        if updated == 0 {
            return Err(Error::Conflict(format!(
                "job {} is no longer running, so its backup was not listed",
                b.job_id
            )));
        }
        transaction.commit().await?;
        Ok(())
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_project(&self, name: &str, now: i64) -> Result<Project> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "INSERT INTO projects (name, created_at) VALUES ($1, $2)
                 RETURNING id, name, created_at",
                &[&name, &now],
            )
            .await?;
        project_from_row(&row)
    }

    async fn list_projects(&self, scope: Option<Vec<i64>>) -> Result<Vec<Project>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "SELECT id, name, created_at FROM projects
                 WHERE $1::BIGINT[] IS NULL OR id = ANY($1) ORDER BY id",
                &[&scope],
            )
            .await?;
        collect(rows, project_from_row)
    }

    async fn project(&self, project_id: i64) -> Result<Option<Project>> {
        let client = self.pool.get().await?;
        client
            .query_opt(
                "SELECT id, name, created_at FROM projects WHERE id = $1",
                &[&project_id],
            )
            .await?
            .as_ref()
            .map(project_from_row)
            .transpose()
    }

    async fn create_device(
        &self,
        project_id: i64,
        name: &str,
        uid: &str,
        activation_hash: &str,
        activation_expires_at: i64,
        now: i64,
    ) -> Result<Device> {
        let client = self.pool.get().await?;
        let sql = format!(
            "INSERT INTO devices (project_id, name, uid, activation_code_hash,
                 activation_expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6)
             RETURNING {DEVICE_COLUMNS}"
        );
        let row = client
            .query_one(
                &sql,
                &[
                    &project_id,
                    &name,
                    &uid,
                    &activation_hash,
                    &activation_expires_at,
                    &now,
                ],
            )
            .await?;
        device_from_row(&row)
    }

    async fn list_devices(&self, project_id: i64) -> Result<Vec<Device>> {
        let client = self.pool.get().await?;
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE project_id = $1 ORDER BY id");
        let rows = client.query(&sql, &[&project_id]).await?;
        collect(rows, device_from_row)
    }

    async fn device(&self, project_id: i64, device_id: i64) -> Result<Option<Device>> {
        let client = self.pool.get().await?;
        let device = select_device(&client, device_id).await?;
        Ok(device.filter(|d| d.project_id == project_id))
    }

    async fn device_by_uid(&self, project_id: i64, uid: &str) -> Result<Option<Device>> {
        let client = self.pool.get().await?;
        let sql =
            format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE project_id = $1 AND uid = $2");
        client
            .query_opt(&sql, &[&project_id, &uid])
            .await?
            .as_ref()
            .map(device_from_row)
            .transpose()
    }

    async fn reset_activation(&self, device_id: i64, hash: &str, expires_at: i64) -> Result<()> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE devices SET activation_code_hash = $1, activation_expires_at = $2,
                     credential_hash = NULL WHERE id = $3",
                &[&hash, &expires_at, &device_id],
            )
            .await?;
        Ok(())
    }

    async fn activate_device(
        &self,
        activation_hash: &str,
        credential_hash: &str,
        facts: &DeviceFacts,
        now: i64,
    ) -> Result<Option<Device>> {
        let client = self.pool.get().await?;
        let sql = format!(
            "UPDATE devices SET activation_code_hash = NULL, activation_expires_at = NULL,
                 credential_hash = $1, activated = TRUE, arch = $2, platform_version = $3,
                 agent_version = $4, hostname = $5, last_seen_at = $6
             WHERE activation_code_hash = $7 AND activation_expires_at > $6
             RETURNING {DEVICE_COLUMNS}"
        );
        client
            .query_opt(
                &sql,
                &[
                    &credential_hash,
                    &facts.arch,
                    &facts.platform_version,
                    &facts.agent_version,
                    &facts.hostname,
                    &now,
                    &activation_hash,
                ],
            )
            .await?
            .as_ref()
            .map(device_from_row)
            .transpose()
    }

    async fn device_by_credential(&self, credential_hash: &str) -> Result<Option<Device>> {
        let client = self.pool.get().await?;
        let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE credential_hash = $1");
        client
            .query_opt(&sql, &[&credential_hash])
            .await?
            .as_ref()
            .map(device_from_row)
            .transpose()
    }

    async fn record_poll(
        &self,
        device_id: i64,
        facts: Option<&DeviceFacts>,
        now: i64,
    ) -> Result<()> {
        let client = self.pool.get().await?;
        match facts {
            Some(f) => {
                client
                    .execute(
                        "UPDATE devices SET arch = $1, platform_version = $2, agent_version = $3,
                             hostname = $4, last_seen_at = $5 WHERE id = $6",
                        &[
                            &f.arch,
                            &f.platform_version,
                            &f.agent_version,
                            &f.hostname,
                            &now,
                            &device_id,
                        ],
                    )
                    .await?
            }
            None => {
                client
                    .execute(
                        "UPDATE devices SET last_seen_at = $1 WHERE id = $2",
                        &[&now, &device_id],
                    )
                    .await?
            }
        };
        Ok(())
    }

    async fn create_token(
        &self,
        name: &str,
        hash: &str,
        admin: bool,
        project_ids: Option<Vec<i64>>,
        expires_at: Option<i64>,
        now: i64,
    ) -> Result<TokenInfo> {
        let client = self.pool.get().await?;
        let sql = format!(
            "INSERT INTO tokens (name, hash, admin, project_ids, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING {TOKEN_COLUMNS}"
        );
        let row = client
            .query_one(
                &sql,
                &[&name, &hash, &admin, &project_ids, &now, &expires_at],
            )
            .await?;
        token_from_row(&row)
    }

    async fn set_admin_token(&self, hash: &str, now: i64) -> Result<TokenInfo> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;
        // Replicas that start together with the same configured token would
        // otherwise both insert it.
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
            .await?;
        let info = upsert_admin_token(&transaction, hash, now).await?;
        transaction.commit().await?;
        Ok(info)
    }

    async fn create_admin_token_if_missing(
        &self,
        hash: &str,
        now: i64,
    ) -> Result<Option<TokenInfo>> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;

        // The lock makes replicas that start together on an empty database
        // take turns, so the second one finds the first one's token.
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
            .await?;
        let exists: bool = transaction
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE admin AND revoked_at IS NULL)",
                &[],
            )
            .await?
            .try_get(0)?;
        if exists {
            return Ok(None);
        }

        // A revoked administrator token is replaced, as set_admin_token does.
        let info = upsert_admin_token(&transaction, hash, now).await?;
        transaction.commit().await?;
        Ok(Some(info))
    }

    async fn admin_token_exists(&self) -> Result<bool> {
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE admin AND revoked_at IS NULL)",
                &[],
            )
            .await?;
        Ok(row.try_get(0)?)
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let client = self.pool.get().await?;
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = $1");
        let info = client
            .query_opt(&sql, &[&hash])
            .await?
            .as_ref()
            .map(token_from_row)
            .transpose()?;
        Ok(info.map(|info| TokenRecord { info }))
    }

    async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        let client = self.pool.get().await?;
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY id");
        let rows = client.query(&sql, &[]).await?;
        collect(rows, token_from_row)
    }

    async fn revoke_token(&self, token_id: i64, now: i64) -> Result<bool> {
        let client = self.pool.get().await?;
        let updated = client
            .execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, $1) WHERE id = $2",
                &[&now, &token_id],
            )
            .await?;
        Ok(updated > 0)
    }

    async fn insert_job(&self, job: NewJob) -> Result<JobRecord> {
        self.insert_job_row(&job).await
    }

    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>> {
        let client = self.pool.get().await?;
        select_job(&client, job_id).await
    }

    async fn list_jobs(&self, filter: JobFilter) -> Result<Vec<Job>> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE ($1::BIGINT IS NULL OR project_id = $1)
               AND ($2::BIGINT IS NULL OR device_id = $2) AND ($3::TEXT IS NULL OR state = $3)
               AND ($4::BIGINT[] IS NULL OR project_id = ANY($4))
             ORDER BY id DESC"
        );
        let state = filter.state.map(JobState::as_str);
        let rows = client
            .query(
                &sql,
                &[
                    &filter.project_id,
                    &filter.device_id,
                    &state,
                    &filter.project_scope,
                ],
            )
            .await?;
        let records = collect(rows, job_from_row)?;
        Ok(records.into_iter().map(|record| record.job).collect())
    }

    async fn claim_next_job(&self, device_id: i64, now: i64) -> Result<Option<JobRecord>> {
        // One statement: SKIP LOCKED lets a replica pass over a job that
        // another replica is claiming, and the row lock keeps the claim
        // to one replica.
        let client = self.pool.get().await?;
        let sql = format!(
            "UPDATE jobs SET state = 'running', started_at = $1, heartbeat_at = $1, progress = 0
             WHERE id = (
                 SELECT id FROM jobs WHERE device_id = $2 AND state = 'queued'
                   AND kind IN ('backup', 'restore') ORDER BY id LIMIT 1
                 FOR UPDATE SKIP LOCKED)
             RETURNING {JOB_COLUMNS}"
        );
        client
            .query_opt(&sql, &[&now, &device_id])
            .await?
            .as_ref()
            .map(job_from_row)
            .transpose()
    }

    async fn fail_running_jobs(&self, device_id: i64, reason: &str, now: i64) -> Result<Vec<i64>> {
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "UPDATE jobs SET state = 'failed', reason = $1, message = $1, finished_at = $2
                 WHERE device_id = $3 AND state = 'running' AND kind IN ('backup', 'restore')
                 RETURNING id",
                &[&reason, &now, &device_id],
            )
            .await?;
        let mut ids = rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<Vec<i64>, _>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    async fn requeue_unreceived_jobs(
        &self,
        device_id: i64,
        last_received_job_id: i64,
    ) -> Result<Vec<i64>> {
        // One statement: a poll on another replica that fails or requeues
        // the same job waits for the row lock and then skips it.
        let client = self.pool.get().await?;
        let rows = client
            .query(
                "UPDATE jobs SET state = 'queued', started_at = NULL, heartbeat_at = NULL,
                     progress = 0
                 WHERE device_id = $1 AND state = 'running' AND kind IN ('backup', 'restore')
                   AND id > $2
                 RETURNING id",
                &[&device_id, &last_received_job_id],
            )
            .await?;
        let mut ids = rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<Result<Vec<i64>, _>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    async fn update_progress(&self, job_id: i64, progress: f64, message: &str) -> Result<()> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE jobs SET progress = $1, message = $2 WHERE id = $3 AND state = 'running'",
                &[&progress, &message, &job_id],
            )
            .await?;
        Ok(())
    }

    async fn record_heartbeat(&self, job_id: i64, now: i64) -> Result<()> {
        let client = self.pool.get().await?;
        client
            .execute(
                "UPDATE jobs SET heartbeat_at = $1 WHERE id = $2 AND state = 'running'",
                &[&now, &job_id],
            )
            .await?;
        Ok(())
    }

    async fn fail_stalled_jobs(&self, stalled_before: i64, now: i64) -> Result<Vec<JobRecord>> {
        // One statement: a replica running it at the same moment waits for
        // the row locks, then finds the jobs no longer running and skips them.
        let client = self.pool.get().await?;
        let sql = format!(
            "UPDATE jobs SET state = 'failed', finished_at = $2,
                 reason = stalled.stalled_reason, message = stalled.stalled_reason
             FROM (SELECT id AS stalled_id, 'device ' || device_id || ' sent no progress for '
                       || (($2::BIGINT - COALESCE(heartbeat_at, started_at)) / 1000) || ' '
                       || $3::TEXT AS stalled_reason
                   FROM jobs WHERE state = 'running' AND kind IN ('backup', 'restore')
                     AND COALESCE(heartbeat_at, started_at) <= $1::BIGINT) AS stalled
             WHERE jobs.id = stalled.stalled_id AND jobs.state = 'running'
             RETURNING {JOB_COLUMNS}"
        );
        let rows = client
            .query(&sql, &[&stalled_before, &now, &STALLED_REASON_END])
            .await?;
        let mut failed = collect(rows, job_from_row)?;
        failed.sort_by_key(|record| record.job.id);
        Ok(failed)
    }

    async fn finish_job(
        &self,
        job_id: i64,
        from: JobState,
        to: JobState,
        reason: Option<&str>,
        now: i64,
    ) -> Result<bool> {
        let client = self.pool.get().await?;
        let updated = client
            .execute(
                "UPDATE jobs SET state = $1, reason = $2, finished_at = $3,
                     progress = CASE WHEN $1 = 'succeeded' THEN 1 ELSE progress END,
                     message = CASE WHEN $1 = 'succeeded' AND kind = 'restore' THEN 'restored'
                                    ELSE COALESCE($2, message) END
                 WHERE id = $4 AND state = $5",
                &[&to.as_str(), &reason, &now, &job_id, &from.as_str()],
            )
            .await?;
        Ok(updated > 0)
    }

    async fn claim_import(&self, job_id: i64, lease_owner: &str, now: i64) -> Result<bool> {
        let client = self.pool.get().await?;
        let updated = client
            .execute(
                "UPDATE jobs SET state = 'running', started_at = $1, heartbeat_at = $1,
                     lease_owner = $2
                 WHERE id = $3 AND kind = 'import' AND state = 'queued'",
                &[&now, &lease_owner, &job_id],
            )
            .await?;
        Ok(updated > 0)
    }

    async fn renew_import_lease(&self, job_id: i64, lease_owner: &str, now: i64) -> Result<bool> {
        let client = self.pool.get().await?;
        let updated = client
            .execute(
                "UPDATE jobs SET heartbeat_at = $1
                 WHERE id = $2 AND kind = 'import' AND state = 'running' AND lease_owner = $3",
                &[&now, &job_id, &lease_owner],
            )
            .await?;
        Ok(updated > 0)
    }

    async fn requeue_stalled_imports(&self, stalled_before: i64) -> Result<Vec<JobRecord>> {
        // One statement: a replica running it at the same moment waits for
        // the row locks, then finds the jobs no longer running and skips them.
        let client = self.pool.get().await?;
        let sql = format!(
            "UPDATE jobs SET state = 'queued', started_at = NULL, heartbeat_at = NULL,
                 lease_owner = NULL
             WHERE kind = 'import' AND state = 'running'
               AND COALESCE(heartbeat_at, started_at, 0) <= $1
             RETURNING {JOB_COLUMNS}"
        );
        let rows = client.query(&sql, &[&stalled_before]).await?;
        let mut requeued = collect(rows, job_from_row)?;
        requeued.sort_by_key(|record| record.job.id);
        Ok(requeued)
    }

    async fn expire_jobs(&self, now: i64) -> Result<Vec<JobRecord>> {
        let mut client = self.pool.get().await?;
        let transaction = client.transaction().await?;

        // Lock the due jobs, so a replica expiring at the same moment skips them.
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' AND expires_at <= $1
             ORDER BY id FOR UPDATE SKIP LOCKED"
        );
        let rows = transaction.query(&sql, &[&now]).await?;
        let expired = collect(rows, job_from_row)?;

        for record in &expired {
            let reason = crate::jobs::expiry_reason(&record.job);
            transaction
                .execute(
                    "UPDATE jobs SET state = 'expired', reason = $1, message = $1, finished_at = $2
                     WHERE id = $3",
                    &[&reason, &now, &record.job.id],
                )
                .await?;
        }
        transaction.commit().await?;
        Ok(expired)
    }

    async fn pending_imports(&self) -> Result<Vec<JobRecord>> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE kind = 'import' AND state = 'queued' ORDER BY id"
        );
        let rows = client.query(&sql, &[]).await?;
        collect(rows, job_from_row)
    }

    fn listen_for_jobs(
        &self,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<tokio::sync::mpsc::Receiver<JobWakeup>> {
        Some(listener::spawn(self.config.clone(), shutdown))
    }

    async fn next_timestamp(&self, project_id: i64, now: i64) -> Result<i64> {
        // The upsert locks the clock row, so concurrent callers on any
        // replica each get a distinct value.
        let client = self.pool.get().await?;
        let row = client
            .query_one(
                "INSERT INTO project_clock (project_id, last_timestamp) VALUES ($1, $2)
                 ON CONFLICT (project_id) DO UPDATE
                     SET last_timestamp = GREATEST($2, project_clock.last_timestamp + 1)
                 RETURNING last_timestamp",
                &[&project_id, &now],
            )
            .await;
        match row {
            Err(e) if e.code() == Some(&SqlState::NUMERIC_VALUE_OUT_OF_RANGE) => {
                Err(Error::internal(
                    format!("the backup clock of project {project_id} is exhausted"),
                    format!(
                        "its last timestamp is {}, the largest possible value",
                        i64::MAX
                    ),
                ))
            }
            other => Ok(other?.try_get(0)?),
        }
    }

    async fn insert_backup(&self, record: BackupRecord, now: i64) -> Result<()> {
        self.insert_backup_row(&record, now).await
    }

    async fn backup(
        &self,
        project_id: i64,
        backup_type: &str,
        timestamp: i64,
    ) -> Result<Option<BackupRecord>> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {BACKUP_COLUMNS} FROM backups
             WHERE project_id = $1 AND backup_type = $2 AND timestamp = $3"
        );
        client
            .query_opt(&sql, &[&project_id, &backup_type, &timestamp])
            .await?
            .as_ref()
            .map(backup_from_row)
            .transpose()
    }

    async fn list_backups(&self, project_id: i64, device_id: i64) -> Result<Vec<Backup>> {
        let client = self.pool.get().await?;
        let sql = format!(
            "SELECT {BACKUP_COLUMNS} FROM backups WHERE project_id = $1 AND device_id = $2
             ORDER BY timestamp DESC"
        );
        let rows = client.query(&sql, &[&project_id, &device_id]).await?;
        let records = collect(rows, backup_from_row)?;
        Ok(records.into_iter().map(|record| record.backup).collect())
    }

    async fn backup_object_keys(&self) -> Result<Vec<String>> {
        let client = self.pool.get().await?;
        let rows = client.query("SELECT object_key FROM backups", &[]).await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_url_replaces_database() {
        assert_eq!(
            database_url("postgres://postgres@127.0.0.1:5432/test", "other").unwrap(),
            "postgres://postgres@127.0.0.1:5432/other"
        );
        assert_eq!(
            database_url("postgres://u:p@h/test?sslmode=disable", "x").unwrap(),
            "postgres://u:p@h/x?sslmode=disable"
        );
        assert_eq!(
            database_url("postgresql://h:5433", "x").unwrap(),
            "postgresql://h:5433/x"
        );
        assert!(database_url("host=h dbname=test", "x").is_err());
    }

    #[test]
    fn target_description_omits_password() {
        let config = parse_url("postgres://edgekeep:s3cret@db.example:6543/fleet").unwrap();
        let target = describe_target(&config);
        assert_eq!(target, "host db.example port 6543 database fleet");
        assert!(!target.contains("s3cret"));
    }

    #[test]
    fn invalid_url_error_omits_password() {
        let error = parse_url("postgres://edgekeep:s3cret@db:notaport/fleet").unwrap_err();
        let message = error.to_string();
        assert!(message.contains("--database-url"), "{message}");
        assert!(!message.contains("s3cret"), "{message}");
    }
}
