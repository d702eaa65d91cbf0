//! The `Store` contract, checked on both implementations. Tests that open
//! two handles on one database stand for two server replicas.

#[macro_use]
mod common;

use std::sync::{Arc, Mutex};

use edgekeep_api::{Backup, JobKind, JobState};
use edgekeep_server::store::{BackupRecord, JobFilter, NewJob};
use edgekeep_server::{Error, PostgresStore, SqliteStore, Store};

use common::StoreChoice;

const NOW: i64 = 1_700_000_000_000;

/// Opens handles on the test's store. On PostgreSQL each handle has its own
/// pool, as a server replica has. A SQLite file serves one server, so every
/// handle on it is the same store.
struct Replicas {
    store: StoreChoice,
    dir: tempfile::TempDir,
    sqlite: Mutex<Option<Arc<dyn Store>>>,
}

impl Replicas {
    fn new(store: StoreChoice) -> Replicas {
        Replicas {
            store,
            dir: tempfile::tempdir().unwrap(),
            sqlite: Mutex::new(None),
        }
    }

    async fn open(&self) -> Arc<dyn Store> {
        if let Some(url) = self.store.database_url() {
            return Arc::new(PostgresStore::connect(&url).await.unwrap());
        }
        let mut sqlite = self.sqlite.lock().unwrap();
        sqlite
            .get_or_insert_with(|| {
                Arc::new(SqliteStore::open(&self.dir.path().join("edgekeep.db")).unwrap())
            })
            .clone()
    }
}

