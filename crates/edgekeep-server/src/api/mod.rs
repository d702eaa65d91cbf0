//! HTTP handlers: one module per resource, each a thin layer over
//! [`Manager`], plus the extractors they share.

mod agent;
mod backup;
mod jobs;
mod projects;
mod tokens;

use std::sync::Arc;
use std::time::Instant;

use axum::Json;
use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, RawPathParams, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use edgekeep_api::{Device, Envelope};
use http::request::Parts;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument;

use crate::auth::Caller;
use crate::error::{Error, Result};
use crate::service::Manager;

pub type AppState = Arc<Manager>;

/// Builds the router of the REST API and the agent protocol.
pub fn router(manager: Arc<Manager>) -> Router {
    let routes = Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .merge(backup::router())
        .merge(projects::router())
        .merge(jobs::router())
        .merge(tokens::router())
        .merge(agent::router())
        .fallback(not_found)
        .layer(axum::middleware::from_fn(log_request))
        .with_state(manager);
    // axum adds the `Allow` header outside a route's layers, so the 405
    // rewrite wraps the whole router to see it.
    Router::new()
        .fallback_service(routes)
        .layer(axum::middleware::from_fn(method_not_allowed_envelope))
}

/// Returns `"ok"` once a trivial query on the metadata store succeeds, so
/// a broken store shows here as a 500.
async fn healthz(
    axum::extract::State(manager): axum::extract::State<AppState>,
) -> Result<Json<Envelope<&'static str>>> {
    manager.store.admin_token_exists().await?;
    Ok(Json(Envelope::ok("ok")))
}

/// Gives axum's bare 405 responses the JSON envelope, with a message that
/// names the allowed methods from the `Allow` header.
async fn method_not_allowed_envelope(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    if response.status() != http::StatusCode::METHOD_NOT_ALLOWED {
        return response;
    }
    let allow = response.headers().get(http::header::ALLOW).cloned();
    let allowed = allow
        .as_ref()
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
        .to_string();
    let message = format!("method {method} is not allowed on {path}; use one of: {allowed}");
    let body = Envelope::<()>::error(http::StatusCode::METHOD_NOT_ALLOWED.as_u16(), message);
    let mut enveloped = (http::StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response();
    if let Some(allow) = allow {
        enveloped.headers_mut().insert(http::header::ALLOW, allow);
    }
    enveloped
}

async fn not_found(request: Request) -> Error {
    Error::NotFound(format!(
        "no endpoint {} {}; see the API reference",
        request.method(),
        request.uri().path()
    ))
}

/// Runs each request in a span with its method and route, and logs one line
/// with the status and duration. The query string is left out because
/// pre-signed values could appear there.
async fn log_request(request: Request, next: Next) -> Response {
    let method = request.method().clone();
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_string(),
        |p| p.as_str().to_string(),
    );
    let span = tracing::info_span!("request", %method, route);
    let started = Instant::now();
    let response = next.run(request).instrument(span).await;
    let status = response.status().as_u16();
    let duration_ms = started.elapsed().as_millis() as u64;
    if response.status().is_server_error() {
        tracing::warn!(%method, route, status, duration_ms, "request");
    } else {
        tracing::info!(%method, route, status, duration_ms, "request");
    }
    response
}

/// Wraps content in a 200 envelope.
pub fn ok<T: Serialize>(content: T) -> Json<Envelope<T>> {
    Json(Envelope::ok(content))
}

/// Builds a 200 envelope with `null` content and the job id header.
pub fn job_started(job_id: i64) -> Response {
    (
        [(edgekeep_api::JOB_ID_HEADER, job_id.to_string())],
        Json(Envelope::empty()),
    )
        .into_response()
}

/// Parses a JSON request body, naming the problem on failure.
pub fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T> {
    serde_json::from_slice(body)
        .map_err(|e| Error::BadRequest(format!("invalid JSON request body: {e}")))
}

/// Reads a numeric path parameter.
pub fn path_id(params: &RawPathParams, name: &'static str) -> Result<i64> {
    let value = params
        .iter()
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
        .ok_or(Error::BadRequest(format!("missing path parameter {name}")))?;
    value.parse().map_err(|_| {
        Error::BadRequest(format!(
            "invalid path parameter {name} {value:?}: expected an integer"
        ))
    })
}

/// Query parameters, parsed by hand so every error names the parameter.
pub struct Params(Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for Params {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self> {
        let query = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            .map_err(|e| Error::BadRequest(format!("invalid query string: {e}")))?;
        // A repeated parameter is ambiguous, so it is rejected instead of
        // silently using one of its values.
        for (index, (key, _)) in query.0.iter().enumerate() {
            if query.0[..index].iter().any(|(earlier, _)| earlier == key) {
                return Err(Error::BadRequest(format!(
                    "query parameter {key} is repeated; give it once"
                )));
            }
        }
        Ok(Params(query.0))
    }
}

impl Params {
    pub fn optional_str(&self, name: &'static str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    pub fn str(&self, name: &'static str) -> Result<&str> {
        self.optional_str(name)
            .filter(|v| !v.is_empty())
            .ok_or(Error::MissingParameter(name))
    }

    pub fn optional_i64(&self, name: &'static str) -> Result<Option<i64>> {
        match self.optional_str(name).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(value) => value.parse().map(Some).map_err(|_| {
                Error::BadRequest(format!(
                    "invalid query parameter {name} {value:?}: expected an integer"
                ))
            }),
        }
    }

    pub fn i64(&self, name: &'static str) -> Result<i64> {
        self.optional_i64(name)?
            .ok_or(Error::MissingParameter(name))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let token = parts
            .headers
            .get(edgekeep_api::AUTH_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok());
        state.authenticate(token).await
    }
}

/// The device behind an agent protocol call.
pub struct AgentDevice(pub Device);

impl FromRequestParts<AppState> for AgentDevice {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self> {
        let credential = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        state.authenticate_device(credential).await.map(AgentDevice)
    }
}
