//! Status write-back: every METER_INTERVAL, the aggregating leader copies the readings
//! of Meter resources that changed into their status (server-side apply with its own
//! field manager). Meters whose readings did not change cost nothing.

use std::collections::HashSet;
use std::time::Duration;

use futures::{stream, StreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use tokio::sync::watch;

use crate::nats::registry::Registry;
use crate::nats::store::Store;
use crate::operator::crd::{Meter, ThresholdStatus, ThresholdSubject, TopSubject};

pub const STATUS_MANAGER: &str = "kloudmeter-aggregator";
const TOP: usize = 10;

/// Where the aggregator sends the ids of meters whose readings it wrote (once per meter
/// and flush); the write-back collects them until its next tick.
pub type ChangedSender = tokio::sync::mpsc::UnboundedSender<String>;
pub type ChangedReceiver = tokio::sync::mpsc::UnboundedReceiver<String>;

/// Write back while `leading` stays true; hands the receiver back for the next term.
pub async fn run(
    client: Client,
    store: Store,
    registry: Registry,
    mut changed: ChangedReceiver,
    interval: Duration,
    mut leading: watch::Receiver<bool>,
) -> ChangedReceiver {
    // A new leader writes every meter once.
    let mut due: HashSet<String> = registry.all().iter().map(|m| m.def.id.clone()).collect();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(id) = changed.recv() => {
                due.insert(id);
                continue;
            }
            _ = leading.wait_for(|l| !*l) => return changed,
        }
        let ids: Vec<String> = std::mem::take(&mut due)
            .into_iter()
            .filter(|id| id.contains('/'))
            .collect();
        let failed: Vec<String> = stream::iter(ids)
            .map(|id| {
                let (client, store, registry) = (client.clone(), store.clone(), registry.clone());
                async move {
                    match write(&client, &store, &registry, &id).await {
                        Ok(()) => None,
                        Err(e) => {
                            tracing::warn!(meter = %id, error = %e, "status write-back failed; will retry");
                            Some(id)
                        }
                    }
                }
            })
            .buffer_unordered(16)
            .filter_map(|r| async move { r })
            .collect()
            .await;
        due.extend(failed);
    }
}

#[tracing::instrument(name = "status", level = "debug", skip(client, store, registry))]
async fn write(
    client: &Client,
    store: &Store,
    registry: &Registry,
    id: &str,
) -> anyhow::Result<()> {
    let Some((ns, name)) = id.split_once('/') else {
        return Ok(());
    };
    let Some(meter) = registry.get(id) else {
        return Ok(());
    };
    let agg = meter.def.aggregation;
    let served = store.served(&meter.def).await?;
    let summary = store.summary(&served.readings).await?.unwrap_or_default();
    let mut subjects: Vec<(rust_decimal::Decimal, String)> = store
        .subject_totals(&served.readings, None)
        .await?
        .into_iter()
        .filter_map(|(subject, r)| r.acc.value(agg).map(|v| (v, subject)))
        .collect();
    subjects.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let top: Vec<TopSubject> = subjects
        .into_iter()
        .take(TOP)
        .map(|(v, s)| TopSubject {
            subject: s,
            value: v.to_string(),
        })
        .collect();
    let thresholds = if meter.thresholds.is_empty() {
        None
    } else {
        let s = crate::notify::standing(store, &meter, TOP).await?;
        Some(ThresholdStatus {
            crossed: i64::try_from(s.crossed).unwrap_or(i64::MAX),
            subjects: s
                .subjects
                .into_iter()
                .map(|(subject, value, level)| ThresholdSubject {
                    subject,
                    value: value.normalize().to_string(),
                    threshold: level.normalize().to_string(),
                })
                .collect(),
        })
    };
    let patch = json!({
        "apiVersion": "kloudmeter.io/v1alpha1",
        "kind": "Meter",
        "status": {
            "value": summary.acc.value(agg).map(|d| d.to_string()),
            "events": summary.acc.count,
            "invalidEvents": summary.invalid_events,
            "subjects": summary.subjects,
            "lastEventTime": summary.last_event_time.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            "lastUpdated": Timestamp::now().to_string(),
            "topSubjects": top,
            "rebuiltFrom": served.rebuilt_from.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
            "thresholds": thresholds,
        }
    });
    let api: Api<Meter> = Api::namespaced(client.clone(), ns);
    match api
        .patch_status(
            name,
            &PatchParams::apply(STATUS_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}
