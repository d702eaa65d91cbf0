//! The agent protocol, version 1, under `/agent/v1/`.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawPathParams, State};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use edgekeep_api::Envelope;
use edgekeep_api::agent::{
    ActivateRequest, DeviceFacts, JobResult, PROTOCOL_HEADER, PROTOCOL_VERSION, ProgressReport,
};
use http::HeaderMap;

use super::{AgentDevice, AppState, Params, ok, parse_body, path_id};
use crate::error::{Error, Result};

/// Wait of a long poll that names none.
const DEFAULT_WAIT_SECS: u64 = 25;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/agent/v1/activate", post(activate))
        .route("/agent/v1/jobs/next", post(next_job))
        .route("/agent/v1/jobs/{jobId}/progress", post(progress))
        .route("/agent/v1/jobs/{jobId}/result", post(result))
}

/// Rejects agents that speak another protocol version. Agents that send no
/// version header are taken to speak version 1.
fn check_protocol(headers: &HeaderMap) -> Result<()> {
    let Some(value) = headers.get(PROTOCOL_HEADER) else {
        return Ok(());
    };
    let version = value.to_str().unwrap_or("");
    if version == PROTOCOL_VERSION.to_string() {
        Ok(())
    } else {
        Err(Error::BadRequest(format!(
            "unsupported agent protocol version {version:?} in {PROTOCOL_HEADER}: this server \
             speaks version {PROTOCOL_VERSION}; install a matching agent"
        )))
    }
}

async fn activate(
    State(manager): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response> {
    check_protocol(&headers)?;
    let request: ActivateRequest = parse_body(&body)?;
    Ok(ok(manager.activate(&request).await?).into_response())
}

async fn next_job(
    State(manager): State<AppState>,
    headers: HeaderMap,
    AgentDevice(device): AgentDevice,
    params: Params,
    body: Bytes,
) -> Result<Response> {
    check_protocol(&headers)?;
    let wait_secs = match params.optional_str("waitSecs").filter(|v| !v.is_empty()) {
        None => DEFAULT_WAIT_SECS,
        Some(value) => value.parse().map_err(|_| {
            Error::BadRequest(format!(
                "invalid query parameter waitSecs {value:?}: expected a number of seconds"
            ))
        })?,
    };
    let last_received_job_id = params.optional_i64("lastJobId")?;
    let facts: Option<DeviceFacts> = if body.is_empty() {
        None
    } else {
        Some(parse_body(&body)?)
    };
    let job = manager
        .next_job(&device, facts.as_ref(), wait_secs, last_received_job_id)
        .await?;
    Ok(Json(Envelope {
        code: "200".to_string(),
        message: None,
        content: job,
    })
    .into_response())
}

async fn progress(
    State(manager): State<AppState>,
    AgentDevice(device): AgentDevice,
    params: RawPathParams,
    body: Bytes,
) -> Result<Response> {
    let job_id = path_id(&params, "jobId")?;
    let report: ProgressReport = parse_body(&body)?;
    Ok(ok(manager.report_progress(&device, job_id, &report).await?).into_response())
}

async fn result(
    State(manager): State<AppState>,
    AgentDevice(device): AgentDevice,
    params: RawPathParams,
    body: Bytes,
) -> Result<Response> {
    let job_id = path_id(&params, "jobId")?;
    let result: JobResult = parse_body(&body)?;
    manager.report_result(&device, job_id, &result).await?;
    Ok(Json(Envelope::empty()).into_response())
}
