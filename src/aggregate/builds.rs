//! The live pass's side of meter builds: bringing the followed meters in line with the
//! registry (start, resume, cancel and suspend builds; clean up deleted meters) and
//! taking over a finished build exactly where it stopped. The builds themselves run
//! beside the live pass ([`super::builder`]); what to do is decided by the pure
//! [`crate::domain::build::plan`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::Result;
use futures::StreamExt;

use super::builder::{self, Report};
use super::*;
use crate::domain::build::{plan, Followed, Plan};
use crate::domain::meter::CompiledMeter;
use crate::domain::window::ReadingKey;
use crate::nats::keys;

impl Aggregator {
    /// Bring the set of followed meters in line with the registry: follow built ones,
    /// build new and changed ones beside the live pass, suspend, clean up deleted ones.
    pub(super) async fn reconcile(&mut self) -> Result<()> {
        self.metrics.aggregate.meter_syncs.inc();
        // A meter stops being followed exactly at the cursor: settle it first.
        self.flush().await?;
        let live = self.registry.snapshot();
        let mut stored = self.store.all_progress().await?;
        let gone: HashSet<String> = self
            .active
            .keys()
            .chain(stored.keys())
            .chain(self.builds.keys())
            .filter(|id| !live.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.cleanup(&id).await?;
        }
        let mut ids: Vec<&String> = live.keys().collect();
        ids.sort();
        for id in ids {
            let def = &live[id].def;
            if let Some(running) = self.builds.get(id) {
                if running.progress.hash == live[id].hash && !def.suspend {
                    continue; // the build goes on
                }
                // edited, or suspended, while building: stop it where it is
                if let Some(running) = self.builds.remove(id) {
                    running.stop().await;
                }
                self.metrics.aggregate.build_ended(id);
                if let Some(p) = self.store.progress(id).await? {
                    stored.insert(id.clone(), p);
                }
            }
            let followed = self.active.get(id).map(|a| Followed {
                generation: a.generation,
                hash: a.meter.hash.clone(),
                window_size: a.meter.def.window_size,
            });
            match plan(def, stored.get(id), followed.as_ref(), self.cursor) {
                Plan::Unchanged => {
                    // (a description changed: nothing in the readings does)
                    let generation = followed.map_or(0, |f| f.generation);
                    self.follow(id, &live[id], generation);
                }
                Plan::Follow => {
                    let generation = stored.get(id).map_or(0, |p| p.generation);
                    if let Some(mut p) = stored.get(id).filter(|p| !p.retired.is_empty()).cloned() {
                        // switched over just before a crash: the old generation goes now
                        self.retire(id, &mut p).await?;
                        self.store.put_progress(id, &p).await?;
                    }
                    self.follow(id, &live[id], generation);
                }
                Plan::Build(mut p) => {
                    self.unfollow(id);
                    self.retire(id, &mut p).await?;
                    if p.through == 0 && !p.kept_merged {
                        // a fresh start: nothing of an earlier attempt may stay
                        self.store.purge_generation(id, p.generation).await?;
                        // once per meter: every partition rebuilds its part
                        if self.store.names.partition == 0 {
                            self.metrics.aggregate.rebuilds.inc();
                        }
                    }
                    self.store.put_progress(id, &p).await?;
                    self.start_build(id, &live[id], p, Duration::ZERO);
                }
                Plan::Suspend(mut p) => {
                    self.unfollow(id);
                    self.retire(id, &mut p).await?;
                    if stored.get(id) != Some(&p) {
                        self.store.put_progress(id, &p).await?;
                    }
                    tracing::info!(meter = %id, through = p.through, "meter suspended");
                }
            }
        }
        self.index_by_type();
        Ok(())
    }

    fn index_by_type(&mut self) {
        self.by_type.clear();
        for a in self.active.values() {
            self.by_type
                .entry(a.meter.def.event_type.clone())
                .or_default()
                .push(a.meter.clone());
        }
    }

    /// Follow `generation` of a meter live.
    fn follow(&mut self, id: &str, meter: &Arc<CompiledMeter>, generation: u64) {
        let meter = stored_as(meter, generation, self.store.names.partition);
        self.active
            .insert(id.to_string(), Active { meter, generation });
    }

    /// Stop following a meter (its readings were flushed by the caller).
    fn unfollow(&mut self, id: &str) {
        if let Some(a) = self.active.remove(id) {
            self.forget_meter(&a.meter.id);
        }
    }

    /// Remove the generations a record lists as retired, and the list.
    async fn retire(&mut self, id: &str, p: &mut Progress) -> Result<()> {
        for generation in std::mem::take(&mut p.retired) {
            self.store.purge_generation(id, generation).await?;
        }
        Ok(())
    }

    fn start_build(&mut self, id: &str, meter: &Arc<CompiledMeter>, p: Progress, delay: Duration) {
        tracing::info!(meter = %id, generation = p.generation, from = p.through, "building beside the live pass");
        let running = builder::spawn(
            self.parts(),
            stored_as(meter, p.generation, self.store.names.partition),
            p,
            builder::Live {
                committed: self.committed.subscribe(),
                lag: self.live_lag.clone(),
                slots: self.build_slots.clone(),
                reports: self.reports.clone(),
            },
            delay,
        );
        self.builds.insert(id.to_string(), running);
    }

    /// What a build works with: the same parts as this pass.
    fn parts(&self) -> Parts {
        Parts {
            store: self.store.clone(),
            registry: self.registry.clone(),
            metrics: self.metrics.clone(),
            dedup_window: Duration::from_nanos(u64::try_from(self.dedup_window_ns).unwrap_or(0)),
            build_checkpoint: self.build_checkpoint,
            claims: self.claims.clone(),
            changed: None,
        }
    }

