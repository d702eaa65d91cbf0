//! REST API resources and the response envelope.

use serde::{Deserialize, Serialize};

/// The body of every response: `code` is the HTTP status as a string.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub content: Option<T>,
}

impl<T> Envelope<T> {
    pub fn ok(content: T) -> Self {
        Envelope {
            code: "200".to_string(),
            message: None,
            content: Some(content),
        }
    }
}

impl Envelope<()> {
    /// Builds the envelope of a successful call whose content is `null`.
    pub fn empty() -> Self {
        Envelope {
            code: "200".to_string(),
            message: None,
            content: None,
        }
    }

    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Envelope {
            code: status.to_string(),
            message: Some(message.into()),
            content: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Project {
    pub id: i64,
    pub name: String,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateProject {
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Device {
    pub id: i64,
    pub project_id: i64,
    pub name: String,
    /// Stable identifier the server gave the device; archives record it as
    /// their source so an agent can tell its own backups from another's.
    pub uid: String,
    /// True while the agent has a poll open or polled within the online
    /// window.
    pub online: bool,
    pub activated: bool,
    pub last_seen_at: Option<i64>,
    pub arch: Option<String>,
    pub platform_version: Option<String>,
    pub agent_version: Option<String>,
    pub hostname: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateDevice {
    pub name: String,
}

/// Returned once when a device is created or given a new activation code.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceActivation {
    pub device: Device,
    pub activation_code: String,
    pub activation_expires_at: i64,
}

/// One complete, verified backup as listed by `GET /api/v1/backup/list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Backup {
    pub timestamp: i64,
    pub backup_type: String,
    pub project_id: i64,
    /// The device the backup is listed under.
    pub device_id: i64,
    /// Size of the `.dat` file in bytes.
    pub size: u64,
    /// SHA-256 of the whole `.dat` file, lowercase hex.
    pub checksum: String,
    /// The device the state was taken from, as recorded in the archive.
    pub source_device_uid: String,
    pub source_device_name: String,
    /// The server's id of the source device when it belongs to this project.
    pub source_device_id: Option<i64>,
    pub arch: String,
    pub platform_version: String,
    pub agent_version: String,
    pub format_version: u32,
    pub entry_count: u64,
    /// Total size of the device state in the archive, before compression.
    pub state_size: u64,
    /// The job that made or imported the backup.
    pub job_id: i64,
    pub created_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// The device packs its state and uploads it.
    Backup,
    /// The device downloads a backup and swaps it in.
    Restore,
    /// The server validates a file uploaded through a pre-signed PUT URL.
    Import,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Backup => "backup",
            JobKind::Restore => "restore",
            JobKind::Import => "import",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "backup" => Some(JobKind::Backup),
            "restore" => Some(JobKind::Restore),
            "import" => Some(JobKind::Import),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Succeeded,
    Failed,
    /// The device never came online, or the upload never arrived, in time.
    Expired,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Expired => "expired",
            JobState::Cancelled => "cancelled",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "queued" => Some(JobState::Queued),
            "running" => Some(JobState::Running),
            "succeeded" => Some(JobState::Succeeded),
            "failed" => Some(JobState::Failed),
            "expired" => Some(JobState::Expired),
            "cancelled" => Some(JobState::Cancelled),
            _ => None,
        }
    }

    /// True once the job can no longer change.
    pub fn is_final(self) -> bool {
        !matches!(self, JobState::Queued | JobState::Running)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub id: i64,
    pub kind: JobKind,
    pub state: JobState,
    pub project_id: i64,
    /// The device the job runs on (backup, restore) or imports to (import).
    pub device_id: i64,
    pub backup_type: String,
    /// The backup the job made, restores or imports, once known.
    pub timestamp: Option<i64>,
    /// For a restore: the device the backup is listed under.
    pub source_device_id: Option<i64>,
    /// Progress from 0.0 to 1.0 while running.
    pub progress: f64,
    /// The latest progress step, such as "uploading".
    pub message: Option<String>,
    /// Reason the job failed, expired or was cancelled.
    pub reason: Option<String>,
    /// Name of the token that requested the job.
    pub requested_by: String,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// When a queued job expires if its device stays offline, or an import
    /// if no file arrives.
    pub expires_at: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateToken {
    pub name: String,
    /// Projects the token may act on; `None` for every project.
    #[serde(default)]
    pub project_ids: Option<Vec<i64>>,
    #[serde(default)]
    pub expires_at: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenInfo {
    pub id: i64,
    pub name: String,
    pub admin: bool,
    pub project_ids: Option<Vec<i64>>,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub revoked_at: Option<i64>,
}

/// Returned once when a token is created: the secret is not stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreatedToken {
    pub token: String,
    pub info: TokenInfo,
}
