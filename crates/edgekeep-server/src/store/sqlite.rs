//! [`Store`] on one SQLite file: a single connection behind a mutex, used
//! from `spawn_blocking`, in WAL mode with a busy timeout.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use edgekeep_api::agent::DeviceFacts;
use edgekeep_api::{Backup, Device, Job, JobKind, JobState, Project, TokenInfo};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{
    ADMIN_TOKEN_NAME, BackupRecord, JobFilter, JobRecord, NewJob, STALLED_REASON_END, Store,
    TokenRecord,
};
use crate::error::{Error, Result};

/// Numbered migrations, applied in order; each runs once.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../../migrations/sqlite/0001_init.sql")),
    (
        2,
        include_str!("../../migrations/sqlite/0002_job_heartbeat.sql"),
    ),
];

const DEVICE_COLUMNS: &str = "id, project_id, name, uid, activated, last_seen_at, arch, \
     platform_version, agent_version, hostname, created_at";
const JOB_COLUMNS: &str = "id, kind, state, project_id, device_id, backup_type, timestamp, \
     source_device_id, progress, message, reason, requested_by, created_at, started_at, \
     finished_at, expires_at, object_key";
const BACKUP_COLUMNS: &str = "timestamp, backup_type, project_id, device_id, size, checksum, \
     source_device_uid, source_device_name, source_device_id, arch, platform_version, \
     agent_version, format_version, entry_count, state_size, job_id, created_at, object_key";
const TOKEN_COLUMNS: &str = "id, name, admin, project_ids, created_at, expires_at, revoked_at";

#[derive(Clone)]
pub struct SqliteStore {
    connection: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Schema version that [`SqliteStore::open`] brings a database to: the
    /// number of the newest migration.
    pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

    /// Opens or creates the database and applies pending migrations.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let connection = Connection::open(path).map_err(|e| {
            anyhow::anyhow!(
                "failed to open the metadata database {}: {e}",
                path.display()
            )
        })?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.busy_timeout(Duration::from_secs(10))?;
        let mut store = SqliteStore {
            connection: Arc::new(Mutex::new(connection)),
        };
        store.migrate()?;
        Ok(store)
    }

    fn migrate(&mut self) -> anyhow::Result<()> {
        let mut connection = lock(&self.connection);
        let transaction = connection.transaction()?;
        transaction.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version INTEGER PRIMARY KEY, applied_at INTEGER NOT NULL)",
        )?;
        let current: i64 = transaction.query_row(
            "SELECT COALESCE(MAX(version), 0) FROM schema_migrations",
            [],
            |row| row.get(0),
        )?;
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            transaction
                .execute_batch(sql)
                .map_err(|e| anyhow::anyhow!("database migration {version} failed: {e}"))?;
            transaction.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES (?1, ?2)",
                params![version, crate::now_ms()],
            )?;
            tracing::info!(version, "applied database migration");
        }
        transaction.commit()?;
        Ok(())
    }

    /// Runs `f` on the connection in a blocking thread.
    async fn call<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = lock(&connection);
            f(&mut connection)
        })
        .await
        .map_err(|e| Error::internal("metadata store task failed", e))?
    }
}

/// Locks the connection. A call that panicked has already dropped its open
/// transaction, which rolls it back, so the connection is safe to reuse and
/// the guard is recovered instead of failing every later call.
fn lock(connection: &Mutex<Connection>) -> MutexGuard<'_, Connection> {
    connection.lock().unwrap_or_else(PoisonError::into_inner)
}

fn project_from_row(row: &Row) -> rusqlite::Result<Project> {
    Ok(Project {
        id: row.get(0)?,
        name: row.get(1)?,
        created_at: row.get(2)?,
    })
}

fn device_from_row(row: &Row) -> rusqlite::Result<Device> {
    Ok(Device {
        id: row.get(0)?,
        project_id: row.get(1)?,
        name: row.get(2)?,
        uid: row.get(3)?,
        online: false,
        activated: row.get(4)?,
        last_seen_at: row.get(5)?,
        arch: row.get(6)?,
        platform_version: row.get(7)?,
        agent_version: row.get(8)?,
        hostname: row.get(9)?,
        created_at: row.get(10)?,
    })
}

