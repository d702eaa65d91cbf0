//! Placeholder, replaced by the real command.

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Not yet available.
    Placeholder,
}

pub async fn run(_command: TokenCommand) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
