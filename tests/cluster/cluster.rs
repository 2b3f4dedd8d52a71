//! A NATS cluster as the engine: three nats-servers (streams and buckets with three
//! copies) under three kloudmeter processes that each know every server. Events flow
//! throughout while one kloudmeter and then one nats-server are `kill -9`ed and
//! restarted and a fourth kloudmeter joins: the totals stay exact and after each change
//! exactly one process leads the aggregation within LEADER_TTL plus a margin.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use serde_json::json;

const T: Duration = Duration::from_secs(90);
/// LEADER_TTL in these tests (see `Km::start`) plus the time to notice and take over.
const SETTLE: Duration = Duration::from_secs(2 + 10);
const REQUESTS: usize = 300;

async fn leaders(kms: &[&Km]) -> f64 {
    let mut n = 0.0;
    for km in kms {
        n += km.metric("kloudmeter_leader").await;
    }
    n
}

#[tokio::test]
async fn exact_totals_and_one_leader_through_process_and_server_kills() {
    let mut cluster = Nats::cluster(3);
    let urls = Nats::urls(&cluster);
    // each process lists the servers in its own order, so they start on different ones
    let servers: Vec<String> = cluster.iter().map(Nats::url).collect();
    let rotated = |by: usize| {
        let mut list = servers.clone();
        list.rotate_left(by);
        list.join(",")
    };
    let env = |list: String| {
        vec![
            ("NATS_URL".to_string(), list),
            ("NATS_REPLICAS".into(), "3".into()),
        ]
    };
    // (kloudmeter logs go to the first server's folder; that server is never killed)
    let (home, others) = cluster.split_at_mut(1);
    let home = &home[0];
    let start = |list: String| {
        let env = env(list);
        let nats = home;
        async move {
            let pairs: Vec<(&str, &str)> =
                env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            Km::start(nats, "cl", &pairs).await
        }
    };
    let mut a = start(rotated(0)).await;
    let b = start(rotated(1)).await;
    let c = start(rotated(2)).await;
    let (s, body) = post(
        &a.url("/api/v1/meters"),
        &json!({"id": "calls", "eventType": "call", "aggregation": "sum", "valueProperty": "$.v"}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    // the streams really have three copies
    let js = others[0].client().await;
    let info = js
        .get_stream("cl")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3);

    // every 10th request repeats an earlier id: counted once
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    let mut bodies = Vec::new();
    for i in 0..REQUESTS {
        let k = if i % 10 == 9 { i - 5 } else { i };
        let subject = format!("c{}", k % 5);
        if k == i {
            *want.entry(subject.clone()).or_default() += (k % 3) as i64 + 1;
        }
        bodies.push(
            json!({"id": format!("e{k}"), "eventType": "call", "subject": subject,
            "time": "2026-11-30T08:00:00Z", "data": {"v": (k % 3) + 1}}),
        );
    }
    let api: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|km| km.url("/api/v1/events"))
        .collect();
    let progress = Arc::new(AtomicUsize::new(0));
    let generator = {
        let progress = progress.clone();
        tokio::spawn(async move {
            for (i, body) in bodies.iter().enumerate() {
                post_until_accepted_by(&api, i, body, T).await;
                progress.store(i + 1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
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

    at(REQUESTS / 4).await;
    wait_for("one leader among three", SETTLE, || async {
        leaders(&[&a, &b, &c]).await == 1.0
    })
    .await;
    a.restart().await; // kill -9 and start again
    wait_for("one leader after a kloudmeter kill", SETTLE, || async {
        leaders(&[&a, &b, &c]).await == 1.0
    })
    .await;

    at(REQUESTS / 2).await;
    others[0].restart(); // kill -9 and start again on the same store
    wait_for("one leader after a nats-server kill", SETTLE, || async {
        leaders(&[&a, &b, &c]).await == 1.0
    })
    .await;

    at(3 * REQUESTS / 4).await;
    let d = start(urls.clone()).await;
    wait_for("one leader among four", SETTLE, || async {
        leaders(&[&a, &b, &c, &d]).await == 1.0
    })
    .await;

    generator.await.unwrap();
    let want: BTreeMap<String, String> =
        want.into_iter().map(|(k, v)| (k, v.to_string())).collect();
    for km in [&a, &b, &c, &d] {
        wait_for("exact totals on every process", T, || async {
            try_subject_values(km, "calls").await.as_ref() == Some(&want)
        })
        .await;
    }
    let total: i64 = want.values().map(|v| v.parse::<i64>().unwrap()).sum();
    assert_eq!(
        meter_reading(&d, "calls").await["value"],
        json!(total.to_string())
    );
    wait_for("one leader once settled", SETTLE, || async {
        leaders(&[&a, &b, &c, &d]).await == 1.0
    })
    .await;
}
