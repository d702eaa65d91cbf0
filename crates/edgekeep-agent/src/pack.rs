//! Packing the device state into a `.dat` archive.

use std::path::{Path, PathBuf};

use edgekeep_archive::{ArchivePath, PackItem, PackSummary, Progress, SourceInfo};

use crate::config::AgentConfig;
use crate::error::{Error, IoContext, Result};
use crate::hooks::{HookContext, run_hook};
use crate::selection::{Class, Selection};
use crate::snapshot::snapshot_database;

/// Packs the state folder into `out`, as [`pack_state_for_job`] does outside
/// a job and without progress.
pub fn pack_state(
    config: &AgentConfig,
    state_dir: &Path,
    source: &SourceInfo,
    work_dir: &Path,
    out: &Path,
) -> Result<PackSummary> {
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
) -> Result<PackSummary> {
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
        (Ok(summary), Ok(())) => Ok(summary),
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
) -> Result<PackSummary> {
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
    if !tree.skipped.is_empty() {
        tracing::warn!(
            count = tree.skipped.len(),
            "skipped entries the archive cannot hold"
        );
    }
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
        "packed the state"
    );
    Ok(summary)
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
