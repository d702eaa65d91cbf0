//! Writing archives: the streaming packer and the raw writer.

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use zstd::stream::raw::CParameter;

use crate::error::{Error, Result, io_at};
use crate::format::{BUFFER_LEN, HEADER_LEN, HashingWriter, Header, Trailer, sha256_file};
use crate::manifest::{Entry, EntryKind, Manifest, SourceInfo};
use crate::{ArchivePath, FORMAT_VERSION};

/// zstd level of the payload.
const ZSTD_LEVEL: i32 = 3;
/// zstd worker threads; compression then overlaps reading and hashing.
const ZSTD_WORKERS: u32 = 2;
/// Input bytes per zstd job. zstd's default at level 3 is 8 MiB; smaller jobs
/// keep the compressor's buffers, and so the packer's peak memory, lower.
const ZSTD_JOB_SIZE: u32 = 4 << 20;
/// Digest written in the reserved manifest before the real digests are known.
const PLACEHOLDER_DIGEST: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// One path to pack: read from `source` (with lstat, so symlinks are stored
/// as symlinks) and stored as `path`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackItem {
    pub path: ArchivePath,
    pub source: PathBuf,
}

/// Bytes of file content processed so far, out of the total.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    pub done_bytes: u64,
    pub total_bytes: u64,
}

/// Summary of a written archive, returned by [`pack`] and [`RawWriter::finish`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackSummary {
    /// Size of the `.dat` file in bytes.
    pub file_size: u64,
    /// SHA-256 of the whole `.dat` file, lowercase hex.
    pub sha256: String,
    pub entry_count: u64,
    /// Sum of the stored file sizes in bytes.
    pub state_size: u64,
}

/// Packs `items` into a new archive at `out`, reading each file once.
///
/// The manifest's exact length is reserved first, the payload is streamed
/// behind it, and the manifest with its digests is then written in place. A
/// file whose size differs from the walk fails with [`Error::Changed`]. On any
/// error the partial `out` file is removed.
pub fn pack(
    items: &[PackItem],
    source: &SourceInfo,
    out: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<PackSummary> {
    let result = pack_inner(items, source, out, progress);
    if result.is_err() {
        let _ = fs::remove_file(out);
    }
    result
}

fn pack_inner(
    items: &[PackItem],
    source: &SourceInfo,
    out: &Path,
    progress: &mut dyn FnMut(Progress),
) -> Result<PackSummary> {
    // Walk: every type, mode, size and path is known before any content is read.
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        entries.push(entry_for_item(item)?);
    }
    let mut manifest = Manifest {
        format_version: FORMAT_VERSION,
        created_at: now_millis(),
        source: source.clone(),
        entries,
    };
    manifest.check_safe()?;
    let reserved_len = manifest.to_json().len() as u64;

    // Payload: streamed behind the reserved manifest through multithreaded zstd.
    let mut file = File::create(out).map_err(io_at(out))?;
    file.seek(SeekFrom::Start(HEADER_LEN + reserved_len))
        .map_err(io_at(out))?;
    let sink = HashingWriter {
        inner: BufWriter::with_capacity(BUFFER_LEN, &mut file),
        hasher: Sha256::new(),
        written: 0,
    };
    let mut encoder = zstd::stream::write::Encoder::new(sink, ZSTD_LEVEL).map_err(io_at(out))?;
    encoder.multithread(ZSTD_WORKERS).map_err(io_at(out))?;
    encoder
        .set_parameter(CParameter::JobSize(ZSTD_JOB_SIZE))
        .map_err(io_at(out))?;
    let total_bytes = manifest.state_size();
    let mut done_bytes = 0;
    let mut buffer = vec![0u8; BUFFER_LEN];
    for (entry, item) in manifest.entries.iter_mut().zip(items) {
        if entry.kind != EntryKind::File {
            continue;
        }
        let digest = stream_file(item, entry.size, &mut buffer, &mut encoder, out, &mut |n| {
            done_bytes += n;
            progress(Progress {
                done_bytes,
                total_bytes,
            });
        })?;
        entry.sha256 = Some(digest);
    }
    let HashingWriter {
        inner,
        hasher,
        written: payload_len,
    } = encoder.finish().map_err(io_at(out))?;
    inner
        .into_inner()
        .map_err(|err| io_at(out)(err.into_error()))?;
    let payload_digest: [u8; 32] = hasher.finalize().into();

    // Manifest with digests into the reserved space, then header and trailer.
    let manifest_json = manifest.to_json();
    assert_eq!(
        manifest_json.len() as u64,
        reserved_len,
        "a manifest with digests has the same length as with placeholders"
    );
    let header = Header {
        manifest_len: reserved_len,
        payload_len,
    }
    .encode();
    write_head_and_trailer(&mut file, out, &header, &manifest_json, payload_digest)?;
    drop(file);

    Ok(PackSummary {
        file_size: HEADER_LEN + reserved_len + payload_len + crate::format::TRAILER_LEN,
        sha256: sha256_file(out)?,
        entry_count: manifest.entry_count(),
        state_size: total_bytes,
    })
}

