//! Status write-back: every METER_INTERVAL, the aggregating leader copies the readings
//! of Meter resources that changed into their status (server-side apply with its own
//! field manager). Meters whose readings did not change cost nothing.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{stream, StreamExt};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;
use tokio::sync::watch;

use crate::crd::{Meter, TopSubject};
use crate::fold::Reading;
use crate::keys::{self, ReadingKey};
use crate::registry::Registry;
use crate::store::Store;

pub const STATUS_MANAGER: &str = "kloudmeter-aggregator";
const TOP: usize = 10;

/// Ids of meters whose readings changed since the last write-back.
pub type Changed = Arc<Mutex<HashSet<String>>>;

pub async fn run(
    client: Client,
    store: Store,
    registry: Registry,
    changed: Changed,
    interval: Duration,
    mut leading: watch::Receiver<bool>,
) {
    // A new leader writes every meter once.
    {
        let mut set = changed.lock().unwrap_or_else(|e| e.into_inner());
        set.extend(
            registry
                .all()
                .iter()
                .map(|m| m.def.id.clone())
                .filter(|id| id.contains('/')),
        );
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = leading.wait_for(|l| !*l) => return,
        }
        let ids: Vec<String> =
            std::mem::take(&mut *changed.lock().unwrap_or_else(|e| e.into_inner()))
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
        changed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(failed);
    }
}

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
    let summary: Reading = match store
        .readings
        .get(ReadingKey::Summary { meter: id.into() }.kv_key())
        .await?
    {
        Some(raw) => serde_json::from_slice(&raw)?,
        None => Reading::default(),
    };
    let mut subjects: Vec<(rust_decimal::Decimal, String)> = Vec::new();
    for item in store
        .scan(&store.readings, &keys::subject_totals_filter(id, None))
        .await?
    {
        let Some(subject) = item.key.split('.').nth(2).and_then(keys::untoken) else {
            continue;
        };
        let r: Reading = serde_json::from_slice(&item.value)?;
        if let Some(v) = r.acc.value(agg) {
            subjects.push((v, subject));
        }
    }
    subjects.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let top: Vec<TopSubject> = subjects
        .into_iter()
        .take(TOP)
        .map(|(v, s)| TopSubject {
            subject: s,
            value: v.to_string(),
        })
        .collect();
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
