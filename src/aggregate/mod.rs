//! The aggregator: the elected leader's loop that reads the event stream in order,
//! settles duplicates, folds events into readings (via the pure [`crate::domain::fold`]) and
//! stores them with compare-and-swap (see the crate docs). [`cache`] holds the readings it
//! keeps in memory, [`pull`] its own pull loop over the consumer.

mod batch;
mod builder;
mod builds;
pub(crate) mod cache;
mod cursor;
mod flush;
pub mod pull;

use batch::gather;
use builds::reading_meter;
use flush::Flush;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use async_nats::jetstream::consumer;
use async_nats::Message;
use futures::StreamExt;
use tokio::sync::watch;

use crate::aggregate::cache::Cache;
use crate::claims::Claims;
use crate::domain::build::Progress;
use crate::domain::meter::CompiledMeter;
use crate::metrics::Metrics;
use crate::nats::registry::Registry;
use crate::nats::store::Store;

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
/// Readings kept in memory between flushes (clean ones are dropped past this). An event
/// touches up to seven readings of each meter (summary, subject and group totals, four
/// windows): ten meters over 1,000 subjects keep 60,000 readings busy, and a limit below
/// the working set makes every flush start the cache afresh.
const CACHE_LIMIT: usize = 200_000;
/// Changed readings are written (and the cursor advanced) at least this often, so
/// readings in KV trail ingestion by well under a second.
const FLUSH_INTERVAL: Duration = Duration::from_millis(250);
/// ...and as soon as this many readings are waiting to be written (about 20 MB of them).
/// A working set larger than this flushes every batch, rewriting each reading per batch.
const MAX_DIRTY: usize = 100_000;
/// While a backlog is being worked off (more than a batch waiting), flushes come this
/// often instead: every flush rewrites each touched reading once, so fewer flushes mean
/// fewer writes per event, and catching up sooner is what brings latency back down.
const BACKLOG_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// ...or, when a flush takes long (many distinct readings), up to this often, so that
/// writing never takes more than a fifth of the time while catching up.
const MAX_BACKLOG_FLUSH_INTERVAL: Duration = Duration::from_secs(5);
/// After this long with no events and everything written, the cached readings are
/// dropped and their memory handed back to the system: a load of many subjects leaves
/// up to [`CACHE_LIMIT`] readings (well over 100 MiB) that nothing may touch again, and
/// the next events load the few readings they need from KV (a round trip each batch).
const IDLE_RELEASE: Duration = Duration::from_secs(2);

type ByType = HashMap<String, Vec<Arc<CompiledMeter>>>;

/// Builds replaying at once; more wait their turn (each is one consumer and a share of
/// the CPU that the live pass also needs).
const BUILDS_AT_ONCE: usize = 2;

/// A meter the live pass follows: the generation of its readings it writes.
#[derive(Clone)]
pub(super) struct Active {
    meter: Arc<CompiledMeter>,
    generation: u64,
}

pub(crate) struct Aggregator {
    store: Store,
    registry: Registry,
    metrics: Metrics,
    dedup_window_ns: i64,
    build_checkpoint: Duration,
    claims: Arc<tokio::sync::Mutex<Claims>>,
    /// Current readings of the keys touched recently (written or waiting to be), with
    /// their KV revisions and which of them changed since the last flush.
    cache: Cache,
    /// Highest sequence applied to the cached readings but not yet covered by the cursor.
    pending: Option<u64>,
    last_flush: std::time::Instant,
    /// Meters whose readings are complete up to `cursor`, with the generation followed
    /// (each meter's `id` is the name that generation's readings are stored under).
    active: HashMap<String, Active>,
    /// Builds running beside this pass, by meter id.
    builds: HashMap<String, builder::Running>,
    /// Where builds report (their end, or their failure).
    reports: tokio::sync::mpsc::UnboundedSender<builder::Report>,
    /// The cursor as last committed: builds replay only events this pass has settled.
    committed: watch::Sender<u64>,
    /// Messages waiting for this pass, so that builds can yield to it.
    live_lag: Arc<std::sync::atomic::AtomicU64>,
    /// Builds that may replay at once.
    build_slots: Arc<tokio::sync::Semaphore>,
    /// Set when this aggregator is a build: its flushes advance the build's checkpoint
    /// instead of the cursor.
    building: Option<builder::Mark>,
    /// Events a fold leaves out because kept history already holds them: the previous
    /// generation's last sequence and where kept history ends (see
    /// [`crate::domain::build::kept_already`]).
    skip_kept: Option<(u64, i64)>,
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
    changed: Option<crate::operator::status::ChangedSender>,
    /// (meter, hour) of events folded since the last flush that are too old for the
    /// notifier's own look at the current and previous periods: marked in the state
    /// bucket before the cursor moves past them ([`crate::notify`] evaluates and clears
    /// the marks).
    late: std::collections::HashSet<(String, i64)>,
}

