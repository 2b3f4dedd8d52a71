//! Publishing a request's events to JetStream and waiting for all their acknowledgements.
//!
//! JetStream acknowledges a message by replying to the reply subject it was published
//! with. The NATS client's JetStream publish gives each message an inbox of its own, a
//! one-shot channel, a timer and a parse into an owned acknowledgement: a fifth of
//! kloudmeter's CPU under batch ingestion. Here all messages of a request share one reply
//! subject, a single task reads every acknowledgement from one subscription and counts
//! them down per request, and the request wakes once, when the last one is in. How many
//! events may be in flight is the caller's to bound (the API answers 503 past
//! MAX_INFLIGHT_EVENTS).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::{Client, HeaderMap, Message, Subject};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::oneshot;

#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    /// `<inbox>.` — a request's reply subject is this and its number.
    prefix: String,
    next: AtomicU64,
    waiting: Arc<Mutex<HashMap<u64, Waiter>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

struct Waiter {
    left: usize,
    failure: Option<String>,
    done: oneshot::Sender<Result<(), String>>,
}

impl Publisher {
    /// Subscribe to this publisher's inbox on `client` and start reading acknowledgements.
    pub async fn start(client: Client) -> anyhow::Result<Publisher> {
        let inbox = client.new_inbox();
        let subscription = client.subscribe(format!("{inbox}.*")).await?;
        let waiting: Arc<Mutex<HashMap<u64, Waiter>>> = Arc::default();
        let reader = tokio::spawn(read_acks(subscription, waiting.clone()));
        Ok(Publisher {
            inner: Arc::new(Inner {
                client,
                prefix: format!("{inbox}."),
                next: AtomicU64::new(0),
                waiting,
                reader,
            }),
        })
    }

    /// Start a request of `count` messages.
    pub fn batch(&self, count: usize) -> Batch {
        let inner = &self.inner;
        let id = inner.next.fetch_add(1, Ordering::Relaxed);
        let (done, answer) = oneshot::channel();
        // registered before the first publish, so no acknowledgement can come first
        inner.lock().insert(
            id,
            Waiter {
                left: count,
                failure: None,
                done,
            },
        );
        Batch {
            inner: inner.clone(),
            id,
            reply: Subject::from(format!("{}{id}", inner.prefix)),
            expected: count,
            sent: 0,
            answer: Some(answer),
        }
    }

    /// Requests still waiting for acknowledgements (tests).
    pub fn waiting(&self) -> usize {
        self.inner.lock().len()
    }

    /// Whether the connection events go out on is up.
    pub fn connected(&self) -> bool {
        self.inner.client.connection_state() == async_nats::connection::State::Connected
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
        lock(&self.waiting)
    }
}

fn lock(waiting: &Mutex<HashMap<u64, Waiter>>) -> std::sync::MutexGuard<'_, HashMap<u64, Waiter>> {
    // (nothing panics while holding it; a poisoned map is still consistent)
    waiting.lock().unwrap_or_else(|e| e.into_inner())
}

/// One request's messages. Dropped before its acknowledgements are in (the client went
/// away, a timeout), it stops waiting for them.
pub struct Batch {
    inner: Arc<Inner>,
    id: u64,
    reply: Subject,
    expected: usize,
    sent: usize,
    answer: Option<oneshot::Receiver<Result<(), String>>>,
}

impl Batch {
    pub async fn send(
        &mut self,
        subject: Subject,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), String> {
        if self.sent == self.expected {
            return Err("more messages than the batch was started for".into());
        }
        self.inner
            .client
            .publish_with_reply_and_headers(subject, self.reply.clone(), headers, payload)
            .await
            .map_err(|e| format!("publishing to JetStream: {e}"))?;
        self.sent += 1;
        Ok(())
    }

