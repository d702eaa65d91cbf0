//! `edgekeep server`: runs the manager until SIGINT or SIGTERM.

use edgekeep_server::Config;

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub config: Config,
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    edgekeep_server::run(args.config).await
}
