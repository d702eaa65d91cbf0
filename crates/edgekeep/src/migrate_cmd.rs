//! `edgekeep migrate`: moves an embedded installation to PostgreSQL and an
//! external S3 service, and prints what was moved.

use edgekeep_server::migrate::{MigrateOptions, Report};

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub options: MigrateOptions,

    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub async fn run(args: MigrateArgs) -> anyhow::Result<()> {
    let report = edgekeep_server::migrate::run(&args.options).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", format_report(&report));
    }
    Ok(())
}

fn format_report(report: &Report) -> String {
    let mut text = String::new();
    let source_objects = report
        .source_bucket_dir
        .as_ref()
        .map_or("no objects".to_string(), |dir| {
            format!("objects in {}", dir.display())
        });
    text.push_str(&format!(
        "Source: {} (SQLite, {source_objects})\n",
        report.data_dir.display()
    ));
    text.push_str(&format!(
        "Target: PostgreSQL database {}, bucket {} at {}\n",
        report.target_database, report.target_bucket, report.target_endpoint
    ));
    let width = report
        .tables
        .iter()
        .map(|table| table.table.len())
        .max()
        .unwrap_or(0);
    for table in &report.tables {
        let unit = if table.rows == 1 { "row" } else { "rows" };
        text.push_str(&format!(
            "  {:width$}  {:>8} {unit}\n",
            table.table, table.rows
        ));
    }
    let mut objects = format!(
        "{} ({})",
        counted(report.objects, "object"),
        crate::cli::format_bytes(report.bytes)
    );
    if report.objects_present > 0 {
        objects.push_str(&format!(
            ", {} of them already in the bucket with the same content",
            report.objects_present
        ));
    }
    if report.dry_run {
        text.push_str(&format!(
            "Dry run: would copy {objects}; both sides were checked in {:.1} s and nothing \
             was changed.\n",
            report.seconds
        ));
    } else {
        text.push_str(&format!(
            "Moved {}, {}, {}, {} and {}, {objects}, in {:.1} s. Every row count, object size \
             and SHA-256 matches.\n",
            counted(report.projects, "project"),
            counted(report.devices, "device"),
            counted(report.tokens, "token"),
            counted(report.jobs, "job"),
            counted(report.backups, "backup"),
            report.seconds
        ));
    }
    if !report.skipped.is_empty() {
        let verb = if report.dry_run {
            "Would leave"
        } else {
            "Left"
        };
        text.push_str(&format!(
            "{verb} out {} (--skip-damaged):\n",
            counted(report.skipped.len() as u64, "damaged backup")
        ));
        for backup in &report.skipped {
            text.push_str(&format!(
                "  project {} device {} {} backup {} ({}): {}\n",
                backup.project_id,
                backup.device_id,
                backup.backup_type,
                backup.timestamp,
                backup.key,
                backup.reason
            ));
        }
    }
    text
}

/// Formats a count with its noun, such as `1 backup` or `3 backups`.
fn counted(count: u64, noun: &str) -> String {
    if count == 1 {
        format!("1 {noun}")
    } else {
        format!("{count} {noun}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgekeep_server::migrate::{SkippedBackup, TableRows};

    fn report(dry_run: bool) -> Report {
        Report {
            dry_run,
            data_dir: "/var/lib/edgekeep".into(),
            source_bucket_dir: Some("/var/lib/edgekeep/objects/edgekeep".into()),
            target_database: "fleet".into(),
            target_endpoint: "http://127.0.0.1:3900".into(),
            target_bucket: "edgekeep".into(),
            tables: vec![
                TableRows {
                    table: "projects".into(),
                    rows: 1,
                },
                TableRows {
                    table: "project_clock".into(),
                    rows: 12,
                },
            ],
            projects: 1,
            devices: 3,
            tokens: 2,
            jobs: 9,
            backups: 1,
            objects: 2,
            bytes: 3 << 20,
            objects_present: 0,
            skipped: Vec::new(),
            seconds: 1.5,
        }
    }

    #[test]
    fn report_lists_tables_and_totals() {
        let text = format_report(&report(false));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "Source: /var/lib/edgekeep (SQLite, objects in /var/lib/edgekeep/objects/edgekeep)"
        );
        assert_eq!(
            lines[1],
            "Target: PostgreSQL database fleet, bucket edgekeep at http://127.0.0.1:3900"
        );
        assert_eq!(lines[2], "  projects              1 row");
        assert_eq!(lines[3], "  project_clock        12 rows");
        assert_eq!(
            lines[4],
            "Moved 1 project, 3 devices, 2 tokens, 9 jobs and 1 backup, 2 objects (3.0 MiB), \
             in 1.5 s. Every row count, object size and SHA-256 matches."
        );
    }

    #[test]
    fn dry_run_report_says_nothing_changed() {
        let text = format_report(&report(true));
        assert!(
            text.ends_with(
                "Dry run: would copy 2 objects (3.0 MiB); both sides were checked in 1.5 s and \
                 nothing was changed.\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn report_lists_skipped_backups_and_present_objects() {
        let mut report = report(false);
        report.objects_present = 1;
        report.skipped.push(SkippedBackup {
            project_id: 1,
            device_id: 4,
            backup_type: "MASTER".into(),
            timestamp: 1796400000000,
            key: "backups/1/4/MASTER/1796400000000-7.dat".into(),
            reason: "the file is missing".into(),
        });
        let text = format_report(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[4].contains(
                "2 objects (3.0 MiB), 1 of them already in the bucket with the same content, in"
            ),
            "{text}"
        );
        assert_eq!(lines[5], "Left out 1 damaged backup (--skip-damaged):");
        assert_eq!(
            lines[6],
            "  project 1 device 4 MASTER backup 1796400000000 \
             (backups/1/4/MASTER/1796400000000-7.dat): the file is missing"
        );
    }
}
