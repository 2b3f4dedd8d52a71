//! The local index file (redb): its tables, how it is opened, and the transactions that
//! write claims into it, adopt a snapshot under it, wipe it for another log and purge
//! what has left the window. [`super::Claims`] decides when; this is only the file.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use redb::{Database, ReadableTable, TableDefinition};

use super::snapshot;
use crate::domain::dedup::{IdKey, IdMap, Record};

/// id → (sequence, receipt time in ns)
pub(super) const CLAIMS: TableDefinition<&[u8; 16], (u64, u64)> = TableDefinition::new("claims");
/// The order in which claims fall out of the window, one entry per write rather than per
/// claim (an entry per claim doubled the cost of writing the index): (oldest receipt
/// time in the entry, log position written) → the write's claims as (receipt time, id),
/// oldest first. Expiring cuts a prefix off the oldest entries.
pub(super) const EXPIRY: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("expiry_runs");
/// The previous layout's per-claim expiry table, dropped when an old index is wiped.
pub(super) const EXPIRY_V1: &str = "expiry";
pub(super) const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
pub(super) const META_STREAM: &str = "stream_created_ns";
pub(super) const META_APPLIED: &str = "applied";
pub(super) const META_NEWEST: &str = "newest_ns";
/// The log position of the snapshot the index sits on (`claims.base`), when it does.
pub(super) const META_BASE: &str = "base";
/// Layout of the file; an index of another layout is rebuilt from the log.
pub(super) const META_FORMAT: &str = "format";
pub(super) const FORMAT: u64 = 2;
/// One claim in an expiry entry: receipt time (big-endian u64), then the id.
pub(super) const EXPIRY_ENTRY: usize = 24;

pub(super) const CACHE_BYTES: usize = 16 << 20;
/// Most expired claims removed per transaction (the rest go next time).
const PURGE_LIMIT: usize = 200_000;

