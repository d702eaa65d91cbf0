//! `edgekeep simulate`: many simulated devices in one process, each running
//! the real agent against a server or a list of replicas, and a workload of
//! backup and restore jobs for load and fault tests.

mod devices;
mod fleet;
mod servers;
mod summary;
mod workload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use edgekeep_api::JobKind;
use tokio::sync::watch;
use tokio::time::Instant;

pub use devices::StateShape;
pub use fleet::ProjectChoice;
pub use summary::Summary;

use summary::{HookRuns, RunFacts};
use workload::{JobOutcome, Progress, SimDevice, WorkloadOptions};

/// Interval of the progress lines while the workload runs.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Base URLs of the server replicas, comma-separated. REST calls go to
    /// them in turn, and each agent gets the whole list.
    #[arg(
        long = "server",
        env = "EDGEKEEP_URL",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:8080"
    )]
    servers: Vec<String>,
    /// API token sent as X-AuthToken: the administrator token, or a project
    /// token together with --project-id.
    #[arg(long, env = "EDGEKEEP_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Existing project to create the devices in.
    #[arg(long, conflicts_with = "project_name")]
    project_id: Option<i64>,
    /// Name of a new project to create the devices in; `simulate-TAG` with
    /// a random TAG when neither this nor --project-id is given.
    #[arg(long)]
    project_name: Option<String>,
    /// Folder in which a `simulate-TAG` work folder with the device states,
    /// agent homes and hook logs is made; the system's temporary folder by
    /// default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the work folder instead of deleting it at the end.
    #[arg(long)]
    keep: bool,
    /// Configuration files in each generated device state.
    #[arg(long, default_value_t = 8)]
    files: usize,
    /// Approximate size of each generated device state, such as 64KiB or
    /// 2MiB, split between the configuration files and a SQLite database.
    #[arg(long, default_value = "64KiB", value_parser = edgekeep_server::config::parse_size)]
    state_size: u64,
    /// Total backup and restore jobs to run: first one backup per device,
    /// then a random mix. Without it the devices run until Ctrl-C and the
    /// summary covers the jobs queued for the project from elsewhere.
    #[arg(long)]
    jobs: Option<usize>,
    /// Share of the jobs after each device's first backup that are
    /// restores, from 0 to 1. A quarter of the restores restore another
    /// device's backup.
    #[arg(long, default_value_t = 0.5)]
    restore_share: f64,
    /// Maximum time for the devices to come online and then for the jobs to
    /// end, such as 30m. Jobs still open then count in their last state.
    #[arg(long, default_value = "1h", value_parser = edgekeep_server::config::parse_duration)]
    timeout: Duration,
    /// Print the summary as one JSON object.
    #[arg(long)]
    json: bool,
}

/// One simulation run, as `edgekeep simulate` and `edgekeep bench fleet`
/// start it.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Base URLs of the server replicas.
    pub servers: Vec<String>,
    pub token: String,
    pub devices: usize,
    pub project: ProjectChoice,
    /// Work folder for the device folders; it must exist.
    pub run_dir: PathBuf,
    /// Short random text in device names, so runs in one project differ.
    pub tag: String,
    pub shape: StateShape,
    /// Jobs of the workload; `None` runs the devices until `stop`.
    pub jobs: Option<usize>,
    pub restore_share: f64,
    pub timeout: Duration,
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<()> {
    let token = args.token.clone().context(
        "no API token: pass --token or set EDGEKEEP_TOKEN to the token the server printed",
    )?;
    check_args(&args)?;
    let tag = run_tag();
    let (run_dir, temp_dir) = work_folder(args.dir.as_deref(), &tag)?;
    let options = FleetOptions {
        servers: args.servers.clone(),
        token,
        devices: args.devices,
        project: match (&args.project_id, &args.project_name) {
            (Some(id), _) => ProjectChoice::Existing(*id),
            (None, Some(name)) => ProjectChoice::New(name.clone()),
            (None, None) => ProjectChoice::New(format!("simulate-{tag}")),
        },
        run_dir: run_dir.clone(),
        tag,
        shape: StateShape {
            files: args.files,
            size: args.state_size,
        },
        jobs: args.jobs,
        restore_share: args.restore_share,
        timeout: args.timeout,
    };

    let result = run_fleet(&options, stop_on_ctrl_c()).await;
    if args.keep {
        let kept = temp_dir.map_or(run_dir, |temp| temp.keep());
        eprintln!("kept the work folder {}", kept.display());
    } else if temp_dir.is_none() {
        std::fs::remove_dir_all(&run_dir)
            .with_context(|| format!("failed to remove {}", run_dir.display()))?;
    }
    let summary = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        summary.print();
    }
    summary.check()
}

