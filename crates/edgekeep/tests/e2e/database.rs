//! The stores an end-to-end server runs on: SQLite in its data folder with
//! the embedded S3 endpoint, or a fresh PostgreSQL database with a fresh
//! Garage S3 cluster, both removed when the test ends.

use std::io::Write;
use std::sync::Arc;

use edgekeep_server::store::postgres;

pub use crate::garage::Garage;

/// Base URL of the PostgreSQL server used by the tests.
pub const DATABASE_URL_VARIABLE: &str = "EDGEKEEP_TEST_DATABASE_URL";
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Bucket of the Garage variant, other than the default `edgekeep` so that
/// the tests also cover `--bucket`.
pub const GARAGE_BUCKET: &str = "edgekeep-e2e";

/// Variables that point a server at object storage. They are removed for
/// the embedded endpoint, so values in the caller's environment are ignored.
const S3_VARIABLES: [&str; 8] = [
    "EDGEKEEP_S3_ENDPOINT",
    "EDGEKEEP_S3_REGION",
    "EDGEKEEP_S3_VIRTUAL_HOSTED",
    "EDGEKEEP_S3_ACCESS_KEY",
    "EDGEKEEP_S3_SECRET_KEY",
    "EDGEKEEP_S3_SECRET_KEY_FILE",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
];

/// Stores of one test run. Clones share the database and the Garage
/// cluster, which are removed with the last clone.
#[derive(Clone)]
pub enum StoreChoice {
    /// SQLite and the embedded S3 endpoint.
    Sqlite,
    /// PostgreSQL and an external S3 service (Garage).
    Postgres(Arc<TestDatabase>, Arc<Garage>),
}

impl StoreChoice {
    /// Starts a Garage cluster and creates a fresh PostgreSQL database.
    /// Returns `None`, after printing why, when Garage is not installed or
    /// PostgreSQL cannot be reached and `CI` is not `true`.
    pub async fn postgres() -> Option<StoreChoice> {
        let garage = tokio::task::spawn_blocking(|| Garage::start(GARAGE_BUCKET))
            .await
            .unwrap()?;
        let database = TestDatabase::create().await?;
        Some(StoreChoice::Postgres(Arc::new(database), Arc::new(garage)))
    }

    /// Returns the value for `EDGEKEEP_DATABASE_URL`, or `None` for SQLite.
    pub fn database_url(&self) -> Option<String> {
        match self {
            StoreChoice::Sqlite => None,
            StoreChoice::Postgres(database, _) => Some(database.url.clone()),
        }
    }

    /// Returns the external S3 cluster, or `None` for the embedded endpoint.
    pub fn garage(&self) -> Option<&Garage> {
        match self {
            StoreChoice::Sqlite => None,
            StoreChoice::Postgres(_, garage) => Some(garage),
        }
    }

    /// Points a command that starts a server at these stores through
    /// environment variables: `EDGEKEEP_*` for the database, the S3
    /// endpoint, region and bucket, and `AWS_*` for the S3 credentials.
    pub fn configure(&self, command: &mut std::process::Command) {
        match self.database_url() {
            Some(url) => command.env("EDGEKEEP_DATABASE_URL", url),
            None => command.env_remove("EDGEKEEP_DATABASE_URL"),
        };
        command.env_remove("EDGEKEEP_DATABASE_URL_FILE");

        for variable in S3_VARIABLES {
            command.env_remove(variable);
        }
        match self.garage() {
            Some(garage) => {
                command
                    .env("EDGEKEEP_S3_ENDPOINT", &garage.endpoint)
                    .env("EDGEKEEP_S3_REGION", &garage.region)
                    .env("EDGEKEEP_BUCKET", &garage.bucket)
                    .env("AWS_ACCESS_KEY_ID", &garage.access_key)
                    .env("AWS_SECRET_ACCESS_KEY", &garage.secret_key);
            }
            None => {
                command.env_remove("EDGEKEEP_BUCKET");
            }
        }
    }
}

/// A database named `edgekeep_test_<random>` on the test PostgreSQL server,
/// dropped on drop.
pub struct TestDatabase {
    pub url: String,
    base_url: String,
    name: String,
}

impl TestDatabase {
    pub async fn create() -> Option<TestDatabase> {
        let base_url = std::env::var(DATABASE_URL_VARIABLE)
            .unwrap_or_else(|_| DEFAULT_DATABASE_URL.to_string());
        let client = match postgres::connect_client(&base_url).await {
            Ok(client) => client,
            Err(error) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!(
                    "PostgreSQL is unreachable and CI=true requires the PostgreSQL tests: \
                     {error:#}; start it or set {DATABASE_URL_VARIABLE}"
                )
            }
            Err(error) => {
                // Written to stderr directly, because the test harness hides
                // `println!` output of passing tests.
                let line = format!(
                    "skipped the PostgreSQL variant: PostgreSQL is unreachable ({error:#}); \
                     start it or set {DATABASE_URL_VARIABLE}\n"
                );
                let _ = std::io::stderr().write_all(line.as_bytes());
                return None;
            }
        };
        let name = format!("edgekeep_test_{:016x}", rand::random::<u64>());
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("failed to create the test database {name}: {e}"));
        let url = postgres::database_url(&base_url, &name).unwrap();
        Some(TestDatabase {
            url,
            base_url,
            name,
        })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime, which cannot block on a
        // future, so the database is dropped from a thread with its own.
        let (base_url, name) = (self.base_url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let client = postgres::connect_client(&base_url).await?;
                client
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
        if let Ok(Err(error)) = dropped {
            eprintln!("failed to drop the test database {}: {error:#}", self.name);
        }
    }
}

/// Generates a `sqlite` and a `postgres` test module, each with one test per
/// named function. Each function takes a [`StoreChoice`]: SQLite with the
/// embedded S3 endpoint, or PostgreSQL with Garage.
macro_rules! e2e_tests {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    super::$name($crate::database::StoreChoice::Sqlite).await;
                }
            )*
        }

        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread")]
                async fn $name() {
                    if let Some(store) = $crate::database::StoreChoice::postgres().await {
                        super::$name(store).await;
                    }
                }
            )*
        }
    };
}
