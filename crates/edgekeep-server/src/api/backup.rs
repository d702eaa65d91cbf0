//! The LEM-compatible endpoints under `/api/v1/backup/`.

use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::{AppState, Params, job_started, ok};
use crate::auth::Caller;
use crate::error::Result;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/backup/init-backup", post(init_backup))
        .route("/api/v1/backup/list", get(list))
        .route("/api/v1/backup/get", post(download_url))
        .route("/api/v1/backup/put", post(upload_url))
        .route("/api/v1/backup/init-restore", post(init_restore))
}

async fn init_backup(
    State(manager): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Response> {
    let job_id = manager
        .init_backup(&caller, params.i64("projectId")?, params.i64("deviceId")?)
        .await?;
    Ok(job_started(job_id))
}

async fn list(State(manager): State<AppState>, caller: Caller, params: Params) -> Result<Response> {
    let backups = manager
        .list_backups(&caller, params.i64("projectId")?, params.i64("deviceId")?)
        .await?;
    Ok(ok(backups).into_response())
}

async fn download_url(
    State(manager): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Response> {
    let url = manager
        .download_url(
            &caller,
            params.i64("projectId")?,
            params.i64("deviceId")?,
            params.str("backupType")?,
            params.i64("timestamp")?,
        )
        .await?;
    Ok(ok(url).into_response())
}

async fn upload_url(
    State(manager): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Response> {
    let (url, job_id) = manager
        .upload_url(
            &caller,
            params.i64("projectId")?,
            params.i64("deviceId")?,
            params.str("backupType")?,
            params.optional_i64("timestamp")?,
        )
        .await?;
    let mut response = ok(url).into_response();
    response
        .headers_mut()
        .insert(edgekeep_api::JOB_ID_HEADER, http::HeaderValue::from(job_id));
    Ok(response)
}

async fn init_restore(
    State(manager): State<AppState>,
    caller: Caller,
    params: Params,
) -> Result<Response> {
    let job_id = manager
        .init_restore(
            &caller,
            params.i64("projectId")?,
            params.i64("deviceId")?,
            params.str("backupType")?,
            params.i64("timestamp")?,
            params.optional_i64("sourceDeviceId")?,
        )
        .await?;
    Ok(job_started(job_id))
}
