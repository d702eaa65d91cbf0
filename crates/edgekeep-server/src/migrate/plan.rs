//! The objects to copy: the source files, checked against their listed size
//! and SHA-256, and the target bucket, checked for objects in the way.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::ObjectStore;
use serde::Serialize;

use super::source::{self, ListedBackup, Source};
use super::transfer::{self, ObjectCopy};
use crate::objects::Objects;

/// Key prefixes that edgekeep writes. The target bucket must contain no
/// object under them that the migration does not copy, because a server on
/// the new stores deletes stray `uploads/` and `staging/` objects and would
/// treat others under `backups/` as its own.
const OWNED_PREFIXES: [&str; 3] = ["backups/", "uploads/", "staging/"];

/// Keys named in full in a message; the rest are counted.
const KEYS_NAMED: usize = 10;

/// The objects the migration copies from the source bucket folder.
#[derive(Debug, Default)]
pub(super) struct Plan {
    /// The embedded bucket folder, or `None` when nothing refers to an object.
    pub bucket_dir: Option<PathBuf>,
    pub objects: Vec<ObjectCopy>,
    /// Damaged backups left out with `--skip-damaged`.
    pub skipped: Vec<SkippedBackup>,
}

/// A backup whose file is missing or differs from its listing, left out of
/// the migration with `--skip-damaged`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SkippedBackup {
    pub project_id: i64,
    pub device_id: i64,
    pub backup_type: String,
    pub timestamp: i64,
    pub key: String,
    /// The difference found, such as `the file is missing`.
    pub reason: String,
}

impl SkippedBackup {
    fn describe(&self) -> String {
        format!(
            "project {} device {} {} backup {} ({}): {}",
            self.project_id,
            self.device_id,
            self.backup_type,
            self.timestamp,
            self.key,
            self.reason
        )
    }
}

/// Lists the files to copy: one per listed backup, and one per queued or
/// running import whose file already arrived. Every backup file is read
/// whole to compare its SHA-256 with the listing. A backup whose file is
/// missing or differs is rejected, or with `skip_damaged` left out of the
/// plan and listed in [`Plan::skipped`].
pub(super) async fn plan_objects(
    source: &Source,
    data_dir: &Path,
    source_bucket: Option<&str>,
    skip_damaged: bool,
) -> anyhow::Result<Plan> {
    let referenced = source.referenced_objects().await?;
    if referenced.is_empty() {
        return Ok(Plan::default());
    }
    let Some(bucket_dir) = source::bucket_dir(data_dir, source_bucket)? else {
        // Without a bucket folder no import file can have arrived either.
        if referenced.iter().all(|object| object.backup.is_none()) {
            return Ok(Plan::default());
        }
        anyhow::bail!(
            "the source database lists backups, but {} has no bucket folder; check --data-dir",
            data_dir.join("objects").display()
        );
    };

    let mut plan = Plan {
        bucket_dir: Some(bucket_dir.clone()),
        ..Plan::default()
    };
    let mut backups = 0usize;
    for object in referenced {
        let path = source::object_path(&bucket_dir, &object.key)?;
        let found = read_file(&path, &object.owner).await?;
        match (found, object.backup) {
            (found, Some(backup)) => {
                backups += 1;
                match check_backup_file(found, &backup) {
                    Ok(()) => plan.objects.push(ObjectCopy {
                        key: object.key,
                        path,
                        owner: object.owner,
                        size: backup.size,
                        sha256: backup.checksum,
                    }),
                    Err(reason) => plan.skipped.push(SkippedBackup {
                        project_id: backup.project_id,
                        device_id: backup.device_id,
                        backup_type: backup.backup_type,
                        timestamp: backup.timestamp,
                        key: object.key,
                        reason,
                    }),
                }
            }
            (Some((size, sha256)), None) => plan.objects.push(ObjectCopy {
                key: object.key,
                path,
                owner: object.owner,
                size,
                sha256,
            }),
            (None, None) => {
                tracing::info!(
                    owner = object.owner,
                    key = object.key,
                    "no file has arrived for this import yet; its job is copied as it is"
                );
            }
        }
    }

    if !plan.skipped.is_empty() && !skip_damaged {
        anyhow::bail!(damaged_message(&plan.skipped, backups));
    }
    for skipped in &plan.skipped {
        tracing::warn!(
            project = skipped.project_id,
            device = skipped.device_id,
            timestamp = skipped.timestamp,
            key = skipped.key,
            reason = skipped.reason,
            "left out a damaged backup"
        );
    }
    Ok(plan)
}

