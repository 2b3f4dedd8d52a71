//! The aggregator: the elected leader's loop that reads the event stream in order,
//! settles duplicates, folds events into readings (via the pure [`crate::fold`]) and
//! stores them with compare-and-swap. See the README's architecture section.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{consumer, kv, Message};
use futures::{stream, StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::dedup::{self, Candidate, Decision, Record};
use crate::event::Event;
use crate::fold::{self, Applied, Reading};
use crate::keys::{self, ReadingKey, CURSOR_KEY, DEDUP_HEADER};
use crate::meter::CompiledMeter;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;

/// Most messages folded in one batch (one KV write per touched reading per batch).
const BATCH: usize = 2000;
/// KV operations kept in flight at once.
const PIPELINE: usize = 512;
/// Readings kept in memory between batches (evicted wholesale past this).
const CACHE_LIMIT: usize = 50_000;

/// Per-meter record of the definition its readings were built for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub hash: String,
    pub complete: bool,
}

type ByType = HashMap<String, Vec<Arc<CompiledMeter>>>;

pub struct Aggregator {
    store: Store,
    registry: Registry,
    metrics: Metrics,
    dedup_window_ns: i64,
    /// Readings as last written, with their KV revision.
    cache: HashMap<ReadingKey, (Reading, u64)>,
    /// Meters whose readings are complete up to `cursor`.
    active: HashMap<String, Arc<CompiledMeter>>,
    by_type: ByType,
    cursor: u64,
    cursor_rev: Option<u64>,
    /// Meters whose readings changed, for the status write-back (operator mode).
    changed: Option<crate::status::Changed>,
}

impl Aggregator {
    pub fn new(
        store: Store,
        registry: Registry,
        metrics: Metrics,
        dedup_window: Duration,
        changed: Option<crate::status::Changed>,
    ) -> Self {
        Aggregator {
            store,
            registry,
            metrics,
            dedup_window_ns: i64::try_from(dedup_window.as_nanos()).unwrap_or(i64::MAX),
            cache: HashMap::new(),
            active: HashMap::new(),
            by_type: HashMap::new(),
            cursor: 0,
            cursor_rev: None,
            changed,
        }
    }

