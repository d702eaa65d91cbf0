//! Projects and their devices.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawPathParams, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use edgekeep_api::{CreateDevice, CreateProject};

use super::{AppState, ok, parse_body, path_id};
use crate::auth::Caller;
use crate::error::Result;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/projects", post(create_project).get(list_projects))
        .route(
            "/api/v1/projects/{projectId}/devices",
            post(create_device).get(list_devices),
        )
        .route(
            "/api/v1/projects/{projectId}/devices/{deviceId}",
            get(device),
        )
        .route(
            "/api/v1/projects/{projectId}/devices/{deviceId}/activation-code",
            post(new_activation_code),
        )
}

async fn create_project(
    State(manager): State<AppState>,
    caller: Caller,
    body: Bytes,
) -> Result<Response> {
    let request: CreateProject = parse_body(&body)?;
    Ok(ok(manager.create_project(&caller, &request.name).await?).into_response())
}

async fn list_projects(State(manager): State<AppState>, caller: Caller) -> Result<Response> {
    Ok(ok(manager.list_projects(&caller).await?).into_response())
}

async fn create_device(
    State(manager): State<AppState>,
    caller: Caller,
    params: RawPathParams,
    body: Bytes,
) -> Result<Response> {
    let project_id = path_id(&params, "projectId")?;
    let request: CreateDevice = parse_body(&body)?;
    let activation = manager
        .create_device(&caller, project_id, &request.name)
        .await?;
    Ok(ok(activation).into_response())
}

async fn list_devices(
    State(manager): State<AppState>,
    caller: Caller,
    params: RawPathParams,
) -> Result<Response> {
    let project_id = path_id(&params, "projectId")?;
    Ok(ok(manager.list_devices(&caller, project_id).await?).into_response())
}

async fn device(
    State(manager): State<AppState>,
    caller: Caller,
    params: RawPathParams,
) -> Result<Response> {
    let project_id = path_id(&params, "projectId")?;
    let device_id = path_id(&params, "deviceId")?;
    Ok(ok(manager.device(&caller, project_id, device_id).await?).into_response())
}

async fn new_activation_code(
    State(manager): State<AppState>,
    caller: Caller,
    params: RawPathParams,
) -> Result<Response> {
    let project_id = path_id(&params, "projectId")?;
    let device_id = path_id(&params, "deviceId")?;
    let activation = manager
        .new_activation_code(&caller, project_id, device_id)
        .await?;
    Ok(ok(activation).into_response())
}
