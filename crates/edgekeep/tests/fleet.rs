//! A fleet of 200 simulated devices runs 1,000 backup and restore jobs
//! against three server replicas on one PostgreSQL database and one Garage
//! bucket, and one replica is killed a third of the way through. Every job
//! must still succeed and run exactly once.
//!
//! It runs on PostgreSQL and Garage only, because SQLite serves one server.
//! It lives in its own test target so it does not share the two cores with
//! the other end-to-end tests.

// This target shares the end-to-end harness but uses only its PostgreSQL
// and Garage server part.
#[macro_use]
#[allow(unused_macros, dead_code)]
#[path = "e2e/database.rs"]
mod database;
#[path = "../../edgekeep-server/tests/common/garage.rs"]
mod garage;
#[allow(dead_code)]
#[path = "e2e/harness.rs"]
mod harness;

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use edgekeep_api::{JobKind, JobState};
use harness::{BIN, Server};

const DEVICES: usize = 200;
const JOBS: usize = 1000;
const REPLICAS: usize = 3;

/// Upper bound for the whole simulation on a loaded 2-core machine.
const RUN_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// The simulator's output: its stdout, the stderr lines, and how many jobs
/// had ended when the replica was killed.
struct SimulationRun {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: Vec<String>,
    ended_at_kill: Option<usize>,
}

/// Parses `progress: ENDED/TOTAL jobs ended, ...` into ENDED.
fn ended_jobs(line: &str) -> Option<usize> {
    let rest = line.strip_prefix("progress: ")?;
    let (ended, _) = rest.split_once('/')?;
    ended.parse().ok()
}

/// Runs `edgekeep simulate` against every replica and kills `replicas[0]`
/// once `kill_after` jobs have ended.
fn simulate_and_kill(replicas: &mut [Server], kill_after: usize) -> SimulationRun {
    let urls: Vec<&str> = replicas.iter().map(|server| server.api.as_str()).collect();
    let work = tempfile::Builder::new()
        .prefix("edgekeep-fleet-")
        .tempdir()
        .unwrap();
    let mut child = Command::new(BIN)
        .args(["simulate", "--server", &urls.join(",")])
        .args(["--token", &replicas[0].token])
        .args(["--devices", &DEVICES.to_string()])
        .args(["--jobs", &JOBS.to_string()])
        .args(["--timeout", "15m", "--json", "--dir"])
        .arg(work.path())
        .env("RUST_LOG", "warn")
        .env_remove("EDGEKEEP_URL")
        .env_remove("EDGEKEEP_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();

    // Read both pipes on threads, passing each progress count on.
    let mut stdout_pipe = child.stdout.take().unwrap();
    let stdout_reader = std::thread::spawn(move || {
        let mut text = String::new();
        stdout_pipe.read_to_string(&mut text).unwrap();
        text
    });
    let (progress_sender, progress) = mpsc::channel();
    let stderr_pipe = child.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stderr_pipe).lines() {
            let line = line.unwrap();
            if let Some(ended) = ended_jobs(&line) {
                let _ = progress_sender.send(ended);
            }
            lines.push(line);
        }
        lines
    });

    // Kill the first replica a third of the way through.
    let started = Instant::now();
    let mut ended_at_kill = None;
    loop {
        match progress.recv_timeout(Duration::from_secs(1)) {
            Ok(ended) if ended_at_kill.is_none() && ended >= kill_after => {
                replicas[0].kill();
                ended_at_kill = Some(ended);
            }
            Ok(_) | Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
        }
    }
    let status = child.wait().unwrap();
    SimulationRun {
        status,
        stdout: stdout_reader.join().unwrap(),
        stderr: stderr_reader.join().unwrap(),
        ended_at_kill,
    }
}

/// Returns the last `count` lines of `lines` as one text.
fn tail(lines: &[String], count: usize) -> String {
    lines[lines.len().saturating_sub(count)..].join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn replica_kill_keeps_jobs_exactly_once() {
    let Some(store) = database::StoreChoice::postgres().await else {
        return;
    };
    let mut replicas: Vec<Server> = (0..REPLICAS).map(|_| Server::start(&store)).collect();
    let started = Instant::now();

    let run = tokio::task::block_in_place(|| simulate_and_kill(&mut replicas, JOBS / 3));
    let elapsed = started.elapsed();
    let context = format!(
        "simulate exited with {} after {elapsed:?}; stderr tail:\n{}\nstdout:\n{}\n\
         log of the second replica:\n{}",
        run.status,
        tail(&run.stderr, 40),
        run.stdout,
        replicas[1]
            .log()
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let ended_at_kill = run.ended_at_kill.unwrap_or_else(|| {
        panic!("the replica was never killed: no progress line reached a third; {context}")
    });
    assert!(
        ended_at_kill < JOBS,
        "the kill came after every job ended; {context}"
    );

    // The simulator's own account.
    let summary: serde_json::Value = serde_json::from_str(&run.stdout)
        .unwrap_or_else(|e| panic!("stdout is not the JSON summary ({e}); {context}"));
    assert_eq!(summary["jobs"], JOBS, "{context}");
    assert_eq!(summary["states"]["succeeded"], JOBS, "{context}");
    for state in ["failed", "expired", "cancelled", "queued", "running"] {
        assert_eq!(summary["states"][state], 0, "jobs {state}; {context}");
    }
    assert_eq!(summary["notQueued"], 0, "{context}");
    assert_eq!(summary["stateUnknown"], 0, "{context}");
    assert_eq!(summary["exactlyOnce"]["checked"], JOBS, "{context}");
    assert_eq!(
        summary["exactlyOnce"]["ranZeroTimes"],
        serde_json::json!([]),
        "{context}"
    );
    assert_eq!(
        summary["exactlyOnce"]["ranMoreThanOnce"],
        serde_json::json!([]),
        "{context}"
    );
    assert_eq!(summary["agentErrors"], serde_json::json!([]), "{context}");
    let retried = summary["retriedCalls"].as_u64().expect("retriedCalls");
    assert!(
        retried > 0,
        "no REST call met the killed replica; {context}"
    );
    assert!(run.status.success(), "{context}");

    // The server's account, from a replica that stayed up.
    let project_id = summary["projectId"].as_i64().expect("projectId");
    let jobs = replicas[1]
        .client()
        .list_jobs(Some(project_id), None, None)
        .await
        .unwrap();
    let device_jobs: Vec<_> = jobs
        .iter()
        .filter(|job| matches!(job.kind, JobKind::Backup | JobKind::Restore))
        .collect();
    assert_eq!(device_jobs.len(), JOBS, "{context}");
    let unsuccessful: Vec<_> = device_jobs
        .iter()
        .filter(|job| job.state != JobState::Succeeded)
        .map(|job| (job.id, job.state, job.reason.clone()))
        .collect();
    assert!(
        unsuccessful.is_empty(),
        "jobs that did not succeed: {unsuccessful:?}; {context}"
    );
    eprintln!(
        "fleet test: {JOBS} jobs on {DEVICES} devices in {elapsed:?}, replica killed after \
         {ended_at_kill} jobs ended, {retried} calls retried, {} jobs found after a lost \
         response; stderr tail:\n{}",
        summary["adoptedJobs"],
        tail(&run.stderr, 15)
    );
}

#[test]
fn progress_line_parses() {
    assert_eq!(
        ended_jobs("progress: 334/1000 jobs ended, 330 succeeded, 41 s"),
        Some(334)
    );
    assert_eq!(ended_jobs("200/200 devices online"), None);
}
