//! The Meter controller: reconciles Meter custom resources into the meter definitions
//! in NATS KV (the same ones standalone meters use), reports validity and build progress
//! in `status.conditions`, and cleans up through a finalizer. Only spec changes
//! (generation) trigger reconciles, never status writes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event as KubeEvent, EventType, Recorder, Reporter};
use kube::runtime::{predicates, reflector, watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;

use crate::domain::meter::MeterDef;
use crate::metrics::Metrics;
use crate::nats::keys;
use crate::nats::meters::Served;
use crate::nats::store::Store;
use crate::operator::crd::{meter_id, Meter, MeterCondition};

pub const FINALIZER: &str = "kloudmeter.io/cleanup";
pub const CONTROLLER_MANAGER: &str = "kloudmeter-controller";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("NATS: {0}")]
    Nats(String),
}

pub struct Ctx {
    pub client: Client,
    pub store: Store,
    pub metrics: Metrics,
    pub recorder: Recorder,
    failures: Mutex<HashMap<String, u32>>,
}

impl Ctx {
    pub fn new(client: Client, store: Store, metrics: Metrics, instance: String) -> Self {
        let reporter = Reporter {
            controller: "kloudmeter".into(),
            instance: Some(instance),
        };
        Ctx {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            store,
            metrics,
            failures: Mutex::default(),
        }
    }
}

fn nats<E: std::fmt::Display>(e: E) -> Error {
    Error::Nats(e.to_string())
}

/// Run the controller until `leading` turns false. `synced` turns true once the
/// initial list of Meters is loaded.
pub async fn run(
    ctx: Arc<Ctx>,
    namespace: Option<String>,
    mut leading: watch::Receiver<bool>,
    synced: watch::Sender<bool>,
) {
    let api: Api<Meter> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    let (reader, writer) = reflector::store();
    let stream = watcher(api, watcher::Config::default())
        .default_backoff()
        .reflect(writer)
        // The first complete list marks the controller synced (for /readyz).
        .inspect(move |ev| {
            if matches!(ev, Ok(watcher::Event::InitDone)) {
                synced.send_replace(true);
            }
        })
        .applied_objects()
        .predicate_filter(predicates::generation, Default::default());
    Controller::for_stream(stream, reader)
        .graceful_shutdown_on(async move {
            let _ = leading.wait_for(|l| !*l).await;
        })
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "reconcile failed");
            }
        })
        .await;
}

fn ready_condition(meter: &Meter, status: bool, reason: &str, message: String) -> MeterCondition {
    let status = if status { "True" } else { "False" }.to_string();
    let previous = meter
        .status
        .as_ref()
        .and_then(|s| s.conditions.iter().find(|c| c.type_ == "Ready"));
    let since = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => None,
    };
    MeterCondition {
        type_: "Ready".into(),
        status,
        reason: Some(reason.into()),
        message: Some(message),
        last_transition_time: since.or_else(|| Some(Timestamp::now().to_string())),
        observed_generation: meter.metadata.generation,
    }
}

