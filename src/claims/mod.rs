//! Where the dedup records live: which stream sequence first claimed each event id within
//! DEDUP_WINDOW (the decisions themselves are the pure [`crate::domain::dedup`]).
//!
//! The truth is the claim log, a JetStream stream with one subject whose messages each
//! carry a batch of claims (32 bytes apiece). One subject and few, large messages: what
//! nats-server keeps in memory does not grow with the number of ids in the window, where
//! a KV key per id costs it hundreds of bytes of RSS each. Every process keeps a local,
//! on-disk index of the log (redb, with a fixed page cache) so that looking an id up is a
//! local read; standbys follow the log, so a new leader starts warm.
//!
//! A leader appends with `Nats-Expected-Last-Sequence` set to the last log entry it has
//! applied: if anyone else appended meanwhile (two leaders during a lease hand-over), the
//! append fails and the aggregator restarts from its cursor after reading the log again,
//! so no two processes ever decide from different histories.

mod index;
pub mod snapshot;

pub use index::LocalIndex;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{self, consumer, message::PublishMessage, stream};
use futures::StreamExt;
use redb::ReadableTableMetadata;

use crate::domain::dedup::{IdKey, IdMap, Record};
use crate::nats::store::Store;
use index::{
    adopt, wipe, write, CLAIMS, FORMAT, META, META_APPLIED, META_BASE, META_FORMAT, META_NEWEST,
    META_STREAM,
};
use snapshot::Base;

const ENTRY: usize = 32;
/// Claims per log message: 512 KiB, under NATS's default 1 MiB payload limit.
const PER_MESSAGE: usize = 16_384;
/// Claims applied in memory before they are written to the local index in one
/// transaction (large transactions touch each B-tree page once for many ids).
const OVERLAY_LIMIT: usize = 50_000;
const PERSIST_EVERY: Duration = Duration::from_secs(2);
/// The local index's page cache: its whole memory cost, whatever the window holds.
/// Stream timestamps may step back a little (clock adjustments): keep claims this much
/// longer than the window before dropping them.
const CLOCK_MARGIN_NS: i64 = 60_000_000_000;

pub struct Claims {
    index: Arc<LocalIndex>,
    /// The snapshot under the B-tree (ids claimed through its position), until all of
    /// it has left the window.
    base: Option<Arc<Base>>,
    snapshots: async_nats::jetstream::object_store::ObjectStore,
    js: jetstream::Context,
    stream: stream::Stream,
    subject: String,
    window_ns: i64,
    /// Last log sequence reflected in the index plus the overlay.
    applied: u64,
    /// Last log sequence written to the index file.
    persisted: u64,
    stream_created_ns: u64,
    /// Newest receipt time among applied claims: the clock that expires old ones.
    newest_ns: i64,
    /// Applied claims not yet in the index file (bounded by OVERLAY_LIMIT).
    overlay: IdMap<Record>,
    /// The previous overlay while a background transaction writes it to the index file.
    writing: Option<Writing>,
    last_persist: Instant,
}

struct Writing {
    task: tokio::sync::oneshot::Receiver<Result<()>>,
    claims: Arc<IdMap<Record>>,
    applied: u64,
    /// The write lets go of the snapshot layer (all of it out of the window).
    drops_base: bool,
}

