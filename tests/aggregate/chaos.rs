//! Reliability: a generator posts a known multiset of events (10% repeated ids, late
//! events, invalid values, single and batch requests, retrying on any failure) while the
//! harness kill -9s kloudmeter, restarts nats-server and runs a second kloudmeter part of
//! the time. Every reading and query must equal what the generator itself recorded.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(90);

/// Requests (single events or batches) and the totals their events must produce.
struct Workload {
    requests: Vec<(bool, Value)>,
    sums: BTreeMap<String, i64>,
    counted: usize,
    repeats: usize,
    invalid: usize,
}

fn workload(n_requests: usize) -> Workload {
    let mut w = Workload {
        requests: vec![],
        sums: BTreeMap::new(),
        counted: 0,
        repeats: 0,
        invalid: 0,
    };
    let mut n = 0usize;
    for r in 0..n_requests {
        let single = r % 4 == 0;
        let size = if single { 1 } else { 25 };
        let mut batch = Vec::new();
        for _ in 0..size {
            n += 1;
            let repeat = n % 10 == 0 && n > 10;
            let k = if repeat { n - 9 } else { n };
            let subject = format!("c{}", k % 4);
            // every 7th event is late (last week), every 13th has no numeric value
            let time = if k % 7 == 0 {
                "2026-11-17T08:00:00Z"
            } else {
                "2026-11-24T10:00:00Z"
            };
            let data = if k % 13 == 0 {
                json!({"v": "n/a"})
            } else {
                json!({"v": (k % 5) as i64 + 1})
            };
            if repeat {
                w.repeats += 1;
            } else if k % 13 == 0 {
                w.invalid += 1;
            } else {
                *w.sums.entry(subject.clone()).or_default() += (k % 5) as i64 + 1;
                w.counted += 1;
            }
            batch.push(json!({"id": format!("ev-{k}"), "eventType": "chaos", "subject": subject, "time": time, "data": data}));
        }
        w.requests.push(if single {
            (true, batch.remove(0))
        } else {
            (false, Value::Array(batch))
        });
    }
    w
}

#[tokio::test]
async fn nothing_lost_or_doubled_under_kills_restarts_and_two_processes() {
    let mut nats = Nats::start();
    let mut a = Km::start(&nats, "chaos", &[]).await;
    let (s, _) = post(
        &a.url("/api/create-meter"),
        &json!({"id": "chaos", "eventType": "chaos", "aggregation": "sum", "valueProperty": "$.v"}),
    )
    .await;
    assert_eq!(s, 202);
    let w = workload(240);
    let progress = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let a_port = a.port;
    let gen = {
        let (progress, retries) = (progress.clone(), retries.clone());
        let requests = w.requests.clone();
        tokio::spawn(async move {
            for (i, (single, body)) in requests.iter().enumerate() {
                let path = if *single {
                    "/api/register-event"
                } else {
                    "/api/v1/events"
                };
                let url = format!("http://127.0.0.1:{a_port}{path}");
                let attempts = post_until_accepted(&url, body, Duration::from_secs(240)).await;
                retries.fetch_add(attempts as usize - 1, Ordering::SeqCst);
                progress.store(i + 1, Ordering::SeqCst);
            }
        })
    };
    let at = |n: usize| {
        let p = progress.clone();
        async move {
            wait_for("generator progress", T, || async {
                p.load(Ordering::SeqCst) >= n
            })
            .await
        }
    };
    let (mut kills, mut restarts) = (0, 0);
    // a second process joins, then the first is killed repeatedly; NATS restarts twice
    at(20).await;
    let mut b = Some(Km::start(&nats, "chaos", &[]).await);
    for step in [40, 60, 80, 100, 120] {
        at(step).await;
        a.restart().await; // kill -9 and start again
        kills += 1;
        if step == 60 || step == 100 {
            nats.restart();
            restarts += 1;
        }
    }
    at(150).await;
    if let Some(mut b) = b.take() {
        b.kill9();
        kills += 1;
    }
    gen.await.unwrap();
    caught_up_or_log(&nats.client().await, "chaos", T, &a).await;
    wait_for("readyz", T, || async {
        get(&a.url("/readyz")).await.0 == 200
    })
    .await;
    let want: BTreeMap<String, String> = w
        .sums
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect();
    let got = subject_values(&a, "chaos").await;
    let r = meter_reading(&a, "chaos").await;
    let q =
        get(&a.url("/api/v1/meters/chaos/query?from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z"))
            .await
            .1;
    let from_query: BTreeMap<String, String> =
        row_pairs(&q, "subject", "value").into_iter().collect();
    let mismatches = want.iter().filter(|(k, v)| got.get(*k) != Some(v)).count()
        + usize::from(r["events"] != json!(w.counted))
        + usize::from(r["invalidEvents"] != json!(w.invalid))
        + usize::from(from_query != want);
    let sent: usize = w
        .requests
        .iter()
        .map(|(s, b)| if *s { 1 } else { b.as_array().unwrap().len() })
        .sum();
    eprintln!(
        "chaos: events sent {sent} (acknowledged {sent}), repeated ids {}, invalid {}, counted {}, client retries {}, kill -9 {kills}, nats restarts {restarts}, mismatches {mismatches}",
        w.repeats, w.invalid, w.counted, retries.load(Ordering::SeqCst)
    );
    assert_eq!(got, want);
    assert_eq!(
        (r["events"].clone(), r["invalidEvents"].clone()),
        (json!(w.counted), json!(w.invalid))
    );
    assert_eq!(from_query, want);
    assert_eq!(mismatches, 0);
    assert!(kills >= 5 && restarts >= 2);
}

