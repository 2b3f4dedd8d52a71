//! Meter builds: bringing the aggregated meters in line with the registry — backfill of
//! new meters, rebuilds of changed ones from retained events, clean-up of deleted ones.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use anyhow::{anyhow, Result};
use async_nats::jetstream::consumer;
use futures::StreamExt;

use super::*;
use crate::domain::meter::CompiledMeter;
use crate::domain::window::ReadingKey;
use crate::nats::keys::{self};

impl Aggregator {
    /// Bring the set of aggregated meters in line with the registry: backfill new
    /// meters, rebuild changed ones, clean up deleted ones.
    pub(super) async fn reconcile(&mut self) -> Result<()> {
        self.metrics.aggregate.meter_syncs.inc();
        // Rebuilds and clean-ups work against KV and the cursor: settle both first.
        self.flush().await?;
        let live = self.registry.snapshot();
        let mut progress: HashMap<String, Progress> = HashMap::new();
        for item in self
            .store
            .scan(&self.store.state, keys::ALL_PROGRESS)
            .await?
        {
            let id = keys::progress_meter_of(&item.key);
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

    pub(super) async fn cleanup(&mut self, id: &str) -> Result<()> {
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
    pub(super) async fn rebuild(&mut self, meter: Arc<CompiledMeter>) -> Result<()> {
        let id = meter.def.id.clone();
        let started = std::time::Instant::now();
        self.metrics.aggregate.rebuilds.inc();
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

    /// Drop a meter's readings from memory (after its keys were purged from KV).
    pub(super) fn forget_meter(&mut self, id: &str) {
        self.cache.retain(|k| reading_meter(k) != id);
    }
}

pub(super) fn reading_meter(k: &ReadingKey) -> &str {
    match k {
        ReadingKey::Summary { meter }
        | ReadingKey::SubjectTotal { meter, .. }
        | ReadingKey::Window { meter, .. } => meter,
    }
}
