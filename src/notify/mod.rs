//! Threshold notifications. While this process leads, every second the notifier reads
//! each thresholded meter's per-subject values for the current and the previous period
//! (a late event can still cross there) and, for every level reached that was not
//! notified yet, publishes one CloudEvent to `<stream>.notifications.<meter>` and then
//! records the crossing in the `<stream>-fired` bucket.
//!
//! Exactly once: the crossing id ([`crate::domain::threshold::crossing_id`]) is the
//! event's id and its `Nats-Msg-Id`. Publishing comes before recording, so a crash in
//! between publishes again at the next evaluation, and the notifications stream drops
//! that as a duplicate (its duplicate window is an hour); a recorded crossing is never
//! published again. A meter being built is not evaluated until its build is served, and
//! then only crossings not yet recorded fire. Period values come from [`crate::usage`].
//! May not touch: readings (it only reads them), the claim log, Kubernetes.

pub mod webhook;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::message::PublishMessage;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde_json::json;
use tokio::sync::watch;

use crate::domain::meter::{CompiledMeter, MeterDef};
use crate::domain::threshold::{crossing_id, Period};
use crate::metrics::Metrics;
use crate::nats::registry::Registry;
use crate::nats::store::Store;

const EVERY: Duration = Duration::from_secs(1);
/// Late events' marks are looked at every this many rounds.
const LATE_EVERY: u64 = 5;

/// A durable consumer of every notification, for a reader that must see each at least
/// once (the webhook, Kubernetes Events): acknowledged one by one, never given up by
/// NATS. Created on first use from `since` on; later uses resume where it stands.
pub(crate) async fn durable_reader(
    store: &Store,
    name: &str,
    description: &str,
    since: DateTime<Utc>,
) -> Result<async_nats::jetstream::consumer::PullConsumer> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    let start_time = time::OffsetDateTime::from_unix_timestamp(since.timestamp())
        .context("a start time out of range")?;
    store
        .notifications
        .get_or_create_consumer(
            name,
            pull::Config {
                durable_name: Some(name.into()),
                description: Some(description.into()),
                ack_policy: AckPolicy::Explicit,
                // longer than one webhook attempt: an unacknowledged delivery is a reader
                // that died, and goes to another
                ack_wait: Duration::from_secs(30),
                max_deliver: -1,
                deliver_policy: DeliverPolicy::ByStartTime { start_time },
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("creating the notification consumer {name}"))
}

/// Evaluate thresholds while `leading`, until the process ends.
pub async fn run(
    store: Store,
    registry: Registry,
    metrics: Metrics,
    mut leading: watch::Receiver<bool>,
) {
    loop {
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        // what was notified before this process led: read once per leadership
        let mut fired = match fired_ids(&store).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "reading notified crossings failed; retrying"
                );
                tokio::time::sleep(EVERY).await;
                continue;
            }
        };
        // each meter's last failure, logged when it changes rather than every second
        let mut failing: HashMap<String, String> = HashMap::new();
        let mut rounds: u64 = 0;
        while *leading.borrow() {
            rounds += 1;
            if rounds % LATE_EVERY == 1 {
                if let Err(e) = evaluate_late(&store, &registry, &mut fired, &metrics).await {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "evaluating late events' periods failed; retrying"
                    );
                }
            }
            let thresholded = registry
                .all()
                .into_iter()
                .filter(|m| !m.thresholds.is_empty());
            for meter in thresholded {
                match evaluate(&store, &meter, &mut fired, &metrics).await {
                    Ok(()) => {
                        failing.remove(&meter.def.id);
                    }
                    Err(e) => {
                        let why = format!("{e:#}");
                        if failing.get(&meter.def.id) != Some(&why) {
                            tracing::warn!(meter = %meter.def.id, error = why, "evaluating thresholds failed; retrying");
                            failing.insert(meter.def.id.clone(), why);
                        }
                    }
                }
            }
            tokio::time::sleep(EVERY).await;
        }
    }
}

async fn fired_ids(store: &Store) -> Result<HashSet<String>> {
    Ok(store
        .scan(&store.fired, "f.*")
        .await
        .context("reading notified crossings")?
        .into_iter()
        .filter_map(|i| i.key.strip_prefix("f.").map(str::to_string))
        .collect())
}