#[tokio::test]
async fn nats_outage_gives_quick_503s_and_recovers_by_itself() {
    let mut nats = Nats::start();
    let km = Km::start(&nats, "outage", &[]).await;
    nats.stop();
    // the client notices the disconnect; from then on ingestion fails fast
    wait_for("readyz to fail", T, || async {
        get(&km.url("/readyz")).await.0 == 503
    })
    .await;
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(km.url("/api/register-event"))
        .json(&json!({"id": "1", "eventType": "t", "subject": "s"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "503 took {:?}",
        started.elapsed()
    );
    nats.restart();
    wait_for("readyz to recover", T, || async {
        get(&km.url("/readyz")).await.0 == 200
    })
    .await;
    let (s, _) = post(
        &km.url("/api/create-meter"),
        &json!({"id": "m", "eventType": "t", "aggregation": "count"}),
    )
    .await;
    assert_eq!(s, 202);
    let (s, _) = post(
        &km.url("/api/register-event"),
        &json!({"id": "1", "eventType": "t", "subject": "s"}),
    )
    .await;
    assert_eq!(s, 202);
    caught_up_or_log(&nats.client().await, "outage", T, &km).await;
    wait_for("meter m ready", T, || async {
        meter_reading(&km, "m").await["ready"] == json!(true)
    })
    .await;
    assert_eq!(
        subject_values(&km, "m").await,
        BTreeMap::from([("s".to_string(), "1".to_string())])
    );
}

#[tokio::test]
async fn a_slow_jetstream_fills_the_ingestion_cap_and_sheds_load_with_503() {
    let nats = Nats::start();
    let km = Km::start(&nats, "cap", &[("MAX_INFLIGHT_EVENTS", "10")]).await;
    // freeze nats-server: the connection stays up, acknowledgements stop
    let pid = nats.pid().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let url = km.url("/api/v1/events");
    // two requests while JetStream is frozen: one for every permit, one more event.
    // Whichever arrives second finds the cap full and is refused at once.
    let send = |body: Value| {
        let url = url.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let r = reqwest::Client::new()
                .post(&url)
                .json(&body)
                .send()
                .await
                .unwrap();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            (
                r.status().as_u16(),
                retry_after,
                r.json::<Value>().await.unwrap(),
                started.elapsed(),
            )
        })
    };
    let batch: Vec<Value> = (0..10)
        .map(|i| json!({"id": format!("b{i}"), "eventType": "t", "subject": "s"}))
        .collect();
    let first = send(Value::Array(batch));
    let second = send(json!({"id": "x", "eventType": "t", "subject": "s"}));
    let answers = [first.await.unwrap(), second.await.unwrap()];
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    let shed: Vec<_> = answers
        .iter()
        .filter(|a| a.2["message"] == json!("ingestion is at capacity; retry shortly"))
        .collect();
    assert_eq!(shed.len(), 1, "{answers:?}");
    let (status, retry_after, _, took) = shed[0];
    assert_eq!((*status, retry_after.as_deref()), (503, Some("1")));
    assert!(*took < Duration::from_secs(1), "shedding took {took:?}");
    // the other one waited for JetStream and timed out with a 503 too: nothing hangs
    assert!(answers.iter().all(|a| a.0 == 503), "{answers:?}");
}

#[tokio::test]
async fn no_request_waits_longer_than_the_request_timeout() {
    let nats = Nats::start();
    let km = Km::start(&nats, "rt", &[("REQUEST_TIMEOUT", "1s")]).await;
    let pid = nats.pid().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    let started = Instant::now();
    let r = reqwest::Client::new()
        .post(km.url("/api/register-event"))
        .json(&json!({"id": "1", "eventType": "t", "subject": "s"}))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status()
        .unwrap();
    assert_eq!(r.status().as_u16(), 503);
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "answered after {took:?}"
    );
}