impl Claims {
    /// Attach the local index to the claim log, discarding it if it was built from
    /// another log (the stream was recreated) or is ahead of it.
    pub async fn attach(index: Arc<LocalIndex>, store: &Store, window: Duration) -> Result<Claims> {
        let mut stream = store.claims.clone();
        let info = stream.info().await.context("reading the claim log")?;
        let created = u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0);
        let last = info.state.last_sequence;
        let db = index.db.clone();
        let (mut applied, mut newest, base_at) = blocking(move || {
            let txn = db.begin_read()?;
            let meta = txn.open_table(META)?;
            let get = |k: &str| -> Result<Option<u64>> { Ok(meta.get(k)?.map(|v| v.value())) };
            let fresh = get(META_FORMAT)? == Some(FORMAT)
                && get(META_STREAM)? == Some(created)
                && get(META_APPLIED)?.unwrap_or(0) <= last;
            if fresh {
                return Ok((
                    get(META_APPLIED)?.unwrap_or(0),
                    get(META_NEWEST)?.unwrap_or(0),
                    get(META_BASE)?,
                ));
            }
            drop(meta);
            drop(txn);
            wipe(&db, created)?;
            Ok((0, 0, None))
        })
        .await?;
        let mut base = None;
        if let Some(at) = base_at {
            match Base::open(&index.base_path()) {
                Ok(b) if b.header.applied == at => base = Some(Arc::new(b)),
                outcome => {
                    let why = outcome
                        .err()
                        .map_or("another snapshot".into(), |e| format!("{e:#}"));
                    tracing::warn!(
                        error = why,
                        "the claim index's snapshot layer is unusable; starting the index afresh"
                    );
                    let db = index.db.clone();
                    blocking(move || wipe(&db, created)).await?;
                    (applied, newest) = (0, 0);
                }
            }
        }
        if base.is_none() {
            let _ = std::fs::remove_file(index.base_path());
        }
        if applied == 0 {
            // An empty index (a new DATA_DIR): start from the leader's latest snapshot
            // rather than insert the whole log.
            if let Some(b) =
                fetch_snapshot(&store.claim_snapshots, &index.base_path(), created, last).await
            {
                let h = b.header;
                let db = index.db.clone();
                blocking(move || adopt(&db, &h)).await?;
                (applied, newest) = (h.applied, u64::try_from(h.newest_ns).unwrap_or(0));
                base = Some(Arc::new(b));
            }
        }
        tracing::info!(path = %index.path.display(), applied, log_last = last, "claim index attached");
        Ok(Claims {
            index,
            base,
            snapshots: store.claim_snapshots.clone(),
            js: store.js.clone(),
            stream,
            subject: store.names.claims_subject(),
            window_ns: i64::try_from(window.as_nanos()).unwrap_or(i64::MAX),
            applied,
            persisted: applied,
            stream_created_ns: created,
            newest_ns: i64::try_from(newest).unwrap_or(i64::MAX),
            overlay: IdMap::default(),
            writing: None,
            last_persist: Instant::now(),
        })
    }

    /// Read the claim log up to its end. Returns how many claims were applied.
    pub async fn catch_up(&mut self) -> Result<usize> {
        let info = self.stream.info().await.context("reading the claim log")?;
        let created = u64::try_from(info.created.unix_timestamp_nanos()).unwrap_or(0);
        let (last, messages) = (info.state.last_sequence, info.state.messages);
        if created != self.stream_created_ns || last < self.applied {
            // The log was recreated (or purged) underneath us: start the index afresh.
            tracing::warn!("the claim log was recreated; rebuilding the local claim index");
            let _ = self.finish_persist().await;
            let db = self.index.db.clone();
            blocking(move || wipe(&db, created)).await?;
            self.overlay.clear();
            if let Some(b) = self.base.take() {
                let _ = std::fs::remove_file(&b.path);
            }
            (self.applied, self.persisted, self.newest_ns) = (0, 0, 0);
            self.stream_created_ns = created;
        }
        let mut count = 0;
        if last > self.applied && messages > 0 {
            let consumer = self
                .stream
                .create_consumer(consumer::pull::OrderedConfig {
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: self.applied + 1,
                    },
                    ..Default::default()
                })
                .await
                .context("reading the claim log")?;
            if consumer.cached_info().num_pending > 0 {
                let mut messages = consumer.messages().await?;
                loop {
                    let Some(msg) = messages.next().await else {
                        bail!("the claim log ended before its last message");
                    };
                    let msg = msg.map_err(|e| anyhow!("reading the claim log: {e}"))?;
                    let info = msg.info().map_err(|e| anyhow!("{e}"))?;
                    let (seq, left) = (info.stream_sequence, info.pending);
                    let claims = decode(&msg.payload)
                        .with_context(|| format!("claim log message {seq} is malformed"))?;
                    count += claims.len();
                    self.apply(seq, &claims);
                    if self.overlay.len() >= OVERLAY_LIMIT {
                        self.start_persist().await?;
                    }
                    if left == 0 || seq >= last {
                        break;
                    }
                }
            }
        }
        // Sequences past the last message (expired or purged) need no reading.
        self.applied = self.applied.max(last);
        self.maybe_persist().await?;
        Ok(count)
    }

    /// The stored claims of these ids (absent: never claimed, or expired long ago).
    pub async fn lookup(&self, keys: Vec<IdKey>) -> Result<IdMap<Record>> {
        let mut found = IdMap::with_capacity_and_hasher(keys.len(), Default::default());
        let mut rest = Vec::new();
        for k in keys {
            let writing = self.writing.as_ref().and_then(|w| w.claims.get(&k));
            match self.overlay.get(&k).or(writing) {
                Some(r) => {
                    found.insert(k, *r);
                }
                None => rest.push(k),
            }
        }
        if rest.is_empty() {
            return Ok(found);
        }
        let (db, base) = (self.index.db.clone(), self.base.clone());
        let stored = blocking(move || {
            let txn = db.begin_read()?;
            let table = txn.open_table(CLAIMS)?;
            let mut out = Vec::new();
            for k in rest {
                if let Some(v) = table.get(&k)? {
                    let (seq, t) = v.value();
                    out.push((
                        k,
                        Record {
                            seq,
                            time_ns: i64::try_from(t).unwrap_or(i64::MAX),
                        },
                    ));
                } else if let Some(r) = base.as_ref().map(|b| b.get(&k)).transpose()?.flatten() {
                    out.push((k, r));
                }
            }
            Ok(out)
        })
        .await?;
        found.extend(stored);
        Ok(found)
    }

    /// Append claims to the log (failing if anyone else appended since we last read it),
    /// then apply them locally.
    pub async fn record(&mut self, claims: Vec<(IdKey, Record)>) -> Result<()> {
        for chunk in claims.chunks(PER_MESSAGE) {
            let publish = PublishMessage::build()
                .payload(encode(chunk).into())
                .expected_last_sequence(self.applied);
            let ack = self
                .js
                .send_publish(self.subject.clone(), publish)
                .await
                .context("appending to the claim log")?
                .await
                .map_err(|e| match e.kind() {
                    jetstream::context::PublishErrorKind::WrongLastSequence => anyhow!(
                        "another process appended to the claim log meanwhile (two aggregators)"
                    ),
                    _ => anyhow!(e).context("appending to the claim log"),
                })?;
            self.apply(ack.sequence, chunk);
        }
        self.maybe_persist().await
    }

    fn apply(&mut self, seq: u64, claims: &[(IdKey, Record)]) {
        for (k, r) in claims {
            self.overlay.insert(*k, *r);
            self.newest_ns = self.newest_ns.max(r.time_ns);
        }
        self.applied = self.applied.max(seq);
    }

    async fn maybe_persist(&mut self) -> Result<()> {
        // (a writer that died without a word is found by the next start_persist)
        if self.writing.as_ref().is_some_and(|w| !w.task.is_empty()) {
            self.finish_persist().await?;
        }
        let unwritten = self.applied > self.writing.as_ref().map_or(self.persisted, |w| w.applied);
        if self.overlay.len() >= OVERLAY_LIMIT
            || (unwritten && self.last_persist.elapsed() >= PERSIST_EVERY)
        {
            self.start_persist().await?;
        }
        Ok(())
    }

    /// Write everything applied so far to the index file and wait for it.
    pub async fn persist(&mut self) -> Result<()> {
        self.start_persist().await?;
        self.finish_persist().await
    }

    /// Start moving the overlay into the index file in one background transaction, with
    /// the log position it reflects, dropping claims that left the window. The aggregator
    /// goes on meanwhile (look-ups see the claims being written); one write at a time.
    async fn start_persist(&mut self) -> Result<()> {
        self.finish_persist().await?;
        if self.overlay.is_empty() && self.applied == self.persisted {
            return Ok(());
        }
        let frozen = Arc::new(std::mem::take(&mut self.overlay));
        let (applied, newest) = (self.applied, self.newest_ns);
        let cutoff = newest
            .saturating_sub(self.window_ns)
            .saturating_sub(CLOCK_MARGIN_NS);
        let drops_base = self
            .base
            .as_ref()
            .is_some_and(|b| b.header.newest_ns < cutoff);
        let db = self.index.db.clone();
        let claims = frozen.clone();
        // On a thread of its own at a lower CPU priority: inserting random keys into the
        // B-tree is the costliest part of deduplication (a quarter of the process's CPU
        // under batch ingestion), and it can wait while request handling cannot. When it
        // falls behind, the aggregator waits for it before the next write (the overlay
        // stays bounded), so ingestion keeps the cores.
        let (done, task) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("claim-index".into())
            .spawn(move || {
                lower_priority();
                let result = write(&db, &claims, applied, newest, cutoff, drops_base);
                // the database is released before anyone hears the write is done, so
                // that it can be reopened at once (as a finished task would have it)
                drop((db, claims));
                let _ = done.send(result);
            })
            .context("starting the claim index writer")?;
        self.writing = Some(Writing {
            task,
            claims: frozen,
            applied,
            drops_base,
        });
        self.last_persist = Instant::now();
        Ok(())
    }

    async fn finish_persist(&mut self) -> Result<()> {
        // (the writer thread ends with the write; nothing to cancel)
        let Some(w) = self.writing.take() else {
            return Ok(());
        };
        let outcome = match w.task.await {
            Ok(r) => r,
            Err(_) => Err(anyhow!("the claim index writer stopped")),
        };
        match outcome {
            Ok(()) => {
                self.persisted = w.applied;
                if w.drops_base {
                    if let Some(b) = self.base.take() {
                        tracing::info!(
                            "the claim index snapshot layer has left the window; removed"
                        );
                        let _ = std::fs::remove_file(&b.path);
                    }
                }
                Ok(())
            }
            Err(e) => {
                // Those claims are not in the file: read them from the log again.
                self.overlay.clear();
                self.applied = self.persisted;
                Err(e.context("writing the local claim index"))
            }
        }
    }

    /// How many claims the snapshot layer holds (0 without one).
    pub fn base_claims(&self) -> u64 {
        self.base.as_ref().map_or(0, |b| b.header.count)
    }

    /// The log position the index file reflects.
    pub fn persisted(&self) -> u64 {
        self.persisted
    }

    /// Write a snapshot of the index file (as it stands after its last write, over the
    /// snapshot layer) and publish it for cold starts. Runs beside the aggregator: it
    /// reads a consistent view of the file while writes go on. Returns what it held.
    pub fn snapshot(
        &self,
    ) -> impl std::future::Future<Output = Result<Option<snapshot::Header>>> + Send + 'static {
        let (db, base, bucket) = (
            self.index.db.clone(),
            self.base.clone(),
            self.snapshots.clone(),
        );
        let (window_ns, path) = (self.window_ns, self.index.snapshot_path());
        async move {
            let started = Instant::now();
            // a thread of its own at a lower priority, as the index writer (it reads
            // the whole index: it must not take the cores from ingestion)
            let (done, written) = tokio::sync::oneshot::channel();
            let target = path.clone();
            std::thread::Builder::new()
                .name("claim-snapshot".into())
                .spawn(move || {
                    lower_priority();
                    let _ = done.send(snapshot::write(&db, base.as_deref(), window_ns, &target));
                })
                .context("starting the claim snapshot writer")?;
            let written = written
                .await
                .map_err(|_| anyhow!("the claim snapshot writer stopped"))??;
            let Some(header) = written else {
                return Ok(None);
            };
            let published = snapshot::publish(&bucket, &path).await;
            let _ = std::fs::remove_file(&path);
            published?;
            tracing::info!(
                claims = header.count,
                through = header.applied,
                seconds = started.elapsed().as_secs_f64(),
                "claim index snapshot published"
            );
            Ok(Some(header))
        }
    }

    /// How many claims the local index file holds (tests and metrics).
    pub async fn stored(&self) -> Result<u64> {
        let db = self.index.db.clone();
        blocking(move || Ok(db.begin_read()?.open_table(CLAIMS)?.len()?)).await
    }
}