/// The periods of late events (marked by the aggregator, see
/// [`crate::nats::keys::late_key`]): each thresholded meter's period holding the marked
/// hour is evaluated like a current one, then the mark is cleared.
async fn evaluate_late(
    store: &Store,
    registry: &Registry,
    fired: &mut HashSet<String>,
    metrics: &Metrics,
) -> Result<()> {
    let marks = store
        .scan(&store.state, crate::nats::keys::ALL_LATE)
        .await
        .context("reading late events' marks")?;
    for item in marks {
        let Some((id, hour)) = crate::nats::keys::late_of(&item.key) else {
            continue;
        };
        if let Some(meter) = registry.get(&id) {
            let (readings, ready) = served_readings(store, &meter).await?;
            if !ready {
                // a meter being built: its served readings will be evaluated then
                continue;
            }
            let start = DateTime::from_timestamp(hour, 0).unwrap_or_default();
            let end = DateTime::from_timestamp(hour + 3599, 0).unwrap_or_default();
            for (ti, threshold) in meter.thresholds.iter().enumerate() {
                // the hour may straddle two periods in a zone offset by a fraction of one
                let mut periods: Vec<_> = [start, end]
                    .into_iter()
                    .filter_map(|t| threshold.period_at(t))
                    .collect();
                periods.dedup();
                for (from, to) in periods {
                    fire_period(store, &meter, &readings, ti, from, to, fired, metrics).await?;
                }
            }
        }
        // only the mark as read: one that another partition's aggregator wrote again
        // meanwhile stays for the next round
        if let Err(e) = store
            .state
            .delete_expect_revision(&item.key, Some(item.revision))
            .await
        {
            tracing::debug!(key = %item.key, error = %e, "a late event's mark changed; kept");
        }
    }
    Ok(())
}

/// One meter's thresholds against its served readings.
async fn evaluate(
    store: &Store,
    meter: &Arc<CompiledMeter>,
    fired: &mut HashSet<String>,
    metrics: &Metrics,
) -> Result<()> {
    let (readings, ready) = served_readings(store, meter).await?;
    if !ready {
        return Ok(());
    }
    let now = Utc::now();
    for (ti, threshold) in meter.thresholds.iter().enumerate() {
        for (start, end) in threshold.periods(now) {
            fire_period(store, meter, &readings, ti, start, end, fired, metrics).await?;
        }
    }
    Ok(())
}

/// Notify every crossing of threshold `ti` in one period that was not notified yet.
#[allow(clippy::too_many_arguments)]
async fn fire_period(
    store: &Store,
    meter: &CompiledMeter,
    readings: &Served,
    ti: usize,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    fired: &mut HashSet<String>,
    metrics: &Metrics,
) -> Result<()> {
    let threshold = &meter.thresholds[ti];
    for (subject, value) in
        period_values(store, readings, threshold.period, start, end, threshold.tz).await?
    {
        for level in threshold.levels(value) {
            let id = crossing_id(&meter.def.id, &subject, start, level);
            if fired.contains(&id) {
                continue;
            }
            notify(store, &meter.def, ti, &id, &subject, start, level, value).await?;
            metrics.notify.fired.inc();
            fired.insert(id);
        }
    }
    Ok(())
}

/// Where a meter stands against its thresholds in their current periods.
#[derive(Debug, Default, PartialEq)]
pub struct Standing {
    /// Levels crossed, over every threshold and subject, in each threshold's current
    /// period.
    pub crossed: u64,
    /// Subjects over at least one threshold: (subject, current value, highest level
    /// reached), highest value first (ties by subject), at most `limit`.
    pub subjects: Vec<(String, Decimal, Decimal)>,
}