fn job_from_row(row: &Row) -> rusqlite::Result<JobRecord> {
    let kind: String = row.get(1)?;
    let state: String = row.get(2)?;
    let invalid = |column: usize, value: String| {
        rusqlite::Error::FromSqlConversionFailure(
            column,
            rusqlite::types::Type::Text,
            format!("unknown value {value:?}").into(),
        )
    };
    let job = Job {
        id: row.get(0)?,
        kind: JobKind::parse(&kind).ok_or_else(|| invalid(1, kind.clone()))?,
        state: JobState::parse(&state).ok_or_else(|| invalid(2, state.clone()))?,
        project_id: row.get(3)?,
        device_id: row.get(4)?,
        backup_type: row.get(5)?,
        timestamp: row.get(6)?,
        source_device_id: row.get(7)?,
        progress: row.get(8)?,
        message: row.get(9)?,
        reason: row.get(10)?,
        requested_by: row.get(11)?,
        created_at: row.get(12)?,
        started_at: row.get(13)?,
        finished_at: row.get(14)?,
        expires_at: row.get(15)?,
    };
    Ok(JobRecord {
        job,
        object_key: row.get(16)?,
    })
}

fn backup_from_row(row: &Row) -> rusqlite::Result<BackupRecord> {
    let backup = Backup {
        timestamp: row.get(0)?,
        backup_type: row.get(1)?,
        project_id: row.get(2)?,
        device_id: row.get(3)?,
        size: row.get(4)?,
        checksum: row.get(5)?,
        source_device_uid: row.get(6)?,
        source_device_name: row.get(7)?,
        source_device_id: row.get(8)?,
        arch: row.get(9)?,
        platform_version: row.get(10)?,
        agent_version: row.get(11)?,
        format_version: row.get(12)?,
        entry_count: row.get(13)?,
        state_size: row.get(14)?,
        job_id: row.get(15)?,
        created_at: row.get(16)?,
    };
    Ok(BackupRecord {
        backup,
        object_key: row.get(17)?,
    })
}

/// Stores `hash` as the administrator token: replaces the existing one,
/// revoked or not, or inserts it.
fn upsert_admin_token(
    connection: &rusqlite::Connection,
    hash: &str,
    now: i64,
) -> rusqlite::Result<TokenInfo> {
    let updated = connection.execute(
        "UPDATE tokens SET hash = ?1, revoked_at = NULL, expires_at = NULL
         WHERE name = ?2 AND admin = 1",
        params![hash, ADMIN_TOKEN_NAME],
    )?;
    if updated == 0 {
        connection.execute(
            "INSERT INTO tokens (name, hash, admin, created_at) VALUES (?1, ?2, 1, ?3)",
            params![ADMIN_TOKEN_NAME, hash, now],
        )?;
    }
    let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1");
    connection.query_row(&sql, [hash], token_from_row)
}

fn token_from_row(row: &Row) -> rusqlite::Result<TokenInfo> {
    let project_ids: Option<String> = row.get(3)?;
    let project_ids = project_ids
        .map(|text| serde_json::from_str::<Vec<i64>>(&text))
        .transpose()
        .map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(3, rusqlite::types::Type::Text, e.into())
        })?;
    Ok(TokenInfo {
        id: row.get(0)?,
        name: row.get(1)?,
        admin: row.get(2)?,
        project_ids,
        created_at: row.get(4)?,
        expires_at: row.get(5)?,
        revoked_at: row.get(6)?,
    })
}

fn select_job(connection: &Connection, job_id: i64) -> Result<Option<JobRecord>> {
    let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?1");
    Ok(connection
        .query_row(&sql, [job_id], job_from_row)
        .optional()?)
}

