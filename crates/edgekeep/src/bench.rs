//! `edgekeep bench`: packing and unpacking speed and memory against `tar | zstd -3`,
//! and with `edgekeep bench fleet` job throughput and server memory for
//! simulated fleets (see [`fleet`]).
//!
//! Each tool runs as a child process on the same tree, after `sync`, so both
//! read from a warm page cache and neither pays for the other's writeback.
//! Peak memory is the child's `ru_maxrss` from `wait4`; for the shell
//! pipeline that is the largest single process in it (tar, zstd or sh).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};

use crate::archive_cmd::megabytes_per_second;

mod fleet;

/// Without a subcommand, the archive benchmark runs with the options below.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    #[command(subcommand)]
    mode: Option<BenchMode>,
    /// Tree sizes to generate, comma-separated, with a KiB, MiB or GiB suffix.
    #[arg(long, value_delimiter = ',', default_value = "100MiB,2GiB")]
    sizes: Vec<String>,
    /// Folder for generated trees and outputs; a new temporary folder by default.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the generated trees and outputs instead of deleting them.
    #[arg(long)]
    keep: bool,
    /// Runs of each measurement; the table shows the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[derive(Debug, clap::Subcommand)]
enum BenchMode {
    /// Measure jobs per second, job latency and server memory with simulated
    /// fleets, each against a fresh `edgekeep server`.
    Fleet(fleet::FleetBenchArgs),
}

/// One measured run of one tool.
struct Measurement {
    seconds: f64,
    peak_rss_kib: u64,
}

