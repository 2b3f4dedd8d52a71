//! Leadership through a coordination.k8s.io Lease (visible with `kubectl get lease`),
//! used instead of the NATS lease when KloudMeter runs as an operator: one election
//! decides who reconciles Meters and who aggregates.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use kube::Client;
use tokio::sync::watch;

pub struct KubeLease {
    pub api: Api<Lease>,
    pub name: String,
    pub holder: String,
    pub ttl: Duration,
}

impl KubeLease {
    pub fn new(client: Client, namespace: &str, name: &str, holder: String, ttl: Duration) -> Self {
        KubeLease {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            holder,
            ttl,
        }
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.holder.clone()),
            lease_duration_seconds: Some(self.ttl.as_secs().max(1) as i32),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// One round: acquire, renew or observe. `Ok(true)` while we hold the lease.
    async fn round(&self) -> Result<bool, kube::Error> {
        let current = match self.api.get_opt(&self.name).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(0, None)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let ours = spec.holder_identity.as_deref() == Some(self.holder.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(t)), Some(d)) => {
                *t + SignedDuration::from_secs(i64::from(d)) < Timestamp::now()
            }
            _ => true,
        };
        let free = spec.holder_identity.as_deref().is_none_or(str::is_empty);
        if !(ours || expired || free) {
            return Ok(false);
        }
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!ours);
        let acquired = if ours {
            spec.acquire_time.clone()
        } else {
            None
        };
        let mut next = current.clone();
        next.spec = Some(self.spec(transitions, acquired));
        // replace carries the resourceVersion we read: a racing candidate gets a 409
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn run(&self, leading: watch::Sender<bool>, mut shutdown: watch::Receiver<bool>) {
        let mut held = false;
        loop {
            let now_held = match self.round().await {
                Ok(h) => h,
                Err(e) => {
                    tracing::warn!(error = %e, "lease round failed");
                    false
                }
            };
            if now_held != held {
                tracing::info!(holder = %self.holder, lease = %self.name, leading = now_held, "leadership changed");
            }
            held = now_held;
            leading.send_if_modified(|l| std::mem::replace(l, held) != held);
            let wait = if held {
                self.ttl / 3
            } else {
                (self.ttl / 5).max(Duration::from_millis(200))
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        leading.send_replace(false);
        if held {
            // Release: an expired renew time lets a standby take over at once.
            if let Ok(Some(mut l)) = self.api.get_opt(&self.name).await {
                if let Some(spec) = l.spec.as_mut() {
                    if spec.holder_identity.as_deref() == Some(self.holder.as_str()) {
                        spec.holder_identity = None;
                        let _ = self
                            .api
                            .replace(&self.name, &PostParams::default(), &l)
                            .await;
                    }
                }
            }
        }
    }
}
