//! The crash journal of a restore, and recovery from it on start.
//!
//! The journal is written with fsync before the state folder is swapped and
//! after each later step, so an agent that stops at any point finds out on
//! start whether the state is the old or the new tree, and puts the old
//! one back unless the restore had committed.

use std::path::{Path, PathBuf};

use edgekeep_api::agent::JobResult;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fsutil::{exchange, inode, remove_any, write_atomic};
use crate::home::AgentHome;
use crate::process::HookProcess;

/// Version of the journal file layout.
const JOURNAL_VERSION: u32 = 1;

/// Reason reported for a restore that the agent's stop interrupted.
pub const INTERRUPTED_REASON: &str =
    "the agent stopped during the restore; the previous state was put back";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalPhase {
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
}

impl Journal {
    pub fn new(job_id: i64, state_dir: &Path, staging: &Path, staging_inode: u64) -> Self {
        Journal {
            version: JOURNAL_VERSION,
            job_id,
            phase: JournalPhase::Swapping,
            state_dir: state_dir.to_path_buf(),
            staging: staging.to_path_buf(),
            staging_inode,
            reason: None,
            hook: None,
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
        let journal: Journal = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Journal(format!(
                "restore journal {} is unreadable ({e}); check the state folder by hand, then \
                 delete the journal",
                path.display()
            ))
        })?;
        if journal.version != JOURNAL_VERSION {
            return Err(Error::Journal(format!(
                "restore journal {} has version {}, this agent reads version {JOURNAL_VERSION}; \
                 run the agent version that wrote it",
                path.display(),
                journal.version
            )));
        }
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

/// Settles an interrupted restore before the agent polls for jobs.
///
/// A `post_restore` hook the journal records is killed with its process
/// group first. `swapping` and `swapped` then put the old state back when the
/// swap happened; every phase then deletes the staging or rollback folder. The journal is
/// left in phase `committed` or `rolled_back` and returned, so the caller
/// reports its [`Journal::result`] and then calls [`remove_journal`]. Running
/// this again on its own output changes nothing.
pub fn recover(home: &AgentHome, state_dir: &Path) -> Result<Option<Journal>> {
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
    match journal.phase {
        JournalPhase::Swapping | JournalPhase::Swapped => {
            swap_back_if_swapped(&journal)?;
            journal.reason = Some(INTERRUPTED_REASON.to_string());
            journal.advance(home, JournalPhase::RolledBack)?;
        }
        JournalPhase::Committed | JournalPhase::RolledBack => {}
    }
    remove_any(&journal.staging)?;
    Ok(Some(journal))
}