    /// A build ended: take it over, or start it again after a failure.
    pub(super) async fn on_report(&mut self, report: Report) -> Result<()> {
        match report {
            Report::Built {
                id,
                generation,
                through,
            } => self.hand_over(&id, generation, through).await,
            Report::Failed {
                id,
                generation,
                error,
            } => {
                let Some(running) = self.take_build(&id, generation) else {
                    return Ok(()); // cancelled meanwhile
                };
                tracing::warn!(meter = %id, error = %error, "build failed; resuming it from its checkpoint");
                let last = running.stop().await;
                let p = self.store.progress(&id).await?.unwrap_or(last);
                if let Some(meter) = self.registry.get(&id) {
                    self.start_build(&id, &meter, p, Duration::from_secs(1));
                }
                Ok(())
            }
        }
    }

    /// The running build a report is about, unless it was cancelled (or replaced by a
    /// build of another generation) since.
    fn take_build(&mut self, id: &str, generation: u64) -> Option<builder::Running> {
        let current = self
            .builds
            .get(id)
            .is_some_and(|r| r.progress.generation == generation);
        current.then(|| self.builds.remove(id)).flatten()
    }

    /// A build has every event of its meter through `through`: apply the few after it
    /// up to the cursor, switch readers to the new generation with one write, and follow
    /// it from here on.
    async fn hand_over(&mut self, id: &str, generation: u64, through: u64) -> Result<()> {
        let Some(running) = self.take_build(id, generation) else {
            return Ok(()); // cancelled meanwhile
        };
        let meter = running.meter.clone();
        let last = running.stop().await;
        self.flush().await?;
        let mut p = self.store.progress(id).await?.unwrap_or(last);
        self.skip_kept = p
            .rebuilt_from
            .zip(p.previous.as_ref().map(|f| f.through))
            .map(|(from, frozen)| (frozen, from));
        let cursor = self.cursor;
        let replayed = self.replay(&meter, through, cursor).await;
        self.skip_kept = None;
        let replayed = replayed?;
        self.flush().await?;
        if let Some(previous) = p.previous.take() {
            if previous.generation != p.generation {
                p.retired.push(previous.generation);
            }
        }
        p.complete = true;
        p.suspended = false;
        p.through = 0;
        p.remaining = 0;
        // the switch: readers follow the record
        self.store.put_progress(id, &p).await?;
        self.retire(id, &mut p).await?;
        self.store.put_progress(id, &p).await?;
        self.metrics.aggregate.build_ended(id);
        self.active
            .insert(id.to_string(), Active { meter, generation });
        self.index_by_type();
        if let Some(changed) = &self.changed {
            let _ = changed.send(id.to_string());
        }
        tracing::info!(meter = %id, generation, handed_over_at = through, caught_up = replayed, rebuilt_from = ?p.rebuilt_from, "meter built; the live pass follows it");
        Ok(())
    }

    /// Remove everything of a deleted meter (stopping its build first).
    pub(super) async fn cleanup(&mut self, id: &str) -> Result<()> {
        tracing::info!(meter = %id, "removing readings of deleted meter");
        if let Some(running) = self.builds.remove(id) {
            running.stop().await;
        }
        self.metrics.aggregate.build_ended(id);
        self.unfollow(id);
        self.store.purge_meter(id).await?;
        Ok(())
    }

    /// Apply a meter's events after `after` through `to` (both stream sequences) to its
    /// readings; how many.
    pub(super) async fn replay(
        &mut self,
        meter: &Arc<CompiledMeter>,
        after: u64,
        to: u64,
    ) -> Result<usize> {
        if after >= to {
            return Ok(0);
        }
        let consumer = self
            .store
            .events_of_type_after(&meter.def.event_type, after)
            .await?;
        if consumer.cached_info().num_pending == 0 {
            return Ok(0);
        }
        let only: ByType = HashMap::from([(meter.def.event_type.clone(), vec![meter.clone()])]);
        let mut replayed = 0;
        let mut messages = consumer.messages().await?;
        let mut batch = Vec::with_capacity(BATCH);
        while let Some(first) = messages.next().await {
            gather(first, &mut messages, BATCH, LINGER, &mut batch).await?;
            let mut wanted = Vec::with_capacity(batch.len());
            let mut finished = false;
            for msg in batch.drain(..) {
                let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
                let (seq, left) = (info.stream_sequence, info.pending);
                if seq > to {
                    finished = true;
                    break;
                }
                wanted.push((seq, msg.message));
                if left == 0 || seq == to {
                    finished = true;
                    break;
                }
            }
            replayed += self.apply_messages(&wanted, &only).await?;
            if finished {
                break;
            }
        }
        Ok(replayed)
    }

    /// Drop a generation's readings from memory (stored as `readings_id`).
    pub(super) fn forget_meter(&mut self, readings_id: &str) {
        self.cache.retain(|k| reading_meter(k) != readings_id);
    }
}

/// The meter as the fold sees it: keyed by the name `generation`'s readings are stored
/// under in `partition`.
fn stored_as(meter: &Arc<CompiledMeter>, generation: u64, partition: u16) -> Arc<CompiledMeter> {
    let mut m = CompiledMeter::clone(meter);
    m.id = keys::readings_id(&keys::part_id(&meter.def.id, partition), generation).into();
    Arc::new(m)
}

/// The name of the generation a reading key belongs to.
pub(super) fn reading_meter(k: &ReadingKey) -> &str {
    match k {
        ReadingKey::Summary { meter }
        | ReadingKey::SubjectTotal { meter, .. }
        | ReadingKey::GroupTotal { meter, .. }
        | ReadingKey::Window { meter, .. } => meter,
    }
}
