//! The core pipeline against a real nats-server and the real kloudmeter binary.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

async fn create_meter(km: &Km, def: Value) {
    let (status, body) = post(&km.url("/api/create-meter"), &def).await;
    assert_eq!((status, body), (202, json!({"status": "ok"})));
    let id = def["id"].as_str().unwrap().to_string();
    wait_for(&format!("meter {id} ready"), T, || async {
        let (s, b) = get(&km.url(&format!("/api/reading/?key={id}"))).await;
        s == 200 && b["ready"] == json!(true)
    })
    .await;
}

fn event(id: &str, subject: &str, time: &str, data: Value) -> Value {
    json!({"id": id, "eventType": "api.request", "subject": subject, "time": time, "data": data})
}

async fn post_events(km: &Km, events: &[Value]) {
    let (status, body) = post(&km.url("/api/v1/events"), &Value::Array(events.to_vec())).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body, json!({"accepted": events.len()}));
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The seed README's flow, with curl, as its users run it.
#[tokio::test]
async fn seed_readme_curl_flow() {
    let nats = Nats::start();
    let km = Km::start(&nats, "meters", &[]).await;
    let base = km.url("");
    let curl = |args: &[&str]| {
        let out = std::process::Command::new("curl")
            .arg("-s")
            .args(args)
            .output()
            .expect("curl");
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&out.stdout).into()))
    };
    let created = curl(&[
        "-X",
        "POST",
        &format!("{base}/api/create-meter"),
        "-H",
        "Content-Type: application/json",
        "-d",
        r#"{"id": "unique_meter_id", "description": "description_of_meter", "eventType": "type_of_event", "aggregation": "sum", "valueProperty": "$.key1", "groupBy": {"groupKey": "$.key2"}}"#,
    ]);
    assert_eq!(created, json!({"status": "ok"}));
    for id in ["unique_event_id", "unique_event_id", "second_event_id"] {
        let body = format!(
            r#"{{"id": "{id}", "time": "2026-11-24T10:00:00Z", "eventType": "type_of_event", "subject": "subject_of_event", "data": {{"key1": "1.5", "key2": "value2"}}}}"#
        );
        let r = curl(&[
            "-X",
            "POST",
            &format!("{base}/api/register-event"),
            "-H",
            "Content-Type: application/json",
            "-d",
            &body,
        ]);
        assert_eq!(r, json!({"status": "ok"}));
    }
    let meters = curl(&[&format!("{base}/api/meters")]);
    assert_eq!(
        meters,
        json!([{"id": "unique_meter_id", "description": "description_of_meter", "eventType": "type_of_event",
        "aggregation": "sum", "valueProperty": "$.key1", "groupBy": {"groupKey": "$.key2"}, "windowSize": "HOUR"}])
    );
    let meter = curl(&[&format!("{base}/api/meter/?key=unique_meter_id")]);
    assert_eq!(meter, meters[0]);
    caught_up(&nats.client().await, "meters", T).await;
    // (a meter defined before the aggregator started is built beside it)
    wait_for("the meter built", T, || async {
        meter_reading(&km, "unique_meter_id").await["ready"] == json!(true)
    })
    .await;
    let readings = curl(&[&format!("{base}/api/readings")]);
    assert_eq!(
        readings,
        json!([{"meter": "unique_meter_id", "aggregation": "sum", "value": "3", "events": 2, "invalidEvents": 0,
        "subjects": 1, "lastEventTime": "2026-11-24T10:00:00Z", "ready": true},
        {"key": "type_of_event.sum.unique_meter_id.subject_of_event", "meterId": "unique_meter_id",
        "subject": "subject_of_event", "value": "3", "count": 2, "lastEventTime": "2026-11-24T10:00:00Z"},
        // the meter groups by groupKey: the subject's one group follows it
        {"meterId": "unique_meter_id", "subject": "subject_of_event", "groupBy": {"groupKey": "value2"},
        "value": "3", "count": 2, "lastEventTime": "2026-11-24T10:00:00Z"}])
    );
    // the original's reading key answers that subject's reading
    let by_key = curl(&[&format!(
        "{base}/api/reading/?key=type_of_event.sum.unique_meter_id.subject_of_event"
    )]);
    assert_eq!(by_key, readings[1]);
    let reading = curl(&[&format!("{base}/api/reading/?key=unique_meter_id")]);
    assert_eq!(reading["value"], json!("3"));
    assert_eq!(
        reading["bySubject"],
        json!([{"meter": "unique_meter_id", "subject": "subject_of_event", "value": "3", "events": 2,
        "lastEventTime": "2026-11-24T10:00:00Z"}])
    );
    assert_eq!(
        curl(&[
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("{base}/healthy")
        ]),
        json!(200)
    );
}

