//! Placeholder, replaced by the real command.

#[derive(Debug, clap::Subcommand)]
pub enum ArchiveCommand {
    /// Not yet available.
    Placeholder,
}

pub fn run(_args: ArchiveCommand) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
