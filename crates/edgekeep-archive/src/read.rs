//! Reading archives: the manifest, full verification and tree comparison.

use std::fs::File;
use std::io::{self, BufRead, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result, corrupt, io_at};
use crate::format::{BUFFER_LEN, OpenedArchive, open_archive};
use crate::manifest::{Entry, EntryKind, Manifest};
use crate::pack::Progress;

/// A fully verified archive.
#[derive(Clone, Debug)]
pub struct Verified {
    pub manifest: Manifest,
    pub file_size: u64,
    /// SHA-256 of the whole `.dat` file, lowercase hex.
    pub sha256: String,
}

/// Reads the header and manifest of `path` and checks them against the
/// trailer's digest. The payload is not read.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    Ok(open_archive(path)?.manifest)
}

/// Verifies `path` completely: header, both trailer digests, every entry's
/// size and SHA-256, and the unpacking safety rules. A file that verifies
/// can be unpacked.
pub fn verify(path: &Path, progress: &mut dyn FnMut(Progress)) -> Result<Verified> {
    let archive = open_archive(path)?;
    archive.manifest.check_safe()?;
    let mut sink = HashSink::default();
    let sha256 = read_payload(&archive, path, &mut sink, progress, true)?
        .expect("whole-file digest requested");
    Ok(Verified {
        manifest: archive.manifest,
        file_size: archive.file_size,
        sha256,
    })
}

/// Receives the decompressed payload entry by entry, in manifest order.
pub(crate) trait PayloadSink {
    /// Called once per entry, before its content.
    fn begin(&mut self, index: usize, entry: &Entry) -> Result<()>;
    /// Receives the next chunk of the current file and returns a buffer to reuse.
    fn content(&mut self, chunk: Vec<u8>) -> Result<Vec<u8>>;
    /// Called once per entry, after its content.
    fn end(&mut self, index: usize, entry: &Entry) -> Result<()>;
}

/// Decompresses the payload of `archive` into `sink`, checks that it contains
/// exactly the manifest's files and that its digest matches the trailer.
/// Returns the SHA-256 of the whole file when `whole_file_digest` is set.
///
/// A second thread reads and hashes the compressed bytes, so hashing overlaps
/// decompression.
pub(crate) fn read_payload(
    archive: &OpenedArchive,
    path: &Path,
    sink: &mut dyn PayloadSink,
    progress: &mut dyn FnMut(Progress),
    whole_file_digest: bool,
) -> Result<Option<String>> {
    let (payload_hasher, file_hasher) = std::thread::scope(|scope| {
        let (chunk_sender, chunks) = mpsc::sync_channel(CHANNEL_DEPTH);
        let (recycle, recycled) = mpsc::channel();
        for _ in 0..POOL_BUFFERS {
            let _ = recycle.send(vec![0u8; BUFFER_LEN]);
        }
        let file_hasher = whole_file_digest.then(|| archive.file_hasher.clone());
        let reading = scope
            .spawn(move || read_compressed(archive, path, file_hasher, chunk_sender, recycled));
        let reader = ChunkReader {
            chunks,
            recycle,
            current: Vec::new(),
            position: 0,
        };
        let decoded = decode_entries(archive, path, reader, sink, progress);
        let hashed = reading
            .join()
            .expect("the payload reader thread does not panic");
        // A read error ends the payload early, so it is the cause of any decode error.
        let hashers = hashed?;
        decoded.map(|()| hashers)
    })?;
    if payload_hasher.finalize().as_slice() != archive.trailer.payload_digest {
        return Err(corrupt(format!(
            "the payload of {} does not match the SHA-256 in its trailer",
            path.display()
        )));
    }
    Ok(file_hasher.map(|mut hasher| {
        hasher.update(archive.trailer_bytes);
        hex::encode(hasher.finalize())
    }))
}

/// Blocks in flight between two threads of the read or unpack pipeline.
pub(crate) const CHANNEL_DEPTH: usize = 4;
/// Buffers in each pipeline's pool: the channel's blocks plus one at each end.
pub(crate) const POOL_BUFFERS: usize = CHANNEL_DEPTH + 2;