    /// Aggregate while `leading` stays true; returns after the current batch once it
    /// turns false.
    pub async fn run(mut self, mut leading: watch::Receiver<bool>) -> Result<()> {
        self.registry.wait_synced().await;
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
        let mut batches = consumer.messages().await?.ready_chunks(BATCH);
        tracing::info!(
            cursor = self.cursor,
            meters = self.active.len(),
            "aggregating"
        );
        loop {
            if !*leading.borrow() {
                return Ok(());
            }
            tokio::select! {
                biased;
                _ = leading.changed() => {}
                changed = meters_changed.changed() => {
                    changed?;
                    self.reconcile().await?;
                }
                batch = batches.next() => {
                    let Some(batch) = batch else { bail!("event consumer ended") };
                    let batch: Vec<Message> = batch.into_iter().collect::<Result<_, _>>().map_err(|e| anyhow!("{e}"))?;
                    if meters_changed.has_changed().unwrap_or(false) {
                        meters_changed.borrow_and_update();
                        self.reconcile().await?;
                    }
                    self.process_batch(batch).await?;
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
        self.cache.retain(|k, _| reading_meter(k) != id);
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
        self.cache.retain(|k, _| reading_meter(k) != id);
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
                let mut batches = consumer.messages().await?.ready_chunks(BATCH);
                'replay: while let Some(batch) = batches.next().await {
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
                    if finished {
                        break 'replay;
                    }
                }
            }
        }
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

        let mut candidates = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            let info = msg.info().map_err(|e| anyhow!("{e}"))?;
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
        let decisions = self.settle_duplicates(&candidates).await?;
        let mut duplicate = vec![false; batch.len()];
        for (pos, d) in positions.iter().zip(&decisions) {
            duplicate[*pos] = *d == Decision::Duplicate;
        }

        let mut events = Vec::with_capacity(batch.len());
        for (msg, dup) in batch.iter().zip(&duplicate) {
            if *dup {
                continue;
            }
            let seq = msg.info().map_err(|e| anyhow!("{e}"))?.stream_sequence;
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
        self.commit_cursor(last_seq).await?;
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

    /// Claim each event id in the dedup bucket and decide which events are repeats;
    /// delete the repeats from the stream, so that backfills and rebuilds never see them.
    async fn settle_duplicates(&mut self, batch: &[Candidate]) -> Result<Vec<Decision>> {
        if batch.is_empty() {
            return Ok(vec![]);
        }
        let mut first: HashMap<&str, &Candidate> = HashMap::new();
        for c in batch {
            first.entry(c.key.as_str()).or_insert(c);
        }
        let kv = self.store.dedup.clone();
        // Optimistic claim by the first occurrence; on conflict, read the existing claim.
        let loaded: Vec<(String, Option<(Record, u64)>)> =
            stream::iter(first.into_values().cloned())
                .map(|c| {
                    let kv = kv.clone();
                    async move {
                        let rec = Record {
                            seq: c.seq,
                            time_ns: c.time_ns,
                        };
                        match kv.create(&c.key, rec.encode().into()).await {
                            Ok(rev) => Ok::<_, anyhow::Error>((c.key, Some((rec, rev)))),
                            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                                let entry = kv.entry(c.key.clone()).await?;
                                let found = entry
                                    .filter(|e| e.operation == kv::Operation::Put)
                                    .and_then(|e| {
                                        Record::decode(&e.value).map(|r| (r, e.revision))
                                    });
                                Ok((c.key, found))
                            }
                            Err(e) => Err(anyhow!(e).context("claiming an event id")),
                        }
                    }
                })
                .buffer_unordered(PIPELINE)
                .try_collect()
                .await?;
        let mut stored = HashMap::new();
        let mut revisions = HashMap::new();
        for (key, found) in loaded {
            if let Some((rec, rev)) = found {
                stored.insert(key.clone(), rec);
                revisions.insert(key, rev);
            }
        }
        let (decisions, changed) = dedup::decide(batch, &stored, self.dedup_window_ns);
        stream::iter(changed)
            .map(|(key, rec)| {
                let kv = kv.clone();
                let rev = revisions.get(&key).copied();
                async move {
                    let value = rec.encode().into();
                    match rev {
                        Some(rev) => kv
                            .update(&key, value, rev)
                            .await
                            .map(|_| ())
                            .map_err(|e| anyhow!(e)),
                        None => kv
                            .create(&key, value)
                            .await
                            .map(|_| ())
                            .map_err(|e| anyhow!(e)),
                    }
                }
            })
            .buffer_unordered(PIPELINE)
            .try_collect::<Vec<()>>()
            .await
            .context("storing event id claims")?;
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

    /// Fold events into the readings of the given meters and store what changed with
    /// compare-and-swap. A lost race reloads the readings concerned and folds again,
    /// which the sequence watermarks make harmless.
    async fn apply_events(&mut self, events: &[(u64, Event)], meters: &ByType) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        let mut plan = Vec::new();
        let mut needed: HashSet<ReadingKey> = HashSet::new();
        for (seq, e) in events {
            for m in meters
                .get(&e.event_type)
                .map(Vec::as_slice)
                .unwrap_or_default()
            {
                let c = fold::contribution(m, e);
                needed.extend(fold::keys_for(m, e, &c));
                plan.push((*seq, e, m, c));
            }
        }
        for attempt in 0..8 {
            if self.cache.len() > CACHE_LIMIT {
                self.cache.clear();
            }
            let missing: Vec<ReadingKey> = needed
                .iter()
                .filter(|k| !self.cache.contains_key(*k))
                .cloned()
                .collect();
            let readings = self.store.readings.clone();
            let loaded: Vec<(ReadingKey, Option<(Reading, u64)>)> = stream::iter(missing)
                .map(|k| {
                    let readings = readings.clone();
                    async move {
                        let entry = readings.entry(k.kv_key()).await?;
                        let found = match entry {
                            Some(e) if e.operation == kv::Operation::Put => {
                                let r: Reading = serde_json::from_slice(&e.value)
                                    .with_context(|| format!("decoding reading {}", k.kv_key()))?;
                                Some((r, e.revision))
                            }
                            // absent, or deleted: a new reading (create fails if it races)
                            _ => None,
                        };
                        Ok::<_, anyhow::Error>((k, found))
                    }
                })
                .buffer_unordered(PIPELINE)
                .try_collect()
                .await?;
            let mut work: HashMap<ReadingKey, Reading> = HashMap::with_capacity(needed.len());
            let mut revisions: HashMap<ReadingKey, u64> = HashMap::new();
            for (k, found) in loaded {
                if let Some((r, rev)) = found {
                    revisions.insert(k.clone(), rev);
                    work.insert(k, r);
                }
            }
            for k in &needed {
                if let Some((r, rev)) = self.cache.remove(k) {
                    revisions.insert(k.clone(), rev);
                    work.insert(k.clone(), r);
                }
            }
            let before: HashMap<ReadingKey, u64> =
                work.iter().map(|(k, r)| (k.clone(), r.seq)).collect();
            let mut dead_letters = Vec::new();
            let mut invalid = 0u64;
            for (seq, e, m, c) in &plan {
                if let Applied::Invalid(why) = fold::apply(&mut work, m, *seq, e, c) {
                    invalid += 1;
                    dead_letters.push((m.def.id.clone(), m.hash.clone(), *seq, why, *e));
                }
            }
            let dirty: Vec<(ReadingKey, Reading)> = work
                .into_iter()
                .filter_map(|(k, r)| {
                    if before.get(&k) == Some(&r.seq) {
                        // unchanged: straight back into the cache
                        if let Some(rev) = revisions.get(&k) {
                            self.cache.insert(k, (r, *rev));
                        }
                        None
                    } else {
                        Some((k, r))
                    }
                })
                .collect();
            let results: Vec<(ReadingKey, Reading, Result<u64>)> = stream::iter(dirty)
                .map(|(k, r)| {
                    let readings = readings.clone();
                    let rev = revisions.get(&k).copied();
                    async move {
                        let res = match serde_json::to_vec(&r) {
                            Err(e) => Err(anyhow!(e)),
                            Ok(body) => match rev {
                                Some(rev) => readings
                                    .update(k.kv_key(), body.into(), rev)
                                    .await
                                    .map_err(|e| anyhow!(e)),
                                None => readings
                                    .create(k.kv_key(), body.into())
                                    .await
                                    .map_err(|e| anyhow!(e)),
                            },
                        };
                        (k, r, res)
                    }
                })
                .buffer_unordered(PIPELINE)
                .collect()
                .await;
            let mut conflicts = 0;
            for (k, r, res) in results {
                match res {
                    Ok(rev) => {
                        if let Some(changed) = &self.changed {
                            let meter = reading_meter(&k);
                            let mut set = changed.lock().unwrap_or_else(|e| e.into_inner());
                            if !set.contains(meter) {
                                set.insert(meter.to_string());
                            }
                        }
                        self.cache.insert(k, (r, rev));
                    }
                    Err(e) => {
                        conflicts += 1;
                        tracing::debug!(key = %k.kv_key(), error = %e, "reading write lost a race; reloading");
                    }
                }
            }
            self.publish_dead_letters(dead_letters).await;
            if attempt == 0 {
                self.metrics.events_invalid.inc_by(invalid);
            }
            if conflicts == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(20 * (attempt + 1))).await;
        }
        bail!("readings kept changing underneath the aggregator")
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
            changed.clone(),
        );
        if let Err(e) = agg.run(leading.clone()).await {
            tracing::error!(error = format!("{e:#}"), "aggregator stopped; restarting");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        metrics.leader.set(0);
    }
}
