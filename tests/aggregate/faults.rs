//! Exactly-once under faults: kill -9 of kloudmeter, restarts of nats-server, and two
//! processes with a leader handover. Totals are compared with what the generator itself
//! recorded as acknowledged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// A known stream of events: `batches` requests of `per_batch` events, every 10th event
/// repeating an earlier id (as a retrying client would). Returns the expected sum per
/// subject (repeats counted once) and the request bodies.
fn workload(batches: usize, per_batch: usize) -> (BTreeMap<String, i64>, Vec<Value>) {
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut bodies = Vec::new();
    let mut n = 0usize;
    for _ in 0..batches {
        let mut batch = Vec::new();
        for _ in 0..per_batch {
            n += 1;
            let (id, k) = if n % 10 == 0 { (n - 7, n - 7) } else { (n, n) };
            let subject = format!("c{}", k % 5);
            let v = (k % 7) as i64 + 1;
            if n % 10 != 0 {
                *expected.entry(subject.clone()).or_default() += v;
            }
            batch.push(
                json!({"id": format!("e{id}"), "eventType": "usage", "subject": subject,
                "time": "2026-11-24T10:00:00Z", "data": {"v": v}}),
            );
        }
        bodies.push(Value::Array(batch));
    }
    (expected, bodies)
}

fn as_strings(m: &BTreeMap<String, i64>) -> BTreeMap<String, String> {
    m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()
}

/// Post every body until it is accepted, spreading requests over `urls` and moving to
/// the next URL when one fails. Returns the number of attempts.
fn generator(
    urls: Vec<String>,
    bodies: Vec<Value>,
    progress: Arc<AtomicUsize>,
) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut attempts = 0;
        for (i, body) in bodies.iter().enumerate() {
            attempts +=
                post_until_accepted_by(&urls, i, body, Duration::from_secs(120)).await as usize;
            progress.store(i + 1, Ordering::SeqCst);
        }
        attempts
    })
}

async fn create_sum_meter(km: &Km) {
    let (s, _) = post(
        &km.url("/api/create-meter"),
        &json!({"id": "usage", "eventType": "usage", "aggregation": "sum", "valueProperty": "$.v"}),
    )
    .await;
    assert_eq!(s, 202);
}

async fn wait_progress(p: &AtomicUsize, at_least: usize) {
    wait_for("generator progress", T, || async {
        p.load(Ordering::SeqCst) >= at_least
    })
    .await;
}

#[tokio::test]
async fn kill_9_of_kloudmeter_loses_and_doubles_nothing() {
    let nats = Nats::start();
    let mut km = Km::start(&nats, "k9", &[]).await;
    create_sum_meter(&km).await;
    let (expected, bodies) = workload(120, 50);
    let progress = Arc::new(AtomicUsize::new(0));
    let gen = generator(vec![km.url("/api/v1/events")], bodies, progress.clone());
    for at in [15, 40, 70, 100] {
        wait_progress(&progress, at).await;
        km.restart().await; // kill -9, then start again
    }
    let attempts = gen.await.unwrap();
    assert!(attempts >= 120);
    caught_up_or_log(&nats.client().await, "k9", T, &km).await;
    assert_eq!(subject_values(&km, "usage").await, as_strings(&expected));
    let r = meter_reading(&km, "usage").await;
    assert_eq!(r["events"], json!(120 * 50 - 120 * 5));
}

#[tokio::test]
async fn nats_server_restarts_lose_and_double_nothing() {
    let mut nats = Nats::start();
    let km = Km::start(&nats, "nr", &[]).await;
    create_sum_meter(&km).await;
    let (expected, bodies) = workload(80, 50);
    let progress = Arc::new(AtomicUsize::new(0));
    let gen = generator(vec![km.url("/api/v1/events")], bodies, progress.clone());
    for at in [20, 50] {
        wait_progress(&progress, at).await;
        nats.restart();
    }
    gen.await.unwrap();
    caught_up_or_log(&nats.client().await, "nr", T, &km).await;
    wait_for("readyz after the restarts", T, || async {
        get(&km.url("/readyz")).await.0 == 200
    })
    .await;
    assert_eq!(subject_values(&km, "usage").await, as_strings(&expected));
    assert_eq!(
        meter_reading(&km, "usage").await["events"],
        json!(80 * 50 - 80 * 5)
    );
}

#[tokio::test]
async fn standby_takes_over_when_the_leader_dies() {
    let nats = Nats::start();
    let a = Km::start(&nats, "ha", &[]).await;
    let b = Km::start(&nats, "ha", &[]).await;
    create_sum_meter(&a).await;
    wait_for("one leader", T, || async {
        a.metric("kloudmeter_leader").await + b.metric("kloudmeter_leader").await == 1.0
    })
    .await;
    let (mut leader, follower) = if a.metric("kloudmeter_leader").await == 1.0 {
        (a, b)
    } else {
        (b, a)
    };
    let (expected, bodies) = workload(80, 50);
    let progress = Arc::new(AtomicUsize::new(0));
    // both serve ingestion
    let gen = generator(
        vec![leader.url("/api/v1/events"), follower.url("/api/v1/events")],
        bodies,
        progress.clone(),
    );
    wait_progress(&progress, 30).await;
    leader.kill9();
    let killed = Instant::now();
    wait_for("the standby to lead", T, || async {
        follower.metric("kloudmeter_leader").await == 1.0
    })
    .await;
    // within the lease's lifetime (the harness's LEADER_TTL, 2 s) and a standby's retry
    let took = killed.elapsed();
    assert!(
        took < Duration::from_secs(2) + Duration::from_secs(2),
        "takeover after kill -9 took {took:?} with LEADER_TTL 2s"
    );
    eprintln!("takeover after kill -9: {took:?}");
    gen.await.unwrap();
    caught_up_or_log(&nats.client().await, "ha", T, &follower).await;
    assert_eq!(
        subject_values(&follower, "usage").await,
        as_strings(&expected)
    );
    assert_eq!(
        meter_reading(&follower, "usage").await["events"],
        json!(80 * 50 - 80 * 5)
    );
}

#[tokio::test]
async fn sigterm_hands_over_leadership_at_once() {
    let nats = Nats::start();
    let mut a = Km::start(&nats, "term", &[("LEADER_TTL", "30s")]).await;
    wait_for("a leads", T, || async {
        a.metric("kloudmeter_leader").await == 1.0
    })
    .await;
    let b = Km::start(&nats, "term", &[("LEADER_TTL", "30s")]).await;
    assert_eq!(b.metric("kloudmeter_leader").await, 0.0);
    let status = a.terminate();
    assert!(status.success(), "graceful exit: {status:?}");
    // with a 30 s lease, only a released lease explains a takeover within 10 s
    wait_for("b leads", Duration::from_secs(10), || async {
        b.metric("kloudmeter_leader").await == 1.0
    })
    .await;
}
