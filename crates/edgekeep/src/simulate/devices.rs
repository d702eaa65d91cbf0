//! The folders of a simulated device: a generated state, the agent config
//! and the log that the backup and restore hooks append job ids to.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Platform version every simulated device reports.
const PLATFORM_VERSION: &str = "2.14.0";

/// The generated files of one device, sized from the command's options.
#[derive(Debug, Clone, Copy)]
pub struct StateShape {
    /// Number of configuration files under `config/`.
    pub files: usize,
    /// Approximate total size of the state in bytes, split between the
    /// configuration files and the SQLite database.
    pub size: u64,
}

/// Paths of one simulated device under the run folder.
#[derive(Debug, Clone)]
pub struct DeviceFolder {
    pub root: PathBuf,
}

impl DeviceFolder {
    pub fn new(run_dir: &Path, index: usize) -> Self {
        DeviceFolder {
            root: run_dir.join("devices").join(format!("{index:05}")),
        }
    }

    pub fn state(&self) -> PathBuf {
        self.root.join("state")
    }

    pub fn home(&self) -> PathBuf {
        self.root.join("home")
    }

    pub fn config(&self) -> PathBuf {
        self.root.join("agent.toml")
    }

    /// Returns the file that the `pre_backup` and `pre_restore` hooks append
    /// `PHASE JOB_ID` lines to. It lies outside the state, so restores do
    /// not replace it.
    pub fn hook_log(&self) -> PathBuf {
        self.root.join("hooks.log")
    }

    /// Writes the state and the agent config of device `index`. The same
    /// index and shape always give the same files.
    pub fn lay_out(&self, index: usize, shape: StateShape) -> anyhow::Result<()> {
        let state = self.state();
        if self.root.exists() {
            bail!(
                "{} already exists; pick an empty --dir for the simulation",
                self.root.display()
            );
        }
        for sub in ["config", "data", "identity"] {
            std::fs::create_dir_all(state.join(sub))
                .with_context(|| format!("failed to create {}", state.join(sub).display()))?;
        }
        let mut rng = StdRng::seed_from_u64(index as u64);

        // Half of the bytes go to the configuration files, half to the
        // database, so both the file walk and the SQLite snapshot do work.
        let files = shape.files.max(1);
        let file_size = (shape.size / 2 / files as u64).max(64) as usize;
        for file in 0..files {
            let path = state.join(format!("config/connector-{file:03}.json"));
            write(&path, &connector_config(index, file, file_size, &mut rng))?;
        }
        write(
            &state.join("identity/device.crt"),
            &certificate(index, &mut rng),
        )?;
        write(
            &state.join("identity/hostname"),
            &format!("sim-gateway-{index:05}\n"),
        )?;
        write_historian(&state.join("data/historian.db"), index, shape.size / 2)?;
        write(&self.config(), &self.agent_config()?)
    }

    /// Returns the agent config: the whole state with one SQLite database,
    /// the certificate and host name as identity, and the hooks that log
    /// each job.
    fn agent_config(&self) -> anyhow::Result<String> {
        let log = self.hook_log();
        let log = log
            .to_str()
            .filter(|path| !path.contains(['\'', '\n']))
            .with_context(|| {
                format!(
                    "the hook log path {} is not valid UTF-8 or contains a quote or line break; \
                     pick another --dir",
                    log.display()
                )
            })?;
        // The log path goes to `sh` as $1, so no shell quoting is needed, and
        // into a TOML literal string, which takes any character but ' and a
        // line break.
        let hook = format!(
            "{{ command = ['sh', '-c', 'echo \"$EDGEKEEP_PHASE $EDGEKEEP_JOB_ID\" >> \"$1\"', \
             'sh', '{log}'], timeout_secs = 60 }}"
        );
        Ok(format!(
            "platform_version = \"{PLATFORM_VERSION}\"\n\
             identity = [\"identity/device.crt\", \"identity/hostname\"]\n\
             \n\
             [[sqlite]]\n\
             path = \"data/historian.db\"\n\
             \n\
             [hooks]\n\
             pre_backup = {hook}\n\
             pre_restore = {hook}\n"
        ))
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("failed to write {}", path.display()))
}

/// Returns a connector definition padded with tag entries to about `size`
/// bytes.
fn connector_config(index: usize, file: usize, size: usize, rng: &mut StdRng) -> String {
    let mut text = format!(
        "{{\n  \"name\": \"connector-{file}\",\n  \"device\": \"sim-gateway-{index:05}\",\n  \
         \"host\": \"192.0.2.{}\",\n  \"port\": 502,\n  \"tags\": [\n",
        rng.gen_range(1..255)
    );
    let mut tag = 0;
    while text.len() < size {
        let _ = writeln!(
            text,
            "    {{\"name\": \"tag-{tag}\", \"address\": {}, \"scale\": {:.3}}},",
            40001 + rng.gen_range(0..10_000),
            rng.gen_range(0.0..100.0)
        );
        tag += 1;
    }
    text.push_str("    {\"name\": \"end\", \"address\": 0, \"scale\": 1.0}\n  ]\n}\n");
    text
}

