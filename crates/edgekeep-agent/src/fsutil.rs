//! File system steps the restore needs: atomic exchange, fsync, copies that
//! keep modes, and removal.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;

use crate::error::{IoContext, Result};

/// Atomically exchanges two paths on the same file system with
/// `renameat2(RENAME_EXCHANGE)`, then fsyncs their parent folders.
pub(crate) fn exchange(a: &Path, b: &Path) -> Result<()> {
    let c_a = c_path(a)?;
    let c_b = c_path(b)?;
    // SAFETY: both pointers are valid NUL-terminated strings for the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            c_a.as_ptr(),
            libc::AT_FDCWD,
            c_b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).at("exchanging with renameat2", a);
    }
    sync_parent(a)?;
    sync_parent(b)
}

fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        .at("converting path", path)
}

/// Fsyncs the folder that contains `path`.
pub(crate) fn sync_parent(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    sync_dir(parent)
}

pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .at("fsyncing folder", dir)
}

/// Writes `bytes` to `path` through a temporary file, fsync and rename, so
/// readers see the old or the new content and never a partial file.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    let tmp = path.with_extension("tmp");
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .at("creating", &tmp)?;
    file.write_all(bytes).at("writing", &tmp)?;
    file.sync_all().at("fsyncing", &tmp)?;
    fs::rename(&tmp, path).at("renaming into place", path)?;
    sync_parent(path)
}

pub(crate) fn inode(path: &Path) -> Result<u64> {
    Ok(fs::symlink_metadata(path).at("reading", path)?.ino())
}

/// Removes a file, symlink or whole folder; a missing path is fine.
pub(crate) fn remove_any(path: &Path) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if meta.is_dir() {
        // Read-only folders from a backup would stop the removal.
        make_tree_writable(path);
        fs::remove_dir_all(path).at("removing", path)
    } else {
        fs::remove_file(path).at("removing", path)
    }
}

fn make_tree_writable(dir: &Path) {
    if let Ok(meta) = fs::symlink_metadata(dir)
        && meta.is_dir()
    {
        let mode = meta.mode() & 0o7777;
        if mode & 0o700 != 0o700 {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(mode | 0o700));
        }
        if let Ok(entries) = fs::read_dir(dir) {
            for entry in entries.flatten() {
                make_tree_writable(&entry.path());
            }
        }
    }
}

/// Recreates `from` (file, symlink or folder with everything below it) at
/// `to`, whose parent exists. Regular files are copied with their mode and
/// modification time, and folders keep their modes. A FIFO, socket or
/// device node is hard-linked, because it has no content to copy.
pub(crate) fn copy_entry(from: &Path, to: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(from).at("reading", from)?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        let target = fs::read_link(from).at("reading symlink", from)?;
        std::os::unix::fs::symlink(&target, to).at("creating symlink", to)
    } else if kind.is_dir() {
        fs::create_dir(to).at("creating folder", to)?;
        for entry in fs::read_dir(from).at("listing", from)? {
            let entry = entry.at("listing", from)?;
            copy_entry(&entry.path(), &to.join(entry.file_name()))?;
        }
        fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
            .at("setting mode of", to)
    } else if kind.is_file() {
        copy_file(from, to, &meta)
    } else {
        // A hard link keeps the same node, so a listening socket stays
        // reachable.
        fs::hard_link(from, to).at("hard-linking", to)
    }
}

/// Copies the regular file `from` (with metadata `meta`) to `to` as a new
/// inode, so later writes to either leave the other unchanged.
fn copy_file(from: &Path, to: &Path, meta: &fs::Metadata) -> Result<()> {
    fs::copy(from, to).at("copying", to)?;
    fs::set_permissions(to, fs::Permissions::from_mode(meta.mode() & 0o7777))
        .at("setting mode of", to)?;
    set_mtime(to, meta.mtime(), meta.mtime_nsec())
}

/// Sets the modification time of `path` without following a symlink and
/// without opening it, so a file with mode 0000 works too. The access time
/// stays.
fn set_mtime(path: &Path, seconds: i64, nanoseconds: i64) -> Result<()> {
    let c_path = c_path(path)?;
    let times = [
        libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        },
        libc::timespec {
            tv_sec: seconds,
            tv_nsec: nanoseconds,
        },
    ];
    // SAFETY: the path is a valid NUL-terminated string and `times` contains
    // the two entries utimensat reads.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c_path.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).at("setting modification time of", path);
    }
    Ok(())
}

/// Returns why an archive cannot hold the entry at `path` (relative path
/// `rel` in the state), or `None` when it can. The archive stores only
/// regular files, folders and symlinks whose target, resolved from the
/// link's folder without following other links, stays inside the state.
pub(crate) fn archive_cannot_hold(path: &Path, rel: &str) -> Result<Option<String>> {
    let kind = fs::symlink_metadata(path).at("reading", path)?.file_type();
    if kind.is_symlink() {
        let target = fs::read_link(path).at("reading symlink", path)?;
        return Ok(link_leaves_state(rel, target.as_os_str().as_bytes())
            .then(|| format!("its symlink target {} leaves the state", target.display())));
    }
    let reason = if kind.is_fifo() {
        "it is a FIFO"
    } else if kind.is_socket() {
        "it is a socket"
    } else if kind.is_char_device() || kind.is_block_device() {
        "it is a device node"
    } else {
        return Ok(None);
    };
    Ok(Some(reason.to_string()))
}

/// True when a symlink at `rel` pointing to `target` is absolute, empty, or
/// climbs above the state with `..`.
fn link_leaves_state(rel: &str, target: &[u8]) -> bool {
    if target.is_empty() || target[0] == b'/' {
        return true;
    }
    let mut depth = rel.split('/').count() - 1;
    for component in target.split(|&b| b == b'/') {
        match component {
            b"" | b"." => {}
            b".." if depth == 0 => return true,
            b".." => depth -= 1,
            _ => depth += 1,
        }
    }
    false
}

/// Creates the folders from `root` down to `rel`'s parent inside `to_root`,
/// giving each the mode of its counterpart under `from_root`.
pub(crate) fn create_parents(from_root: &Path, to_root: &Path, rel: &str) -> Result<()> {
    let mut current = String::new();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len().saturating_sub(1)] {
        if !current.is_empty() {
            current.push('/');
        }
        current.push_str(part);
        let target = to_root.join(&current);
        if fs::symlink_metadata(&target).is_ok() {
            continue;
        }
        let mode = fs::metadata(from_root.join(&current))
            .map(|m| m.mode() & 0o7777)
            .unwrap_or(0o755);
        fs::create_dir(&target).at("creating folder", &target)?;
        fs::set_permissions(&target, fs::Permissions::from_mode(mode))
            .at("setting mode of", &target)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_leaves_state_resolves_lexically() {
        assert!(!link_leaves_state(
            "config/current.json",
            b"connectors.json"
        ));
        assert!(!link_leaves_state(
            "config/current.json",
            b"../flows/main.flow"
        ));
        assert!(!link_leaves_state("a/b/c", b"./../../d"));
        assert!(link_leaves_state("config", b"../etc"));
        assert!(link_leaves_state("config/x", b"../../etc"));
        assert!(link_leaves_state("config/x", b"/etc/passwd"));
        assert!(link_leaves_state("config/x", b""));
        assert!(link_leaves_state("a/x", b"b/../../../y"));
    }
}
