//! Files uploaded through `put`: valid ones are listed by themselves, invalid
//! ones never are and their job records the reason.

use std::path::Path;

use edgekeep_api::JobState;
use edgekeep_archive::{ArchivePath, Entry, EntryKind, PackItem, RawWriter, SourceInfo};

use crate::harness::*;

fn source() -> SourceInfo {
    SourceInfo {
        device_uid: "other-tenant-device".into(),
        device_name: "gw-elsewhere".into(),
        arch: std::env::consts::ARCH.into(),
        platform_version: "2.14.0".into(),
        agent_version: "0.1.0".into(),
        hostname: "gw-elsewhere".into(),
    }
}

/// Packs a small state into `out` with the archive library.
pub fn valid_archive(dir: &Path, out: &Path) -> Vec<u8> {
    let state = dir.join("packed-state");
    std::fs::create_dir_all(state.join("config")).unwrap();
    std::fs::write(state.join("config/a.json"), "{\"a\": 1}\n".repeat(200)).unwrap();
    std::fs::write(state.join("config/b.csv"), "x,y\n1,2\n").unwrap();
    let items = vec![
        PackItem {
            path: ArchivePath::from_bytes("config"),
            source: state.join("config"),
        },
        PackItem {
            path: ArchivePath::from_bytes("config/a.json"),
            source: state.join("config/a.json"),
        },
        PackItem {
            path: ArchivePath::from_bytes("config/b.csv"),
            source: state.join("config/b.csv"),
        },
    ];
    edgekeep_archive::pack(&items, &source(), out, &mut |_| {}).unwrap();
    std::fs::read(out).unwrap()
}

fn entry(path: &[u8], kind: EntryKind, size: u64, link: Option<&[u8]>) -> Entry {
    Entry {
        path: ArchivePath::from_bytes(path),
        kind,
        mode: 0o644,
        size,
        mtime: 0,
        sha256: None,
        link_target: link.map(ArchivePath::from_bytes),
    }
}

/// An archive entry and the payload bytes stored for it.
type EntryWithContent = (Entry, &'static [u8]);

/// Uploads `bytes` through `put` and returns the import job once it ended.
pub async fn import(
    server: &Server,
    project: i64,
    device: i64,
    bytes: Vec<u8>,
) -> edgekeep_api::Job {
    let (url, job) = server
        .client()
        .upload_url(project, device, "MASTER", None)
        .await
        .unwrap();
    let response = reqwest::Client::new()
        .put(&url)
        .body(bytes)
        .send()
        .await
        .unwrap();
    assert!(
        response.status().is_success(),
        "PUT returned {}",
        response.status()
    );
    wait_job(server, job.expect("put names its import job")).await
}

async fn truncated_or_bit_flipped_upload_never_listed(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let device = client
        .create_device(project, "target")
        .await
        .unwrap()
        .device
        .id;
    let good = valid_archive(server.dir.path(), &server.dir.path().join("good.dat"));

    let truncated = good[..good.len() - 40].to_vec();
    let job = import(&server, project, device, truncated).await;
    assert_eq!(job.state, JobState::Failed);
    assert!(
        job.reason.as_deref().unwrap_or("").contains("422"),
        "{job:?}"
    );

    for offset in [10, good.len() / 2, good.len() - 10] {
        let mut flipped = good.clone();
        flipped[offset] ^= 0x01;
        let job = import(&server, project, device, flipped).await;
        assert_eq!(job.state, JobState::Failed, "bit flip at {offset}: {job:?}");
        assert!(job.reason.is_some());
    }
    assert!(
        client
            .list_backups(project, device)
            .await
            .unwrap()
            .is_empty()
    );

    // The intact file is listed without any further call.
    let job = import(&server, project, device, good.clone()).await;
    assert_eq!(job.state, JobState::Succeeded, "{job:?}");
    let list = client.list_backups(project, device).await.unwrap();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].checksum, hex::encode(sha2_digest(&good)));
    assert_eq!(list[0].source_device_uid, "other-tenant-device");
    assert_eq!(list[0].source_device_id, None);
}

async fn upload_with_unsafe_entries_rejected(store: StoreChoice) {
    let server = Server::start(&store);
    let client = server.client();
    let project = client.create_project("p").await.unwrap().id;
    let device = client
        .create_device(project, "target")
        .await
        .unwrap()
        .device
        .id;

    let cases: Vec<(&str, Vec<EntryWithContent>)> = vec![
        (
            "dot-dot",
            vec![(entry(b"../escape", EntryKind::File, 3, None), b"bad")],
        ),
        (
            "absolute",
            vec![(entry(b"/etc/escape", EntryKind::File, 3, None), b"bad")],
        ),
        (
            "symlink out",
            vec![(
                entry(b"link", EntryKind::Symlink, 0, Some(b"../../outside")),
                b"",
            )],
        ),
        (
            "absolute symlink",
            vec![(entry(b"link", EntryKind::Symlink, 0, Some(b"/etc")), b"")],
        ),
        (
            "hard link",
            vec![(
                entry(b"hard", EntryKind::HardLink, 0, Some(b"/etc/passwd")),
                b"",
            )],
        ),
        (
            "fifo",
            vec![(entry(b"pipe", EntryKind::Fifo, 0, None), b"")],
        ),
        (
            "device node",
            vec![(entry(b"disk", EntryKind::BlockDevice, 0, None), b"")],
        ),
        (
            "write through symlink",
            vec![
                (
                    entry(b"dir", EntryKind::Symlink, 0, Some(b"elsewhere")),
                    b"",
                ),
                (entry(b"dir/file", EntryKind::File, 3, None), b"bad"),
            ],
        ),
    ];
    for (name, entries) in cases {
        let path = server.dir.path().join(format!("{name}.dat"));
        let mut writer = RawWriter::create(&path, &source()).unwrap();
        for (entry, content) in entries {
            writer.add(entry, content).unwrap();
        }
        writer.finish().unwrap();
        let job = import(&server, project, device, std::fs::read(&path).unwrap()).await;
        assert_eq!(job.state, JobState::Failed, "{name}: {job:?}");
        assert!(job.reason.is_some(), "{name} has a reason");
    }
    assert!(
        client
            .list_backups(project, device)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(!server.dir.path().join("escape").exists());
}

e2e_tests!(
    truncated_or_bit_flipped_upload_never_listed,
    upload_with_unsafe_entries_rejected,
);
