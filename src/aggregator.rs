//! The aggregator: the elected leader's loop that reads the event stream in order,
//! settles duplicates, folds events into readings (via the pure [`crate::fold`]) and
//! stores them with compare-and-swap. See the README's architecture section.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{consumer, kv, message::PublishMessage, Message};
use futures::{stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::claims::Claims;
use crate::dedup::{self, Candidate, Decision};
use crate::event::Event;
use crate::fold::{self, Applied, Reading};
use crate::keys::{self, ReadingKey, CURSOR_KEY, DEDUP_HEADER};
use crate::meter::CompiledMeter;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;

/// Most messages folded in one batch (one KV write per touched reading per batch).
const BATCH: usize = 10_000;
/// How long a batch keeps gathering after its first message: bigger batches mean fewer
/// reading writes per event (every touched reading is written once per batch).
const LINGER: Duration = Duration::from_millis(25);
/// KV operations kept in flight at once.
const PIPELINE: usize = 4096;
/// Readings serialised and published per step of a flush.
const FLUSH_SLICE: usize = 8_192;
/// Events folded per step of a batch (bounds the memory of the per-event plan).
const APPLY_CHUNK: usize = 1_000;
/// Readings kept in memory between flushes (clean ones are dropped past this).
const CACHE_LIMIT: usize = 200_000;
/// Changed readings are written (and the cursor advanced) at least this often, so
/// readings in KV trail ingestion by well under a second.
const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// ...and as soon as this many readings are waiting to be written.
const MAX_DIRTY: usize = 100_000;
/// While a backlog is being worked off (more than a batch waiting), flushes come this
/// often instead: every flush rewrites each touched reading once, so fewer flushes mean
/// fewer writes per event, and catching up sooner is what brings latency back down.
const BACKLOG_FLUSH_INTERVAL: Duration = Duration::from_secs(1);

/// Per-meter record of the definition its readings were built for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub hash: String,
    pub complete: bool,
}

type ByType = HashMap<String, Vec<Arc<CompiledMeter>>>;
/// Hash maps on the hot path: foldhash is several times cheaper than SipHash on reading
/// keys and still seeded per process, so crafted subjects cannot force collisions.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;
type FastSet<K> = HashSet<K, foldhash::fast::RandomState>;

pub struct Aggregator {
    store: Store,
    registry: Registry,
    metrics: Metrics,
    dedup_window_ns: i64,
    claims: Arc<tokio::sync::Mutex<Claims>>,
    /// Current readings of the keys touched recently (written or waiting to be).
    readings: FastMap<ReadingKey, Reading>,
    /// KV revision of each cached reading that exists in KV (absent: not stored yet).
    revisions: FastMap<ReadingKey, u64>,
    /// Readings changed since the last flush.
    dirty: FastSet<ReadingKey>,
    /// Highest sequence applied to `readings` but not yet covered by the cursor.
    pending: Option<u64>,
    last_flush: std::time::Instant,
    /// Meters whose readings are complete up to `cursor`.
    active: HashMap<String, Arc<CompiledMeter>>,
    by_type: ByType,
    cursor: u64,
    cursor_rev: Option<u64>,
    /// Messages waiting after the last batch.
    lag: u64,
    /// Meters whose readings changed, for the status write-back (operator mode).
    changed: Option<crate::status::Changed>,
}

impl Aggregator {
    pub fn new(
        store: Store,
        registry: Registry,
        metrics: Metrics,
        dedup_window: Duration,
        claims: Arc<tokio::sync::Mutex<Claims>>,
        changed: Option<crate::status::Changed>,
    ) -> Self {
        Aggregator {
            store,
            registry,
            metrics,
            dedup_window_ns: i64::try_from(dedup_window.as_nanos()).unwrap_or(i64::MAX),
            claims,
            readings: FastMap::default(),
            revisions: FastMap::default(),
            dirty: FastSet::default(),
            pending: None,
            last_flush: std::time::Instant::now(),
            active: HashMap::new(),
            by_type: HashMap::new(),
            cursor: 0,
            cursor_rev: None,
            lag: 0,
            changed,
        }
    }

