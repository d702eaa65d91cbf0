//! Round trips, corruption detection and unsafe-entry rejection.

use std::ffi::OsStr;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use edgekeep_archive::{
    ArchivePath, Entry, EntryKind, Error, FORMAT_VERSION, PackItem, Progress, RawWriter,
    SourceInfo, collect_tree, pack, read_manifest, unpack, verify, verify_tree,
};

fn source() -> SourceInfo {
    SourceInfo {
        device_uid: "uid-1".into(),
        device_name: "gateway-1".into(),
        arch: "x86_64".into(),
        platform_version: "3.2.0".into(),
        agent_version: "0.1.0".into(),
        hostname: "gw1".into(),
    }
}

fn no_progress(_: Progress) {}

fn set_mode(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Builds a tree with every case the round trip must preserve.
fn build_tree(root: &Path) {
    fs::create_dir_all(root.join("etc/app/conf.d")).unwrap();
    fs::create_dir_all(root.join("var/empty")).unwrap();
    fs::create_dir_all(root.join("readonly")).unwrap();
    fs::write(root.join("etc/app/config.yaml"), b"listen: 0.0.0.0:8080\n").unwrap();
    fs::write(root.join("etc/app/secret.key"), b"key material").unwrap();
    fs::write(root.join("etc/app/run.sh"), b"#!/bin/sh\necho hi\n").unwrap();
    fs::write(root.join("etc/app/frozen.txt"), b"read only").unwrap();
    fs::write(root.join("readonly/inside.txt"), b"in a read-only folder").unwrap();
    fs::write(root.join("empty.txt"), b"").unwrap();
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    fs::write(root.join("etc/app/conf.d/big.bin"), &big).unwrap();
    fs::write(
        root.join(OsStr::from_bytes(b"caf\xe9-latin1.txt")),
        b"non-utf8 name",
    )
    .unwrap();
    fs::write(root.join("n".repeat(200)), b"long name").unwrap();
    symlink("app/config.yaml", root.join("etc/current")).unwrap();
    symlink("../../var/empty", root.join("etc/app/data")).unwrap();
    set_mode(&root.join("etc/app/secret.key"), 0o600);
    set_mode(&root.join("etc/app/run.sh"), 0o755);
    set_mode(&root.join("etc/app/frozen.txt"), 0o444);
    set_mode(&root.join("readonly"), 0o555);
}

/// Path, type, mode, content or link target, and mtime of one path.
type Snapshot = (Vec<u8>, String, u32, Vec<u8>, i64);

/// Lists every path under `root` with its type, mode, content or link target and mtime.
fn snapshot(root: &Path) -> Vec<Snapshot> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        for child in fs::read_dir(root.join(&relative)).unwrap() {
            let child = child.unwrap();
            let rel = relative.join(child.file_name());
            let full = root.join(&rel);
            let meta = fs::symlink_metadata(&full).unwrap();
            let (kind, data) = if meta.file_type().is_symlink() {
                (
                    "symlink",
                    fs::read_link(&full)
                        .unwrap()
                        .as_os_str()
                        .as_bytes()
                        .to_vec(),
                )
            } else if meta.is_dir() {
                stack.push(rel.clone());
                ("dir", Vec::new())
            } else {
                ("file", fs::read(&full).unwrap())
            };
            let mode = if kind == "symlink" {
                0
            } else {
                meta.mode() & 0o7777
            };
            let mtime = meta.mtime() * 1000 + meta.mtime_nsec() / 1_000_000;
            out.push((
                rel.as_os_str().as_bytes().to_vec(),
                kind.into(),
                mode,
                data,
                mtime,
            ));
        }
    }
    out.sort();
    out
}

fn pack_tree(root: &Path, out: &Path) {
    let tree = collect_tree(root, &|_, _| false).unwrap();
    assert!(tree.skipped.is_empty(), "skipped: {:?}", tree.skipped);
    pack(&tree.items, &source(), out, &mut no_progress).unwrap();
}

#[test]
fn round_trip_preserves_tree_exactly() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("state");
    build_tree(&root);
    let archive = temp.path().join("state.dat");
    let tree = collect_tree(&root, &|_, _| false).unwrap();
    let summary = pack(&tree.items, &source(), &archive, &mut no_progress).unwrap();

    let dest = temp.path().join("restored");
    let mut last = None;
    let unpacked = unpack(&archive, &dest, &mut |p| last = Some(p)).unwrap();

    assert_eq!(snapshot(&root), snapshot(&dest));
    assert_eq!(unpacked.file_size, fs::metadata(&archive).unwrap().len());
    assert_eq!(summary.file_size, unpacked.file_size);
    assert_eq!(summary.entry_count, tree.items.len() as u64);
    assert_eq!(summary.state_size, unpacked.manifest.state_size());
    assert_eq!(last.unwrap().done_bytes, summary.state_size);
    assert_eq!(unpacked.manifest.source, source());
    verify_tree(&unpacked.manifest, &dest).unwrap();
    set_mode(&root.join("readonly"), 0o755);
    set_mode(&dest.join("readonly"), 0o755);
}

