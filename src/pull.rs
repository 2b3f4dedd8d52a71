//! The aggregator's pull loop over its consumer: requests batches of messages and keeps
//! exact count of what the outstanding requests still owe.
//!
//! The NATS client's own pull stream notes that a request went out in another task, and
//! deliveries for the request can overtake that note: the stream then believes more
//! messages are owed than are, stops asking, and waits for the request to expire
//! (30 s by default, by which time the server has removed an idle consumer). Here the
//! count grows in the same task, right after the request is handed to the client and
//! before any delivery is read, so it cannot run ahead of the truth.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream;
use async_nats::{StatusCode, Subject};
use futures::StreamExt;

/// A server header on a terminated request: how many of its messages were not sent.
const PENDING_MESSAGES: &str = "Nats-Pending-Messages";

pub struct Pull {
    client: async_nats::Client,
    context: jetstream::Context,
    request_subject: Subject,
    inbox: Subject,
    deliveries: async_nats::Subscriber,
    batch: usize,
    expires: Duration,
    request: bytes::Bytes,
    /// Messages asked for and neither delivered nor released by the server.
    owed: usize,
}

impl Pull {
    /// Pull from `consumer` of `stream`, `batch` messages a request; requests expire
    /// after `expires` when the stream has nothing more to give.
    pub async fn start(
        context: jetstream::Context,
        stream: &str,
        consumer: &str,
        batch: usize,
        expires: Duration,
    ) -> Result<Pull> {
        let client = context.client();
        let inbox = Subject::from(client.new_inbox());
        let deliveries = client
            .subscribe(inbox.clone())
            .await
            .context("subscribing to the aggregator's deliveries")?;
        let expires_ns = u64::try_from(expires.as_nanos()).unwrap_or(u64::MAX);
        let request = serde_json::to_vec(&serde_json::json!({
            "batch": batch,
            "expires": expires_ns,
        }))?;
        Ok(Pull {
            client,
            context,
            request_subject: Subject::from(format!(
                "$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
            )),
            inbox,
            deliveries,
            batch,
            expires,
            request: request.into(),
            owed: 0,
        })
    }

    /// The next message delivered. Cancel-safe: a request is counted in the same step
    /// that hands it to the client (there is no await in between), and waiting for a
    /// delivery loses nothing when abandoned.
    pub async fn next(&mut self) -> Result<jetstream::Message> {
        loop {
            // at most two requests' worth outstanding: the next is asked for while
            // the current is still being delivered
            if self.owed < self.batch {
                self.client
                    .publish_with_reply(
                        self.request_subject.clone(),
                        self.inbox.clone(),
                        self.request.clone(),
                    )
                    .await
                    .context("asking the aggregator's consumer for messages")?;
                self.owed += self.batch;
            }
            // Expired requests are answered, so silence for two expiries means the
            // server no longer holds ours (it restarted, or the connection was
            // re-established): ask again; if the consumer is gone, that says so.
            let message = match tokio::time::timeout(self.expires * 2, self.deliveries.next()).await
            {
                Ok(Some(message)) => message,
                Ok(None) => bail!("the aggregator's delivery subscription ended"),
                Err(_) => {
                    self.owed = 0;
                    continue;
                }
            };
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.owed = self.owed.saturating_sub(1);
                    return Ok(jetstream::Message {
                        message,
                        context: self.context.clone(),
                    });
                }
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED) => {
                    // A request ended (expired, or the server cut it short): it owes no
                    // more than the server says it did not send.
                    let unsent = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(PENDING_MESSAGES))
                        .and_then(|v| v.as_str().parse::<usize>().ok());
                    match unsent {
                        Some(n) => self.owed = self.owed.saturating_sub(n),
                        None => bail!(
                            "the aggregator's consumer ended a pull request: {}",
                            message.description.as_deref().unwrap_or("no reason given")
                        ),
                    }
                }
                Some(StatusCode::NO_RESPONDERS) => {
                    return Err(anyhow!("the aggregator's consumer is gone (no responders)"))
                }
                Some(status) => bail!(
                    "the aggregator's consumer answered {status}: {}",
                    message.description.as_deref().unwrap_or("")
                ),
            }
        }
    }
}
