//! The edgekeep device agent.
//!
//! The agent packs the device state into `.dat` archives and restores them,
//! with SQLite snapshots, hooks, a staging folder, an atomic swap, rollback
//! and a crash journal. [`run`] activates the device once and then runs the
//! jobs the server hands out over the agent protocol.

mod config;
mod error;
mod fsutil;
mod home;
mod hooks;
mod jobs;
mod journal;
mod pack;
mod process;
mod restore;
mod runner;
mod selection;
mod snapshot;
mod transfer;
mod version;

pub use config::{AgentConfig, Hook, Hooks, SqliteDatabase};
pub use error::{Error, Result};
pub use home::{AgentHome, Credential};
pub use hooks::{HookContext, run_hook};
pub use journal::{
    INTERRUPTED_BEFORE_SWAP_REASON, INTERRUPTED_REASON, Journal, JournalPhase, recover,
    remove_journal,
};
pub use pack::{PackedState, SkippedEntry, pack_state, pack_state_for_job};
pub use process::HookProcess;
pub use restore::{RestoreTarget, check_compatible, restore_archive};
pub use runner::{AgentOptions, device_facts, run, run_until};
pub use version::compare_versions;

/// Version of this agent, reported to the server and written into archives.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Exchanges two folders atomically with `renameat2(RENAME_EXCHANGE)`; the
/// restore uses it for the swap, and tests use it to replay a swap.
pub fn exchange_paths(a: &std::path::Path, b: &std::path::Path) -> Result<()> {
    fsutil::exchange(a, b)
}
