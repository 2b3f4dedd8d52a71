//! The aggregator's pull loop over its consumer: requests batches of messages and keeps
//! exact count of what the outstanding requests still owe.
//!
//! The NATS client's own pull stream notes that a request went out in another task, and
//! deliveries for the request can overtake that note: the stream then believes more
//! messages are owed than are, stops asking, and waits for the request to expire
//! (30 s by default, by which time the server has removed an idle consumer). Here the
//! count grows in the same task, right after the request is handed to the client and
//! before any delivery is read, so it cannot run ahead of the truth.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use async_nats::jetstream;
use async_nats::{Message, StatusCode, Subject};
use futures::StreamExt;

/// A server header on a terminated request: how many of its messages were not sent.
const PENDING_MESSAGES: &str = "Nats-Pending-Messages";
/// How often a wait for deliveries looks whether the connection was re-established.
const RECHECK: Duration = Duration::from_secs(1);

pub struct Pull {
    client: async_nats::Client,
    request_subject: Subject,
    inbox: Subject,
    deliveries: async_nats::Subscriber,
    batch: usize,
    expires: Duration,
    request: bytes::Bytes,
    /// Messages asked for and neither delivered nor released by the server.
    owed: usize,
    /// The connection's count of (re)connects when our requests were made: a new
    /// connection means the server holds none of them.
    connects: u64,
    statistics: std::sync::Arc<async_nats::Statistics>,
    /// Last time the server answered anything (or we asked).
    heard: tokio::time::Instant,
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
        let statistics = client.statistics();
        let connects = statistics.connects.load(Ordering::Relaxed);
        Ok(Pull {
            client,
            request_subject: Subject::from(format!(
                "$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"
            )),
            inbox,
            deliveries,
            batch,
            expires,
            request: request.into(),
            owed: 0,
            connects,
            statistics,
            heard: tokio::time::Instant::now(),
        })
    }

    /// The next message delivered (its place in the stream: [`delivery`]). Cancel-safe:
    /// a request is counted in the same step that hands it to the client (there is no
    /// await in between), and waiting for a delivery loses nothing when abandoned.
    pub async fn next(&mut self) -> Result<Message> {
        loop {
            // Reconnected (a restarted nats-server, or a dropped connection): the
            // server has forgotten our requests; ask again at once. If the consumer is
            // gone with the old server, the answer says so.
            let connects = self.statistics.connects.load(Ordering::Relaxed);
            if connects != self.connects {
                self.connects = connects;
                self.owed = 0;
            }
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
                self.heard = tokio::time::Instant::now();
            }
            let message = match tokio::time::timeout(RECHECK, self.deliveries.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => bail!("the aggregator's delivery subscription ended"),
                Err(_) => {
                    // Expired requests are answered, so silence for two expiries means
                    // the server no longer holds ours although the connection looks
                    // the same: ask again.
                    if self.heard.elapsed() >= self.expires * 2 {
                        self.owed = 0;
                    }
                    continue;
                }
            };
            self.heard = tokio::time::Instant::now();
            match message.status {
                None | Some(StatusCode::OK) => {
                    self.owed = self.owed.saturating_sub(1);
                    return Ok(message);
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

/// Where a delivered message sits, as its `$JS.ACK` reply subject says. Read here rather
/// than through the client's JetStream message, which carries a copy of the JetStream
/// context (a heap allocation and 224 bytes more per message of a batch).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub stream_sequence: u64,
    pub consumer_sequence: u64,
    /// Receipt time in the stream, nanoseconds since the epoch.
    pub published_ns: i64,
    /// Messages left for the consumer after this one.
    pub pending: u64,
}

pub fn delivery(msg: &Message) -> Result<Delivery> {
    let reply = msg
        .reply
        .as_ref()
        .ok_or_else(|| anyhow!("a delivery on {} without a reply subject", msg.subject))?;
    parse_delivery(reply.as_str()).ok_or_else(|| anyhow!("unreadable delivery subject {reply:?}"))
}

/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<time>.<pending>`,
/// or the newer form with a domain and an account hash before the stream name and more
/// tokens after `pending` (NATS ADR-15).
pub fn parse_delivery(reply: &str) -> Option<Delivery> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    let mut tokens = [""; 9];
    let mut count = 0;
    for t in rest.split('.') {
        if let Some(slot) = tokens.get_mut(count) {
            *slot = t;
        }
        count += 1;
    }
    let fields = match count {
        7 => &tokens[2..7],
        n if n >= 9 => &tokens[4..9],
        _ => return None,
    };
    Some(Delivery {
        stream_sequence: fields[1].parse().ok()?,
        consumer_sequence: fields[2].parse().ok()?,
        published_ns: fields[3].parse().ok()?,
        pending: fields[4].parse().ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_reply_subject_forms() {
        let want = Delivery {
            stream_sequence: 42,
            consumer_sequence: 7,
            published_ns: 1_764_000_000_123_456_789,
            pending: 3,
        };
        assert_eq!(
            parse_delivery("$JS.ACK.KM.agg.1.42.7.1764000000123456789.3"),
            Some(want)
        );
        assert_eq!(
            parse_delivery("$JS.ACK._.ACCHASH.KM.agg.2.42.7.1764000000123456789.3.r4nd0m"),
            Some(want)
        );
        assert_eq!(
            parse_delivery("$JS.ACK.hub.ACCHASH.KM.agg.2.42.7.1764000000123456789.3.r4nd0m.x"),
            Some(want)
        );
        for bad in [
            "",
            "$JS.ACK.KM.agg.1.42.7.1764000000123456789",
            "$JS.ACK.KM.agg.1.42.7.1764000000123456789.3.x",
            "$JS.ACK.KM.agg.1.forty.7.1764000000123456789.3",
            "$JS.ACK.KM.agg.1.42.7.-1.3.4.5",
            "_INBOX.KM.agg.1.42.7.1764000000123456789.3",
        ] {
            assert_eq!(parse_delivery(bad), None, "{bad}");
        }
    }
}
