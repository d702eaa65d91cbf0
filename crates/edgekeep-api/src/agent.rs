//! The agent protocol, version 1, under `/agent/v1/`.
//!
//! The agent opens every connection: it activates once, then long-polls
//! `POST /agent/v1/jobs/next` and reports progress and results for the job it
//! received. `POST /agent/v1/jobs/next` carries the device facts as its body.
//! Calls after activation carry `Authorization: Bearer CREDENTIAL`.

use serde::{Deserialize, Serialize};

/// Version of the agent protocol; the agent sends it in [`PROTOCOL_HEADER`].
pub const PROTOCOL_VERSION: u32 = 1;
pub const PROTOCOL_HEADER: &str = "X-Edgekeep-Agent-Protocol";

/// Facts about the device the agent runs on, sent on activation and on every
/// poll so the server can show them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeviceFacts {
    pub arch: String,
    pub platform_version: String,
    pub agent_version: String,
    pub hostname: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivateRequest {
    pub activation_code: String,
    pub facts: DeviceFacts,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ActivateResponse {
    pub project_id: i64,
    pub device_id: i64,
    pub device_uid: String,
    pub device_name: String,
    /// Secret the agent presents from now on; the server keeps only a hash.
    pub credential: String,
}

/// Query of `POST /agent/v1/jobs/next`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NextJobQuery {
    /// How long the server may hold the request open when no job is ready.
    pub wait_secs: u64,
    /// Id of the last job this agent process received, absent before its
    /// first job. A running job of the device with a larger id was handed
    /// out but never arrived, so the server queues it again and hands it out
    /// once more. Any other running job is failed, because the agent
    /// restarted or gave it up. Agents that send no id get that failure for
    /// every running job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_job_id: Option<i64>,
}

/// A job handed to an agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum AgentJob {
    #[serde(rename_all = "camelCase")]
    Backup {
        job_id: i64,
        /// Pre-signed PUT URL the `.dat` file goes to.
        upload_url: String,
    },
    #[serde(rename_all = "camelCase")]
    Restore {
        job_id: i64,
        /// Pre-signed GET URL of the `.dat` file.
        download_url: String,
        /// Size and SHA-256 of the file as the server verified it.
        size: u64,
        checksum: String,
        /// True only when this device itself made the backup through its own
        /// backup job, so the identity paths in it are this device's. The
        /// device uid inside an archive can be forged, so on false the agent
        /// keeps its current identity paths whatever the archive contains.
        #[serde(default)]
        restore_identity: bool,
    },
}

impl AgentJob {
    pub fn job_id(&self) -> i64 {
        match self {
            AgentJob::Backup { job_id, .. } | AgentJob::Restore { job_id, .. } => *job_id,
        }
    }
}

/// Body of `POST /agent/v1/jobs/{jobId}/progress`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressReport {
    /// From 0.0 to 1.0.
    pub progress: f64,
    pub message: String,
}

/// Content of the reply to a progress report.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProgressReply {
    /// True when an operator cancelled the job: the agent stops and rolls
    /// back.
    pub cancelled: bool,
}

/// Body of `POST /agent/v1/jobs/{jobId}/result`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    pub ok: bool,
    /// Reason the job failed, in words an operator can act on.
    pub reason: Option<String>,
    /// For a backup: size and SHA-256 of the uploaded file.
    pub size: Option<u64>,
    pub checksum: Option<String>,
}
