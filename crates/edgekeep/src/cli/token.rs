//! `edgekeep token ...`

use clap::{Args, Subcommand};
use edgekeep_api::CreateToken;

use super::{Connection, format_time, parse_duration};

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(flatten)]
    connection: Connection,
    #[command(subcommand)]
    command: TokenCommand,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create an API token; its secret is printed once.
    Create {
        /// Name shown in job records as the requester.
        name: String,
        /// Limit the token to this project; repeat for several. Default: all.
        #[arg(long = "project")]
        projects: Vec<i64>,
        /// Lifetime such as 30d or 12h. Default: no expiry.
        #[arg(long, value_parser = parse_duration)]
        expires_in: Option<std::time::Duration>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token at once.
    Revoke {
        /// Id of the token, from `token list`.
        id: i64,
    },
}

pub async fn run(args: TokenArgs) -> anyhow::Result<()> {
    let connection = args.connection;
    let client = connection.client()?;
    match args.command {
        TokenCommand::Create {
            name,
            projects,
            expires_in,
        } => {
            let expires_at = expires_in.map(|d| now_millis() + d.as_millis() as i64);
            let request = CreateToken {
                name,
                project_ids: (!projects.is_empty()).then_some(projects),
                expires_at,
            };
            let created = client.create_token(&request).await?;
            connection.print(&created, |c| {
                println!("created token {} ({})", c.info.id, c.info.name);
                println!("{}", c.token);
                println!("This secret is shown only once; store it now.");
            })
        }
        TokenCommand::List => {
            let tokens = client.list_tokens().await?;
            connection.print(&tokens, |tokens| {
                println!(
                    "{:>5}  {:<20}  {:<12}  {:<20}  STATUS",
                    "ID", "NAME", "PROJECTS", "EXPIRES"
                );
                for t in tokens {
                    let scope = match &t.project_ids {
                        None => "all".to_string(),
                        Some(ids) => ids
                            .iter()
                            .map(|id| id.to_string())
                            .collect::<Vec<_>>()
                            .join(","),
                    };
                    let expires = t.expires_at.map(format_time).unwrap_or_else(|| "-".into());
                    let status = if t.revoked_at.is_some() {
                        "revoked"
                    } else if t.admin {
                        "admin"
                    } else {
                        "active"
                    };
                    println!(
                        "{:>5}  {:<20}  {:<12}  {:<20}  {status}",
                        t.id, t.name, scope, expires
                    );
                }
            })
        }
        TokenCommand::Revoke { id } => {
            client.revoke_token(id).await?;
            if connection.json {
                println!("null");
            } else {
                println!("revoked token {id}");
            }
            Ok(())
        }
    }
}

fn now_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
