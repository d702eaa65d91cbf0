//! `edgekeep bench fleet`: job throughput, latency and server memory for
//! simulated fleets of several sizes.
//!
//! For each fleet size it starts a fresh `edgekeep server` child process and
//! runs the simulator in this process against it. Before stopping the
//! server it reads its peak (`VmHWM`) and final (`VmRSS`) resident memory
//! from `/proc/PID/status` and its CPU time from `/proc/PID/stat`. The CPU
//! time of this process shows how much of the machine the simulated devices
//! took.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::simulate::{self, FleetOptions, ProjectChoice, StateShape, Summary};

/// How long the server may take to start listening.
const SERVER_START_TIMEOUT: Duration = Duration::from_secs(60);

/// Server variables that would move the metadata or the objects away from
/// the embedded defaults; the bench passes these settings as flags only.
const STORE_VARIABLES: [&str; 5] = [
    "EDGEKEEP_DATABASE_URL",
    "EDGEKEEP_DATABASE_URL_FILE",
    "EDGEKEEP_S3_ENDPOINT",
    "EDGEKEEP_S3_PUBLIC_URL",
    "EDGEKEEP_PUBLIC_URL",
];

#[derive(Debug, clap::Args)]
pub struct FleetBenchArgs {
    /// Fleet sizes to measure, comma-separated; each runs against a fresh
    /// server.
    #[arg(long, value_delimiter = ',', default_value = "200,2000")]
    devices: Vec<usize>,
    /// Backup and restore jobs per fleet size.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    /// Share of the jobs after each device's first backup that are restores.
    #[arg(long, default_value_t = 0.5)]
    restore_share: f64,
    /// Configuration files in each generated device state.
    #[arg(long, default_value_t = 8)]
    files: usize,
    /// Approximate size of each generated device state, such as 64KiB.
    #[arg(long, default_value = "64KiB", value_parser = edgekeep_server::config::parse_size)]
    state_size: u64,
    /// Maximum time of each fleet size's run, such as 30m.
    #[arg(long, default_value = "1h", value_parser = edgekeep_server::config::parse_duration)]
    timeout: Duration,
    /// Folder for the server data and device folders; a new temporary
    /// folder by default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the server data, logs and device folders.
    #[arg(long)]
    keep: bool,
    /// PostgreSQL URL for the server's metadata; SQLite in the server's data
    /// folder by default. Each fleet size makes its own project in it.
    #[arg(long)]
    database_url: Option<String>,
    /// External S3 service for the backup files; the server's embedded
    /// endpoint by default. The server reads the key from
    /// EDGEKEEP_S3_ACCESS_KEY and EDGEKEEP_S3_SECRET_KEY, or from
    /// AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Region the external S3 requests are signed for.
    #[arg(long, default_value = edgekeep_server::config::DEFAULT_S3_REGION)]
    s3_region: String,
    /// Bucket on the external S3 service.
    #[arg(long, default_value = "edgekeep")]
    bucket: String,
}

/// The measurements of one fleet size.
struct Row {
    summary: Summary,
    server: Memory,
    /// User and system CPU seconds of the server process.
    server_cpu_secs: Option<f64>,
    /// Peak resident memory of this process, which runs the simulator.
    simulator_peak_kib: Option<u64>,
    /// User and system CPU seconds of this process during the run.
    simulator_cpu_secs: f64,
}

/// Resident memory of a process, in KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Memory {
    peak_kib: u64,
    current_kib: u64,
}

pub fn run(args: FleetBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        !args.devices.contains(&0),
        "--devices contains 0; give fleet sizes of at least one device"
    );
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.restore_share),
        "--restore-share {} is outside 0 to 1",
        args.restore_share
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    // Ctrl-C drops the run: the server child is killed on drop and the
    // temporary folder removed, instead of both outliving the bench.
    runtime.block_on(async {
        tokio::select! {
            result = run_sizes(args) => result,
            interrupted = tokio::signal::ctrl_c() => {
                interrupted.context("failed to listen for SIGINT")?;
                anyhow::bail!("interrupted; stopped the benchmark server")
            }
        }
    })
}

