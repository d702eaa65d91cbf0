//! `edgekeep job ...`

use std::time::Duration;

use clap::{Args, Subcommand};
use edgekeep_api::{Job, JobState};

use super::{Connection, follow_job, format_time, parse_duration};

#[derive(Debug, Args)]
pub struct JobArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: JobCommand,
}

#[derive(Debug, Subcommand)]
enum JobCommand {
    /// List jobs, newest first.
    List {
        /// Only jobs of this project.
        #[arg(long)]
        project: Option<i64>,
        /// Only jobs of this device.
        #[arg(long)]
        device: Option<i64>,
        /// Only jobs in this state: queued, running, succeeded, failed,
        /// expired or cancelled.
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
    },
    /// Show one job, with its failure reason if any.
    Show {
        /// Id of the job.
        id: i64,
    },
    /// Follow a job until it ends; exits non-zero unless it succeeded.
    Wait {
        /// Id of the job.
        id: i64,
        /// Give up waiting after this long, such as 30m.
        #[arg(long, value_parser = parse_duration, default_value = "1h")]
        timeout: Duration,
    },
    /// Cancel a queued or running job.
    Cancel {
        /// Id of the job.
        id: i64,
    },
}

fn parse_state(value: &str) -> Result<JobState, String> {
    JobState::parse(value).ok_or_else(|| {
        format!(
            "invalid job state {value:?}: use queued, running, succeeded, failed, expired or \
             cancelled"
        )
    })
}

pub async fn run(args: JobArgs) -> anyhow::Result<()> {
    let connection = args.connection;
    let client = connection.client()?;
    match args.command {
        JobCommand::List {
            project,
            device,
            state,
        } => {
            let jobs = client.list_jobs(project, device, state).await?;
            connection.print(&jobs, |jobs| {
                print_header();
                for job in jobs {
                    print_row(job);
                }
            })
        }
        JobCommand::Show { id } => {
            let job = client.job(id).await?;
            connection.print(&job, print_details)
        }
        JobCommand::Wait { id, timeout } => {
            let job = follow_job(&client, id, timeout).await?;
            connection.print(&job, print_details)
        }
        JobCommand::Cancel { id } => {
            let job = client.cancel_job(id).await?;
            connection.print(&job, print_details)
        }
    }
}

fn print_header() {
    println!(
        "{:>6}  {:<8}  {:<10}  {:>7}  {:>7}  {:>5}  {:<20}  REASON",
        "ID", "KIND", "STATE", "PROJECT", "DEVICE", "DONE", "CREATED"
    );
}

fn print_row(job: &Job) {
    println!(
        "{:>6}  {:<8}  {:<10}  {:>7}  {:>7}  {:>4}%  {:<20}  {}",
        job.id,
        job.kind.as_str(),
        job.state.as_str(),
        job.project_id,
        job.device_id,
        (job.progress * 100.0).round(),
        format_time(job.created_at),
        job.reason.as_deref().unwrap_or(""),
    );
}

fn print_details(job: &Job) {
    println!("job {} ({})", job.id, job.kind.as_str());
    println!("  state:        {}", job.state.as_str());
    println!("  project:      {}", job.project_id);
    println!("  device:       {}", job.device_id);
    if let Some(timestamp) = job.timestamp {
        println!("  backup:       {} {timestamp}", job.backup_type);
    }
    if let Some(source) = job.source_device_id {
        println!("  from device:  {source}");
    }
    println!("  progress:     {:.0}%", job.progress * 100.0);
    if let Some(message) = &job.message {
        println!("  step:         {message}");
    }
    println!("  requested by: {}", job.requested_by);
    println!("  created:      {}", format_time(job.created_at));
    if let Some(started) = job.started_at {
        println!("  started:      {}", format_time(started));
    }
    if let Some(finished) = job.finished_at {
        println!("  finished:     {}", format_time(finished));
    }
    if !job.state.is_final() {
        println!("  expires:      {}", format_time(job.expires_at));
    }
    if let Some(reason) = &job.reason {
        println!("  reason:       {reason}");
    }
}
