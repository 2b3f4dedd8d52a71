//! Prometheus metrics (served at /metrics).

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone)]
pub struct Metrics {
    registry: std::sync::Arc<Registry>,
    pub events_accepted: Counter,
    pub events_rejected: Counter,
    pub events_duplicate: Counter,
    pub events_aggregated: Counter,
    pub events_invalid: Counter,
    pub consumer_lag: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub leader: Gauge,
    pub reconciles: Counter,
    pub meter_syncs: Counter,
    pub rebuilds: Counter,
    pub cursor: Gauge<u64, AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("kloudmeter");
        let m = Metrics {
            registry: Default::default(),
            events_accepted: Counter::default(),
            events_rejected: Counter::default(),
            events_duplicate: Counter::default(),
            events_aggregated: Counter::default(),
            events_invalid: Counter::default(),
            consumer_lag: Gauge::default(),
            leader: Gauge::default(),
            reconciles: Counter::default(),
            meter_syncs: Counter::default(),
            rebuilds: Counter::default(),
            cursor: Gauge::default(),
        };
        r.register(
            "events_accepted",
            "Events acknowledged by JetStream at ingestion",
            m.events_accepted.clone(),
        );
        r.register(
            "events_rejected",
            "Events refused at ingestion (invalid or unavailable)",
            m.events_rejected.clone(),
        );
        r.register(
            "events_duplicate",
            "Events recognised as repeats within DEDUP_WINDOW",
            m.events_duplicate.clone(),
        );
        r.register(
            "events_aggregated",
            "Distinct events folded by the aggregator",
            m.events_aggregated.clone(),
        );
        r.register(
            "events_invalid",
            "Event-meter pairs whose value was missing or not numeric",
            m.events_invalid.clone(),
        );
        r.register(
            "consumer_lag",
            "Events in the stream not yet aggregated",
            m.consumer_lag.clone(),
        );
        r.register(
            "leader",
            "1 while this process is the aggregator leader",
            m.leader.clone(),
        );
        r.register(
            "reconciles",
            "Meter custom resource reconciles by the controller",
            m.reconciles.clone(),
        );
        r.register(
            "meter_syncs",
            "Times the aggregator brought its meters in line with the definitions",
            m.meter_syncs.clone(),
        );
        r.register(
            "rebuilds",
            "Meter rebuilds and backfills from retained events",
            m.rebuilds.clone(),
        );
        r.register(
            "aggregated_sequence",
            "Stream sequence aggregated through",
            m.cursor.clone(),
        );
        Metrics {
            registry: std::sync::Arc::new(r),
            ..m
        }
    }
}

impl Metrics {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
