//! Jobs: list, show and cancel.

use axum::Router;
use axum::extract::{RawPathParams, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgekeep_api::JobState;

use super::{AppState, Params, ok, path_id};
use crate::auth::Caller;
use crate::error::{Error, Result};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/jobs", get(list))
        .route("/api/v1/jobs/{jobId}", get(show))
        .route("/api/v1/jobs/{jobId}/cancel", post(cancel))
}

async fn list(State(manager): State<AppState>, caller: Caller, params: Params) -> Result<Response> {
    let state = match params.optional_str("state").filter(|s| !s.is_empty()) {
        None => None,
        Some(value) => Some(JobState::parse(value).ok_or_else(|| {
            Error::BadRequest(format!(
                "invalid query parameter state {value:?}: expected queued, running, succeeded, \
                 failed, expired or cancelled"
            ))
        })?),
    };
    let jobs = manager
        .list_jobs(
            &caller,
            params.optional_i64("projectId")?,
            params.optional_i64("deviceId")?,
            state,
        )
        .await?;
    Ok(ok(jobs).into_response())
}

async fn show(
    State(manager): State<AppState>,
    caller: Caller,
    params: RawPathParams,
) -> Result<Response> {
    let job_id = path_id(&params, "jobId")?;
    Ok(ok(manager.job(&caller, job_id).await?).into_response())
}

async fn cancel(
    State(manager): State<AppState>,
    caller: Caller,
    params: RawPathParams,
) -> Result<Response> {
    let job_id = path_id(&params, "jobId")?;
    Ok(ok(manager.cancel_job(&caller, job_id).await?).into_response())
}