/// Every aggregation, with and without groupBy, through ingestion, the stream and KV.
#[tokio::test]
async fn every_aggregation_end_to_end() {
    let nats = Nats::start();
    let km = Km::start(&nats, "aggs", &[]).await;
    for agg in [
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "unique_count",
        "latest",
    ] {
        let vp = if agg == "unique_count" {
            "$.user"
        } else {
            "$.tokens"
        };
        create_meter(&km, json!({"id": agg, "eventType": "api.request", "aggregation": agg.to_uppercase(), "valueProperty": vp})).await;
        create_meter(
            &km,
            json!({"id": format!("{agg}-by-model"), "eventType": "api.request", "aggregation": agg,
            "valueProperty": vp, "groupBy": {"model": "$.model"}}),
        )
        .await;
    }
    let events = vec![
        event(
            "1",
            "c1",
            "2026-11-24T10:05:00Z",
            json!({"tokens": 10, "user": "ann", "model": "a"}),
        ),
        event(
            "2",
            "c1",
            "2026-11-24T12:00:00Z",
            json!({"tokens": "0.5", "user": "bob", "model": "b"}),
        ),
        event(
            "3",
            "c1",
            "2026-11-24T11:00:00Z",
            json!({"tokens": 4, "user": "ann", "model": "a"}),
        ),
        event(
            "4",
            "c2",
            "2026-11-24T10:00:00Z",
            json!({"tokens": 1, "user": "cy"}),
        ),
        event(
            "5",
            "c2",
            "2026-11-24T10:30:00Z",
            json!({"tokens": 2, "user": "cy", "model": "b"}),
        ),
    ];
    post_events(&km, &events).await;
    caught_up(&nats.client().await, "aggs", T).await;
    let expected = [
        ("count", ("3", "2", "5")),
        ("sum", ("14.5", "3", "17.5")),
        ("avg", ("4.8333333333333333333333333333", "1.5", "3.5")),
        ("min", ("0.5", "1", "0.5")),
        ("max", ("10", "2", "10")),
        ("unique_count", ("2", "1", "3")),
        // c1's latest event by time is 12:00 (0.5), although it arrived second
        ("latest", ("0.5", "2", "0.5")),
    ];
    for (agg, (c1, c2, all)) in expected {
        for id in [agg.to_string(), format!("{agg}-by-model")] {
            assert_eq!(
                subject_values(&km, &id).await,
                map(&[("c1", c1), ("c2", c2)]),
                "{id}"
            );
            let r = meter_reading(&km, &id).await;
            assert_eq!(
                (
                    r["value"].as_str(),
                    r["events"].as_u64(),
                    r["subjects"].as_u64()
                ),
                (Some(all), Some(5), Some(2)),
                "{id}"
            );
        }
    }
    // windows: the grouped sum meter's KV readings per (subject, model, hour)
    let js = nats.client().await;
    let kv = js.get_key_value("aggs-readings").await.unwrap();
    let mut windows = BTreeMap::new();
    let mut keys = kv.keys().await.unwrap();
    use futures::StreamExt;
    while let Some(k) = keys.next().await {
        let k = k.unwrap();
        let base_window = k
            .rsplit('.')
            .next()
            .is_some_and(|t| t.parse::<i64>().is_ok());
        if k.starts_with("r.sum-by-model.") && k.split('.').count() == 5 && base_window {
            let r: Value = serde_json::from_slice(&kv.get(&k).await.unwrap().unwrap()).unwrap();
            let start: i64 = k.rsplit('.').next().unwrap().parse().unwrap();
            let hour = chrono::DateTime::from_timestamp(start, 0)
                .unwrap()
                .format("%H")
                .to_string();
            let subject = k.split('.').nth(2).unwrap().to_string();
            windows.insert(
                (subject, r["groupBy"]["model"].to_string(), hour),
                r["acc"]["sum"].as_str().unwrap().to_string(),
            );
        }
    }
    let want: BTreeMap<(String, String, String), String> = [
        (("c1", json!("a"), "10"), "10"),
        (("c1", json!("a"), "11"), "4"),
        (("c1", json!("b"), "12"), "0.5"),
        (("c2", Value::Null, "10"), "1"),
        (("c2", json!("b"), "10"), "2"),
    ]
    .into_iter()
    .map(|((s, m, h), v)| ((s.to_string(), m.to_string(), h.to_string()), v.to_string()))
    .collect();
    assert_eq!(windows, want);
}