#[test]
fn manifest_stores_non_utf8_and_long_names() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("state");
    build_tree(&root);
    let archive = temp.path().join("state.dat");
    pack_tree(&root, &archive);
    let manifest = read_manifest(&archive).unwrap();

    let latin = manifest
        .find(&ArchivePath::from_bytes(b"caf\xe9-latin1.txt".to_vec()))
        .unwrap();
    assert_eq!(latin.kind, EntryKind::File);
    let long = manifest
        .find(&ArchivePath::from("n".repeat(200).as_str()))
        .unwrap();
    assert_eq!(long.size, 9);
    let link = manifest.find(&"etc/current".into()).unwrap();
    assert_eq!(link.link_target, Some("app/config.yaml".into()));
    let key = manifest.find(&"etc/app/secret.key".into()).unwrap();
    assert_eq!(key.mode, 0o600);
    assert_eq!(
        manifest.find(&"var/empty".into()).unwrap().kind,
        EntryKind::Dir
    );
    set_mode(&root.join("readonly"), 0o755);
}

#[test]
fn verify_returns_whole_file_digest() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path().join("state");
    build_tree(&root);
    let archive = temp.path().join("state.dat");
    let tree = collect_tree(&root, &|_, _| false).unwrap();
    let summary = pack(&tree.items, &source(), &archive, &mut no_progress).unwrap();
    let verified = verify(&archive, &mut no_progress).unwrap();
    let expected = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(fs::read(&archive).unwrap()))
    };
    assert_eq!(verified.sha256, expected);
    assert_eq!(summary.sha256, expected);
    set_mode(&root.join("readonly"), 0o755);
}

#[test]
fn collect_tree_honours_excludes_and_skips_special_files() {
    let temp = tempfile::tempdir().unwrap();
    let root = temp.path();
    fs::create_dir_all(root.join("cache/deep")).unwrap();
    fs::write(root.join("cache/deep/x"), b"x").unwrap();
    fs::write(root.join("keep.txt"), b"k").unwrap();
    symlink("/etc/passwd", root.join("abs-link")).unwrap();
    let fifo = std::ffi::CString::new(root.join("pipe").as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);

    let tree = collect_tree(root, &|path, is_dir| is_dir && path.as_bytes() == b"cache").unwrap();
    let paths: Vec<String> = tree
        .items
        .iter()
        .map(|item| item.path.to_string())
        .collect();
    assert_eq!(paths, vec!["keep.txt"]);
    let skipped: Vec<String> = tree
        .skipped
        .iter()
        .map(|(path, _)| path.to_string())
        .collect();
    assert_eq!(skipped, vec!["abs-link", "pipe"]);
}

#[test]
fn pack_fails_when_file_size_changes() {
    let temp = tempfile::tempdir().unwrap();
    let out = temp.path().join("x.dat");
    // procfs files report size 0 but return content, like a file growing after the walk.
    let items = [PackItem {
        path: "status".into(),
        source: "/proc/self/status".into(),
    }];
    let err = pack(&items, &source(), &out, &mut no_progress).unwrap_err();
    assert!(matches!(err, Error::Changed { .. }), "{err}");
    assert!(err.to_string().contains("/proc/self/status"), "{err}");
    assert!(!out.exists());
}

fn packed_bytes(temp: &Path) -> (PathBuf, Vec<u8>) {
    let root = temp.join("state");
    fs::create_dir_all(root.join("a/b")).unwrap();
    let data: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
    fs::write(root.join("a/b/data.bin"), &data).unwrap();
    fs::write(root.join("a/small.txt"), b"hello").unwrap();
    let archive = temp.join("state.dat");
    pack_tree(&root, &archive);
    let bytes = fs::read(&archive).unwrap();
    (archive, bytes)
}

/// Returns (header+manifest end, payload end) offsets.
fn section_ends(bytes: &[u8]) -> (usize, usize) {
    let manifest_len = u64::from_le_bytes(bytes[16..24].try_into().unwrap()) as usize;
    let payload_len = u64::from_le_bytes(bytes[24..32].try_into().unwrap()) as usize;
    (64 + manifest_len, 64 + manifest_len + payload_len)
}

