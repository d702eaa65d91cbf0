//! Placeholder, replaced by the real command.

#[derive(Debug, clap::Subcommand)]
pub enum BackupCommand {
    /// Not yet available.
    Placeholder,
}

pub async fn run(_command: BackupCommand) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
