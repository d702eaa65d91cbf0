//! Runs the configured commands before and after backup and restore.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::config::Hook;
use crate::error::{Error, Result};

/// Lines of hook output kept for the failure reason.
const OUTPUT_TAIL_LINES: usize = 10;

/// Job and state folder of a hook run, passed to it as environment variables.
#[derive(Debug, Clone, Copy)]
pub struct HookContext<'a> {
    /// `EDGEKEEP_JOB_ID`; unset when the hook runs outside a job.
    pub job_id: Option<i64>,
    /// `EDGEKEEP_STATE_DIR`.
    pub state_dir: &'a Path,
}

/// Runs `hook` as the `phase` hook (`pre_backup`, `post_restore`, ...) in
/// its own process group. On timeout the whole group is killed. A failure
/// carries the last lines of its output.
///
/// The hook's first process gets SIGKILL when the agent dies, so it never
/// runs on after a crash. Processes it started itself do not; the restore
/// records the group in its journal so recovery can kill them.
pub fn run_hook(phase: &str, hook: &Hook, context: HookContext<'_>) -> Result<()> {
    run_hook_observed(phase, hook, context, &mut |_| Ok(()))
}

/// Runs `hook` as [`run_hook`] does, and calls `on_start` with the hook's
/// process group id once it started. When `on_start` fails, the group is
/// killed and the hook fails with that error.
pub(crate) fn run_hook_observed(
    phase: &str,
    hook: &Hook,
    context: HookContext<'_>,
    on_start: &mut dyn FnMut(libc::pid_t) -> Result<()>,
) -> Result<()> {
    let started = Instant::now();
    let mut command = Command::new(&hook.command[0]);
    command
        .args(&hook.command[1..])
        .current_dir(context.state_dir)
        .env("EDGEKEEP_STATE_DIR", context.state_dir)
        .env("EDGEKEEP_PHASE", phase)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    die_with_agent(&mut command);
    match context.job_id {
        Some(job_id) => command.env("EDGEKEEP_JOB_ID", job_id.to_string()),
        None => command.env_remove("EDGEKEEP_JOB_ID"),
    };
    let mut child = command.spawn().map_err(|e| {
        Error::Hook(format!(
            "{phase} hook {:?} could not start: {e}; check the command in the agent config",
            hook.command
        ))
    })?;

    // Collect the output in the background so a hook does not block on a
    // full pipe.
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let readers = [
        child
            .stdout
            .take()
            .map(|out| spawn_reader(out, tail.clone())),
        child
            .stderr
            .take()
            .map(|err| spawn_reader(err, tail.clone())),
    ];

    let pid = child.id() as libc::pid_t;
    if let Err(err) = on_start(pid) {
        // SAFETY: kill has no memory effects; the negative pid names the
        // process group the hook leads.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = child.wait();
        join_readers(readers);
        return Err(err);
    }

    // Wait for the exit or the deadline.
    let timeout = Duration::from_secs(hook.timeout_secs);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if started.elapsed() >= timeout => {
                // SAFETY: kill has no memory effects; the negative pid names
                // the process group the hook leads.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return Err(Error::Hook(format!(
                    "waiting for the {phase} hook failed: {e}"
                )));
            }
        }
    };
    join_readers(readers);
    let output = tail_text(&tail);

    match status {
        None => {
            tracing::warn!(
                phase,
                timeout_secs = hook.timeout_secs,
                "hook timed out and was killed"
            );
            Err(Error::Hook(format!(
                "{phase} hook timed out after {} s and was killed{output}",
                hook.timeout_secs
            )))
        }
        Some(status) if status.success() => {
            tracing::info!(
                phase,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "hook finished"
            );
            Ok(())
        }
        Some(status) => Err(Error::Hook(format!(
            "{phase} hook failed with {status}{output}"
        ))),
    }
}