/// Returns a PEM-shaped text of random base64, different for every device.
fn certificate(index: usize, rng: &mut StdRng) -> String {
    const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = format!("# sim-gateway-{index:05}\n-----BEGIN CERTIFICATE-----\n");
    for _ in 0..20 {
        let line: String = (0..64)
            .map(|_| BASE64[rng.gen_range(0..BASE64.len())] as char)
            .collect();
        text.push_str(&line);
        text.push('\n');
    }
    text.push_str("-----END CERTIFICATE-----\n");
    text
}

/// Creates a SQLite historian of about `size` bytes of samples.
fn write_historian(path: &Path, index: usize, size: u64) -> anyhow::Result<()> {
    let mut db = rusqlite::Connection::open(path)
        .with_context(|| format!("failed to create {}", path.display()))?;
    let transaction = db.transaction()?;
    transaction.execute_batch(
        "CREATE TABLE samples (id INTEGER PRIMARY KEY, tag TEXT NOT NULL, value REAL NOT NULL);",
    )?;
    // A row takes about 40 bytes with the tag name and page overhead.
    let rows = (size / 40).max(10);
    {
        let mut insert = transaction.prepare("INSERT INTO samples (tag, value) VALUES (?1, ?2)")?;
        for row in 0..rows {
            let tag = format!("sim-{index:05}.tag-{}", row % 16);
            insert.execute((tag, (row as f64) * 0.5))?;
        }
    }
    transaction.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: StateShape = StateShape {
        files: 4,
        size: 32 * 1024,
    };

    fn read_tree(root: &Path) -> Vec<(String, Vec<u8>)> {
        let mut files = Vec::new();
        for sub in ["config", "identity"] {
            let mut names: Vec<_> = std::fs::read_dir(root.join(sub))
                .unwrap()
                .map(|entry| entry.unwrap().file_name().into_string().unwrap())
                .collect();
            names.sort();
            for name in names {
                let path = format!("{sub}/{name}");
                files.push((path.clone(), std::fs::read(root.join(&path)).unwrap()));
            }
        }
        files
    }

    #[test]
    fn same_index_gives_same_state() {
        let dir = tempfile::tempdir().unwrap();
        let first = DeviceFolder::new(&dir.path().join("a"), 7);
        let second = DeviceFolder::new(&dir.path().join("b"), 7);
        first.lay_out(7, SHAPE).unwrap();
        second.lay_out(7, SHAPE).unwrap();
        assert_eq!(read_tree(&first.state()), read_tree(&second.state()));
    }

    #[test]
    fn other_index_gives_other_identity() {
        let dir = tempfile::tempdir().unwrap();
        let first = DeviceFolder::new(dir.path(), 1);
        let second = DeviceFolder::new(dir.path(), 2);
        first.lay_out(1, SHAPE).unwrap();
        second.lay_out(2, SHAPE).unwrap();
        let certificate = |folder: &DeviceFolder| {
            std::fs::read(folder.state().join("identity/device.crt")).unwrap()
        };
        assert_ne!(certificate(&first), certificate(&second));
    }

    #[test]
    fn state_has_requested_files_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let folder = DeviceFolder::new(dir.path(), 0);
        folder.lay_out(0, SHAPE).unwrap();
        let configs = std::fs::read_dir(folder.state().join("config"))
            .unwrap()
            .count();
        assert_eq!(configs, 4);
        let db = std::fs::metadata(folder.state().join("data/historian.db"))
            .unwrap()
            .len();
        assert!(db >= 8 * 1024, "historian is {db} bytes");
        assert!(db <= 64 * 1024, "historian is {db} bytes");
    }

    #[test]
    fn agent_config_parses_with_hooks() {
        let dir = tempfile::tempdir().unwrap();
        let folder = DeviceFolder::new(dir.path(), 3);
        folder.lay_out(3, SHAPE).unwrap();
        let config = edgekeep_agent::AgentConfig::load(&folder.config()).unwrap();
        assert_eq!(config.sqlite[0].path, "data/historian.db");
        assert_eq!(
            config.identity,
            ["identity/device.crt", "identity/hostname"]
        );
        let hook = config.hooks.pre_restore.expect("pre_restore hook");
        assert_eq!(
            hook.command.last().unwrap(),
            folder.hook_log().to_str().unwrap()
        );
        assert!(config.hooks.pre_backup.is_some());
    }

    #[test]
    fn hook_appends_phase_and_job_id() {
        let dir = tempfile::tempdir().unwrap();
        let folder = DeviceFolder::new(dir.path(), 5);
        folder.lay_out(5, SHAPE).unwrap();
        let config = edgekeep_agent::AgentConfig::load(&folder.config()).unwrap();
        let hook = config.hooks.pre_backup.unwrap();
        for job_id in [41, 42] {
            let context = edgekeep_agent::HookContext {
                job_id: Some(job_id),
                state_dir: &folder.state(),
            };
            edgekeep_agent::run_hook("pre_backup", &hook, context).unwrap();
        }
        let log = std::fs::read_to_string(folder.hook_log()).unwrap();
        assert_eq!(log, "pre_backup 41\npre_backup 42\n");
    }

    #[test]
    fn existing_folder_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let folder = DeviceFolder::new(dir.path(), 0);
        folder.lay_out(0, SHAPE).unwrap();
        let err = folder.lay_out(0, SHAPE).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
    }
}