    /// Aggregate while `leading` stays true; returns after the current batch once it
    /// turns false.
    pub async fn run(mut self, mut leading: watch::Receiver<bool>) -> Result<()> {
        self.registry.wait_synced().await;
        // Decide from the whole claim history, including a previous leader's last claims.
        let read = self.claims.lock().await.catch_up().await?;
        tracing::debug!(claims = read, "claim log caught up");
        self.load_cursor().await?;
        let mut meters_changed = self.registry.subscribe();
        meters_changed.borrow_and_update();
        self.reconcile().await?;
        let consumer = self
            .store
            .events
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.store.names.events_wildcard(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.cursor + 1,
                },
                ..Default::default()
            })
            .await
            .context("creating the aggregator's consumer")?;
        let mut messages = consumer.messages().await?;
        tracing::info!(
            cursor = self.cursor,
            meters = self.active.len(),
            "aggregating"
        );
        loop {
            if !*leading.borrow() {
                // Hand over cleanly: what was applied is written before we stop.
                self.flush().await?;
                return Ok(());
            }
            let flush_due = self.last_flush + FLUSH_INTERVAL;
            let has_pending = self.pending.is_some() || !self.dirty.is_empty();
            tokio::select! {
                biased;
                _ = leading.changed() => {}
                changed = meters_changed.changed() => {
                    changed?;
                    self.reconcile().await?;
                }
                _ = tokio::time::sleep_until(flush_due.into()), if has_pending => {
                    self.flush().await?;
                }
                // Only the wait for the first message may be cancelled: once a batch has
                // started, it is gathered and processed whole, so none is dropped.
                first = messages.next() => {
                    let Some(first) = first else { bail!("event consumer ended") };
                    let batch = gather(first, &mut messages, BATCH, LINGER).await;
                    let batch: Vec<Message> = batch.into_iter().collect::<Result<_, _>>().map_err(|e| anyhow!("{e}"))?;
                    if meters_changed.has_changed().unwrap_or(false) {
                        meters_changed.borrow_and_update();
                        self.reconcile().await?;
                    }
                    self.process_batch(batch).await?;
                    let every = if self.lag > BATCH as u64 { BACKLOG_FLUSH_INTERVAL } else { FLUSH_INTERVAL };
                    if self.dirty.len() >= MAX_DIRTY || self.last_flush.elapsed() >= every {
                        self.flush().await?;
                    }
                }
            }
        }
    }

    async fn load_cursor(&mut self) -> Result<()> {
        match self.store.state.entry(CURSOR_KEY).await? {
            Some(e) if e.operation == kv::Operation::Put => {
                self.cursor = std::str::from_utf8(&e.value)?.parse()?;
                self.cursor_rev = Some(e.revision);
            }
            _ => {
                self.cursor = 0;
                self.cursor_rev = None;
            }
        }
        self.metrics.cursor.set(self.cursor);
        Ok(())
    }

    async fn commit_cursor(&mut self, seq: u64) -> Result<()> {
        for _ in 0..5 {
            let value = seq.to_string().into();
            let res = match self.cursor_rev {
                Some(rev) => self
                    .store
                    .state
                    .update(CURSOR_KEY, value, rev)
                    .await
                    .map_err(|e| anyhow!(e)),
                None => self
                    .store
                    .state
                    .create(CURSOR_KEY, value)
                    .await
                    .map_err(|e| anyhow!(e)),
            };
            match res {
                Ok(rev) => {
                    self.cursor = seq;
                    self.cursor_rev = Some(rev);
                    self.metrics.cursor.set(seq);
                    return Ok(());
                }
                Err(e) => {
                    // Another leader moved it (we lost the lease but have not noticed yet).
                    tracing::warn!(error = %e, "cursor changed underneath; reloading");
                    self.load_cursor().await?;
                    if self.cursor >= seq {
                        return Ok(());
                    }
                }
            }
        }
        bail!("could not store the aggregation cursor")
    }

    /// Bring the set of aggregated meters in line with the registry: backfill new
    /// meters, rebuild changed ones, clean up deleted ones.
    async fn reconcile(&mut self) -> Result<()> {
        self.metrics.meter_syncs.inc();
        // Rebuilds and clean-ups work against KV and the cursor: settle both first.
        self.flush().await?;
        let live = self.registry.snapshot();
        let mut progress: HashMap<String, Progress> = HashMap::new();
        for item in self.store.scan(&self.store.state, "p.*").await? {
            let id = item.key.strip_prefix("p.").and_then(keys::untoken);
            if let (Some(id), Ok(p)) = (id, serde_json::from_slice::<Progress>(&item.value)) {
                progress.insert(id, p);
            }
        }
        let mut ids: Vec<&String> = live.keys().collect();
        ids.sort();
        for id in ids {
            let meter = &live[id];
            if self.active.get(id).is_some_and(|a| a.hash == meter.hash) {
                self.active.insert(id.clone(), meter.clone());
                continue;
            }
            let done = Progress {
                hash: meter.hash.clone(),
                complete: true,
            };
            if !self.active.contains_key(id) && progress.get(id) == Some(&done) {
                self.active.insert(id.clone(), meter.clone());
                continue;
            }
            self.rebuild(meter.clone()).await?;
        }
        let gone: HashSet<String> = self
            .active
            .keys()
            .chain(progress.keys())
            .filter(|id| !live.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.cleanup(&id).await?;
        }
        self.by_type.clear();
        for m in self.active.values() {
            self.by_type
                .entry(m.def.event_type.clone())
                .or_default()
                .push(m.clone());
        }
        Ok(())
    }

    async fn cleanup(&mut self, id: &str) -> Result<()> {
        tracing::info!(meter = %id, "removing readings of deleted meter");
        self.store
            .purge_keys(&self.store.readings, &keys::meter_readings_filter(id))
            .await?;
        let _ = self
            .store
            .events_dl_purge(&self.store.names.deadletter_subject(id))
            .await
            .map_err(|e| tracing::warn!(meter = %id, error = %e, "could not purge dead letters"));
        self.store.state.purge(keys::progress_key(id)).await?;
        self.forget_meter(id);
        self.active.remove(id);
        Ok(())
    }

    /// Rebuild a meter's readings from every retained event up to the cursor. Idempotent:
    /// a crash part-way leaves the progress record incomplete, and the next leader
    /// starts the rebuild again from scratch.
    async fn rebuild(&mut self, meter: Arc<CompiledMeter>) -> Result<()> {
        let id = meter.def.id.clone();
        let started = std::time::Instant::now();
        self.metrics.rebuilds.inc();
        let pkey = keys::progress_key(&id);
        let incomplete = Progress {
            hash: meter.hash.clone(),
            complete: false,
        };
        self.store
            .state
            .put(&pkey, serde_json::to_vec(&incomplete)?.into())
            .await?;
        self.active.remove(&id);
        self.forget_meter(&id);
        self.store
            .purge_keys(&self.store.readings, &keys::meter_readings_filter(&id))
            .await?;
        let mut replayed = 0usize;
        if self.cursor > 0 {
            let consumer = self
                .store
                .events
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: self.store.names.event_subject(&meter.def.event_type),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ..Default::default()
                })
                .await?;
            let only: ByType = HashMap::from([(meter.def.event_type.clone(), vec![meter.clone()])]);
            if consumer.cached_info().num_pending > 0 {
                let mut messages = consumer.messages().await?;
                'replay: while let Some(first) = messages.next().await {
                    let batch = gather(first, &mut messages, BATCH, LINGER).await;
                    let mut events = Vec::with_capacity(batch.len());
                    let mut finished = false;
                    for msg in batch {
                        let msg = msg.map_err(|e| anyhow!("{e}"))?;
                        let info = msg.info().map_err(|e| anyhow!("{e}"))?;
                        let (seq, left) = (info.stream_sequence, info.pending);
                        if seq > self.cursor {
                            finished = true;
                            break;
                        }
                        if let Some(e) = decode_event(&msg) {
                            events.push((seq, e));
                        }
                        if left == 0 || seq == self.cursor {
                            finished = true;
                            break;
                        }
                    }
                    replayed += events.len();
                    self.apply_events(&events, &only).await?;
                    if self.dirty.len() >= MAX_DIRTY {
                        self.flush().await?;
                    }
                    if finished {
                        break 'replay;
                    }
                }
            }
        }
        self.flush().await?;
        let done = Progress {
            hash: meter.hash.clone(),
            complete: true,
        };
        self.store
            .state
            .put(&pkey, serde_json::to_vec(&done)?.into())
            .await?;
        self.active.insert(id.clone(), meter);
        tracing::info!(meter = %id, events = replayed, elapsed_ms = started.elapsed().as_millis() as u64, "meter built from retained events");
        Ok(())
    }

    /// One batch of the main pass: settle duplicates, fold, advance the cursor.
    async fn process_batch(&mut self, batch: Vec<Message>) -> Result<()> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let last_info = last.info().map_err(|e| anyhow!("{e}"))?;
        let (last_seq, lag) = (last_info.stream_sequence, last_info.pending);
        self.lag = lag;

        let mut candidates = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        let mut seqs = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            let info = msg.info().map_err(|e| anyhow!("{e}"))?;
            seqs.push(info.stream_sequence);
            let key = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(DEDUP_HEADER))
                .map(|v| keys::dedup_key(v.as_str()));
            if let Some(key) = key {
                let time_ns =
                    i64::try_from(info.published.unix_timestamp_nanos()).unwrap_or(i64::MAX);
                candidates.push(Candidate {
                    key,
                    seq: info.stream_sequence,
                    time_ns,
                });
                positions.push(i);
            }
        }
        let t0 = std::time::Instant::now();
        let decisions = self.settle_duplicates(&candidates).await?;
        let t_dedup = t0.elapsed();
        let mut duplicate = vec![false; batch.len()];
        for (pos, d) in positions.iter().zip(&decisions) {
            duplicate[*pos] = *d == Decision::Duplicate;
        }

        let mut events = Vec::with_capacity(batch.len());
        for ((msg, dup), &seq) in batch.iter().zip(&duplicate).zip(&seqs) {
            if *dup {
                continue;
            }
            let type_token = msg.subject.as_str().rsplit('.').next().unwrap_or_default();
            let has_meter =
                keys::untoken(type_token).is_some_and(|t| self.by_type.contains_key(&t));
            if has_meter {
                if let Some(e) = decode_event(msg) {
                    events.push((seq, e));
                }
            }
        }
        let by_type = std::mem::take(&mut self.by_type);
        let applied = self.apply_events(&events, &by_type).await;
        self.by_type = by_type;
        applied?;
        self.pending = Some(last_seq);
        tracing::debug!(
            events = batch.len(),
            dedup_ms = t_dedup.as_millis() as u64,
            apply_ms = (t0.elapsed() - t_dedup).as_millis() as u64,
            "batch"
        );
        let dups = duplicate.iter().filter(|d| **d).count() as u64;
        self.metrics.events_duplicate.inc_by(dups);
        self.metrics
            .events_aggregated
            .inc_by(batch.len() as u64 - dups);
        self.metrics
            .consumer_lag
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
        Ok(())
    }

    /// Decide which events are repeats from the claim log, record the new claims, and
    /// delete the repeats from the stream, so that backfills and rebuilds never see them.
    async fn settle_duplicates(&mut self, batch: &[Candidate]) -> Result<Vec<Decision>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let mut keys: Vec<dedup::IdKey> = batch.iter().map(|c| c.key).collect();
        keys.sort_unstable();
        keys.dedup();
        let mut claims = self.claims.lock().await;
        let stored = claims.lookup(keys).await?;
        let (decisions, changed) = dedup::decide(batch, &stored, self.dedup_window_ns);
        claims
            .record(changed.into_iter().collect())
            .await
            .context("recording event id claims")?;
        drop(claims);
        let dup_seqs: Vec<u64> = batch
            .iter()
            .zip(&decisions)
            .filter(|(_, d)| **d == Decision::Duplicate)
            .map(|(c, _)| c.seq)
            .collect();
        let events = self.store.events.clone();
        stream::iter(dup_seqs)
            .map(|seq| {
                let events = events.clone();
                async move {
                    // Already gone (a replay after a crash) is fine.
                    if let Err(e) = events.delete_message(seq).await {
                        tracing::debug!(seq, error = %e, "duplicate not deleted");
                    }
                }
            })
            .buffer_unordered(PIPELINE)
            .collect::<Vec<()>>()
            .await;
        Ok(decisions)
    }

    /// Fold events into the cached readings of the given meters, loading from KV the
    /// readings not cached yet. Changed readings are written by [`Self::flush`].
    async fn apply_events(&mut self, events: &[(u64, Event)], meters: &ByType) -> Result<()> {
        // In slices, so the per-event plan (keys, contributions) stays small in memory
        // whatever the batch size and number of meters.
        for chunk in events.chunks(APPLY_CHUNK) {
            self.apply_chunk(chunk, meters).await?;
        }
        Ok(())
    }

    async fn apply_chunk(&mut self, events: &[(u64, Event)], meters: &ByType) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut plan = Vec::new();
        let mut needed: FastSet<ReadingKey> = FastSet::default();
        for (seq, e) in events {
            for m in meters
                .get(&e.event_type)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let c = fold::contribution(m, e);
                let keys = fold::keys_for(m, e, &c);
                for k in &keys {
                    if !self.readings.contains_key(k) && !needed.contains(k) {
                        needed.insert(k.clone());
                    }
                }
                plan.push((*seq, e, m, c, keys));
            }
        }
        let missing: Vec<ReadingKey> = needed.into_iter().collect();
        let store = self.store.readings.clone();
        let loaded: Vec<(ReadingKey, Option<(Reading, u64)>)> = stream::iter(missing)
            .map(|k| {
                let store = store.clone();
                async move {
                    let found = match store.entry(k.kv_key()).await? {
                        Some(e) if e.operation == kv::Operation::Put => {
                            let r: Reading = serde_json::from_slice(&e.value)
                                .with_context(|| format!("decoding reading {}", k.kv_key()))?;
                            Some((r, e.revision))
                        }
                        // absent, or deleted: a new reading (its create fails if it races)
                        _ => None,
                    };
                    Ok::<_, anyhow::Error>((k, found))
                }
            })
            .buffer_unordered(PIPELINE)
            .try_collect()
            .await?;
        for (k, found) in loaded {
            match found {
                Some((r, rev)) => {
                    self.revisions.insert(k.clone(), rev);
                    self.readings.insert(k, r);
                }
                None => {
                    self.readings.insert(k, Reading::default());
                }
            }
        }
        let mut dead_letters = Vec::new();
        let mut invalid = 0u64;
        for (seq, e, m, c, keys) in &plan {
            match fold::apply_keyed(&mut self.readings, keys, *seq, e, c) {
                Applied::Counted => {}
                Applied::AlreadyApplied => continue,
                Applied::Invalid(why) => {
                    invalid += 1;
                    dead_letters.push((m.def.id.clone(), m.hash.clone(), *seq, why, *e));
                }
            }
            // every key the event touched is now ahead of KV
            for k in keys {
                if !self.dirty.contains(k) {
                    self.dirty.insert(k.clone());
                }
            }
        }
        self.publish_dead_letters(dead_letters).await;
        self.metrics.events_invalid.inc_by(invalid);
        Ok(())
    }

    /// Write every changed reading with compare-and-swap, then advance the cursor over
    /// what they include. A lost race (another leader wrote first) is an error: the
    /// aggregator restarts from the stored cursor, and the sequence watermarks make
    /// the replay harmless.
    async fn flush(&mut self) -> Result<()> {
        if !self.dirty.is_empty() {
            let dirty: Vec<ReadingKey> = self.dirty.drain().collect();
            let prefix = format!("$KV.{}.", self.store.readings.name);
            // serialised a slice at a time, so a large flush never sits in memory whole
            let mut outcomes = Vec::with_capacity(dirty.len());
            for slice in dirty.chunks(FLUSH_SLICE) {
                let messages: Vec<Result<(String, PublishMessage)>> = slice
                    .iter()
                    .map(|k| {
                        let r = self.readings.get(k).ok_or_else(|| {
                            anyhow!("reading {} left the cache unwritten", k.kv_key())
                        })?;
                        let body = serde_json::to_vec(r)?;
                        // a new key must not exist yet: expected last subject sequence 0
                        let rev = self.revisions.get(k).copied().unwrap_or(0);
                        let publish = PublishMessage::build()
                            .payload(body.into())
                            .expected_last_subject_sequence(rev);
                        Ok((format!("{prefix}{}", k.kv_key()), publish))
                    })
                    .collect();
                outcomes.extend(self.store.publish_all(messages, PIPELINE).await);
            }
            let mut results: Vec<(ReadingKey, Result<u64>)> = Vec::with_capacity(dirty.len());
            for (k, outcome) in dirty.into_iter().zip(outcomes) {
                let res = match (outcome, self.revisions.contains_key(&k)) {
                    (Ok(seq), _) => Ok(seq),
                    // A new key over a delete marker: the KV create knows that case.
                    (Err(_), false) => match self.readings.get(&k).map(serde_json::to_vec) {
                        Some(Ok(body)) => self
                            .store
                            .readings
                            .create(k.kv_key(), body.into())
                            .await
                            .map_err(|e| anyhow!(e)),
                        Some(Err(e)) => Err(e.into()),
                        None => Err(anyhow!("not cached")),
                    },
                    (Err(e), true) => Err(e),
                };
                results.push((k, res));
            }
            let mut failed = None;
            for (k, res) in results {
                match res {
                    Ok(rev) => {
                        if let Some(changed) = &self.changed {
                            let meter = reading_meter(&k);
                            let mut set = changed.lock().unwrap_or_else(|e| e.into_inner());
                            if !set.contains(meter) {
                                set.insert(meter.to_string());
                            }
                        }
                        self.revisions.insert(k, rev);
                    }
                    Err(e) => failed = Some((k, e)),
                }
            }
            if let Some((k, e)) = failed {
                bail!(
                    "writing reading {} failed ({e}); restarting from the stored cursor",
                    k.kv_key()
                );
            }
        }
        if let Some(seq) = self.pending.take() {
            self.commit_cursor(seq).await?;
        }
        self.last_flush = std::time::Instant::now();
        if self.readings.len() > CACHE_LIMIT {
            self.readings.clear();
            self.revisions.clear();
        }
        Ok(())
    }

    /// Drop a meter's readings from memory (after its keys were purged from KV).
    fn forget_meter(&mut self, id: &str) {
        self.readings.retain(|k, _| reading_meter(k) != id);
        self.revisions.retain(|k, _| reading_meter(k) != id);
        self.dirty.retain(|k| reading_meter(k) != id);
    }

    async fn publish_dead_letters(&self, letters: Vec<(String, String, u64, String, &Event)>) {
        let mut acks = Vec::with_capacity(letters.len());
        for (meter, hash, seq, why, event) in letters {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Km-Meter", meter.as_str());
            headers.insert("Km-Reason", why.as_str());
            headers.insert("Km-Seq", seq.to_string().as_str());
            headers.insert("Nats-Msg-Id", format!("{meter}:{hash}:{seq}").as_str());
            let subject = self.store.names.deadletter_subject(&meter);
            match self
                .store
                .js
                .publish_with_headers(subject, headers, event.to_bytes().into())
                .await
            {
                Ok(ack) => acks.push(ack),
                Err(e) => {
                    tracing::warn!(meter = %meter, seq, error = %e, "dead letter not published")
                }
            }
        }
        for ack in acks {
            if let Err(e) = ack.await {
                tracing::warn!(error = %e, "dead letter not acknowledged");
            }
        }
    }
}