/// Reads the compressed payload in fixed blocks, hashes it and sends it on.
/// Returns the payload hasher and, if one was passed in, the whole-file hasher.
fn read_compressed(
    archive: &OpenedArchive,
    path: &Path,
    mut file_hasher: Option<Sha256>,
    chunks: SyncSender<Vec<u8>>,
    recycled: Receiver<Vec<u8>>,
) -> Result<(Sha256, Option<Sha256>)> {
    let mut payload_hasher = Sha256::new();
    let mut reader = (&archive.file).take(archive.header.payload_len);
    // The buffers come from a fixed pool, so memory stays bounded and no
    // fresh pages are faulted in per block.
    while let Ok(mut buffer) = recycled.recv() {
        buffer.resize(BUFFER_LEN, 0);
        let mut filled = 0;
        while filled < buffer.len() {
            let n = reader.read(&mut buffer[filled..]).map_err(io_at(path))?;
            if n == 0 {
                break;
            }
            filled += n;
        }
        if filled == 0 {
            break;
        }
        buffer.truncate(filled);
        payload_hasher.update(&buffer);
        if let Some(hasher) = file_hasher.as_mut() {
            hasher.update(&buffer);
        }
        if chunks.send(buffer).is_err() {
            break;
        }
    }
    Ok((payload_hasher, file_hasher))
}

/// A `BufRead` over the blocks sent by [`read_compressed`].
struct ChunkReader {
    chunks: Receiver<Vec<u8>>,
    recycle: Sender<Vec<u8>>,
    current: Vec<u8>,
    position: usize,
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChunkReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.position >= self.current.len() {
            let Ok(next) = self.chunks.recv() else {
                return Ok(&[]);
            };
            let _ = self
                .recycle
                .send(std::mem::replace(&mut self.current, next));
            self.position = 0;
        }
        Ok(&self.current[self.position..])
    }

    fn consume(&mut self, amount: usize) {
        self.position += amount;
    }
}

/// Decompresses the entries' contents in manifest order into `sink`.
fn decode_entries(
    archive: &OpenedArchive,
    path: &Path,
    reader: ChunkReader,
    sink: &mut dyn PayloadSink,
    progress: &mut dyn FnMut(Progress),
) -> Result<()> {
    let mut decoder = zstd::stream::read::Decoder::with_buffer(reader).map_err(io_at(path))?;
    let total_bytes = archive.manifest.state_size();
    let mut done_bytes = 0;
    let mut buffer = vec![0u8; BUFFER_LEN];

    // Only files carry content.
    for (index, entry) in archive.manifest.entries.iter().enumerate() {
        sink.begin(index, entry)?;
        let mut remaining = if entry.kind == EntryKind::File {
            entry.size
        } else {
            0
        };
        while remaining > 0 {
            let n = remaining.min(BUFFER_LEN as u64) as usize;
            buffer.resize(n, 0);
            decoder
                .read_exact(&mut buffer)
                .map_err(|err| payload_error(path, entry, err))?;
            remaining -= n as u64;
            done_bytes += n as u64;
            buffer = sink.content(buffer)?;
            progress(Progress {
                done_bytes,
                total_bytes,
            });
        }
        sink.end(index, entry)?;
    }

    // Nothing may follow the last entry. Draining lets the reader thread hash
    // every payload byte.
    buffer.resize(1, 0);
    let extra = decoder.read(&mut buffer).map_err(|err| {
        corrupt(format!(
            "the payload of {} is damaged: {err}",
            path.display()
        ))
    })?;
    if extra != 0 {
        return Err(corrupt(format!(
            "the payload of {} has data after the last entry",
            path.display()
        )));
    }
    let mut rest = decoder.finish();
    io::copy(&mut rest, &mut io::sink()).map_err(io_at(path))?;
    Ok(())
}