/// Writes header and manifest at the start of `file` and the trailer at its end.
fn write_head_and_trailer(
    file: &mut File,
    out: &Path,
    header: &[u8],
    manifest_json: &[u8],
    payload_digest: [u8; 32],
) -> Result<()> {
    let mut head_hasher = Sha256::new();
    head_hasher.update(header);
    head_hasher.update(manifest_json);
    let trailer = Trailer {
        head_digest: head_hasher.finalize().into(),
        payload_digest,
    };
    file.seek(SeekFrom::End(0)).map_err(io_at(out))?;
    file.write_all(&trailer.encode()).map_err(io_at(out))?;
    file.seek(SeekFrom::Start(0)).map_err(io_at(out))?;
    file.write_all(header).map_err(io_at(out))?;
    file.write_all(manifest_json).map_err(io_at(out))?;
    Ok(())
}

/// Builds the manifest entry of one item from its lstat metadata.
fn entry_for_item(item: &PackItem) -> Result<Entry> {
    let metadata = fs::symlink_metadata(&item.source).map_err(io_at(&item.source))?;
    let file_type = metadata.file_type();
    let mtime = metadata.mtime() * 1000 + metadata.mtime_nsec() / 1_000_000;
    let mut entry = Entry {
        path: item.path.clone(),
        kind: EntryKind::File,
        mode: metadata.mode() & 0o7777,
        size: 0,
        mtime,
        sha256: None,
        link_target: None,
    };
    if file_type.is_file() {
        entry.size = metadata.len();
        entry.sha256 = Some(PLACEHOLDER_DIGEST.to_owned());
    } else if file_type.is_dir() {
        entry.kind = EntryKind::Dir;
    } else if file_type.is_symlink() {
        let target = fs::read_link(&item.source).map_err(io_at(&item.source))?;
        entry.kind = EntryKind::Symlink;
        entry.link_target = Some(ArchivePath::from(target.as_os_str().as_bytes()));
    } else {
        return Err(Error::Unsupported {
            path: item.source.clone(),
            reason: "only regular files, folders and symlinks can be packed; exclude it".into(),
        });
    }
    Ok(entry)
}

/// Copies exactly `size` bytes of `item` into `encoder` and returns their SHA-256.
fn stream_file(
    item: &PackItem,
    size: u64,
    buffer: &mut [u8],
    encoder: &mut impl Write,
    out: &Path,
    on_bytes: &mut dyn FnMut(u64),
) -> Result<String> {
    let source = &item.source;
    let mut file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(source)
        .map_err(io_at(source))?;
    let mut hasher = Sha256::new();
    let mut done = 0u64;
    loop {
        let n = file.read(buffer).map_err(io_at(source))?;
        if n == 0 {
            break;
        }
        if done + n as u64 > size {
            return Err(Error::Changed {
                path: source.clone(),
                expected: size,
                found: done + n as u64,
            });
        }
        hasher.update(&buffer[..n]);
        encoder.write_all(&buffer[..n]).map_err(io_at(out))?;
        done += n as u64;
        on_bytes(n as u64);
    }
    if done != size {
        return Err(Error::Changed {
            path: source.clone(),
            expected: size,
            found: done,
        });
    }
    Ok(hex::encode(hasher.finalize()))
}

fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or(0)
}

/// Writes archives with arbitrary entries, including ones that readers
/// reject, for tests and tools. Entries are stored exactly as given, except
/// that a file entry without a SHA-256 gets the digest of its content.
///
/// The compressed payload is kept in memory, so it suits small archives only.
pub struct RawWriter {
    out: PathBuf,
    source: SourceInfo,
    entries: Vec<Entry>,
    encoder: zstd::stream::write::Encoder<'static, Vec<u8>>,
}

impl RawWriter {
    /// Starts an archive that [`RawWriter::finish`] writes to `out`.
    pub fn create(out: &Path, source: &SourceInfo) -> Result<RawWriter> {
        File::create(out).map_err(io_at(out))?;
        let encoder =
            zstd::stream::write::Encoder::new(Vec::new(), ZSTD_LEVEL).map_err(io_at(out))?;
        Ok(RawWriter {
            out: out.to_path_buf(),
            source: source.clone(),
            entries: Vec::new(),
            encoder,
        })
    }

    /// Appends `entry` to the manifest and `content` to the payload.
    pub fn add(&mut self, mut entry: Entry, content: &[u8]) -> Result<()> {
        if entry.kind == EntryKind::File && entry.sha256.is_none() {
            entry.sha256 = Some(hex::encode(Sha256::digest(content)));
        }
        self.encoder.write_all(content).map_err(io_at(&self.out))?;
        self.entries.push(entry);
        Ok(())
    }

    /// Writes header, manifest, payload and trailer to the output file.
    pub fn finish(self) -> Result<PackSummary> {
        let out = self.out;
        let payload = self.encoder.finish().map_err(io_at(&out))?;
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            created_at: now_millis(),
            source: self.source,
            entries: self.entries,
        };
        let manifest_json = manifest.to_json();
        let header = Header {
            manifest_len: manifest_json.len() as u64,
            payload_len: payload.len() as u64,
        }
        .encode();
        let mut file = File::create(&out).map_err(io_at(&out))?;
        file.seek(SeekFrom::Start(HEADER_LEN + manifest_json.len() as u64))
            .map_err(io_at(&out))?;
        file.write_all(&payload).map_err(io_at(&out))?;
        let payload_digest: [u8; 32] = Sha256::digest(&payload).into();
        write_head_and_trailer(&mut file, &out, &header, &manifest_json, payload_digest)?;
        drop(file);
        Ok(PackSummary {
            file_size: fs::metadata(&out).map_err(io_at(&out))?.len(),
            sha256: sha256_file(&out)?,
            entry_count: manifest.entry_count(),
            state_size: manifest.state_size(),
        })
    }
}
