//! The result of a simulation: jobs by state, throughput, latency, and the
//! check that every job ran its hook exactly once.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use edgekeep_api::{JobKind, JobState};
use serde::Serialize;

use super::workload::JobOutcome;

/// Every job state, in the order the summary prints them.
const STATES: [JobState; 6] = [
    JobState::Succeeded,
    JobState::Failed,
    JobState::Expired,
    JobState::Cancelled,
    JobState::Queued,
    JobState::Running,
];

/// Counts of the `PHASE JOB_ID` lines the hooks wrote, by phase and job id.
#[derive(Debug, Default)]
pub struct HookRuns {
    runs: HashMap<(String, i64), usize>,
}

impl HookRuns {
    /// Adds the lines of one device's hook log; a missing log adds nothing.
    pub fn read(&mut self, path: &Path) -> anyhow::Result<()> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(err) => {
                return Err(err).with_context(|| format!("failed to read {}", path.display()));
            }
        };
        self.add_lines(&text)
            .with_context(|| format!("invalid line in the hook log {}", path.display()))
    }

    fn add_lines(&mut self, text: &str) -> anyhow::Result<()> {
        for line in text.lines() {
            let parsed = line
                .split_once(' ')
                .and_then(|(phase, id)| Some((phase.to_string(), id.parse::<i64>().ok()?)));
            let Some(key) = parsed else {
                anyhow::bail!("{line:?} is not a phase and a job id");
            };
            *self.runs.entry(key).or_default() += 1;
        }
        Ok(())
    }

    /// Returns how often the hook of `kind` ran for `job_id`.
    fn count(&self, kind: JobKind, job_id: i64) -> usize {
        let phase = match kind {
            JobKind::Backup => "pre_backup",
            JobKind::Restore | JobKind::Import => "pre_restore",
        };
        self.runs
            .get(&(phase.to_string(), job_id))
            .copied()
            .unwrap_or(0)
    }
}

/// Job ids whose hook did not run exactly once.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ExactlyOnce {
    /// Jobs checked: every job that was queued.
    pub checked: usize,
    pub ran_zero_times: Vec<i64>,
    pub ran_more_than_once: Vec<i64>,
}

/// Job latency percentiles in milliseconds, from queueing to the end of the
/// job by the server's clock.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub p50: i64,
    pub p95: i64,
    pub max: i64,
}

/// Everything `edgekeep simulate` reports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub project_id: i64,
    pub devices: usize,
    /// Jobs the run was to request; `None` when the devices ran until
    /// stopped and the jobs came from elsewhere.
    pub requested: Option<usize>,
    /// Jobs the summary covers.
    pub jobs: usize,
    pub backups: usize,
    pub restores: usize,
    /// Restores of another device's backup.
    pub clones: usize,
    /// Jobs by their final state, or the last state seen when the run
    /// stopped before they ended.
    pub states: BTreeMap<&'static str, usize>,
    /// Requests that no server accepted.
    pub not_queued: usize,
    /// Queued jobs whose state could not be read.
    pub state_unknown: usize,
    pub elapsed_secs: f64,
    /// Jobs that ended, per second of the run.
    pub jobs_per_sec: f64,
    pub latency_ms: Option<Latency>,
    pub exactly_once: ExactlyOnce,
    /// Calls repeated on another address after a transport error or 5xx.
    pub retried_calls: u64,
    /// Jobs found through the jobs API after a request whose response was
    /// lost.
    pub adopted_jobs: u64,
    /// Agents that stopped with an error, as `device ID: error`.
    pub agent_errors: Vec<String>,
}

/// Inputs of [`Summary::new`] besides the job outcomes.
pub struct RunFacts {
    pub project_id: i64,
    pub devices: usize,
    pub requested: Option<usize>,
    pub elapsed: Duration,
    pub retried_calls: u64,
    pub adopted_jobs: u64,
    pub agent_errors: Vec<String>,
}

