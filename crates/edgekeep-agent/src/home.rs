//! The agent home: credential, crash journal, temporary archives, staging
//! and rollback folders. It sits outside the state folder so credentials are
//! never backed up, and on the same file system so renames are atomic.

use std::fmt;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{remove_any, write_atomic};

/// The agent home folder.
#[derive(Debug, Clone)]
pub struct AgentHome {
    dir: PathBuf,
}

impl AgentHome {
    /// Returns the default home of `state_dir`: its sibling named
    /// `<state-dir-name>.edgekeep-agent`.
    pub fn default_dir(state_dir: &Path) -> Result<PathBuf> {
        let state = std::path::absolute(state_dir).at("resolving", state_dir)?;
        let (Some(parent), Some(name)) = (state.parent(), state.file_name()) else {
            return Err(Error::Config {
                path: state_dir.to_path_buf(),
                message: "the state folder has no parent to hold the agent home; pass --home"
                    .to_string(),
            });
        };
        let mut home_name = name.to_os_string();
        home_name.push(".edgekeep-agent");
        Ok(parent.join(home_name))
    }

    /// Opens (creating it with mode 0700 if needed) the home at `dir`, which
    /// must lie outside `state_dir`.
    pub fn open(dir: &Path, state_dir: &Path) -> Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .at("creating agent home", dir)?;
        let home = dir.canonicalize().at("resolving", dir)?;
        let state = state_dir
            .canonicalize()
            .at("resolving state folder", state_dir)?;
        if home.starts_with(&state) || state.starts_with(&home) {
            return Err(Error::Config {
                path: dir.to_path_buf(),
                message: format!(
                    "the agent home and the state folder {} overlap; pick a home outside the \
                     state, on the same file system",
                    state.display()
                ),
            });
        }
        Ok(AgentHome { dir: home })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn credential_path(&self) -> PathBuf {
        self.dir.join("credential.json")
    }

    pub fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.json")
    }

    /// Folder the archive of a restore job is unpacked into. After the swap it
    /// contains the rollback copy.
    pub fn staging_path(&self, job_id: i64) -> PathBuf {
        self.dir.join(format!("staging-{job_id}"))
    }

    /// Temporary archive of a job: the packed backup or the downloaded file.
    pub fn archive_path(&self, job_id: i64) -> PathBuf {
        self.dir.join(format!("job-{job_id}.dat"))
    }

    /// Deletes the work files that jobs left behind when the agent was killed:
    /// `job-*.dat` archives, `staging-*` folders, `sqlite-*` snapshot folders
    /// and the temporary files of atomic writes. `keep` (the staging folder a
    /// journal refers to) stays. Returns the deleted paths.
    ///
    /// Call it only while no job runs, after journal recovery.
    pub fn remove_leftovers(&self, keep: Option<&Path>) -> Result<Vec<PathBuf>> {
        let mut removed = Vec::new();
        for entry in std::fs::read_dir(&self.dir).at("listing agent home", &self.dir)? {
            let entry = entry.at("listing agent home", &self.dir)?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let path = entry.path();
            if !is_work_file(name) || keep == Some(path.as_path()) {
                continue;
            }
            remove_any(&path)?;
            tracing::info!(path = %path.display(), "removed a work file left by an earlier run");
            removed.push(path);
        }
        removed.sort();
        Ok(removed)
    }

    /// Reads the stored credential, if any.
    pub fn load_credential(&self) -> Result<Option<Credential>> {
        let path = self.credential_path();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("reading credential", path, e)),
        };
        let credential = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Credential(format!(
                "{} is not a valid credential file ({e}); delete it and activate again with a \
                 new activation code",
                path.display()
            ))
        })?;
        Ok(Some(credential))
    }

    /// Stores the credential with mode 0600.
    pub fn save_credential(&self, credential: &Credential) -> Result<()> {
        let path = self.credential_path();
        let bytes = serde_json::to_vec_pretty(credential).expect("a credential serializes");
        write_atomic(&path, &bytes, 0o600)?;
        // The mode given at creation does not change an existing file.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .at("setting mode of", &path)
    }
}

/// True for the names of the work files jobs create in the home.
fn is_work_file(name: &str) -> bool {
    let job_archive = name.starts_with("job-") && name.ends_with(".dat");
    let temporary = ["journal.tmp", "credential.tmp"].contains(&name);
    job_archive || name.starts_with("staging-") || name.starts_with("sqlite-") || temporary
}

/// Device credential from activation, stored in `credential.json`.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Credential {
    pub server_url: String,
    pub project_id: i64,
    pub device_id: i64,
    pub device_uid: String,
    pub device_name: String,
    pub credential: String,
    /// SHA-256 of the activation code that produced this credential, so a
    /// restart with the same code does not activate again.
    pub activation_code_sha256: Option<String>,
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credential")
            .field("server_url", &self.server_url)
            .field("project_id", &self.project_id)
            .field("device_id", &self.device_id)
            .field("device_uid", &self.device_uid)
            .field("device_name", &self.device_name)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn default_home_is_state_sibling() {
        let home = AgentHome::default_dir(Path::new("/var/lib/gateway")).unwrap();
        assert_eq!(home, Path::new("/var/lib/gateway.edgekeep-agent"));
    }

    #[test]
    fn home_inside_state_is_rejected() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let err = AgentHome::open(&state.join("agent"), &state).unwrap_err();
        assert!(err.to_string().contains("overlap"), "{err}");
    }

    #[test]
    fn remove_leftovers_deletes_only_work_files() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let home = AgentHome::open(&root.path().join("home"), &state).unwrap();
        std::fs::write(home.archive_path(3), "partial").unwrap();
        std::fs::create_dir_all(home.staging_path(4).join("config")).unwrap();
        std::fs::create_dir(home.staging_path(5)).unwrap();
        std::fs::create_dir(home.dir().join("sqlite-abc123")).unwrap();
        std::fs::write(home.dir().join("journal.tmp"), "{").unwrap();
        std::fs::write(home.credential_path(), "{}").unwrap();
        std::fs::write(home.journal_path(), "{}").unwrap();
        std::fs::write(home.dir().join("notes.txt"), "operator notes").unwrap();

        let removed = home.remove_leftovers(Some(&home.staging_path(5))).unwrap();
        let expected = [
            home.archive_path(3),
            home.dir().join("journal.tmp"),
            home.dir().join("sqlite-abc123"),
            home.staging_path(4),
        ];
        assert_eq!(removed, expected);
        let mut left: Vec<String> = std::fs::read_dir(home.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["credential.json", "journal.json", "notes.txt", "staging-5"]
        );
    }

    #[test]
    fn credential_file_is_private() {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let home = AgentHome::open(&root.path().join("home"), &state).unwrap();
        let credential = Credential {
            server_url: "http://127.0.0.1:1".into(),
            project_id: 1,
            device_id: 2,
            device_uid: "uid".into(),
            device_name: "line-1".into(),
            credential: "secret".into(),
            activation_code_sha256: None,
        };
        home.save_credential(&credential).unwrap();
        let mode = std::fs::metadata(home.credential_path()).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(home.load_credential().unwrap(), Some(credential.clone()));
        assert!(!format!("{credential:?}").contains("secret"));
    }
}
