//! Walking a state folder into a list of items to pack.

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::ArchivePath;
use crate::error::{Error, Result, io_at};
use crate::pack::PackItem;
use crate::path::check_link_target;

/// The result of [`collect_tree`]: what to pack, and what was left out and why.
#[derive(Clone, Debug, Default)]
pub struct CollectedTree {
    pub items: Vec<PackItem>,
    pub skipped: Vec<(ArchivePath, String)>,
}

/// Walks `root` without following symlinks and lists its contents, parents
/// before children and siblings sorted by name bytes.
///
/// `exclude` receives each path and whether it is a folder; an excluded folder
/// is not descended into. FIFOs, sockets, device nodes and symlinks whose
/// target leaves `root` are listed in `skipped`. Hard-linked files are listed
/// as ordinary files, so each link is stored with its own copy of the content.
pub fn collect_tree(
    root: &Path,
    exclude: &dyn Fn(&ArchivePath, bool) -> bool,
) -> Result<CollectedTree> {
    let metadata = fs::metadata(root).map_err(io_at(root))?;
    if !metadata.is_dir() {
        return Err(Error::Io {
            path: root.to_path_buf(),
            source: io::Error::new(
                io::ErrorKind::NotADirectory,
                "the state root is not a folder",
            ),
        });
    }
    let mut tree = CollectedTree::default();
    walk(root, &ArchivePath::default(), exclude, &mut tree)?;
    Ok(tree)
}

fn walk(
    dir: &Path,
    prefix: &ArchivePath,
    exclude: &dyn Fn(&ArchivePath, bool) -> bool,
    tree: &mut CollectedTree,
) -> Result<()> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_at(dir))? {
        names.push(entry.map_err(io_at(dir))?.file_name());
    }
    names.sort();

    for name in names {
        let path = prefix.join(name.as_bytes());
        let source = dir.join(&name);
        let metadata = match fs::symlink_metadata(&source) {
            Ok(metadata) => metadata,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                tree.skipped.push((path, "removed during the walk".into()));
                continue;
            }
            Err(err) => return Err(io_at(&source)(err)),
        };
        let file_type = metadata.file_type();
        if exclude(&path, file_type.is_dir()) {
            continue;
        }

        if file_type.is_symlink() {
            let target = fs::read_link(&source).map_err(io_at(&source))?;
            let target = ArchivePath::from(target.as_os_str().as_bytes());
            if let Err(reason) = check_link_target(&path, &target) {
                tree.skipped.push((path, reason));
                continue;
            }
        } else if !file_type.is_file() && !file_type.is_dir() {
            let kind = if file_type.is_fifo() {
                "FIFO"
            } else if file_type.is_socket() {
                "socket"
            } else if file_type.is_char_device() {
                "character device"
            } else {
                "block device"
            };
            tree.skipped
                .push((path, format!("a {kind} is not stored in archives")));
            continue;
        }

        tree.items.push(PackItem {
            path: path.clone(),
            source: source.clone(),
        });
        if file_type.is_dir() {
            walk(&source, &path, exclude, tree)?;
        }
    }
    Ok(())
}
