//! Restoring an archive onto the state folder: verify, check compatibility,
//! stage, swap atomically, and roll back on any failure.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use edgekeep_archive::{ArchivePath, FORMAT_VERSION, Manifest, Progress};

use crate::config::{AgentConfig, Hook};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::archive_cannot_hold;
use crate::fsutil::{copy_entry, create_parents, exchange, inode, remove_any};
use crate::home::AgentHome;
use crate::hooks::{HookContext, run_hook, run_hook_observed};
use crate::journal::{
    Journal, JournalPhase, remove_journal, run_post_restore_on_previous, swap_back_if_swapped,
};
use crate::process::HookProcess;
use crate::selection::{Class, SQLITE_SIDE_FILES, Selection, is_within};
use crate::version::compare_versions;

/// The device a restore runs on.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTarget<'a> {
    pub config: &'a AgentConfig,
    /// The state folder, as an absolute path without symlinks.
    pub state_dir: &'a Path,
    pub home: &'a AgentHome,
    pub device_uid: &'a str,
    /// True when the server marked the backup as this device's own. The
    /// backup's identity paths are restored only when this is true and the
    /// archive's source device uid is `device_uid`, because a crafted archive
    /// can carry any uid.
    pub restore_identity: bool,
    pub arch: &'a str,
    pub platform_version: &'a str,
}

/// Progress fractions of a restore, after the download.
const VERIFY_SPAN: (f64, f64) = (0.5, 0.7);
const UNPACK_SPAN: (f64, f64) = (0.7, 0.9);

/// Restores the archive at `archive` onto the target's state folder for job
/// `job_id`.
///
/// Nothing in the state changes before the archive has passed a full
/// verification, the compatibility check, the `pre_restore` hook, unpacking
/// and a check of the staged tree. A failure before the swap deletes the
/// staging folder and the journal. A failure of `post_restore`, or `cancelled` turning true
/// before it runs, swaps the old state back. After a swap the journal is
/// left in phase `committed` or `rolled_back` for the caller to report and
/// remove.
pub fn restore_archive(
    target: RestoreTarget<'_>,
    job_id: i64,
    archive: &Path,
    cancelled: &AtomicBool,
    progress: &mut dyn FnMut(f64),
) -> Result<Manifest> {
    let hook_context = HookContext {
        job_id: Some(job_id),
        state_dir: target.state_dir,
    };

    // Verify the whole file and check that it fits this device.
    let verified = edgekeep_archive::verify(archive, &mut |p| progress(scale(p, VERIFY_SPAN)))?;
    let manifest = verified.manifest;
    check_compatible(&manifest, target.arch, target.platform_version)?;
    check_cancelled(cancelled)?;

    // Journal the restore before pre_restore can stop services, so that
    // recovery after a crash starts them again.
    let staging = target.home.staging_path(job_id);
    let pre_restore = target.config.hooks.pre_restore.as_ref();
    let mut journal = Journal::staging(job_id, target.state_dir, &staging, pre_restore.is_some());
    journal.write(target.home)?;
    if let Some(hook) = pre_restore
        && let Err(err) = run_hook("pre_restore", hook, hook_context)
    {
        remove_journal(target.home)?;
        return Err(err);
    }

    // Stage the complete new state and swap it in. Any failure leaves the
    // state untouched.
    let swapped = stage(target, &manifest, archive, &staging, cancelled, progress)
        .and_then(|()| swap_in(target, &mut journal));
    if let Err(err) = swapped {
        fail_before_swap(target, &mut journal, hook_context, &err)?;
        return Err(err);
    }

    // Let post_restore decide.
    progress(0.95);
    let post = match &target.config.hooks.post_restore {
        _ if cancelled.load(Ordering::SeqCst) => Err(Error::Cancelled),
        Some(hook) => run_journaled_hook(target, hook, hook_context, &mut journal),
        None => Ok(()),
    };
    match post {
        Ok(()) => {
            journal.post_restore_done = true;
            journal.advance(target.home, JournalPhase::Committed)?;
            remove_any(&staging)?;
            tracing::info!(
                job_id,
                entries = manifest.entries.len(),
                "restore committed"
            );
            progress(1.0);
            Ok(manifest)
        }
        Err(err) => {
            roll_back(target, &mut journal, &err)?;
            run_post_restore_after_failure(target, hook_context, &mut journal)?;
            Err(err)
        }
    }
}

