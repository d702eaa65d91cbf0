//! Wire types of the edgekeep REST API and agent protocol, and an HTTP client
//! for both.
//!
//! Every response body is an [`Envelope`]. JSON field names are camelCase, as
//! in the Litmus Edge Manager device-backup API that edgekeep is compatible
//! with, and every timestamp is milliseconds since the Unix epoch.

pub mod agent;
pub mod client;
pub mod model;

pub use client::{AgentClient, AgentTimeouts, ApiError, Client};
pub use model::*;

/// Header that carries an API token on every REST call.
pub const AUTH_TOKEN_HEADER: &str = "X-AuthToken";

/// Header that names the job a successful job-starting call queued.
pub const JOB_ID_HEADER: &str = "X-Edgekeep-Job-Id";

/// The only backup type edgekeep makes: a full device backup.
pub const BACKUP_TYPE_MASTER: &str = "MASTER";

/// Expiry of the download URLs returned by `POST /api/v1/backup/get`: 7 days,
/// the longest that SigV4 pre-signing allows.
pub const DOWNLOAD_URL_EXPIRY_SECS: u64 = 7 * 24 * 3600;
