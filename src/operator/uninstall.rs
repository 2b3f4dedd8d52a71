//! `kloudmeter uninstall`: what the chart's pre-delete hook runs before `helm uninstall`
//! removes the operator. Every Meter carries the operator's clean-up finalizer; once the
//! operator is gone nobody would remove it, and the Meters (and their namespaces) would
//! hang on deletion forever. So, while the operator still runs:
//! - `delete` (the default): delete every Meter and wait until the operator has cleaned
//!   each one up (its readings removed) and dropped its finalizer. A Meter still there
//!   after the wait (no operator running, say) has its finalizer removed here: it goes,
//!   and what it kept in NATS stays.
//! - `keep`: leave the Meters and their readings, only without the finalizer; an install
//!   over the same NATS later takes them up again.

use std::time::{Duration, Instant};

use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::ResourceExt;

use super::controller::FINALIZER;
use super::crd::Meter;

/// What becomes of the Meters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Meters {
    Delete,
    Keep,
}

/// Run the clean-up over the Meters of `namespace` (every namespace when `None`).
pub async fn run(
    client: kube::Client,
    namespace: Option<&str>,
    meters: Meters,
    wait: Duration,
) -> anyhow::Result<()> {
    let api: Api<Meter> = match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let found = api.list(&ListParams::default()).await?.items;
    tracing::info!(meters = found.len(), action = ?meters, "releasing Meters before uninstall");
    if meters == Meters::Delete {
        for m in &found {
            let ns = m.namespace().unwrap_or_default();
            let res = Api::<Meter>::namespaced(client.clone(), &ns)
                .delete(&m.name_any(), &DeleteParams::default())
                .await;
            match res {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(e) => return Err(e.into()),
            }
        }
        // the operator cleans each up and drops its finalizer
        let deadline = Instant::now() + wait;
        loop {
            let left = api.list(&ListParams::default()).await?.items;
            if left.is_empty() {
                tracing::info!("every Meter cleaned up by the operator");
                return Ok(());
            }
            if Instant::now() >= deadline {
                tracing::warn!(
                    left = left.len(),
                    "the operator did not clean these Meters up in time; removing their finalizer (their readings stay in NATS)"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for m in api.list(&ListParams::default()).await?.items {
        release(&client, &m).await?;
    }
    Ok(())
}

/// Remove the operator's finalizer from one Meter. The patch carries the resourceVersion
/// read, so a finalizer someone added meanwhile is never dropped: a conflict (409) is
/// answered by reading the Meter again.
async fn release(client: &kube::Client, m: &Meter) -> anyhow::Result<()> {
    let ns = m.namespace().unwrap_or_default();
    let api = Api::<Meter>::namespaced(client.clone(), &ns);
    let mut m = m.clone();
    for _ in 0..5 {
        if !m.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(());
        }
        let rest: Vec<&String> = m.finalizers().iter().filter(|f| *f != FINALIZER).collect();
        let patch = serde_json::json!({"metadata": {
            "finalizers": rest,
            "resourceVersion": m.resource_version(),
        }});
        match api
            .patch(
                &m.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => {
                tracing::info!(meter = %format!("{ns}/{}", m.name_any()), "finalizer removed");
                return Ok(());
            }
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(kube::Error::Api(e)) if e.code == 409 => match api.get_opt(&m.name_any()).await? {
                Some(fresh) => m = fresh,
                None => return Ok(()),
            },
            Err(e) => return Err(e.into()),
        }
    }
    anyhow::bail!("Meter {ns}/{}: its finalizers kept changing", m.name_any())
}