fn select_device(connection: &Connection, device_id: i64) -> Result<Option<Device>> {
    let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = ?1");
    Ok(connection
        .query_row(&sql, [device_id], device_from_row)
        .optional()?)
}

fn is_unique_violation(error: &rusqlite::Error) -> bool {
    matches!(
        error,
        rusqlite::Error::SqliteFailure(e, _) if e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE
            || e.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
    )
}

/// Builds the 409 for a device that already has an active job.
fn active_job_conflict(connection: &Connection, device_id: i64) -> Error {
    let active = connection
        .query_row(
            "SELECT id, kind, state FROM jobs WHERE device_id = ?1
               AND kind IN ('backup', 'restore') AND state IN ('queued', 'running')",
            [device_id],
            |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, String>(2)?,
                ))
            },
        )
        .optional();
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

fn insert_job_row(connection: &mut Connection, job: &NewJob) -> Result<JobRecord> {
    let transaction = connection.transaction()?;
    let inserted = transaction.execute(
        "INSERT INTO jobs (kind, state, project_id, device_id, backup_type, timestamp,
             source_device_id, requested_by, created_at, expires_at)
         VALUES (?1, 'queued', ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
        params![
            job.kind.as_str(),
            job.project_id,
            job.device_id,
            job.backup_type,
            job.timestamp,
            job.source_device_id,
            job.requested_by,
            job.created_at,
            job.expires_at,
        ],
    );
    match inserted {
        Err(e) if is_unique_violation(&e) => {
            drop(transaction);
            return Err(active_job_conflict(connection, job.device_id));
        }
        other => other?,
    };
    let id = transaction.last_insert_rowid();
    if let Some(key) = &job.object_key {
        let key = key.replace("{id}", &id.to_string());
        transaction.execute(
            "UPDATE jobs SET object_key = ?1 WHERE id = ?2",
            params![key, id],
        )?;
    }
    let record = select_job(&transaction, id)?
        .ok_or_else(|| Error::internal("job vanished after insert", id))?;
    transaction.commit()?;
    Ok(record)
}

fn claim_next(connection: &mut Connection, device_id: i64, now: i64) -> Result<Option<JobRecord>> {
    let transaction = connection.transaction()?;
    let next: Option<i64> = transaction
        .query_row(
            "SELECT id FROM jobs WHERE device_id = ?1 AND state = 'queued'
               AND kind IN ('backup', 'restore') ORDER BY id LIMIT 1",
            [device_id],
            |row| row.get(0),
        )
        .optional()?;
    let Some(id) = next else {
        return Ok(None);
    };
    transaction.execute(
        "UPDATE jobs SET state = 'running', started_at = ?1, heartbeat_at = ?1, progress = 0
         WHERE id = ?2",
        params![now, id],
    )?;
    let record = select_job(&transaction, id)?;
    transaction.commit()?;
    Ok(record)
}

