//! Threshold crossings as Kubernetes Events: while this process is the operator's leader,
//! each notification on the notifications stream becomes a Normal Event `ThresholdCrossed`
//! on its Meter (standalone meters have no resource and get none). A durable consumer
//! (`kube-events`) keeps the place, so a new leader records what the last one had not;
//! each Event is named after its crossing, so one recorded twice is created once.

use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, ListParams, PostParams};
use kube::Resource as _;
use serde::Deserialize;
use tokio::sync::watch;

use crate::nats::store::Store;
use crate::operator::crd::Meter;

const CONSUMER: &str = "kube-events";
/// A notification whose Event could not be recorded is tried again this much later.
const RETRY: Duration = Duration::from_secs(5);
/// On first use, notifications this recent still get their Event (the notifier may have
/// published before the consumer existed).
const FIRST_LOOK_BACK: chrono::Duration = chrono::Duration::minutes(10);

#[derive(Deserialize)]
struct Notification {
    id: String,
    data: Crossing,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Crossing {
    meter: String,
    subject: String,
    period_start: Option<String>,
    threshold: String,
    value: String,
}

impl Crossing {
    fn note(&self) -> String {
        let period = match &self.period_start {
            Some(start) => format!("in the period from {start}"),
            None => "all time".to_string(),
        };
        format!(
            "subject {:?} reached {} ({period}): {}",
            self.subject, self.threshold, self.value
        )
    }
}

/// Record Events while `leading`; returns when leadership ends.
pub async fn run(
    client: kube::Client,
    store: Store,
    instance: String,
    mut leading: watch::Receiver<bool>,
) {
    while *leading.borrow() {
        tokio::select! {
            r = record_all(&client, &store, &instance) => {
                if let Err(e) = r {
                    tracing::warn!(error = format!("{e:#}"), "recording threshold Events interrupted; resuming");
                }
            }
            _ = leading.wait_for(|l| !*l) => return,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn record_all(client: &kube::Client, store: &Store, instance: &str) -> Result<()> {
    let consumer = crate::notify::durable_reader(
        store,
        CONSUMER,
        "KloudMeter threshold crossings to Kubernetes Events",
        chrono::Utc::now() - FIRST_LOOK_BACK,
    )
    .await?;
    let mut messages = consumer.messages().await.context("pulling notifications")?;
    while let Some(msg) = messages.next().await {
        let msg = msg.context("pulling notifications")?;
        let done = match serde_json::from_slice::<Notification>(&msg.payload) {
            Ok(n) => record(client, instance, &n.id, &n.data).await,
            // not a notification of ours: nothing to record
            Err(_) => Ok(()),
        };
        let kind = match done {
            Ok(()) => AckKind::Ack,
            Err(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "recording a ThresholdCrossed Event failed; retrying"
                );
                AckKind::Nak(Some(RETRY))
            }
        };
        msg.ack_with(kind)
            .await
            .map_err(|e| anyhow::anyhow!("acknowledging a notification: {e}"))?;
    }
    anyhow::bail!("the notification consumer ended")
}

/// One crossing's Event on its Meter (none when the Meter is gone or standalone).
async fn record(client: &kube::Client, instance: &str, id: &str, c: &Crossing) -> Result<()> {
    let Some((ns, name)) = c.meter.split_once('/') else {
        return Ok(());
    };
    // found by listing (what the controller's rights allow), for its uid: tools match
    // Events to their object by it
    let found = Api::<Meter>::namespaced(client.clone(), ns)
        .list(&ListParams::default().fields(&format!("metadata.name={name}")))
        .await
        .context("finding the Meter")?;
    let Some(meter) = found.items.first() else {
        return Ok(());
    };
    let regarding: ObjectReference = meter.object_ref(&());
    let event = Event {
        metadata: ObjectMeta {
            // one name per crossing: recording it again is a conflict, not a second Event
            name: Some(format!(
                "{}.threshold-{}",
                &name[..name.len().min(200)],
                &id[..id.len().min(32)]
            )),
            namespace: Some(ns.to_string()),
            ..Default::default()
        },
        event_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
        type_: Some("Normal".into()),
        reason: Some("ThresholdCrossed".into()),
        action: Some("Notify".into()),
        note: Some(c.note()),
        regarding: Some(regarding),
        reporting_controller: Some("kloudmeter".into()),
        reporting_instance: Some(instance.to_string()),
        ..Default::default()
    };
    match Api::<Event>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &event)
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(anyhow::Error::new(e).context("recording the Event")),
    }
}
