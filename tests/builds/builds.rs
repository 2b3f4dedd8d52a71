//! Meter builds beside the live pass: a live meter stays fresh while another meter
//! builds over a long history, a killed build resumes from its checkpoint, history that
//! left the stream is kept from the previous definition, suspend and resume.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

const T: Duration = Duration::from_secs(60);

/// The freshness test runs alone (write); the others may share the machine (read).
static MACHINE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

async fn create(km: &Km, def: Value) {
    let (status, body) = post(&km.url("/api/v1/meters"), &def).await;
    assert_eq!(status, 201, "{body}");
}

async fn replace(km: &Km, id: &str, def: Value) {
    let r = reqwest::Client::new()
        .put(km.url(&format!("/api/v1/meters/{id}")))
        .json(&def)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200, "{}", r.text().await.unwrap());
}

async fn post_events(km: &Km, events: &[Value]) {
    let (status, body) = post(&km.url("/api/v1/events"), &Value::Array(events.to_vec())).await;
    assert_eq!(status, 202, "{body}");
}

fn event(id: &str, event_type: &str, time: &str, data: Value) -> Value {
    json!({"id": id, "eventType": event_type, "subject": "customer-1", "time": time, "data": data})
}

async fn reading(km: &Km, id: &str) -> Value {
    meter_reading(km, id).await
}