/// Creates a project with one device; returns their ids.
async fn project_and_device(store: &dyn Store) -> (i64, i64) {
    let project = store.create_project("plant", NOW).await.unwrap();
    let device = store
        .create_device(project.id, "gw", &uuid(), &uuid(), NOW + 60_000, NOW)
        .await
        .unwrap();
    (project.id, device.id)
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn new_job(kind: JobKind, project_id: i64, device_id: i64) -> NewJob {
    NewJob {
        kind,
        project_id,
        device_id,
        backup_type: "MASTER".into(),
        timestamp: None,
        source_device_id: None,
        requested_by: "test".into(),
        created_at: NOW,
        expires_at: NOW + 1000,
        object_key: Some("staging/jobs/{id}.dat".into()),
    }
}

fn backup_record(project_id: i64, device_id: i64, job_id: i64, timestamp: i64) -> BackupRecord {
    BackupRecord {
        backup: Backup {
            timestamp,
            backup_type: "MASTER".into(),
            project_id,
            device_id,
            size: 5_000_000_000,
            checksum: "ab".repeat(32),
            source_device_uid: "uid-1".into(),
            source_device_name: "gw".into(),
            source_device_id: Some(device_id),
            arch: "x86_64".into(),
            platform_version: "3.1.0".into(),
            agent_version: "0.1.0".into(),
            format_version: 1,
            entry_count: 12,
            state_size: 7_000_000_000,
            job_id,
            created_at: NOW,
        },
        object_key: format!("backups/{project_id}/{device_id}/MASTER/{timestamp}.dat"),
    }
}

async fn second_active_job_is_conflict(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let store = replicas.open().await;
    let (project_id, device_id) = project_and_device(store.as_ref()).await;

    let first = store
        .insert_job(new_job(JobKind::Backup, project_id, device_id))
        .await
        .unwrap();
    assert_eq!(first.job.state, JobState::Queued);
    assert_eq!(
        first.object_key,
        Some(format!("staging/jobs/{}.dat", first.job.id))
    );

    let error = store
        .insert_job(new_job(JobKind::Restore, project_id, device_id))
        .await
        .unwrap_err();
    let Error::Conflict(message) = error else {
        panic!("expected a conflict, got {error:?}");
    };
    assert!(
        message.contains(&format!("backup job {} queued", first.job.id)),
        "{message}"
    );

    // Imports run on the server, so they do not occupy the device.
    let import = store
        .insert_job(new_job(JobKind::Import, project_id, device_id))
        .await
        .unwrap();
    assert_eq!(import.job.kind, JobKind::Import);

    let cancelled = store
        .finish_job(
            first.job.id,
            JobState::Queued,
            JobState::Cancelled,
            None,
            NOW,
        )
        .await
        .unwrap();
    assert!(cancelled);
    let again = store
        .insert_job(new_job(JobKind::Backup, project_id, device_id))
        .await
        .unwrap();
    assert!(again.job.id > first.job.id);
}

async fn claim_is_atomic_across_replicas(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let (a, b) = (replicas.open().await, replicas.open().await);
    let (project_id, device_id) = project_and_device(a.as_ref()).await;
    let job = a
        .insert_job(new_job(JobKind::Backup, project_id, device_id))
        .await
        .unwrap();

    let (first, second) = tokio::join!(
        a.claim_next_job(device_id, NOW + 1),
        b.claim_next_job(device_id, NOW + 2)
    );
    let claims: Vec<_> = [first.unwrap(), second.unwrap()]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(claims.len(), 1, "exactly one replica claims the job");
    assert_eq!(claims[0].job.id, job.job.id);
    assert_eq!(claims[0].job.state, JobState::Running);
    assert!(claims[0].job.started_at.is_some());
    assert_eq!(a.claim_next_job(device_id, NOW + 3).await.unwrap(), None);

    let failed = b
        .fail_running_jobs(device_id, "agent restarted", NOW + 4)
        .await
        .unwrap();
    assert_eq!(failed, vec![job.job.id]);
    let stored = a.job(job.job.id).await.unwrap().unwrap();
    assert_eq!(stored.job.state, JobState::Failed);
    assert_eq!(stored.job.reason.as_deref(), Some("agent restarted"));
    assert_eq!(stored.job.message.as_deref(), Some("agent restarted"));
}

async fn clock_is_unique_across_replicas(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let (a, b) = (replicas.open().await, replicas.open().await);
    let (project_id, _) = project_and_device(a.as_ref()).await;

    let calls = (0..40).map(|i| {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        async move { store.next_timestamp(project_id, NOW).await.unwrap() }
    });
    let mut stamps = futures::future::join_all(calls).await;
    stamps.sort_unstable();
    let expected: Vec<i64> = (NOW..NOW + 40).collect();
    assert_eq!(stamps, expected);

    // A later clock reading wins over last + 1.
    assert_eq!(
        a.next_timestamp(project_id, NOW + 1000).await.unwrap(),
        NOW + 1000
    );
    assert_eq!(
        b.next_timestamp(project_id, NOW + 1000).await.unwrap(),
        NOW + 1001
    );
}

async fn explicit_timestamp_moves_clock(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let store = replicas.open().await;
    let (project_id, device_id) = project_and_device(store.as_ref()).await;
    let later = NOW + 86_400_000;

    let import = store
        .insert_job(new_job(JobKind::Import, project_id, device_id))
        .await
        .unwrap();
    assert!(
        store
            .claim_import(import.job.id, "test", NOW)
            .await
            .unwrap()
    );
    let record = backup_record(project_id, device_id, import.job.id, later);
    store.insert_backup(record.clone(), NOW).await.unwrap();

    let stored = store
        .backup(project_id, "MASTER", later)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored, record);
    let job = store.job(import.job.id).await.unwrap().unwrap().job;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.timestamp, Some(later));
    assert_eq!(job.progress, 1.0);
    assert_eq!(
        store.next_timestamp(project_id, NOW).await.unwrap(),
        later + 1
    );

    // The same timestamp again is a conflict, and nothing else changes.
    let second = store
        .insert_job(new_job(JobKind::Import, project_id, device_id))
        .await
        .unwrap();
    assert!(
        store
            .claim_import(second.job.id, "test", NOW)
            .await
            .unwrap()
    );
    let duplicate = backup_record(project_id, device_id, second.job.id, later);
    let error = store.insert_backup(duplicate, NOW).await.unwrap_err();
    let Error::Conflict(message) = error else {
        panic!("expected a conflict, got {error:?}");
    };
    assert!(
        message.contains(&format!("timestamp {later} already names")),
        "{message}"
    );
    let second = store.job(second.job.id).await.unwrap().unwrap().job;
    assert_eq!(second.state, JobState::Running);
    let listed = store.list_backups(project_id, device_id).await.unwrap();
    assert_eq!(listed, vec![record.backup]);
}