async fn run_sizes(args: FleetBenchArgs) -> anyhow::Result<()> {
    let (base, temp_dir) = match &args.dir {
        Some(dir) => {
            // The device hooks run in another working folder, so their log
            // paths must be absolute.
            let dir = std::path::absolute(dir)
                .with_context(|| format!("failed to resolve --dir {}", dir.display()))?;
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
            (dir, None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("edgekeep-bench-fleet-")
                .tempdir()?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };

    let mut rows = Vec::new();
    for &devices in &args.devices {
        let work = base.join(format!("fleet-{devices}-{}", simulate::run_tag()));
        std::fs::create_dir_all(&work)
            .with_context(|| format!("failed to create {}", work.display()))?;
        eprintln!(
            "fleet of {devices} devices, {} jobs, in {}",
            args.jobs,
            work.display()
        );
        rows.push(measure(&args, devices, &work).await?);
        if !args.keep {
            std::fs::remove_dir_all(&work)
                .with_context(|| format!("failed to remove {}", work.display()))?;
        }
    }
    if let (true, Some(temp_dir)) = (args.keep, temp_dir) {
        eprintln!(
            "server data and device folders are in {}",
            temp_dir.keep().display()
        );
    }

    print_table(&rows);
    let failed: Vec<String> = rows
        .iter()
        .filter(|row| row.summary.check().is_err())
        .map(|row| format!("{} devices", row.summary.devices))
        .collect();
    anyhow::ensure!(
        failed.is_empty(),
        "the runs with {} had jobs that did not succeed exactly once; rerun with --keep and \
         `edgekeep simulate` for details",
        failed.join(", ")
    );
    Ok(())
}

/// Runs one fleet size against a fresh server and measures it.
async fn measure(args: &FleetBenchArgs, devices: usize, work: &Path) -> anyhow::Result<Row> {
    let token = format!("ek_{}", hex::encode(rand::random::<[u8; 32]>()));
    let mut server = ServerChild::start(args, work, &token)?;
    let api = match server.wait_until_ready().await {
        Ok(api) => api,
        Err(err) => {
            server.stop().await;
            return Err(err);
        }
    };

    reset_own_peak_memory();
    let cpu_before = own_cpu_seconds();
    let tag = simulate::run_tag();
    let run_dir = work.join("devices");
    std::fs::create_dir_all(&run_dir)?;
    let options = FleetOptions {
        servers: vec![api],
        token,
        devices,
        project: ProjectChoice::New(format!("bench-fleet-{devices}-{tag}")),
        run_dir,
        tag,
        shape: StateShape {
            files: args.files,
            size: args.state_size,
        },
        jobs: Some(args.jobs),
        restore_share: args.restore_share,
        timeout: args.timeout,
    };
    let (_stop_sender, stop) = tokio::sync::watch::channel(false);
    let summary = simulate::run_fleet(&options, stop).await;
    let server_memory = server.memory();
    let server_cpu_secs = server.cpu_seconds();
    let simulator_peak_kib = read_memory(Path::new("/proc/self/status")).map(|m| m.peak_kib);
    let simulator_cpu_secs = own_cpu_seconds() - cpu_before;
    server.stop().await;

    let summary = summary?;
    if let Err(err) = summary.check() {
        eprintln!("fleet of {devices} devices: {err:#}");
    }
    Ok(Row {
        summary,
        server: server_memory.unwrap_or_default(),
        server_cpu_secs,
        simulator_peak_kib,
        simulator_cpu_secs,
    })
}

/// An `edgekeep server` child process on free loopback ports.
struct ServerChild {
    child: Child,
    data_dir: PathBuf,
    log: PathBuf,
}

impl ServerChild {
    fn start(args: &FleetBenchArgs, work: &Path, token: &str) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("failed to find the edgekeep executable")?;
        let data_dir = work.join("server");
        let log = work.join("server.log");
        let out = std::fs::File::create(&log)
            .with_context(|| format!("failed to create {}", log.display()))?;
        let mut command = Command::new(exe);
        command
            .arg("server")
            .arg("--data-dir")
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0", "--s3-listen", "127.0.0.1:0"])
            .env("EDGEKEEP_ADMIN_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .kill_on_drop(true);
        for variable in STORE_VARIABLES {
            command.env_remove(variable);
        }
        if let Some(url) = &args.database_url {
            command.args(["--database-url", url]);
        }
        if let Some(endpoint) = &args.s3_endpoint {
            command
                .args(["--s3-endpoint", endpoint])
                .args(["--s3-region", &args.s3_region])
                .args(["--bucket", &args.bucket]);
        }
        let child = command.spawn().context("failed to start edgekeep server")?;
        Ok(ServerChild {
            child,
            data_dir,
            log,
        })
    }

    /// Waits until the server wrote `endpoints.json` and `/healthz` returns
    /// 200, and returns the API base URL.
    async fn wait_until_ready(&mut self) -> anyhow::Result<String> {
        let deadline = Instant::now() + SERVER_START_TIMEOUT;
        let file = self.data_dir.join("endpoints.json");
        loop {
            if let Some(status) = self.child.try_wait()? {
                anyhow::bail!(
                    "the server exited with {status} at start; see {}",
                    self.log.display()
                );
            }
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Ok(endpoints) = serde_json::from_str::<serde_json::Value>(&text)
                && let Some(api) = endpoints["api"].as_str()
            {
                let health = reqwest::get(format!("{api}/healthz")).await;
                if health.is_ok_and(|response| response.status().is_success()) {
                    return Ok(api.to_string());
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the server did not start within {} s; see {}",
                SERVER_START_TIMEOUT.as_secs(),
                self.log.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads the server's peak and current resident memory.
    fn memory(&self) -> Option<Memory> {
        let pid = self.child.id()?;
        read_memory(&PathBuf::from(format!("/proc/{pid}/status")))
    }

    /// Reads the server's user and system CPU time.
    fn cpu_seconds(&self) -> Option<f64> {
        let pid = self.child.id()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_cpu_ticks(&stat).map(|ticks| ticks as f64 / clock_ticks_per_second())
    }

    /// Sends SIGTERM and waits up to 30 s before killing the server.
    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: kill(2) on the pid of our own unreaped child has no
            // memory effects.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGTERM);
            }
        }
        let waited = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        if waited.is_err() {
            tracing::warn!(log = %self.log.display(), "the server did not stop within 30 s; killing it");
            let _ = self.child.kill().await;
        }
    }
}

/// Reads `VmHWM` and `VmRSS` from a `/proc/PID/status` file.
fn read_memory(status: &Path) -> Option<Memory> {
    let text = std::fs::read_to_string(status).ok()?;
    parse_memory(&text)
}

fn parse_memory(status: &str) -> Option<Memory> {
    let field = |name: &str| {
        status.lines().find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(':')?;
            value.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()
        })
    };
    Some(Memory {
        peak_kib: field("VmHWM")?,
        current_kib: field("VmRSS")?,
    })
}

/// Returns `utime + stime` from a `/proc/PID/stat` line, in clock ticks.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    // The command name in field 2 may contain spaces, so count the fields
    // after its closing parenthesis: state is field 3, utime 14, stime 15.
    let after_name = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system setting.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// Returns the user and system CPU seconds of this process so far.
fn own_cpu_seconds() -> f64 {
    // SAFETY: an all-zero rusage is a valid value for getrusage to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer is valid for writes of one rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return 0.0;
    }
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}

