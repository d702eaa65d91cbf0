//! The crash journal of a restore, and recovery from it on start.
//!
//! The journal is written with fsync before `pre_restore` runs, before the
//! state folder is swapped and after each later step. An agent that stops at
//! any point finds out on start whether the state is the old or the new tree.
//! It puts the old one back unless the restore had committed. Then it runs
//! `post_restore` on it when `pre_restore` may have stopped services.

use std::path::{Path, PathBuf};

use edgekeep_api::agent::JobResult;
use serde::{Deserialize, Serialize};

use crate::config::Hook;
use crate::error::{Error, Result};
use crate::fsutil::{exchange, inode, remove_any, write_atomic};
use crate::home::AgentHome;
use crate::hooks::{HookContext, run_hook_observed};
use crate::process::HookProcess;

/// Version of the journal file layout. Version 2 added the `staging` phase
/// and the `preRestoreStarted` and `postRestoreDone` fields. A version 1
/// journal reads with both fields false, so its recovery runs no
/// `post_restore`, as version 1 agents did.
const JOURNAL_VERSION: u32 = 2;

/// Oldest journal version this agent reads.
const OLDEST_JOURNAL_VERSION: u32 = 1;

/// Reason reported for a restore that the agent's stop interrupted after the
/// swap.
pub const INTERRUPTED_REASON: &str =
    "the agent stopped during the restore; the previous state was put back";

/// Reason reported for a restore that the agent's stop interrupted before
/// the swap.
pub const INTERRUPTED_BEFORE_SWAP_REASON: &str = "the agent stopped during the restore, before the new state was swapped in; the state was \
     not changed";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalPhase {
    /// `pre_restore` runs or has run, and the new state is being built in
    /// the staging folder. The state folder is unchanged.
    Staging,
    /// The staging folder is complete and the swap may have happened.
    Swapping,
    /// The new state is in place; the old one sits at the staging path.
    Swapped,
    /// The restore succeeded; only the rollback copy is left to delete.
    Committed,
    /// The old state is back in place; only the staging folder is left to
    /// delete.
    RolledBack,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Journal {
    pub version: u32,
    pub job_id: i64,
    pub phase: JournalPhase,
    pub state_dir: PathBuf,
    pub staging: PathBuf,
    /// Inode of the staging folder before the swap: when the state folder
    /// has it, the swap happened.
    pub staging_inode: u64,
    /// Reason the restore was rolled back.
    pub reason: Option<String>,
    /// The `post_restore` hook's process group while the hook runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<HookProcess>,
    /// True once `pre_restore` may have stopped services. It is written
    /// before the hook starts, so a hook that a crash cut short counts.
    #[serde(default)]
    pub pre_restore_started: bool,
    /// True once `post_restore` has run to its end on the state now in the
    /// state folder, whether it succeeded or not.
    #[serde(default)]
    pub post_restore_done: bool,
}

impl Journal {
    /// Creates the journal of a restore that is about to swap: phase
    /// `swapping`, with the inode of the complete staging folder.
    pub fn new(job_id: i64, state_dir: &Path, staging: &Path, staging_inode: u64) -> Self {
        Journal {
            staging_inode,
            phase: JournalPhase::Swapping,
            ..Journal::staging(job_id, state_dir, staging, false)
        }
    }

    /// Creates the journal of a restore that starts to stage: phase
    /// `staging`, before `pre_restore` runs.
    pub fn staging(
        job_id: i64,
        state_dir: &Path,
        staging: &Path,
        pre_restore_started: bool,
    ) -> Self {
        Journal {
            version: JOURNAL_VERSION,
            job_id,
            phase: JournalPhase::Staging,
            state_dir: state_dir.to_path_buf(),
            staging: staging.to_path_buf(),
            // No swap can have happened before the staging folder is
            // complete, and no folder has inode 0.
            staging_inode: 0,
            reason: None,
            hook: None,
            pre_restore_started,
            post_restore_done: false,
        }
    }

    /// Writes the journal durably.
    pub fn write(&self, home: &AgentHome) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(self).expect("a journal serializes");
        write_atomic(&home.journal_path(), &bytes, 0o600)
    }

    /// Moves to `phase` and writes the journal durably.
    pub fn advance(&mut self, home: &AgentHome, phase: JournalPhase) -> Result<()> {
        self.phase = phase;
        self.write(home)
    }

    pub fn read(home: &AgentHome) -> Result<Option<Journal>> {
        let path = home.journal_path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading journal", path, e)),
        };
        let mut journal: Journal = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Journal(format!(
                "restore journal {} is unreadable ({e}); check the state folder by hand, then \
                 delete the journal",
                path.display()
            ))
        })?;
        if !(OLDEST_JOURNAL_VERSION..=JOURNAL_VERSION).contains(&journal.version) {
            return Err(Error::Journal(format!(
                "restore journal {} has version {}, this agent reads versions \
                 {OLDEST_JOURNAL_VERSION} to {JOURNAL_VERSION}; run the agent version that wrote it",
                path.display(),
                journal.version
            )));
        }
        // Later writes use the current layout, which has every field.
        journal.version = JOURNAL_VERSION;
        Ok(Some(journal))
    }

    /// Builds the result to report for this journal's job once it is settled.
    pub fn result(&self) -> JobResult {
        let ok = self.phase == JournalPhase::Committed;
        JobResult {
            ok,
            reason: (!ok).then(|| {
                self.reason
                    .clone()
                    .unwrap_or_else(|| INTERRUPTED_REASON.to_string())
            }),
            size: None,
            checksum: None,
        }
    }
}