async fn exhausted_clock_is_an_error(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let store = replicas.open().await;
    let (project_id, device_id) = project_and_device(store.as_ref()).await;
    let import = store
        .insert_job(new_job(JobKind::Import, project_id, device_id))
        .await
        .unwrap();
    assert!(
        store
            .claim_import(import.job.id, "test", NOW)
            .await
            .unwrap()
    );
    let record = backup_record(project_id, device_id, import.job.id, i64::MAX);
    store.insert_backup(record, NOW).await.unwrap();
    let job = store.job(import.job.id).await.unwrap().unwrap().job;
    assert_eq!(job.message.as_deref(), Some("import listed"));

    let error = store.next_timestamp(project_id, NOW).await.unwrap_err();
    assert!(matches!(error, Error::Internal(_)), "{error:?}");
    assert!(
        error.to_string().contains(&format!(
            "backup clock of project {project_id} is exhausted"
        )),
        "{error}"
    );
}

async fn backup_of_finished_job_is_conflict(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let store = replicas.open().await;
    let (project_id, device_id) = project_and_device(store.as_ref()).await;
    let job = store
        .insert_job(new_job(JobKind::Backup, project_id, device_id))
        .await
        .unwrap();

    // The job is still queued, so listing its backup must fail and roll back.
    let record = backup_record(project_id, device_id, job.job.id, NOW);
    let error = store.insert_backup(record, NOW).await.unwrap_err();
    assert!(matches!(error, Error::Conflict(_)), "{error:?}");
    assert_eq!(store.backup(project_id, "MASTER", NOW).await.unwrap(), None);
}

async fn expiry_happens_once_across_replicas(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let (a, b) = (replicas.open().await, replicas.open().await);
    let (project_id, device_id) = project_and_device(a.as_ref()).await;
    let job = a
        .insert_job(new_job(JobKind::Backup, project_id, device_id))
        .await
        .unwrap();

    assert_eq!(a.expire_jobs(NOW + 999).await.unwrap(), vec![]);
    let (first, second) = tokio::join!(a.expire_jobs(NOW + 1000), b.expire_jobs(NOW + 1000));
    let expired: Vec<_> = first.unwrap().into_iter().chain(second.unwrap()).collect();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].job.id, job.job.id);
    let stored = a.job(job.job.id).await.unwrap().unwrap().job;
    assert_eq!(stored.state, JobState::Expired);
    assert!(
        stored
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("offline")),
        "{:?}",
        stored.reason
    );
}

async fn stalled_job_fails_once_across_replicas(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let (a, b) = (replicas.open().await, replicas.open().await);
    let (project_id, device_id) = project_and_device(a.as_ref()).await;
    let job = a
        .insert_job(new_job(JobKind::Backup, project_id, device_id))
        .await
        .unwrap();
    let job_id = job.job.id;
    a.claim_next_job(device_id, NOW).await.unwrap().unwrap();

    // The claim counts as the first heartbeat, and a heartbeat recorded
    // through one replica is what the other one checks.
    assert_eq!(
        b.fail_stalled_jobs(NOW - 1, NOW + 5000).await.unwrap(),
        vec![]
    );
    a.record_heartbeat(job_id, NOW + 3000).await.unwrap();
    assert_eq!(
        b.fail_stalled_jobs(NOW + 2999, NOW + 5000).await.unwrap(),
        vec![]
    );

    let (first, second) = tokio::join!(
        a.fail_stalled_jobs(NOW + 3000, NOW + 8000),
        b.fail_stalled_jobs(NOW + 3000, NOW + 8000)
    );
    let failed: Vec<_> = first.unwrap().into_iter().chain(second.unwrap()).collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].job.id, job_id);
    assert_eq!(failed[0].job.state, JobState::Failed);
    let stored = a.job(job_id).await.unwrap().unwrap().job;
    assert_eq!(stored.state, JobState::Failed);
    assert_eq!(stored.finished_at, Some(NOW + 8000));
    let expected = format!(
        "device {device_id} sent no progress for 5 seconds, the agent may have stopped; \
         the job can be retried"
    );
    assert_eq!(stored.reason.as_deref(), Some(expected.as_str()));
    assert_eq!(stored.message.as_deref(), Some(expected.as_str()));

    // A heartbeat for a job that is no longer running changes nothing.
    a.record_heartbeat(job_id, NOW + 9000).await.unwrap();
    assert_eq!(
        b.fail_stalled_jobs(NOW + 9999, NOW + 10_000).await.unwrap(),
        vec![]
    );
}

