//! Placeholder, replaced by the real command.

#[derive(Debug, clap::Subcommand)]
pub enum ProjectCommand {
    /// Not yet available.
    Placeholder,
}

pub async fn run(_command: ProjectCommand) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
