//! Packing the device state into a `.dat` archive.

use std::path::{Path, PathBuf};

use edgekeep_archive::{ArchivePath, PackItem, PackSummary, Progress, SourceInfo};

use crate::config::AgentConfig;
use crate::error::{Error, IoContext, Result};
use crate::hooks::{HookContext, run_hook};
use crate::selection::{Class, Selection};
use crate::snapshot::snapshot_database;

/// Skipped entries named in the log; the rest are only counted.
const LOGGED_SKIPS: usize = 20;

/// Skipped entries named in a progress message.
const MESSAGE_SKIPS: usize = 5;

/// The outcome of packing the state.
#[derive(Debug, Clone)]
pub struct PackedState {
    pub summary: PackSummary,
    /// Entries the archive cannot hold, left out of the backup. A restore
    /// keeps this device's current copies of them.
    pub skipped: Vec<SkippedEntry>,
}

/// An entry of the state that the backup left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedEntry {
    /// Path relative to the state folder.
    pub path: String,
    pub reason: String,
}

impl PackedState {
    /// Builds a one-line note on the skipped entries for the job's progress
    /// message, naming the first few; `None` when nothing was skipped.
    pub fn skipped_note(&self) -> Option<String> {
        if self.skipped.is_empty() {
            return None;
        }
        let names: Vec<&str> = self
            .skipped
            .iter()
            .take(MESSAGE_SKIPS)
            .map(|entry| entry.path.as_str())
            .collect();
        let more = self.skipped.len().saturating_sub(MESSAGE_SKIPS);
        let tail = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        let noun = if self.skipped.len() == 1 {
            "entry"
        } else {
            "entries"
        };
        Some(format!(
            "left out {} {noun} the archive cannot hold (kept on restore): {}{tail}",
            self.skipped.len(),
            names.join(", ")
        ))
    }
}

/// Packs the state folder into `out`, as [`pack_state_for_job`] does outside
/// a job and without progress.
pub fn pack_state(
    config: &AgentConfig,
    state_dir: &Path,
    source: &SourceInfo,
    work_dir: &Path,
    out: &Path,
) -> Result<PackedState> {
    pack_state_for_job(config, state_dir, source, work_dir, out, None, &mut |_| {})
}

/// Runs the `pre_backup` hook, packs the state folder into `out` and runs the
/// `post_backup` hook, also when packing failed.
///
/// The archive contains the include paths minus the exclusions, the configured
/// SQLite databases as snapshots taken into `work_dir`, and none of the
/// databases' `-wal`, `-shm` or `-journal` files.
pub fn pack_state_for_job(
    config: &AgentConfig,
    state_dir: &Path,
    source: &SourceInfo,
    work_dir: &Path,
    out: &Path,
    job_id: Option<i64>,
    progress: &mut dyn FnMut(Progress),
) -> Result<PackedState> {
    let context = HookContext { job_id, state_dir };
    if let Some(hook) = &config.hooks.pre_backup {
        run_hook("pre_backup", hook, context)?;
    }
    let packed = pack_without_hooks(config, state_dir, source, work_dir, out, progress);
    let post = match &config.hooks.post_backup {
        Some(hook) => run_hook("post_backup", hook, context),
        None => Ok(()),
    };
    match (packed, post) {
        (Ok(packed), Ok(())) => Ok(packed),
        (Err(pack_err), Ok(())) => Err(pack_err),
        (Ok(_), Err(hook_err)) => Err(hook_err),
        (Err(pack_err), Err(hook_err)) => Err(Error::Hook(format!(
            "{pack_err}; then the post_backup hook failed too: {hook_err}"
        ))),
    }
}

fn pack_without_hooks(
    config: &AgentConfig,
    state_dir: &Path,
    source: &SourceInfo,
    work_dir: &Path,
    out: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<PackedState> {
    let selection = Selection::new(config)?;
    check_includes_exist(&selection, state_dir)?;

    // Paths of the agent's own files, when they sit inside the state folder.
    let own_paths: Vec<String> = [work_dir, out]
        .iter()
        .filter_map(|path| relative_to(state_dir, path))
        .collect();

    // Walk the state, leaving out everything a restore keeps or drops.
    let exclude = |path: &ArchivePath, _is_dir: bool| {
        let path = String::from_utf8_lossy(path.as_bytes());
        if own_paths
            .iter()
            .any(|own| crate::selection::is_within(&path, own))
        {
            return true;
        }
        !matches!(selection.classify(&path), Class::Backed | Class::Ancestor)
    };
    let tree = edgekeep_archive::collect_tree(state_dir, &exclude)?;
    let skipped: Vec<SkippedEntry> = tree
        .skipped
        .into_iter()
        .map(|(path, reason)| SkippedEntry {
            path: String::from_utf8_lossy(path.as_bytes()).into_owned(),
            reason,
        })
        .collect();
    log_skipped(&skipped);
    let mut items = tree.items;

    // Snapshot each database and pack the copy under the database's path.
    let snapshots = tempfile::Builder::new()
        .prefix("sqlite-")
        .tempdir_in(work_dir)
        .at("creating snapshot folder in", work_dir)?;
    for (index, database) in selection.databases().iter().enumerate() {
        let live = state_dir.join(database);
        if !live.is_file() {
            return Err(Error::MissingDatabase(database.clone()));
        }
        let copy = snapshots.path().join(format!("{index}.db"));
        snapshot_database(&live, &copy)?;
        tracing::debug!(database = %database, "took SQLite snapshot");
        items.push(PackItem {
            path: ArchivePath::from(database.as_str()),
            source: copy,
        });
    }
    items.sort_by(|a, b| a.path.cmp(&b.path));

    let summary = edgekeep_archive::pack(&items, source, out, progress)?;
    tracing::info!(
        entries = summary.entry_count,
        file_size = summary.file_size,
        skipped = skipped.len(),
        "packed the state"
    );
    Ok(PackedState { summary, skipped })
}

/// Logs the first skipped entries by name at warn, then the count of the
/// others.
fn log_skipped(skipped: &[SkippedEntry]) {
    for entry in skipped.iter().take(LOGGED_SKIPS) {
        tracing::warn!(path = %entry.path, reason = %entry.reason, "left an entry the archive cannot hold out of the backup");
    }
    if skipped.len() > LOGGED_SKIPS {
        tracing::warn!(
            count = skipped.len() - LOGGED_SKIPS,
            "left more entries the archive cannot hold out of the backup"
        );
    }
}

fn check_includes_exist(selection: &Selection, state_dir: &Path) -> Result<()> {
    for include in selection.include_paths().unwrap_or_default() {
        if std::fs::symlink_metadata(state_dir.join(include)).is_err() {
            return Err(Error::MissingInclude(include.clone()));
        }
    }
    Ok(())
}

/// `path` relative to `root` with `/` separators, when it lies below `root`.
fn relative_to(root: &Path, path: &Path) -> Option<String> {
    let root = root.canonicalize().ok()?;
    let path = absolute_parent_resolved(path)?;
    let rel = path.strip_prefix(&root).ok()?;
    Some(rel.to_string_lossy().into_owned())
}

/// Canonicalizes `path`, or its parent when `path` does not exist yet.
fn absolute_parent_resolved(path: &Path) -> Option<PathBuf> {
    if let Ok(path) = path.canonicalize() {
        return Some(path);
    }
    let parent = path.parent()?.canonicalize().ok()?;
    Some(parent.join(path.file_name()?))
}