/// Rejects an archive this device cannot take, naming both values.
pub fn check_compatible(manifest: &Manifest, arch: &str, platform_version: &str) -> Result<()> {
    if manifest.format_version == 0 || manifest.format_version > FORMAT_VERSION {
        return Err(Error::Incompatible(format!(
            "the backup has archive format version {}, this agent reads versions 1 to \
             {FORMAT_VERSION}; upgrade the agent",
            manifest.format_version
        )));
    }
    let source = &manifest.source;
    if source.arch != arch {
        return Err(Error::Incompatible(format!(
            "the backup is from a {} device and this device is {arch}; restore a backup made on \
             a {arch} device",
            source.arch
        )));
    }
    let ordering = compare_versions(platform_version, &source.platform_version)
        .map_err(Error::Incompatible)?;
    if ordering.is_lt() {
        return Err(Error::Incompatible(format!(
            "the backup is from platform version {} and this device runs the older {}; upgrade \
             this device to {} or later first",
            source.platform_version, platform_version, source.platform_version
        )));
    }
    Ok(())
}

fn check_cancelled(cancelled: &AtomicBool) -> Result<()> {
    if cancelled.load(Ordering::SeqCst) {
        return Err(Error::Cancelled);
    }
    Ok(())
}

fn scale(progress: Progress, (from, to): (f64, f64)) -> f64 {
    let fraction = if progress.total_bytes == 0 {
        1.0
    } else {
        progress.done_bytes as f64 / progress.total_bytes as f64
    };
    from + (to - from) * fraction.clamp(0.0, 1.0)
}

/// Builds the new state in `staging` and checks it against the manifest.
fn stage(
    target: RestoreTarget<'_>,
    manifest: &Manifest,
    archive: &Path,
    staging: &Path,
    cancelled: &AtomicBool,
    progress: &mut dyn FnMut(f64),
) -> Result<()> {
    remove_any(staging)?;
    edgekeep_archive::unpack(archive, staging, &mut |p| progress(scale(p, UNPACK_SPAN)))?;
    let selection = Selection::new(target.config)?;

    // Keep what the backup does not cover, then the identity and databases.
    keep_current_entries(&selection, target.state_dir, staging, "")?;
    let keeps_identity = !restores_identity(target, manifest);
    if keeps_identity {
        keep_identity(target, staging)?;
    }
    for database in selection.databases() {
        for suffix in SQLITE_SIDE_FILES {
            remove_any(&staging.join(format!("{database}{suffix}")))?;
        }
    }
    let state_mode = std::fs::metadata(target.state_dir)
        .at("reading", target.state_dir)?
        .mode();
    std::fs::set_permissions(
        staging,
        std::fs::Permissions::from_mode(state_mode & 0o7777),
    )
    .at("setting mode of", staging)?;

    // Every manifest entry must be in place, except replaced identity paths.
    let mut expected = manifest.clone();
    if keeps_identity {
        expected
            .entries
            .retain(|entry| !is_identity(&target.config.identity, &entry.path));
    }
    edgekeep_archive::verify_tree(&expected, staging)?;
    check_cancelled(cancelled)
}

/// Decides whether the backup's identity paths replace this device's: only
/// for a backup the server marked as this device's own whose archive also
/// names this device as its source.
fn restores_identity(target: RestoreTarget<'_>, manifest: &Manifest) -> bool {
    let same_uid = manifest.source.device_uid == target.device_uid;
    if same_uid && !target.restore_identity {
        tracing::warn!(
            device_uid = target.device_uid,
            "the archive names this device as its source, but the server did not mark the \
             backup as this device's own; keeping the current identity paths"
        );
    }
    same_uid && target.restore_identity
}

fn is_identity(identity: &[String], path: &ArchivePath) -> bool {
    let path = String::from_utf8_lossy(path.as_bytes());
    identity.iter().any(|id| is_within(&path, id))
}

/// Brings the entries of the current state that the backup does not cover
/// into `staging`: copies of regular files, folders and symlinks, and hard
/// links for special files. The backup does not cover excluded and unlisted
/// paths, nor the entries it cannot hold (FIFOs, sockets, device nodes and
/// symlinks that leave the state), which a backup always skips. Where the
/// backup contains the same path, the backup's entry stays.
/// Regular files are copied rather than hard-linked, so a `post_restore`
/// hook that appends to one leaves the rollback copy as it was.
fn keep_current_entries(
    selection: &Selection,
    state_dir: &Path,
    staging: &Path,
    rel_dir: &str,
) -> Result<()> {
    let dir = state_dir.join(rel_dir);
    for entry in std::fs::read_dir(&dir).at("listing", &dir)? {
        let entry = entry.at("listing", &dir)?;
        let name = entry.file_name();
        let rel = if rel_dir.is_empty() {
            name.to_string_lossy().into_owned()
        } else {
            format!("{rel_dir}/{}", name.to_string_lossy())
        };
        let is_dir = entry.file_type().at("reading", entry.path())?.is_dir();
        match selection.classify(&rel) {
            Class::Dropped | Class::Database => {}
            Class::Backed | Class::Ancestor if is_dir => {
                keep_current_entries(selection, state_dir, staging, &rel)?;
            }
            Class::Backed | Class::Ancestor => {
                if let Some(reason) = archive_cannot_hold(&entry.path(), &rel)? {
                    tracing::debug!(path = %rel, reason = %reason, "keeping an entry no backup can hold");
                    carry_over(state_dir, staging, &rel)?;
                }
            }
            Class::Kept => carry_over(state_dir, staging, &rel)?,
        }
    }
    Ok(())
}

