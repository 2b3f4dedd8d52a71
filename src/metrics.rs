//! Prometheus metrics (served at `/metrics`), grouped by the subsystem that updates them.
//! Every name is registered once, here; the exposition prefixes each with `kloudmeter_`.

use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::{Metric, Registry};

/// Ingestion: what requests brought and how long they took.
#[derive(Clone)]
pub struct IngestMetrics {
    pub accepted: Counter,
    pub rejected: Counter,
    /// From a request's body read to its answer (all events stored, or refused).
    pub request_seconds: Histogram,
}

/// The aggregator: events folded, duplicates and invalid events, its position in the
/// stream, and how long batches and flushes take.
#[derive(Clone)]
pub struct AggregateMetrics {
    pub duplicate: Counter,
    pub aggregated: Counter,
    pub invalid: Counter,
    /// Per partition (each is its own stream, with sequences of its own).
    pub consumer_lag: Family<PartitionLabel, Gauge<i64, AtomicI64>>,
    pub cursor: Family<PartitionLabel, Gauge<u64, AtomicU64>>,
    /// Readings a partition's aggregator holds in memory (dropped when it goes idle).
    pub cached_readings: Family<PartitionLabel, Gauge>,
    pub meter_syncs: Counter,
    pub rebuilds: Counter,
    /// Settling duplicates and folding one batch.
    pub batch_seconds: Histogram,
    /// Writing one flush's readings and advancing the cursor over them.
    pub flush_seconds: Histogram,
    /// Events replayed by meter builds (beside the live pass, and at their hand-over).
    pub build_events: Counter,
    /// Per meter being built: percent done, and events replayed per second.
    pub build_percent: Family<MeterLabel, Gauge>,
    pub build_rate: Family<MeterLabel, Gauge>,
}

/// The `meter` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MeterLabel {
    pub meter: String,
}

impl AggregateMetrics {
    pub fn build_progress(&self, meter: &str, percent: u8, rate: u64) {
        let label = MeterLabel {
            meter: meter.to_string(),
        };
        self.build_percent
            .get_or_create(&label)
            .set(i64::from(percent));
        self.build_rate
            .get_or_create(&label)
            .set(i64::try_from(rate).unwrap_or(i64::MAX));
    }

    /// A meter's build ended (or never ran): its series go.
    pub fn build_ended(&self, meter: &str) {
        let label = MeterLabel {
            meter: meter.to_string(),
        };
        self.build_percent.remove(&label);
        self.build_rate.remove(&label);
    }
}

/// Usage itself, read from the served readings at each scrape: every meter's total and
/// events, and the highest subjects of meters that export them. Values are floats here
/// (Prometheus has no other kind); the API has them exact.
#[derive(Clone, Default)]
pub struct UsageMetrics {
    pub meter_value: Family<MeterLabel, Gauge<f64, AtomicU64>>,
    pub meter_events: Family<MeterLabel, Gauge>,
    pub subject_value: Family<SubjectLabel, Gauge<f64, AtomicU64>>,
    /// Readings queries found in the query cache (`hit`) or read from nats-server past it
    /// (`miss`); reads the cache could not answer at all are neither.
    pub query_cache_reads: Family<CacheReadLabel, Counter>,
    pub query_cache_bytes: Gauge,
    /// One refresh at a time: a scrape sees every series of one refresh.
    pub refreshing: Arc<tokio::sync::Mutex<()>>,
}

/// The `meter` and `subject` labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubjectLabel {
    pub meter: String,
    pub subject: String,
}

/// The `result` label of the query cache's reads.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheReadLabel {
    pub result: &'static str,
}

/// A meter's usage for [`UsageMetrics::set`].
pub struct MeterUsage {
    pub meter: String,
    pub value: Option<f64>,
    pub events: u64,
    /// (subject, value), highest first; empty unless the meter exports them.
    pub top_subjects: Vec<(String, f64)>,
}