fn check_args(args: &SimulateArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.devices > 0, "--devices is 0; give at least one device");
    anyhow::ensure!(
        (0.0..=1.0).contains(&args.restore_share),
        "--restore-share {} is outside 0 to 1; give the share of restores, such as 0.5",
        args.restore_share
    );
    for url in &args.servers {
        anyhow::ensure!(
            url.starts_with("http://") || url.starts_with("https://"),
            "--server {url:?} is not an http:// or https:// URL; give the base URL of each \
             replica, such as http://127.0.0.1:8080, separated by commas"
        );
    }
    Ok(())
}

/// Returns six random hex digits that name this run's folder and devices.
pub fn run_tag() -> String {
    format!("{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// Creates the work folder: `DIR/simulate-TAG`, or a temporary folder that
/// is removed when the returned handle drops.
fn work_folder(
    dir: Option<&Path>,
    tag: &str,
) -> anyhow::Result<(PathBuf, Option<tempfile::TempDir>)> {
    match dir {
        Some(dir) => {
            // The hooks run in another working folder, so their log paths
            // must be absolute.
            let dir = std::path::absolute(dir)
                .with_context(|| format!("failed to resolve --dir {}", dir.display()))?;
            let run_dir = dir.join(format!("simulate-{tag}"));
            std::fs::create_dir_all(&run_dir)
                .with_context(|| format!("failed to create {}", run_dir.display()))?;
            Ok((run_dir, None))
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("edgekeep-simulate-")
                .tempdir()
                .context("failed to create a temporary folder; pass --dir")?;
            Ok((temp.path().to_path_buf(), Some(temp)))
        }
    }
}

/// Turns the first Ctrl-C into a stop of the run; a second one exits at once.
fn stop_on_ctrl_c() -> watch::Receiver<bool> {
    let (sender, receiver) = watch::channel(false);
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_err() {
            return;
        }
        eprintln!("interrupted: stopping the devices after their current jobs");
        let _ = sender.send(true);
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    receiver
}

/// Sets up the fleet, runs the workload or waits for `stop`, stops the
/// agents and returns the summary.
pub async fn run_fleet(
    options: &FleetOptions,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Summary> {
    release_large_blocks();
    let servers = Arc::new(servers::Servers::new(&options.servers, &options.token));
    let deadline = Instant::now() + options.timeout;

    // Project, devices, folders and agents.
    let project_id = fleet::open_project(&servers, &options.project).await?;
    let created = fleet::create_devices(
        &servers,
        project_id,
        &options.run_dir,
        &options.tag,
        options.devices,
        options.shape,
    )
    .await?;
    let mut agents = fleet::Agents::start(&created, &options.servers);
    let online =
        fleet::wait_online(&servers, project_id, &created, &mut agents, deadline, &stop).await;
    if let Err(err) = online {
        for error in agents.stop().await {
            tracing::warn!(error, "agent stopped with an error");
        }
        return Err(err);
    }

    // The workload, or the wait for Ctrl-C.
    let devices: Vec<SimDevice> = created.iter().map(|created| created.device).collect();
    let started = Instant::now();
    let progress = Arc::new(Progress::default());
    let workload_outcomes = match options.jobs {
        Some(jobs) => {
            let workload = WorkloadOptions {
                project_id,
                jobs,
                restore_share: options.restore_share,
                deadline,
            };
            Some(run_workload(&servers, &devices, workload, &progress, stop).await)
        }
        None => {
            eprintln!(
                "{} devices are running; queue jobs for project {project_id}, such as with \
                 `edgekeep backup create --project {project_id} --device ID`, and press Ctrl-C \
                 to stop",
                devices.len()
            );
            let mut stop = stop;
            let _ = stop.wait_for(|stop| *stop).await;
            None
        }
    };
    let elapsed = started.elapsed();
    let agent_errors = agents.stop().await;

    // Without a workload, the summary covers the project's jobs as the
    // jobs API lists them once the agents stopped.
    let outcomes = match workload_outcomes {
        Some(outcomes) => outcomes,
        None => project_jobs(&servers, project_id).await?,
    };
    let mut hooks = HookRuns::default();
    for device in &created {
        hooks.read(&device.folder.hook_log())?;
    }
    let facts = RunFacts {
        project_id,
        devices: devices.len(),
        requested: options.jobs,
        elapsed,
        retried_calls: servers.retried_calls(),
        adopted_jobs: progress.adopted.load(Ordering::Relaxed),
        agent_errors,
    };
    Ok(Summary::new(facts, &outcomes, &hooks))
}

/// Makes glibc's malloc serve every block of 128 KiB or more with its own
/// mapping and unmap it on free, for the rest of the process.
///
/// Each hook of a simulated agent forks this process, and a fork costs time
/// in proportion to the resident memory. By default glibc raises this mmap
/// threshold to the size of each large block freed (mallopt(3)), so the
/// 1 MiB buffers of every pack and restore stay resident in the heaps. In one
/// measurement (200 devices, 1,000 jobs, 2 vCPUs) this setting cut the peak
/// resident memory from 580 to 95 MiB and raised the rate from 17 to 64 jobs/s.
fn release_large_blocks() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes a malloc tuning value, and glibc
        // accepts the change while other threads allocate.
        let changed = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
        if changed != 1 {
            tracing::warn!("setting the malloc mmap threshold failed; forks of hooks get slower");
        }
    }
}

/// Runs the workload with a progress line on stderr every few seconds.
async fn run_workload(
    servers: &Arc<servers::Servers>,
    devices: &[SimDevice],
    options: WorkloadOptions,
    progress: &Arc<Progress>,
    stop: watch::Receiver<bool>,
) -> Vec<JobOutcome> {
    let started = Instant::now();
    let printer = {
        let progress = progress.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(PROGRESS_INTERVAL);
            ticks.tick().await;
            loop {
                ticks.tick().await;
                print_progress(&progress, options.jobs, started);
            }
        })
    };
    let outcomes = workload::run(servers.clone(), devices, options, progress.clone(), stop).await;
    printer.abort();
    print_progress(progress, options.jobs, started);
    outcomes
}

/// Prints `progress: ENDED/TOTAL jobs ended, ...`; tests read these lines.
fn print_progress(progress: &Progress, total: usize, started: Instant) {
    eprintln!(
        "progress: {}/{total} jobs ended, {} succeeded, {:.0} s",
        progress.ended.load(Ordering::Relaxed),
        progress.succeeded.load(Ordering::Relaxed),
        started.elapsed().as_secs_f64()
    );
}

/// Lists the backup and restore jobs of the project.
async fn project_jobs(
    servers: &servers::Servers,
    project_id: i64,
) -> anyhow::Result<Vec<JobOutcome>> {
    let jobs = servers
        .call(|client| async move { client.list_jobs(Some(project_id), None, None).await })
        .await
        .with_context(|| format!("failed to list the jobs of project {project_id}"))?;
    Ok(jobs
        .iter()
        .filter(|job| job.kind != JobKind::Import)
        .map(JobOutcome::from_job)
        .collect())
}