/// Copies or links the current state's `rel` into `staging`, unless the
/// backup already put an entry there.
fn carry_over(state_dir: &Path, staging: &Path, rel: &str) -> Result<()> {
    let to = staging.join(rel);
    if std::fs::symlink_metadata(&to).is_ok() {
        tracing::debug!(path = %rel, "the backup contains a kept path; keeping the backup's entry");
        return Ok(());
    }
    create_parents(state_dir, staging, rel)?;
    copy_entry(&state_dir.join(rel), &to)
}

/// Replaces the backup's identity paths in `staging` with copies of this
/// device's.
fn keep_identity(target: RestoreTarget<'_>, staging: &Path) -> Result<()> {
    for id in &target.config.identity {
        let staged = staging.join(id);
        remove_any(&staged)?;
        let current = target.state_dir.join(id);
        if std::fs::symlink_metadata(&current).is_ok() {
            create_parents(target.state_dir, staging, id)?;
            copy_entry(&current, &staged)?;
        }
        tracing::debug!(path = %id, "kept this device's identity path");
    }
    Ok(())
}

/// Journals the swap with the staging folder's inode, exchanges staging and
/// the state folder, and journals that the old state now sits at the
/// staging path.
fn swap_in(target: RestoreTarget<'_>, journal: &mut Journal) -> Result<()> {
    journal.staging_inode = inode(&journal.staging)?;
    journal.advance(target.home, JournalPhase::Swapping)?;
    exchange(&journal.staging, target.state_dir)?;
    journal.advance(target.home, JournalPhase::Swapped)?;
    tracing::info!(job_id = journal.job_id, "swapped the new state in");
    Ok(())
}

/// Settles a restore that failed before its swap was journaled as done:
/// swaps the old state back if the exchange happened, deletes the staging
/// folder, runs `post_restore` on the unchanged state and deletes the
/// journal. When the swap back fails, the staging folder and the journal
/// stay for recovery.
fn fail_before_swap(
    target: RestoreTarget<'_>,
    journal: &mut Journal,
    context: HookContext<'_>,
    err: &Error,
) -> Result<()> {
    swap_back_if_swapped(journal)?;
    journal.phase = JournalPhase::Staging;
    journal.staging_inode = 0;
    journal.reason = Some(err.to_string());
    if let Err(remove_err) = remove_any(&journal.staging) {
        tracing::warn!(
            job_id = journal.job_id,
            error = %remove_err,
            "deleting the staging folder failed; the next agent start deletes it"
        );
    }
    run_post_restore_after_failure(target, context, journal)?;
    remove_journal(target.home)
}

/// Runs `post_restore` with its process group recorded in the journal, so
/// recovery after a crash kills a hook that outlived the agent before it
/// swaps the old state back.
fn run_journaled_hook(
    target: RestoreTarget<'_>,
    hook: &Hook,
    context: HookContext<'_>,
    journal: &mut Journal,
) -> Result<()> {
    let result = run_hook_observed("post_restore", hook, context, &mut |pgid| {
        journal.hook = Some(HookProcess::of(pgid)?);
        journal.write(target.home)
    });
    journal.hook = None;
    result
}

/// Puts the old state back after a swap and records why.
fn roll_back(target: RestoreTarget<'_>, journal: &mut Journal, err: &Error) -> Result<()> {
    swap_back_if_swapped(journal)?;
    journal.post_restore_done = false;
    journal.reason = Some(format!("{err}; the previous state was put back"));
    journal.advance(target.home, JournalPhase::RolledBack)?;
    remove_any(&journal.staging)?;
    tracing::warn!(job_id = journal.job_id, error = %err, "restore rolled back");
    Ok(())
}

/// Runs `post_restore` on the previous state after a failed restore, so
/// services that `pre_restore` stopped start again. Its own failure is only
/// logged, and its end is journaled so recovery does not run it again.
fn run_post_restore_after_failure(
    target: RestoreTarget<'_>,
    context: HookContext<'_>,
    journal: &mut Journal,
) -> Result<()> {
    match &target.config.hooks.post_restore {
        Some(hook) => run_post_restore_on_previous(target.home, hook, context, journal),
        None => Ok(()),
    }
}
