//! `edgekeep archive`: pack, unpack, verify and inspect `.dat` files locally.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use edgekeep_archive::{ArchivePath, Entry, EntryKind, Manifest, Progress, SourceInfo};

#[derive(Debug, clap::Subcommand)]
pub enum ArchiveCommand {
    /// Pack a folder into a new `.dat` archive.
    Pack(PackArgs),
    /// Verify an archive and unpack it into a new or empty folder.
    Unpack {
        /// Archive to unpack.
        file: PathBuf,
        /// Destination folder; must not exist or be empty.
        #[arg(long)]
        into: PathBuf,
    },
    /// Check an archive's digests, every entry's SHA-256 and the unpacking rules.
    Verify {
        /// Archive to verify.
        file: PathBuf,
    },
    /// Show an archive's source device and entries without reading the payload.
    Inspect {
        /// Archive to inspect.
        file: PathBuf,
        /// Print the manifest as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Args)]
pub struct PackArgs {
    /// Folder to pack; stored paths are relative to it.
    #[arg(long)]
    root: PathBuf,
    /// Archive file to create.
    #[arg(long)]
    out: PathBuf,
    /// Path to leave out, relative to the root: a plain prefix such as `cache`
    /// (the path and everything under it) or a pattern where `*` matches any
    /// run of bytes, such as `*.tmp`. Repeat for several.
    #[arg(long)]
    exclude: Vec<String>,
    /// Device uid recorded in the manifest.
    #[arg(long, default_value = "local")]
    device_uid: String,
    /// Device name recorded in the manifest; defaults to the host name.
    #[arg(long)]
    device_name: Option<String>,
    /// Architecture recorded in the manifest.
    #[arg(long, default_value = std::env::consts::ARCH)]
    arch: String,
    /// Platform version recorded in the manifest.
    #[arg(long, default_value = "0")]
    platform_version: String,
}

pub fn run(command: ArchiveCommand) -> anyhow::Result<()> {
    match command {
        ArchiveCommand::Pack(args) => pack(args),
        ArchiveCommand::Unpack { file, into } => unpack(&file, &into),
        ArchiveCommand::Verify { file } => verify(&file),
        ArchiveCommand::Inspect { file, json } => inspect(&file, json),
    }
}

fn pack(args: PackArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    let exclude = |path: &ArchivePath, _is_dir: bool| {
        args.exclude
            .iter()
            .any(|pattern| matches_exclude(pattern.as_bytes(), path.as_bytes()))
    };
    let tree = edgekeep_archive::collect_tree(&args.root, &exclude)
        .with_context(|| format!("failed to walk {}", args.root.display()))?;
    for (path, reason) in &tree.skipped {
        eprintln!("skipped {path}: {reason}");
    }

    let hostname = host_name();
    let source = SourceInfo {
        device_uid: args.device_uid,
        device_name: args.device_name.unwrap_or_else(|| hostname.clone()),
        arch: args.arch,
        platform_version: args.platform_version,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname,
    };
    let summary = edgekeep_archive::pack(&tree.items, &source, &args.out, &mut |_: Progress| {})
        .with_context(|| format!("failed to pack {}", args.root.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "packed {} entries, {} of files, into {} ({}) in {seconds:.2} s, {:.1} MB/s",
        summary.entry_count,
        format_bytes(summary.state_size),
        args.out.display(),
        format_bytes(summary.file_size),
        megabytes_per_second(summary.state_size, seconds)
    );
    println!("sha256 {}", summary.sha256);
    Ok(())
}

fn unpack(file: &Path, into: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let unpacked = edgekeep_archive::unpack(file, into, &mut |_: Progress| {})
        .with_context(|| format!("failed to unpack {}", file.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let state_size = unpacked.manifest.state_size();
    println!(
        "unpacked {} entries, {} of files, into {} in {seconds:.2} s, {:.1} MB/s",
        unpacked.manifest.entry_count(),
        format_bytes(state_size),
        into.display(),
        megabytes_per_second(state_size, seconds)
    );
    Ok(())
}

fn verify(file: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let verified = edgekeep_archive::verify(file, &mut |_: Progress| {})
        .with_context(|| format!("{} failed verification", file.display()))?;
    let seconds = started.elapsed().as_secs_f64();
    let state_size = verified.manifest.state_size();
    println!(
        "{} is valid: {} entries, {} of files, {} on disk, checked in {seconds:.2} s, {:.1} MB/s",
        file.display(),
        verified.manifest.entry_count(),
        format_bytes(state_size),
        format_bytes(verified.file_size),
        megabytes_per_second(state_size, seconds)
    );
    println!("sha256 {}", verified.sha256);
    Ok(())
}

fn inspect(file: &Path, json: bool) -> anyhow::Result<()> {
    let manifest = edgekeep_archive::read_manifest(file)
        .with_context(|| format!("failed to read the manifest of {}", file.display()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&manifest_json(&manifest))?
        );
        return Ok(());
    }
    let source = &manifest.source;
    println!("format version  {}", manifest.format_version);
    println!(
        "created at      {} ms since the Unix epoch",
        manifest.created_at
    );
    println!(
        "device          {} ({})",
        source.device_name, source.device_uid
    );
    println!("arch            {}", source.arch);
    println!("platform        {}", source.platform_version);
    println!("agent           {}", source.agent_version);
    println!("hostname        {}", source.hostname);
    println!(
        "entries         {} ({} of files)",
        manifest.entry_count(),
        format_bytes(manifest.state_size())
    );
    for entry in &manifest.entries {
        println!("{}", entry_line(entry));
    }
    Ok(())
}

fn manifest_json(manifest: &Manifest) -> serde_json::Value {
    serde_json::json!({
        "formatVersion": manifest.format_version,
        "createdAt": manifest.created_at,
        "source": manifest.source,
        "entryCount": manifest.entry_count(),
        "stateSize": manifest.state_size(),
        "entries": manifest.entries,
    })
}

fn entry_line(entry: &Entry) -> String {
    let kind = match entry.kind {
        EntryKind::File => '-',
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        _ => '?',
    };
    let mut line = format!(
        "{kind} {:04o} {:>12} {}",
        entry.mode, entry.size, entry.path
    );
    if let Some(target) = &entry.link_target {
        line.push_str(&format!(" -> {target}"));
    }
    line
}

/// Matches `path` against an exclude pattern: a `*` pattern must match the
/// whole path, and a plain pattern matches the path itself and everything under it.
fn matches_exclude(pattern: &[u8], path: &[u8]) -> bool {
    if pattern.contains(&b'*') {
        return wildcard_match(pattern, path);
    }
    let pattern = pattern.strip_suffix(b"/").unwrap_or(pattern);
    path == pattern || (path.starts_with(pattern) && path.get(pattern.len()) == Some(&b'/'))
}

/// Matches `text` against `pattern`, where `*` matches any run of bytes.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut backtrack: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            backtrack = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star, start)) = backtrack {
            p = star + 1;
            t = start + 1;
            backtrack = Some((star, start + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

pub(crate) fn format_bytes(bytes: u64) -> String {
    const MIB: f64 = 1024.0 * 1024.0;
    if bytes as f64 >= 1024.0 * MIB {
        format!("{:.2} GiB", bytes as f64 / (1024.0 * MIB))
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB)
    }
}

/// Throughput in decimal megabytes (10^6 bytes) per second.
pub(crate) fn megabytes_per_second(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / 1e6 / seconds.max(1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclude_prefix_matches_path_and_children() {
        assert!(matches_exclude(b"cache", b"cache"));
        assert!(matches_exclude(b"cache", b"cache/a/b"));
        assert!(matches_exclude(b"cache/", b"cache/a"));
        assert!(!matches_exclude(b"cache", b"cache2"));
        assert!(!matches_exclude(b"cache", b"var/cache"));
    }

    #[test]
    fn exclude_wildcard_matches_whole_path() {
        assert!(matches_exclude(b"*.tmp", b"a/b/c.tmp"));
        assert!(!matches_exclude(b"*.tmp", b"a/b/c.tmp.keep"));
        assert!(matches_exclude(b"logs/*", b"logs/x/y"));
        assert!(matches_exclude(b"*/cache/*", b"app/cache/z"));
        assert!(!matches_exclude(b"*/cache/*", b"app/cached"));
    }
}