    /// Wait until JetStream has acknowledged every message sent; the first refusal, if
    /// any, is the error.
    pub async fn acknowledged(mut self) -> Result<(), String> {
        if self.sent < self.expected || self.expected == 0 {
            // fewer sent than announced (or none at all): stop waiting for the rest
            count_down(
                &self.inner.waiting,
                self.id,
                self.expected - self.sent,
                None,
            );
        }
        let answer = self.answer.as_mut().expect("awaited once").await;
        // answered: the entry is gone already
        self.answer = None;
        answer
            .unwrap_or_else(|_| Err("the NATS connection closed before JetStream answered".into()))
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        if self.answer.is_some() {
            self.inner.lock().remove(&self.id);
        }
    }
}

/// `n` of request `id`'s messages are settled (`failure`: why one was refused); the last
/// one answers the request. An unknown id is a request that stopped waiting.
fn count_down(waiting: &Mutex<HashMap<u64, Waiter>>, id: u64, n: usize, failure: Option<String>) {
    let mut map = lock(waiting);
    let Some(w) = map.get_mut(&id) else {
        return;
    };
    if let Some(e) = failure {
        w.failure.get_or_insert(e);
    }
    w.left = w.left.saturating_sub(n);
    if w.left == 0 {
        let w = map.remove(&id).expect("present");
        drop(map);
        let _ = w.done.send(w.failure.map_or(Ok(()), Err));
    }
}

async fn read_acks(
    mut subscription: async_nats::Subscriber,
    waiting: Arc<Mutex<HashMap<u64, Waiter>>>,
) {
    while let Some(msg) = subscription.next().await {
        let Some(id) = msg
            .subject
            .as_str()
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u64>().ok())
        else {
            continue;
        };
        count_down(&waiting, id, 1, acknowledgement(&msg).err());
    }
}

/// What a reply says: stored, or why not.
fn acknowledgement(msg: &Message) -> Result<(), String> {
    if let Some(status) = msg.status {
        if status == async_nats::StatusCode::NO_RESPONDERS {
            return Err("no JetStream stream takes the event's subject".into());
        }
        if !status.is_success() {
            return Err(format!(
                "JetStream answered {status}{}",
                msg.description
                    .as_deref()
                    .map(|d| format!(" ({d})"))
                    .unwrap_or_default()
            ));
        }
    }
    #[derive(Deserialize)]
    struct Ack<'a> {
        seq: Option<u64>,
        #[serde(borrow)]
        error: Option<ApiError<'a>>,
    }
    #[derive(Deserialize)]
    struct ApiError<'a> {
        #[serde(default)]
        code: u16,
        #[serde(borrow, default)]
        description: std::borrow::Cow<'a, str>,
    }
    match serde_json::from_slice::<Ack>(&msg.payload) {
        Ok(Ack { error: Some(e), .. }) => Err(format!(
            "JetStream refused the event: {} (code {})",
            e.description, e.code
        )),
        Ok(Ack { seq: Some(_), .. }) => Ok(()),
        _ => Err(format!(
            "unreadable JetStream acknowledgement: {}",
            String::from_utf8_lossy(&msg.payload)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(payload: &str, status: Option<async_nats::StatusCode>) -> Message {
        Message {
            subject: "_INBOX.x.1".into(),
            reply: None,
            payload: Bytes::from(payload.to_string()),
            headers: None,
            status,
            description: None,
            length: payload.len(),
        }
    }

    #[test]
    fn reads_acknowledgements() {
        assert_eq!(
            acknowledgement(&reply(r#"{"stream":"KM","seq":7}"#, None)),
            Ok(())
        );
        assert_eq!(
            acknowledgement(&reply(
                r#"{"stream":"KM","domain":"d","seq":7,"duplicate":true}"#,
                None
            )),
            Ok(())
        );
        assert_eq!(
            acknowledgement(&reply(
                r#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
                None
            )),
            Err("JetStream refused the event: maximum messages exceeded (code 503)".into())
        );
        assert_eq!(
            acknowledgement(&reply("", Some(async_nats::StatusCode::NO_RESPONDERS))),
            Err("no JetStream stream takes the event's subject".into())
        );
        assert_eq!(
            acknowledgement(&reply("{}", None)),
            Err("unreadable JetStream acknowledgement: {}".into())
        );
        assert_eq!(
            acknowledgement(&reply("nope", None)),
            Err("unreadable JetStream acknowledgement: nope".into())
        );
    }
}