impl UsageMetrics {
    /// Bring the query cache's series up to its own counts (they only grow).
    pub fn set_query_cache(&self, hits: u64, misses: u64, bytes: usize) {
        for (result, total) in [("hit", hits), ("miss", misses)] {
            let c = self
                .query_cache_reads
                .get_or_create(&CacheReadLabel { result });
            c.inc_by(total.saturating_sub(c.get()));
        }
        self.query_cache_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// Replace every usage series with these (a deleted meter's go).
    pub fn set(&self, usage: Vec<MeterUsage>) {
        self.meter_value.clear();
        self.meter_events.clear();
        self.subject_value.clear();
        for u in usage {
            let label = MeterLabel {
                meter: u.meter.clone(),
            };
            if let Some(v) = u.value {
                self.meter_value.get_or_create(&label).set(v);
            }
            self.meter_events
                .get_or_create(&label)
                .set(i64::try_from(u.events).unwrap_or(i64::MAX));
            for (subject, v) in u.top_subjects {
                self.subject_value
                    .get_or_create(&SubjectLabel {
                        meter: u.meter.clone(),
                        subject,
                    })
                    .set(v);
            }
        }
    }
}

/// Snapshots of the claim index this process published (as leader) for cold starts.
#[derive(Clone, Default)]
pub struct ClaimSnapshotMetrics {
    /// Unix time of the last one published: an alert watches its age.
    pub published_at: Gauge<f64, AtomicU64>,
    pub claims: Gauge,
    /// Writing and publishing the last one.
    pub seconds: Gauge<f64, AtomicU64>,
    pub failures: Counter,
}

/// Threshold notifications.
#[derive(Clone, Default)]
pub struct NotifyMetrics {
    /// Crossings notified (published to the notifications stream).
    pub fired: Counter,
    /// Webhook deliveries answered 2xx.
    pub delivered: Counter,
    /// Webhook attempts that failed (error or non-2xx) and will be retried.
    pub retried: Counter,
    /// Notifications given up on: still undelivered after WEBHOOK_RETRY_FOR.
    pub failed: Counter,
    /// Notifications not yet delivered to the webhook (waiting or in flight).
    pub pending: Gauge,
}

/// The Meter controller.
#[derive(Clone)]
pub struct OperatorMetrics {
    pub reconciles: Counter,
}

/// The election.
#[derive(Clone)]
pub struct ElectionMetrics {
    /// 1 while this process leads (holds partition 0, which carries the operator role).
    pub leader: Gauge,
    /// Per partition: 1 while this process holds its lease.
    pub partition_owned: Family<PartitionLabel, Gauge>,
}

/// The `partition` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabel {
    pub partition: String,
}

impl PartitionLabel {
    pub fn of(partition: u16) -> PartitionLabel {
        PartitionLabel {
            partition: partition.to_string(),
        }
    }
}

impl ElectionMetrics {
    pub fn owned(&self, partition: u16, owned: bool) {
        self.partition_owned
            .get_or_create(&PartitionLabel {
                partition: partition.to_string(),
            })
            .set(i64::from(owned));
    }
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub ingest: IngestMetrics,
    pub aggregate: AggregateMetrics,
    pub operator: OperatorMetrics,
    pub election: ElectionMetrics,
    pub usage: UsageMetrics,
    pub snapshots: ClaimSnapshotMetrics,
    pub notify: NotifyMetrics,
}

/// Latency buckets from 0.5 ms to about 16 s.
fn seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

impl IngestMetrics {
    fn registered(r: &mut Registry) -> Self {
        let m = IngestMetrics {
            accepted: Counter::default(),
            rejected: Counter::default(),
            request_seconds: seconds(),
        };
        add(
            r,
            "events_accepted",
            "Events acknowledged by JetStream at ingestion",
            &m.accepted,
        );
        add(
            r,
            "events_rejected",
            "Events refused at ingestion (invalid or unavailable)",
            &m.rejected,
        );
        add(
            r,
            "ingest_request_seconds",
            "Time to answer an ingestion request",
            &m.request_seconds,
        );
        m
    }
}

