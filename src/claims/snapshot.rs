//! Snapshots of the claim index, so that a process with an empty DATA_DIR starts in
//! seconds rather than reading the whole claim log into its index.
//!
//! The leader writes, every CLAIM_SNAPSHOT_INTERVAL, every claim still inside the window
//! as one file sorted by id (32 bytes a claim, the claim log's own encoding) under a
//! header saying which log it was read from and how far; the file goes to a NATS object
//! store bucket that every process reaches. A process whose index is empty fetches it,
//! uses it in place as the lower layer of its index ([`Base`]: looking an id up is a
//! binary search over an in-memory list of every block's first id, then one read of a
//! 4 KiB block) and reads only the log after it. Inserting tens of millions of ids into
//! the local B-tree is what made a cold start take minutes; the snapshot is never
//! inserted, only read. Ids claimed later live in the B-tree above it, and the base is
//! dropped once everything in it has left the window.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::object_store::{ObjectMetadata, ObjectStore};
use redb::Database;

use super::{CLAIMS, CLOCK_MARGIN_NS, ENTRY, META, META_APPLIED, META_NEWEST, META_STREAM};
use crate::domain::dedup::{IdKey, Record};

/// The one object in the snapshot bucket (each put replaces it).
pub const OBJECT: &str = "claim-index";
const MAGIC: &[u8; 8] = b"KMCLAIM1";
const HEADER: usize = 48;
/// Claims per block of the file: 4 KiB, one read per look-up.
const BLOCK: usize = 128;
/// Largest chunk the object store sends (under NATS's default 1 MiB message limit).
const CHUNK: usize = 512 * 1024;

/// What a snapshot holds: the claims of the log with this creation time, through this
/// log sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub stream_created_ns: u64,
    pub applied: u64,
    pub newest_ns: i64,
    pub count: u64,
}

impl Header {
    fn encode(&self) -> [u8; HEADER] {
        let mut out = [0u8; HEADER];
        out[..8].copy_from_slice(MAGIC);
        out[8..16].copy_from_slice(&self.stream_created_ns.to_be_bytes());
        out[16..24].copy_from_slice(&self.applied.to_be_bytes());
        out[24..32].copy_from_slice(&self.newest_ns.to_be_bytes());
        out[32..40].copy_from_slice(&self.count.to_be_bytes());
        out
    }

    fn decode(raw: &[u8; HEADER]) -> Result<Header> {
        if &raw[..8] != MAGIC {
            bail!("not a claim index snapshot");
        }
        let word = |i: usize| u64::from_be_bytes(raw[i..i + 8].try_into().expect("8 bytes"));
        Ok(Header {
            stream_created_ns: word(8),
            applied: word(16),
            newest_ns: word(24) as i64,
            count: word(32),
        })
    }
}

/// A snapshot file used in place: the lower layer of a process's claim index.
pub struct Base {
    file: File,
    pub path: PathBuf,
    pub header: Header,
    /// The first id of every block, in order.
    fences: Vec<IdKey>,
}

impl Base {
    /// Open a snapshot file, checking its length against its header and reading the
    /// first id of every block (one sequential pass).
    pub fn open(path: &Path) -> Result<Base> {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut reader = BufReader::with_capacity(1 << 20, &file);
        let mut raw = [0u8; HEADER];
        reader.read_exact(&mut raw)?;
        let header = Header::decode(&raw)?;
        let expected = HEADER as u64 + header.count * ENTRY as u64;
        let len = file.metadata()?.len();
        if len != expected {
            bail!(
                "{} is {len} bytes, its header says {expected}",
                path.display()
            );
        }
        let mut fences = Vec::with_capacity(usize::try_from(header.count).unwrap_or(0) / BLOCK + 1);
        let mut entry = [0u8; ENTRY];
        let mut previous: Option<IdKey> = None;
        for i in 0..header.count {
            reader.read_exact(&mut entry)?;
            let (id, _) = decode_entry(&entry);
            if previous.is_some_and(|p| p >= id) {
                bail!("{} is not sorted by id", path.display());
            }
            previous = Some(id);
            if i % BLOCK as u64 == 0 {
                fences.push(id);
            }
        }
        Ok(Base {
            file,
            path: path.to_path_buf(),
            header,
            fences,
        })
    }