/// A batch: `first`, then whatever else arrives within `linger`, up to `max`.
async fn gather<S, T>(first: T, messages: &mut S, max: usize, linger: Duration) -> Vec<T>
where
    S: futures::Stream<Item = T> + Unpin,
{
    let mut out = vec![first];
    let deadline = tokio::time::Instant::now() + linger;
    while out.len() < max {
        match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(m)) => out.push(m),
            _ => break,
        }
    }
    out
}

fn reading_meter(k: &ReadingKey) -> &str {
    match k {
        ReadingKey::Summary { meter }
        | ReadingKey::SubjectTotal { meter, .. }
        | ReadingKey::Window { meter, .. } => meter,
    }
}

fn decode_event(msg: &Message) -> Option<Event> {
    match serde_json::from_slice::<Event>(&msg.payload) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "skipping an unreadable message in the event stream");
            None
        }
    }
}

/// Run the aggregator whenever this process leads, restarting it after errors.
pub async fn supervise(
    store: Store,
    registry: Registry,
    metrics: Metrics,
    dedup_window: Duration,
    claims: Arc<tokio::sync::Mutex<Claims>>,
    changed: Option<crate::status::Changed>,
    mut leading: watch::Receiver<bool>,
) {
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        metrics.leader.set(1);
        let agg = Aggregator::new(
            store.clone(),
            registry.clone(),
            metrics.clone(),
            dedup_window,
            claims.clone(),
            changed.clone(),
        );
        if let Err(e) = agg.run(leading.clone()).await {
            tracing::error!(error = format!("{e:#}"), "aggregator stopped; restarting");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        metrics.leader.set(0);
    }
}