/// Returns the size and SHA-256 of the file, or `None` when it is missing.
async fn read_file(path: &Path, owner: &str) -> anyhow::Result<Option<(u64, String)>> {
    match transfer::file_digest(path).await {
        Ok(found) => Ok(Some(found)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        // Opening a folder succeeds, and reading it fails.
        Err(_) if path.is_dir() => Ok(None),
        Err(error) => Err(anyhow::Error::from(error)
            .context(format!("failed to read {} of {owner}", path.display()))),
    }
}

/// Compares a backup file with its listing and describes the difference.
fn check_backup_file(found: Option<(u64, String)>, backup: &ListedBackup) -> Result<(), String> {
    let Some((size, sha256)) = found else {
        return Err("the file is missing".to_string());
    };
    if size != backup.size {
        return Err(format!(
            "the file has {size} bytes, but {} are listed",
            backup.size
        ));
    }
    if sha256 != backup.checksum {
        return Err(format!(
            "the file has SHA-256 {sha256}, but {} is listed",
            backup.checksum
        ));
    }
    Ok(())
}

fn damaged_message(damaged: &[SkippedBackup], backups: usize) -> String {
    let listing: String = damaged
        .iter()
        .map(|backup| format!("\n  {}", backup.describe()))
        .collect();
    format!(
        "{} of the {backups} listed backups are damaged in the source, so nothing was \
         copied:{listing}\nPut the original files back from a copy of the data folder, or run \
         the migration with --skip-damaged to leave these backups out (their backup jobs are \
         still copied)",
        damaged.len()
    )
}

/// Checks the target bucket and returns the keys of planned objects that it
/// already contains with the planned size and SHA-256, such as those copied
/// by an interrupted run. Rejects the bucket when an object under a planned
/// key differs, or when an object under an edgekeep prefix is not planned.
pub(super) async fn check_target_bucket(
    objects: &Objects,
    bucket: &str,
    endpoint: &str,
    planned: &[ObjectCopy],
) -> anyhow::Result<BTreeSet<String>> {
    let by_key: HashMap<&str, &ObjectCopy> = planned
        .iter()
        .map(|object| (object.key.as_str(), object))
        .collect();

    // One listing per prefix: edgekeep's own and the top-level folders of
    // the planned keys, such as `backups/`.
    let mut prefixes: BTreeSet<String> = OWNED_PREFIXES.map(String::from).into();
    for object in planned {
        if let Some((folder, _)) = object.key.split_once('/') {
            prefixes.insert(format!("{folder}/"));
        }
    }
    let mut existing: Vec<(String, u64)> = Vec::new();
    for prefix in &prefixes {
        for object in objects.list(prefix).await? {
            existing.push((object.key, object.size));
        }
    }
    for object in planned.iter().filter(|object| !object.key.contains('/')) {
        if let Some(size) = objects.head(&object.key).await? {
            existing.push((object.key.clone(), size));
        }
    }

    // A planned key with the planned size is read back to compare its
    // SHA-256, because an equal size alone does not prove equal content.
    let store: Arc<dyn ObjectStore> = Arc::new(objects.store().clone());
    let mut present = BTreeSet::new();
    let mut differing = Vec::new();
    let mut foreign = Vec::new();
    for (key, size) in existing {
        let Some(object) = by_key.get(key.as_str()) else {
            foreign.push(key);
            continue;
        };
        if size == object.size && transfer::digest(&store, &key).await?.1 == object.sha256 {
            present.insert(key);
        } else {
            differing.push(key);
        }
    }
    if differing.is_empty() && foreign.is_empty() {
        if !present.is_empty() {
            tracing::info!(
                objects = present.len(),
                "the target bucket already contains some objects with the planned content; \
                 they are not copied again"
            );
        }
        return Ok(present);
    }
    anyhow::bail!(occupied_message(bucket, endpoint, &differing, &foreign))
}

fn occupied_message(
    bucket: &str,
    endpoint: &str,
    differing: &[String],
    foreign: &[String],
) -> String {
    let mut problems = Vec::new();
    if !differing.is_empty() {
        problems.push(format!(
            "{} under the keys to copy, with other content than the source files: {}",
            objects_counted(differing.len()),
            name_keys(differing)
        ));
    }
    if !foreign.is_empty() {
        problems.push(format!(
            "{} under {} that this migration does not copy, which a server on this bucket \
             would treat as its own or delete: {}",
            objects_counted(foreign.len()),
            OWNED_PREFIXES.join(", "),
            name_keys(foreign)
        ));
    }
    format!(
        "the target bucket {bucket} contains {}; nothing was copied. The bucket must be used \
         only by edgekeep: give --bucket an empty bucket, or delete these objects, such as with \
         `aws s3 rm s3://{bucket}/KEY --endpoint-url {endpoint}` or the S3 service's own tool, \
         and run the migration again. An interrupted run may also leave an unfinished multipart \
         upload, which the S3 service's lifecycle rules or `aws s3api abort-multipart-upload` \
         remove",
        problems.join(", and ")
    )
}

fn objects_counted(count: usize) -> String {
    if count == 1 {
        "1 object".to_string()
    } else {
        format!("{count} objects")
    }
}

/// Joins the first [`KEYS_NAMED`] keys and counts the rest.
fn name_keys(keys: &[String]) -> String {
    let named = keys[..keys.len().min(KEYS_NAMED)].join(", ");
    match keys.len().saturating_sub(KEYS_NAMED) {
        0 => named,
        more => format!("{named} and {more} more"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn listed(size: u64, checksum: &str) -> ListedBackup {
        ListedBackup {
            project_id: 1,
            device_id: 4,
            backup_type: "MASTER".to_string(),
            timestamp: 1_796_400_000_000,
            size,
            checksum: checksum.to_string(),
        }
    }

    #[test]
    fn backup_file_checks_presence_size_and_sha256() {
        let backup = listed(3, "abc");
        assert_eq!(check_backup_file(Some((3, "abc".into())), &backup), Ok(()));
        assert_eq!(
            check_backup_file(None, &backup),
            Err("the file is missing".to_string())
        );
        assert_eq!(
            check_backup_file(Some((4, "abc".into())), &backup),
            Err("the file has 4 bytes, but 3 are listed".to_string())
        );
        assert_eq!(
            check_backup_file(Some((3, "abd".into())), &backup),
            Err("the file has SHA-256 abd, but abc is listed".to_string())
        );
    }

    #[test]
    fn damaged_message_lists_every_backup() {
        let damaged: Vec<SkippedBackup> = (0..12)
            .map(|index| SkippedBackup {
                project_id: 1,
                device_id: 4,
                backup_type: "MASTER".to_string(),
                timestamp: 1000 + index,
                key: format!("backups/1/4/MASTER/{}-9.dat", 1000 + index),
                reason: "the file is missing".to_string(),
            })
            .collect();
        let message = damaged_message(&damaged, 20);
        assert!(
            message.starts_with("12 of the 20 listed backups are damaged"),
            "{message}"
        );
        assert_eq!(message.matches("the file is missing").count(), 12);
        assert!(
            message.contains(
                "\n  project 1 device 4 MASTER backup 1011 (backups/1/4/MASTER/1011-9.dat): \
                 the file is missing"
            ),
            "{message}"
        );
        assert!(message.contains("--skip-damaged"), "{message}");
    }

    #[test]
    fn name_keys_counts_beyond_ten() {
        let keys: Vec<String> = (0..13)
            .map(|index| format!("uploads/{index}.dat"))
            .collect();
        assert_eq!(name_keys(&keys[..2]), "uploads/0.dat, uploads/1.dat");
        let named = name_keys(&keys);
        assert!(named.ends_with("uploads/9.dat and 3 more"), "{named}");
        assert!(!named.contains("uploads/10.dat"), "{named}");
    }

    #[test]
    fn occupied_message_names_keys_and_cleanup() {
        let message = occupied_message(
            "fleet",
            "https://s3.example.com",
            &["backups/1/4/MASTER/5-2.dat".to_string()],
            &["uploads/77.dat".to_string(), "staging/x".to_string()],
        );
        assert!(
            message.contains(
                "1 object under the keys to copy, with other content than the source files: \
                 backups/1/4/MASTER/5-2.dat"
            ),
            "{message}"
        );
        assert!(
            message.contains("2 objects under backups/, uploads/, staging/"),
            "{message}"
        );
        assert!(message.contains("uploads/77.dat, staging/x"), "{message}");
        assert!(
            message.contains("aws s3 rm s3://fleet/KEY --endpoint-url https://s3.example.com"),
            "{message}"
        );
        assert!(
            message.contains("aws s3api abort-multipart-upload"),
            "{message}"
        );
    }
}