fn payload_error(path: &Path, entry: &Entry, err: io::Error) -> Error {
    if err.kind() == io::ErrorKind::UnexpectedEof {
        corrupt(format!(
            "the payload of {} ends inside {}",
            path.display(),
            entry.path
        ))
    } else {
        corrupt(format!(
            "the payload of {} is damaged at {}: {err}",
            path.display(),
            entry.path
        ))
    }
}

/// Checks each file's SHA-256 against its manifest entry.
#[derive(Default)]
struct HashSink {
    hasher: Sha256,
}

impl PayloadSink for HashSink {
    fn begin(&mut self, _index: usize, _entry: &Entry) -> Result<()> {
        self.hasher = Sha256::new();
        Ok(())
    }

    fn content(&mut self, chunk: Vec<u8>) -> Result<Vec<u8>> {
        self.hasher.update(&chunk);
        Ok(chunk)
    }

    fn end(&mut self, _index: usize, entry: &Entry) -> Result<()> {
        if entry.kind != EntryKind::File {
            return Ok(());
        }
        let found = hex::encode(std::mem::take(&mut self.hasher).finalize());
        check_digest(entry, &found)
    }
}

pub(crate) fn check_digest(entry: &Entry, found: &str) -> Result<()> {
    let expected = entry.sha256.as_deref().unwrap_or_default();
    if !found.eq_ignore_ascii_case(expected) {
        return Err(corrupt(format!(
            "the content of {} has SHA-256 {found}, but the manifest records {expected}",
            entry.path
        )));
    }
    Ok(())
}

/// Checks that every manifest entry is in place under `dir` with its type,
/// permission bits, size, SHA-256 and symlink target.
pub fn verify_tree(manifest: &Manifest, dir: &Path) -> Result<()> {
    let mut buffer = vec![0u8; BUFFER_LEN];
    for entry in &manifest.entries {
        let path = dir.join(entry.path.to_path());
        verify_entry(entry, &path, &mut buffer)?;
    }
    Ok(())
}

fn verify_entry(entry: &Entry, path: &Path, buffer: &mut [u8]) -> Result<()> {
    let mismatch = |reason: String| Error::Mismatch {
        path: path.to_path_buf(),
        reason,
    };
    let metadata = std::fs::symlink_metadata(path).map_err(io_at(path))?;
    let file_type = metadata.file_type();
    let found_kind = if file_type.is_file() {
        EntryKind::File
    } else if file_type.is_dir() {
        EntryKind::Dir
    } else if file_type.is_symlink() {
        EntryKind::Symlink
    } else {
        EntryKind::Socket
    };
    if found_kind != entry.kind {
        return Err(mismatch(format!(
            "expected a {}, found a {}",
            entry.kind.name(),
            if found_kind == EntryKind::Socket {
                "special file"
            } else {
                found_kind.name()
            }
        )));
    }
    if entry.kind == EntryKind::Symlink {
        let target = std::fs::read_link(path).map_err(io_at(path))?;
        let expected = entry.link_target.as_ref().map(|t| t.as_bytes());
        if Some(target.as_os_str().as_bytes()) != expected {
            return Err(mismatch(format!("symlink points to {}", target.display())));
        }
        return Ok(());
    }
    if metadata.mode() & 0o7777 != entry.mode {
        return Err(mismatch(format!(
            "mode is {:o}, expected {:o}",
            metadata.mode() & 0o7777,
            entry.mode
        )));
    }
    if entry.kind == EntryKind::File {
        if metadata.len() != entry.size {
            return Err(mismatch(format!(
                "size is {} bytes, expected {}",
                metadata.len(),
                entry.size
            )));
        }
        let found = hash_file(path, buffer)?;
        if Some(found.as_str()) != entry.sha256.as_deref() {
            return Err(mismatch(format!(
                "SHA-256 is {found}, expected {:?}",
                entry.sha256
            )));
        }
    }
    Ok(())
}

fn hash_file(path: &Path, buffer: &mut [u8]) -> Result<String> {
    let mut file = File::open(path).map_err(io_at(path))?;
    let mut hasher = Sha256::new();
    loop {
        let n = file.read(buffer).map_err(io_at(path))?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}
