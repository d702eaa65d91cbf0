//! Placeholder, replaced by the real command.

#[derive(Debug, clap::Subcommand)]
pub enum DeviceCommand {
    /// Not yet available.
    Placeholder,
}

pub async fn run(_command: DeviceCommand) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
