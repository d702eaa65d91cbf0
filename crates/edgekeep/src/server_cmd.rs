//! Placeholder, replaced by the real command.

#[derive(Debug, clap::Args)]
pub struct ServerArgs {}

pub async fn run(_args: ServerArgs) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