#[test]
fn verify_detects_truncation() {
    let temp = tempfile::tempdir().unwrap();
    let (archive, bytes) = packed_bytes(temp.path());
    let (manifest_end, payload_end) = section_ends(&bytes);
    let cuts = [
        0,
        7,
        63,
        64,
        manifest_end - 1,
        manifest_end + 10,
        payload_end,
        bytes.len() - 1,
    ];
    for cut in cuts {
        fs::write(&archive, &bytes[..cut]).unwrap();
        let result = verify(&archive, &mut no_progress);
        assert!(result.is_err(), "truncation at {cut} not detected");
        assert!(
            read_manifest(&archive).is_err(),
            "read_manifest accepted a cut at {cut}"
        );
    }
}

#[test]
fn verify_detects_flipped_bit_in_every_section() {
    let temp = tempfile::tempdir().unwrap();
    let (archive, bytes) = packed_bytes(temp.path());
    let (manifest_end, payload_end) = section_ends(&bytes);
    let mut offsets: Vec<usize> = (0..64).collect();
    offsets.extend([64, 100, manifest_end - 2]);
    offsets.extend([
        manifest_end,
        (manifest_end + payload_end) / 2,
        payload_end - 1,
    ]);
    offsets.extend([payload_end, payload_end + 40, bytes.len() - 1]);
    for offset in offsets {
        for bit in [0, 7] {
            let mut damaged = bytes.clone();
            damaged[offset] ^= 1 << bit;
            fs::write(&archive, &damaged).unwrap();
            let result = verify(&archive, &mut no_progress);
            assert!(
                result.is_err(),
                "flipped bit {bit} at offset {offset} not detected"
            );
        }
    }
}

#[test]
fn unsupported_version_names_both_versions() {
    let temp = tempfile::tempdir().unwrap();
    let (archive, mut bytes) = packed_bytes(temp.path());
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    fs::write(&archive, &bytes).unwrap();
    let err = verify(&archive, &mut no_progress).unwrap_err();
    assert!(
        matches!(
            err,
            Error::UnsupportedVersion {
                found: 7,
                supported: FORMAT_VERSION
            }
        ),
        "{err}"
    );
    let message = err.to_string();
    assert!(message.contains("version 7"), "{message}");
    assert!(
        message.contains(&format!("version {FORMAT_VERSION}")),
        "{message}"
    );
    assert!(read_manifest(&archive).is_err());
}

fn entry(path: &[u8], kind: EntryKind) -> Entry {
    Entry {
        path: ArchivePath::from_bytes(path.to_vec()),
        kind,
        mode: 0o644,
        size: 0,
        mtime: 1_700_000_000_000,
        sha256: None,
        link_target: None,
    }
}

fn file(path: &[u8], content: &[u8]) -> (Entry, Vec<u8>) {
    let mut e = entry(path, EntryKind::File);
    e.size = content.len() as u64;
    (e, content.to_vec())
}

fn link(path: &[u8], target: &[u8]) -> (Entry, Vec<u8>) {
    let mut e = entry(path, EntryKind::Symlink);
    e.link_target = Some(ArchivePath::from_bytes(target.to_vec()));
    (e, Vec::new())
}

fn special(path: &[u8], kind: EntryKind) -> (Entry, Vec<u8>) {
    (entry(path, kind), Vec::new())
}