/// An aggregator with nothing to do drops the readings it holds (its memory goes back
/// to the system); the next events load what they need from KV and count on exactly:
/// a distinct count still knows the users it saw, an hour still has its quarters.
#[tokio::test]
async fn an_idle_aggregator_drops_its_readings_and_counts_on_exactly() {
    let nats = Nats::start();
    let km = Km::start(&nats, "idle", &[]).await;
    create_meter(
        &km,
        json!({"id": "users", "eventType": "api.request", "aggregation": "unique_count",
        "valueProperty": "$.user", "groupBy": {"model": "$.model"}}),
    )
    .await;
    create_meter(
        &km,
        json!({"id": "tokens", "eventType": "api.request", "aggregation": "sum",
        "valueProperty": "$.tokens"}),
    )
    .await;
    let cached = "kloudmeter_aggregator_cached_readings{partition=\"0\"}";
    let js = nats.client().await;
    post_events(
        &km,
        &[
            event(
                "1",
                "c1",
                "2026-11-24T10:05:00Z",
                json!({"user": "ann", "model": "a", "tokens": 1}),
            ),
            event(
                "2",
                "c1",
                "2026-11-24T10:10:00Z",
                json!({"user": "bob", "model": "a", "tokens": 2}),
            ),
        ],
    )
    .await;
    caught_up(&js, "idle", T).await;
    // two meters' summary, total, group total and windows of c1 at least
    assert!(
        km.metric(cached).await >= 8.0,
        "{}",
        km.metrics_text().await
    );
    wait_for("the idle aggregator to drop its readings", T, || async {
        km.metric(cached).await == 0.0
    })
    .await;
    post_events(
        &km,
        &[
            event(
                "3",
                "c1",
                "2026-11-24T10:20:00Z",
                json!({"user": "ann", "model": "a", "tokens": 4}),
            ),
            event(
                "4",
                "c1",
                "2026-11-24T10:40:00Z",
                json!({"user": "cy", "model": "a", "tokens": 8}),
            ),
        ],
    )
    .await;
    caught_up(&js, "idle", T).await;
    assert!(km.metric(cached).await > 0.0);
    assert_eq!(subject_values(&km, "users").await, map(&[("c1", "3")]));
    assert_eq!(subject_values(&km, "tokens").await, map(&[("c1", "15")]));
    let quarters = |meter: &str| {
        km.url(&format!(
            "/api/v1/meters/{meter}/query?from=2026-11-24T10:15:00Z&to=2026-11-24T10:45:00Z"
        ))
    };
    let (status, body) = get(&quarters("tokens")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        row_pairs(&body, "subject", "value"),
        [("c1".to_string(), "12".to_string())]
    );
    let (status, body) = get(&km.url("/api/v1/meters/users/query?from=2026-11-24T10:00:00Z&to=2026-11-24T11:00:00Z&groupBy=model")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        row_pairs(&body, "subject", "value"),
        [("c1".to_string(), "3".to_string())]
    );
    assert_eq!(body["data"][0]["groupBy"], json!({"model": "a"}));
}