/// What an aggregator works with; it outlives each term of leadership.
#[derive(Clone)]
pub(crate) struct Parts {
    pub store: Store,
    pub registry: Registry,
    pub metrics: Metrics,
    pub dedup_window: Duration,
    /// How often a build writes its readings and checkpoint.
    pub build_checkpoint: Duration,
    pub claims: Arc<tokio::sync::Mutex<Claims>>,
    /// Operator mode: where the ids of meters whose readings were written go.
    pub changed: Option<crate::operator::status::ChangedSender>,
}

impl Aggregator {
    pub fn new(parts: Parts) -> Self {
        let Parts {
            store,
            registry,
            metrics,
            dedup_window,
            build_checkpoint,
            claims,
            changed,
        } = parts;
        Aggregator {
            store,
            registry,
            metrics,
            dedup_window_ns: i64::try_from(dedup_window.as_nanos()).unwrap_or(i64::MAX),
            build_checkpoint,
            claims,
            cache: Cache::default(),
            pending: None,
            last_flush: std::time::Instant::now(),
            active: HashMap::new(),
            builds: HashMap::new(),
            reports: tokio::sync::mpsc::unbounded_channel().0,
            committed: watch::channel(0).0,
            live_lag: Arc::default(),
            build_slots: Arc::new(tokio::sync::Semaphore::new(BUILDS_AT_ONCE)),
            building: None,
            skip_kept: None,
            by_type: HashMap::new(),
            cursor: 0,
            cursor_rev: None,
            lag: 0,
            delivered: 0,
            inflight: None,
            flush_cost: Duration::ZERO,
            changed,
            late: Default::default(),
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
        let (reports, mut reported) = tokio::sync::mpsc::unbounded_channel();
        self.reports = reports;
        let mut meters_changed = self.registry.subscribe();
        meters_changed.borrow_and_update();
        self.reconcile().await?;
        let mut messages = self.open_messages().await?;
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
                Some(report) = reported.recv() => {
                    self.on_report(report).await?;
                }
                done = async { (&mut self.inflight.as_mut().expect("checked").task).await }, if self.inflight.is_some() => {
                    self.flush_done(done).await?;
                }
                _ = tokio::time::sleep_until(flush_due.into()), if has_pending => {
                    self.start_flush().await?;
                }
                _ = tokio::time::sleep_until((self.last_flush + IDLE_RELEASE).into()),
                    if !has_pending && self.inflight.is_none() && self.cache.len() > 0 => {
                    // (all written, none in flight: what a flush past CACHE_LIMIT does too)
                    tracing::debug!(readings = self.cache.len(), "idle: cached readings dropped");
                    self.cache.clear();
                    self.report_cache_size();
                    release_free_memory();
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

    /// The events after the cursor, in order, from a consumer of our own.
    async fn open_messages(
        &mut self,
    ) -> Result<impl futures::Stream<Item = Result<Message>> + Unpin> {
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
        let pull = crate::aggregate::pull::Pull::start(
            self.store.js.clone(),
            &self.store.names.stream,
            &consumer.cached_info().name,
            BATCH / 2,
            PULL_EXPIRES,
        )
        .await?;
        Ok(Box::pin(futures::stream::unfold(
            pull,
            |mut pull| async move {
                let next = pull.next().await;
                Some((next, pull))
            },
        )))
    }

    fn report_cache_size(&self) {
        self.metrics
            .aggregate
            .cached_readings
            .get_or_create(&crate::metrics::PartitionLabel::of(
                self.store.names.partition,
            ))
            .set(i64::try_from(self.cache.len()).unwrap_or(i64::MAX));
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
}

/// Hand memory the process has freed back to the system. glibc keeps freed small
/// allocations in its heap for reuse, so dropping a large cache alone leaves the
/// resident size where it was.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns unused heap pages; it is safe from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// How long an aggregator may take to finish its batch once its partition is no longer
/// led, before it is stopped where it is (what it wrote is fenced by compare-and-swap,
/// and the partition's lease is released only after it stopped).
const HAND_OVER: Duration = Duration::from_secs(15);

/// Run the aggregator whenever this process leads its partition, restarting it after
/// errors; `running` says whether it is at work (its lease is released only once not).
pub(crate) async fn supervise(
    parts: Parts,
    mut leading: watch::Receiver<bool>,
    running: watch::Sender<bool>,
) {
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        running.send_replace(true);
        // (said running before looking again: a hand-over that began meanwhile either
        // sees this one running and waits, or is seen here)
        if !*leading.borrow() {
            running.send_replace(false);
            continue;
        }
        let mut gone = leading.clone();
        let stopped = async move {
            let _ = gone.wait_for(|l| !*l).await;
            tokio::time::sleep(HAND_OVER).await;
        };
        let outcome = tokio::select! {
            outcome = Aggregator::new(parts.clone()).run(leading.clone()) => outcome,
            _ = stopped => Err(anyhow::anyhow!("did not finish its batch within {HAND_OVER:?} of the hand-over; stopped")),
        };
        running.send_replace(false);
        if let Err(e) = outcome {
            tracing::error!(
                partition = parts.store.names.partition,
                error = format!("{e:#}"),
                "aggregator stopped; restarting"
            );
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}