/// The latest snapshot, if there is a usable one. A fetch that fails is tried again: the
/// leader replacing the snapshot meanwhile removes the chunks being read.
async fn fetch_snapshot(
    bucket: &async_nats::jetstream::object_store::ObjectStore,
    path: &Path,
    created: u64,
    last: u64,
) -> Option<Base> {
    for attempt in 1..=3 {
        match snapshot::fetch(bucket, path, created, last).await {
            Ok(found) => return found,
            Err(e) => tracing::warn!(
                error = format!("{e:#}"),
                attempt,
                "fetching the claim index snapshot failed"
            ),
        }
    }
    tracing::warn!("no claim index snapshot; reading the whole claim log");
    None
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| anyhow!("claim index task failed: {e}"))?
}

/// Log message layout: per claim, the 16-byte id, then sequence and receipt time as
/// big-endian 64-bit integers.
pub fn encode(claims: &[(IdKey, Record)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(claims.len() * ENTRY);
    for (k, r) in claims {
        out.extend_from_slice(k);
        out.extend_from_slice(&r.seq.to_be_bytes());
        out.extend_from_slice(&r.time_ns.to_be_bytes());
    }
    out
}

pub fn decode(payload: &[u8]) -> Result<Vec<(IdKey, Record)>> {
    if payload.len() % ENTRY != 0 {
        bail!("{} bytes is not a whole number of claims", payload.len());
    }
    Ok(payload
        .chunks_exact(ENTRY)
        .map(|c| {
            let mut k = [0u8; 16];
            k.copy_from_slice(&c[..16]);
            let seq = u64::from_be_bytes(c[16..24].try_into().expect("8 bytes"));
            let time_ns = i64::from_be_bytes(c[24..32].try_into().expect("8 bytes"));
            (k, Record { seq, time_ns })
        })
        .collect())
}

/// Nice the calling thread (Linux keeps a nice value per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only changes the scheduling weight of this thread.
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_messages_round_trip() {
        let claims = vec![
            (
                [1u8; 16],
                Record {
                    seq: 1,
                    time_ns: -5,
                },
            ),
            (
                [0xffu8; 16],
                Record {
                    seq: u64::MAX,
                    time_ns: i64::MAX,
                },
            ),
        ];
        let bytes = encode(&claims);
        assert_eq!(bytes.len(), 64);
        assert_eq!(decode(&bytes).unwrap(), claims);
        assert!(decode(&bytes[..63]).is_err());
        assert_eq!(decode(&[]).unwrap(), vec![]);
    }
}