impl Summary {
    pub fn new(facts: RunFacts, outcomes: &[JobOutcome], hooks: &HookRuns) -> Self {
        let mut states: BTreeMap<&'static str, usize> =
            STATES.iter().map(|state| (state.as_str(), 0)).collect();
        let mut exactly_once = ExactlyOnce::default();
        let mut latencies = Vec::new();
        let (mut not_queued, mut state_unknown, mut ended) = (0, 0, 0);
        for outcome in outcomes {
            let Some(job_id) = outcome.job_id else {
                not_queued += 1;
                continue;
            };
            match outcome.state {
                Some(state) => *states.entry(state.as_str()).or_default() += 1,
                None => state_unknown += 1,
            }
            if outcome.state.is_some_and(JobState::is_final) {
                ended += 1;
            }
            latencies.extend(outcome.latency_ms);
            exactly_once.checked += 1;
            match hooks.count(outcome.kind, job_id) {
                0 => exactly_once.ran_zero_times.push(job_id),
                1 => {}
                _ => exactly_once.ran_more_than_once.push(job_id),
            }
        }
        exactly_once.ran_zero_times.sort_unstable();
        exactly_once.ran_more_than_once.sort_unstable();

        let restores = outcomes
            .iter()
            .filter(|outcome| outcome.kind == JobKind::Restore)
            .count();
        let clones = outcomes
            .iter()
            .filter(|o| {
                o.kind == JobKind::Restore && o.source_device_id.is_some_and(|s| s != o.device_id)
            })
            .count();
        let elapsed_secs = facts.elapsed.as_secs_f64();
        Summary {
            project_id: facts.project_id,
            devices: facts.devices,
            requested: facts.requested,
            jobs: outcomes.len(),
            backups: outcomes.len() - restores,
            restores,
            clones,
            states,
            not_queued,
            state_unknown,
            elapsed_secs,
            jobs_per_sec: if elapsed_secs > 0.0 {
                ended as f64 / elapsed_secs
            } else {
                0.0
            },
            latency_ms: latency(latencies),
            exactly_once,
            retried_calls: facts.retried_calls,
            adopted_jobs: facts.adopted_jobs,
            agent_errors: facts.agent_errors,
        }
    }

    /// Jobs that did not succeed, counting requests no server accepted.
    pub fn unsuccessful(&self) -> usize {
        self.jobs - self.states[JobState::Succeeded.as_str()]
    }

    /// Returns an error unless every requested job was queued, succeeded and
    /// ran its hook exactly once, and every agent stopped cleanly.
    pub fn check(&self) -> anyhow::Result<()> {
        let mut problems = Vec::new();
        if let Some(requested) = self.requested
            && self.jobs < requested
        {
            problems.push(format!(
                "{} of {requested} jobs were requested before the run stopped",
                self.jobs
            ));
        }
        if self.unsuccessful() > 0 {
            problems.push(format!(
                "{} of {} jobs did not succeed",
                self.unsuccessful(),
                self.jobs
            ));
        }
        let once = &self.exactly_once;
        if !once.ran_zero_times.is_empty() || !once.ran_more_than_once.is_empty() {
            problems.push(format!(
                "{} jobs never ran their hook and {} ran it more than once",
                once.ran_zero_times.len(),
                once.ran_more_than_once.len()
            ));
        }
        if !self.agent_errors.is_empty() {
            problems.push(format!(
                "{} agents stopped with an error",
                self.agent_errors.len()
            ));
        }
        if problems.is_empty() {
            return Ok(());
        }
        anyhow::bail!(
            "{}; the summary above lists the job ids and the device logs show why",
            problems.join(", ")
        )
    }

    /// Prints the summary as a few lines of text.
    pub fn print(&self) {
        println!(
            "project {}: {} devices, {} jobs ({} backups, {} restores of which {} from another \
             device)",
            self.project_id, self.devices, self.jobs, self.backups, self.restores, self.clones
        );
        let states: Vec<String> = STATES
            .iter()
            .map(|state| format!("{} {}", self.states[state.as_str()], state.as_str()))
            .collect();
        println!("states: {}", states.join(", "));
        if self.not_queued + self.state_unknown > 0 {
            println!(
                "requests no server accepted: {}, jobs whose state could not be read: {}",
                self.not_queued, self.state_unknown
            );
        }
        print!(
            "elapsed {:.1} s, {:.1} jobs/s",
            self.elapsed_secs, self.jobs_per_sec
        );
        match &self.latency_ms {
            Some(latency) => println!(
                ", latency p50 {:.2} s, p95 {:.2} s, max {:.2} s",
                seconds(latency.p50),
                seconds(latency.p95),
                seconds(latency.max)
            ),
            None => println!(),
        }
        let once = &self.exactly_once;
        println!(
            "exactly once: {} jobs checked, {} ran 0 times {:?}, {} ran more than once {:?}",
            once.checked,
            once.ran_zero_times.len(),
            once.ran_zero_times,
            once.ran_more_than_once.len(),
            once.ran_more_than_once
        );
        println!(
            "failover: {} calls repeated on another address, {} jobs found after a lost response",
            self.retried_calls, self.adopted_jobs
        );
        for error in &self.agent_errors {
            println!("agent error: {error}");
        }
    }
}

