//! A meter build: a task beside the live pass that replays the retained events of one
//! meter's type into a new generation of its readings, with a consumer and a cache of
//! its own, checkpointing as it goes (a restarted build resumes from its checkpoint).
//!
//! It replays only events the live pass has settled (duplicates decided and removed),
//! i.e. through the committed cursor, and yields while the live pass has a backlog.
//! When it reaches the live pass it reports how far it got; the live pass applies the
//! few events after that itself and switches readers over ([`super::builds`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use futures::StreamExt;
use tokio::sync::{mpsc, watch, Semaphore};

use super::*;
use crate::domain::build::{self, Frozen, KeptWindow, Progress};
use crate::domain::meter::{CompiledMeter, WindowSize};
use crate::nats::keys;

/// With no event for this long, a build has replayed everything there is.
const IDLE: Duration = Duration::from_millis(500);
/// A build's progress (percent, rate) is shown this often (its readings and checkpoint
/// are written every BUILD_CHECKPOINT_INTERVAL).
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// A build pauses while the live pass has more than this many events waiting...
const YIELD_LAG: u64 = BATCH as u64;
/// ...for at most this long at a time (a live pass that never catches up must not stop
/// builds for good).
const MAX_YIELD: Duration = Duration::from_secs(1);

/// How a build ended, for the live pass.
#[derive(Debug)]
pub(super) enum Report {
    /// The generation holds every event of the meter through `through`.
    Built {
        id: String,
        generation: u64,
        through: u64,
    },
    Failed {
        id: String,
        generation: u64,
        error: String,
    },
}

/// What a build shares with the live pass.
pub(super) struct Live {
    /// The live pass's committed cursor.
    pub committed: watch::Receiver<u64>,
    /// Events waiting for the live pass.
    pub lag: Arc<AtomicU64>,
    pub slots: Arc<Semaphore>,
    pub reports: mpsc::UnboundedSender<Report>,
}