impl AggregateMetrics {
    fn registered(r: &mut Registry) -> Self {
        let m = AggregateMetrics {
            duplicate: Counter::default(),
            aggregated: Counter::default(),
            invalid: Counter::default(),
            consumer_lag: Family::default(),
            cursor: Family::default(),
            cached_readings: Family::default(),
            meter_syncs: Counter::default(),
            rebuilds: Counter::default(),
            batch_seconds: seconds(),
            flush_seconds: seconds(),
            build_events: Counter::default(),
            build_percent: Family::default(),
            build_rate: Family::default(),
        };
        add(
            r,
            "events_duplicate",
            "Events recognised as repeats within DEDUP_WINDOW",
            &m.duplicate,
        );
        add(
            r,
            "events_aggregated",
            "Distinct events folded by the aggregator",
            &m.aggregated,
        );
        add(
            r,
            "events_invalid",
            "Event-meter pairs whose value was missing or not numeric",
            &m.invalid,
        );
        add(
            r,
            "consumer_lag",
            "Events in a partition's stream not yet aggregated",
            &m.consumer_lag,
        );
        add(
            r,
            "aggregated_sequence",
            "Sequence of a partition's stream aggregated through",
            &m.cursor,
        );
        add(
            r,
            "aggregator_cached_readings",
            "Readings a partition's aggregator holds in memory",
            &m.cached_readings,
        );
        add(
            r,
            "meter_syncs",
            "Times the aggregator brought its meters in line with the definitions",
            &m.meter_syncs,
        );
        add(
            r,
            "rebuilds",
            "Meter rebuilds and backfills from retained events",
            &m.rebuilds,
        );
        add(
            r,
            "aggregate_batch_seconds",
            "Time to settle and fold one batch of events",
            &m.batch_seconds,
        );
        add(
            r,
            "aggregate_flush_seconds",
            "Time to write one flush of readings and advance the cursor",
            &m.flush_seconds,
        );
        add(
            r,
            "build_events",
            "Events replayed by meter builds",
            &m.build_events,
        );
        add(
            r,
            "build_progress_percent",
            "Per meter being built: percent of its retained events replayed",
            &m.build_percent,
        );
        add(
            r,
            "build_events_per_second",
            "Per meter being built: events replayed per second",
            &m.build_rate,
        );
        m
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("kloudmeter");
        let ingest = IngestMetrics::registered(&mut r);
        let aggregate = AggregateMetrics::registered(&mut r);
        let operator = OperatorMetrics {
            reconciles: Counter::default(),
        };
        add(
            &mut r,
            "reconciles",
            "Meter custom resource reconciles by the controller",
            &operator.reconciles,
        );
        let notify = NotifyMetrics::default();
        add(
            &mut r,
            "notifications_fired",
            "Threshold crossings notified (published to <stream>.notifications.<meter>)",
            &notify.fired,
        );
        add(
            &mut r,
            "notifications_delivered",
            "Threshold notifications delivered to WEBHOOK_URL (answered 2xx)",
            &notify.delivered,
        );
        add(
            &mut r,
            "notifications_retried",
            "Webhook delivery attempts that failed and will be retried with backoff",
            &notify.retried,
        );
        add(
            &mut r,
            "notifications_failed",
            "Threshold notifications given up on: undelivered after WEBHOOK_RETRY_FOR",
            &notify.failed,
        );
        add(
            &mut r,
            "notifications_pending",
            "Threshold notifications not yet delivered to WEBHOOK_URL",
            &notify.pending,
        );
        let snapshots = ClaimSnapshotMetrics::default();
        add(
            &mut r,
            "claim_snapshot_timestamp_seconds",
            "Unix time of the last claim index snapshot this process published",
            &snapshots.published_at,
        );
        add(
            &mut r,
            "claim_snapshot_claims",
            "Claims in the last claim index snapshot this process published",
            &snapshots.claims,
        );
        add(
            &mut r,
            "claim_snapshot_duration_seconds",
            "Time the last claim index snapshot took to write and publish",
            &snapshots.seconds,
        );
        add(
            &mut r,
            "claim_snapshot_failures",
            "Claim index snapshots that could not be written or published",
            &snapshots.failures,
        );
        let usage = UsageMetrics::default();
        add(
            &mut r,
            "meter_value",
            "A meter's all-time value (as a float; the API has it exact)",
            &usage.meter_value,
        );
        add(
            &mut r,
            "meter_events",
            "Events a meter has counted",
            &usage.meter_events,
        );
        add(
            &mut r,
            "subject_value",
            "All-time value of a meter's highest subjects, for meters with export.topSubjects (at most that many)",
            &usage.subject_value,
        );
        add(
            &mut r,
            "query_cache_reads",
            "Readings queries found in the query cache (hit) or read from NATS past it (miss)",
            &usage.query_cache_reads,
        );
        add(
            &mut r,
            "query_cache_bytes",
            "Bytes of readings the query cache holds",
            &usage.query_cache_bytes,
        );
        let election = ElectionMetrics {
            leader: Gauge::default(),
            partition_owned: Family::default(),
        };
        add(
            &mut r,
            "leader",
            "1 while this process is the leader (it holds partition 0 and reconciles Meters)",
            &election.leader,
        );
        add(
            &mut r,
            "partition_owned",
            "1 for each partition this process aggregates (holds the lease of), 0 for the others",
            &election.partition_owned,
        );
        Metrics {
            registry: Arc::new(r),
            ingest,
            aggregate,
            operator,
            election,
            usage,
            snapshots,
            notify,
        }
    }
}

/// Register a handle of `metric` (handles share their value).
fn add<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: &M) {
    r.register(name, help, metric.clone());
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
