//! A NATS cluster as the engine: three nats-servers (streams and buckets with three
//! copies) under three kloudmeter processes that each know every server, the events
//! spread over six partitions. Events flow throughout while one kloudmeter and then one
//! nats-server are `kill -9`ed and restarted and a fourth kloudmeter joins: the totals
//! stay exact (a sum and a unique count, merged across partitions) and after each change
//! every partition has exactly one owner within LEADER_TTL plus a margin, shared fairly.

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
const PARTITIONS: usize = 6;

/// Whether every partition has exactly one owner (from each process's /metrics), each
/// process holding its fair share (⌊P÷N⌋ or ⌈P÷N⌉).
async fn one_owner_each(kms: &[&Km]) -> bool {
    let (least, share) = (PARTITIONS / kms.len(), PARTITIONS.div_ceil(kms.len()));
    let mut owners = [0.0; PARTITIONS];
    for km in kms {
        let mut held = 0;
        for (p, owner) in owners.iter_mut().enumerate() {
            let owned = km
                .metric(&format!("kloudmeter_partition_owned{{partition=\"{p}\"}}"))
                .await;
            *owner += owned;
            held += owned as usize;
        }
        if !(least..=share).contains(&held) {
            return false;
        }
    }
    // partition 0's owner is the one leader
    let mut leaders = 0.0;
    for km in kms {
        leaders += km.metric("kloudmeter_leader").await;
    }
    owners.iter().all(|&n| n == 1.0) && leaders == 1.0
}

#[tokio::test]
async fn exact_totals_and_one_owner_per_partition_through_process_and_server_kills() {
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
            ("PARTITIONS".into(), PARTITIONS.to_string()),
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
    let (s, body) = post(
        &a.url("/api/v1/meters"),
        &json!({"id": "callers", "eventType": "call", "aggregation": "unique_count", "valueProperty": "$.caller"}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    // the streams really have three copies, one events stream per partition
    let js = others[0].client().await;
    for stream in ["cl", "cl-p5"] {
        let info = js
            .get_stream(stream)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .clone();
        assert_eq!(info.config.num_replicas, 3);
    }

    // every 10th request repeats an earlier id: counted once
    // (ids are unique per subject: a repeat names the same subject)
    let mut want: BTreeMap<String, i64> = BTreeMap::new();
    let mut callers = std::collections::BTreeSet::new();
    let mut bodies = Vec::new();
    for i in 0..REQUESTS {
        let k = if i % 10 == 9 { i - 5 } else { i };
        let subject = format!("c{}", k % 12);
        if k == i {
            *want.entry(subject.clone()).or_default() += (k % 3) as i64 + 1;
            callers.insert(k % 37);
        }
        bodies.push(
            json!({"id": format!("e{k}"), "eventType": "call", "subject": subject,
            "time": "2026-11-30T08:00:00Z", "data": {"v": (k % 3) + 1, "caller": format!("u{}", k % 37)}}),
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
    wait_for("one owner per partition among three", SETTLE, || async {
        one_owner_each(&[&a, &b, &c]).await
    })
    .await;
    a.restart().await; // kill -9 and start again
    wait_for(
        "one owner per partition after a kloudmeter kill",
        SETTLE,
        || async { one_owner_each(&[&a, &b, &c]).await },
    )
    .await;

    at(REQUESTS / 2).await;
    others[0].restart(); // kill -9 and start again on the same store
    wait_for(
        "one owner per partition after a nats-server kill",
        SETTLE,
        || async { one_owner_each(&[&a, &b, &c]).await },
    )
    .await;

    at(3 * REQUESTS / 4).await;
    let d = start(urls.clone()).await;
    wait_for("one owner per partition among four", SETTLE, || async {
        one_owner_each(&[&a, &b, &c, &d]).await
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
    // distinct callers across every partition: each counted once
    wait_for(
        "exact unique count merged from the partitions",
        T,
        || async {
            meter_reading(&b, "callers").await["value"] == json!(callers.len().to_string())
        },
    )
    .await;
    wait_for("one owner per partition once settled", SETTLE, || async {
        one_owner_each(&[&a, &b, &c, &d]).await
    })
    .await;
}

/// PARTITIONS is fixed when an installation's streams are created: started again with
/// another count, kloudmeter stops with one line naming PARTITIONS and the count to use,
/// and started as created it finds everything where it was.
#[tokio::test]
async fn another_partition_count_is_refused_and_nothing_is_lost() {
    let nats = Nats::start();
    let mut km = Km::start(&nats, "pc", &[]).await;
    let (s, body) = post(
        &km.url("/api/v1/meters"),
        &json!({"id": "calls", "eventType": "call", "aggregation": "count"}),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    for (i, subject) in ["a", "b", "b"].iter().enumerate() {
        let (s, body) = post(
            &km.url("/api/v1/events"),
            &json!({"id": format!("e{i}"), "eventType": "call", "subject": subject,
                "time": "2026-11-30T08:00:00Z"}),
        )
        .await;
        assert!((200..300).contains(&s), "{s} {body}");
    }
    let want: BTreeMap<String, String> =
        [("a".into(), "1".into()), ("b".into(), "2".into())].into();
    wait_for("counted", T, || async {
        try_subject_values(&km, "calls").await.as_ref() == Some(&want)
    })
    .await;
    assert!(km.terminate().success());

    let mut refused = std::process::Command::new(env!("CARGO_BIN_EXE_kloudmeter"))
        .env_clear()
        .envs(km.env.iter().cloned())
        .env("PARTITIONS", "4")
        .env("HTTP_SERVER_PORT", free_port().to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = refused.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "PARTITIONS=4 was not refused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(refused.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        stderr.trim(),
        "kloudmeter: PARTITIONS: this installation's events are spread over 1 partition(s) \
         (recorded on stream pc when it was created); start with PARTITIONS=1"
    );

    km.restart().await;
    assert_eq!(subject_values(&km, "calls").await, want);
    let (s, _) = post(
        &km.url("/api/v1/events"),
        &json!({"id": "e9", "eventType": "call", "subject": "a", "time": "2026-11-30T09:00:00Z"}),
    )
    .await;
    assert!((200..300).contains(&s), "{s}");
    let want: BTreeMap<String, String> =
        [("a".into(), "2".into()), ("b".into(), "2".into())].into();
    wait_for("counted after the refusal", T, || async {
        try_subject_values(&km, "calls").await.as_ref() == Some(&want)
    })
    .await;
}
