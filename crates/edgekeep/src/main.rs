//! `edgekeep`: the manager server, the device agent and the command line.

mod agent_cmd;
mod archive_cmd;
mod bench;
mod cli;
mod migrate_cmd;
mod quickstart;
mod server_cmd;
mod simulate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "edgekeep",
    version,
    about = "Backup and restore for fleets of edge devices",
    after_help = "Exit codes: 0 success, 1 failure, 2 invalid arguments, 3 not found, \
                  4 token missing, invalid or not allowed, 5 conflict with a queued or running \
                  job, 6 server unreachable."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the manager server: REST API, job dispatcher and embedded S3 endpoint.
    Server(server_cmd::ServerArgs),
    /// Run the device agent: activate once, then run backup and restore jobs.
    Agent(agent_cmd::AgentArgs),
    /// Manage projects.
    Project(cli::project::ProjectArgs),
    /// Manage devices and their activation codes.
    Device(cli::device::DeviceArgs),
    /// Make, list, download, upload and restore backups.
    Backup(cli::backup::BackupArgs),
    /// Show, follow and cancel jobs.
    Job(cli::job::JobArgs),
    /// Manage API tokens (administrator token required).
    Token(cli::token::TokenArgs),
    /// Pack, unpack, verify and inspect `.dat` archives locally.
    #[command(subcommand)]
    Archive(archive_cmd::ArchiveCommand),
    /// Run the whole backup and restore workflow on this machine and check it.
    Quickstart(quickstart::QuickstartArgs),
    /// Measure packing and unpacking speed and memory against tar and zstd,
    /// or with `bench fleet` job throughput and server memory.
    Bench(bench::BenchArgs),
    /// Move an embedded installation (SQLite and the embedded S3 endpoint)
    /// to PostgreSQL and an external S3 service; the server must be stopped.
    Migrate(migrate_cmd::MigrateArgs),
    /// Run many simulated devices in this process against a server, with a
    /// job workload, for load and fault tests.
    Simulate(simulate::SimulateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Server(_) | Command::Agent(_)) {
        // Let a CLI command exit quietly when the reader of its output goes
        // away, as in `edgekeep job list | head`, instead of panicking on
        // EPIPE. The server and agent keep ignoring SIGPIPE, because a peer
        // that drops a connection must not kill them.
        // SAFETY: setting a signal disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    init_logging(&cli.command);
    let result = match cli.command {
        Command::Archive(command) => archive_cmd::run(command),
        Command::Bench(args) => bench::run(args),
        command => run_async(command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let status = err
                .downcast_ref::<edgekeep_api::ApiError>()
                .map(|api| api.status);
            if json_requested() {
                let body = serde_json::json!({"status": status, "message": format!("{err:#}")});
                eprintln!("{body}");
            } else {
                eprintln!("error: {err:#}");
            }
            ExitCode::from(exit_code(status))
        }
    }
}

/// Returns true when the command line requests JSON output, so errors are
/// printed as JSON too.
fn json_requested() -> bool {
    std::env::args().any(|arg| arg == "--json")
}

/// Maps the HTTP status of a failed call to the exit code listed in `--help`.
/// Code 2 stays clap's code for invalid arguments.
fn exit_code(status: Option<u16>) -> u8 {
    match status {
        Some(404) => 3,
        Some(401 | 403) => 4,
        Some(409) => 5,
        Some(0) => 6,
        _ => 1,
    }
}

fn run_async(command: Command) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match command {
            Command::Server(args) => server_cmd::run(args).await,
            Command::Agent(args) => agent_cmd::run(args).await,
            Command::Project(args) => cli::project::run(args).await,
            Command::Device(args) => cli::device::run(args).await,
            Command::Backup(args) => cli::backup::run(args).await,
            Command::Job(args) => cli::job::run(args).await,
            Command::Token(args) => cli::token::run(args).await,
            Command::Quickstart(args) => quickstart::run(args).await,
            Command::Migrate(args) => migrate_cmd::run(args).await,
            Command::Simulate(args) => simulate::run(args).await,
            Command::Archive(_) | Command::Bench(_) => unreachable!("run without a runtime"),
        }
    })
}

/// Long-running commands log at info by default; CLI commands log only
/// warnings so their output stays readable. `RUST_LOG` overrides both.
fn init_logging(command: &Command) {
    let default = match command {
        Command::Server(_) | Command::Agent(_) | Command::Migrate(_) => "info",
        _ => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