/// Resets this process's peak resident memory (`VmHWM`) to the current
/// value, so each fleet size reports its own peak. Linux 4.0 and later
/// accept the write; on failure the peak covers the earlier sizes too.
fn reset_own_peak_memory() {
    if let Err(err) = std::fs::write("/proc/self/clear_refs", "5") {
        tracing::warn!(error = %err, "resetting the peak memory of this process failed");
    }
}

fn print_table(rows: &[Row]) {
    println!(
        "| devices | jobs | seconds | jobs/s | p95 latency s | server peak RSS MiB | \
         server RSS at end MiB | server CPU s | simulator peak RSS MiB | simulator CPU s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let summary = &row.summary;
        let p95 = summary
            .latency_ms
            .as_ref()
            .map_or("-".to_string(), |latency| {
                format!("{:.2}", latency.p95 as f64 / 1000.0)
            });
        let simulator = row
            .simulator_peak_kib
            .map_or("-".to_string(), |kib| format!("{:.0}", mib(kib)));
        let server_cpu = row
            .server_cpu_secs
            .map_or("-".to_string(), |secs| format!("{secs:.0}"));
        println!(
            "| {} | {} | {:.1} | {:.1} | {p95} | {:.0} | {:.0} | {server_cpu} | {simulator} | \
             {:.0} |",
            summary.devices,
            summary.jobs,
            summary.elapsed_secs,
            summary.jobs_per_sec,
            mib(row.server.peak_kib),
            mib(row.server.current_kib),
            row.simulator_cpu_secs,
        );
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_fields_parse_from_status() {
        let status =
            "Name:\tedgekeep\nVmPeak:\t 900000 kB\nVmHWM:\t  367104 kB\nVmRSS:\t  79092 kB\n";
        let memory = parse_memory(status).unwrap();
        assert_eq!(memory.peak_kib, 367_104);
        assert_eq!(memory.current_kib, 79_092);
    }

    #[test]
    fn memory_without_rss_is_none() {
        assert!(parse_memory("Name:\tedgekeep\nVmHWM:\t 1 kB\n").is_none());
    }

    #[test]
    fn cpu_ticks_parse_after_command_name() {
        let stat = "4242 (edge keep) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 8 0";
        assert_eq!(parse_cpu_ticks(stat), Some(325));
    }

    #[test]
    fn short_stat_line_is_none() {
        assert_eq!(parse_cpu_ticks("4242 (edgekeep) S 1 2"), None);
    }

    #[test]
    fn own_memory_is_readable() {
        let memory = read_memory(Path::new("/proc/self/status")).unwrap();
        assert!(memory.current_kib > 0);
        assert!(memory.peak_kib >= memory.current_kib);
    }
}
