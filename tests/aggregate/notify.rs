//! Threshold notifications through the real pipeline: one CloudEvent per crossing on
//! `<stream>.notifications.<meter>`, recurring levels, late events crossing in their own
//! past months (last month's, and one three months back), nothing notified twice
//! through a `kill -9` of the leader; webhook deliveries.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::*;
use async_nats::jetstream::consumer;
use chrono::Datelike;
use futures::StreamExt;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// Every notification in the stream so far.
async fn notifications(js: &async_nats::jetstream::Context) -> Vec<Value> {
    let stream = js.get_stream("nt-notifications").await.unwrap();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut out = Vec::new();
    if consumer.cached_info().num_pending == 0 {
        return out;
    }
    let mut messages = consumer.messages().await.unwrap();
    while let Some(m) = messages.next().await {
        let m = m.unwrap();
        let left = m.info().unwrap().pending;
        let mut event: Value = serde_json::from_slice(&m.payload).unwrap();
        event["natsSubject"] = json!(m.subject.as_str());
        out.push(event);
        if left == 0 {
            break;
        }
    }
    out
}

/// (meter, subject, periodStart, threshold) of each notification, and whether every id
/// is distinct.
fn crossings(events: &[Value]) -> (BTreeSet<(String, String, String, String)>, bool) {
    let ids: BTreeSet<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let set = events
        .iter()
        .map(|e| {
            let d = &e["data"];
            (
                d["meter"].as_str().unwrap().to_string(),
                d["subject"].as_str().unwrap().to_string(),
                d["periodStart"].as_str().unwrap_or("all").to_string(),
                d["threshold"].as_str().unwrap().to_string(),
            )
        })
        .collect::<BTreeSet<_>>();
    (set, ids.len() == events.len())
}

