//! The claim log and the local claim index against a real nats-server: appends are
//! fenced, standbys follow, the index survives restarts but not a new log, and claims
//! leave the index once they are out of the window.

use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use kloudmeter::claims::{Claims, LocalIndex};
use kloudmeter::domain::dedup::{IdKey, Record};
use kloudmeter::nats::store::Store;

fn key(n: u32) -> IdKey {
    let mut k = [7u8; 16];
    k[..4].copy_from_slice(&n.to_be_bytes());
    k
}

fn rec(seq: u64, time_ns: i64) -> Record {
    Record { seq, time_ns }
}

const WINDOW: Duration = Duration::from_secs(10);
const T0: i64 = 1_700_000_000_000_000_000;
const SEC: i64 = 1_000_000_000;

async fn attach(index: &Arc<LocalIndex>, store: &Store) -> Claims {
    let mut c = Claims::attach(index.clone(), store, WINDOW).await.unwrap();
    c.catch_up().await.unwrap();
    c
}

#[tokio::test]
async fn two_writers_are_fenced_and_standbys_follow() {
    let nats = Nats::start();
    let store = store_alone(&nats, "fence").await;
    let (ia, ib) = (
        Arc::new(LocalIndex::open(None).unwrap()),
        Arc::new(LocalIndex::open(None).unwrap()),
    );
    let mut a = attach(&ia, &store).await;
    let mut b = attach(&ib, &store).await;
    a.record(vec![(key(1), rec(1, T0))]).await.unwrap();

    // b has not read a's append: its own is refused, and nothing of it is stored
    let err = b.record(vec![(key(2), rec(2, T0))]).await.unwrap_err();
    assert!(
        format!("{err:#}").contains("another process appended to the claim log"),
        "{err:#}"
    );
    assert_eq!(b.catch_up().await.unwrap(), 1);
    let seen = b.lookup(vec![key(1), key(2)]).await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[&key(1)], rec(1, T0));

    b.record(vec![(key(2), rec(2, T0))]).await.unwrap();
    assert_eq!(a.catch_up().await.unwrap(), 1);
    let seen = a.lookup(vec![key(1), key(2), key(3)]).await.unwrap();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[&key(2)], rec(2, T0));
}

/// Server memory must not grow per id: many claims are a few messages on one subject.
/// Past the in-memory limit the claims are written to the index in the background, and
/// look-ups meanwhile still see every one of them.
#[tokio::test]
async fn claims_are_few_large_messages_on_one_subject() {
    let nats = Nats::start();
    let store = store_alone(&nats, "compact").await;
    let index = Arc::new(LocalIndex::open(None).unwrap());
    let mut c = attach(&index, &store).await;
    let n = 120_000u32;
    let claims: Vec<_> = (0..n)
        .map(|i| (key(i), rec(u64::from(i) + 1, T0)))
        .collect();
    c.record(claims).await.unwrap();
    let mut log = store.claims.clone();
    let info = log.info().await.unwrap();
    assert_eq!(info.state.messages, 8, "120,000 claims at 16,384 a message");
    assert_eq!(info.state.subjects_count, 1);
    let found = c.lookup((0..n).map(key).collect()).await.unwrap();
    assert_eq!(found.len(), n as usize);
    assert_eq!(found[&key(n - 1)], rec(u64::from(n), T0));
    c.persist().await.unwrap();
    assert_eq!(c.stored().await.unwrap(), u64::from(n));
    assert_eq!(c.lookup((0..n).map(key).collect()).await.unwrap(), found);
    // no KV bucket per id exists any more
    let js = nats.client().await;
    assert!(js.get_key_value("compact-dedup").await.is_err());
}

#[tokio::test]
async fn the_index_survives_a_restart_but_not_a_new_log() {
    let nats = Nats::start();
    let dir = tempfile::tempdir().unwrap();
    let store = store_alone(&nats, "persist").await;
    {
        let index = Arc::new(LocalIndex::open(Some(dir.path())).unwrap());
        let err = LocalIndex::open(Some(dir.path())).err().unwrap();
        assert!(
            format!("{err:#}").contains("is in use by another kloudmeter process"),
            "{err:#}"
        );
        let mut c = attach(&index, &store).await;
        c.record((1..=3).map(|n| (key(n), rec(n.into(), T0))).collect())
            .await
            .unwrap();
        c.persist().await.unwrap();
    }
    // reopened: nothing to read from the log, everything found locally
    let index = Arc::new(LocalIndex::open(Some(dir.path())).unwrap());
    let mut c = Claims::attach(index.clone(), &store, WINDOW).await.unwrap();
    assert_eq!(c.stored().await.unwrap(), 3);
    assert_eq!(c.catch_up().await.unwrap(), 0);
    assert_eq!(c.lookup((1..=4).map(key).collect()).await.unwrap().len(), 3);
    drop(c);

    // a recreated claim log makes the local copy worthless: it is discarded
    let js = nats.client().await;
    js.delete_stream("persist-claims").await.unwrap();
    let store = store_alone(&nats, "persist").await;
    let mut c = Claims::attach(index, &store, WINDOW).await.unwrap();
    assert_eq!(c.stored().await.unwrap(), 0);
    assert!(c.lookup(vec![key(1)]).await.unwrap().is_empty());

    // ...also when that happens while the process runs: it follows the new log
    c.record(vec![(key(5), rec(1, T0))]).await.unwrap();
    c.persist().await.unwrap();
    js.delete_stream("persist-claims").await.unwrap();
    let store = store_alone(&nats, "persist").await;
    let mut other = Claims::attach(Arc::new(LocalIndex::open(None).unwrap()), &store, WINDOW)
        .await
        .unwrap();
    other.record(vec![(key(6), rec(2, T0))]).await.unwrap();
    assert_eq!(c.catch_up().await.unwrap(), 1);
    let seen = c.lookup(vec![key(5), key(6)]).await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[&key(6)], rec(2, T0));
}

