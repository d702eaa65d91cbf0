//! Helpers shared by the agent's integration tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use edgekeep_agent::{AgentConfig, AgentHome, RestoreTarget};
use edgekeep_archive::SourceInfo;

/// One entry of a [`TreeSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, content: Vec<u8> },
    Symlink { target: PathBuf },
}

/// Every path below a folder with its type, mode and content, for
/// before-and-after equality checks.
pub type TreeSnapshot = BTreeMap<String, Node>;

pub fn snapshot_tree(root: &Path) -> TreeSnapshot {
    let mut tree = TreeSnapshot::new();
    let mode = fs::metadata(root).unwrap().mode() & 0o7777;
    tree.insert(String::new(), Node::Dir { mode });
    walk(root, "", &mut tree);
    tree
}

fn walk(dir: &Path, prefix: &str, tree: &mut TreeSnapshot) {
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let rel = format!("{prefix}{}", entry.file_name().to_string_lossy());
        let meta = fs::symlink_metadata(entry.path()).unwrap();
        let mode = meta.mode() & 0o7777;
        if meta.file_type().is_symlink() {
            let target = fs::read_link(entry.path()).unwrap();
            tree.insert(rel, Node::Symlink { target });
        } else if meta.is_dir() {
            tree.insert(rel.clone(), Node::Dir { mode });
            walk(&entry.path(), &format!("{rel}/"), tree);
        } else {
            let content = fs::read(entry.path()).unwrap();
            tree.insert(rel, Node::File { mode, content });
        }
    }
}

pub fn write(root: &Path, rel: &str, content: &str) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, content).unwrap();
}

pub fn read(root: &Path, rel: &str) -> String {
    fs::read_to_string(root.join(rel)).unwrap()
}

/// A simulated device: a state folder and its agent home in a temp folder.
pub struct Device {
    pub root: tempfile::TempDir,
    pub state: PathBuf,
    pub home: AgentHome,
    pub uid: String,
    pub config: AgentConfig,
}

pub const IDENTITY_CONFIG: &str = r#"
include = ["config", "flows", "identity", "data"]
exclude = ["logs/**", "**/*.tmp"]
identity = ["identity/device.crt", "identity/hostname"]
"#;

impl Device {
    pub fn new(uid: &str, config: &str) -> Device {
        let root = tempfile::tempdir().unwrap();
        let state = root.path().join("state");
        fs::create_dir(&state).unwrap();
        let state = state.canonicalize().unwrap();
        let home_dir = AgentHome::default_dir(&state).unwrap();
        let home = AgentHome::open(&home_dir, &state).unwrap();
        Device {
            root,
            state,
            home,
            uid: uid.to_string(),
            config: AgentConfig::parse(config).unwrap(),
        }
    }

    /// Fills the state with a typical gateway layout.
    pub fn populate(&self, flavour: &str) {
        let state = &self.state;
        write(
            state,
            "config/connectors.json",
            &format!("{{\"line\": \"{flavour}\"}}"),
        );
        write(state, "config/tags.csv", &format!("tag,{flavour}\n"));
        write(state, "flows/main.flow", &format!("flow of {flavour}"));
        write(state, "identity/device.crt", &format!("CERT {flavour}"));
        write(state, "identity/hostname", &format!("gw-{flavour}"));
        write(state, "identity/ca.crt", &format!("CA {flavour}"));
        write(state, "logs/agent.log", &format!("log of {flavour}"));
        write(state, "config/scratch.tmp", &format!("tmp of {flavour}"));
        write(
            state,
            "data/readings.txt",
            &format!("readings of {flavour}"),
        );
        write(state, "unlisted/notes.txt", &format!("notes of {flavour}"));
        fs::set_permissions(
            state.join("identity/device.crt"),
            fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::os::unix::fs::symlink("connectors.json", state.join("config/current.json")).unwrap();
    }

    pub fn source(&self) -> SourceInfo {
        SourceInfo {
            device_uid: self.uid.clone(),
            device_name: format!("device {}", self.uid),
            arch: std::env::consts::ARCH.to_string(),
            platform_version: "2.14.0".to_string(),
            agent_version: edgekeep_agent::AGENT_VERSION.to_string(),
            hostname: format!("host-{}", self.uid),
        }
    }

    pub fn target(&self) -> RestoreTarget<'_> {
        RestoreTarget {
            config: &self.config,
            state_dir: &self.state,
            home: &self.home,
            device_uid: &self.uid,
            restore_identity: true,
            arch: std::env::consts::ARCH,
            platform_version: "2.14.0",
        }
    }

    /// Packs this device's state into `name` in its temp folder.
    pub fn pack(&self, name: &str) -> PathBuf {
        let out = self.root.path().join(name);
        edgekeep_agent::pack_state(
            &self.config,
            &self.state,
            &self.source(),
            self.home.dir(),
            &out,
        )
        .unwrap();
        out
    }

    /// Entries of the agent home other than the credential.
    pub fn home_leftovers(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(self.home.dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}