#[tokio::test]
async fn each_crossing_notifies_once_through_a_leader_kill() {
    let nats = Nats::start();
    let js = nats.client().await;
    let mut km = Km::start(&nats, "nt", &[]).await;
    let meters = [
        json!({"id": "once", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v",
            "thresholds": [{"value": "100", "period": "MONTH"}]}),
        json!({"id": "every", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v",
            "thresholds": [{"value": "100", "period": "MONTH", "every": "100"}]}),
    ];
    for m in &meters {
        let (s, b) = post(&km.url("/api/v1/meters"), m).await;
        assert_eq!(s, 201, "{b}");
    }
    let now = chrono::Utc::now();
    let this_month = format!("{:04}-{:02}-01T00:00:00Z", now.year(), now.month());
    let last = now.date_naive().with_day(1).unwrap().pred_opt().unwrap();
    let last_month = format!("{:04}-{:02}-01T00:00:00Z", last.year(), last.month());
    let in_last_month = format!("{:04}-{:02}-15T12:00:00Z", last.year(), last.month());
    // three months back: older than the previous period the notifier looks at by itself
    let mut back = now.date_naive().with_day(1).unwrap();
    for _ in 0..3 {
        back = back.pred_opt().unwrap().with_day(1).unwrap();
    }
    let old_month = format!("{:04}-{:02}-01T00:00:00Z", back.year(), back.month());
    let in_old_month = format!("{:04}-{:02}-10T08:00:00Z", back.year(), back.month());
    let e = |id: &str, subject: &str, v: i64| json!({"id": id, "eventType": "use", "subject": subject, "data": {"v": v}});
    let batch = json!([
        e("1", "s1", 100),
        e("2", "s1", 50),
        e("3", "s2", 50),
        e("4", "s3", 350)
    ]);
    post_until_accepted(&km.url("/api/v1/events"), &batch, T).await;
    let row = |m: &str, s: &str, p: &str, t: &str| {
        (m.to_string(), s.to_string(), p.to_string(), t.to_string())
    };
    let mut want: BTreeSet<_> = [
        row("once", "s1", &this_month, "100"),
        row("once", "s3", &this_month, "100"),
        row("every", "s1", &this_month, "100"),
        row("every", "s3", &this_month, "100"),
        row("every", "s3", &this_month, "200"),
        row("every", "s3", &this_month, "300"),
    ]
    .into();
    wait_for("the first six crossings", T, || async {
        crossings(&notifications(&js).await).0 == want
    })
    .await;
    let first = notifications(&js).await;
    // a CloudEvent on the meter's subject, with the value that crossed
    let s3_300 = first
        .iter()
        .find(|n| n["data"]["threshold"] == json!("300"))
        .unwrap();
    assert_eq!(s3_300["type"], json!("io.kloudmeter.threshold.crossed"));
    assert_eq!(s3_300["specversion"], json!("1.0"));
    assert_eq!(s3_300["subject"], json!("s3"));
    assert_eq!(s3_300["data"]["value"], json!("350"));
    assert_eq!(s3_300["natsSubject"], json!("nt.notifications.every"));
    assert_eq!(km.metric("kloudmeter_notifications_fired_total").await, 6.0);

    // the leader dies: its successor notifies only what is new (s3 reaches 400), and a
    // late event crosses in its own month
    km.restart().await;
    let late = json!([e("5", "s3", 60), {"id": "6", "eventType": "use", "subject": "s4", "time": in_last_month, "data": {"v": 120}},
        {"id": "7", "eventType": "use", "subject": "s5", "time": in_old_month, "data": {"v": 150}}]);
    post_until_accepted(&km.url("/api/v1/events"), &late, T).await;
    want.insert(row("every", "s3", &this_month, "400"));
    want.insert(row("once", "s4", &last_month, "100"));
    want.insert(row("every", "s4", &last_month, "100"));
    want.insert(row("once", "s5", &old_month, "100"));
    want.insert(row("every", "s5", &old_month, "100"));
    wait_for("the new crossings", T, || async {
        crossings(&notifications(&js).await).0 == want
    })
    .await;
    // a second more of evaluations changes nothing
    tokio::time::sleep(Duration::from_secs(2)).await;
    let all = notifications(&js).await;
    let (got, distinct) = crossings(&all);
    assert_eq!(got, want);
    assert!(distinct, "an id notified twice");
    assert_eq!(all.len(), want.len(), "{all:#?}");
    let per_meter: BTreeMap<String, usize> = all.iter().fold(BTreeMap::new(), |mut m, n| {
        *m.entry(n["data"]["meter"].as_str().unwrap().to_string())
            .or_default() += 1;
        m
    });
    assert_eq!(
        per_meter,
        BTreeMap::from([("every".to_string(), 7), ("once".to_string(), 4)])
    );

    // the late event's mark was evaluated and cleared
    let state = js.get_key_value("nt-state").await.unwrap();
    wait_for("late marks cleared", T, || async {
        let mut keys = state.keys().await.unwrap();
        let mut left = 0;
        while let Some(k) = keys.next().await {
            left += usize::from(k.unwrap().starts_with("l."));
        }
        left == 0
    })
    .await;
    // a bad threshold is refused naming it
    let (s, b) = post(
        &km.url("/api/v1/meters"),
        &json!({"id": "bad", "eventType": "use", "aggregation": "count", "thresholds": [{"value": "1", "period": "MONTH", "every": "-5"}]}),
    )
    .await;
    assert_eq!(
        (s, b["message"].as_str()),
        (400, Some("thresholds[0].every: must be greater than zero"))
    );
}

/// What the test's webhook receiver saw: each request's arrival, signature header,
/// content type, body, and the status it answered.
#[derive(Clone, Debug)]
struct Delivery {
    at: std::time::Instant,
    signature: String,
    content_type: String,
    body: Value,
    raw: Vec<u8>,
    answered: u16,
}

