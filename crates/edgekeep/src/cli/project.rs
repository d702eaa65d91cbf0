//! `edgekeep project ...`

use clap::{Args, Subcommand};

use super::{Connection, format_time};

#[derive(Debug, Args)]
pub struct ProjectArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: ProjectCommand,
}

#[derive(Debug, Subcommand)]
enum ProjectCommand {
    /// Create a project.
    Create {
        /// Name of the new project.
        name: String,
    },
    /// List projects.
    List,
}

pub async fn run(args: ProjectArgs) -> anyhow::Result<()> {
    let connection = args.connection;
    let client = connection.client()?;
    match args.command {
        ProjectCommand::Create { name } => {
            let project = client.create_project(&name).await?;
            connection.print(&project, |p| {
                println!("created project {} ({})", p.id, p.name);
            })
        }
        ProjectCommand::List => {
            let projects = client.list_projects().await?;
            connection.print(&projects, |projects| {
                println!("{:>6}  {:<30}  CREATED", "ID", "NAME");
                for p in projects {
                    println!("{:>6}  {:<30}  {}", p.id, p.name, format_time(p.created_at));
                }
            })
        }
    }
}