    /// The claim of `id` in the snapshot, if any.
    pub fn get(&self, id: &IdKey) -> Result<Option<Record>> {
        // the last block whose first id is not after `id`
        let block = match self.fences.partition_point(|f| f <= id) {
            0 => return Ok(None),
            n => n - 1,
        };
        let first = block * BLOCK;
        let count = (usize::try_from(self.header.count)? - first).min(BLOCK);
        let mut buf = vec![0u8; count * ENTRY];
        self.file
            .read_exact_at(&mut buf, (HEADER + first * ENTRY) as u64)?;
        let entries: Vec<&[u8]> = buf.chunks_exact(ENTRY).collect();
        Ok(entries
            .binary_search_by(|e| e[..16].cmp(&id[..]))
            .ok()
            .map(|i| decode_entry(entries[i]).1))
    }

    /// Every claim, in id order.
    fn iter(&self) -> Result<impl Iterator<Item = Result<(IdKey, Record)>> + '_> {
        let mut file = self.file.try_clone()?;
        file.seek(SeekFrom::Start(HEADER as u64))?;
        let mut reader = BufReader::with_capacity(1 << 20, file);
        Ok((0..self.header.count).map(move |_| {
            let mut entry = [0u8; ENTRY];
            reader.read_exact(&mut entry)?;
            Ok(decode_entry(&entry))
        }))
    }
}

fn decode_entry(raw: &[u8]) -> (IdKey, Record) {
    let mut id = [0u8; 16];
    id.copy_from_slice(&raw[..16]);
    let seq = u64::from_be_bytes(raw[16..24].try_into().expect("8 bytes"));
    let time_ns = i64::from_be_bytes(raw[24..32].try_into().expect("8 bytes"));
    (id, Record { seq, time_ns })
}

/// Write a snapshot of the index as it stands in the file (`db` through its last
/// committed write, over `base`) to `path`: every claim received after the window's
/// start, sorted by id. None when the index holds nothing yet.
pub fn write(
    db: &Database,
    base: Option<&Base>,
    window_ns: i64,
    path: &Path,
) -> Result<Option<Header>> {
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let get = |k: &str| -> Result<u64> { Ok(meta.get(k)?.map(|v| v.value()).unwrap_or(0)) };
    let (applied, newest, created) = (
        get(META_APPLIED)?,
        get(META_NEWEST)? as i64,
        get(META_STREAM)?,
    );
    if applied == 0 {
        return Ok(None);
    }
    let cutoff = newest
        .saturating_sub(window_ns)
        .saturating_sub(CLOCK_MARGIN_NS);
    let table = txn.open_table(CLAIMS)?;
    let mut upper = table
        .range::<&[u8; 16]>(..)?
        .map(|item| -> Result<(IdKey, Record)> {
            let (k, v) = item?;
            let (seq, t) = v.value();
            Ok((
                *k.value(),
                Record {
                    seq,
                    time_ns: i64::try_from(t).unwrap_or(i64::MAX),
                },
            ))
        })
        .peekable();
    let mut lower = match base {
        Some(b) => Some(b.iter()?.peekable()),
        None => None,
    };
    let merged = std::iter::from_fn(move || loop {
        // the smaller id of the two layers; on a tie the upper (later) claim wins
        let next = match (upper.peek(), lower.as_mut().and_then(|l| l.peek())) {
            (None, None) => return None,
            (Some(_), None) => upper.next(),
            (None, Some(_)) => lower.as_mut().and_then(Iterator::next),
            (Some(Ok((u, _))), Some(Ok((l, _)))) => {
                if u == l {
                    lower.as_mut().and_then(Iterator::next);
                    upper.next()
                } else if u < l {
                    upper.next()
                } else {
                    lower.as_mut().and_then(Iterator::next)
                }
            }
            (Some(Err(_)), _) => upper.next(),
            (_, Some(Err(_))) => lower.as_mut().and_then(Iterator::next),
        };
        match next {
            Some(Ok((_, r))) if r.time_ns < cutoff => continue,
            other => return other,
        }
    });
    write_sorted(path, created, applied, newest, merged).map(Some)
}

