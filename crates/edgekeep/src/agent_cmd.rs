//! `edgekeep agent`: runs the device agent.

use std::path::PathBuf;

use edgekeep_agent::AgentOptions;

#[derive(Debug, clap::Args)]
pub struct AgentArgs {
    /// Base URL of the edgekeep server, such as http://manager.plant.local:8080,
    /// or the base URLs of several server replicas separated by commas. The
    /// agent uses one and moves on to the next when a call gets no response
    /// or a 502, 503 or 504.
    #[arg(long, env = "EDGEKEEP_SERVER", value_name = "URL[,URL...]")]
    server: String,

    /// One-time activation code from `edgekeep device create`; needed on the
    /// first start only.
    #[arg(long, env = "EDGEKEEP_ACTIVATION_CODE", hide_env_values = true)]
    activation_code: Option<String>,

    /// Folder that contains the device state to back up and restore.
    #[arg(long)]
    state_dir: PathBuf,

    /// Agent config file (TOML): include and exclude paths, SQLite databases,
    /// identity paths and hooks. Without it the whole state folder is backed up.
    #[arg(long)]
    config: Option<PathBuf>,

    /// Folder for the credential, the restore journal and temporary files;
    /// by default STATE_DIR's sibling named `<name>.edgekeep-agent`.
    #[arg(long)]
    home: Option<PathBuf>,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let options = AgentOptions {
        server_url: args.server,
        activation_code: args.activation_code,
        state_dir: args.state_dir,
        config_path: args.config,
        home: args.home,
        http: None,
        timeouts: edgekeep_api::AgentTimeouts::default(),
    };
    edgekeep_agent::run(options).await?;
    Ok(())
}
