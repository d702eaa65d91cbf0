//! The crate's error type.

use std::io;
use std::path::PathBuf;

use crate::ArchivePath;

/// Errors from packing, reading, verifying and unpacking `.dat` archives.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing `path` failed.
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The archive is damaged, truncated or not an edgekeep archive.
    #[error("{reason}; fetch the archive again or use another backup")]
    Corrupt { reason: String },

    /// The archive was written in a format version this build cannot read.
    #[error(
        "archive format version {found} is not supported (this build reads version \
         {supported}); use an edgekeep release that reads version {found}"
    )]
    UnsupportedVersion { found: u32, supported: u32 },

    /// An entry would write outside the destination or is of a rejected type.
    #[error("unsafe entry {path}: {reason}; archives with such entries are never unpacked")]
    UnsafeEntry { path: ArchivePath, reason: String },

    /// A file changed size between the walk and the read while packing.
    #[error(
        "{path} changed size while it was packed ({expected} bytes expected, {found} read); \
         stop the programs that write it, for example with a pre-backup hook, and pack again"
    )]
    Changed {
        path: PathBuf,
        expected: u64,
        found: u64,
    },

    /// An item passed to `pack` cannot be stored.
    #[error("cannot pack {path}: {reason}")]
    Unsupported { path: PathBuf, reason: String },

    /// The unpack destination exists and is not an empty folder.
    #[error("destination {path} is not empty; unpack into a new or empty folder")]
    DestinationNotEmpty { path: PathBuf },

    /// An unpacked tree differs from its manifest.
    #[error("{path} does not match the manifest: {reason}")]
    Mismatch { path: PathBuf, reason: String },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// Builds a closure that wraps an `io::Error` with the path it concerns.
pub(crate) fn io_at(path: impl Into<PathBuf>) -> impl FnOnce(io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

pub(crate) fn corrupt(reason: impl Into<String>) -> Error {
    Error::Corrupt {
        reason: reason.into(),
    }
}
