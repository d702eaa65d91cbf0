//! The crate's error type and its mapping to HTTP statuses and the envelope.

use axum::Json;
use axum::response::{IntoResponse, Response};
use edgekeep_api::Envelope;
use http::StatusCode;

/// Every failure the server reports. Each variant maps to one HTTP status;
/// the message of every variant except [`Error::Internal`] goes to the client.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A required query parameter is absent.
    #[error("missing query parameter {0}")]
    MissingParameter(&'static str),
    /// A parameter, path segment or body is present but malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The token or device credential is missing, unknown, expired or revoked.
    #[error("{0}")]
    Unauthorized(String),
    /// The token is valid but does not cover the project or the operation.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The request contradicts the current state, such as a second active job
    /// on a device.
    #[error("{0}")]
    Conflict(String),
    /// An uploaded file failed validation.
    #[error("{0}")]
    Unprocessable(String),
    /// A failure inside the server: logged with its details, reported to the
    /// client as a generic message.
    #[error("internal error: {0:#}")]
    Internal(#[from] anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn internal(context: impl std::fmt::Display, error: impl std::fmt::Display) -> Self {
        Error::Internal(anyhow::anyhow!("{context}: {error}"))
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Error::MissingParameter(_) | Error::BadRequest(_) => StatusCode::BAD_REQUEST,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(error: rusqlite::Error) -> Self {
        Error::internal("metadata store query failed", error)
    }
}

impl From<object_store::Error> for Error {
    fn from(error: object_store::Error) -> Self {
        Error::internal("object storage request failed", error)
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            Error::Internal(error) => {
                tracing::error!(error = format!("{error:#}"), "request failed");
                "internal server error; the server log has the details".to_string()
            }
            other => other.to_string(),
        };
        let body = Envelope::<()>::error(status.as_u16(), message);
        (status, Json(body)).into_response()
    }
}