/// Entries with their content, rejected as a whole.
type Case = (&'static str, Vec<(Entry, Vec<u8>)>);

fn unsafe_cases() -> Vec<Case> {
    let mut hard = entry(b"hard", EntryKind::HardLink);
    hard.link_target = Some("ok.txt".into());
    vec![
        ("empty path", vec![file(b"", b"x")]),
        ("absolute path", vec![file(b"/tmp/edgekeep-escape", b"x")]),
        ("dot-dot path", vec![file(b"../escape.txt", b"x")]),
        ("inner dot-dot", vec![file(b"a/../../escape.txt", b"x")]),
        ("dot component", vec![file(b"./x", b"x")]),
        ("empty component", vec![file(b"a//x", b"x")]),
        ("NUL in path", vec![file(b"a\0b", b"x")]),
        ("absolute symlink", vec![link(b"l", b"/etc")]),
        ("escaping symlink", vec![link(b"l", b"../outside")]),
        (
            "nested escaping symlink",
            vec![link(b"a/l", b"../../outside")],
        ),
        (
            "file under symlink",
            vec![
                special(b"sub", EntryKind::Dir),
                link(b"lnk", b"sub"),
                file(b"lnk/x", b"through a link"),
            ],
        ),
        ("hard link", vec![file(b"ok.txt", b"x"), (hard, Vec::new())]),
        ("fifo", vec![special(b"p", EntryKind::Fifo)]),
        (
            "character device",
            vec![special(b"c", EntryKind::CharDevice)],
        ),
        ("block device", vec![special(b"b", EntryKind::BlockDevice)]),
        ("socket", vec![special(b"s", EntryKind::Socket)]),
        (
            "duplicate path",
            vec![file(b"twice", b"1"), file(b"twice", b"2")],
        ),
        (
            "duplicate folder",
            vec![special(b"d", EntryKind::Dir), special(b"d", EntryKind::Dir)],
        ),
        (
            "parent after child",
            vec![file(b"d/x", b"x"), special(b"d", EntryKind::Dir)],
        ),
    ]
}

#[test]
fn unsafe_entries_rejected_without_writing_outside() {
    for (name, entries) in unsafe_cases() {
        let temp = tempfile::tempdir().unwrap();
        let archive = temp.path().join("crafted.dat");
        let mut writer = RawWriter::create(&archive, &source()).unwrap();
        for (entry, content) in entries {
            writer.add(entry, &content).unwrap();
        }
        writer.finish().unwrap();
        let sandbox = temp.path().join("sandbox");
        fs::create_dir(&sandbox).unwrap();
        let dest = sandbox.join("dest");

        let verified = verify(&archive, &mut no_progress);
        assert!(
            matches!(verified, Err(Error::UnsafeEntry { .. })),
            "{name}: verify returned {verified:?}"
        );
        let unpacked = unpack(&archive, &dest, &mut no_progress);
        assert!(
            matches!(unpacked, Err(Error::UnsafeEntry { .. })),
            "{name}: unpack returned {unpacked:?}"
        );
        let left: Vec<_> = fs::read_dir(&sandbox).unwrap().collect();
        assert!(left.is_empty(), "{name}: unpack left {left:?}");
        let outside: Vec<_> = fs::read_dir(temp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(outside.len(), 2, "{name}: files outside dest: {outside:?}");
        assert!(!Path::new("/tmp/edgekeep-escape").exists(), "{name}");
    }
}

#[test]
fn raw_writer_safe_archive_unpacks() {
    let temp = tempfile::tempdir().unwrap();
    let archive = temp.path().join("crafted.dat");
    let mut writer = RawWriter::create(&archive, &source()).unwrap();
    let (config, content) = file(b"implicit/parent/config.txt", b"made by RawWriter");
    writer.add(config, &content).unwrap();
    let (up, _) = link(b"implicit/up", b"../implicit/parent");
    writer.add(up, b"").unwrap();
    writer.finish().unwrap();

    let dest = temp.path().join("dest");
    unpack(&archive, &dest, &mut no_progress).unwrap();
    let text = fs::read(dest.join("implicit/parent/config.txt")).unwrap();
    assert_eq!(text, b"made by RawWriter");
    let target = fs::read_link(dest.join("implicit/up")).unwrap();
    assert_eq!(target, Path::new("../implicit/parent"));
}

#[test]
fn wrong_digest_fails_and_cleans_destination() {
    let temp = tempfile::tempdir().unwrap();
    let archive = temp.path().join("crafted.dat");
    let mut writer = RawWriter::create(&archive, &source()).unwrap();
    let (mut bad, content) = file(b"dir/bad.txt", b"content");
    bad.sha256 = Some("ab".repeat(32));
    writer.add(bad, &content).unwrap();
    writer.finish().unwrap();

    let dest = temp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    let err = unpack(&archive, &dest, &mut no_progress).unwrap_err();
    assert!(matches!(err, Error::Corrupt { .. }), "{err}");
    assert!(err.to_string().contains("dir/bad.txt"), "{err}");
    assert_eq!(fs::read_dir(&dest).unwrap().count(), 0);
    assert!(verify(&archive, &mut no_progress).is_err());
}

#[test]
fn unpack_rejects_non_empty_destination() {
    let temp = tempfile::tempdir().unwrap();
    let (archive, _) = packed_bytes(temp.path());
    let dest = temp.path().join("dest");
    fs::create_dir(&dest).unwrap();
    fs::write(dest.join("existing"), b"keep me").unwrap();
    let err = unpack(&archive, &dest, &mut no_progress).unwrap_err();
    assert!(matches!(err, Error::DestinationNotEmpty { .. }), "{err}");
    assert_eq!(fs::read(dest.join("existing")).unwrap(), b"keep me");
}

#[test]
fn verify_tree_detects_changed_file() {
    let temp = tempfile::tempdir().unwrap();
    let (archive, _) = packed_bytes(temp.path());
    let dest = temp.path().join("dest");
    let unpacked = unpack(&archive, &dest, &mut no_progress).unwrap();
    verify_tree(&unpacked.manifest, &dest).unwrap();
    fs::write(dest.join("a/small.txt"), b"HELLO").unwrap();
    let err = verify_tree(&unpacked.manifest, &dest).unwrap_err();
    assert!(matches!(err, Error::Mismatch { .. }), "{err}");
    assert!(err.to_string().contains("small.txt"), "{err}");
}