/// Write claims sorted by id (each id once) as a snapshot of the log created at
/// `stream_created_ns`, through log sequence `applied`, to `path` (whole or not at all).
pub fn write_sorted(
    path: &Path,
    stream_created_ns: u64,
    applied: u64,
    newest_ns: i64,
    claims: impl Iterator<Item = Result<(IdKey, Record)>>,
) -> Result<Header> {
    let tmp = partial(path);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
    out.write_all(&[0u8; HEADER])?;
    let mut count = 0u64;
    for claim in claims {
        let (id, r) = claim?;
        out.write_all(&id)?;
        out.write_all(&r.seq.to_be_bytes())?;
        out.write_all(&r.time_ns.to_be_bytes())?;
        count += 1;
    }
    let header = Header {
        stream_created_ns,
        applied,
        newest_ns,
        count,
    };
    let mut file = out.into_inner().map_err(|e| e.into_error())?;
    file.seek(SeekFrom::Start(0))?;
    file.write_all(&header.encode())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(header)
}

/// Where a file is written before it is renamed into place: beside it, named after it
/// (`claims.base` → `claims.base.partial`), so that a snapshot being written and one
/// being fetched never share a name.
fn partial(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".partial");
    PathBuf::from(name)
}

/// Replace the shared snapshot with the file at `path`.
pub async fn publish(bucket: &ObjectStore, path: &Path) -> Result<()> {
    let mut file = tokio::fs::File::open(path).await?;
    bucket
        .put(
            ObjectMetadata {
                name: OBJECT.into(),
                description: Some("KloudMeter claim index snapshot".into()),
                chunk_size: Some(CHUNK),
                ..Default::default()
            },
            &mut file,
        )
        .await
        .context("publishing the claim index snapshot")?;
    Ok(())
}

/// Fetch the shared snapshot into `path` and open it, if there is one for the claim
/// log created at `stream_created_ns` that goes no further than `last` (the log's end).
pub async fn fetch(
    bucket: &ObjectStore,
    path: &Path,
    stream_created_ns: u64,
    last: u64,
) -> Result<Option<Base>> {
    let started = Instant::now();
    let mut object = match bucket.get(OBJECT).await {
        Ok(o) => o,
        Err(e) if e.kind() == async_nats::jetstream::object_store::GetErrorKind::NotFound => {
            return Ok(None)
        }
        Err(e) => return Err(anyhow::Error::new(e).context("fetching the claim index snapshot")),
    };
    let tmp = partial(path);
    let mut file = tokio::fs::File::create(&tmp).await?;
    let bytes = tokio::io::copy(&mut object, &mut file)
        .await
        .context("fetching the claim index snapshot")?;
    file.sync_all().await?;
    drop(file);
    let opened = {
        let tmp = tmp.clone();
        tokio::task::spawn_blocking(move || Base::open(&tmp)).await??
    };
    let h = opened.header;
    if h.stream_created_ns != stream_created_ns || h.applied > last {
        tracing::info!("the claim index snapshot is of another claim log; not used");
        let _ = std::fs::remove_file(&tmp);
        return Ok(None);
    }
    std::fs::rename(&tmp, path)?;
    tracing::info!(
        claims = h.count,
        bytes,
        through = h.applied,
        seconds = started.elapsed().as_secs_f64(),
        "claim index snapshot fetched"
    );
    Ok(Some(Base {
        path: path.to_path_buf(),
        ..opened
    }))
}