#[tokio::test]
async fn claims_leave_the_index_after_the_window() {
    let nats = Nats::start();
    let store = store_alone(&nats, "expiry").await;
    let index = Arc::new(LocalIndex::open(None).unwrap());
    let mut c = attach(&index, &store).await;
    c.record(vec![
        (key(1), rec(1, T0)),
        (key(2), rec(2, T0 + 2 * SEC)),
        (key(3), rec(3, T0)),
    ])
    .await
    .unwrap();
    c.persist().await.unwrap();
    assert_eq!(c.stored().await.unwrap(), 3);
    // 72 s later (window 10 s + 60 s clock margin + 2 s): key 1 is out; key 2 is on the
    // boundary and stays; key 3 was claimed again and keeps its newer claim.
    c.record(vec![
        (key(3), rec(5, T0 + 72 * SEC)),
        (key(4), rec(6, T0 + 72 * SEC)),
    ])
    .await
    .unwrap();
    c.persist().await.unwrap();
    let found = c.lookup((1..=4).map(key).collect()).await.unwrap();
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(!found.contains_key(&key(1)));
    assert_eq!(found[&key(2)], rec(2, T0 + 2 * SEC));
    assert_eq!(found[&key(3)], rec(5, T0 + 72 * SEC));
    assert_eq!(c.stored().await.unwrap(), 3);
    // the rest of the first write's claims expire later: key 2 once the clock passes
    // 72 s after it
    c.record(vec![(key(5), rec(7, T0 + 73 * SEC))])
        .await
        .unwrap();
    c.persist().await.unwrap();
    let found = c.lookup((1..=5).map(key).collect()).await.unwrap();
    assert_eq!(found.len(), 3, "{found:?}");
    assert!(!found.contains_key(&key(2)));
    assert_eq!(c.stored().await.unwrap(), 3);

    // a standby that reads the whole log from the start agrees
    let other = Arc::new(LocalIndex::open(None).unwrap());
    let mut s = attach(&other, &store).await;
    s.persist().await.unwrap();
    assert_eq!(s.lookup((1..=5).map(key).collect()).await.unwrap(), found);
}

#[tokio::test]
async fn a_new_index_starts_from_the_snapshot_and_reads_only_the_log_after_it() {
    let nats = Nats::start();
    let store = store_alone(&nats, "snap").await;
    let mut leader = attach(&Arc::new(LocalIndex::open(None).unwrap()), &store).await;
    assert_eq!(
        leader.snapshot().await.unwrap(),
        None,
        "nothing to snapshot yet"
    );
    // one claim that leaves the window (10 s + 60 s margin) before the snapshot is taken
    let n = 40_000u32;
    let now = T0 + 100 * SEC;
    leader.record(vec![(key(n + 1), rec(1, T0))]).await.unwrap();
    leader
        .record(
            (0..n)
                .map(|i| (key(i), rec(u64::from(i) + 2, now)))
                .collect(),
        )
        .await
        .unwrap();
    leader.persist().await.unwrap();
    let taken = leader.snapshot().await.unwrap().unwrap();
    assert_eq!((taken.count, taken.newest_ns), (u64::from(n), now));
    // after the snapshot: a new id, and an id claimed again (the later claim wins)
    let after = vec![
        (key(n + 2), rec(50_000, now + SEC)),
        (key(7), rec(50_001, now + SEC)),
    ];
    leader.record(after).await.unwrap();
    let ids: Vec<IdKey> = (0..n + 3).map(key).collect();
    let want = leader.lookup(ids.clone()).await.unwrap();
    assert_eq!(want.len(), n as usize + 1);
    assert_eq!(want[&key(7)], rec(50_001, now + SEC));

    // an empty DATA_DIR: the snapshot as the lower layer, one log message read after it
    let dir = tempfile::tempdir().unwrap();
    let index = Arc::new(LocalIndex::open(Some(dir.path())).unwrap());
    let mut fresh = Claims::attach(index.clone(), &store, WINDOW).await.unwrap();
    assert_eq!(fresh.base_claims(), u64::from(n));
    assert_eq!(fresh.catch_up().await.unwrap(), 2);
    assert_eq!(fresh.lookup(ids.clone()).await.unwrap(), want);
    fresh.persist().await.unwrap();
    assert_eq!(
        fresh.stored().await.unwrap(),
        2,
        "the snapshot is never inserted"
    );
    drop(fresh);
    drop(index);
    // restarted on the same DATA_DIR: the layer is reopened, nothing is read again
    let index = Arc::new(LocalIndex::open(Some(dir.path())).unwrap());
    let mut again = Claims::attach(index, &store, WINDOW).await.unwrap();
    assert_eq!(again.base_claims(), u64::from(n));
    assert_eq!(again.catch_up().await.unwrap(), 0);
    assert_eq!(again.lookup(ids.clone()).await.unwrap(), want);

    // a snapshot of a layered index merges both layers
    let merged = again.snapshot().await.unwrap().unwrap();
    assert_eq!(merged.count, u64::from(n) + 1);
    let mut third = attach(&Arc::new(LocalIndex::open(None).unwrap()), &store).await;
    assert_eq!(third.base_claims(), u64::from(n) + 1);
    assert_eq!(third.lookup(ids.clone()).await.unwrap(), want);

    // once all of the snapshot has left the window, the layer goes
    third
        .record(vec![(key(n + 3), rec(50_002, now + 80 * SEC))])
        .await
        .unwrap();
    third.persist().await.unwrap();
    assert_eq!(third.base_claims(), 0);
    assert!(third.lookup(ids).await.unwrap().is_empty());
}