async fn unreceived_job_is_requeued_once_across_replicas(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let (a, b) = (replicas.open().await, replicas.open().await);
    let (project_id, device_id) = project_and_device(a.as_ref()).await;
    let job = a
        .insert_job(new_job(JobKind::Backup, project_id, device_id))
        .await
        .unwrap();
    let job_id = job.job.id;
    a.claim_next_job(device_id, NOW).await.unwrap().unwrap();

    // An agent that last received an earlier job never got this one: two
    // replicas that see its polls at once requeue it once.
    let (first, second) = tokio::join!(
        a.requeue_unreceived_jobs(device_id, job_id - 1),
        b.requeue_unreceived_jobs(device_id, job_id - 1)
    );
    let requeued: Vec<_> = first.unwrap().into_iter().chain(second.unwrap()).collect();
    assert_eq!(requeued, vec![job_id]);
    let stored = a.job(job_id).await.unwrap().unwrap().job;
    assert_eq!(stored.state, JobState::Queued);
    assert_eq!(stored.started_at, None);
    assert_eq!(stored.reason, None);

    // It is handed out again, and a stalled-job check counts from then.
    let again = b.claim_next_job(device_id, NOW + 7000).await.unwrap();
    assert_eq!(again.map(|record| record.job.id), Some(job_id));
    assert_eq!(
        a.fail_stalled_jobs(NOW + 6999, NOW + 8000).await.unwrap(),
        vec![]
    );

    // Once the agent names the job as received, it is not requeued.
    assert_eq!(
        a.requeue_unreceived_jobs(device_id, job_id).await.unwrap(),
        Vec::<i64>::new()
    );
    let stored = a.job(job_id).await.unwrap().unwrap().job;
    assert_eq!(stored.state, JobState::Running);
    assert_eq!(stored.started_at, Some(NOW + 7000));
}