async fn wait_ready(km: &Km, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let r = reading(km, id).await;
        if r["ready"] == json!(true) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "meter {id} not ready within {timeout:?}: {r}\n{}",
            tail(km)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn tail(km: &Km) -> String {
    let log = km.logs();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// While a meter builds over a million retained events, every event of a live meter
/// shows in its reading within a second; the built meter is exact when it turns ready.
#[tokio::test]
async fn a_live_meter_stays_fresh_while_another_meter_builds() {
    let _alone = MACHINE.write().await;
    let n: usize = std::env::var("BUILD_TEST_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let nats = Nats::start();
    let km = Km::start(&nats, "bt", &[]).await;
    let js = nats.client().await;
    create(
        &km,
        json!({"id": "live", "eventType": "live", "aggregation": "count"}),
    )
    .await;
    wait_ready(&km, "live", T).await;
    preload_events(&js, "bt", "bulk", n).await;
    caught_up_or_log(&js, "bt", Duration::from_secs(600), &km).await;

    create(
        &km,
        json!({"id": "built", "eventType": "bulk", "aggregation": "sum", "valueProperty": "$.v"}),
    )
    .await;
    let mut lags = Vec::new();
    let mut seen_progress = Vec::new();
    let mut i = 0u64;
    let built = loop {
        let r = reading(&km, "built").await;
        if r["ready"] == json!(true) {
            break r;
        }
        if let Some(p) = r["progress"].as_u64() {
            seen_progress.push(p);
        }
        i += 1;
        let posted = Instant::now();
        post_events(
            &km,
            &[event(
                &format!("live-{i}"),
                "live",
                "2026-11-02T10:00:00Z",
                json!({}),
            )],
        )
        .await;
        loop {
            if reading(&km, "live").await["events"] == json!(i) {
                break;
            }
            assert!(
                posted.elapsed() < Duration::from_secs(5),
                "live event {i} not counted after 5 s\n{}",
                tail(&km)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lags.push(posted.elapsed());
        assert!(Instant::now().duration_since(posted) < T * 10);
    };
    assert_eq!(built["events"], json!(n), "{built}");
    assert_eq!(built["value"], json!(n.to_string()));
    assert!(
        lags.len() >= 5,
        "the build ended before the live meter could be measured ({} events)",
        lags.len()
    );
    assert!(
        seen_progress.iter().any(|p| *p < 100),
        "no progress shown while building: {seen_progress:?}"
    );
    let worst = lags.iter().max().unwrap();
    assert!(
        *worst < Duration::from_secs(1),
        "a live event took {worst:?} to show while the build ran ({} measured)",
        lags.len()
    );
}

/// `kill -9` of the leader part-way through a build: the standby that takes over
/// resumes the build from its checkpoint (it replays less than what is retained) and
/// ends exact.
#[tokio::test]
async fn a_killed_build_resumes_from_its_checkpoint_on_the_next_leader() {
    let _shared = MACHINE.read().await;
    let n = 300_000;
    let nats = Nats::start();
    // checkpoints often enough to be interrupted between them
    let env = [("BUILD_CHECKPOINT_INTERVAL", "1s")];
    let mut a = Km::start(&nats, "bk", &env).await;
    let js = nats.client().await;
    preload_events(&js, "bk", "bulk", n).await;
    caught_up_or_log(&js, "bk", Duration::from_secs(300), &a).await;
    let b = Km::start(&nats, "bk", &env).await;
    assert_eq!(
        b.metric("kloudmeter_leader").await,
        0.0,
        "a leads, b stands by"
    );
    create(
        &a,
        json!({"id": "built", "eventType": "bulk", "aggregation": "count"}),
    )
    .await;
    let deadline = Instant::now() + T;
    let before = loop {
        let r = reading(&a, "built").await;
        assert_ne!(
            r["ready"],
            json!(true),
            "built before it could be interrupted"
        );
        if r["progress"].as_u64().is_some_and(|p| p >= 30) {
            break a.metric("kloudmeter_build_events_total").await;
        }
        assert!(Instant::now() < deadline, "no progress: {r}\n{}", tail(&a));
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    a.kill9();
    let r = wait_ready(&b, "built", T).await;
    assert_eq!(r["events"], json!(n), "{r}");
    assert_eq!(r["value"], json!(n.to_string()));
    let after = b.metric("kloudmeter_build_events_total").await;
    assert!(
        after < 0.8 * n as f64,
        "the new leader replayed {after} of {n} events: it started over"
    );
    assert!(before + after < 2.0 * n as f64, "{before} + {after}");
}

/// Events of window A leave the stream (EVENT_RETENTION of a few seconds); window B's
/// are retained; the meter's valueProperty changes: window A keeps the previous
/// definition's reading, window B follows the new one, `rebuiltFrom` says where the
/// kept history ends, and a query over both windows returns both.
#[tokio::test]
async fn a_rebuild_keeps_the_windows_whose_events_left_the_stream() {
    let _shared = MACHINE.read().await;
    let nats = Nats::start();
    let km = Km::start(&nats, "bh", &[("EVENT_RETENTION", "3s")]).await;
    let js = nats.client().await;
    let def = |value: &str| json!({"id": "m", "eventType": "h", "aggregation": "sum", "valueProperty": value});
    create(&km, def("$.a")).await;
    wait_ready(&km, "m", T).await;
    post_events(
        &km,
        &[
            event("a1", "h", "2026-01-01T10:05:00Z", json!({"a": 1, "b": 100})),
            event("a2", "h", "2026-01-01T10:50:00Z", json!({"a": 2, "b": 200})),
        ],
    )
    .await;
    caught_up(&js, "bh", T).await;
    wait_for("window A's events to leave the stream", T, || async {
        let mut s = js.get_stream("bh").await.unwrap();
        s.info().await.unwrap().state.messages == 0
    })
    .await;
    post_events(
        &km,
        &[
            event("b1", "h", "2026-01-01T12:05:00Z", json!({"a": 4, "b": 400})),
            event("b2", "h", "2026-01-01T12:10:00Z", json!({"a": 8, "b": 800})),
        ],
    )
    .await;
    caught_up(&js, "bh", T).await;
    assert_eq!(reading(&km, "m").await["value"], json!("15"));

    replace(&km, "m", def("$.b")).await;
    let r = wait_ready(&km, "m", T).await;
    // window A: 1 + 2 (kept, previous definition); window B: 400 + 800 (rebuilt)
    assert_eq!(r["value"], json!("1203"), "{r}");
    assert_eq!(r["events"], json!(4));
    assert_eq!(r["rebuiltFrom"], json!("2026-01-01T11:00:00Z"), "{r}");
    let (status, q) = get(&km.url(
        "/api/v1/meters/m/query?from=2026-01-01T00:00:00Z&to=2026-01-02T00:00:00Z&windowSize=HOUR",
    ))
    .await;
    assert_eq!(status, 200, "{q}");
    let rows: Vec<(String, String)> = q["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["windowStart"].as_str().unwrap().to_string(),
                row["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        vec![
            ("2026-01-01T10:00:00Z".to_string(), "3".to_string()),
            ("2026-01-01T12:00:00Z".to_string(), "1200".to_string())
        ]
    );
    // a late event into the kept window counts by the new definition
    post_events(
        &km,
        &[event(
            "a3",
            "h",
            "2026-01-01T10:55:00Z",
            json!({"a": 16, "b": 1600}),
        )],
    )
    .await;
    caught_up(&js, "bh", T).await;
    assert_eq!(reading(&km, "m").await["value"], json!("2803"));
}

/// Suspend, post, resume: the events that arrived meanwhile count once. An edit during
/// a build restarts that build, which ends exact.
#[tokio::test]
async fn suspend_resume_and_an_edit_during_a_build_are_exact() {
    let _shared = MACHINE.read().await;
    let nats = Nats::start();
    let km = Km::start(&nats, "bs", &[]).await;
    let js = nats.client().await;
    let def = |suspend: bool| json!({"id": "s", "eventType": "s", "aggregation": "sum", "valueProperty": "$.v", "suspend": suspend});
    create(&km, def(false)).await;
    wait_ready(&km, "s", T).await;
    let batch = |from: usize, to: usize| -> Vec<Value> {
        (from..to)
            .map(|i| {
                event(
                    &format!("s{i}"),
                    "s",
                    "2026-11-02T10:00:00Z",
                    json!({"v": i}),
                )
            })
            .collect()
    };
    post_events(&km, &batch(0, 10)).await;
    caught_up(&js, "bs", T).await;
    replace(&km, "s", def(true)).await;
    wait_for("suspended", T, || async {
        let r = reading(&km, "s").await;
        r["suspended"] == json!(true) && r["ready"] == json!(false)
    })
    .await;
    post_events(&km, &batch(10, 20)).await;
    // a repeat of an id counted before the suspension, and one of the meanwhile
    post_events(&km, &batch(5, 15)).await;
    caught_up(&js, "bs", T).await;
    let r = reading(&km, "s").await;
    assert_eq!(
        (r["value"].clone(), r["events"].clone()),
        (json!("45"), json!(10)),
        "suspended meters count nothing"
    );
    replace(&km, "s", def(false)).await;
    let r = wait_ready(&km, "s", T).await;
    assert_eq!(
        (r["value"].clone(), r["events"].clone()),
        (json!("190"), json!(20)),
        "{r}"
    );
    assert_eq!(
        km.metric("kloudmeter_rebuilds_total").await,
        1.0,
        "resuming is no rebuild"
    );

    // an edit during a build: the build restarts for the new definition and ends exact
    let n = 200_000;
    preload_events(&js, "bs", "e", n).await;
    caught_up_or_log(&js, "bs", Duration::from_secs(300), &km).await;
    create(
        &km,
        json!({"id": "e", "eventType": "e", "aggregation": "sum", "valueProperty": "$.v"}),
    )
    .await;
    wait_for("the build to start", T, || async {
        reading(&km, "e").await["progress"].as_u64().is_some()
    })
    .await;
    replace(
        &km,
        "e",
        json!({"id": "e", "eventType": "e", "aggregation": "count"}),
    )
    .await;
    let r = wait_ready(&km, "e", T).await;
    assert_eq!(
        (r["value"].clone(), r["events"].clone()),
        (json!(n.to_string()), json!(n)),
        "{r}"
    );
    assert_eq!(r["aggregation"], json!("count"));

    // deleted during its build: the build stops and nothing of the meter stays
    create(
        &km,
        json!({"id": "d", "eventType": "e", "aggregation": "count"}),
    )
    .await;
    wait_for("the build of d to start", T, || async {
        reading(&km, "d").await["progress"].as_u64().is_some()
    })
    .await;
    let r = reqwest::Client::new()
        .delete(km.url("/api/v1/meters/d"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let readings = js.get_key_value("bs-readings").await.unwrap();
    let state = js.get_key_value("bs-state").await.unwrap();
    wait_for("d's readings and progress removed", T, || async {
        let mut keys = readings.keys().await.unwrap();
        let mut left = 0;
        while let Some(k) = futures::StreamExt::next(&mut keys).await {
            if k.unwrap().starts_with("r.d") {
                left += 1;
            }
        }
        left == 0 && state.get("p.d").await.unwrap().is_none()
    })
    .await;
    // and a meter of the same name starts from nothing
    create(
        &km,
        json!({"id": "d", "eventType": "e", "aggregation": "count"}),
    )
    .await;
    let r = wait_ready(&km, "d", T).await;
    assert_eq!(r["events"], json!(n), "{r}");
}
