//! Comparing a restored device state with the backup it came from.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Kind and content of one path in a tree, enough to compare two trees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir { mode: u32 },
    File { mode: u32, content: Vec<u8> },
    Symlink { target: PathBuf },
}

/// Reads every path under `root` (not following symlinks), keyed by its path
/// relative to `root`.
pub fn snapshot(root: &Path) -> anyhow::Result<BTreeMap<PathBuf, Node>> {
    let mut nodes = BTreeMap::new();
    walk(root, Path::new(""), &mut nodes)?;
    Ok(nodes)
}

fn walk(root: &Path, relative: &Path, nodes: &mut BTreeMap<PathBuf, Node>) -> anyhow::Result<()> {
    let dir = root.join(relative);
    for entry in
        std::fs::read_dir(&dir).with_context(|| format!("cannot read {}", dir.display()))?
    {
        let entry = entry?;
        let path = relative.join(entry.file_name());
        let full = root.join(&path);
        let meta = std::fs::symlink_metadata(&full)?;
        let mode = meta.mode() & 0o7777;
        let node = if meta.is_dir() {
            walk(root, &path, nodes)?;
            Node::Dir { mode }
        } else if meta.file_type().is_symlink() {
            Node::Symlink {
                target: std::fs::read_link(&full)?,
            }
        } else {
            Node::File {
                mode,
                content: std::fs::read(&full)?,
            }
        };
        nodes.insert(path, node);
    }
    Ok(())
}

/// Lists how `actual` differs from `expected`, ignoring paths for which
/// `ignore` returns true.
pub fn differences(
    expected: &BTreeMap<PathBuf, Node>,
    actual: &BTreeMap<PathBuf, Node>,
    ignore: impl Fn(&Path) -> bool,
) -> Vec<String> {
    let mut found = Vec::new();
    for (path, node) in expected {
        if ignore(path) {
            continue;
        }
        match actual.get(path) {
            None => found.push(format!("{} is missing", path.display())),
            Some(other) if other != node => found.push(format!(
                "{} differs: {}",
                path.display(),
                describe(node, other)
            )),
            Some(_) => {}
        }
    }
    for path in actual.keys() {
        if !ignore(path) && !expected.contains_key(path) {
            found.push(format!("{} is not in the backup", path.display()));
        }
    }
    found
}

fn describe(expected: &Node, actual: &Node) -> String {
    match (expected, actual) {
        (
            Node::File {
                mode: a,
                content: x,
            },
            Node::File {
                mode: b,
                content: y,
            },
        ) => {
            if a != b {
                format!("mode {a:o} expected, {b:o} found")
            } else {
                format!(
                    "{} bytes expected, {} bytes found with other content",
                    x.len(),
                    y.len()
                )
            }
        }
        (Node::Dir { mode: a }, Node::Dir { mode: b }) => {
            format!("mode {a:o} expected, {b:o} found")
        }
        _ => format!("{expected:?} expected, another kind found")
            .chars()
            .take(120)
            .collect(),
    }
}
