//! The edgekeep manager: REST API, agent protocol, job dispatch, upload
//! validation, the metadata store and the embedded S3 endpoint.
//!
//! [`start`] binds the listeners and returns a [`RunningServer`]; [`run`]
//! does the same and waits for SIGINT or SIGTERM.

pub mod api;
pub mod auth;
pub mod config;
pub mod error;
pub mod jobs;
pub mod migrate;
pub mod objects;
pub mod s3;
pub mod service;
pub mod store;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::Config;
pub use error::{Error, Result};
pub use service::Manager;
pub use store::{PostgresStore, SqliteStore, Store};

/// Returns the current time in milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC, such as
/// `2026-03-01T12:03:00Z`.
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);

    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// A started server: its addresses and the handle that stops it.
pub struct RunningServer {
    /// Address the REST API listener is bound to.
    pub api_addr: SocketAddr,
    /// Address the embedded S3 listener is bound to, or `None` with an
    /// external S3 service.
    pub s3_addr: Option<SocketAddr>,
    /// Base URL of the API, as written to `endpoints.json`.
    pub api_url: String,
    /// Base URL of the S3 endpoint as written into pre-signed URLs.
    pub s3_url: String,
    pub manager: Arc<Manager>,
    /// True when this start created the administrator token and printed it,
    /// because the store held none and none was configured.
    pub admin_token_created: bool,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    /// Exclusive lock on `DATA/server.lock`, released when the server is
    /// dropped.
    _data_lock: std::fs::File,
}

impl RunningServer {
    /// Stops accepting connections, lets open requests finish and waits for
    /// the background tasks.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
        tracing::info!("server stopped");
    }

    /// Returns a token that stops the server when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }
}

/// Starts the server and runs it until SIGINT or SIGTERM.
pub async fn run(config: Config) -> anyhow::Result<()> {
    let server = start(config).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down");
    server.shutdown().await;
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("failed to listen for SIGTERM")?;
    tokio::select! {
        result = tokio::signal::ctrl_c() => result.context("failed to listen for SIGINT")?,
        _ = terminate.recv() => {}
    }
    Ok(())
}

/// Opens the stores, binds the API listener and, without `--s3-endpoint`,
/// the embedded S3 listener, writes `DATA/endpoints.json` and starts
/// serving.
pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    let data_dir = &config.data_dir;
    let objects_dir = data_dir.join("objects");
    let temp_dir = data_dir.join("tmp");
    // The embedded endpoint creates `objects/` itself, so an external S3
    // leaves no empty folder behind.
    for dir in [data_dir, &temp_dir] {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("failed to create the data folder {}", dir.display()))?;
    }
    let data_lock = lock_data_dir(
        data_dir,
        "stop that process or give this one another --data-dir",
    )?;

    clear_temp_dir(&temp_dir)?;

    // Metadata store.
    let store: Arc<dyn Store> = match config.configured_database_url()? {
        Some(url) => Arc::new(PostgresStore::connect(&url).await?),
        None => Arc::new(SqliteStore::open(&data_dir.join("edgekeep.db"))?),
    };

    // Listener and object storage, before the administrator token, so a
    // start that fails here prints no token that the next start would not
    // show again.
    let api_listener = TcpListener::bind(config.listen).await.with_context(|| {
        format!(
            "failed to bind the API listener on {}; check --listen",
            config.listen
        )
    })?;
    let api_addr = api_listener.local_addr()?;
    let api_url = config
        .public_url
        .clone()
        .unwrap_or_else(|| url_of(api_addr));
    let storage = match config.configured_s3_endpoint()? {
        Some(endpoint) => open_external_s3(&config, &endpoint).await?,
        None => open_embedded_s3(&config, &objects_dir).await?,
    };
    let s3_url = storage.public_url.clone();
    let s3_addr = storage.embedded.as_ref().map(|embedded| embedded.addr);
    let admin_token_created =
        bootstrap_admin_token(store.as_ref(), config.configured_admin_token()?).await?;

    let mut manager = Manager::new(
        store,
        storage.objects,
        config.job_ttl,
        config.activation_ttl,
        temp_dir,
    );
    manager.max_backup_size = config.max_backup_size;
    manager.heartbeat_timeout = config.job_heartbeat_timeout;
    if storage.embedded.is_some() {
        manager.embedded_bucket_dir = Some((objects_dir.clone(), config.bucket.clone()));
    }
    let manager = Arc::new(manager);

    // Serve.
    let shutdown = CancellationToken::new();
    let mut tasks = vec![serve(
        api_listener,
        api::router(manager.clone()),
        shutdown.clone(),
        "API",
    )];
    if let Some(embedded) = storage.embedded {
        tasks.push(serve(
            embedded.listener,
            s3::router(embedded.service),
            shutdown.clone(),
            "S3",
        ));
    }
    tasks.extend(jobs::spawn_background(manager.clone(), shutdown.clone()));

    write_endpoints(data_dir, &api_url, &s3_url)?;
    tracing::info!(api = %api_url, s3 = %s3_url, data_dir = %data_dir.display(), "server started");
    Ok(RunningServer {
        api_addr,
        s3_addr,
        api_url,
        s3_url,
        manager,
        admin_token_created,
        shutdown,
        tasks,
        _data_lock: data_lock,
    })
}