/// A meter's [`Standing`] from its served readings (what `status.thresholds` shows).
pub async fn standing(store: &Store, meter: &CompiledMeter, limit: usize) -> Result<Standing> {
    let (readings, _) = served_readings(store, meter).await?;
    let now = Utc::now();
    let mut standing = Standing::default();
    let mut over: HashMap<String, (Decimal, Decimal)> = HashMap::new();
    for threshold in &meter.thresholds {
        let Some(&(start, end)) = threshold.periods(now).first() else {
            continue;
        };
        for (subject, value) in
            period_values(store, &readings, threshold.period, start, end, threshold.tz).await?
        {
            let levels = threshold.levels(value);
            let Some(&top) = levels.last() else {
                continue;
            };
            standing.crossed += levels.len() as u64;
            let entry = over.entry(subject).or_insert((value, top));
            // the subject's largest value over its thresholds' periods, and the highest
            // level it reached in any
            entry.0 = entry.0.max(value);
            entry.1 = entry.1.max(top);
        }
    }
    let mut subjects: Vec<(String, Decimal, Decimal)> =
        over.into_iter().map(|(s, (v, l))| (s, v, l)).collect();
    subjects.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    subjects.truncate(limit);
    standing.subjects = subjects;
    Ok(standing)
}

/// A meter's definition and where its served readings are: what queries read period
/// values with.
struct Served {
    def: MeterDef,
    at: crate::nats::meters::Readings,
}

/// The meter's served readings ([`Store::served`]), and whether they are complete (not
/// being built).
async fn served_readings(store: &Store, meter: &CompiledMeter) -> Result<(Served, bool)> {
    let served = store.served(&meter.def).await?;
    let readings = Served {
        def: meter.def.clone(),
        at: served.readings,
    };
    Ok((readings, served.ready))
}

/// Every subject's value over one period: the all-time totals, or a query over the
/// period's bounds in its zone.
async fn period_values(
    store: &Store,
    readings: &Served,
    period: Period,
    start: Option<DateTime<Utc>>,
    end: Option<DateTime<Utc>>,
    tz: chrono_tz::Tz,
) -> Result<Vec<(String, Decimal)>> {
    let (Some(start), Some(end), false) = (start, end, period == Period::All) else {
        return Ok(store
            .subject_totals(&readings.at, None)
            .await?
            .into_iter()
            .filter_map(|(s, r)| r.acc.value(readings.def.aggregation).map(|v| (s, v)))
            .collect());
    };
    let pairs = vec![
        ("from".to_string(), crate::domain::query::rfc3339(start)),
        ("to".to_string(), crate::domain::query::rfc3339(end)),
        ("windowTimeZone".to_string(), tz.name().to_string()),
    ];
    let params = crate::domain::query::parse_query(&pairs, &readings.def, Utc::now())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rows = crate::usage::execute(store, &readings.def, &readings.at, &params).await?;
    Ok(rows
        .into_iter()
        .filter_map(|r| {
            let v = r
                .value
                .as_deref()
                .and_then(|v| Decimal::from_str_exact(v).ok())?;
            Some((r.subject, v))
        })
        .collect())
}

/// Publish one crossing's CloudEvent (deduplicated by its id), then record it.
#[allow(clippy::too_many_arguments)]
async fn notify(
    store: &Store,
    def: &MeterDef,
    threshold: usize,
    id: &str,
    subject: &str,
    period_start: Option<DateTime<Utc>>,
    level: Decimal,
    value: Decimal,
) -> Result<()> {
    let event = json!({
        "specversion": "1.0",
        "type": "io.kloudmeter.threshold.crossed",
        "id": id,
        "source": "kloudmeter",
        "subject": subject,
        "time": crate::domain::query::rfc3339(Utc::now()),
        "datacontenttype": "application/json",
        "data": {
            "meter": def.id,
            "subject": subject,
            "periodStart": period_start.map(crate::domain::query::rfc3339),
            "period": def.thresholds[threshold].period,
            "threshold": level.normalize().to_string(),
            "value": value.normalize().to_string(),
        }
    });
    let message = PublishMessage::build()
        .message_id(id)
        .payload(serde_json::to_vec(&event)?.into());
    store
        .js
        .send_publish(store.names.notifications_subject(&def.id), message)
        .await
        .context("publishing a notification")?
        .await
        .context("publishing a notification")?;
    // recorded only once published: a crash here publishes again, as a duplicate
    match store
        .fired
        .create(format!("f.{id}"), bytes::Bytes::new())
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("recording a notified crossing")),
    }
}
