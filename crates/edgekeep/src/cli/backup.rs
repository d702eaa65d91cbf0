//! `edgekeep backup ...`

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use edgekeep_api::{BACKUP_TYPE_MASTER, Backup, Client};

use super::{Connection, follow_job, format_bytes, format_time, parse_duration, transfer};

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: BackupCommand,
}

/// Options that name one device of one project.
#[derive(Debug, Args)]
struct Target {
    /// Id of the project.
    #[arg(long)]
    project: i64,
    /// Id of the device.
    #[arg(long)]
    device: i64,
}

/// Options for commands that can wait for their job.
#[derive(Debug, Args)]
struct Wait {
    /// Follow the job until it ends and fail unless it succeeded.
    #[arg(long)]
    wait: bool,
    /// With --wait: give up waiting after this long, such as 30m.
    #[arg(long, value_parser = parse_duration, default_value = "1h")]
    timeout: Duration,
}

#[derive(Debug, Subcommand)]
enum BackupCommand {
    /// Ask a device to back itself up.
    Create {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        wait: Wait,
    },
    /// List a device's complete backups, newest first.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Download a backup's .dat file, or print its 7-day download URL.
    Download {
        #[command(flatten)]
        target: Target,
        /// Timestamp of the backup, from `backup list`.
        #[arg(long)]
        timestamp: i64,
        /// Backup type; MASTER is a full device backup.
        #[arg(long = "type", default_value = BACKUP_TYPE_MASTER)]
        backup_type: String,
        /// File to write, or - for standard output. Default:
        /// device-ID-TIMESTAMP.dat in the current folder.
        #[arg(long, short)]
        out: Option<PathBuf>,
        /// Print the pre-signed URL instead of downloading.
        #[arg(long)]
        url_only: bool,
    },
    /// Upload a .dat file as a backup of a device, for example one taken
    /// from another server.
    Upload {
        #[command(flatten)]
        target: Target,
        /// The .dat file.
        file: PathBuf,
        /// Timestamp to list the backup under. Default: assigned by the server.
        #[arg(long)]
        timestamp: Option<i64>,
        /// Backup type; MASTER is a full device backup.
        #[arg(long = "type", default_value = BACKUP_TYPE_MASTER)]
        backup_type: String,
        #[command(flatten)]
        wait: Wait,
    },
    /// Restore a backup onto a device, which may differ from the device the
    /// backup came from.
    Restore {
        /// Project of the backup and the target device.
        #[arg(long)]
        project: i64,
        /// The device to restore onto.
        #[arg(long)]
        device: i64,
        /// Timestamp of the backup, from `backup list`.
        #[arg(long)]
        timestamp: i64,
        /// The device the backup is listed under, when it is not --device.
        #[arg(long)]
        source_device: Option<i64>,
        /// Backup type; MASTER is a full device backup.
        #[arg(long = "type", default_value = BACKUP_TYPE_MASTER)]
        backup_type: String,
        #[command(flatten)]
        wait: Wait,
    },
}

pub async fn run(args: BackupArgs) -> anyhow::Result<()> {
    let connection = args.connection;
    let client = connection.client()?;
    match args.command {
        BackupCommand::Create { target, wait } => {
            let job = client.init_backup(target.project, target.device).await?;
            finish_job_command(&connection, &client, job, &wait, "backup").await
        }
        BackupCommand::List { target } => {
            let backups = client.list_backups(target.project, target.device).await?;
            connection.print(&backups, |backups| print_backups(backups))
        }
        BackupCommand::Download {
            target,
            timestamp,
            backup_type,
            out,
            url_only,
        } => {
            let url = client
                .download_url(target.project, target.device, &backup_type, timestamp)
                .await?;
            if url_only {
                println!("{url}");
                return Ok(());
            }
            if out.as_deref() == Some(std::path::Path::new("-")) {
                transfer::download_to_stdout(&url).await?;
                return Ok(());
            }
            let out = out.unwrap_or_else(|| {
                PathBuf::from(format!("device-{}-{timestamp}.dat", target.device))
            });
            let size = transfer::download(&url, &out, connection.json).await?;
            if connection.json {
                println!("{}", serde_json::json!({"file": out, "size": size}));
            } else {
                println!("wrote {} ({})", out.display(), format_bytes(size));
            }
            Ok(())
        }
        BackupCommand::Upload {
            target,
            file,
            timestamp,
            backup_type,
            wait,
        } => {
            check_archive_magic(&file)?;
            if !file.is_file() {
                anyhow::bail!(
                    "{} is not a file; pass the path of a .dat backup",
                    file.display()
                );
            }
            let (url, job) = client
                .upload_url(target.project, target.device, &backup_type, timestamp)
                .await?;
            let size = transfer::upload(&url, &file, connection.json).await?;
            if !connection.json {
                println!("uploaded {} ({})", file.display(), format_bytes(size));
            }
            finish_job_command(&connection, &client, job, &wait, "import").await
        }
        BackupCommand::Restore {
            project,
            device,
            timestamp,
            source_device,
            backup_type,
            wait,
        } => {
            let job = client
                .init_restore(project, device, &backup_type, timestamp, source_device)
                .await?;
            finish_job_command(&connection, &client, job, &wait, "restore").await
        }
    }
}

/// Rejects a file that does not start like a `.dat` archive before
/// anything is uploaded; the server verifies the whole file afterwards.
fn check_archive_magic(file: &std::path::Path) -> anyhow::Result<()> {
    use std::io::Read;
    let mut magic = [0u8; 8];
    let read = std::fs::File::open(file)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| {
            format!(
                "cannot read {}; pass the path of a .dat backup",
                file.display()
            )
        });
    read?;
    if &magic != b"EDGEKEEP" {
        anyhow::bail!(
            "{} is not an edgekeep .dat archive (it does not start with EDGEKEEP); \
             pass a file from `edgekeep backup download`",
            file.display()
        );
    }
    Ok(())
}

/// Prints the queued job, or follows it with `--wait`.
async fn finish_job_command(
    connection: &Connection,
    client: &Client,
    job_id: Option<i64>,
    wait: &Wait,
    kind: &str,
) -> anyhow::Result<()> {
    let job_id = job_id.context("the server did not name the queued job")?;
    if !wait.wait {
        return connection.print(&serde_json::json!({"jobId": job_id}), |_| {
            println!("queued {kind} job {job_id}; follow it with `edgekeep job wait {job_id}`");
        });
    }
    let job = follow_job(client, job_id, wait.timeout).await?;
    connection.print(&job, |job| {
        let backup = job
            .timestamp
            .map(|t| format!(" (backup {} {t})", job.backup_type))
            .unwrap_or_default();
        println!("{kind} job {} succeeded{backup}", job.id);
    })
}

fn print_backups(backups: &[Backup]) {
    println!(
        "{:<14}  {:<7}  {:<20}  {:>10}  {:<20}  CHECKSUM",
        "TIMESTAMP", "TYPE", "CREATED", "SIZE", "SOURCE"
    );
    for b in backups {
        println!(
            "{:<14}  {:<7}  {:<20}  {:>10}  {:<20}  {}",
            b.timestamp,
            b.backup_type,
            format_time(b.created_at),
            format_bytes(b.size),
            b.source_device_name,
            &b.checksum[..b.checksum.len().min(16)],
        );
    }
}
