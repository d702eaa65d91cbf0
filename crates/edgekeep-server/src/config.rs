//! Server configuration: command-line options, each also read from an
//! `EDGEKEEP_*` environment variable.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;

/// Default of `--max-backup-size`: 64 GiB.
pub const DEFAULT_MAX_BACKUP_SIZE: u64 = 64 << 30;
/// Default of `--s3-region`.
pub const DEFAULT_S3_REGION: &str = "us-east-1";

/// Configuration of `edgekeep server`.
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Folder for the metadata database, the embedded S3 objects and the
    /// generated credentials; created when missing.
    #[arg(long, env = "EDGEKEEP_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Address of the REST API and agent protocol listener; port 0 picks a
    /// free port.
    #[arg(long, env = "EDGEKEEP_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Address of the embedded S3 endpoint; port 0 picks a free port.
    /// Ignored with `--s3-endpoint`.
    #[arg(long, env = "EDGEKEEP_S3_LISTEN", default_value = "127.0.0.1:9000")]
    pub s3_listen: SocketAddr,

    /// URL of an external S3 service, such as `https://s3.example.com`.
    /// With it, the server keeps objects there and starts no embedded S3
    /// endpoint.
    #[arg(long, env = "EDGEKEEP_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,

    /// Region that requests to the external S3 service are signed for.
    #[arg(long, env = "EDGEKEEP_S3_REGION", default_value = DEFAULT_S3_REGION)]
    pub s3_region: String,

    /// Address the bucket as a host name (`https://BUCKET.HOST/KEY`) on
    /// the external S3 service, instead of as the first path segment.
    #[arg(long, env = "EDGEKEEP_S3_VIRTUAL_HOSTED")]
    pub s3_virtual_hosted: bool,

    /// Base URL of the API as clients reach it, used in messages. Defaults to
    /// the bound API listener.
    #[arg(long, env = "EDGEKEEP_PUBLIC_URL")]
    pub public_url: Option<String>,

    /// Base URL of the S3 endpoint as devices and users reach it, written
    /// into pre-signed URLs. Defaults to `--s3-endpoint`, or else to the
    /// bound S3 listener.
    #[arg(long, env = "EDGEKEEP_S3_PUBLIC_URL")]
    pub s3_public_url: Option<String>,

    /// Bucket that contains every object.
    #[arg(long, env = "EDGEKEEP_BUCKET", default_value = "edgekeep")]
    pub bucket: String,

    /// How long a queued backup or restore job waits for its device before
    /// it expires, such as `24h`, `90m` or `3600s`.
    #[arg(long, env = "EDGEKEEP_JOB_TTL", default_value = "24h", value_parser = parse_duration)]
    pub job_ttl: Duration,

    /// How long a device activation code stays valid.
    #[arg(long, env = "EDGEKEEP_ACTIVATION_TTL", default_value = "24h", value_parser = parse_duration)]
    pub activation_ttl: Duration,

    /// Administrator token. When set, this value replaces the stored
    /// administrator token and no new one is printed.
    #[arg(long, env = "EDGEKEEP_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// File whose first line is the administrator token.
    #[arg(
        long,
        env = "EDGEKEEP_ADMIN_TOKEN_FILE",
        conflicts_with = "admin_token"
    )]
    pub admin_token_file: Option<PathBuf>,

    /// S3 access key. Without it, the embedded endpoint uses a key
    /// generated on first start and kept in `DATA/s3-credentials.json`, and
    /// an external S3 service uses `AWS_ACCESS_KEY_ID`.
    #[arg(long, env = "EDGEKEEP_S3_ACCESS_KEY")]
    pub s3_access_key: Option<String>,

    /// S3 secret key; needed with `--s3-access-key`. Without both, an
    /// external S3 service uses `AWS_SECRET_ACCESS_KEY`.
    #[arg(long, env = "EDGEKEEP_S3_SECRET_KEY", hide_env_values = true)]
    pub s3_secret_key: Option<String>,

    /// File whose first line is the S3 secret key.
    #[arg(
        long,
        env = "EDGEKEEP_S3_SECRET_KEY_FILE",
        conflicts_with = "s3_secret_key"
    )]
    pub s3_secret_key_file: Option<PathBuf>,

    /// PostgreSQL URL of the metadata store, such as
    /// `postgres://edgekeep:PASSWORD@db:5432/edgekeep`. Without it, the
    /// metadata lives in `DATA/edgekeep.db` (SQLite).
    #[arg(long, env = "EDGEKEEP_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,

    /// File whose first line is the PostgreSQL URL, for a URL that contains
    /// a password.
    #[arg(
        long,
        env = "EDGEKEEP_DATABASE_URL_FILE",
        conflicts_with = "database_url"
    )]
    pub database_url_file: Option<PathBuf>,

    /// Maximum size of an uploaded backup file, such as `64GiB`, `500MiB`
    /// or a bare number of bytes. A larger upload fails its job.
    #[arg(long, env = "EDGEKEEP_MAX_BACKUP_SIZE", default_value = "64GiB", value_parser = parse_size)]
    pub max_backup_size: u64,

    /// How long a running backup or restore job may go without a progress
    /// report before it fails, such as `2m`; agents report at least every
    /// 5 seconds while a job runs.
    #[arg(long, env = "EDGEKEEP_JOB_HEARTBEAT_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub job_heartbeat_timeout: Duration,
}

