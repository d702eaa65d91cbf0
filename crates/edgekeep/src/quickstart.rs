//! Placeholder, replaced by the real command.

#[derive(Debug, clap::Args)]
pub struct QuickstartArgs {}

pub async fn run(_args: QuickstartArgs) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