fn seconds(millis: i64) -> f64 {
    millis as f64 / 1000.0
}

/// Returns the nearest-rank percentiles of `values`, or `None` when empty.
fn latency(mut values: Vec<i64>) -> Option<Latency> {
    if values.is_empty() {
        return None;
    }
    values.sort_unstable();
    let rank = |percent: usize| {
        let index = (values.len() * percent).div_ceil(100).max(1) - 1;
        values[index]
    };
    Some(Latency {
        p50: rank(50),
        p95: rank(95),
        max: values[values.len() - 1],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(job_id: i64, kind: JobKind, state: JobState, latency: i64) -> JobOutcome {
        JobOutcome {
            job_id: Some(job_id),
            kind,
            device_id: 1,
            source_device_id: (kind == JobKind::Restore).then_some(2),
            timestamp: None,
            state: Some(state),
            latency_ms: Some(latency),
            reason: None,
        }
    }

    fn facts(requested: usize) -> RunFacts {
        RunFacts {
            project_id: 1,
            devices: 2,
            requested: Some(requested),
            elapsed: Duration::from_secs(2),
            retried_calls: 0,
            adopted_jobs: 0,
            agent_errors: Vec::new(),
        }
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let values: Vec<i64> = (1..=100).collect();
        let latency = latency(values).unwrap();
        assert_eq!(latency.p50, 50);
        assert_eq!(latency.p95, 95);
        assert_eq!(latency.max, 100);
        let single = super::latency(vec![7]).unwrap();
        assert_eq!((single.p50, single.p95, single.max), (7, 7, 7));
        assert!(super::latency(Vec::new()).is_none());
    }

    #[test]
    fn hook_runs_count_by_phase() {
        let mut hooks = HookRuns::default();
        hooks
            .add_lines("pre_backup 1\npre_restore 2\npre_backup 1\n")
            .unwrap();
        assert_eq!(hooks.count(JobKind::Backup, 1), 2);
        assert_eq!(hooks.count(JobKind::Restore, 2), 1);
        assert_eq!(hooks.count(JobKind::Restore, 1), 0);
    }

    #[test]
    fn hook_log_rejects_garbage() {
        let err = HookRuns::default().add_lines("pre_backup\n").unwrap_err();
        assert!(err.to_string().contains("pre_backup"), "{err}");
    }

    #[test]
    fn clean_run_passes_check() {
        let mut hooks = HookRuns::default();
        hooks.add_lines("pre_backup 1\npre_restore 2\n").unwrap();
        let outcomes = [
            outcome(1, JobKind::Backup, JobState::Succeeded, 100),
            outcome(2, JobKind::Restore, JobState::Succeeded, 300),
        ];
        let summary = Summary::new(facts(2), &outcomes, &hooks);
        assert_eq!(summary.states["succeeded"], 2);
        assert_eq!(summary.states["failed"], 0);
        assert_eq!(summary.backups, 1);
        assert_eq!(summary.restores, 1);
        assert_eq!(summary.clones, 1);
        assert_eq!(summary.jobs_per_sec, 1.0);
        assert_eq!(summary.latency_ms.as_ref().unwrap().max, 300);
        assert_eq!(summary.exactly_once.checked, 2);
        summary.check().unwrap();
    }

    #[test]
    fn hook_run_twice_fails_check() {
        let mut hooks = HookRuns::default();
        hooks.add_lines("pre_backup 1\npre_backup 1\n").unwrap();
        let outcomes = [
            outcome(1, JobKind::Backup, JobState::Succeeded, 100),
            outcome(2, JobKind::Backup, JobState::Succeeded, 100),
        ];
        let summary = Summary::new(facts(2), &outcomes, &hooks);
        assert_eq!(summary.exactly_once.ran_more_than_once, [1]);
        assert_eq!(summary.exactly_once.ran_zero_times, [2]);
        let err = summary.check().unwrap_err().to_string();
        assert!(err.contains("1 jobs never ran"), "{err}");
    }

    #[test]
    fn failed_and_missing_jobs_fail_check() {
        let mut hooks = HookRuns::default();
        hooks.add_lines("pre_backup 1\n").unwrap();
        let outcomes = [outcome(1, JobKind::Backup, JobState::Failed, 100)];
        let summary = Summary::new(facts(3), &outcomes, &hooks);
        assert_eq!(summary.states["failed"], 1);
        assert_eq!(summary.unsuccessful(), 1);
        let err = summary.check().unwrap_err().to_string();
        assert!(err.contains("1 of 3 jobs were requested"), "{err}");
        assert!(err.contains("1 of 1 jobs did not succeed"), "{err}");
    }
}
