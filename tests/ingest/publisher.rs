//! The ingest publisher against a real nats-server: every message of concurrent requests
//! stored and each request answered once, refusals reported with JetStream's reason, and
//! nothing left waiting once a request is answered or given up.

use std::time::Duration;

use crate::common::*;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use kloudmeter::ingest::publisher::Publisher;

/// A nats-server with one stream (`max_messages`: 0 for no limit, else new messages are
/// refused past it) and a publisher on a connection of its own.
async fn setup(name: &str, max_messages: i64) -> (Nats, Publisher, jetstream::stream::Stream) {
    let nats = Nats::start();
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client.clone());
    let stream = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{name}.>")],
            max_messages: if max_messages > 0 { max_messages } else { -1 },
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .unwrap();
    let publisher = Publisher::start(client).await.unwrap();
    (nats, publisher, stream)
}

async fn send_all(p: &Publisher, subject: &str, n: usize) -> Result<(), String> {
    let mut batch = p.batch(n);
    for i in 0..n {
        batch
            .send(subject.into(), HeaderMap::new(), i.to_string().into())
            .await?;
    }
    batch.acknowledged().await
}

#[tokio::test]
async fn concurrent_requests_are_all_stored_and_answered() {
    let (_nats, p, mut stream) = setup("pub", 0).await;
    // 20 requests of 1,000 at once
    let results = futures::future::join_all((0..20).map(|r| {
        let p = p.clone();
        async move { send_all(&p, &format!("pub.{r}"), 1_000).await }
    }))
    .await;
    assert_eq!(results, vec![Ok(()); 20]);
    // and one of 20,000
    send_all(&p, "pub.big", 20_000).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 40_000);
    assert_eq!(p.waiting(), 0);
}

#[tokio::test]
async fn refusals_name_the_reason() {
    let (_nats, p, mut stream) = setup("small", 5).await;
    let full = send_all(&p, "small.x", 8).await.unwrap_err();
    assert!(
        full.starts_with("JetStream refused the event: maximum messages"),
        "{full}"
    );
    assert_eq!(stream.info().await.unwrap().state.messages, 5);
    // no stream at all: the server says so at once (no waiting for a timeout)
    let started = std::time::Instant::now();
    let none = send_all(&p, "nowhere.x", 3).await.unwrap_err();
    assert_eq!(none, "no JetStream stream takes the event's subject");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(p.waiting(), 0);
}

#[tokio::test]
async fn short_and_abandoned_requests_leave_nothing_waiting() {
    let (_nats, p, mut stream) = setup("pub", 0).await;
    // announced 10, sent 4: answered after the 4
    let mut short = p.batch(10);
    for i in 0..4 {
        short
            .send("pub.short".into(), HeaderMap::new(), i.to_string().into())
            .await
            .unwrap();
    }
    short.acknowledged().await.unwrap();
    // an empty request is answered at once
    let empty = tokio::time::timeout(Duration::from_secs(1), p.batch(0).acknowledged()).await;
    assert_eq!(empty, Ok(Ok(())));
    // a message past the announced count is refused before it is published
    let mut over = p.batch(1);
    over.send("pub.over".into(), HeaderMap::new(), "a".into())
        .await
        .unwrap();
    let refused = over
        .send("pub.over".into(), HeaderMap::new(), "b".into())
        .await
        .unwrap_err();
    assert_eq!(refused, "more messages than the batch was started for");
    over.acknowledged().await.unwrap();
    // abandoned before all its acknowledgements are in: its entry goes with it
    let mut abandoned = p.batch(100);
    for i in 0..50 {
        abandoned
            .send("pub.gone".into(), HeaderMap::new(), i.to_string().into())
            .await
            .unwrap();
    }
    assert_eq!(p.waiting(), 1);
    drop(abandoned);
    assert_eq!(p.waiting(), 0);
    // ...and its late acknowledgements disturb nothing
    send_all(&p, "pub.after", 10).await.unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 4 + 1 + 50 + 10);
    assert_eq!(p.waiting(), 0);
}
