//! The metadata store an end-to-end server runs on: SQLite in its data
//! folder, or a fresh PostgreSQL database that is dropped when the test ends.

use std::io::Write;
use std::sync::Arc;

use edgekeep_server::store::postgres;

/// Base URL of the PostgreSQL server used by the tests.
pub const DATABASE_URL_VARIABLE: &str = "EDGEKEEP_TEST_DATABASE_URL";
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Store of one test run. Clones share the database, which is dropped with
/// the last clone.
#[derive(Clone)]
pub enum StoreChoice {
    Sqlite,
    Postgres(Arc<TestDatabase>),
}

impl StoreChoice {
    /// Creates a fresh PostgreSQL database. Returns `None`, after printing
    /// why, when PostgreSQL cannot be reached and `CI` is not `true`.
    pub async fn postgres() -> Option<StoreChoice> {
        TestDatabase::create()
            .await
            .map(|database| StoreChoice::Postgres(Arc::new(database)))
    }

    /// Returns the value for `EDGEKEEP_DATABASE_URL`, or `None` for SQLite.
    pub fn database_url(&self) -> Option<String> {
        match self {
            StoreChoice::Sqlite => None,
            StoreChoice::Postgres(database) => Some(database.url.clone()),
        }
    }

    /// Points a command that starts a server at this store. The variable is
    /// removed for SQLite, so a value in the caller's environment is ignored.
    pub fn configure(&self, command: &mut std::process::Command) {
        match self.database_url() {
            Some(url) => command.env("EDGEKEEP_DATABASE_URL", url),
            None => command.env_remove("EDGEKEEP_DATABASE_URL"),
        };
        command.env_remove("EDGEKEEP_DATABASE_URL_FILE");
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
/// named function. Each function takes a [`StoreChoice`].
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