/// Object storage of a server: the clients, the S3 base URL written into
/// pre-signed URLs and, for the embedded endpoint, its listener.
struct ObjectStorage {
    objects: objects::Objects,
    public_url: String,
    embedded: Option<EmbeddedS3>,
}

struct EmbeddedS3 {
    listener: TcpListener,
    addr: SocketAddr,
    service: s3s::service::S3Service,
}

/// Maximum wait for the bucket check at start. By default object_store 0.12
/// retries a failed connection for up to 3 minutes, so an unreachable
/// endpoint would otherwise delay the start that long.
const BUCKET_CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Binds the embedded S3 listener over `DATA/objects`, with the configured
/// or generated credentials.
async fn open_embedded_s3(config: &Config, objects_dir: &Path) -> anyhow::Result<ObjectStorage> {
    let listener = TcpListener::bind(config.s3_listen).await.with_context(|| {
        format!(
            "failed to bind the S3 listener on {}; check --s3-listen",
            config.s3_listen
        )
    })?;
    let addr = listener.local_addr()?;
    let internal_url = url_of(addr);
    let public_url = config
        .s3_public_url
        .clone()
        .unwrap_or_else(|| internal_url.clone());

    let configured = config.configured_s3_credentials()?;
    let credentials = s3::load_credentials(
        &config.data_dir,
        configured.as_ref().map(|(access, _)| access.as_str()),
        configured.as_ref().map(|(_, secret)| secret.as_str()),
    )?;
    let service = s3::build_service(objects_dir, &config.bucket, &credentials)?;
    let objects = objects::Objects::new(&objects::S3Settings {
        internal_url,
        public_url: public_url.trim_end_matches('/').to_string(),
        bucket: config.bucket.clone(),
        access_key: credentials.access_key,
        secret_key: credentials.secret_key,
    })?;
    Ok(ObjectStorage {
        objects,
        public_url,
        embedded: Some(EmbeddedS3 {
            listener,
            addr,
            service,
        }),
    })
}

/// Builds the clients for an external S3 service and checks that the
/// bucket can be listed with the credentials.
async fn open_external_s3(config: &Config, endpoint: &str) -> anyhow::Result<ObjectStorage> {
    let (access_key, secret_key) =
        config.external_s3_credentials(|name| std::env::var(name).ok())?;
    let public_url = config
        .s3_public_url
        .clone()
        .unwrap_or_else(|| endpoint.to_string());
    let addressing = objects::S3Addressing {
        region: config.s3_region.clone(),
        virtual_hosted: config.s3_virtual_hosted,
    };
    let objects = objects::Objects::with_addressing(
        &objects::S3Settings {
            internal_url: endpoint.to_string(),
            public_url: public_url.trim_end_matches('/').to_string(),
            bucket: config.bucket.clone(),
            access_key,
            secret_key,
        },
        &addressing,
    )?;

    let bucket = &config.bucket;
    match tokio::time::timeout(BUCKET_CHECK_TIMEOUT, objects.check_bucket()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => anyhow::bail!(
            "failed to list the bucket {bucket} at the S3 endpoint {endpoint}: {error}; check \
             --s3-endpoint, --s3-region, --bucket and the S3 credentials"
        ),
        Err(_) => anyhow::bail!(
            "listing the bucket {bucket} at the S3 endpoint {endpoint} timed out after {} s; \
             check that --s3-endpoint is reachable",
            BUCKET_CHECK_TIMEOUT.as_secs()
        ),
    }
    tracing::info!(endpoint, bucket, region = %addressing.region, "using an external S3 service");
    Ok(ObjectStorage {
        objects,
        public_url,
        embedded: None,
    })
}

