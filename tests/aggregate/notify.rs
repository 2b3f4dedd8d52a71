//! Threshold notifications through the real pipeline: one CloudEvent per crossing on
//! `<stream>.notifications.<meter>`, recurring levels, a late event crossing in its own
//! past month, and nothing notified twice through a `kill -9` of the leader.

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
    let late = json!([e("5", "s3", 60), {"id": "6", "eventType": "use", "subject": "s4", "time": in_last_month, "data": {"v": 120}}]);
    post_until_accepted(&km.url("/api/v1/events"), &late, T).await;
    want.insert(row("every", "s3", &this_month, "400"));
    want.insert(row("once", "s4", &last_month, "100"));
    want.insert(row("every", "s4", &last_month, "100"));
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
        BTreeMap::from([("every".to_string(), 6), ("once".to_string(), 3)])
    );

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
