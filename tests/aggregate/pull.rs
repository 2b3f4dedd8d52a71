//! The aggregator's pull loop against a real nats-server: every message once and in
//! order across many requests, quiet (not failing) while the stream is idle, and an
//! error rather than a hang when its consumer is deleted.

use std::time::Duration;

use crate::common::*;
use async_nats::jetstream::{self, consumer, stream};
use kloudmeter::aggregate::pull::{delivery, Pull};

const EXPIRES: Duration = Duration::from_millis(500);

/// A client of `nats` and a stream `name` taking the subjects `name.>`.
async fn stream_on(nats: &Nats, name: &str) -> (jetstream::Context, jetstream::stream::Stream) {
    let client = async_nats::connect(nats.url()).await.unwrap();
    let js = jetstream::new(client);
    let events = js
        .create_stream(stream::Config {
            name: name.into(),
            subjects: vec![format!("{name}.>")],
            ..Default::default()
        })
        .await
        .unwrap();
    (js, events)
}

#[tokio::test]
async fn delivers_in_order_waits_when_idle_and_fails_when_the_consumer_goes() {
    let nats = Nats::start();
    let (js, events) = stream_on(&nats, "pull").await;
    let n = 12_345u64;
    let mut acks = Vec::new();
    for i in 0..n {
        acks.push(
            js.publish(format!("pull.{}", i % 7), i.to_string().into())
                .await
                .unwrap(),
        );
        // (the client holds back publishes while too many acks are unread)
        if acks.len() == 1000 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
    let consumer = events
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .unwrap();
    let name = consumer.cached_info().name.clone();
    // small requests, so that a run crosses hundreds of them
    let mut pull = Pull::start(js.clone(), "pull", &name, 40, EXPIRES)
        .await
        .unwrap();
    for i in 0..n {
        let m = pull.next().await.unwrap();
        let info = delivery(&m).unwrap();
        assert_eq!(info.stream_sequence, i + 1);
        assert_eq!(info.consumer_sequence, i + 1);
        assert_eq!(info.pending, n - i - 1);
        // the same as the client's own reading of the reply subject
        let js_info = async_nats::jetstream::Message {
            message: m.clone(),
            context: js.clone(),
        }
        .info()
        .unwrap()
        .published
        .unix_timestamp_nanos();
        assert_eq!(i128::from(info.published_ns), js_info);
        assert_eq!(m.payload, i.to_string().as_bytes());
    }

    // idle across several expiries: nothing arrives and nothing fails; a new message
    // is then delivered
    let idle = tokio::time::timeout(EXPIRES * 5, pull.next()).await;
    assert!(idle.is_err(), "nothing to deliver: {idle:?}");
    js.publish("pull.x", "last".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let m = tokio::time::timeout(Duration::from_secs(5), pull.next())
        .await
        .expect("delivered within a request's life")
        .unwrap();
    assert_eq!(delivery(&m).unwrap().stream_sequence, n + 1);

    // the consumer deleted: an error, within a few expiries, not a hang
    events.delete_consumer(&name).await.unwrap();
    let gone = tokio::time::timeout(EXPIRES * 8, pull.next())
        .await
        .expect("an answer, not a hang");
    assert!(gone.is_err(), "{:?}", gone.map(|m| m.subject));
}

/// A restarted nats-server forgets pending pull requests and, like the aggregator's,
/// this consumer (kept in memory): the loop asks again as soon as its connection is back
/// and so learns that at once, not after two expiries (60 s here).
#[tokio::test]
async fn asks_again_as_soon_as_the_connection_is_back() {
    let mut nats = Nats::start();
    let (js, events) = stream_on(&nats, "back").await;
    let consumer = events
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            memory_storage: true,
            inactive_threshold: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .unwrap();
    let name = consumer.cached_info().name.clone();
    let mut pull = Pull::start(js.clone(), "back", &name, 10, Duration::from_secs(30))
        .await
        .unwrap();
    js.publish("back.a", "1".into())
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(pull.next().await.unwrap().payload, "1".as_bytes());
    nats.restart();
    let answer = tokio::time::timeout(Duration::from_secs(15), pull.next())
        .await
        .expect("an answer well before two expiries");
    let error = answer.expect_err("the consumer did not survive the restart");
    assert!(error.to_string().contains("no responders"), "{error:#}");
}
