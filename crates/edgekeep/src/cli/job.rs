//! Placeholder, replaced by the real command.

#[derive(Debug, clap::Subcommand)]
pub enum JobCommand {
    /// Not yet available.
    Placeholder,
}

pub async fn run(_command: JobCommand) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
