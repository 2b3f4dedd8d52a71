//! One batch of the main pass: settle duplicates against the claims, fold the events
//! into the cached readings, send what is invalid for a meter to its dead letters.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::kv;
use async_nats::Message;
use futures::{stream, StreamExt};

use super::cache::{EventSlots, MeterRef};
use super::*;
use crate::domain::build::kept_already;
use crate::domain::dedup::{self, Candidate, Decision};
use crate::domain::event::Event;
use crate::domain::fold::{self, Applied, Contribution, Group, Reading};
use crate::domain::meter::CompiledMeter;
use crate::nats::keys::{self, DEDUP_HEADER};

/// What one event does to one meter.
pub(super) enum Step<'e> {
    Valid(
        u64,
        &'e Event,
        &'e Arc<CompiledMeter>,
        EventSlots,
        fold::Value_,
    ),
    Invalid(u64, &'e Event, &'e Arc<CompiledMeter>, u32, String),
}

impl Aggregator {
    /// One batch of the main pass: settle duplicates, fold, advance the cursor.
    #[tracing::instrument(name = "batch", level = "debug", skip_all, fields(events = batch.len()))]
    pub(super) async fn process_batch(&mut self, batch: &[Message]) -> Result<()> {
        let Some(last) = batch.last() else {
            return Ok(());
        };
        let last_info = crate::aggregate::pull::delivery(last)?;
        let (last_seq, lag) = (last_info.stream_sequence, last_info.pending);
        self.lag = lag;
        self.live_lag
            .store(lag, std::sync::atomic::Ordering::Relaxed);

        let mut candidates = Vec::with_capacity(batch.len());
        let mut positions = Vec::with_capacity(batch.len());
        let mut seqs = Vec::with_capacity(batch.len());
        for (i, msg) in batch.iter().enumerate() {
            let info = crate::aggregate::pull::delivery(msg)?;
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
        let started = std::time::Instant::now();
        let decisions = self.settle_duplicates(&candidates).await?;
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
        self.metrics
            .aggregate
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        let dups = duplicate.iter().filter(|d| **d).count() as u64;
        self.metrics.aggregate.duplicate.inc_by(dups);
        self.metrics
            .aggregate
            .aggregated
            .inc_by(batch.len() as u64 - dups);
        self.metrics
            .aggregate
            .consumer_lag
            .get_or_create(&crate::metrics::PartitionLabel::of(
                self.store.names.partition,
            ))
            .set(i64::try_from(lag).unwrap_or(i64::MAX));
        self.report_cache_size();
        Ok(())
    }

    /// Decide which events are repeats from the claim log, record the new claims, and
    /// delete the repeats from the stream, so that backfills and rebuilds never see them.
    #[tracing::instrument(name = "dedup", level = "debug", skip_all)]
    pub(super) async fn settle_duplicates(&mut self, batch: &[Candidate]) -> Result<Vec<Decision>> {
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
    #[tracing::instrument(name = "fold", level = "debug", skip_all, fields(events = messages.len()))]
    pub(super) async fn apply_messages<M: std::borrow::Borrow<Message>>(
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

    pub(super) async fn apply_chunk(
        &mut self,
        events: &[(u64, Event)],
        meters: &ByType,
    ) -> Result<()> {
        let unkept: Vec<(u64, Event)>;
        let events = match self.skip_kept {
            Some((frozen, from)) => {
                unkept = events
                    .iter()
                    .filter(|(seq, e)| !kept_already(*seq, e.time, frozen, Some(from)))
                    .cloned()
                    .collect();
                &unkept[..]
            }
            None => events,
        };
        if events.is_empty() {
            return Ok(());
        }
        if self.building.is_none() {
            self.mark_late(events, meters);
        }
        let plan = self.plan_chunk(events, meters);
        self.load_new_readings().await?;
        self.apply_plan(&plan).await;
        Ok(())
    }

    /// Remember the hours of events too old for a thresholded meter's current and
    /// previous periods, so that a late event still notifies in its own period. Builds
    /// mark nothing: they fire only what the notifier finds unfired once they are served.
    fn mark_late(&mut self, events: &[(u64, Event)], meters: &ByType) {
        if !meters.values().flatten().any(|m| !m.thresholds.is_empty()) {
            return;
        }
        let now = chrono::Utc::now();
        let mut cutoffs: HashMap<&str, Option<chrono::DateTime<chrono::Utc>>> = HashMap::new();
        for (_, e) in events {
            let Some(ms) = meters.get(&e.event_type) else {
                continue;
            };
            for m in ms.iter().filter(|m| !m.thresholds.is_empty()) {
                let cutoff = *cutoffs.entry(m.def.id.as_str()).or_insert_with(|| {
                    m.thresholds.iter().filter_map(|t| t.late_before(now)).min()
                });
                if cutoff.is_some_and(|c| e.time < c) {
                    let hour = e.time.timestamp().div_euclid(3600) * 3600;
                    let id = crate::nats::keys::meter_of_readings_id(&m.def.id);
                    self.late.insert((id.to_string(), hour));
                }
            }
        }
    }

    /// What each event does to each meter, and the cache slots it touches.
    pub(super) fn plan_chunk<'e>(
        &mut self,
        events: &'e [(u64, Event)],
        meters: &'e ByType,
    ) -> Vec<Step<'e>> {
        let mut plan = Vec::with_capacity(events.len());
        // Per event type: each meter's number in the cache, and the first meter with the
        // same contribution (meters that differ only in name or aggregation share it).
        let mut per_type: HashMap<&str, (Vec<MeterRef>, Vec<usize>)> = HashMap::new();
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
                    Contribution::Filtered => continue,
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
        plan
    }

    /// Readings new to the cache: what KV holds for them, applied as they arrive (a first
    /// batch can load tens of thousands).
    pub(super) async fn load_new_readings(&mut self) -> Result<()> {
        let unloaded = self.cache.take_unloaded();
        let store = self.store.readings.clone();
        let keys: Vec<(u32, String)> = unloaded
            .iter()
            .map(|&i| (i, self.cache.slot(i).key.kv_key()))
            .collect();
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
        Ok(())
    }

    /// Fold the planned steps into the cached readings; what is invalid for a meter goes
    /// to its dead letters.
    pub(super) async fn apply_plan(&mut self, plan: &[Step<'_>]) {
        let mut dead_letters = Vec::new();
        let mut invalid = 0u64;
        for step in plan {
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
                        fold::Detail::of(m),
                    );
                    match applied {
                        Applied::Counted => {
                            for &i in slots.slots() {
                                self.cache.mark_dirty(i);
                            }
                        }
                        Applied::AlreadyApplied | Applied::Filtered => {}
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
        self.metrics.aggregate.invalid.inc_by(invalid);
    }

    pub(super) async fn publish_dead_letters(
        &self,
        letters: Vec<(String, String, u64, String, &Event)>,
    ) {
        let mut acks = Vec::with_capacity(letters.len());
        for (meter, hash, seq, why, event) in letters {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Km-Meter", meter.as_str());
            headers.insert("Km-Reason", why.as_str());
            headers.insert("Km-Seq", seq.to_string().as_str());
            // sequences are per partition's stream: partition N > 0 says which (and its
            // dead letters get ids of their own)
            let id = match self.store.names.partition {
                0 => format!("{meter}:{hash}:{seq}"),
                p => {
                    headers.insert("Km-Partition", p.to_string().as_str());
                    format!("{meter}:{hash}:p{p}:{seq}")
                }
            };
            headers.insert("Nats-Msg-Id", id.as_str());
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

/// A batch, appended to `out`: `first`, then whatever else arrives within `linger`, up to
/// `max`; the first failed delivery is the error.
pub(super) async fn gather<S, T, E>(
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

pub(super) fn decode_event(msg: &Message) -> Option<Event> {
    match serde_json::from_slice::<Event>(&msg.payload) {
        Ok(e) => Some(e),
        Err(e) => {
            tracing::warn!(subject = %msg.subject, error = %e, "skipping an unreadable message in the event stream");
            None
        }
    }
}
