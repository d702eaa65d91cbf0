//! The agent config: what the device state is and which hooks run around
//! backup and restore. Every field is optional.

use std::path::{Path, PathBuf};

use globset::{Glob, GlobSet, GlobSetBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};

/// The agent config, read from a TOML file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Version of the device platform; the agent version when unset.
    pub platform_version: Option<String>,
    /// Paths relative to the state folder that make up the backup; the whole
    /// state folder when unset.
    pub include: Option<Vec<String>>,
    /// Globs relative to the state folder that are left out of the backup and
    /// kept as they are on restore. `*` stays within one path component and
    /// `**` crosses components.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Paths that belong to the hardware. A restore from another device keeps
    /// this device's copies of them.
    #[serde(default)]
    pub identity: Vec<String>,
    /// SQLite databases, snapshotted through SQLite's online backup API.
    #[serde(default)]
    pub sqlite: Vec<SqliteDatabase>,
    #[serde(default)]
    pub hooks: Hooks,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteDatabase {
    /// Database file, relative to the state folder.
    pub path: String,
}

/// Commands run around backup and restore.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    pub pre_backup: Option<Hook>,
    pub post_backup: Option<Hook>,
    pub pre_restore: Option<Hook>,
    pub post_restore: Option<Hook>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// Program and arguments, run without a shell.
    pub command: Vec<String>,
    /// Seconds before the hook's process group is killed.
    #[serde(default = "default_hook_timeout")]
    pub timeout_secs: u64,
}

fn default_hook_timeout() -> u64 {
    60
}

impl AgentConfig {
    /// Reads and validates the config file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text).map_err(|message| Error::Config {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Parses and validates config text, returning the problem as a message.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let mut config: AgentConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.normalize()?;
        Ok(config)
    }

    /// Checks every path and glob, and rewrites paths without `.` components
    /// or trailing slashes.
    fn normalize(&mut self) -> std::result::Result<(), String> {
        // A version that does not parse would make every backup taken with it
        // impossible to restore, because the restore compares versions.
        if let Some(version) = &self.platform_version {
            crate::version::check_version(version).map_err(|_| {
                format!(
                    "platform_version {version:?} is not dotted numbers such as 2.14.0 (a suffix \
                     after '-' or '+' is allowed); set it to the platform's version"
                )
            })?;
        }
        if let Some(include) = &mut self.include {
            if include.is_empty() {
                return Err(
                    "include is an empty list; remove it to back up the whole state folder"
                        .to_string(),
                );
            }
            normalize_all("include", include)?;
        }
        normalize_all("identity", &mut self.identity)?;
        for database in &mut self.sqlite {
            database.path = normalize_path("sqlite.path", &database.path)?;
        }
        for pattern in &self.exclude {
            if pattern.starts_with('/') || pattern.split('/').any(|part| part == "..") {
                return Err(format!(
                    "exclude glob {pattern:?} must be relative to the state folder, without '..'"
                ));
            }
            Glob::new(pattern).map_err(|e| format!("exclude glob {pattern:?} is invalid: {e}"))?;
        }
        let hooks = [
            ("hooks.pre_backup", &self.hooks.pre_backup),
            ("hooks.post_backup", &self.hooks.post_backup),
            ("hooks.pre_restore", &self.hooks.pre_restore),
            ("hooks.post_restore", &self.hooks.post_restore),
        ];
        for (field, hook) in hooks {
            if let Some(hook) = hook {
                if hook.command.is_empty() {
                    return Err(format!(
                        "{field}.command is empty; give the program and its arguments"
                    ));
                }
                if hook.timeout_secs == 0 {
                    return Err(format!("{field}.timeout_secs is 0; give at least 1 second"));
                }
            }
        }
        Ok(())
    }

    /// The platform version this device reports.
    pub fn platform_version(&self) -> String {
        self.platform_version
            .clone()
            .unwrap_or_else(|| crate::AGENT_VERSION.to_string())
    }

    /// Compiles the exclude globs.
    pub(crate) fn exclude_set(&self) -> Result<GlobSet> {
        let mut builder = GlobSetBuilder::new();
        for pattern in &self.exclude {
            let glob = globset::GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .map_err(|e| Error::Config {
                    path: PathBuf::from("exclude"),
                    message: format!("glob {pattern:?} is invalid: {e}"),
                })?;
            builder.add(glob);
        }
        builder.build().map_err(|e| Error::Config {
            path: PathBuf::from("exclude"),
            message: e.to_string(),
        })
    }
}

