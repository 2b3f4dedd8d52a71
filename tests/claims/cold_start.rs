//! A cold start: the only warm process dies and a new one with an empty DATA_DIR takes
//! over. It starts from the leader's snapshot of the claim index instead of reading
//! the whole claim log into its own, and a live meter is fresh again within
//! LEADER_TTL + 10 s.

use std::time::{Duration, Instant};

use crate::common::*;

const CLAIMS: usize = 2_000_000;
const LEADER_TTL: Duration = Duration::from_secs(2);

#[tokio::test]
async fn an_empty_data_dir_leads_within_seconds_of_the_only_warm_process_dying() {
    let nats = Nats::start();
    let js = nats.client().await;
    let env = [("CLAIM_SNAPSHOT_INTERVAL", "1s"), ("LEADER_TTL", "2s")];
    // the streams exist once a process has started; the claims go in before the warm
    // one reads them
    let mut setup = Km::start(&nats, "cold", &env).await;
    setup.kill9();
    fill_claim_log(&js, "cold", CLAIMS).await;
    let mut warm = Km::start(&nats, "cold", &env).await;
    create_live_meter(&warm).await;
    post_live(&warm, 1, Duration::from_secs(30)).await;
    live_counted(&warm, 1, Duration::from_secs(120)).await;
    // its snapshot holds every claim of the log
    let bucket = js.get_object_store("cold-claim-snapshots").await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !bucket
        .info("claim-index")
        .await
        .is_ok_and(|i| i.size >= 48 + 32 * (CLAIMS + 1))
    {
        let log = warm.logs();
        let said: Vec<&str> = log.lines().filter(|l| l.contains("claim")).collect();
        assert!(
            Instant::now() < deadline,
            "no snapshot of every claim; the warm process said:\n{}",
            said.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // the leader says what it published (once the publication has returned)
    wait_for("the snapshot metrics", Duration::from_secs(10), || async {
        warm.metric("kloudmeter_claim_snapshot_claims").await == (CLAIMS + 1) as f64
    })
    .await;
    assert!(
        warm.metric("kloudmeter_claim_snapshot_timestamp_seconds")
            .await
            > 1.7e9
    );
    warm.kill9();
    let died = Instant::now();
    let cold = Km::start(&nats, "cold", &env).await;
    post_live(&cold, 2, Duration::from_secs(30)).await;
    // a repeat of the first event: the new process knows it was counted
    post_live(&cold, 1, Duration::from_secs(30)).await;
    live_counted(&cold, 2, LEADER_TTL + Duration::from_secs(10)).await;
    let fresh_after = died.elapsed();
    caught_up_or_log(&js, "cold", Duration::from_secs(30), &cold).await;
    assert_eq!(subject_values(&cold, "live").await["s"], "2");
    let log = cold.logs();
    let fetched = log
        .lines()
        .find(|l| l.contains("claim index snapshot fetched"))
        .unwrap_or_else(|| panic!("no snapshot fetched:\n{log}"));
    let restored: serde_json::Value = serde_json::from_str(fetched).unwrap();
    // every claim of the log and the first live event's, exactly
    assert_eq!(
        restored["fields"]["claims"].as_u64(),
        Some(CLAIMS as u64 + 1),
        "{fetched}"
    );
    eprintln!("cold start: fresh {fresh_after:?} after the kill ({CLAIMS} claims); {fetched}");
}