impl Config {
    /// Builds a configuration with every default and the given data folder.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Config {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            s3_listen: SocketAddr::from(([127, 0, 0, 1], 9000)),
            s3_endpoint: None,
            s3_region: DEFAULT_S3_REGION.to_string(),
            s3_virtual_hosted: false,
            public_url: None,
            s3_public_url: None,
            bucket: "edgekeep".to_string(),
            job_ttl: Duration::from_secs(24 * 3600),
            activation_ttl: Duration::from_secs(24 * 3600),
            admin_token: None,
            admin_token_file: None,
            s3_access_key: None,
            s3_secret_key: None,
            s3_secret_key_file: None,
            database_url: None,
            database_url_file: None,
            max_backup_size: DEFAULT_MAX_BACKUP_SIZE,
            job_heartbeat_timeout: Duration::from_secs(120),
        }
    }

    /// Returns the administrator token given by option, environment or file.
    pub fn configured_admin_token(&self) -> anyhow::Result<Option<String>> {
        if let Some(token) = &self.admin_token {
            return Ok(Some(token.trim().to_string()));
        }
        match &self.admin_token_file {
            Some(path) => read_secret_file(path, "--admin-token-file").map(Some),
            None => Ok(None),
        }
    }

    /// Returns the configured S3 access key and secret key, or `None` when
    /// the generated credentials apply.
    pub fn configured_s3_credentials(&self) -> anyhow::Result<Option<(String, String)>> {
        let secret = match (&self.s3_secret_key, &self.s3_secret_key_file) {
            (Some(secret), _) => Some(secret.clone()),
            (None, Some(path)) => Some(read_secret_file(path, "--s3-secret-key-file")?),
            (None, None) => None,
        };
        match (&self.s3_access_key, secret) {
            (Some(access), Some(secret)) => Ok(Some((access.clone(), secret))),
            (None, None) => Ok(None),
            _ => anyhow::bail!(
                "--s3-access-key and an S3 secret key (--s3-secret-key or --s3-secret-key-file) \
                 must be given together"
            ),
        }
    }

    /// Returns the external S3 endpoint, or `None` for the embedded one.
    pub fn configured_s3_endpoint(&self) -> anyhow::Result<Option<String>> {
        let Some(endpoint) = &self.s3_endpoint else {
            return Ok(None);
        };
        let endpoint = endpoint.trim().trim_end_matches('/');
        anyhow::ensure!(
            endpoint.starts_with("http://") || endpoint.starts_with("https://"),
            "--s3-endpoint {endpoint:?} is not an http:// or https:// URL; give the S3 service \
             URL, such as https://s3.example.com, or leave it unset for the embedded endpoint"
        );
        Ok(Some(endpoint.to_string()))
    }

    /// Returns the access key and secret key for an external S3 service:
    /// the configured ones, or else `AWS_ACCESS_KEY_ID` and
    /// `AWS_SECRET_ACCESS_KEY` as read by `env`.
    pub fn external_s3_credentials(
        &self,
        env: impl Fn(&str) -> Option<String>,
    ) -> anyhow::Result<(String, String)> {
        if let Some(credentials) = self.configured_s3_credentials()? {
            return Ok(credentials);
        }
        let read = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        match (read("AWS_ACCESS_KEY_ID"), read("AWS_SECRET_ACCESS_KEY")) {
            (Some(access), Some(secret)) => {
                Ok((access.trim().to_string(), secret.trim().to_string()))
            }
            _ => anyhow::bail!(
                "missing S3 credentials for --s3-endpoint: set EDGEKEEP_S3_ACCESS_KEY and \
                 EDGEKEEP_S3_SECRET_KEY (or EDGEKEEP_S3_SECRET_KEY_FILE), or \
                 AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            ),
        }
    }

    /// Returns the PostgreSQL URL given by option, environment or file, or
    /// `None` for the SQLite store.
    pub fn configured_database_url(&self) -> anyhow::Result<Option<String>> {
        if let Some(url) = &self.database_url {
            let url = url.trim();
            anyhow::ensure!(
                !url.is_empty(),
                "--database-url is empty; give a postgres:// URL or leave it unset for SQLite"
            );
            return Ok(Some(url.to_string()));
        }
        match &self.database_url_file {
            Some(path) => read_secret_file(path, "--database-url-file").map(Some),
            None => Ok(None),
        }
    }
}

fn read_secret_file(path: &Path, option: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "failed to read the secret file {}; check {option}",
            path.display()
        )
    })?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    anyhow::ensure!(
        !secret.is_empty(),
        "the secret file {} given by {option} is empty",
        path.display()
    );
    Ok(secret)
}