/// Deletes the journal once its job's result is reported.
pub fn remove_journal(home: &AgentHome) -> Result<()> {
    remove_any(&home.journal_path())?;
    crate::fsutil::sync_dir(home.dir())
}

/// Swaps the old state back if the new one is in place, per the inode the
/// journal recorded.
pub(crate) fn swap_back_if_swapped(journal: &Journal) -> Result<()> {
    if inode(&journal.state_dir)? == journal.staging_inode {
        exchange(&journal.staging, &journal.state_dir)?;
        tracing::info!(job_id = journal.job_id, "put the previous state back");
    }
    Ok(())
}

/// Runs `post_restore` on the previous state, which is back in the state
/// folder, so services that `pre_restore` stopped start again. The hook's
/// process group is journaled while it runs, and its end is journaled as
/// `postRestoreDone`. A failure of the hook is only logged. Returns an error
/// only when the journal cannot be written.
pub(crate) fn run_post_restore_on_previous(
    home: &AgentHome,
    hook: &Hook,
    context: HookContext<'_>,
    journal: &mut Journal,
) -> Result<()> {
    let run = run_hook_observed("post_restore", hook, context, &mut |pgid| {
        journal.hook = Some(HookProcess::of(pgid)?);
        journal.write(home)
    });
    if let Err(err) = run {
        tracing::warn!(
            job_id = journal.job_id,
            error = %err,
            "post_restore hook failed on the previous state"
        );
    }
    journal.hook = None;
    journal.post_restore_done = true;
    journal.write(home)
}

/// Settles an interrupted restore before the agent polls for jobs.
///
/// A `post_restore` hook the journal records is killed with its process
/// group first. `swapping` and `swapped` then put the old state back when the
/// swap happened, and `staging` leaves the unchanged state as it is. Every
/// phase then deletes the staging or rollback folder. When `pre_restore` had
/// started and `post_restore` has not run to its end on the state now in
/// place, `post_restore` (if configured) runs on it once. The journal is
/// left in phase `committed` or `rolled_back` and returned, so the caller
/// reports its [`Journal::result`] and then calls [`remove_journal`]. Running
/// this again on its own output changes nothing.
pub fn recover(
    home: &AgentHome,
    state_dir: &Path,
    post_restore: Option<&Hook>,
) -> Result<Option<Journal>> {
    let Some(mut journal) = Journal::read(home)? else {
        return Ok(None);
    };
    if journal.state_dir != state_dir {
        return Err(Error::Journal(format!(
            "restore journal {} is for state folder {}, not {}; start the agent with \
             --state-dir {}",
            home.journal_path().display(),
            journal.state_dir.display(),
            state_dir.display(),
            journal.state_dir.display()
        )));
    }
    tracing::warn!(job_id = journal.job_id, phase = ?journal.phase, "found an unfinished restore");

    // A hook that outlived the previous agent must not run on the state
    // after it is swapped back.
    if let Some(hook) = journal.hook.take() {
        hook.kill_group();
    }

    // Make the state whole: the old tree, unless the restore committed.
    match journal.phase {
        JournalPhase::Staging => {
            let reason = journal
                .reason
                .get_or_insert_with(|| INTERRUPTED_BEFORE_SWAP_REASON.to_string());
            tracing::info!(job_id = journal.job_id, reason = %reason, "the state was not swapped");
            journal.advance(home, JournalPhase::RolledBack)?;
        }
        JournalPhase::Swapping | JournalPhase::Swapped => {
            swap_back_if_swapped(&journal)?;
            journal.reason = Some(INTERRUPTED_REASON.to_string());
            // Any post_restore run so far was on the new state.
            journal.post_restore_done = false;
            journal.advance(home, JournalPhase::RolledBack)?;
        }
        JournalPhase::Committed | JournalPhase::RolledBack => {}
    }
    remove_any(&journal.staging)?;

    // Start what pre_restore stopped, on the state now in place.
    let needs_post_restore = journal.phase == JournalPhase::RolledBack
        && journal.pre_restore_started
        && !journal.post_restore_done;
    if let Some(hook) = post_restore.filter(|_| needs_post_restore) {
        tracing::info!(
            job_id = journal.job_id,
            "running post_restore on the previous state"
        );
        let context = HookContext {
            job_id: Some(journal.job_id),
            state_dir,
        };
        run_post_restore_on_previous(home, hook, context, &mut journal)?;
    }
    Ok(Some(journal))
}