/// A build in progress, as the live pass holds it. Dropping it stops the build.
pub(super) struct Running {
    pub progress: Progress,
    /// The meter keyed by the generation being built.
    pub meter: Arc<CompiledMeter>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Stop the build and wait until it has (what it wrote stays valid: every write is
    /// compare-and-swap, and its checkpoint only ever follows its writes).
    pub async fn stop(mut self) -> Progress {
        self.task.abort();
        let _ = (&mut self.task).await;
        std::mem::take(&mut self.progress)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The build-mode state of an aggregator.
pub(super) struct Mark {
    id: String,
    progress: Progress,
    started: Instant,
    /// Events replayed when this run of the build started.
    replayed_before: u64,
}

pub(super) fn spawn(
    parts: Parts,
    meter: Arc<CompiledMeter>,
    progress: Progress,
    live: Live,
    delay: Duration,
) -> Running {
    let id = meter.def.id.clone();
    let generation = progress.generation;
    let task = {
        let (meter, progress) = (meter.clone(), progress.clone());
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let reports = live.reports.clone();
            let report = match build(parts, meter, progress, live).await {
                Ok(through) => Report::Built {
                    id,
                    generation,
                    through,
                },
                Err(e) => Report::Failed {
                    id,
                    generation,
                    error: format!("{e:#}"),
                },
            };
            let _ = reports.send(report);
        })
    };
    Running {
        progress,
        meter,
        task,
    }
}

/// Replay the meter's events into its generation; how far it got (every event of the
/// meter through that sequence is in the written readings).
async fn build(
    parts: Parts,
    meter: Arc<CompiledMeter>,
    mut progress: Progress,
    mut live: Live,
) -> Result<u64> {
    let _slot = live.slots.clone().acquire_owned().await?;
    let id = meter.def.id.clone();
    let mut agg = Aggregator::new(parts);
    if !progress.kept_merged {
        if let Some(previous) = progress
            .previous
            .clone()
            .filter(|f| f.generation != progress.generation)
        {
            agg.keep_history(&meter, &previous, &mut progress).await?;
        }
        progress.kept_merged = true;
        agg.store.put_progress(&id, &progress).await?;
    }
    agg.skip_kept = progress
        .rebuilt_from
        .zip(progress.previous.as_ref().map(|f| f.through))
        .map(|(from, frozen)| (frozen, from));
    let mut through = progress.through;
    agg.building = Some(Mark {
        id: id.clone(),
        replayed_before: progress.replayed,
        progress,
        started: Instant::now(),
    });

    let settled = *live.committed.borrow_and_update();
    let consumer = agg
        .store
        .events_of_type_after(&meter.def.event_type, through)
        .await
        .context("creating the build's consumer")?;
    if consumer.cached_info().num_pending == 0 {
        // nothing after the checkpoint: complete through what the live pass had settled
        return Ok(through.max(settled));
    }
    agg.set_remaining(consumer.cached_info().num_pending);
    let only: ByType = HashMap::from([(meter.def.event_type.clone(), vec![meter.clone()])]);
    let mut messages = consumer.messages().await?;
    let mut batch = Vec::with_capacity(BATCH);
    let mut shown = Instant::now();
    loop {
        yield_to_live(&live.lag).await;
        let first = match tokio::time::timeout(IDLE, messages.next()).await {
            Err(_) => break, // everything there is, replayed
            Ok(None) => return Err(anyhow!("the build's consumer ended")),
            Ok(Some(first)) => first,
        };
        gather(first, &mut messages, BATCH, LINGER, &mut batch).await?;
        let settled = *live.committed.borrow_and_update();
        let mut wanted = Vec::with_capacity(batch.len());
        let mut reached_live = false;
        let mut left = None;
        for msg in batch.drain(..) {
            let info = msg.info().map_err(|e| anyhow!("{e}"))?;
            if info.stream_sequence > settled {
                // Past what the live pass has settled: every event before this one is
                // in, so the build is complete through `settled`; the live pass does
                // the rest.
                reached_live = true;
                break;
            }
            through = info.stream_sequence;
            left = Some(info.pending);
            wanted.push((info.stream_sequence, msg.message));
        }
        let n = agg.apply_messages(&wanted, &only).await?;
        agg.replayed(n as u64, left);
        if reached_live {
            through = through.max(settled);
        }
        agg.pending = Some(through);
        if reached_live {
            break;
        }
        if agg.cache.dirty_len() >= MAX_DIRTY || agg.last_flush.elapsed() >= agg.build_checkpoint {
            // written by a task of its own while replay goes on; the checkpoint follows
            agg.start_flush().await?;
        } else if shown.elapsed() >= PROGRESS_EVERY {
            agg.show_progress().await?;
            shown = Instant::now();
        }
    }
    agg.pending = Some(through);
    agg.flush().await?;
    if let Some(mark) = &agg.building {
        let secs = mark.started.elapsed().as_secs_f64();
        let replayed = mark.progress.replayed - mark.replayed_before;
        tracing::info!(meter = %id, replayed, secs, rate = (replayed as f64 / secs.max(1e-3)) as u64, through, "build replayed up to the live pass");
    }
    Ok(through)
}

/// Wait while the live pass has a backlog (for at most [`MAX_YIELD`]).
async fn yield_to_live(lag: &AtomicU64) {
    let since = Instant::now();
    while lag.load(Ordering::Relaxed) > YIELD_LAG && since.elapsed() < MAX_YIELD {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

impl Aggregator {
    /// Build mode: the checkpoint is `seq` (the readings through it are written).
    pub(super) async fn commit_checkpoint(&mut self, seq: u64) -> Result<()> {
        if let Some(mark) = self.building.as_mut() {
            mark.progress.through = seq;
        }
        self.show_progress().await
    }

    /// Build mode: store the progress record (percent, rate; the checkpoint as last
    /// committed) and show it in the metrics.
    async fn show_progress(&mut self) -> Result<()> {
        let Some(mark) = self.building.as_mut() else {
            return Ok(());
        };
        let secs = mark.started.elapsed().as_secs_f64().max(1e-3);
        let this_run = mark.progress.replayed - mark.replayed_before;
        mark.progress.rate = (this_run as f64 / secs) as u64;
        self.store.put_progress(&mark.id, &mark.progress).await?;
        let pct = mark.progress.replay_percent();
        self.metrics
            .aggregate
            .build_progress(&mark.id, pct, mark.progress.rate);
        Ok(())
    }

    fn set_remaining(&mut self, remaining: u64) {
        if let Some(mark) = self.building.as_mut() {
            mark.progress.remaining = remaining;
        }
    }

    /// Count replayed events (and what is left, when known).
    fn replayed(&mut self, n: u64, left: Option<u64>) {
        self.metrics.aggregate.build_events.inc_by(n);
        if let Some(mark) = self.building.as_mut() {
            mark.progress.replayed += n;
            if let Some(left) = left {
                mark.progress.remaining = left;
            }
        }
    }

    /// Before a rebuild replays anything: if windows of the previous generation counted
    /// events that have left the stream, keep every window up to the end of the last
    /// such one (merged into the new generation) and record where kept history ends.
    async fn keep_history(
        &mut self,
        meter: &Arc<CompiledMeter>,
        previous: &Frozen,
        progress: &mut Progress,
    ) -> Result<()> {
        let id = &meter.def.id;
        let old = keys::readings_id(&self.store.names.part_id(id), previous.generation);
        let subject = self.store.names.event_subject(&meter.def.event_type);
        let oldest = match self
            .store
            .events
            .get_first_raw_message_by_subject(&subject, 1)
            .await
        {
            Ok(m) => Some(m.sequence),
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::RawMessageErrorKind::NoMessageFound =>
            {
                None
            }
            Err(e) => return Err(anyhow!("finding the oldest retained event: {e}")),
        };
        let mut windows = Vec::new();
        for item in self
            .store
            .scan(&self.store.readings, &keys::meter_readings_filter(&old))
            .await?
        {
            if let Some((subject, group, start)) = keys::own_window_of(&item.key) {
                let reading: crate::domain::fold::Reading =
                    serde_json::from_slice(&item.value).context("decoding a kept window")?;
                windows.push(KeptWindow {
                    subject: subject.into(),
                    group: group.into(),
                    start,
                    reading,
                });
            }
        }
        let old_size = previous
            .window_size
            .unwrap_or_else(|| coarsest_fitting(windows.iter().map(|w| w.start)));
        let Some(lost_until) = windows
            .iter()
            .filter(|w| build::lost_events(&w.reading, oldest))
            .map(|w| w.start + old_size.seconds())
            .max()
        else {
            return Ok(()); // every event it counted is still there: nothing to keep
        };
        let from = build::rebuilt_from(lost_until, old_size, meter.def.window_size);
        let kept: Vec<KeptWindow> = windows.into_iter().filter(|w| w.start < from).collect();
        let windows_kept = kept.len();
        let merged = build::merge_kept(meter, old_size, kept);
        let writes = merged
            .into_iter()
            .map(|(key, reading)| {
                let body = serde_json::to_vec(&reading)?;
                Ok((key.kv_key(), body))
            })
            .collect::<Result<Vec<_>>>()?;
        let readings = self.store.readings.clone();
        futures::stream::iter(writes)
            .map(|(key, body)| {
                let readings = readings.clone();
                async move { readings.put(key, body.into()).await.map(|_| ()) }
            })
            .buffer_unordered(PIPELINE)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map_err(|e| anyhow!("writing kept windows: {e}"))?;
        progress.rebuilt_from = Some(from);
        tracing::info!(meter = %id, windows_kept, rebuilt_from = from, "events before the oldest retained one are gone: their windows keep the previous definition's readings");
        Ok(())
    }
}

/// The coarsest window size whose boundaries every start lies on (a record written
/// before window sizes were recorded). Coarser is safe: its boundaries are boundaries
/// of the finer sizes too.
fn coarsest_fitting(starts: impl Iterator<Item = i64>) -> WindowSize {
    let mut size = WindowSize::Day;
    for s in starts {
        while size != WindowSize::Minute && s.rem_euclid(size.seconds()) != 0 {
            size = match size {
                WindowSize::Day => WindowSize::Hour,
                _ => WindowSize::Minute,
            };
        }
    }
    size
}
