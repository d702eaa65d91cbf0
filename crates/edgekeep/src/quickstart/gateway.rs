//! The example edge gateway whose state the quickstart backs up and restores.
//!
//! The files come from `examples/gateway/` and are compiled in, so the
//! quickstart runs from any folder.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use rusqlite::Connection;

/// The agent config of every quickstart device.
pub const AGENT_CONFIG: &str = include_str!("../../../../examples/gateway/agent.toml");

/// Paths that the agent config names as identity.
pub const IDENTITY_PATHS: [&str; 3] = [
    "identity/device.crt",
    "identity/device.key",
    "identity/hostname",
];

/// Path of the historian database inside the state.
pub const HISTORIAN: &str = "data/historian.db";

macro_rules! state_file {
    ($path:literal) => {
        (
            $path,
            include_str!(concat!("../../../../examples/gateway/state/", $path)),
        )
    };
}

const STATE_FILES: [(&str, &str); 12] = [
    state_file!("config/gateway.json"),
    state_file!("config/connectors/press-plc.json"),
    state_file!("config/connectors/line-opcua.json"),
    state_file!("config/connectors/robot-s7.json"),
    state_file!("config/tags/press-plc.csv"),
    state_file!("config/tags/line-opcua.csv"),
    state_file!("flows/flows.json"),
    state_file!("integrations/plant-mqtt.yaml"),
    state_file!("integrations/cloud-export.yaml"),
    state_file!("logs/gateway.log"),
    state_file!("data/mqtt-buffer/.keep"),
    ("identity/hostname", ""),
];

/// Certificate and key of each example device, by letter.
const IDENTITIES: [(&str, &str, &str); 3] = [
    (
        "a",
        include_str!("../../../../examples/gateway/identities/a/device.crt"),
        include_str!("../../../../examples/gateway/identities/a/device.key"),
    ),
    (
        "b",
        include_str!("../../../../examples/gateway/identities/b/device.crt"),
        include_str!("../../../../examples/gateway/identities/b/device.key"),
    ),
    (
        "c",
        include_str!("../../../../examples/gateway/identities/c/device.crt"),
        include_str!("../../../../examples/gateway/identities/c/device.key"),
    ),
];

/// Lays out the state of example gateway `letter` (a, b or c) in `state`:
/// configuration, flows, integrations, identity and a historian in WAL mode.
pub fn lay_out(state: &Path, letter: &str) -> anyhow::Result<()> {
    for (path, content) in STATE_FILES {
        let target = state.join(path);
        std::fs::create_dir_all(target.parent().expect("paths have a folder"))?;
        std::fs::write(&target, content)
            .with_context(|| format!("cannot write {}", target.display()))?;
    }
    let (_, certificate, key) = IDENTITIES
        .iter()
        .find(|(l, _, _)| *l == letter)
        .with_context(|| format!("no example identity {letter:?}"))?;
    std::fs::write(state.join("identity/device.crt"), certificate)?;
    std::fs::write(state.join("identity/device.key"), key)?;
    set_mode(&state.join("identity/device.key"), 0o600)?;
    std::fs::write(
        state.join("identity/hostname"),
        format!("gateway-{letter}.plant-1.example\n"),
    )?;
    create_historian(&state.join(HISTORIAN), letter)
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
}

const TAGS: [(&str, &str); 11] = [
    ("press.hydraulic_pressure", "bar"),
    ("press.ram_position", "mm"),
    ("press.stroke_count", "count"),
    ("press.motor_current", "A"),
    ("press.oil_temperature", "degC"),
    ("press.die_clamp_closed", ""),
    ("press.light_curtain_ok", ""),
    ("press.fault_code", ""),
    ("line.conveyor_speed", "m/min"),
    ("line.oven_temperature", "degC"),
    ("line.good_parts", "count"),
];

/// Creates the historian with a day of one-minute samples per tag.
fn create_historian(path: &Path, letter: &str) -> anyhow::Result<()> {
    let mut db = Connection::open(path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    db.execute_batch(
        "CREATE TABLE tags (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, unit TEXT NOT NULL);
         CREATE TABLE samples (tag_id INTEGER NOT NULL REFERENCES tags(id), ts INTEGER NOT NULL,
                               value REAL NOT NULL, quality INTEGER NOT NULL);
         CREATE INDEX samples_by_tag_and_time ON samples (tag_id, ts);",
    )?;
    let start: i64 = 1_796_342_400_000;
    let offset = f64::from(letter.as_bytes()[0] - b'a');
    let tx = db.transaction()?;
    for (id, (name, unit)) in TAGS.iter().enumerate() {
        tx.execute(
            "INSERT INTO tags (id, name, unit) VALUES (?1, ?2, ?3)",
            (id as i64 + 1, name, unit),
        )?;
    }
    {
        let mut insert = tx
            .prepare("INSERT INTO samples (tag_id, ts, value, quality) VALUES (?1, ?2, ?3, 192)")?;
        for minute in 0..1440i64 {
            for tag in 1..=TAGS.len() as i64 {
                let value = offset + (minute as f64 / 60.0 + tag as f64).sin() * 10.0;
                insert.execute((tag, start + minute * 60_000, value))?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// A thread that keeps inserting samples into a historian, as the gateway
/// does while a backup runs.
pub struct HistorianWriter {
    stop: Arc<AtomicBool>,
    rows: Arc<AtomicU64>,
    thread: Option<JoinHandle<anyhow::Result<()>>>,
}

impl HistorianWriter {
    pub fn start(path: &Path) -> anyhow::Result<Self> {
        let db = Connection::open(path)?;
        db.busy_timeout(Duration::from_secs(10))?;
        let stop = Arc::new(AtomicBool::new(false));
        let rows = Arc::new(AtomicU64::new(0));
        let (thread_stop, thread_rows) = (stop.clone(), rows.clone());
        let thread = std::thread::spawn(move || -> anyhow::Result<()> {
            let mut ts: i64 = 1_796_428_800_000;
            while !thread_stop.load(Ordering::Relaxed) {
                let tx = db.unchecked_transaction()?;
                for tag in 1..=TAGS.len() as i64 {
                    tx.execute(
                        "INSERT INTO samples (tag_id, ts, value, quality) VALUES (?1, ?2, ?3, 192)",
                        (tag, ts, (ts as f64 / 1000.0).cos()),
                    )?;
                }
                tx.commit()?;
                thread_rows.fetch_add(TAGS.len() as u64, Ordering::Relaxed);
                ts += 1000;
                std::thread::sleep(Duration::from_millis(2));
            }
            Ok(())
        });
        Ok(HistorianWriter {
            stop,
            rows,
            thread: Some(thread),
        })
    }

    /// Rows written so far.
    pub fn rows(&self) -> u64 {
        self.rows.load(Ordering::Relaxed)
    }

    /// Stops the thread and returns its error, if it failed.
    pub fn stop(mut self) -> anyhow::Result<u64> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            thread
                .join()
                .map_err(|_| anyhow::anyhow!("the historian writer panicked"))??;
        }
        Ok(self.rows())
    }
}

impl Drop for HistorianWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