/// Repeats of an id count once: at once, and after JetStream's own duplicate window.
/// After DEDUP_WINDOW the same id is a new event.
#[tokio::test]
async fn duplicates_count_once_within_the_dedup_window() {
    let nats = Nats::start();
    let km = Km::start(
        &nats,
        "dedup",
        &[("JETSTREAM_DUPLICATE_WINDOW", "1s"), ("DEDUP_WINDOW", "6s")],
    )
    .await;
    create_meter(
        &km,
        json!({"id": "calls", "eventType": "api.request", "aggregation": "count"}),
    )
    .await;
    let e = event("same", "c1", "2026-11-24T10:00:00Z", json!({}));
    post_events(&km, &[e.clone(), e.clone()]).await;
    let (s, _) = post(&km.url("/api/register-event"), &e).await;
    assert_eq!(s, 202);
    // past JetStream's 1 s window, inside ours
    tokio::time::sleep(Duration::from_millis(1500)).await;
    post_events(&km, std::slice::from_ref(&e)).await;
    // a CloudEvent with a source is a different key than the bare id
    let ce = json!({"specversion": "1.0", "id": "same", "source": "/svc", "type": "api.request", "subject": "c1"});
    let (s, b) = post_raw(
        &km.url("/api/v1/events"),
        "application/cloudevents+json",
        ce.to_string().into_bytes(),
    )
    .await;
    assert_eq!((s, b), (202, json!({"accepted": 1})));
    let (s, _) = post_raw(
        &km.url("/api/v1/events"),
        "application/cloudevents-batch+json",
        json!([ce]).to_string().into_bytes(),
    )
    .await;
    assert_eq!(s, 202);
    let js = nats.client().await;
    caught_up(&js, "dedup", T).await;
    assert_eq!(subject_values(&km, "calls").await, map(&[("c1", "2")]));
    assert_eq!(km.metric("kloudmeter_events_duplicate_total").await, 4.0);
    // repeats are removed from the stream, so a meter built later never sees them
    create_meter(
        &km,
        json!({"id": "calls-later", "eventType": "api.request", "aggregation": "count"}),
    )
    .await;
    assert_eq!(
        subject_values(&km, "calls-later").await,
        map(&[("c1", "2")])
    );
    // beyond DEDUP_WINDOW (6 s after the first) the id counts again
    tokio::time::sleep(Duration::from_millis(5000)).await;
    post_events(&km, std::slice::from_ref(&e)).await;
    caught_up(&js, "dedup", T).await;
    assert_eq!(subject_values(&km, "calls").await, map(&[("c1", "3")]));
}

