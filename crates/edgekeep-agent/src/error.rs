//! The error type of the agent.

use std::path::PathBuf;

/// Everything that can make an agent step fail. The messages name the value
/// that failed and, where there is one, the next step for the operator.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid agent config {path}: {message}")]
    Config { path: PathBuf, message: String },

    #[error("{context} {path}: {source}")]
    Io {
        context: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "include path {0} does not exist in the state folder; create it or remove it from include"
    )]
    MissingInclude(String),

    #[error(
        "sqlite.path {0} is not a file in the state folder; create the database or remove it from the config"
    )]
    MissingDatabase(String),

    #[error("SQLite snapshot of {path} failed: {source}")]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },

    #[error("archive: {0}")]
    Archive(#[from] edgekeep_archive::Error),

    #[error("{0}")]
    Hook(String),

    #[error("{0}")]
    Incompatible(String),

    #[error("{0}")]
    Transfer(String),

    #[error("{0}")]
    Credential(String),

    #[error(
        "invalid server list {0:?}: expected one or more base URLs separated by commas, such as \
         http://10.0.0.5:8080,http://10.0.0.6:8080"
    )]
    ServerList(String),

    #[error(
        "invalid server URL {entry:?} in the server list: {reason}; give each server as \
         http://HOST:PORT or https://HOST:PORT, separated by commas"
    )]
    ServerUrl { entry: String, reason: String },

    #[error("{0}")]
    Journal(String),

    #[error("the job was cancelled")]
    Cancelled,

    #[error("server: {0}")]
    Api(#[from] edgekeep_api::ApiError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(
        context: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Error::Io {
            context,
            path: path.into(),
            source,
        }
    }
}

/// Adds the failed operation and path to an `std::io::Result`.
pub(crate) trait IoContext<T> {
    fn at(self, context: &'static str, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, context: &'static str, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|e| Error::io(context, path, e))
    }
}
