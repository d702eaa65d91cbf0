//! Finding and killing a hook's process group after the agent restarted.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How long recovery waits for a killed hook group to exit.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// A running hook's process group, as the crash journal records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HookProcess {
    /// Process group id, which is also the pid of the hook's first process.
    pub pgid: i32,
    /// Start time of that first process in clock ticks since boot, from
    /// `/proc/PID/stat`.
    pub start_ticks: u64,
    /// Boot id from `/proc/sys/kernel/random/boot_id`.
    pub boot_id: String,
}

impl HookProcess {
    /// Records the process group led by the running process `pgid`.
    pub fn of(pgid: i32) -> Result<HookProcess> {
        let start_ticks = start_ticks(pgid).ok_or_else(|| {
            Error::Hook(format!(
                "hook process {pgid} exited before its start time could be read from /proc"
            ))
        })?;
        Ok(HookProcess {
            pgid,
            start_ticks,
            boot_id: boot_id()?,
        })
    }

    /// Kills the whole group with SIGKILL and waits up to 5 s for its
    /// members to exit. Does nothing after a reboot, or when another process
    /// now has the leader's pid.
    ///
    /// A group id stays reserved while any member lives, so when the leader
    /// has exited the id still names the hook's remaining members.
    pub fn kill_group(&self) {
        if boot_id().ok().as_deref() != Some(self.boot_id.as_str()) {
            tracing::debug!(
                pgid = self.pgid,
                "the hook group ended with the previous boot"
            );
            return;
        }
        if let Some(ticks) = start_ticks(self.pgid)
            && ticks != self.start_ticks
        {
            tracing::debug!(
                pgid = self.pgid,
                "the hook's pid belongs to another process now"
            );
            return;
        }
        // SAFETY: kill has no memory effects; the negative pid names the
        // process group the hook leads.
        let rc = unsafe { libc::kill(-self.pgid, libc::SIGKILL) };
        if rc != 0 {
            tracing::debug!(pgid = self.pgid, "the hook group had already exited");
            return;
        }
        let started = Instant::now();
        while group_has_live_members(self.pgid) {
            if started.elapsed() >= KILL_WAIT {
                tracing::warn!(
                    pgid = self.pgid,
                    "killed the hook group left by the previous agent, but it is still running \
                     after 5 s"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(
            pgid = self.pgid,
            "killed the hook group left by the previous agent"
        );
    }
}

/// Fields of `/proc/PID/stat` after the command name, which may contain
/// spaces and parentheses: state, ppid, pgrp, and so on.
fn stat_fields(pid: i32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Start time of process `pid` in clock ticks since boot, field 22 of
/// `/proc/PID/stat`.
fn start_ticks(pid: i32) -> Option<u64> {
    stat_fields(pid)?.get(19)?.parse().ok()
}

fn boot_id() -> Result<String> {
    let path = "/proc/sys/kernel/random/boot_id";
    let id = std::fs::read_to_string(path).map_err(|e| Error::io("reading", path, e))?;
    Ok(id.trim().to_string())
}

/// True while a process of group `pgid` is alive; zombies do not count.
pub(crate) fn group_has_live_members(pgid: i32) -> bool {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return false;
    };
    entries.flatten().any(|entry| {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) else {
            return false;
        };
        let Some(fields) = stat_fields(pid) else {
            return false;
        };
        let alive = !matches!(fields.first().map(String::as_str), Some("Z" | "X"));
        alive && fields.get(2).and_then(|g| g.parse().ok()) == Some(pgid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    fn sleeping_group() -> std::process::Child {
        Command::new("sleep")
            .arg("30")
            .process_group(0)
            .spawn()
            .unwrap()
    }

    #[test]
    fn kill_group_kills_recorded_group() {
        let mut child = sleeping_group();
        let record = HookProcess::of(child.id() as i32).unwrap();
        record.kill_group();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGKILL)
        );
    }

    #[test]
    fn kill_group_spares_reused_pid() {
        let mut child = sleeping_group();
        let mut record = HookProcess::of(child.id() as i32).unwrap();
        record.start_ticks += 1;
        record.kill_group();
        assert!(child.try_wait().unwrap().is_none(), "the sleep was killed");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn kill_group_spares_group_of_other_boot() {
        let mut child = sleeping_group();
        let mut record = HookProcess::of(child.id() as i32).unwrap();
        record.boot_id = "00000000-0000-0000-0000-000000000000".to_string();
        record.kill_group();
        assert!(child.try_wait().unwrap().is_none(), "the sleep was killed");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
