//! Fixed-size header and trailer, and opening an archive for reading.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::FORMAT_VERSION;
use crate::error::{Error, Result, corrupt, io_at};
use crate::manifest::Manifest;

pub(crate) const MAGIC: &[u8; 8] = b"EDGEKEEP";
pub(crate) const END_MAGIC: &[u8; 8] = b"EDGEKEND";
pub(crate) const HEADER_LEN: u64 = 64;
pub(crate) const TRAILER_LEN: u64 = 72;
/// Upper bound on the manifest length a reader accepts, so a damaged header
/// cannot make it allocate without limit. 1 GiB is several million entries.
const MAX_MANIFEST_LEN: u64 = 1 << 30;
/// Read and write buffer size used throughout the crate.
pub(crate) const BUFFER_LEN: usize = 1 << 20;

/// The section lengths from the header. Decoding checks the magic, the
/// version, the flags (zero in version 1) and the zero padding.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Header {
    pub manifest_len: u64,
    pub payload_len: u64,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut bytes = [0u8; HEADER_LEN as usize];
        bytes[0..8].copy_from_slice(MAGIC);
        bytes[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        bytes[12..16].copy_from_slice(&0u32.to_le_bytes());
        bytes[16..24].copy_from_slice(&self.manifest_len.to_le_bytes());
        bytes[24..32].copy_from_slice(&self.payload_len.to_le_bytes());
        bytes
    }

    pub fn decode(bytes: &[u8; HEADER_LEN as usize], path: &Path) -> Result<Header> {
        if &bytes[0..8] != MAGIC {
            return Err(corrupt(format!(
                "{} does not start with the EDGEKEEP magic bytes, so it is not an edgekeep archive",
                path.display()
            )));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let flags = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes"));
        if flags != 0 {
            return Err(corrupt(format!(
                "{} has header flags {flags:#x}; version 1 defines none",
                path.display()
            )));
        }
        if bytes[32..].iter().any(|&b| b != 0) {
            return Err(corrupt(format!(
                "{} has non-zero bytes in the reserved header padding",
                path.display()
            )));
        }
        Ok(Header {
            manifest_len: u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes")),
            payload_len: u64::from_le_bytes(bytes[24..32].try_into().expect("8 bytes")),
        })
    }
}

/// The decoded trailer: SHA-256 of header and manifest, and of the payload.
pub(crate) struct Trailer {
    pub head_digest: [u8; 32],
    pub payload_digest: [u8; 32],
}

impl Trailer {
    pub fn encode(&self) -> [u8; TRAILER_LEN as usize] {
        let mut bytes = [0u8; TRAILER_LEN as usize];
        bytes[0..32].copy_from_slice(&self.head_digest);
        bytes[32..64].copy_from_slice(&self.payload_digest);
        bytes[64..72].copy_from_slice(END_MAGIC);
        bytes
    }

    fn decode(bytes: &[u8; TRAILER_LEN as usize], path: &Path) -> Result<Trailer> {
        if &bytes[64..72] != END_MAGIC {
            return Err(corrupt(format!(
                "{} does not end with the EDGEKEND marker, so it is truncated or damaged",
                path.display()
            )));
        }
        Ok(Trailer {
            head_digest: bytes[0..32].try_into().expect("32 bytes"),
            payload_digest: bytes[32..64].try_into().expect("32 bytes"),
        })
    }
}

/// An archive whose header, manifest and trailer have been read and checked.
/// `file` is positioned at the start of the payload.
pub(crate) struct OpenedArchive {
    pub file: File,
    pub header: Header,
    pub trailer_bytes: [u8; TRAILER_LEN as usize],
    pub trailer: Trailer,
    pub manifest: Manifest,
    pub file_size: u64,
    /// SHA-256 of the whole file so far: header and manifest.
    pub file_hasher: Sha256,
}

/// Opens `path`, checks the header, the file size, the trailer marker and the
/// header-and-manifest digest, then parses the manifest.
pub(crate) fn open_archive(path: &Path) -> Result<OpenedArchive> {
    let mut file = File::open(path).map_err(io_at(path))?;
    let file_size = file.metadata().map_err(io_at(path))?.len();
    if file_size < HEADER_LEN + TRAILER_LEN {
        return Err(corrupt(format!(
            "{} is {file_size} bytes, shorter than a header and trailer ({} bytes), \
             so it is truncated or not an edgekeep archive",
            path.display(),
            HEADER_LEN + TRAILER_LEN
        )));
    }

    // Header first: the magic and version decide how to read the rest.
    let mut header_bytes = [0u8; HEADER_LEN as usize];
    file.read_exact(&mut header_bytes).map_err(io_at(path))?;
    let header = Header::decode(&header_bytes, path)?;
    let declared = HEADER_LEN
        .checked_add(header.manifest_len)
        .and_then(|n| n.checked_add(header.payload_len))
        .and_then(|n| n.checked_add(TRAILER_LEN));
    if declared != Some(file_size) {
        return Err(corrupt(format!(
            "{} is {file_size} bytes but its header declares a {} byte manifest and a {} byte \
             payload, so it is truncated or damaged",
            path.display(),
            header.manifest_len,
            header.payload_len
        )));
    }
    if header.manifest_len > MAX_MANIFEST_LEN {
        return Err(corrupt(format!(
            "{} declares a {} byte manifest, above the {MAX_MANIFEST_LEN} byte limit",
            path.display(),
            header.manifest_len
        )));
    }

    // Trailer, then the manifest checked against the trailer's digest.
    let mut trailer_bytes = [0u8; TRAILER_LEN as usize];
    file.seek(SeekFrom::Start(file_size - TRAILER_LEN))
        .map_err(io_at(path))?;
    file.read_exact(&mut trailer_bytes).map_err(io_at(path))?;
    let trailer = Trailer::decode(&trailer_bytes, path)?;
    let mut manifest_bytes = vec![0u8; header.manifest_len as usize];
    file.seek(SeekFrom::Start(HEADER_LEN))
        .map_err(io_at(path))?;
    file.read_exact(&mut manifest_bytes).map_err(io_at(path))?;
    let mut head_hasher = Sha256::new();
    head_hasher.update(header_bytes);
    head_hasher.update(&manifest_bytes);
    let file_hasher = head_hasher.clone();
    if head_hasher.finalize().as_slice() != trailer.head_digest {
        return Err(corrupt(format!(
            "the header and manifest of {} do not match the SHA-256 in its trailer",
            path.display()
        )));
    }
    let manifest = Manifest::from_json(&manifest_bytes)?;

    Ok(OpenedArchive {
        file,
        header,
        trailer_bytes,
        trailer,
        manifest,
        file_size,
        file_hasher,
    })
}

/// A writer that counts and hashes what passes through it.
pub(crate) struct HashingWriter<W> {
    pub inner: W,
    pub hasher: Sha256,
    pub written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Computes the SHA-256 of a whole file as lowercase hex.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(io_at(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; BUFFER_LEN];
    loop {
        let n = file.read(&mut buffer).map_err(io_at(path))?;
        if n == 0 {
            return Ok(hex::encode(hasher.finalize()));
        }
        hasher.update(&buffer[..n]);
    }
}
