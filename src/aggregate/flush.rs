//! Writing changed readings: compare-and-swap writes sent by a task of their own while
//! folding goes on, and the cursor advanced once all of them are acknowledged.

use std::collections::HashSet;

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream::message::PublishMessage;

use super::*;
use crate::domain::window::ReadingKey;
use crate::nats::store::Store;

impl Aggregator {
    /// Write every changed reading with compare-and-swap and advance the cursor over
    /// what they include, waiting until both are done.
    pub(super) async fn flush(&mut self) -> Result<()> {
        self.start_flush().await?;
        self.finish_flush().await
    }

    /// Start writing every changed reading (after the previous flush has finished): the
    /// readings are serialized now, and written by a separate task while folding goes
    /// on, so the NATS round trips overlap with the next batches instead of stalling
    /// them. [`Self::finish_flush`] then advances the cursor. A lost race (another leader
    /// wrote first) is an error: the aggregator restarts from the stored cursor, and the
    /// sequence watermarks make the replay harmless.
    pub(super) async fn start_flush(&mut self) -> Result<()> {
        self.finish_flush().await?;
        self.last_flush = std::time::Instant::now();
        // late events' marks are durable before the cursor can move past the events
        for (meter, hour) in std::mem::take(&mut self.late) {
            self.store
                .state
                .put(
                    crate::nats::keys::late_key(&meter, hour),
                    bytes::Bytes::new(),
                )
                .await
                .context("marking a late event for the notifier")?;
        }
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
    pub(super) async fn finish_flush(&mut self) -> Result<()> {
        let Some(flight) = self.inflight.as_mut() else {
            return Ok(());
        };
        let outcomes = (&mut flight.task).await;
        self.flush_done(outcomes).await
    }

    /// [`Self::finish_flush`] once the writing task has ended.
    #[tracing::instrument(name = "flush", level = "debug", skip_all, fields(readings))]
    pub(super) async fn flush_done(
        &mut self,
        outcomes: Result<Vec<(u32, Result<u64>)>, tokio::task::JoinError>,
    ) -> Result<()> {
        let Some(flight) = self.inflight.take() else {
            return Ok(());
        };
        tracing::Span::current().record("readings", flight.count);
        let outcomes = outcomes.context("writing readings")?;
        let mut failed = None;
        let mut meters: HashSet<String> = HashSet::new();
        for (i, outcome) in outcomes {
            match outcome {
                Ok(rev) => {
                    if self.changed.is_some() {
                        let meter = crate::nats::keys::meter_of_readings_id(reading_meter(
                            &self.cache.slot(i).key,
                        ));
                        if !meters.contains(meter) {
                            meters.insert(meter.to_string());
                        }
                    }
                    self.cache.written(i, rev);
                }
                Err(e) => failed = Some((self.cache.slot(i).key.kv_key(), e)),
            }
        }
        if let Some(changed) = &self.changed {
            // once per meter and flush; a closed channel means no write-back is running
            for meter in meters {
                let _ = changed.send(meter);
            }
        }
        if let Some((key, e)) = failed {
            bail!("writing reading {key} failed ({e}); restarting from the stored cursor");
        }
        self.flush_cost = flight.started.elapsed();
        if let Some(seq) = flight.cursor {
            self.commit_cursor(seq).await?;
        }
        self.metrics
            .aggregate
            .flush_seconds
            .observe(flight.started.elapsed().as_secs_f64());
        Ok(())
    }
}

/// One reading to write: its slot, key, body, and the revision it replaces (`None`: a
/// new key).
pub(super) struct Write {
    slot: u32,
    /// (its subject is built when the write is sent: tens of thousands wait here)
    key: ReadingKey,
    body: bytes::Bytes,
    revision: Option<u64>,
}

/// A flush being written.
pub(super) struct Flush {
    started: std::time::Instant,
    count: usize,
    /// The cursor to store once every reading is written.
    cursor: Option<u64>,
    pub(super) task: tokio::task::JoinHandle<Vec<(u32, Result<u64>)>>,
}

/// A flush dropped unfinished (its aggregator stopped: a build cancelled, leadership
/// lost) writes no more: nothing may land after a deleted meter's readings are purged.
/// What it wrote stays valid (the cursor or checkpoint only ever follows a whole flush).
impl Drop for Flush {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Write readings with compare-and-swap, many in flight (a slice serialized at a time);
/// one outcome (the new revision) per reading.
pub(super) async fn write_readings(store: Store, writes: Vec<Write>) -> Vec<(u32, Result<u64>)> {
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