/// Makes the kernel send SIGKILL to the hook when the agent dies.
///
/// `PR_SET_PDEATHSIG` fires when the thread that started the child exits, and
/// that thread waits for the hook, so it fires only when the agent dies.
fn die_with_agent(command: &mut Command) {
    let agent_pid = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec and calls
    // only prctl and getppid, which are async-signal-safe.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The agent may have died before the prctl call took effect.
            if libc::getppid() != agent_pid {
                return Err(std::io::Error::other(
                    "the agent exited before the hook started",
                ));
            }
            Ok(())
        });
    }
}

fn spawn_reader(
    stream: impl Read + Send + 'static,
    tail: Arc<Mutex<VecDeque<String>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == OUTPUT_TAIL_LINES {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    })
}

/// Waits briefly for the output readers. A background process the hook
/// started in another process group may hold the pipes open, so the readers
/// are left behind after 2 s.
fn join_readers(readers: [Option<JoinHandle<()>>; 2]) {
    let deadline = Instant::now() + Duration::from_secs(2);
    for reader in readers.into_iter().flatten() {
        while !reader.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if reader.is_finished() {
            let _ = reader.join();
        }
    }
}

fn tail_text(tail: &Mutex<VecDeque<String>>) -> String {
    let tail = tail.lock().unwrap_or_else(|e| e.into_inner());
    if tail.is_empty() {
        return String::new();
    }
    let lines: Vec<&str> = tail.iter().map(String::as_str).collect();
    format!("; last output: {}", lines.join(" | "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(script: &str, timeout_secs: u64) -> Hook {
        Hook {
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout_secs,
        }
    }

    #[test]
    fn hook_gets_job_environment() {
        let dir = tempfile::tempdir().unwrap();
        let context = HookContext {
            job_id: Some(42),
            state_dir: dir.path(),
        };
        let script = "echo \"$EDGEKEEP_JOB_ID $EDGEKEEP_PHASE $EDGEKEEP_STATE_DIR\" > env.txt";
        run_hook("pre_backup", &hook(script, 5), context).unwrap();
        let written = std::fs::read_to_string(dir.path().join("env.txt")).unwrap();
        assert_eq!(
            written.trim(),
            format!("42 pre_backup {}", dir.path().display())
        );
    }

    #[test]
    fn hook_failure_carries_output() {
        let dir = tempfile::tempdir().unwrap();
        let context = HookContext {
            job_id: None,
            state_dir: dir.path(),
        };
        let err = run_hook("post_restore", &hook("echo boom >&2; exit 3", 5), context)
            .unwrap_err()
            .to_string();
        assert!(err.contains("post_restore"), "{err}");
        assert!(err.contains("boom"), "{err}");
        assert!(err.contains('3'), "{err}");
    }

    #[test]
    fn hook_timeout_kills_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let context = HookContext {
            job_id: None,
            state_dir: dir.path(),
        };
        // The child writes its pid, then both it and the shell sleep.
        let script = "sleep 30 & echo $! > child.pid; wait";
        let started = Instant::now();
        let err = run_hook("pre_backup", &hook(script, 1), context)
            .unwrap_err()
            .to_string();
        assert!(err.contains("timed out"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(10));

        let pid: libc::pid_t = std::fs::read_to_string(dir.path().join("child.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The killed sleep becomes a zombie or disappears. SIGKILL is
        // delivered at once, but on a loaded machine the process may still be
        // running its exit path for a moment, so poll briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut state = process_state(pid);
        while !matches!(state.as_deref(), None | Some("Z") | Some("X")) {
            assert!(Instant::now() < deadline, "sleep {pid} is still {state:?}");
            std::thread::sleep(Duration::from_millis(20));
            state = process_state(pid);
        }
    }

    /// The state letter of a process from /proc/PID/stat, or None once it is
    /// gone.
    fn process_state(pid: libc::pid_t) -> Option<String> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let after_name = stat.rsplit(')').next()?;
        after_name.split_whitespace().next().map(str::to_string)
    }
}
