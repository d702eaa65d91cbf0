//! The manifest: source device facts and one entry per stored path.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, corrupt};
use crate::path::{check_entry_path, check_link_target};
use crate::{ArchivePath, FORMAT_VERSION};

/// Facts about the device and agent that wrote the archive.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SourceInfo {
    pub device_uid: String,
    pub device_name: String,
    pub arch: String,
    pub platform_version: String,
    pub agent_version: String,
    pub hostname: String,
}

/// The type of a stored path. Only `File`, `Dir` and `Symlink` can be unpacked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    HardLink,
    Fifo,
    CharDevice,
    BlockDevice,
    Socket,
}

impl EntryKind {
    pub fn name(self) -> &'static str {
        match self {
            EntryKind::File => "regular file",
            EntryKind::Dir => "folder",
            EntryKind::Symlink => "symlink",
            EntryKind::HardLink => "hard link",
            EntryKind::Fifo => "FIFO",
            EntryKind::CharDevice => "character device",
            EntryKind::BlockDevice => "block device",
            EntryKind::Socket => "socket",
        }
    }
}

/// One stored path with its metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    pub path: ArchivePath,
    #[serde(rename = "type")]
    pub kind: EntryKind,
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Content length in bytes; 0 for everything but files.
    pub size: u64,
    /// Modification time in milliseconds since the Unix epoch.
    pub mtime: i64,
    /// SHA-256 of the content as 64 lowercase hex digits; files only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Target of a symlink (or of a hard link), as stored by `readlink`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<ArchivePath>,
}

/// The decoded manifest of an archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    pub format_version: u32,
    /// Creation time in milliseconds since the Unix epoch.
    pub created_at: i64,
    pub source: SourceInfo,
    pub entries: Vec<Entry>,
}

impl Manifest {
    /// Sum of the sizes of all file entries, in bytes.
    pub fn state_size(&self) -> u64 {
        self.entries
            .iter()
            .filter(|entry| entry.kind == EntryKind::File)
            .map(|entry| entry.size)
            .sum()
    }

    pub fn entry_count(&self) -> u64 {
        self.entries.len() as u64
    }

    /// Finds the entry stored under `path`.
    pub fn find(&self, path: &ArchivePath) -> Option<&Entry> {
        self.entries.iter().find(|entry| &entry.path == path)
    }

    /// Serializes the manifest to its JSON wire form.
    pub(crate) fn to_json(&self) -> Vec<u8> {
        let wire = WireManifestRef {
            format_version: self.format_version,
            created_at: self.created_at,
            compression: COMPRESSION,
            source: &self.source,
            entries: &self.entries,
        };
        serde_json::to_vec(&wire).expect("manifest types always serialize")
    }

    /// Parses the JSON wire form and checks the compression and version fields.
    pub(crate) fn from_json(bytes: &[u8]) -> Result<Manifest> {
        let wire: WireManifest = serde_json::from_slice(bytes)
            .map_err(|err| corrupt(format!("the manifest is not valid JSON: {err}")))?;
        if wire.format_version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: wire.format_version,
                supported: FORMAT_VERSION,
            });
        }
        if wire.compression != COMPRESSION {
            return Err(corrupt(format!(
                "the manifest names compression {:?}, expected {COMPRESSION:?}",
                wire.compression
            )));
        }
        Ok(Manifest {
            format_version: wire.format_version,
            created_at: wire.created_at,
            source: wire.source,
            entries: wire.entries,
        })
    }

    /// Checks every entry against the unpacking rules, so that a manifest that
    /// passes can be unpacked without writing outside the destination.
    pub(crate) fn check_safe(&self) -> Result<()> {
        let mut index_of: HashMap<&[u8], usize> = HashMap::with_capacity(self.entries.len());
        for (index, entry) in self.entries.iter().enumerate() {
            if index_of.insert(entry.path.as_bytes(), index).is_some() {
                return Err(unsafe_entry(entry, "the path appears more than once"));
            }
        }
        for (index, entry) in self.entries.iter().enumerate() {
            check_entry(entry).map_err(|reason| unsafe_entry(entry, reason))?;
            check_parents(entry, index, &index_of, &self.entries)
                .map_err(|reason| unsafe_entry(entry, reason))?;
        }
        Ok(())
    }
}

const COMPRESSION: &str = "zstd";

fn unsafe_entry(entry: &Entry, reason: impl Into<String>) -> Error {
    Error::UnsafeEntry {
        path: entry.path.clone(),
        reason: reason.into(),
    }
}

fn check_entry(entry: &Entry) -> std::result::Result<(), String> {
    check_entry_path(&entry.path)?;
    match entry.kind {
        EntryKind::File => {
            let digest = entry.sha256.as_deref().unwrap_or_default();
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("the SHA-256 {digest:?} is not 64 hex digits"));
            }
        }
        EntryKind::Dir => {}
        EntryKind::Symlink => {
            let target = entry
                .link_target
                .as_ref()
                .ok_or("the symlink has no target")?;
            check_link_target(&entry.path, target)?;
        }
        other => return Err(format!("{} entries are not restored", other.name())),
    }
    if entry.kind != EntryKind::File && entry.size != 0 {
        return Err(format!("a {} has size {}", entry.kind.name(), entry.size));
    }
    if entry.mode & !0o7777 != 0 {
        return Err(format!("mode {:o} has bits beyond 0o7777", entry.mode));
    }
    Ok(())
}

/// Checks that every parent of an entry is either absent from the manifest,
/// so unpacking creates it as a plain folder, or a folder entry listed before it.
fn check_parents(
    entry: &Entry,
    index: usize,
    index_of: &HashMap<&[u8], usize>,
    entries: &[Entry],
) -> std::result::Result<(), String> {
    let bytes = entry.path.as_bytes();
    for (slash, _) in bytes.iter().enumerate().filter(|(_, b)| **b == b'/') {
        let Some(&parent_index) = index_of.get(&bytes[..slash]) else {
            continue;
        };
        let parent = &entries[parent_index];
        if parent.kind != EntryKind::Dir {
            return Err(format!(
                "its parent {} is a {}, not a folder",
                parent.path,
                parent.kind.name()
            ));
        }
        if parent_index > index {
            return Err(format!(
                "its parent folder {} is listed after it",
                parent.path
            ));
        }
    }
    Ok(())
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct WireManifestRef<'a> {
    format_version: u32,
    created_at: i64,
    compression: &'a str,
    source: &'a SourceInfo,
    entries: &'a [Entry],
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireManifest {
    format_version: u32,
    created_at: i64,
    compression: String,
    source: SourceInfo,
    entries: Vec<Entry>,
}
