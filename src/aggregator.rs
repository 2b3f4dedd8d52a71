//! The aggregator: the elected leader's loop that reads the event stream in order,
//! settles duplicates, folds events into readings (via the pure [`crate::fold`]) and
//! stores them with compare-and-swap. See the README's architecture section.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::{consumer, kv, message::PublishMessage};
use async_nats::Message;
use futures::{stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::cache::Cache;
use crate::claims::Claims;
use crate::dedup::{self, Candidate, Decision};
use crate::event::Event;
use crate::fold::{self, Applied, Contribution, Group, Reading};
use crate::keys::{self, ReadingKey, CURSOR_KEY, DEDUP_HEADER};
use crate::meter::CompiledMeter;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;

/// Most messages folded in one batch (settled against the claims together).
const BATCH: usize = 5_000;
/// How long a batch keeps gathering after its first message: bigger batches mean fewer
/// claim look-ups and appends per event.
const LINGER: Duration = Duration::from_millis(25);
/// Lifetime of a pull request that finds nothing more to deliver (well under the
/// consumer's 30 s inactivity limit).
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// KV operations kept in flight at once.
const PIPELINE: usize = 4096;
/// Reading loads kept in flight at once (each waiting load holds a request's state).
const LOAD_PIPELINE: usize = 1024;
/// Readings serialised and published per step of a flush.
const FLUSH_SLICE: usize = 8_192;
/// Events folded per step of a batch (bounds the memory of the per-event plan).
const APPLY_CHUNK: usize = 1_000;
/// Readings kept in memory between flushes (clean ones are dropped past this).
const CACHE_LIMIT: usize = 100_000;
/// Changed readings are written (and the cursor advanced) at least this often, so
/// readings in KV trail ingestion by well under a second.
const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// ...and as soon as this many readings are waiting to be written.
const MAX_DIRTY: usize = 50_000;
/// While a backlog is being worked off (more than a batch waiting), flushes come this
/// often instead: every flush rewrites each touched reading once, so fewer flushes mean
/// fewer writes per event, and catching up sooner is what brings latency back down.
const BACKLOG_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// ...or, when a flush takes long (many distinct readings), up to this often, so that
/// writing never takes more than a fifth of the time while catching up.
const MAX_BACKLOG_FLUSH_INTERVAL: Duration = Duration::from_secs(5);

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
    claims: Arc<tokio::sync::Mutex<Claims>>,
    /// Current readings of the keys touched recently (written or waiting to be), with
    /// their KV revisions and which of them changed since the last flush.
    cache: Cache,
    /// Highest sequence applied to the cached readings but not yet covered by the cursor.
    pending: Option<u64>,
    last_flush: std::time::Instant,
    /// Meters whose readings are complete up to `cursor`.
    active: HashMap<String, Arc<CompiledMeter>>,
    by_type: ByType,
    cursor: u64,
    cursor_rev: Option<u64>,
    /// Consumer sequence of the last event delivered (they must come without gaps).
    delivered: u64,
    /// Messages waiting after the last batch.
    lag: u64,
    /// Readings being written, if any (one flush at a time).
    inflight: Option<Flush>,
    /// How long the last flush that wrote readings took.
    flush_cost: Duration,
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
            cache: Cache::default(),
            pending: None,
            last_flush: std::time::Instant::now(),
            active: HashMap::new(),
            by_type: HashMap::new(),
            cursor: 0,
            cursor_rev: None,
            lag: 0,
            delivered: 0,
            inflight: None,
            flush_cost: Duration::ZERO,
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
        // A plain ephemeral pull consumer without acks rather than an "ordered" one: the
        // latter asks for 500 messages at a time, so folding waited on the network between
        // batches. Order comes with a single consumer; a lost delivery shows as a gap in
        // the consumer sequence and restarts aggregation from the cursor (see
        // `process_batch`). The server removes the consumer 30 s after we stop pulling.
        self.delivered = 0;
        let consumer = self
            .store
            .events
            .create_consumer(consumer::pull::Config {
                filter_subject: self.store.names.events_wildcard(),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: self.cursor + 1,
                },
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                num_replicas: 1,
                ..Default::default()
            })
            .await
            .context("creating the aggregator's consumer")?;
        // Our own pull loop (see `pull`), as a stream: a wait for the next message that
        // is abandoned (a flush or a meter change came first) resumes where it was.
        let pull = crate::pull::Pull::start(
            self.store.js.clone(),
            &self.store.names.stream,
            &consumer.cached_info().name,
            BATCH / 2,
            PULL_EXPIRES,
        )
        .await?;
        let mut messages = Box::pin(futures::stream::unfold(pull, |mut pull| async move {
            let next = pull.next().await;
            Some((next, pull))
        }));
        tracing::info!(
            cursor = self.cursor,
            meters = self.active.len(),
            "aggregating"
        );
        // The batch buffer is kept from one batch to the next: allocated afresh, each
        // batch faulted in new pages (a tenth of the process's CPU under batch ingestion).
        let mut batch: Vec<Message> = Vec::with_capacity(BATCH);
        loop {
            if !*leading.borrow() {
                // Hand over cleanly: what was applied is written before we stop.
                self.flush().await?;
                return Ok(());
            }
            let flush_due = self.last_flush + self.flush_every();
            let has_pending = self.pending.is_some() || self.cache.dirty_len() > 0;
            tokio::select! {
                biased;
                _ = leading.changed() => {}
                changed = meters_changed.changed() => {
                    changed?;
                    self.reconcile().await?;
                }
                done = async { (&mut self.inflight.as_mut().expect("checked").task).await }, if self.inflight.is_some() => {
                    self.flush_done(done).await?;
                }
                _ = tokio::time::sleep_until(flush_due.into()), if has_pending => {
                    self.start_flush().await?;
                }
                // Only the wait for the first message may be cancelled: once a batch has
                // started, it is gathered and processed whole, so none is dropped.
                first = messages.next() => {
                    let Some(first) = first else { bail!("event consumer ended") };
                    let t0 = std::time::Instant::now();
                    batch.clear();
                    gather(first, &mut messages, BATCH, LINGER, &mut batch).await?;
                    tracing::debug!(fetch_ms = t0.elapsed().as_millis() as u64, "fetch");
                    if meters_changed.has_changed().unwrap_or(false) {
                        meters_changed.borrow_and_update();
                        self.reconcile().await?;
                    }
                    self.process_batch(&batch).await?;
                    batch.clear();
                    if self.cache.dirty_len() >= MAX_DIRTY || self.last_flush.elapsed() >= self.flush_every() {
                        self.start_flush().await?;
                    }
                }
            }
        }
    }

    /// How long changed readings may wait to be written.
    fn flush_every(&self) -> Duration {
        if self.lag > BATCH as u64 {
            // catching up: at most a fifth of the time goes to writing
            (self.flush_cost * 4).clamp(BACKLOG_FLUSH_INTERVAL, MAX_BACKLOG_FLUSH_INTERVAL)
        } else {
            FLUSH_INTERVAL
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
                let mut batch = Vec::with_capacity(BATCH);
                'replay: while let Some(first) = messages.next().await {
                    gather(first, &mut messages, BATCH, LINGER, &mut batch).await?;
                    let mut wanted = Vec::with_capacity(batch.len());
                    let mut finished = false;
                    for msg in batch.drain(..) {
                        let info = msg.info().map_err(|e| anyhow!("{e}"))?;
                        let (seq, left) = (info.stream_sequence, info.pending);
                        if seq > self.cursor {
                            finished = true;
                            break;
                        }
                        wanted.push((seq, msg.message));
                        if left == 0 || seq == self.cursor {
                            finished = true;
                            break;
                        }
                    }
                    replayed += self.apply_messages(&wanted, &only).await?;
                    if self.cache.dirty_len() >= MAX_DIRTY {
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
    async fn process_batch(&mut self, batch: &[Message]) -> Result<()> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let last_info = crate::pull::delivery(last)?;
        let (last_seq, lag) = (last_info.stream_sequence, last_info.pending);
        self.lag = lag;

        let mut candidates = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        let mut seqs = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            let info = crate::pull::delivery(msg)?;
            if info.consumer_sequence != self.delivered + 1 {
                bail!(
                    "event delivery skipped from {} to {}; restarting from the stored cursor",
                    self.delivered,
                    info.consumer_sequence
                );
            }
            self.delivered = info.consumer_sequence;
            seqs.push(info.stream_sequence);
            let key = msg
                .headers
                .as_ref()
                .and_then(|h| h.get(DEDUP_HEADER))
                .map(|v| keys::dedup_key(v.as_str()));
            if let Some(key) = key {
                candidates.push(Candidate {
                    key,
                    seq: info.stream_sequence,
                    time_ns: info.published_ns,
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

        let mut wanted = Vec::with_capacity(batch.len());
        for ((msg, dup), &seq) in batch.iter().zip(&duplicate).zip(&seqs) {
            if *dup {
                continue;
            }
            let type_token = msg.subject.as_str().rsplit('.').next().unwrap_or_default();
            if keys::untoken(type_token).is_some_and(|t| self.by_type.contains_key(&t)) {
                wanted.push((seq, msg));
            }
        }
        let by_type = std::mem::take(&mut self.by_type);
        let applied = self.apply_messages(&wanted, &by_type).await;
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

    /// Fold stored events (stream sequence and message) into the cached readings of the
    /// given meters, loading from KV the readings not cached yet; returns how many
    /// decoded. Changed readings are written by [`Self::flush`]. Decoded and folded a
    /// slice at a time, so the parsed events (several times their wire size) and the
    /// per-event plan stay small whatever the batch size and number of meters.
    async fn apply_messages<M: std::borrow::Borrow<Message>>(
        &mut self,
        messages: &[(u64, M)],
        meters: &ByType,
    ) -> Result<usize> {
        let mut decoded = 0;
        for chunk in messages.chunks(APPLY_CHUNK) {
            let events: Vec<(u64, Event)> = chunk
                .iter()
                .filter_map(|(seq, msg)| decode_event(msg.borrow()).map(|e| (*seq, e)))
                .collect();
            decoded += events.len();
            self.apply_chunk(&events, meters).await?;
        }
        Ok(decoded)
    }

    async fn apply_chunk(&mut self, events: &[(u64, Event)], meters: &ByType) -> Result<()> {
        if events.is_empty() {
            return Ok(());
        }
        // What each event does to each meter, and the slots it touches.
        enum Step<'e> {
            Valid(
                u64,
                &'e Event,
                &'e Arc<CompiledMeter>,
                crate::cache::EventSlots,
                fold::Value_,
            ),
            Invalid(u64, &'e Event, &'e Arc<CompiledMeter>, u32, String),
        }
        let mut plan = Vec::with_capacity(events.len());
        // Per event type: each meter's number in the cache, and the first meter with the
        // same contribution (meters that differ only in name or aggregation share it).
        let mut per_type: HashMap<&str, (Vec<crate::cache::MeterRef>, Vec<usize>)> = HashMap::new();
        let mut contributions: Vec<Contribution> = Vec::new();
        for (seq, e) in events {
            let Some(ms) = meters.get(&e.event_type) else {
                continue;
            };
            let (refs, same) = per_type.entry(e.event_type.as_str()).or_insert_with(|| {
                let refs = ms.iter().map(|m| self.cache.meter(m)).collect();
                let same = (0..ms.len())
                    .map(|i| {
                        (0..i)
                            .find(|&j| fold::same_contribution(&ms[j], &ms[i]))
                            .unwrap_or(i)
                    })
                    .collect();
                (refs, same)
            });
            let subject = self.cache.subject(&e.subject);
            contributions.clear();
            for (i, m) in ms.iter().enumerate() {
                let c = match same[i] {
                    j if j < i => contributions[j].clone(),
                    _ => fold::contribution(m, e),
                };
                contributions.push(c.clone());
                plan.push(match c {
                    Contribution::Valid { value, group } => {
                        let slots = self.cache.touch_at(
                            m,
                            refs[i],
                            subject,
                            group,
                            || fold::group_values(m, e),
                            e.time.timestamp(),
                        );
                        Step::Valid(*seq, e, m, slots, value)
                    }
                    Contribution::Invalid(why) => {
                        Step::Invalid(*seq, e, m, self.cache.summary(m), why)
                    }
                });
            }
        }
        // Readings new to the cache: what KV holds for them.
        let unloaded = self.cache.take_unloaded();
        let store = self.store.readings.clone();
        let keys: Vec<(u32, String)> = unloaded
            .iter()
            .map(|&i| (i, self.cache.slot(i).key.kv_key()))
            .collect();
        // (applied as they arrive: a first batch can load tens of thousands)
        let mut loaded = stream::iter(keys)
            .map(|(i, key)| {
                let store = store.clone();
                async move {
                    let found = match store.entry(key.as_str()).await? {
                        Some(e) if e.operation == kv::Operation::Put => {
                            let r: Reading = serde_json::from_slice(&e.value)
                                .with_context(|| format!("decoding reading {key}"))?;
                            Some((r, e.revision))
                        }
                        // absent, or deleted: a new reading (its create fails if it races)
                        _ => None,
                    };
                    Ok::<_, anyhow::Error>((i, found))
                }
            })
            .buffer_unordered(LOAD_PIPELINE);
        while let Some(result) = loaded.next().await {
            let (i, found) = result?;
            self.cache.loaded(i, found);
        }
        let mut dead_letters = Vec::new();
        let mut invalid = 0u64;
        for step in &plan {
            match step {
                Step::Valid(seq, e, m, slots, value) => {
                    let group = slots.group.as_deref().map(|g| Group {
                        token: &g.token,
                        values: &g.values,
                    });
                    let applied = fold::apply_valid(
                        &mut self.cache.touched(slots),
                        *seq,
                        e.time,
                        value,
                        group,
                    );
                    match applied {
                        Applied::Counted => {
                            for &i in slots.slots() {
                                self.cache.mark_dirty(i);
                            }
                        }
                        Applied::AlreadyApplied => {}
                        Applied::Invalid(why) => {
                            // (a sum out of the exact range: only the summary counts it)
                            let summary = slots.slots()[0];
                            self.cache.mark_dirty(summary);
                            invalid += 1;
                            dead_letters.push((m.def.id.clone(), m.hash.clone(), *seq, why, *e));
                        }
                    }
                }
                Step::Invalid(seq, e, m, summary, why) => {
                    let applied = fold::apply_invalid(self.cache.reading_mut(*summary), *seq, why);
                    if let Applied::Invalid(why) = applied {
                        self.cache.mark_dirty(*summary);
                        invalid += 1;
                        dead_letters.push((m.def.id.clone(), m.hash.clone(), *seq, why, *e));
                    }
                }
            }
        }
        self.publish_dead_letters(dead_letters).await;
        self.metrics.events_invalid.inc_by(invalid);
        Ok(())
    }

    /// Write every changed reading with compare-and-swap and advance the cursor over
    /// what they include, waiting until both are done.
    async fn flush(&mut self) -> Result<()> {
        self.start_flush().await?;
        self.finish_flush().await
    }

    /// Start writing every changed reading (after the previous flush has finished): the
    /// readings are serialized now, and written by a separate task while folding goes
    /// on, so the NATS round trips overlap with the next batches instead of stalling
    /// them. [`Self::finish_flush`] then advances the cursor. A lost race (another leader
    /// wrote first) is an error: the aggregator restarts from the stored cursor, and the
    /// sequence watermarks make the replay harmless.
    async fn start_flush(&mut self) -> Result<()> {
        self.finish_flush().await?;
        self.last_flush = std::time::Instant::now();
        let dirty = self.cache.take_dirty();
        let cursor = self.pending.take();
        if dirty.is_empty() {
            if let Some(seq) = cursor {
                self.commit_cursor(seq).await?;
            }
            return Ok(());
        }
        let mut writes = Vec::with_capacity(dirty.len());
        let mut buf = Vec::with_capacity(1024);
        for i in dirty {
            let slot = self.cache.slot(i);
            buf.clear();
            serde_json::to_writer(&mut buf, &slot.reading)?;
            writes.push(Write {
                slot: i,
                key: slot.key.clone(),
                // exactly sized: tens of thousands wait here until written
                body: bytes::Bytes::copy_from_slice(&buf),
                revision: slot.revision,
            });
        }
        let store = self.store.clone();
        self.inflight = Some(Flush {
            started: self.last_flush,
            count: writes.len(),
            cursor,
            task: tokio::spawn(write_readings(store, writes)),
        });
        if self.cache.len() > CACHE_LIMIT {
            // Nothing is dirty now: once written, the cache can start afresh (slot
            // numbers must stay valid while a flush is in flight, so not before).
            self.finish_flush().await?;
            self.cache.clear();
        }
        Ok(())
    }

    /// Wait for the flush in flight, if any, record what it wrote and advance the cursor.
    async fn finish_flush(&mut self) -> Result<()> {
        let Some(flight) = self.inflight.as_mut() else {
            return Ok(());
        };
        let outcomes = (&mut flight.task).await;
        self.flush_done(outcomes).await
    }

    /// [`Self::finish_flush`] once the writing task has ended.
    async fn flush_done(
        &mut self,
        outcomes: Result<Vec<(u32, Result<u64>)>, tokio::task::JoinError>,
    ) -> Result<()> {
        let Some(flight) = self.inflight.take() else {
            return Ok(());
        };
        let outcomes = outcomes.context("writing readings")?;
        let mut failed = None;
        for (i, outcome) in outcomes {
            match outcome {
                Ok(rev) => {
                    if let Some(changed) = &self.changed {
                        let meter = reading_meter(&self.cache.slot(i).key);
                        let mut set = changed.lock().unwrap_or_else(|e| e.into_inner());
                        if !set.contains(meter) {
                            set.insert(meter.to_string());
                        }
                    }
                    self.cache.written(i, rev);
                }
                Err(e) => failed = Some((self.cache.slot(i).key.kv_key(), e)),
            }
        }
        if let Some((key, e)) = failed {
            bail!("writing reading {key} failed ({e}); restarting from the stored cursor");
        }
        self.flush_cost = flight.started.elapsed();
        tracing::debug!(
            readings = flight.count,
            write_ms = self.flush_cost.as_millis() as u64,
            "flush"
        );
        if let Some(seq) = flight.cursor {
            self.commit_cursor(seq).await?;
        }
        Ok(())
    }

    /// Drop a meter's readings from memory (after its keys were purged from KV).
    fn forget_meter(&mut self, id: &str) {
        self.cache.retain(|k| reading_meter(k) != id);
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

/// One reading to write: its slot, key, body, and the revision it replaces (`None`: a
/// new key).
struct Write {
    slot: u32,
    /// (its subject is built when the write is sent: tens of thousands wait here)
    key: ReadingKey,
    body: bytes::Bytes,
    revision: Option<u64>,
}

/// A flush being written.
struct Flush {
    started: std::time::Instant,
    count: usize,
    /// The cursor to store once every reading is written.
    cursor: Option<u64>,
    task: tokio::task::JoinHandle<Vec<(u32, Result<u64>)>>,
}

/// Write readings with compare-and-swap, many in flight (a slice serialized at a time);
/// one outcome (the new revision) per reading.
async fn write_readings(store: Store, writes: Vec<Write>) -> Vec<(u32, Result<u64>)> {
    let mut results = Vec::with_capacity(writes.len());
    let prefix = format!("$KV.{}.", store.readings.name);
    for slice in writes.chunks(FLUSH_SLICE) {
        let messages = slice
            .iter()
            .map(|w| {
                // a new key must not exist yet: expected last subject sequence 0
                let publish = PublishMessage::build()
                    .payload(w.body.clone())
                    .expected_last_subject_sequence(w.revision.unwrap_or(0));
                Ok((format!("{prefix}{}", w.key.kv_key()), publish))
            })
            .collect();
        let outcomes = store.publish_all(messages, PIPELINE).await;
        for (w, outcome) in slice.iter().zip(outcomes) {
            let res = match (outcome, w.revision) {
                (Ok(seq), _) => Ok(seq),
                // A new key over a delete marker: the KV create knows that case.
                (Err(_), None) => store
                    .readings
                    .create(w.key.kv_key(), w.body.clone())
                    .await
                    .map_err(|e| anyhow!(e)),
                (Err(e), Some(_)) => Err(e),
            };
            results.push((w.slot, res));
        }
    }
    results
}

/// A batch, appended to `out`: `first`, then whatever else arrives within `linger`, up to
/// `max`; the first failed delivery is the error.
async fn gather<S, T, E>(
    first: Result<T, E>,
    messages: &mut S,
    max: usize,
    linger: Duration,
    out: &mut Vec<T>,
) -> Result<()>
where
    S: futures::Stream<Item = Result<T, E>> + Unpin,
    E: std::fmt::Display,
{
    let fail = |e: E| anyhow!("reading the event stream: {e:#}");
    out.push(first.map_err(fail)?);
    let deadline = tokio::time::Instant::now() + linger;
    while out.len() < max {
        match tokio::time::timeout_at(deadline, messages.next()).await {
            Ok(Some(m)) => out.push(m.map_err(fail)?),
            _ => break,
        }
    }
    Ok(())
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
