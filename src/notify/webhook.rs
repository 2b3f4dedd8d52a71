//! Webhook delivery: every notification on the notifications stream is POSTed to
//! WEBHOOK_URL as a CloudEvent (`application/cloudevents+json`, the stored bytes
//! unchanged), signed with `Kloudmeter-Signature: sha256=<hex HMAC-SHA256 of the body>`
//! when WEBHOOK_SECRET is set.
//!
//! At least once, through restarts: deliveries go through a durable JetStream consumer
//! (`webhook`) that every process pulls from, and a notification is acknowledged only
//! after a 2xx. A failed attempt is retried with exponential backoff (1 s, 2 s, 4 s …
//! at most 5 min apart) until WEBHOOK_RETRY_FOR has passed since the crossing, then it
//! is given up on and counted. Receivers deduplicate by the CloudEvent `id`, which is
//! the crossing's, so a redelivery never carries a new id.

use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::AckKind;
use futures::StreamExt;
use hmac::{Hmac, Mac};
use tokio::sync::watch;

use crate::metrics::NotifyMetrics;
use crate::nats::store::Store;

/// The durable consumer deliveries go through.
const CONSUMER: &str = "webhook";
/// One attempt may take this long (then it counts as failed).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How often the pending gauge is refreshed.
const PENDING_EVERY: Duration = Duration::from_secs(5);

/// Where and how notifications are delivered.
#[derive(Clone)]
pub struct Webhook {
    pub url: String,
    pub secret: Option<String>,
    pub retry_for: Duration,
}

/// The signature header's value for `body`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// Wait before attempt `attempt` (1-based) after a failure: 1 s, 2 s, 4 s … `MAX_BACKOFF`.
pub fn backoff(attempt: i64) -> Duration {
    let exp = attempt.clamp(1, 20) - 1;
    Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
}

/// Deliver until `shutdown`, restarting after any NATS failure.
pub async fn run(
    store: Store,
    hook: Webhook,
    metrics: NotifyMetrics,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = match reqwest::Client::builder().timeout(ATTEMPT_TIMEOUT).build() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "webhook client could not be built; no deliveries");
            return;
        }
    };
    loop {
        tokio::select! {
            r = deliver(&store, &client, &hook, &metrics) => {
                if let Err(e) = r {
                    tracing::warn!(error = format!("{e:#}"), "webhook deliveries interrupted; resuming");
                }
            }
            _ = shutdown.wait_for(|s| *s) => return,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn deliver(
    store: &Store,
    client: &reqwest::Client,
    hook: &Webhook,
    metrics: &NotifyMetrics,
) -> Result<()> {
    // first use: notifications from the last WEBHOOK_RETRY_FOR are still worth sending
    let since = chrono::Utc::now() - chrono::Duration::from_std(hook.retry_for)?;
    let consumer = super::durable_reader(
        store,
        CONSUMER,
        "KloudMeter threshold notifications to WEBHOOK_URL",
        since,
    )
    .await?;
    let mut messages = consumer.messages().await.context("pulling notifications")?;
    let mut gauge = tokio::time::interval(PENDING_EVERY);
    let mut consumer = consumer;
    loop {
        tokio::select! {
            next = messages.next() => {
                let Some(msg) = next else { anyhow::bail!("the notification consumer ended") };
                let msg = msg.context("pulling notifications")?;
                attempt(client, hook, metrics, &msg).await?;
            }
            _ = gauge.tick() => {
                if let Ok(info) = consumer.info().await {
                    let pending = info.num_pending + info.num_ack_pending as u64;
                    metrics.pending.set(i64::try_from(pending).unwrap_or(i64::MAX));
                }
            }
        }
    }
}

/// One attempt at one notification: acknowledged on a 2xx, retried later otherwise, given
/// up on once WEBHOOK_RETRY_FOR has passed since the crossing.
async fn attempt(
    client: &reqwest::Client,
    hook: &Webhook,
    metrics: &NotifyMetrics,
    msg: &async_nats::jetstream::Message,
) -> Result<()> {
    let attempt = msg.info().map(|i| i.delivered).unwrap_or(1);
    let mut request = client
        .post(&hook.url)
        .header("content-type", "application/cloudevents+json")
        .body(msg.payload.to_vec());
    if let Some(secret) = &hook.secret {
        request = request.header("kloudmeter-signature", signature(secret, &msg.payload));
    }
    let outcome = match request.send().await {
        Ok(r) if r.status().is_success() => Ok(()),
        Ok(r) => Err(format!("answered {}", r.status())),
        Err(e) => Err(format!("{e}")),
    };
    let ack = |kind| async move {
        msg.ack_with(kind)
            .await
            .map_err(|e| anyhow::anyhow!("acknowledging a notification: {e}"))
    };
    match outcome {
        Ok(()) => {
            ack(AckKind::Ack).await?;
            metrics.delivered.inc();
        }
        Err(why) if expired(&msg.payload, hook.retry_for) => {
            tracing::error!(
                error = why,
                attempts = attempt,
                "webhook delivery given up after WEBHOOK_RETRY_FOR"
            );
            ack(AckKind::Term).await?;
            metrics.failed.inc();
        }
        Err(why) => {
            let wait = backoff(attempt);
            tracing::warn!(error = why, attempt, retry_in = ?wait, "webhook delivery failed; retrying");
            ack(AckKind::Nak(Some(wait))).await?;
            metrics.retried.inc();
        }
    }
    Ok(())
}

/// Whether the notification's crossing (its CloudEvent `time`) is older than `retry_for`.
fn expired(payload: &[u8], retry_for: Duration) -> bool {
    #[derive(serde::Deserialize)]
    struct Stamp {
        time: chrono::DateTime<chrono::Utc>,
    }
    match serde_json::from_slice::<Stamp>(payload) {
        Ok(s) => (chrono::Utc::now() - s.time).to_std().unwrap_or_default() > retry_for,
        // not a notification of ours: nothing will ever accept it
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_are_hmac_sha256_in_hex() {
        // RFC 4231 test case 2
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_doubles_up_to_five_minutes() {
        let secs: Vec<u64> = [1, 2, 3, 4, 9, 10, 100]
            .iter()
            .map(|&a| backoff(a).as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 256, 300, 300]);
    }

    #[test]
    fn old_or_foreign_notifications_expire() {
        let now = chrono::Utc::now();
        let at = |t: chrono::DateTime<chrono::Utc>| {
            serde_json::to_vec(&serde_json::json!({"time": t})).unwrap()
        };
        let day = Duration::from_secs(86_400);
        assert!(!expired(&at(now), day));
        assert!(expired(&at(now - chrono::Duration::days(2)), day));
        assert!(expired(b"not json", day));
    }
}
