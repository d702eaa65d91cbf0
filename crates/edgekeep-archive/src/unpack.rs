//! Safe unpacking into an empty folder, with a writer thread.

use std::fs::{self, File, FileTimes, Permissions};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::time::{Duration, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result, io_at};
use crate::format::{BUFFER_LEN, open_archive};
use crate::manifest::{Entry, EntryKind, Manifest};
use crate::pack::Progress;
use crate::read::{CHANNEL_DEPTH, POOL_BUFFERS, PayloadSink, check_digest, read_payload};
use crate::sys;

/// The result of [`unpack`]: the manifest and the archive's size. Unlike
/// [`crate::verify`], unpacking skips the whole-file SHA-256 to save a hash pass.
#[derive(Clone, Debug)]
pub struct Unpacked {
    pub manifest: Manifest,
    pub file_size: u64,
}

/// Verifies and unpacks `path` into `dest`, which must not exist or be an
/// empty folder.
///
/// The manifest is checked against the safety rules before anything is
/// written, and every file is checked against its SHA-256 while it is written.
/// Parents are opened with `O_NOFOLLOW`, so nothing is written outside `dest`.
/// Folder modes and times are set after their contents. On error, everything
/// written into `dest` is removed again.
pub fn unpack(path: &Path, dest: &Path, progress: &mut dyn FnMut(Progress)) -> Result<Unpacked> {
    let archive = open_archive(path)?;
    archive.manifest.check_safe()?;
    let created = prepare_destination(dest)?;

    let root = File::open(dest).map_err(io_at(dest))?;
    let written = std::thread::scope(|scope| {
        let (ops, op_receiver) = mpsc::sync_channel(CHANNEL_DEPTH);
        let (buffer_sender, buffers) = mpsc::channel();
        for _ in 0..POOL_BUFFERS {
            let _ = buffer_sender.send(vec![0u8; BUFFER_LEN]);
        }
        let entries = &archive.manifest.entries;
        let writer =
            scope.spawn(|| TreeWriter::new(dest, &root, entries).run(op_receiver, buffer_sender));
        let mut sink = ChannelSink { ops, buffers };
        let read = read_payload(&archive, path, &mut sink, progress, false);
        if read.is_ok() {
            let _ = sink.ops.send(Op::Finish);
        }
        drop(sink);
        let wrote = writer
            .join()
            .expect("the unpack writer thread does not panic");
        // A failed writer makes the reader fail too, so its error is the cause.
        wrote.and(read)
    });

    match written {
        Ok(_) => Ok(Unpacked {
            file_size: archive.file_size,
            manifest: archive.manifest,
        }),
        Err(err) => {
            remove_written(dest, created);
            Err(err)
        }
    }
}

/// Creates `dest` or checks that it is an empty folder. Returns whether it was created.
fn prepare_destination(dest: &Path) -> Result<bool> {
    match fs::metadata(dest) {
        Ok(metadata) if metadata.is_dir() => {
            let mut children = fs::read_dir(dest).map_err(io_at(dest))?;
            if children.next().is_some() {
                return Err(Error::DestinationNotEmpty {
                    path: dest.to_path_buf(),
                });
            }
            Ok(false)
        }
        Ok(_) => Err(Error::DestinationNotEmpty {
            path: dest.to_path_buf(),
        }),
        Err(err) if err.kind() == io::ErrorKind::NotFound => {
            fs::create_dir(dest).map_err(io_at(dest))?;
            Ok(true)
        }
        Err(err) => Err(io_at(dest)(err)),
    }
}

/// Removes what a failed unpack wrote. Errors are ignored: the caller already
/// reports the failure that matters, and `dest` is a staging folder.
fn remove_written(dest: &Path, created: bool) {
    if created {
        let _ = fs::remove_dir_all(dest);
        return;
    }
    if let Ok(children) = fs::read_dir(dest) {
        for child in children.flatten() {
            let path = child.path();
            let _ = match child.file_type() {
                Ok(kind) if kind.is_dir() => fs::remove_dir_all(&path),
                _ => fs::remove_file(&path),
            };
        }
    }
}

/// Work for the writer thread, in manifest order.
enum Op {
    Begin(usize),
    Content(Vec<u8>),
    End(usize),
    /// The payload digest matched: set folder modes and times.
    Finish,
}

/// Forwards the payload to the writer thread and recycles its buffers.
struct ChannelSink {
    ops: SyncSender<Op>,
    buffers: Receiver<Vec<u8>>,
}

impl ChannelSink {
    fn send(&self, op: Op) -> Result<()> {
        self.ops.send(op).map_err(|_| Error::Io {
            path: "unpack writer".into(),
            source: io::Error::other("the writer thread stopped"),
        })
    }
}

impl PayloadSink for ChannelSink {
    fn begin(&mut self, index: usize, _entry: &Entry) -> Result<()> {
        self.send(Op::Begin(index))
    }

    fn content(&mut self, chunk: Vec<u8>) -> Result<Vec<u8>> {
        self.send(Op::Content(chunk))?;
        // Waiting for a returned buffer keeps memory bounded. If the writer
        // stopped, the next send reports it.
        Ok(self.buffers.recv().unwrap_or_default())
    }

    fn end(&mut self, index: usize, _entry: &Entry) -> Result<()> {
        self.send(Op::End(index))
    }
}