async fn import_lease_is_exclusive_and_expires(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let (a, b) = (replicas.open().await, replicas.open().await);
    let (project_id, device_id) = project_and_device(a.as_ref()).await;
    let import = a
        .insert_job(new_job(JobKind::Import, project_id, device_id))
        .await
        .unwrap();
    let job_id = import.job.id;

    // One of two replicas that claim at once gets the lease.
    let (first, second) = tokio::join!(
        a.claim_import(job_id, "replica-a", NOW),
        b.claim_import(job_id, "replica-b", NOW)
    );
    let (first, second) = (first.unwrap(), second.unwrap());
    assert!(first != second, "exactly one claim succeeds");
    let (holder, holder_store, other, other_store) = if first {
        ("replica-a", &a, "replica-b", &b)
    } else {
        ("replica-b", &b, "replica-a", &a)
    };
    let stored = a.job(job_id).await.unwrap().unwrap().job;
    assert_eq!(stored.state, JobState::Running);
    assert_eq!(stored.started_at, Some(NOW));

    // Only the holder renews the lease, and a renewed lease is not stale.
    assert!(
        !other_store
            .renew_import_lease(job_id, other, NOW + 1000)
            .await
            .unwrap()
    );
    assert!(
        holder_store
            .renew_import_lease(job_id, holder, NOW + 3000)
            .await
            .unwrap()
    );
    assert_eq!(
        other_store
            .requeue_stalled_imports(NOW + 2999)
            .await
            .unwrap(),
        vec![]
    );

    // A stale lease is requeued once, even by two replicas at once.
    let (first, second) = tokio::join!(
        a.requeue_stalled_imports(NOW + 3000),
        b.requeue_stalled_imports(NOW + 3000)
    );
    let requeued: Vec<_> = first.unwrap().into_iter().chain(second.unwrap()).collect();
    assert_eq!(requeued.len(), 1);
    assert_eq!(requeued[0].job.id, job_id);
    assert_eq!(requeued[0].job.state, JobState::Queued);
    let pending = a.pending_imports().await.unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].job.started_at, None);

    // The old holder cannot renew once another replica claimed it again.
    assert!(
        other_store
            .claim_import(job_id, other, NOW + 4000)
            .await
            .unwrap()
    );
    assert!(
        !holder_store
            .renew_import_lease(job_id, holder, NOW + 4500)
            .await
            .unwrap()
    );
    assert!(
        other_store
            .renew_import_lease(job_id, other, NOW + 4500)
            .await
            .unwrap()
    );

    // Device jobs are not imports: their heartbeat sweep is another one.
    let backup = a
        .insert_job(new_job(JobKind::Backup, project_id, device_id))
        .await
        .unwrap();
    a.claim_next_job(device_id, NOW).await.unwrap().unwrap();
    assert!(!a.claim_import(backup.job.id, holder, NOW).await.unwrap());
    assert_eq!(a.requeue_stalled_imports(NOW + 4000).await.unwrap(), vec![]);
    let stored = a.job(backup.job.id).await.unwrap().unwrap().job;
    assert_eq!(stored.state, JobState::Running);
}

async fn admin_token_created_once_across_replicas(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let (a, b) = (replicas.open().await, replicas.open().await);
    let (first, second) = tokio::join!(
        a.create_admin_token_if_missing("hash-a", NOW),
        b.create_admin_token_if_missing("hash-b", NOW)
    );
    let created: Vec<_> = [first.unwrap(), second.unwrap()]
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(created.len(), 1, "exactly one replica creates the token");
    assert!(created[0].admin);
    assert_eq!(created[0].name, "admin");
    let tokens = a.list_tokens().await.unwrap();
    assert_eq!(tokens, created);

    // An existing token is kept; a revoked one is replaced.
    assert_eq!(
        a.create_admin_token_if_missing("hash-c", NOW + 1)
            .await
            .unwrap(),
        None
    );
    a.revoke_token(created[0].id, NOW + 2).await.unwrap();
    let replaced = b
        .create_admin_token_if_missing("hash-d", NOW + 3)
        .await
        .unwrap()
        .expect("a revoked administrator token is replaced");
    assert_eq!(replaced.id, created[0].id);
    assert_eq!(replaced.revoked_at, None);
    assert!(a.token_by_hash("hash-d").await.unwrap().is_some());
    assert_eq!(a.list_tokens().await.unwrap().len(), 1);
}

