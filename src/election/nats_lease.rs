//! A lease in a NATS KV bucket whose entries expire after LEADER_TTL (one per
//! partition: `key`). The holder renews it well inside the TTL; when it dies, the entry expires
//! and a standby's `create` succeeds. A leader that cannot renew steps down at once.

use std::time::Duration;

use tokio::sync::watch;

use crate::nats::store::Store;

pub struct Election {
    pub key: String,
    pub holder: String,
    pub ttl: Duration,
}

impl Election {
    /// Campaign until `shutdown` fires, publishing whether we lead on `leading`.
    /// On shutdown a leader releases the lease so a standby takes over immediately.
    pub async fn run(
        &self,
        store: Store,
        leading: watch::Sender<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut revision: Option<u64> = None;
        let renew_every = self.ttl / 3;
        let retry_every = (self.ttl / 5).max(Duration::from_millis(200));
        loop {
            let outcome = match revision {
                None => store
                    .leader
                    .create(&self.key, self.holder.clone().into())
                    .await
                    .ok(),
                Some(rev) => store
                    .leader
                    .update(&self.key, self.holder.clone().into(), rev)
                    .await
                    .ok(),
            };
            match (revision, outcome) {
                (None, Some(_)) => {
                    tracing::info!(holder = %self.holder, lease = %self.key, "lease acquired")
                }
                (Some(_), None) => {
                    tracing::warn!(holder = %self.holder, lease = %self.key, "lease lost")
                }
                _ => {}
            }
            revision = outcome;
            leading.send_if_modified(|l| {
                let changed = *l != revision.is_some();
                *l = revision.is_some();
                changed
            });
            let wait = if revision.is_some() {
                renew_every
            } else {
                retry_every
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        leading.send_replace(false);
        if let Some(rev) = revision {
            // Releasing is an optimisation: if it fails the lease simply expires.
            let _ = store
                .leader
                .delete_expect_revision(&self.key, Some(rev))
                .await;
            tracing::info!(holder = %self.holder, lease = %self.key, "lease released");
        }
    }
}