/// Late events, backfill, rebuild on a semantic change (not on a description change),
/// cleanup on delete, and invalid events that block nothing.
#[tokio::test]
async fn meter_lifecycle_backfill_rebuild_delete() {
    let nats = Nats::start();
    let km = Km::start(&nats, "life", &[]).await;
    let js = nats.client().await;
    // events first, meter later: backfill
    post_events(
        &km,
        &[
            event("1", "c1", "2026-11-24T10:00:00Z", json!({"a": 1, "b": 100})),
            event("2", "c1", "2026-11-24T11:00:00Z", json!({"a": 2, "b": 200})),
            event(
                "3",
                "c2",
                "2026-11-24T11:00:00Z",
                json!({"a": "x", "b": 300}),
            ),
        ],
    )
    .await;
    caught_up(&js, "life", T).await;
    create_meter(&km, json!({"id": "m", "eventType": "api.request", "aggregation": "sum", "valueProperty": "$.a"})).await;
    create_meter(
        &km,
        json!({"id": "n", "eventType": "api.request", "aggregation": "count"}),
    )
    .await;
    assert_eq!(subject_values(&km, "m").await, map(&[("c1", "3")]));
    let r = meter_reading(&km, "m").await;
    assert_eq!(
        (
            r["value"].clone(),
            r["events"].clone(),
            r["invalidEvents"].clone()
        ),
        (json!("3"), json!(2), json!(1))
    );
    // the invalid event is dead-lettered with its reason, and the count meter still has it
    assert_eq!(
        subject_values(&km, "n").await,
        map(&[("c1", "2"), ("c2", "1")])
    );
    let dl = js
        .get_stream("life-deadletter")
        .await
        .unwrap()
        .get_last_raw_message_by_subject("life.deadletter.m")
        .await
        .unwrap();
    assert_eq!(
        dl.headers.get("Km-Reason").map(|v| v.as_str().to_string()),
        Some("valueProperty $.a: value \"x\" is not a number".to_string())
    );

    // a late event lands in its own (old) window
    post_events(
        &km,
        &[event(
            "4",
            "c1",
            "2026-11-20T08:00:00Z",
            json!({"a": 5, "b": 1}),
        )],
    )
    .await;
    caught_up(&js, "life", T).await;
    assert_eq!(subject_values(&km, "m").await, map(&[("c1", "8")]));
    let kv = js.get_key_value("life-readings").await.unwrap();
    let old: Value = serde_json::from_slice(
        &kv.get(format!("r.m.c1._.{}", 1_795_161_600))
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(old["acc"]["sum"], json!("5"));

    // description only: no rebuild
    let rebuilds = km.metric("kloudmeter_rebuilds_total").await;
    let reconciles = km.metric("kloudmeter_meter_syncs_total").await;
    let (s, _) = reqwest::Client::new().put(km.url("/api/v1/meters/m"))
        .json(&json!({"eventType": "api.request", "aggregation": "sum", "valueProperty": "$.a", "description": "new words"}))
        .send().await.map(|r| (r.status().as_u16(), ())).unwrap();
    assert_eq!(s, 200);
    wait_for("description change seen", T, || async {
        get(&km.url("/api/meter?key=m")).await.1["description"] == json!("new words")
    })
    .await;
    wait_for("reconcile after the description change", T, || async {
        km.metric("kloudmeter_meter_syncs_total").await > reconciles
    })
    .await;
    assert_eq!(km.metric("kloudmeter_rebuilds_total").await, rebuilds);

    // valueProperty changed: rebuilt from retained events
    let (s, body) = reqwest::Client::new()
        .put(km.url("/api/v1/meters/m"))
        .json(&json!({"eventType": "api.request", "aggregation": "sum", "valueProperty": "$.b"}))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!((s, body), (200, ()));
    wait_for("rebuild", T, || async {
        km.metric("kloudmeter_rebuilds_total").await > rebuilds
    })
    .await;
    wait_for("meter m ready", T, || async {
        meter_reading(&km, "m").await["ready"] == json!(true)
    })
    .await;
    caught_up(&js, "life", T).await;
    assert_eq!(
        subject_values(&km, "m").await,
        map(&[("c1", "301"), ("c2", "300")])
    );
    assert_eq!(meter_reading(&km, "m").await["invalidEvents"], json!(0));

    // delete: readings gone from KV
    let (s, b) = reqwest::Client::new()
        .delete(km.url("/api/meter?key=m"))
        .send()
        .await
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!((s, b), (202, ()));
    wait_for("readings of m removed", T, || async {
        let mut keys = kv.keys().await.unwrap();
        use futures::StreamExt;
        let mut left = 0;
        while let Some(k) = keys.next().await {
            if k.unwrap().starts_with("r.m.") {
                left += 1;
            }
        }
        left == 0
    })
    .await;
    assert_eq!(get(&km.url("/api/meter/?key=m")).await.0, 404);
    assert_eq!(get(&km.url("/api/v1/readings?meter=m")).await.0, 404);
    // the other meter is untouched
    assert_eq!(
        subject_values(&km, "n").await,
        map(&[("c1", "3"), ("c2", "1")])
    );
}
