//! The edgekeep `.dat` archive format.
//!
//! An archive is a fixed header, a JSON manifest, one zstd stream with the
//! file contents back to back in manifest order, and a trailer with SHA-256
//! digests of the header and manifest and of the payload. The layout is
//! described byte by byte in `docs/ARCHIVE.md`.
//!
//! Writing streams with fixed buffers and reads every file once ([`pack`]).
//! Reading checks every digest ([`verify`]), and unpacking accepts only
//! regular files, folders and symlinks that stay inside the destination
//! ([`unpack`]).

mod collect;
mod error;
mod format;
mod manifest;
mod pack;
mod path;
mod read;
mod sys;
mod unpack;

pub use collect::{CollectedTree, collect_tree};
pub use error::{Error, Result};
pub use manifest::{Entry, EntryKind, Manifest, SourceInfo};
pub use pack::{PackItem, PackSummary, Progress, RawWriter, pack};
pub use path::ArchivePath;
pub use read::{Verified, read_manifest, verify, verify_tree};
pub use unpack::{Unpacked, unpack};

/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