/// Deletes the files that validations of a stopped server left in
/// `DATA/tmp`. The data folder's lock is held, so no other process uses
/// them.
fn clear_temp_dir(temp_dir: &Path) -> anyhow::Result<()> {
    let entries = std::fs::read_dir(temp_dir)
        .with_context(|| format!("failed to read {}", temp_dir.display()))?;
    let mut removed = 0;
    for entry in entries {
        let path = entry
            .with_context(|| format!("failed to read {}", temp_dir.display()))?
            .path();
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        result.with_context(|| format!("failed to delete the leftover {}", path.display()))?;
        removed += 1;
    }
    if removed > 0 {
        tracing::info!(removed, dir = %temp_dir.display(), "deleted leftover temporary files");
    }
    Ok(())
}

/// Takes an exclusive `flock` on `DATA/server.lock` and writes this
/// process's id into it, so a second server on the same folder fails at
/// start instead of sharing the database and objects. `next_step` ends the
/// error when another process holds the lock.
fn lock_data_dir(data_dir: &Path, next_step: &str) -> anyhow::Result<std::fs::File> {
    use std::io::{Read, Seek, Write};

    let path = data_dir.join("server.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("failed to open the lock file {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => "another process".to_string(),
                pid => format!("another process (pid {pid})"),
            };
            anyhow::bail!(
                "the data folder {} is in use by {holder}, which holds {}; {next_step}",
                data_dir.display(),
                path.display()
            );
        }
        Err(std::fs::TryLockError::Error(error)) => {
            return Err(error).with_context(|| format!("failed to lock {}", path.display()));
        }
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .with_context(|| format!("failed to write {}", path.display()))?;
    Ok(file)
}

fn serve(
    listener: TcpListener,
    router: axum::Router,
    shutdown: CancellationToken,
    name: &'static str,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let result = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = result {
            tracing::error!(listener = name, error = %error, "listener failed");
        }
    })
}

/// Returns the URL of a bound address; a wildcard address becomes loopback.
fn url_of(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, addr.port()))
}

/// Writes `endpoints.json` through a temporary file and a rename, so
/// readers never see a partial file.
fn write_endpoints(data_dir: &Path, api_url: &str, s3_url: &str) -> anyhow::Result<()> {
    let path = data_dir.join("endpoints.json");
    let temp = data_dir.join(".endpoints.json.tmp");
    let body = serde_json::json!({ "api": api_url, "s3": s3_url });
    std::fs::write(&temp, serde_json::to_vec_pretty(&body)?)
        .with_context(|| format!("failed to write {}", temp.display()))?;
    std::fs::rename(&temp, &path).with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

/// Stores the configured administrator token, or creates one on first start
/// and prints it once. Returns true when it created one.
///
/// The store creates a token only while none exists, in one atomic step, so
/// of several replicas that first start together on an empty database only
/// one prints a token, and the others use it.
async fn bootstrap_admin_token(
    store: &dyn Store,
    configured: Option<String>,
) -> anyhow::Result<bool> {
    if let Some(token) = configured {
        anyhow::ensure!(
            token.len() >= 16,
            "the configured administrator token is too short ({} characters); use at least 16, \
             such as a generated ek_ token",
            token.len()
        );
        store
            .set_admin_token(&auth::hash_secret(&token), now_ms())
            .await?;
        tracing::info!("administrator token set from the configuration");
        return Ok(false);
    }
    if store.admin_token_exists().await? {
        return Ok(false);
    }
    let token = auth::generate_secret(auth::TOKEN_PREFIX);
    let created = store
        .create_admin_token_if_missing(&auth::hash_secret(&token), now_ms())
        .await?;
    if created.is_none() {
        tracing::info!("another server replica created the administrator token first");
        return Ok(false);
    }
    println!("Administrator token (shown only once; store it now): {token}");
    tracing::info!("created the administrator token");
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_time_is_rfc3339_utc() {
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_798_761_599_999), "2026-12-31T23:59:59Z");
    }
}