struct Row {
    size: String,
    tool: &'static str,
    pack: Measurement,
    unpack: Measurement,
    state_bytes: u64,
    output_bytes: u64,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(BenchMode::Fleet(fleet_args)) = args.mode {
        return fleet::run(fleet_args);
    }
    let sizes = args
        .sizes
        .iter()
        .map(|size| parse_size(size).map(|bytes| (size.clone(), bytes)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let (base, temp_dir) = match &args.dir {
        Some(dir) => {
            fs::create_dir_all(dir)
                .with_context(|| format!("failed to create {}", dir.display()))?;
            (dir.clone(), None)
        }
        None => {
            let temp = tempfile::Builder::new()
                .prefix("edgekeep-bench")
                .tempdir()?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    let exe = std::env::current_exe().context("failed to find the edgekeep executable")?;

    let mut rows = Vec::new();
    for (label, bytes) in sizes {
        let work = base.join(format!("bench-{label}"));
        if work.exists() {
            fs::remove_dir_all(&work)?;
        }
        let tree = work.join("tree");
        eprintln!("generating {label} of test data in {}", tree.display());
        let state_bytes = generate_tree(&tree, bytes)?;
        rows.push(bench_edgekeep(&exe, &work, &label, state_bytes, args.runs)?);
        rows.push(bench_tar_zstd(&work, &label, state_bytes, args.runs)?);
        if !args.keep {
            fs::remove_dir_all(&work)?;
        }
    }
    if let (true, Some(temp_dir)) = (args.keep, temp_dir) {
        eprintln!(
            "generated trees and outputs are in {}",
            temp_dir.keep().display()
        );
    }
    print_table(&rows);
    Ok(())
}

fn bench_edgekeep(
    exe: &Path,
    work: &Path,
    label: &str,
    state_bytes: u64,
    runs: usize,
) -> anyhow::Result<Row> {
    let out = work.join("edgekeep.dat");
    let dest = work.join("edgekeep-unpacked");
    let tree = work.join("tree");
    let pack = measure_runs(
        runs,
        || remove_if_exists(&out),
        || {
            let mut command = Command::new(exe);
            command
                .args(["archive", "pack", "--root"])
                .arg(&tree)
                .arg("--out")
                .arg(&out);
            command
        },
    )?;
    let unpack = measure_runs(
        runs,
        || remove_if_exists(&dest),
        || {
            let mut command = Command::new(exe);
            command
                .args(["archive", "unpack"])
                .arg(&out)
                .arg("--into")
                .arg(&dest);
            command
        },
    )?;
    remove_if_exists(&dest)?;
    Ok(Row {
        size: label.to_owned(),
        tool: "edgekeep",
        pack,
        unpack,
        state_bytes,
        output_bytes: fs::metadata(&out)?.len(),
    })
}

fn bench_tar_zstd(work: &Path, label: &str, state_bytes: u64, runs: usize) -> anyhow::Result<Row> {
    let out = work.join("tar.tar.zst");
    let dest = work.join("tar-unpacked");
    let pack_script = format!(
        "tar -c -C '{}' . | zstd -3 -q -o '{}'",
        work.join("tree").display(),
        out.display()
    );
    let unpack_script = format!(
        "zstd -d -c '{}' | tar -x -C '{}'",
        out.display(),
        dest.display()
    );
    let shell = |script: &str| {
        let mut command = Command::new("sh");
        command.args(["-c", script]);
        command
    };
    let pack = measure_runs(runs, || remove_if_exists(&out), || shell(&pack_script))?;
    let unpack = measure_runs(
        runs,
        || {
            remove_if_exists(&dest)?;
            Ok(fs::create_dir(&dest)?)
        },
        || shell(&unpack_script),
    )?;
    remove_if_exists(&dest)?;
    Ok(Row {
        size: label.to_owned(),
        tool: "tar + zstd -3",
        pack,
        unpack,
        state_bytes,
        output_bytes: fs::metadata(&out)?.len(),
    })
}

fn remove_if_exists(path: &Path) -> anyhow::Result<()> {
    let removed = if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    };
    match removed {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            Err(err).with_context(|| format!("failed to remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Runs `make_command` `runs` times, calling `reset` before each run, and
/// returns the median wall time and the largest peak RSS.
fn measure_runs(
    runs: usize,
    mut reset: impl FnMut() -> anyhow::Result<()>,
    make_command: impl Fn() -> Command,
) -> anyhow::Result<Measurement> {
    let mut seconds = Vec::new();
    let mut peak_rss_kib = 0;
    for _ in 0..runs.max(1) {
        reset()?;
        let run = measure(make_command())?;
        seconds.push(run.seconds);
        peak_rss_kib = peak_rss_kib.max(run.peak_rss_kib);
    }
    seconds.sort_by(f64::total_cmp);
    Ok(Measurement {
        seconds: seconds[seconds.len() / 2],
        peak_rss_kib,
    })
}

/// Runs `command` after `sync`, and returns its wall time and peak RSS.
fn measure(mut command: Command) -> anyhow::Result<Measurement> {
    command.stdout(Stdio::null());
    Command::new("sync")
        .status()
        .context("failed to run sync")?;
    let started = Instant::now();
    let child = command
        .spawn()
        .with_context(|| format!("failed to start {command:?}"))?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our unreaped child, and both pointers are valid for writes.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let seconds = started.elapsed().as_secs_f64();
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("wait4 failed");
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("{command:?} failed with wait status {status}");
    }
    // On Linux ru_maxrss is in KiB.
    Ok(Measurement {
        seconds,
        peak_rss_kib: usage.ru_maxrss as u64,
    })
}

fn print_table(rows: &[Row]) {
    println!(
        "| size | tool | pack MB/s | unpack MB/s | pack peak MiB | unpack peak MiB | output MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {:.1} | {:.1} |",
            row.size,
            row.tool,
            megabytes_per_second(row.state_bytes, row.pack.seconds),
            megabytes_per_second(row.state_bytes, row.unpack.seconds),
            row.pack.peak_rss_kib as f64 / 1024.0,
            row.unpack.peak_rss_kib as f64 / 1024.0,
            row.output_bytes as f64 / (1024.0 * 1024.0),
        );
    }
}

fn parse_size(text: &str) -> anyhow::Result<u64> {
    let units = [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (suffix, factor) in units {
        if let Some(number) = text.strip_suffix(suffix) {
            let number: u64 = number
                .trim()
                .parse()
                .with_context(|| format!("invalid size {text:?}; use for example 100MiB"))?;
            return Ok(number * factor);
        }
    }
    bail!("invalid size {text:?}: expected a number with a KiB, MiB or GiB suffix, such as 100MiB")
}

/// The three kinds of generated content, with their share of the bytes.
#[derive(Clone, Copy)]
enum Content {
    /// Text-like: words from a small vocabulary, compresses about 3 to 4 times.
    Text,
    /// Binary records with repeated structure and random fields.
    Records,
    /// Random bytes, standing for already-compressed files.
    Random,
}

const CONTENT_SHARES: [(Content, u64, &str); 3] = [
    (Content::Text, 2, "txt"),
    (Content::Records, 1, "bin"),
    (Content::Random, 1, "zst"),
];

/// Writes about `total` bytes of mixed files, 4 KiB to 32 MiB each, into
/// folders up to four levels deep. The seed is fixed, so runs are repeatable.
fn generate_tree(root: &Path, total: u64) -> anyhow::Result<u64> {
    let mut rng = StdRng::seed_from_u64(0x6564_6765);
    let mut written = 0;
    let mut index = 0;
    for (content, share, extension) in CONTENT_SHARES {
        let budget = total * share / 4;
        let mut used = 0;
        while used < budget {
            // Log-uniform sizes between 4 KiB and 32 MiB.
            let exponent = rng.gen_range(12.0..25.0_f64);
            let size = (2f64.powf(exponent) as u64).min(budget - used).max(1);
            let folder = random_folder(&mut rng, root);
            fs::create_dir_all(&folder)?;
            let path = folder.join(format!("file{index:05}.{extension}"));
            write_content(&path, content, size, &mut rng)
                .with_context(|| format!("failed to write {}", path.display()))?;
            used += size;
            index += 1;
        }
        written += used;
    }
    Ok(written)
}

fn random_folder(rng: &mut StdRng, root: &Path) -> PathBuf {
    let depth = rng.gen_range(1..=4);
    let mut folder = root.to_path_buf();
    for level in 0..depth {
        folder.push(format!("dir{level}-{}", rng.gen_range(0..4)));
    }
    folder
}

const WORDS: [&str; 24] = [
    "sensor",
    "temperature",
    "pressure",
    "flow",
    "valve",
    "open",
    "closed",
    "alarm",
    "tag",
    "connector",
    "modbus",
    "opcua",
    "mqtt",
    "topic",
    "value",
    "quality",
    "good",
    "timestamp",
    "line",
    "station",
    "device",
    "enabled",
    "true",
    "false",
];

fn write_content(path: &Path, content: Content, size: u64, rng: &mut StdRng) -> anyhow::Result<()> {
    let mut out = BufWriter::with_capacity(1 << 20, File::create(path)?);
    let mut chunk = Vec::with_capacity(1 << 16);
    let mut left = size;
    while left > 0 {
        chunk.clear();
        match content {
            Content::Text => {
                while chunk.len() < 1 << 16 {
                    chunk.extend_from_slice(WORDS[rng.gen_range(0..WORDS.len())].as_bytes());
                    chunk.push(if rng.gen_range(0..8) == 0 {
                        b'\n'
                    } else {
                        b' '
                    });
                    chunk.extend_from_slice(rng.gen_range(0..10_000u32).to_string().as_bytes());
                    chunk.push(b' ');
                }
            }
            Content::Records => {
                let mut record = [0u8; 32];
                while chunk.len() < 1 << 16 {
                    record[0..8].copy_from_slice(&(chunk.len() as u64).to_le_bytes());
                    record[8..12].copy_from_slice(b"REC1");
                    rng.fill_bytes(&mut record[12..20]);
                    chunk.extend_from_slice(&record);
                }
            }
            Content::Random => {
                chunk.resize(1 << 16, 0);
                rng.fill_bytes(&mut chunk);
            }
        }
        let n = (chunk.len() as u64).min(left) as usize;
        out.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    out.flush()?;
    Ok(())
}