/// Creates entries under the destination folder, never following symlinks.
struct TreeWriter<'a> {
    dest: &'a Path,
    root: &'a File,
    entries: &'a [Entry],
    /// The last opened parent folder, by path bytes.
    parent: Option<(Vec<u8>, File)>,
    /// The file being written and the hash of its content so far.
    current: Option<(File, Sha256)>,
    folders: Vec<usize>,
}

impl<'a> TreeWriter<'a> {
    fn new(dest: &'a Path, root: &'a File, entries: &'a [Entry]) -> Self {
        TreeWriter {
            dest,
            root,
            entries,
            parent: None,
            current: None,
            folders: Vec::new(),
        }
    }

    fn run(mut self, ops: Receiver<Op>, buffers: Sender<Vec<u8>>) -> Result<()> {
        let entries = self.entries;
        for op in ops {
            match op {
                Op::Begin(index) => self.begin(index, &entries[index])?,
                Op::Content(chunk) => {
                    self.write(&chunk)?;
                    let _ = buffers.send(chunk);
                }
                Op::End(index) => self.end(&entries[index])?,
                Op::Finish => {
                    self.finish_folders()?;
                    break;
                }
            }
        }
        Ok(())
    }

    fn io_error(&self, entry: &Entry) -> impl FnOnce(io::Error) -> Error + use<> {
        io_at(self.dest.join(entry.path.to_path()))
    }

    fn begin(&mut self, index: usize, entry: &Entry) -> Result<()> {
        let error = self.io_error(entry);
        let name = entry.path.file_name().to_vec();
        let parent = self.open_parent(entry)?;
        match entry.kind {
            EntryKind::Dir => {
                sys::mkdir_at(parent, &name, 0o700).map_err(error)?;
                self.folders.push(index);
            }
            EntryKind::Symlink => {
                let target = entry.link_target.as_ref().expect("checked symlink target");
                sys::symlink_at(target.as_bytes(), parent, &name)
                    .and_then(|()| sys::set_symlink_mtime_at(parent, &name, entry.mtime))
                    .map_err(error)?;
            }
            EntryKind::File => {
                let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
                let file = sys::open_at(parent, &name, flags, 0o600).map_err(error)?;
                self.current = Some((file, Sha256::new()));
            }
            _ => unreachable!("the manifest was checked for unsafe entry types"),
        }
        Ok(())
    }

    fn write(&mut self, chunk: &[u8]) -> Result<()> {
        let (file, hasher) = self.current.as_mut().expect("content follows a file entry");
        hasher.update(chunk);
        file.write_all(chunk).map_err(|source| Error::Io {
            path: self.dest.to_path_buf(),
            source,
        })
    }

    fn end(&mut self, entry: &Entry) -> Result<()> {
        let Some((file, hasher)) = self.current.take() else {
            return Ok(());
        };
        check_digest(entry, &hex::encode(hasher.finalize()))?;
        set_mode_and_mtime(&file, entry).map_err(self.io_error(entry))
    }

    /// Sets folder modes and times deepest first, so read-only folders work.
    fn finish_folders(&mut self) -> Result<()> {
        let entries = self.entries;
        for index in std::mem::take(&mut self.folders).into_iter().rev() {
            let entry = &entries[index];
            let open_error = self.io_error(entry);
            let set_error = self.io_error(entry);
            let name = entry.path.file_name().to_vec();
            let parent = self.open_parent(entry)?;
            let folder = sys::open_dir_at(parent, &name).map_err(open_error)?;
            set_mode_and_mtime(&folder, entry).map_err(set_error)?;
        }
        Ok(())
    }

    /// Opens the parent folder of `entry`, creating folders the manifest does
    /// not list, and fails if any component is not a real folder.
    fn open_parent(&mut self, entry: &Entry) -> Result<&File> {
        let Some(parent_path) = entry.path.parent() else {
            return Ok(self.root);
        };
        let cached = matches!(&self.parent, Some((bytes, _)) if bytes == parent_path.as_bytes());
        if !cached {
            let mut folder = self.root.try_clone().map_err(io_at(self.dest))?;
            for component in parent_path.components() {
                folder = match sys::open_dir_at(&folder, component) {
                    Err(err) if err.kind() == io::ErrorKind::NotFound => {
                        sys::mkdir_at(&folder, component, 0o755)
                            .and_then(|()| sys::open_dir_at(&folder, component))
                    }
                    other => other,
                }
                .map_err(|err| parent_error(entry, &parent_path, err))?;
            }
            self.parent = Some((parent_path.as_bytes().to_vec(), folder));
        }
        Ok(&self.parent.as_ref().expect("parent just cached").1)
    }
}

fn parent_error(entry: &Entry, parent: &crate::ArchivePath, err: io::Error) -> Error {
    if err.raw_os_error() == Some(libc::ELOOP) || err.raw_os_error() == Some(libc::ENOTDIR) {
        return Error::UnsafeEntry {
            path: entry.path.clone(),
            reason: format!("its parent {parent} is not a real folder"),
        };
    }
    Error::Io {
        path: parent.to_path(),
        source: err,
    }
}

fn set_mode_and_mtime(file: &File, entry: &Entry) -> io::Result<()> {
    file.set_permissions(Permissions::from_mode(entry.mode))?;
    let offset = Duration::from_millis(entry.mtime.unsigned_abs());
    let mtime = if entry.mtime >= 0 {
        UNIX_EPOCH + offset
    } else {
        UNIX_EPOCH - offset
    };
    file.set_times(FileTimes::new().set_modified(mtime).set_accessed(mtime))
}