#[derive(Clone, Default)]
struct Receiver {
    seen: std::sync::Arc<std::sync::Mutex<Vec<Delivery>>>,
    /// Answer 500 to this many more requests.
    fail_next: std::sync::Arc<std::sync::atomic::AtomicU32>,
    /// Answer 503 to everything while set.
    down: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Receiver {
    /// Serve on a free loopback port; the URL to post to.
    async fn start(&self) -> String {
        use axum::{body::Bytes, http::HeaderMap, routing::post, Router};
        use std::sync::atomic::Ordering;
        let me = self.clone();
        let app = Router::new().route(
            "/hook",
            post(move |headers: HeaderMap, body: Bytes| {
                let me = me.clone();
                async move {
                    let failing = me.down.load(Ordering::SeqCst)
                        || me
                            .fail_next
                            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                            .is_ok();
                    let answered = if me.down.load(Ordering::SeqCst) {
                        503
                    } else if failing {
                        500
                    } else {
                        200
                    };
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_string()
                    };
                    me.seen.lock().unwrap().push(Delivery {
                        at: std::time::Instant::now(),
                        signature: header("kloudmeter-signature"),
                        content_type: header("content-type"),
                        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
                        raw: body.to_vec(),
                        answered,
                    });
                    axum::http::StatusCode::from_u16(answered).unwrap()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        format!("http://127.0.0.1:{port}/hook")
    }

    fn seen(&self) -> Vec<Delivery> {
        self.seen.lock().unwrap().clone()
    }

    /// Ids answered 2xx.
    fn delivered(&self) -> BTreeSet<String> {
        self.seen()
            .iter()
            .filter(|d| d.answered == 200)
            .map(|d| d.body["id"].as_str().unwrap().to_string())
            .collect()
    }
}

#[tokio::test]
async fn webhooks_are_signed_retried_with_backoff_and_survive_a_kill() {
    use std::sync::atomic::Ordering;
    let receiver = Receiver::default();
    receiver.fail_next.store(2, Ordering::SeqCst);
    let url = receiver.start().await;
    let nats = Nats::start();
    let js = nats.client().await;
    let secret = "s3cret";
    let env = [("WEBHOOK_URL", url.as_str()), ("WEBHOOK_SECRET", secret)];
    let mut km = Km::start(&nats, "nt", &env).await;
    let (s, b) = post(
        &km.url("/api/v1/meters"),
        &json!({"id": "m", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v",
            "thresholds": [{"value": "100", "period": "MONTH"}]}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let e = |id: &str, subject: &str, v: i64| json!({"id": id, "eventType": "use", "subject": subject, "data": {"v": v}});
    post_until_accepted(
        &km.url("/api/v1/events"),
        &json!([e("1", "s1", 100), e("2", "s1", 50), e("3", "s2", 50)]),
        T,
    )
    .await;
    // s1 crosses: answered 500 twice, then delivered on the third attempt, 1 s and 2 s
    // apart (backoff); s2 at 50 never notifies
    wait_for("s1's crossing delivered", T, || async {
        receiver.delivered().len() == 1
    })
    .await;
    let first = receiver.seen();
    assert_eq!(
        first.iter().map(|d| d.answered).collect::<Vec<_>>(),
        [500, 500, 200],
        "{first:#?}"
    );
    let gaps: Vec<f64> = first
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_secs_f64())
        .collect();
    assert!(
        gaps[0] >= 0.9 && gaps[1] >= 1.9 && gaps[1] > gaps[0],
        "{gaps:?}"
    );
    let d = &first[2];
    assert!(first.iter().all(|x| x.body["id"] == d.body["id"]));
    assert_eq!(d.content_type, "application/cloudevents+json");
    assert_eq!(d.body["type"], json!("io.kloudmeter.threshold.crossed"));
    assert_eq!(d.body["subject"], json!("s1"));
    assert_eq!(
        (
            &d.body["data"]["meter"],
            &d.body["data"]["threshold"],
            &d.body["data"]["value"]
        ),
        (&json!("m"), &json!("100"), &json!("150"))
    );
    // the signature is the HMAC-SHA256 of the exact body with the secret
    {
        use hmac::Mac;
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(&d.raw);
        let want: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(d.signature, format!("sha256={want}"));
    }
    // the receiver goes down; s2 crosses; the process dies before it could deliver, and
    // a new one delivers it once the receiver is back, with the same id
    receiver.down.store(true, Ordering::SeqCst);
    post_until_accepted(&km.url("/api/v1/events"), &json!([e("4", "s2", 60)]), T).await;
    wait_for("an attempt at s2's crossing", T, || async {
        receiver
            .seen()
            .iter()
            .any(|d| d.body["subject"] == json!("s2"))
    })
    .await;
    km.kill9();
    receiver.down.store(false, Ordering::SeqCst);
    km.restart().await;
    wait_for("s2's crossing delivered after the kill", T, || async {
        receiver.delivered().len() == 2
    })
    .await;
    let attempted: BTreeSet<String> = receiver
        .seen()
        .iter()
        .map(|d| d.body["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        attempted,
        receiver.delivered(),
        "an id was never delivered, or a second id appeared"
    );
    // the NATS subject has the same two notifications, once each
    let published = notifications(&js).await;
    let ids: BTreeSet<String> = published
        .iter()
        .map(|n| n["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!((published.len(), ids), (2, receiver.delivered()));
    assert_eq!(
        km.metric("kloudmeter_notifications_delivered_total").await,
        1.0
    );
    wait_for("nothing pending", T, || async {
        km.metric("kloudmeter_notifications_pending").await == 0.0
    })
    .await;
}