/// Parses a duration such as `24h`, `90m`, `30s`, `2d` or a bare number of
/// seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("invalid duration {value:?}: expected a number and a unit such as 24h")
    })?;
    let unit_secs = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => {
            return Err(format!(
                "invalid duration unit {unit:?} in {value:?}: use s, m, h or d"
            ));
        }
    };
    Ok(Duration::from_secs(number * unit_secs))
}

/// Parses a size such as `64GiB`, `500MiB`, `10KiB`, `1TiB` or a bare
/// number of bytes. The units are binary (1 KiB is 1024 bytes).
pub fn parse_size(value: &str) -> Result<u64, String> {
    let value = value.trim();
    let split = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        format!("invalid size {value:?}: expected a number and a unit such as 64GiB")
    })?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {value:?}: use B, KiB, MiB, GiB or TiB"
            ));
        }
    };
    number.checked_mul(1u64 << shift).ok_or_else(|| {
        format!("invalid size {value:?}: the number of bytes does not fit in 64 bits")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_units() {
        assert_eq!(parse_size("64GiB"), Ok(64 << 30));
        assert_eq!(parse_size("500MiB"), Ok(500 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert!(parse_size("5GB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn parse_duration_units() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("90m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("15"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2d"), Ok(Duration::from_secs(172800)));
        assert!(parse_duration("5w").is_err());
        assert!(parse_duration("h").is_err());
    }

    #[test]
    fn s3_secret_read_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, "s3cret\n").unwrap();
        let mut config = Config::new(dir.path());
        config.s3_access_key = Some("EKKEY".into());
        config.s3_secret_key_file = Some(path);
        let credentials = config.configured_s3_credentials().unwrap();
        assert_eq!(credentials, Some(("EKKEY".into(), "s3cret".into())));
    }

    #[test]
    fn database_url_read_from_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("database-url");
        std::fs::write(&path, "postgres://edgekeep:pw@db:5432/fleet\n").unwrap();
        let mut config = Config::new(dir.path());
        assert_eq!(config.configured_database_url().unwrap(), None);
        config.database_url_file = Some(path);
        assert_eq!(
            config.configured_database_url().unwrap().as_deref(),
            Some("postgres://edgekeep:pw@db:5432/fleet")
        );
    }

    #[test]
    fn empty_database_url_is_rejected() {
        let mut config = Config::new("/data");
        config.database_url = Some("  ".into());
        let error = config.configured_database_url().unwrap_err();
        assert!(error.to_string().contains("--database-url"), "{error}");
    }

    fn environment(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.clone())
        }
    }

    #[test]
    fn external_s3_credentials_prefer_configured_keys() {
        let mut config = Config::new("/data");
        config.s3_access_key = Some("GKCONFIGURED".into());
        config.s3_secret_key = Some("configured-secret".into());
        let aws = environment(&[
            ("AWS_ACCESS_KEY_ID", "AKIAENV"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret"),
        ]);
        let (access, secret) = config.external_s3_credentials(aws).unwrap();
        assert_eq!(access, "GKCONFIGURED");
        assert_eq!(secret, "configured-secret");
    }

    #[test]
    fn external_s3_credentials_fall_back_to_aws_variables() {
        let config = Config::new("/data");
        let aws = environment(&[
            ("AWS_ACCESS_KEY_ID", "AKIAENV"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret\n"),
        ]);
        let (access, secret) = config.external_s3_credentials(aws).unwrap();
        assert_eq!(access, "AKIAENV");
        assert_eq!(secret, "env-secret");
    }

    #[test]
    fn missing_external_s3_credentials_name_variables() {
        let config = Config::new("/data");
        let only_access = environment(&[("AWS_ACCESS_KEY_ID", "AKIAENV")]);
        let error = config
            .external_s3_credentials(only_access)
            .unwrap_err()
            .to_string();
        for variable in [
            "EDGEKEEP_S3_ACCESS_KEY",
            "EDGEKEEP_S3_SECRET_KEY",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ] {
            assert!(error.contains(variable), "{variable} missing in: {error}");
        }
    }

    #[test]
    fn s3_endpoint_must_be_http_url() {
        let mut config = Config::new("/data");
        assert_eq!(config.configured_s3_endpoint().unwrap(), None);
        config.s3_endpoint = Some("https://s3.example.com/".into());
        assert_eq!(
            config.configured_s3_endpoint().unwrap().as_deref(),
            Some("https://s3.example.com")
        );
        config.s3_endpoint = Some("s3.example.com".into());
        let error = config.configured_s3_endpoint().unwrap_err();
        assert!(error.to_string().contains("--s3-endpoint"), "{error}");
    }

    #[test]
    fn s3_access_key_without_secret_is_rejected() {
        let mut config = Config::new("/data");
        config.s3_access_key = Some("EKKEY".into());
        let error = config.configured_s3_credentials().unwrap_err();
        assert!(error.to_string().contains("--s3-secret-key"), "{error}");
        assert_eq!(
            Config::new("/data").configured_s3_credentials().unwrap(),
            None
        );
    }
}