async fn tokens_keep_scope_and_admin_is_single(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let store = replicas.open().await;
    assert!(!store.admin_token_exists().await.unwrap());
    let admin = store.set_admin_token("hash-1", NOW).await.unwrap();
    assert!(admin.admin);
    let replaced = store.set_admin_token("hash-2", NOW + 1).await.unwrap();
    assert_eq!(replaced.id, admin.id);
    assert!(store.token_by_hash("hash-1").await.unwrap().is_none());
    assert!(store.admin_token_exists().await.unwrap());

    let scoped = store
        .create_token("ci", "hash-3", false, Some(vec![4, 9]), Some(NOW + 5), NOW)
        .await
        .unwrap();
    let found = store.token_by_hash("hash-3").await.unwrap().unwrap().info;
    assert_eq!(found, scoped);
    assert_eq!(found.project_ids, Some(vec![4, 9]));
    assert_eq!(found.expires_at, Some(NOW + 5));

    assert!(store.revoke_token(scoped.id, NOW + 2).await.unwrap());
    assert!(store.revoke_token(scoped.id, NOW + 3).await.unwrap());
    let revoked = store.token_by_hash("hash-3").await.unwrap().unwrap().info;
    assert_eq!(revoked.revoked_at, Some(NOW + 2), "first revocation stays");
    assert!(!store.revoke_token(scoped.id + 100, NOW).await.unwrap());
    let names: Vec<_> = store
        .list_tokens()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert_eq!(names, vec!["admin", "ci"]);
}

async fn lists_filter_by_scope(store: StoreChoice) {
    let replicas = Replicas::new(store);
    let store = replicas.open().await;
    let (first_project, first_device) = project_and_device(store.as_ref()).await;
    let (second_project, second_device) = project_and_device(store.as_ref()).await;
    let first = store
        .insert_job(new_job(JobKind::Backup, first_project, first_device))
        .await
        .unwrap();
    let second = store
        .insert_job(new_job(JobKind::Backup, second_project, second_device))
        .await
        .unwrap();

    let all = store.list_jobs(JobFilter::default()).await.unwrap();
    let ids: Vec<_> = all.iter().map(|j| j.id).collect();
    assert_eq!(ids, vec![second.job.id, first.job.id], "newest first");
    let scoped = store
        .list_jobs(JobFilter {
            project_scope: Some(vec![first_project]),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(scoped, vec![first.job.clone()]);
    let running = store
        .list_jobs(JobFilter {
            state: Some(JobState::Running),
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert!(running.is_empty());

    let projects = store
        .list_projects(Some(vec![second_project]))
        .await
        .unwrap();
    assert_eq!(projects.len(), 1);
    assert_eq!(projects[0].id, second_project);
    assert_eq!(store.list_projects(None).await.unwrap().len(), 2);
    assert_eq!(
        store.device(first_project, second_device).await.unwrap(),
        None
    );
}

store_tests!(
    second_active_job_is_conflict,
    claim_is_atomic_across_replicas,
    clock_is_unique_across_replicas,
    explicit_timestamp_moves_clock,
    exhausted_clock_is_an_error,
    backup_of_finished_job_is_conflict,
    expiry_happens_once_across_replicas,
    stalled_job_fails_once_across_replicas,
    tokens_keep_scope_and_admin_is_single,
    lists_filter_by_scope,
    unreceived_job_is_requeued_once_across_replicas,
    import_lease_is_exclusive_and_expires,
    admin_token_created_once_across_replicas,
);

#[tokio::test]
async fn migrations_run_once_across_replicas() {
    let Some(store) = StoreChoice::postgres().await else {
        return;
    };
    let url = store.database_url().unwrap();
    let starts = (0..4).map(|_| PostgresStore::connect(&url));
    for started in futures::future::join_all(starts).await {
        started.unwrap();
    }
    let client = edgekeep_server::store::postgres::connect_client(&url)
        .await
        .unwrap();
    let row = client
        .query_one("SELECT COUNT(*), MAX(version) FROM schema_migrations", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2);
    assert_eq!(row.get::<_, i64>(1), 2);
}

#[tokio::test]
async fn unreachable_database_names_target() {
    // Port 1 on loopback has no PostgreSQL, so the connection is refused.
    let Err(error) = PostgresStore::connect("postgres://edgekeep:s3cret@127.0.0.1:1/fleet").await
    else {
        panic!("connected to a port without PostgreSQL");
    };
    let message = format!("{error:#}");
    assert!(
        message.contains("host 127.0.0.1 port 1 database fleet"),
        "{message}"
    );
    assert!(message.contains("check that PostgreSQL runs"), "{message}");
    assert!(!message.contains("s3cret"), "{message}");
}