/// The local index file, opened before anything else so that a DATA_DIR held by another
/// process stops start-up with a clear message.
pub struct LocalIndex {
    pub(super) db: Arc<Database>,
    pub(super) path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl LocalIndex {
    pub fn open(data_dir: Option<&Path>) -> Result<LocalIndex> {
        let (dir, temp) = match data_dir {
            Some(d) => {
                std::fs::create_dir_all(d)
                    .with_context(|| format!("DATA_DIR: cannot create {}", d.display()))?;
                (d.to_path_buf(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("kloudmeter-")
                    .tempdir()
                    .context("creating a temporary folder for the claim index")?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let path = dir.join("claims.redb");
        let open = |path: &Path| Database::builder().set_cache_size(CACHE_BYTES).create(path);
        let db = match open(&path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => bail!(
                "DATA_DIR: {} is in use by another kloudmeter process",
                dir.display()
            ),
            Err(e) => {
                // Only a cache of the claim log: start it again rather than refuse to run.
                tracing::warn!(path = %path.display(), error = %e, "claim index unreadable; starting it afresh");
                std::fs::remove_file(&path)
                    .with_context(|| format!("DATA_DIR: cannot replace {}", path.display()))?;
                open(&path)
                    .with_context(|| format!("DATA_DIR: cannot create {}", path.display()))?
            }
        };
        let txn = db.begin_write()?;
        txn.open_table(CLAIMS)?;
        txn.open_table(EXPIRY)?;
        txn.open_table(META)?;
        txn.commit()?;
        Ok(LocalIndex {
            db: Arc::new(db),
            path,
            _temp: temp,
        })
    }

    /// The snapshot the index sits on, when it was started from one.
    pub(super) fn base_path(&self) -> PathBuf {
        self.path.with_file_name("claims.base")
    }

    /// Where the leader writes a snapshot before publishing it.
    pub(super) fn snapshot_path(&self) -> PathBuf {
        self.path.with_file_name("claims.snapshot")
    }
}

/// Empty the index and record which log it will follow.
pub(super) fn wipe(db: &Database, created: u64) -> Result<()> {
    let txn = db.begin_write()?;
    txn.delete_table(CLAIMS)?;
    txn.delete_table(EXPIRY)?;
    let v1: TableDefinition<(u64, &[u8; 16]), ()> = TableDefinition::new(EXPIRY_V1);
    txn.delete_table(v1)?;
    txn.delete_table(META)?;
    txn.open_table(CLAIMS)?;
    txn.open_table(EXPIRY)?;
    let mut meta = txn.open_table(META)?;
    meta.insert(META_STREAM, created)?;
    meta.insert(META_FORMAT, FORMAT)?;
    drop(meta);
    txn.commit()?;
    Ok(())
}

/// Sit the (empty) index on a snapshot: its position is the index's.
pub(super) fn adopt(db: &Database, h: &snapshot::Header) -> Result<()> {
    let txn = db.begin_write()?;
    let mut meta = txn.open_table(META)?;
    meta.insert(META_APPLIED, h.applied)?;
    meta.insert(META_NEWEST, u64::try_from(h.newest_ns).unwrap_or(0))?;
    meta.insert(META_BASE, h.applied)?;
    drop(meta);
    txn.commit()?;
    Ok(())
}

/// One transaction: the claims, their expiry entry, the log position, and the purge of
/// claims older than `cutoff` (and of the snapshot layer, when all of it is).
pub(super) fn write(
    db: &Database,
    overlay: &IdMap<Record>,
    applied: u64,
    newest: i64,
    cutoff: i64,
    drops_base: bool,
) -> Result<()> {
    let txn = db.begin_write()?;
    {
        let mut claims = txn.open_table(CLAIMS)?;
        let mut expiry = txn.open_table(EXPIRY)?;
        let time = |r: &Record| u64::try_from(r.time_ns).unwrap_or(0);
        let mut entries: Vec<(&IdKey, &Record)> = overlay.iter().collect();
        // sorted inserts touch each page once
        entries.sort_unstable_by_key(|(k, _)| **k);
        for (k, r) in &entries {
            claims.insert(*k, (r.seq, time(r)))?;
        }
        entries.sort_unstable_by_key(|(k, r)| (time(r), **k));
        if let Some((_, oldest)) = entries.first() {
            let mut run = Vec::with_capacity(entries.len() * EXPIRY_ENTRY);
            for (k, r) in &entries {
                run.extend_from_slice(&time(r).to_be_bytes());
                run.extend_from_slice(*k);
            }
            expiry.insert((time(oldest), applied), run.as_slice())?;
        }
        purge(&mut claims, &mut expiry, u64::try_from(cutoff).unwrap_or(0))?;
        let mut meta = txn.open_table(META)?;
        meta.insert(META_APPLIED, applied)?;
        meta.insert(META_NEWEST, u64::try_from(newest).unwrap_or(0))?;
        if drops_base {
            meta.remove(META_BASE)?;
        }
    }
    txn.commit()?;
    Ok(())
}

/// Drop claims received before `cutoff` (at most about PURGE_LIMIT a time): cut the
/// expired prefix off each expiry entry that starts before it, keeping the rest under
/// its new oldest time.
fn purge(
    claims: &mut redb::Table<&[u8; 16], (u64, u64)>,
    expiry: &mut redb::Table<(u64, u64), &[u8]>,
    cutoff: u64,
) -> Result<()> {
    let mut due: Vec<((u64, u64), Vec<u8>)> = Vec::new();
    let mut count = 0;
    for item in expiry.range::<(u64, u64)>(..(cutoff, 0))? {
        let (key, run) = item?;
        let run = run.value().to_vec();
        count += run.len() / EXPIRY_ENTRY;
        due.push((key.value(), run));
        if count >= PURGE_LIMIT {
            break;
        }
    }
    for ((oldest, position), run) in due {
        expiry.remove((oldest, position))?;
        let mut rest = run.as_slice();
        while rest.len() >= EXPIRY_ENTRY {
            let (t, id) = expiry_entry(rest);
            if t >= cutoff {
                break;
            }
            // a later claim of the same id has its own expiry entry
            if claims.get(&id)?.map(|v| v.value().1) == Some(t) {
                claims.remove(&id)?;
            }
            rest = &rest[EXPIRY_ENTRY..];
        }
        if rest.len() >= EXPIRY_ENTRY {
            expiry.insert((expiry_entry(rest).0, position), rest)?;
        }
    }
    Ok(())
}

/// The first claim of an expiry entry: (receipt time, id).
fn expiry_entry(run: &[u8]) -> (u64, IdKey) {
    let mut t = [0u8; 8];
    t.copy_from_slice(&run[..8]);
    let mut id = [0u8; 16];
    id.copy_from_slice(&run[8..EXPIRY_ENTRY]);
    (u64::from_be_bytes(t), id)
}
