//! `edgekeep device ...`

use clap::{Args, Subcommand};
use edgekeep_api::{Device, DeviceActivation};

use super::{Connection, format_time};

#[derive(Debug, Args)]
pub struct DeviceArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: DeviceCommand,
}

#[derive(Debug, Subcommand)]
enum DeviceCommand {
    /// Register a device and print its one-time activation code.
    Create {
        /// Id of the project.
        #[arg(long)]
        project: i64,
        /// Name of the new device.
        name: String,
    },
    /// List the devices of a project with their online state.
    List {
        /// Id of the project.
        #[arg(long)]
        project: i64,
    },
    /// Show one device.
    Show {
        /// Id of the project.
        #[arg(long)]
        project: i64,
        /// Id of the device.
        id: i64,
    },
    /// Issue a new activation code, for example for replaced hardware. The
    /// device's current credential stops working.
    ActivationCode {
        /// Id of the project.
        #[arg(long)]
        project: i64,
        /// Id of the device.
        id: i64,
    },
}

pub async fn run(args: DeviceArgs) -> anyhow::Result<()> {
    let connection = args.connection;
    let client = connection.client()?;
    match args.command {
        DeviceCommand::Create { project, name } => {
            let activation = client.create_device(project, &name).await?;
            connection.print(&activation, print_activation)
        }
        DeviceCommand::ActivationCode { project, id } => {
            let activation = client.new_activation_code(project, id).await?;
            connection.print(&activation, print_activation)
        }
        DeviceCommand::List { project } => {
            let devices = client.list_devices(project).await?;
            connection.print(&devices, |devices| {
                println!(
                    "{:>6}  {:<24}  {:<8}  {:<20}  {:<8}  PLATFORM",
                    "ID", "NAME", "STATE", "LAST SEEN", "ARCH"
                );
                for d in devices {
                    print_row(d);
                }
            })
        }
        DeviceCommand::Show { project, id } => {
            let device = client.device(project, id).await?;
            connection.print(&device, |d| {
                println!(
                    "{:>6}  {:<24}  {:<8}  {:<20}  {:<8}  PLATFORM",
                    "ID", "NAME", "STATE", "LAST SEEN", "ARCH"
                );
                print_row(d);
            })
        }
    }
}

fn print_row(d: &Device) {
    let state = if !d.activated {
        "new"
    } else if d.online {
        "online"
    } else {
        "offline"
    };
    println!(
        "{:>6}  {:<24}  {:<8}  {:<20}  {:<8}  {}",
        d.id,
        d.name,
        state,
        d.last_seen_at
            .map(format_time)
            .unwrap_or_else(|| "-".into()),
        d.arch.as_deref().unwrap_or("-"),
        d.platform_version.as_deref().unwrap_or("-"),
    );
}

fn print_activation(activation: &DeviceActivation) {
    let device = &activation.device;
    println!(
        "device {} ({}) in project {}",
        device.id, device.name, device.project_id
    );
    println!("activation code: {}", activation.activation_code);
    println!(
        "valid until {}, once; start the agent on the device with \
         `edgekeep agent --server URL --activation-code CODE --state-dir DIR`",
        format_time(activation.activation_expires_at)
    );
}
