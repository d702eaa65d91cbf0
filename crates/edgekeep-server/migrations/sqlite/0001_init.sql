-- Initial schema. Times are milliseconds since the Unix epoch; secrets are
-- stored only as lowercase hex SHA-256 hashes.

CREATE TABLE projects (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE devices (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    name TEXT NOT NULL,
    uid TEXT NOT NULL UNIQUE,
    credential_hash TEXT UNIQUE,
    activation_code_hash TEXT UNIQUE,
    activation_expires_at INTEGER,
    activated INTEGER NOT NULL DEFAULT 0,
    arch TEXT,
    platform_version TEXT,
    agent_version TEXT,
    hostname TEXT,
    last_seen_at INTEGER,
    created_at INTEGER NOT NULL
);
CREATE INDEX devices_project ON devices(project_id);

CREATE TABLE tokens (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    admin INTEGER NOT NULL DEFAULT 0,
    -- JSON array of project ids, or NULL for every project.
    project_ids TEXT,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    revoked_at INTEGER
);

CREATE TABLE jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    project_id INTEGER NOT NULL REFERENCES projects(id),
    device_id INTEGER NOT NULL REFERENCES devices(id),
    backup_type TEXT NOT NULL,
    timestamp INTEGER,
    source_device_id INTEGER,
    progress REAL NOT NULL DEFAULT 0,
    message TEXT,
    reason TEXT,
    requested_by TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    expires_at INTEGER NOT NULL,
    -- The object the job uploads to (backup, import) or restores from.
    object_key TEXT,
    -- Lease of a running job: which server replica holds it and until when.
    lease_owner TEXT,
    lease_expires_at INTEGER
);
CREATE INDEX jobs_state ON jobs(state, kind);
CREATE INDEX jobs_device ON jobs(device_id, state);
-- At most one backup or restore job queued or running per device.
CREATE UNIQUE INDEX jobs_one_active_per_device ON jobs(device_id)
    WHERE kind IN ('backup', 'restore') AND state IN ('queued', 'running');

CREATE TABLE backups (
    project_id INTEGER NOT NULL REFERENCES projects(id),
    device_id INTEGER NOT NULL REFERENCES devices(id),
    backup_type TEXT NOT NULL,
    timestamp INTEGER NOT NULL,
    size INTEGER NOT NULL,
    checksum TEXT NOT NULL,
    source_device_uid TEXT NOT NULL,
    source_device_name TEXT NOT NULL,
    source_device_id INTEGER,
    arch TEXT NOT NULL,
    platform_version TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    format_version INTEGER NOT NULL,
    entry_count INTEGER NOT NULL,
    state_size INTEGER NOT NULL,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    created_at INTEGER NOT NULL,
    object_key TEXT NOT NULL,
    PRIMARY KEY (project_id, backup_type, timestamp)
);
CREATE INDEX backups_device ON backups(project_id, device_id, timestamp);

-- Last backup timestamp handed out per project.
CREATE TABLE project_clock (
    project_id INTEGER PRIMARY KEY REFERENCES projects(id),
    last_timestamp INTEGER NOT NULL
);