fn insert_backup_row(connection: &mut Connection, record: &BackupRecord, now: i64) -> Result<()> {
    let b = &record.backup;
    let transaction = connection.transaction()?;
    let inserted = transaction.execute(
        &format!("INSERT INTO backups ({BACKUP_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"),
        params![
            b.timestamp,
            b.backup_type,
            b.project_id,
            b.device_id,
            b.size,
            b.checksum,
            b.source_device_uid,
            b.source_device_name,
            b.source_device_id,
            b.arch,
            b.platform_version,
            b.agent_version,
            b.format_version,
            b.entry_count,
            b.state_size,
            b.job_id,
            b.created_at,
            record.object_key,
        ],
    );
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
    transaction.execute(
        "INSERT INTO project_clock (project_id, last_timestamp) VALUES (?1, ?2)
         ON CONFLICT (project_id) DO UPDATE SET last_timestamp = MAX(last_timestamp, ?2)",
        params![b.project_id, b.timestamp],
    )?;
    let updated = transaction.execute(
        "UPDATE jobs SET state = 'succeeded', timestamp = ?1, progress = 1, finished_at = ?2,
             reason = NULL,
             message = CASE kind WHEN 'import' THEN 'import listed' ELSE 'backup listed' END
         WHERE id = ?3 AND state = 'running'",
        params![b.timestamp, now, b.job_id],
    )?;
    if updated == 0 {
        return Err(Error::Conflict(format!(
            "job {} is no longer running, so its backup was not listed",
            b.job_id
        )));
    }
    transaction.commit()?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_project(&self, name: &str, now: i64) -> Result<Project> {
        let name = name.to_string();
        self.call(move |c| {
            c.execute(
                "INSERT INTO projects (name, created_at) VALUES (?1, ?2)",
                params![name, now],
            )?;
            Ok(Project {
                id: c.last_insert_rowid(),
                name,
                created_at: now,
            })
        })
        .await
    }

    async fn list_projects(&self, scope: Option<Vec<i64>>) -> Result<Vec<Project>> {
        self.call(move |c| {
            let mut statement =
                c.prepare("SELECT id, name, created_at FROM projects ORDER BY id")?;
            let projects = statement
                .query_map([], project_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(projects
                .into_iter()
                .filter(|p| scope.as_ref().is_none_or(|ids| ids.contains(&p.id)))
                .collect())
        })
        .await
    }

    async fn project(&self, project_id: i64) -> Result<Option<Project>> {
        self.call(move |c| {
            Ok(c.query_row(
                "SELECT id, name, created_at FROM projects WHERE id = ?1",
                [project_id],
                project_from_row,
            )
            .optional()?)
        })
        .await
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
        let (name, uid, hash) = (
            name.to_string(),
            uid.to_string(),
            activation_hash.to_string(),
        );
        self.call(move |c| {
            c.execute(
                "INSERT INTO devices (project_id, name, uid, activation_code_hash,
                     activation_expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![project_id, name, uid, hash, activation_expires_at, now],
            )?;
            select_device(c, c.last_insert_rowid())?
                .ok_or_else(|| Error::internal("device vanished after insert", uid))
        })
        .await
    }

    async fn list_devices(&self, project_id: i64) -> Result<Vec<Device>> {
        self.call(move |c| {
            let sql =
                format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE project_id = ?1 ORDER BY id");
            let mut statement = c.prepare(&sql)?;
            let devices = statement
                .query_map([project_id], device_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(devices)
        })
        .await
    }

    async fn device(&self, project_id: i64, device_id: i64) -> Result<Option<Device>> {
        self.call(move |c| Ok(select_device(c, device_id)?.filter(|d| d.project_id == project_id)))
            .await
    }

    async fn device_by_uid(&self, project_id: i64, uid: &str) -> Result<Option<Device>> {
        let uid = uid.to_string();
        self.call(move |c| {
            let sql =
                format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE project_id = ?1 AND uid = ?2");
            Ok(c.query_row(&sql, params![project_id, uid], device_from_row)
                .optional()?)
        })
        .await
    }

    async fn reset_activation(&self, device_id: i64, hash: &str, expires_at: i64) -> Result<()> {
        let hash = hash.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE devices SET activation_code_hash = ?1, activation_expires_at = ?2,
                     credential_hash = NULL WHERE id = ?3",
                params![hash, expires_at, device_id],
            )?;
            Ok(())
        })
        .await
    }

    async fn activate_device(
        &self,
        activation_hash: &str,
        credential_hash: &str,
        facts: &DeviceFacts,
        now: i64,
    ) -> Result<Option<Device>> {
        let (code, credential, facts) = (
            activation_hash.to_string(),
            credential_hash.to_string(),
            facts.clone(),
        );
        self.call(move |c| {
            let transaction = c.transaction()?;
            let updated = transaction.execute(
                "UPDATE devices SET activation_code_hash = NULL, activation_expires_at = NULL,
                     credential_hash = ?1, activated = 1, arch = ?2, platform_version = ?3,
                     agent_version = ?4, hostname = ?5, last_seen_at = ?6
                 WHERE activation_code_hash = ?7 AND activation_expires_at > ?6",
                params![
                    credential,
                    facts.arch,
                    facts.platform_version,
                    facts.agent_version,
                    facts.hostname,
                    now,
                    code
                ],
            )?;
            if updated == 0 {
                return Ok(None);
            }
            let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE credential_hash = ?1");
            let device = transaction
                .query_row(&sql, [&credential], device_from_row)
                .optional()?;
            transaction.commit()?;
            Ok(device)
        })
        .await
    }

    async fn device_by_credential(&self, credential_hash: &str) -> Result<Option<Device>> {
        let hash = credential_hash.to_string();
        self.call(move |c| {
            let sql = format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE credential_hash = ?1");
            Ok(c.query_row(&sql, [hash], device_from_row).optional()?)
        })
        .await
    }

    async fn record_poll(
        &self,
        device_id: i64,
        facts: Option<&DeviceFacts>,
        now: i64,
    ) -> Result<()> {
        let facts = facts.cloned();
        self.call(move |c| {
            match facts {
                Some(f) => c.execute(
                    "UPDATE devices SET arch = ?1, platform_version = ?2, agent_version = ?3,
                         hostname = ?4, last_seen_at = ?5 WHERE id = ?6",
                    params![
                        f.arch,
                        f.platform_version,
                        f.agent_version,
                        f.hostname,
                        now,
                        device_id
                    ],
                )?,
                None => c.execute(
                    "UPDATE devices SET last_seen_at = ?1 WHERE id = ?2",
                    params![now, device_id],
                )?,
            };
            Ok(())
        })
        .await
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
        let (name, hash) = (name.to_string(), hash.to_string());
        self.call(move |c| {
            let scope = project_ids
                .as_ref()
                .map(|ids| serde_json::to_string(ids).expect("a list of integers serialises"));
            c.execute(
                "INSERT INTO tokens (name, hash, admin, project_ids, created_at, expires_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![name, hash, admin, scope, now, expires_at],
            )?;
            Ok(TokenInfo {
                id: c.last_insert_rowid(),
                name,
                admin,
                project_ids,
                created_at: now,
                expires_at,
                revoked_at: None,
            })
        })
        .await
    }

    async fn set_admin_token(&self, hash: &str, now: i64) -> Result<TokenInfo> {
        let hash = hash.to_string();
        self.call(move |c| {
            let transaction = c.transaction()?;
            let info = upsert_admin_token(&transaction, &hash, now)?;
            transaction.commit()?;
            Ok(info)
        })
        .await
    }

    async fn create_admin_token_if_missing(
        &self,
        hash: &str,
        now: i64,
    ) -> Result<Option<TokenInfo>> {
        let hash = hash.to_string();
        self.call(move |c| {
            let transaction =
                c.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let exists: bool = transaction.query_row(
                "SELECT EXISTS (SELECT 1 FROM tokens WHERE admin = 1 AND revoked_at IS NULL)",
                [],
                |row| row.get(0),
            )?;
            if exists {
                return Ok(None);
            }
            // A revoked administrator token is replaced, as set_admin_token does.
            let info = upsert_admin_token(&transaction, &hash, now)?;
            transaction.commit()?;
            Ok(Some(info))
        })
        .await
    }

    async fn admin_token_exists(&self) -> Result<bool> {
        self.call(|c| {
            let count: i64 = c.query_row(
                "SELECT COUNT(*) FROM tokens WHERE admin = 1 AND revoked_at IS NULL",
                [],
                |row| row.get(0),
            )?;
            Ok(count > 0)
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>> {
        let hash = hash.to_string();
        self.call(move |c| {
            let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE hash = ?1");
            let info = c.query_row(&sql, [hash], token_from_row).optional()?;
            Ok(info.map(|info| TokenRecord { info }))
        })
        .await
    }

    async fn list_tokens(&self) -> Result<Vec<TokenInfo>> {
        self.call(|c| {
            let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY id");
            let mut statement = c.prepare(&sql)?;
            let tokens = statement
                .query_map([], token_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(tokens)
        })
        .await
    }

    async fn revoke_token(&self, token_id: i64, now: i64) -> Result<bool> {
        self.call(move |c| {
            let exists = c.execute(
                "UPDATE tokens SET revoked_at = COALESCE(revoked_at, ?1) WHERE id = ?2",
                params![now, token_id],
            )?;
            Ok(exists > 0)
        })
        .await
    }

    async fn insert_job(&self, job: NewJob) -> Result<JobRecord> {
        self.call(move |c| insert_job_row(c, &job)).await
    }

    async fn job(&self, job_id: i64) -> Result<Option<JobRecord>> {
        self.call(move |c| select_job(c, job_id)).await
    }

    async fn list_jobs(&self, filter: JobFilter) -> Result<Vec<Job>> {
        self.call(move |c| {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE (?1 IS NULL OR project_id = ?1)
                   AND (?2 IS NULL OR device_id = ?2) AND (?3 IS NULL OR state = ?3)
                 ORDER BY id DESC"
            );
            let mut statement = c.prepare(&sql)?;
            let state = filter.state.map(JobState::as_str);
            let jobs = statement
                .query_map(
                    params![filter.project_id, filter.device_id, state],
                    job_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(jobs
                .into_iter()
                .map(|record| record.job)
                .filter(|job| {
                    filter
                        .project_scope
                        .as_ref()
                        .is_none_or(|ids| ids.contains(&job.project_id))
                })
                .collect())
        })
        .await
    }

    async fn claim_next_job(&self, device_id: i64, now: i64) -> Result<Option<JobRecord>> {
        self.call(move |c| claim_next(c, device_id, now)).await
    }

    async fn fail_running_jobs(&self, device_id: i64, reason: &str, now: i64) -> Result<Vec<i64>> {
        let reason = reason.to_string();
        self.call(move |c| {
            let transaction = c.transaction()?;
            let ids = {
                let mut statement = transaction.prepare(
                    "SELECT id FROM jobs WHERE device_id = ?1 AND state = 'running'
                       AND kind IN ('backup', 'restore')",
                )?;
                statement
                    .query_map([device_id], |row| row.get::<_, i64>(0))?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            for id in &ids {
                transaction.execute(
                    "UPDATE jobs SET state = 'failed', reason = ?1, message = ?1, finished_at = ?2
                     WHERE id = ?3",
                    params![reason, now, id],
                )?;
            }
            transaction.commit()?;
            Ok(ids)
        })
        .await
    }

    async fn requeue_unreceived_jobs(
        &self,
        device_id: i64,
        last_received_job_id: i64,
    ) -> Result<Vec<i64>> {
        self.call(move |c| {
            let mut statement = c.prepare(
                "UPDATE jobs SET state = 'queued', started_at = NULL, heartbeat_at = NULL,
                     progress = 0
                 WHERE device_id = ?1 AND state = 'running' AND kind IN ('backup', 'restore')
                   AND id > ?2
                 RETURNING id",
            )?;
            let mut ids = statement
                .query_map(params![device_id, last_received_job_id], |row| {
                    row.get::<_, i64>(0)
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            ids.sort_unstable();
            Ok(ids)
        })
        .await
    }

    async fn update_progress(&self, job_id: i64, progress: f64, message: &str) -> Result<()> {
        let message = message.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE jobs SET progress = ?1, message = ?2 WHERE id = ?3 AND state = 'running'",
                params![progress, message, job_id],
            )?;
            Ok(())
        })
        .await
    }

    async fn record_heartbeat(&self, job_id: i64, now: i64) -> Result<()> {
        self.call(move |c| {
            c.execute(
                "UPDATE jobs SET heartbeat_at = ?1 WHERE id = ?2 AND state = 'running'",
                params![now, job_id],
            )?;
            Ok(())
        })
        .await
    }

    async fn fail_stalled_jobs(&self, stalled_before: i64, now: i64) -> Result<Vec<JobRecord>> {
        self.call(move |c| {
            let sql = format!(
                "UPDATE jobs SET state = 'failed', finished_at = ?2,
                     reason = stalled.stalled_reason, message = stalled.stalled_reason
                 FROM (SELECT id AS stalled_id, 'device ' || device_id
                           || ' sent no progress for '
                           || ((?2 - COALESCE(heartbeat_at, started_at)) / 1000) || ' ' || ?3
                           AS stalled_reason
                       FROM jobs WHERE state = 'running' AND kind IN ('backup', 'restore')
                         AND COALESCE(heartbeat_at, started_at) <= ?1) AS stalled
                 WHERE jobs.id = stalled.stalled_id
                 RETURNING {JOB_COLUMNS}"
            );
            let mut statement = c.prepare(&sql)?;
            let mut failed = statement
                .query_map(
                    params![stalled_before, now, STALLED_REASON_END],
                    job_from_row,
                )?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            failed.sort_by_key(|record| record.job.id);
            Ok(failed)
        })
        .await
    }

    async fn finish_job(
        &self,
        job_id: i64,
        from: JobState,
        to: JobState,
        reason: Option<&str>,
        now: i64,
    ) -> Result<bool> {
        let reason = reason.map(str::to_string);
        self.call(move |c| {
            let updated = c.execute(
                "UPDATE jobs SET state = ?1, reason = ?2, finished_at = ?3,
                     progress = CASE WHEN ?1 = 'succeeded' THEN 1 ELSE progress END,
                     message = CASE WHEN ?1 = 'succeeded' AND kind = 'restore' THEN 'restored'
                                    ELSE COALESCE(?2, message) END
                 WHERE id = ?4 AND state = ?5",
                params![to.as_str(), reason, now, job_id, from.as_str()],
            )?;
            Ok(updated > 0)
        })
        .await
    }

    async fn claim_import(&self, job_id: i64, lease_owner: &str, now: i64) -> Result<bool> {
        let lease_owner = lease_owner.to_string();
        self.call(move |c| {
            let updated = c.execute(
                "UPDATE jobs SET state = 'running', started_at = ?1, heartbeat_at = ?1,
                     lease_owner = ?2
                 WHERE id = ?3 AND kind = 'import' AND state = 'queued'",
                params![now, lease_owner, job_id],
            )?;
            Ok(updated > 0)
        })
        .await
    }

    async fn renew_import_lease(&self, job_id: i64, lease_owner: &str, now: i64) -> Result<bool> {
        let lease_owner = lease_owner.to_string();
        self.call(move |c| {
            let updated = c.execute(
                "UPDATE jobs SET heartbeat_at = ?1
                 WHERE id = ?2 AND kind = 'import' AND state = 'running' AND lease_owner = ?3",
                params![now, job_id, lease_owner],
            )?;
            Ok(updated > 0)
        })
        .await
    }

    async fn requeue_stalled_imports(&self, stalled_before: i64) -> Result<Vec<JobRecord>> {
        self.call(move |c| {
            let sql = format!(
                "UPDATE jobs SET state = 'queued', started_at = NULL, heartbeat_at = NULL,
                     lease_owner = NULL
                 WHERE kind = 'import' AND state = 'running'
                   AND COALESCE(heartbeat_at, started_at, 0) <= ?1
                 RETURNING {JOB_COLUMNS}"
            );
            let mut statement = c.prepare(&sql)?;
            let mut requeued = statement
                .query_map([stalled_before], job_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            requeued.sort_by_key(|record| record.job.id);
            Ok(requeued)
        })
        .await
    }

    async fn expire_jobs(&self, now: i64) -> Result<Vec<JobRecord>> {
        self.call(move |c| {
            let transaction = c.transaction()?;
            let expired = {
                let sql = format!(
                    "SELECT {JOB_COLUMNS} FROM jobs WHERE state = 'queued' AND expires_at <= ?1"
                );
                let mut statement = transaction.prepare(&sql)?;
                statement
                    .query_map([now], job_from_row)?
                    .collect::<rusqlite::Result<Vec<_>>>()?
            };
            for record in &expired {
                let reason = crate::jobs::expiry_reason(&record.job);
                transaction.execute(
                    "UPDATE jobs SET state = 'expired', reason = ?1, message = ?1, finished_at = ?2
                     WHERE id = ?3",
                    params![reason, now, record.job.id],
                )?;
            }
            transaction.commit()?;
            Ok(expired)
        })
        .await
    }

    async fn pending_imports(&self) -> Result<Vec<JobRecord>> {
        self.call(|c| {
            let sql = format!(
                "SELECT {JOB_COLUMNS} FROM jobs WHERE kind = 'import' AND state = 'queued' ORDER BY id"
            );
            let mut statement = c.prepare(&sql)?;
            let jobs = statement
                .query_map([], job_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(jobs)
        })
        .await
    }

    async fn next_timestamp(&self, project_id: i64, now: i64) -> Result<i64> {
        self.call(move |c| {
            let transaction = c.transaction()?;
            let last: Option<i64> = transaction
                .query_row(
                    "SELECT last_timestamp FROM project_clock WHERE project_id = ?1",
                    [project_id],
                    |row| row.get(0),
                )
                .optional()?;
            let next = match last {
                None => now,
                Some(last) => now.max(last.checked_add(1).ok_or_else(|| {
                    Error::internal(
                        format!("the backup clock of project {project_id} is exhausted"),
                        format!("its last timestamp is {last}, the largest possible value"),
                    )
                })?),
            };
            transaction.execute(
                "INSERT INTO project_clock (project_id, last_timestamp) VALUES (?1, ?2)
                 ON CONFLICT (project_id) DO UPDATE SET last_timestamp = ?2",
                params![project_id, next],
            )?;
            transaction.commit()?;
            Ok(next)
        })
        .await
    }

    async fn insert_backup(&self, record: BackupRecord, now: i64) -> Result<()> {
        self.call(move |c| insert_backup_row(c, &record, now)).await
    }

    async fn backup(
        &self,
        project_id: i64,
        backup_type: &str,
        timestamp: i64,
    ) -> Result<Option<BackupRecord>> {
        let backup_type = backup_type.to_string();
        self.call(move |c| {
            let sql = format!(
                "SELECT {BACKUP_COLUMNS} FROM backups
                 WHERE project_id = ?1 AND backup_type = ?2 AND timestamp = ?3"
            );
            Ok(c.query_row(
                &sql,
                params![project_id, backup_type, timestamp],
                backup_from_row,
            )
            .optional()?)
        })
        .await
    }

    async fn list_backups(&self, project_id: i64, device_id: i64) -> Result<Vec<Backup>> {
        self.call(move |c| {
            let sql = format!(
                "SELECT {BACKUP_COLUMNS} FROM backups WHERE project_id = ?1 AND device_id = ?2
                 ORDER BY timestamp DESC"
            );
            let mut statement = c.prepare(&sql)?;
            let backups = statement
                .query_map(params![project_id, device_id], backup_from_row)?
                .map(|row| row.map(|record| record.backup))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(backups)
        })
        .await
    }

    async fn backup_object_keys(&self) -> Result<Vec<String>> {
        self.call(|c| {
            let mut statement = c.prepare("SELECT object_key FROM backups")?;
            let keys = statement
                .query_map([], |row| row.get(0))?
                .collect::<rusqlite::Result<Vec<String>>>()?;
            Ok(keys)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn panicking_call_leaves_store_usable() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("edgekeep.db")).unwrap();
        let panicked = store
            .call(|connection| -> Result<()> {
                let transaction = connection.transaction()?;
                transaction.execute(
                    "INSERT INTO projects (name, created_at) VALUES ('lost', 1)",
                    [],
                )?;
                panic!("simulated failure inside a store call");
            })
            .await;
        assert!(panicked.is_err());

        let project = store.create_project("plant", 2).await.unwrap();
        let projects = store.list_projects(None).await.unwrap();
        assert_eq!(projects, vec![project]);
    }
}
