//! API tokens; every call needs the administrator token.

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{RawPathParams, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post};
use edgekeep_api::{CreateToken, Envelope};

use super::{AppState, ok, parse_body, path_id};
use crate::auth::Caller;
use crate::error::Result;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/tokens", post(create).get(list))
        .route("/api/v1/tokens/{tokenId}", delete(revoke))
}

async fn create(State(manager): State<AppState>, caller: Caller, body: Bytes) -> Result<Response> {
    let request: CreateToken = parse_body(&body)?;
    Ok(ok(manager.create_token(&caller, &request).await?).into_response())
}

async fn list(State(manager): State<AppState>, caller: Caller) -> Result<Response> {
    Ok(ok(manager.list_tokens(&caller).await?).into_response())
}

async fn revoke(
    State(manager): State<AppState>,
    caller: Caller,
    params: RawPathParams,
) -> Result<Response> {
    let token_id = path_id(&params, "tokenId")?;
    manager.revoke_token(&caller, token_id).await?;
    Ok(Json(Envelope::empty()).into_response())
}