async fn set_condition(api: &Api<Meter>, meter: &Meter, cond: MeterCondition) -> Result<(), Error> {
    let patch = json!({
        "apiVersion": "kloudmeter.io/v1alpha1",
        "kind": "Meter",
        "status": {"conditions": [cond], "observedGeneration": meter.metadata.generation},
    });
    api.patch_status(
        &meter.name_any(),
        &PatchParams::apply(CONTROLLER_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

#[tracing::instrument(name = "reconcile", level = "debug", skip_all, fields(meter = %meter.name_any()))]
async fn reconcile(meter: Arc<Meter>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    ctx.metrics.operator.reconciles.inc();
    let ns = meter.namespace().unwrap_or_default();
    let name = meter.name_any();
    let id = meter_id(&ns, &name);
    let api: Api<Meter> = Api::namespaced(ctx.client.clone(), &ns);
    if meter.metadata.deletion_timestamp.is_some() {
        return finalize(&meter, &ctx, &api, &id).await;
    }
    if !meter.finalizers().iter().any(|f| f == FINALIZER) {
        let mut all = meter.finalizers().to_vec();
        all.push(FINALIZER.into());
        let patch = json!({"metadata": {"finalizers": all}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    for pruned in crate::operator::crd::pruned_spec_fields(&meter) {
        let note = format!("{pruned}; the API server dropped it");
        warn(&ctx, &meter, "UnknownField", note).await;
    }
    let def = match meter.spec.to_def(&ns, &name) {
        Ok(def) => def,
        Err(e) => {
            warn(&ctx, &meter, "InvalidSpec", e.to_string()).await;
            let cond = ready_condition(&meter, false, "InvalidSpec", e.to_string());
            set_condition(&api, &meter, cond).await?;
            return Ok(Action::await_change());
        }
    };
    let served = store_definition(&ctx.store, &id, &def).await?;
    let (cond, action) = if def.suspend {
        let msg = "suspended: events are kept in the stream and counted on resume".to_string();
        (
            ready_condition(&meter, false, "Suspended", msg),
            Action::await_change(),
        )
    } else if served.ready {
        let was_ready = meter.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if let (false, Some(from)) = (was_ready, served.rebuilt_from) {
            let note = format!(
                "windows before {} keep the readings of the previous definition: their events were no longer retained (EVENT_RETENTION)",
                from.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            );
            record(
                &ctx,
                &meter,
                EventType::Normal,
                "HistoryKept",
                "Build",
                note,
            )
            .await;
        }
        (
            ready_condition(&meter, true, "Ready", "readings are complete".into()),
            Action::await_change(),
        )
    } else {
        (
            ready_condition(&meter, false, "Building", building_message(&served)),
            Action::requeue(Duration::from_secs(1)),
        )
    };
    set_condition(&api, &meter, cond).await?;
    ctx.failures
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    Ok(action)
}

/// A deleted Meter: remove what NATS holds for it, then its finalizer.
async fn finalize(meter: &Meter, ctx: &Ctx, api: &Api<Meter>, id: &str) -> Result<Action, Error> {
    if !meter.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    if let Err(e) = cleanup(&ctx.store, id).await {
        let message = format!("removing readings from NATS: {e}; retrying");
        let cond = ready_condition(meter, false, "CleanupPending", message);
        let _ = set_condition(api, meter, cond).await;
        return Err(e);
    }
    let rest: Vec<String> = meter
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    let patch = json!({"metadata": {"finalizers": rest}});
    api.patch(
        &meter.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    tracing::info!(meter = %id, "meter deleted; readings removed");
    Ok(Action::await_change())
}

/// What a building meter's condition says: how far, and how long still.
fn building_message(served: &Served) -> String {
    let record = served.record.as_ref();
    let Some(pct) = served.progress else {
        return "waiting for the build to start".into();
    };
    let (done, left) = record.map_or((0, 0), |p| (p.replayed, p.remaining));
    let eta = match record.and_then(|p| p.eta_seconds()) {
        Some(secs) => format!(", about {secs} s left"),
        None => String::new(),
    };
    let kept = if record.is_some_and(|p| p.previous.is_some()) {
        "; the previous readings are served meanwhile"
    } else {
        ""
    };
    format!(
        "building from retained events: {pct}% ({done} of {} events){eta}{kept}",
        done + left
    )
}

/// A Warning Event on the Meter (failing to record one is logged, not fatal).
async fn warn(ctx: &Ctx, meter: &Meter, reason: &str, note: String) {
    record(ctx, meter, EventType::Warning, reason, "Validate", note).await;
}

/// An Event on the Meter (failing to record one is logged, not fatal).
async fn record(
    ctx: &Ctx,
    meter: &Meter,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = KubeEvent {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: action.into(),
        secondary: None,
    };
    if let Err(err) = ctx.recorder.publish(&ev, &meter.object_ref(&())).await {
        tracing::warn!(meter = %meter.name_any(), error = %err, "could not record event");
    }
}

/// Put the definition where every process follows it (unless already there); where its
/// readings stand.
async fn store_definition(store: &Store, id: &str, def: &MeterDef) -> Result<Served, Error> {
    if store.meter(id).await.map_err(nats)?.as_ref() != Some(def) {
        store.put_meter(def).await.map_err(nats)?;
    }
    store.served(def).await.map_err(nats)
}

/// Remove everything NATS holds for a meter, in every partition (its definition first,
/// so that the aggregators stop following it); succeed only once nothing is left.
pub async fn cleanup(store: &Store, id: &str) -> Result<(), Error> {
    store.delete_meter(id).await.map_err(nats)?;
    for p in store.partitions.all() {
        let part = store
            .partition(p)
            .await
            .map_err(|e| Error::Nats(format!("{e:#}")))?;
        part.purge_meter(id).await.map_err(nats)?;
        let left = store
            .scan(
                &store.readings,
                &keys::meter_readings_filter(&keys::part_id(id, p)),
            )
            .await
            .map_err(nats)?;
        if !left.is_empty() {
            return Err(Error::Nats(format!(
                "{} readings still present",
                left.len()
            )));
        }
    }
    Ok(())
}

fn error_policy(meter: Arc<Meter>, err: &Error, ctx: Arc<Ctx>) -> Action {
    let id = meter_id(&meter.namespace().unwrap_or_default(), &meter.name_any());
    let mut failures = ctx.failures.lock().unwrap_or_else(|e| e.into_inner());
    let n = failures.entry(id.clone()).or_insert(0);
    *n = (*n + 1).min(8);
    let delay = Duration::from_millis(250 * (1u64 << *n)).min(Duration::from_secs(30));
    tracing::warn!(meter = %id, error = %err, retry_in_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
}