fn normalize_all(field: &str, paths: &mut [String]) -> std::result::Result<(), String> {
    for path in paths.iter_mut() {
        *path = normalize_path(field, path)?;
    }
    Ok(())
}

/// Returns `path` as `a/b/c`, rejecting absolute paths, `..` and empty paths.
fn normalize_path(field: &str, path: &str) -> std::result::Result<String, String> {
    if path.starts_with('/') {
        return Err(format!(
            "{field} path {path:?} is absolute; give it relative to the state folder"
        ));
    }
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "{field} path {path:?} contains '..'; give a path inside the state folder"
                ));
            }
            part => parts.push(part),
        }
    }
    if parts.is_empty() {
        return Err(format!("{field} path {path:?} names no file or folder"));
    }
    Ok(parts.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_config_parses() {
        let config = AgentConfig::parse(
            r#"
            platform_version = "2.14.0"
            include = ["config", "./flows/", "data", "identity"]
            exclude = ["logs/**", "**/*.tmp"]
            identity = ["identity/device.crt", "identity/hostname"]
            [[sqlite]]
            path = "data/historian.db"
            [hooks]
            pre_backup = { command = ["sh", "-c", "true"], timeout_secs = 5 }
            post_restore = { command = ["true"] }
            "#,
        )
        .unwrap();
        assert_eq!(config.platform_version(), "2.14.0");
        let include = config.include.unwrap();
        assert_eq!(include, ["config", "flows", "data", "identity"]);
        assert_eq!(config.sqlite[0].path, "data/historian.db");
        assert_eq!(config.hooks.pre_backup.unwrap().timeout_secs, 5);
        assert_eq!(config.hooks.post_restore.unwrap().timeout_secs, 60);
    }

    #[test]
    fn unknown_field_is_rejected() {
        let err = AgentConfig::parse("includes = [\"a\"]").unwrap_err();
        assert!(err.contains("includes"), "{err}");
    }

    #[test]
    fn absolute_path_is_rejected() {
        let err = AgentConfig::parse("identity = [\"/etc/hostname\"]").unwrap_err();
        assert!(err.contains("identity"), "{err}");
        assert!(err.contains("/etc/hostname"), "{err}");
    }

    #[test]
    fn parent_path_is_rejected() {
        let err = AgentConfig::parse("[[sqlite]]\npath = \"data/../../x.db\"").unwrap_err();
        assert!(err.contains("sqlite.path"), "{err}");
        assert!(err.contains("data/../../x.db"), "{err}");
    }

    #[test]
    fn non_numeric_platform_version_is_rejected() {
        for version in ["abc", "", "2..1", "2.x"] {
            let err = AgentConfig::parse(&format!("platform_version = {version:?}")).unwrap_err();
            assert!(err.contains("platform_version"), "{err}");
            assert!(err.contains(&format!("{version:?}")), "{err}");
            assert!(err.contains("2.14.0"), "{err}");
        }
    }

    #[test]
    fn platform_version_with_suffix_is_accepted() {
        let config = AgentConfig::parse("platform_version = \"2.14.1-rc2\"").unwrap();
        assert_eq!(config.platform_version(), "2.14.1-rc2");
    }

    #[test]
    fn empty_config_backs_up_everything() {
        let config = AgentConfig::parse("").unwrap();
        assert!(config.include.is_none());
        assert_eq!(config.platform_version(), crate::AGENT_VERSION);
    }
}
