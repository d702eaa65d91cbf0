//! Placeholder, replaced by the real command.

#[derive(Debug, clap::Args)]
pub struct AgentArgs {}

pub async fn run(_args: AgentArgs) -> anyhow::Result<()> {
    anyhow::bail!("not available yet")
}
