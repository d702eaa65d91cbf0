//! `edgekeep server`: runs the manager until SIGINT or SIGTERM.

use edgekeep_server::Config;

#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Boxed because the server options are far larger than any other
    /// command's arguments.
    #[command(flatten)]
    pub config: Box<Config>,
}

pub async fn run(args: ServerArgs) -> anyhow::Result<()> {
    edgekeep_server::run(*args.config).await
}
