use super::*;
use crate::domain::meter::{parse_meter_json, MeterDef};
use crate::domain::meter::{Aggregation, Path, WindowSize};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn meter(def: serde_json::Value) -> CompiledMeter {
    let def: MeterDef = parse_meter_json(&def, None).unwrap();
    CompiledMeter::compile(&def).unwrap()
}

fn ev(subject: &str, time: &str, data: serde_json::Value) -> Event {
    Event {
        id: format!("{subject}-{time}"),
        source: None,
        event_type: "t".into(),
        subject: subject.into(),
        time: DateTime::parse_from_rfc3339(time)
            .unwrap()
            .with_timezone(&Utc),
        data,
        namespace: None,
    }
}

/// Fold events (sequences 1..) into a fresh store in one pass.
fn fold_all(m: &CompiledMeter, events: &[Event]) -> (HashMap<ReadingKey, Reading>, Vec<Applied>) {
    let mut store = HashMap::new();
    let mut outcomes = vec![];
    for (i, e) in events.iter().enumerate() {
        let c = contribution(m, e);
        outcomes.push(apply(&mut store, m, i as u64 + 1, e, &c));
    }
    (store, outcomes)
}

fn value_of(
    store: &HashMap<ReadingKey, Reading>,
    key: ReadingKey,
    agg: Aggregation,
) -> Option<String> {
    store
        .get(&key)
        .and_then(|r| r.acc.value(agg))
        .map(|d| d.to_string())
}

fn total(m: &str, s: &str) -> ReadingKey {
    ReadingKey::SubjectTotal {
        meter: m.into(),
        subject: s.into(),
    }
}
fn summary(m: &str) -> ReadingKey {
    ReadingKey::Summary { meter: m.into() }
}
fn window(m: &str, s: &str, g: &str, start: &str) -> ReadingKey {
    let start = DateTime::parse_from_rfc3339(start).unwrap().timestamp();
    ReadingKey::Window {
        meter: m.into(),
        subject: s.into(),
        group: g.into(),
        rollup: None,
        start,
    }
}

fn sample() -> Vec<Event> {
    vec![
        ev(
            "c1",
            "2026-11-24T10:05:00Z",
            json!({"v": 10, "u": "a", "model": "x"}),
        ),
        ev(
            "c1",
            "2026-11-24T10:59:59Z",
            json!({"v": "2.5", "u": "b", "model": "y"}),
        ),
        ev(
            "c1",
            "2026-11-24T11:00:00Z",
            json!({"v": -4, "u": "a", "model": "x"}),
        ),
        ev(
            "c2",
            "2026-11-24T09:30:00Z",
            json!({"v": 7, "u": 1, "model": "x"}),
        ),
        // late and out of order: an earlier time than the events before it
        ev(
            "c1",
            "2026-11-24T10:30:00Z",
            json!({"v": 1, "u": "1", "model": "x"}),
        ),
    ]
}

#[test]
fn every_aggregation_on_hand_computed_values() {
    // per aggregation: (c1 total, c1 10:00 window, c1 11:00 window, c2 total, meter total)
    let expected = [
        ("count", ["4", "3", "1", "1", "5"]),
        ("sum", ["9.5", "13.5", "-4", "7", "16.5"]),
        ("avg", ["2.375", "4.5", "-4", "7", "3.3"]),
        ("min", ["-4", "1", "-4", "7", "-4"]),
        ("max", ["10", "10", "-4", "7", "10"]),
        // latest by event time, not arrival: c1's latest time is 11:00 (-4)
        ("latest", ["-4", "2.5", "-4", "7", "-4"]),
    ];
    for (agg, want) in expected {
        let m = meter(json!({"id":"m","eventType":"t","aggregation":agg,"valueProperty":"$.v"}));
        let (s, outcomes) = fold_all(&m, &sample());
        assert!(outcomes.iter().all(|o| *o == Applied::Counted), "{agg}");
        let a = m.def.aggregation;
        let got = [
            value_of(&s, total("m", "c1"), a),
            value_of(&s, window("m", "c1", "_", "2026-11-24T10:00:00Z"), a),
            value_of(&s, window("m", "c1", "_", "2026-11-24T11:00:00Z"), a),
            value_of(&s, total("m", "c2"), a),
            value_of(&s, summary("m"), a),
        ];
        let want: Vec<Option<String>> = want.iter().map(|w| Some(w.to_string())).collect();
        assert_eq!(got.to_vec(), want, "{agg}");
    }
}

#[test]
fn unique_count_counts_repeated_values_once() {
    let m =
        meter(json!({"id":"m","eventType":"t","aggregation":"unique_count","valueProperty":"$.u"}));
    let (s, _) = fold_all(&m, &sample());
    // c1 saw "a", "b", "a", "1"; c2 saw 1 (the number 1 and the string "1" are one value)
    assert_eq!(
        value_of(&s, total("m", "c1"), m.def.aggregation).as_deref(),
        Some("3")
    );
    assert_eq!(
        value_of(
            &s,
            window("m", "c1", "_", "2026-11-24T10:00:00Z"),
            m.def.aggregation
        )
        .as_deref(),
        Some("3")
    );
    assert_eq!(
        value_of(&s, summary("m"), m.def.aggregation).as_deref(),
        Some("3")
    );
    let sm = &s[&summary("m")];
    assert_eq!((sm.subjects, sm.acc.count, sm.invalid_events), (2, 5, 0));
}

#[test]
fn group_by_partitions_windows_and_missing_groups_under_null() {
    let m = meter(
        json!({"id":"m","eventType":"t","aggregation":"sum","valueProperty":"$.v","groupBy":{"model":"$.model","region":"$.region"}}),
    );
    let mut events = sample();
    events.push(ev("c1", "2026-11-24T10:10:00Z", json!({"v": 100})));
    let (s, _) = fold_all(&m, &events);
    let g = |model: serde_json::Value| {
        let mut map = BTreeMap::new();
        map.insert("model".to_string(), model);
        map.insert("region".to_string(), Value::Null);
        group_token(&map)
    };
    let a = m.def.aggregation;
    assert_eq!(
        value_of(
            &s,
            window("m", "c1", &g(json!("x")), "2026-11-24T10:00:00Z"),
            a
        )
        .as_deref(),
        Some("11")
    );
    assert_eq!(
        value_of(
            &s,
            window("m", "c1", &g(json!("y")), "2026-11-24T10:00:00Z"),
            a
        )
        .as_deref(),
        Some("2.5")
    );
    assert_eq!(
        value_of(
            &s,
            window("m", "c1", &g(Value::Null), "2026-11-24T10:00:00Z"),
            a
        )
        .as_deref(),
        Some("100")
    );
    let r = &s[&window("m", "c1", &g(Value::Null), "2026-11-24T10:00:00Z")];
    assert_eq!(r.group_by.get("model"), Some(&Value::Null));
    // the subject total merges all groups
    assert_eq!(value_of(&s, total("m", "c1"), a).as_deref(), Some("109.5"));
}

#[test]
fn windows_follow_the_meter_window_size() {
    let m = meter(json!({"id":"m","eventType":"t","aggregation":"count","windowSize":"DAY"}));
    let (s, _) = fold_all(&m, &sample());
    assert_eq!(
        value_of(
            &s,
            window("m", "c1", "_", "2026-11-24T00:00:00Z"),
            Aggregation::Count
        )
        .as_deref(),
        Some("4")
    );
    let m = meter(json!({"id":"m","eventType":"t","aggregation":"count","windowSize":"MINUTE"}));
    let (s, _) = fold_all(&m, &sample());
    assert_eq!(
        value_of(
            &s,
            window("m", "c1", "_", "2026-11-24T10:59:00Z"),
            Aggregation::Count
        )
        .as_deref(),
        Some("1")
    );
    assert_eq!(
        s.keys()
            .filter(|k| matches!(k, ReadingKey::Window { rollup: None, .. }))
            .count(),
        5
    );
}

#[test]
fn invalid_values_are_counted_and_block_nothing() {
    let m = meter(json!({"id":"m","eventType":"t","aggregation":"sum","valueProperty":"$.v"}));
    let events = vec![
        ev("c1", "2026-11-24T10:00:00Z", json!({"v": 1})),
        ev("c1", "2026-11-24T10:00:01Z", json!({})),
        ev("c1", "2026-11-24T10:00:02Z", json!({"v": "NaN"})),
        ev("c1", "2026-11-24T10:00:03Z", json!({"v": "Infinity"})),
        ev("c1", "2026-11-24T10:00:04Z", json!({"v": {"a": 1}})),
        ev("c1", "2026-11-24T10:00:05Z", json!({"v": "1e400"})),
        ev("c1", "2026-11-24T10:00:06Z", json!({"v": 1e300})),
        ev(
            "c1",
            "2026-11-24T10:00:07Z",
            json!({"v": "70000000000000000000000000000"}),
        ),
        ev(
            "c1",
            "2026-11-24T10:00:08Z",
            json!({"v": "70000000000000000000000000000"}),
        ),
        ev("c1", "2026-11-24T10:00:09Z", json!({"v": "2"})),
    ];
    let (s, outcomes) = fold_all(&m, &events);
    let invalid: Vec<usize> = outcomes
        .iter()
        .enumerate()
        .filter(|(_, o)| matches!(o, Applied::Invalid(_)))
        .map(|(i, _)| i)
        .collect();
    // the second 7e28 would overflow the exact range: invalid, not a wrong sum
    assert_eq!(invalid, vec![1, 2, 3, 4, 5, 6, 8]);
    let Applied::Invalid(why) = &outcomes[1] else {
        unreachable!()
    };
    assert_eq!(why, "valueProperty $.v: missing");
    assert_eq!(
        value_of(&s, total("m", "c1"), Aggregation::Sum).as_deref(),
        Some("70000000000000000000000000003")
    );
    assert_eq!(s[&summary("m")].invalid_events, 7);
    assert_eq!(s[&summary("m")].acc.count, 3);
}

#[test]
fn hour_windows_keep_quarters_only_while_they_hold_every_event() {
    let m = meter(json!({"id":"m","eventType":"t","aggregation":"sum","valueProperty":"$.v"}));
    let events = [
        ev("c", "2026-11-24T10:05:00Z", json!({"v": 1})),
        ev("c", "2026-11-24T10:35:00Z", json!({"v": 2})),
        ev("c", "2026-11-24T10:50:00Z", json!({"v": 4})),
    ];
    // while every event is in one quarter, the hour says which, and is that quarter
    let (s, _) = fold_all(&m, &events[..1]);
    let hour = &s[&window("m", "c", "_", "2026-11-24T10:00:00Z")];
    assert_eq!((hour.only_part, hour.parts.len()), (Some(0), 0));
    let part = |r: &Reading, lo, hi| r.part(lo..hi).map(|a| a.sum.to_string());
    assert_eq!(
        (part(hour, 0, 1), part(hour, 1, 4)),
        (Some("1".into()), Some("0".into()))
    );
    // a second quarter spells them out
    let (s, _) = fold_all(&m, &events);
    let hour = &s[&window("m", "c", "_", "2026-11-24T10:00:00Z")];
    assert_eq!(hour.only_part, None);
    let sums: Vec<Option<String>> = hour
        .parts
        .iter()
        .map(|q| q.as_ref().map(|q| q.sum.to_string()))
        .collect();
    assert_eq!(
        sums,
        [Some("1".into()), None, Some("2".into()), Some("4".into())]
    );
    // a quarter keeps only what the aggregation reads: the hour keeps everything
    let first = hour.parts[0].as_ref().unwrap();
    assert_eq!(
        (
            first.min,
            first.max,
            first.latest.is_some(),
            hour.acc.latest.is_some()
        ),
        (None, None, false, true)
    );
    assert_eq!(part(hour, 2, 4).as_deref(), Some("6"));
    // totals keep none
    let total = &s[&total("m", "c")];
    assert_eq!((total.only_part, total.parts.len()), (None, 0));
    // a window written before quarters existed: its events are in no quarter, and new
    // ones do not start a partial set
    let mut legacy = hour.clone();
    legacy.parts.clear();
    assert_eq!(part(&legacy, 0, 2), None);
    let mut store = HashMap::from([(window("m", "c", "_", "2026-11-24T10:00:00Z"), legacy)]);
    let late = ev("c", "2026-11-24T10:10:00Z", json!({"v": 8}));
    apply(&mut store, &m, 9, &late, &contribution(&m, &late));
    let legacy = &store[&window("m", "c", "_", "2026-11-24T10:00:00Z")];
    assert_eq!(
        (legacy.acc.sum.to_string(), part(legacy, 0, 1)),
        ("15".into(), None)
    );
    // DAY windows keep none (their month rollup keeps its days)
    let daily = meter(
        json!({"id":"m","eventType":"t","aggregation":"sum","valueProperty":"$.v","windowSize":"DAY"}),
    );
    let (s, _) = fold_all(&daily, &events);
    let with_parts: Vec<(&ReadingKey, Option<u8>)> = s
        .iter()
        .filter(|(_, r)| !r.parts.is_empty() || r.only_part.is_some())
        .map(|(k, r)| (k, r.only_part))
        .collect();
    assert!(
        matches!(
            with_parts[..],
            [(
                ReadingKey::Window {
                    rollup: Some(crate::domain::window::Rollup::Month),
                    ..
                },
                Some(23)
            )]
        ),
        "{with_parts:?}"
    );
}

#[test]
fn quarters_give_way_when_distinct_sets_outgrow_the_budget() {
    let m =
        meter(json!({"id":"m","eventType":"t","aggregation":"unique_count","valueProperty":"$.u"}));
    let key = window("m", "c", "_", "2026-11-24T10:00:00Z");
    let mut store = HashMap::new();
    // every value twice in the hour (in its own set and in a quarter's, the events
    // spanning two quarters): the budget is spent at DISTINCT_CAP / 2 values
    let n = DISTINCT_CAP / 2 + 1;
    for i in 0..n {
        let at = if i % 2 == 0 {
            "2026-11-24T10:20:00Z"
        } else {
            "2026-11-24T10:40:00Z"
        };
        let e = ev("c", at, json!({"u": i}));
        apply(&mut store, &m, i as u64 + 1, &e, &contribution(&m, &e));
        if i + 1 == n - 1 {
            let whole = store[&key].part(0..4);
            assert_eq!(
                whole.map(|a| a.distinct.map(|d| d.count())),
                Some(Some(n as u64 - 1))
            );
        }
    }
    let r = &store[&key];
    assert_eq!(
        (r.acc.value(Aggregation::UniqueCount), r.part(0..4)),
        (Some(rust_decimal::Decimal::from(n)), None)
    );
    // in one quarter they cost nothing: the hour is that quarter
    let mut store = HashMap::new();
    for i in 0..n {
        let e = ev("c", "2026-11-24T10:20:00Z", json!({"u": i}));
        apply(&mut store, &m, i as u64 + 1, &e, &contribution(&m, &e));
    }
    let part = store[&key]
        .part(1..2)
        .and_then(|a| a.distinct)
        .map(|d| d.count());
    assert_eq!(part, Some(n as u64));
}

#[test]
fn subject_totals_keep_the_days_of_their_events() {
    let m = meter(json!({"id":"m","eventType":"t","aggregation":"count"}));
    let events = [
        ev("c", "2026-11-24T23:59:59Z", json!({})),
        ev("c", "2026-11-26T00:00:00Z", json!({})),
        ev("c", "2026-11-25T12:00:00Z", json!({})),
        ev("d", "2026-11-01T00:00:00Z", json!({})),
    ];
    let (s, _) = fold_all(&m, &events);
    let days = s[&total("m", "c")].days.clone().unwrap();
    // 24 to 26 November, one run: windows of those days only are worth reading
    assert_eq!(days.runs(), 1);
    let at = |t: &str| chrono::DateTime::parse_from_rfc3339(t).unwrap().timestamp();
    assert!(days.touches(at("2026-11-24T23:00:00Z"), at("2026-11-25T00:00:00Z")));
    assert!(!days.touches(at("2026-11-23T00:00:00Z"), at("2026-11-24T00:00:00Z")));
    assert!(!days.touches(at("2026-11-27T00:00:00Z"), at("2026-12-01T00:00:00Z")));
    assert!(s[&total("m", "d")]
        .days
        .as_ref()
        .unwrap()
        .touches(at("2026-11-01T00:00:00Z"), at("2026-11-01T00:00:01Z")));
    // windows and summaries keep none
    assert!(s[&summary("m")].days.is_none());
    // a total written before days were kept never starts a partial set
    let mut legacy = s[&total("m", "c")].clone();
    legacy.days = None;
    legacy.note_day(chrono::Utc::now());
    assert!(legacy.days.is_none());
}

#[test]
fn sums_are_exact_decimals() {
    let m = meter(json!({"id":"m","eventType":"t","aggregation":"sum","valueProperty":"$.v"}));
    let e = ev("c", "2026-11-24T10:00:00Z", json!({"v": 0.1}));
    let c = contribution(&m, &e);
    let mut store = HashMap::new();
    for seq in 1..=100_000u64 {
        apply(&mut store, &m, seq, &e, &c);
    }
    assert_eq!(
        value_of(&store, total("m", "c"), Aggregation::Sum).as_deref(),
        Some("10000")
    );
}

#[test]
fn distinct_sets_round_trip_compactly() {
    let mut d = Distinct::default();
    for i in 0..1000u64 {
        d.insert(xxhash_rust::xxh3::xxh3_64(&i.to_le_bytes()));
    }
    d.insert(0);
    d.insert(u64::MAX);
    let text = serde_json::to_string(&d).unwrap();
    let back: Distinct = serde_json::from_str(&text).unwrap();
    assert_eq!(back, d);
    assert!(text.len() < 1002 * 12, "{}", text.len());
}

// ---- properties of the fold ----

fn arb_events() -> impl Strategy<Value = Vec<Event>> {
    let one = (
        0u8..3,
        // mostly within two hours; some anywhere in 40 days (a month boundary between)
        prop_oneof![3 => 0i64..7200, 1 => 0i64..3_456_000],
        prop_oneof![Just(None), (-50i64..50).prop_map(Some)],
        0u8..3,
    )
        .prop_map(|(s, secs, v, g)| {
            let mut data = serde_json::Map::new();
            if let Some(v) = v {
                data.insert("v".into(), json!(v));
                data.insert("u".into(), json!(format!("u{}", v.rem_euclid(5))));
            }
            data.insert("g".into(), json!(g));
            Event {
                id: String::new(),
                source: None,
                event_type: "t".into(),
                subject: format!("s{s}"),
                time: DateTime::from_timestamp(1_790_000_000 + secs, 0).unwrap(),
                data: Value::Object(data),
                namespace: None,
            }
        });
    proptest::collection::vec(one, 0..40)
}

fn arb_meter() -> impl Strategy<Value = CompiledMeter> {
    (prop::sample::select(vec!["count", "sum", "avg", "min", "max", "unique_count", "latest"]), any::<bool>(), prop::sample::select(vec!["MINUTE", "HOUR"])).prop_map(|(agg, grouped, size)| {
        let vp = if agg == "unique_count" { "$.u" } else { "$.v" };
        let mut def = json!({"id":"m","eventType":"t","aggregation":agg,"valueProperty":vp,"windowSize":size});
        if grouped {
            def["groupBy"] = json!({"g": "$.g"});
        }
        meter(def)
    })
}

/// The aggregator's loop in miniature: load the touched readings from `store`, apply a
/// batch, and persist the changed readings whose index `persist` allows (a crash in the
/// middle of writing persists only some of them).
fn run_batch(
    store: &mut HashMap<ReadingKey, Reading>,
    m: &CompiledMeter,
    batch: &[(u64, Event)],
    persist: &dyn Fn(usize) -> bool,
) {
    let mut work: HashMap<ReadingKey, Reading> = HashMap::new();
    for (seq, e) in batch {
        let c = contribution(m, e);
        for k in keys_for(m, e, &c) {
            if let Some(r) = store.get(&k) {
                work.entry(k).or_insert_with(|| r.clone());
            }
        }
        apply(&mut work, m, *seq, e, &c);
    }
    let mut changed: Vec<_> = work
        .into_iter()
        .filter(|(k, r)| store.get(k) != Some(r))
        .collect();
    changed.sort_by(|a, b| a.0.cmp(&b.0));
    for (i, (k, r)) in changed.into_iter().enumerate() {
        if persist(i) {
            store.insert(k, r);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn batching_replays_and_partial_writes_never_change_readings(
        m in arb_meter(),
        events in arb_events(),
        cuts in proptest::collection::vec(0usize..40, 0..6),
        replay_from in 0usize..40,
        crash_mask in any::<u64>(),
    ) {
        let seqd: Vec<(u64, Event)> = events.iter().cloned().enumerate().map(|(i, e)| (i as u64 + 1, e)).collect();
        let (expected, _) = fold_all(&m, &events);

        // split into batches at arbitrary cut points
        let mut cuts: Vec<usize> = cuts.into_iter().filter(|c| *c < seqd.len()).collect();
        cuts.push(seqd.len());
        cuts.sort();
        cuts.dedup();
        let mut store = HashMap::new();
        let mut start = 0;
        for &end in &cuts {
            let batch = &seqd[start..end];
            // a crash while writing: some readings of the batch persisted, then the
            // whole batch is redelivered
            run_batch(&mut store, &m, batch, &|i| crash_mask >> (i % 64) & 1 == 1);
            run_batch(&mut store, &m, batch, &|_| true);
            start = end;
        }
        prop_assert_eq!(&store, &expected);

        // replaying any suffix again (a second leader, a restart from an old cursor)
        let from = replay_from.min(seqd.len());
        run_batch(&mut store, &m, &seqd[from..], &|_| true);
        prop_assert_eq!(&store, &expected);
    }

    #[test]
    fn merged_windows_equal_the_subject_total_and_rollups(m in arb_meter(), events in arb_events()) {
        let (store, _) = fold_all(&m, &events);
        let agg = m.def.aggregation;
        let mut per_subject: HashMap<String, Acc> = HashMap::new();
        // every rollup equals the merge of the base windows inside it
        let mut per_rollup: HashMap<(String, String, crate::domain::window::Rollup, i64), Acc> = HashMap::new();
        for (k, r) in &store {
            if let ReadingKey::Window { subject, group, rollup: None, start, .. } = k {
                per_subject.entry(subject.to_string()).or_default().merge(&r.acc);
                for &ru in m.def.window_size.rollups() {
                    per_rollup.entry((subject.to_string(), group.to_string(), ru, ru.start(*start))).or_default().merge(&r.acc);
                }
            }
        }
        for (subject, merged) in &per_subject {
            let t = &store[&total("m", subject)];
            prop_assert_eq!(merged.value(agg), t.acc.value(agg));
        }
        let rollups = store.keys().filter(|k| matches!(k, ReadingKey::Window { rollup: Some(_), .. })).count();
        prop_assert_eq!(rollups, per_rollup.len());
        for ((subject, group, ru, start), merged) in per_rollup {
            let key = ReadingKey::Window { meter: "m".into(), subject: subject.clone().into(), group: group.clone().into(), rollup: Some(ru), start };
            let r = &store[&key];
            prop_assert_eq!(r.acc.value(agg), merged.value(agg));
            // a day's hours and a month's days each equal the base windows inside them,
            // and a run of them the merge of those
            let Some(split) = ru.split() else { continue };
            let unit = split.unit();
            let inside = |lo: usize, hi: usize| {
                let mut expected = Acc::default();
                for (k, w) in &store {
                    if let ReadingKey::Window { subject: s2, group: g2, rollup: None, start: t, .. } = k {
                        // (a month of fewer than 31 days: its last parts stay empty)
                        let (lo, hi) = (start + unit * lo as i64, (start + unit * hi as i64).min(ru.next(start)));
                        if **s2 == *subject && **g2 == *group && (lo..hi).contains(t) {
                            expected.merge(&w.acc);
                        }
                    }
                }
                Some((expected.count, expected.value(agg)))
            };
            for (lo, hi) in (0..split.parts()).map(|p| (p, p + 1)).chain([(0, split.parts()), (1, split.parts() / 2)]) {
                prop_assert_eq!(r.part(lo..hi).map(|a| (a.count, a.value(agg))), inside(lo, hi), "{:?} parts {}..{}", ru, lo, hi);
            }
        }
        // an HOUR window's quarters each equal the MINUTE windows inside them, and any
        // run of them the merge of those minutes
        if m.def.window_size == WindowSize::Hour {
            let minutely = CompiledMeter::compile(&MeterDef { window_size: WindowSize::Minute, ..m.def.clone() }).unwrap();
            let (minutes, _) = fold_all(&minutely, &events);
            for (k, r) in &store {
                let ReadingKey::Window { subject, group, rollup: None, start, .. } = k else { continue };
                for (lo, hi) in [(0, 1), (1, 2), (2, 3), (3, 4), (0, 2), (1, 4), (0, 4)] {
                    let mut expected = Acc::default();
                    for (mk, mr) in &minutes {
                        if let ReadingKey::Window { subject: s2, group: g2, rollup: None, start: t, .. } = mk {
                            if s2 == subject && g2 == group && (start + 900 * lo..start + 900 * hi).contains(t) {
                                expected.merge(&mr.acc);
                            }
                        }
                    }
                    let part = r.part(lo as usize..hi as usize);
                    prop_assert_eq!(part.map(|a| (a.count, a.value(agg))), Some((expected.count, expected.value(agg))));
                }
            }
        }
    }
}

#[test]
fn plain_field_paths_walk_the_same_values_as_the_jsonpath_engine() {
    let docs = [
        json!({"a": {"b": 3, "c": [1, 2]}, "x_1": null}),
        json!({"a": [{"b": 1}], "x_1": "s"}),
        json!({"a": 5}),
        json!([{"a": {"b": 2}}]),
        json!("plain"),
        json!({"a": {"b": {"c": {"d": true}}}}),
        json!({}),
    ];
    for p in ["$.a", "$.a.b", "$.a.c", "$.x_1", "$.a.b.c.d", "$.missing.b"] {
        let fast = crate::domain::meter::CompiledMeter::compile(
            &parse_meter_json(
                &json!({"id":"m","eventType":"t","aggregation":"sum","valueProperty": p}),
                None,
            )
            .unwrap(),
        )
        .unwrap()
        .value_path
        .unwrap();
        assert!(
            matches!(fast, Path::Fields(_)),
            "{p} should take the fast path"
        );
        let engine = Path::Query(jsonpath_rust::parser::parse_json_path(p).unwrap());
        for d in &docs {
            assert_eq!(first_match(&fast, d), first_match(&engine, d), "{p} on {d}");
        }
    }
    // anything else keeps the engine
    for p in ["$", "$.a[0]", "$['a']", "$..b", "$.a-b", "$.1"] {
        let def = json!({"id":"m","eventType":"t","aggregation":"sum","valueProperty": p});
        if let Ok(def) = parse_meter_json(&def, None) {
            if let Ok(m) = CompiledMeter::compile(&def) {
                assert!(matches!(m.value_path, Some(Path::Query(_))), "{p}");
            }
        }
    }
}

#[test]
fn group_hash_is_the_hash_of_the_group_values_map() {
    let m = meter(
        json!({"id":"m","eventType":"t","aggregation":"count","groupBy":{"z":"$.z","a":"$.a.b","q-1":"$.q"}}),
    );
    for data in [
        json!({"z": "x\"y", "a": {"b": [1, {"k": 2.5}]}}),
        json!({"z": null}),
        json!({"q": {"b": 1, "a": 2}, "z": 1e300, "a": {"b": "ü\n"}}),
    ] {
        let e = ev("s", "2026-11-24T10:00:00Z", data);
        let values = group_values(&m, &e);
        assert_eq!(token_of(group_hash(&m, &e)), group_token(&values));
    }
    let plain = meter(json!({"id":"m","eventType":"t","aggregation":"count"}));
    let e = ev("s", "2026-11-24T10:00:00Z", json!({}));
    assert_eq!(group_hash(&plain, &e), None);
    assert_eq!(group_token(&group_values(&plain, &e)), "_");
}

/// The aggregator's way of folding: readings in [`crate::aggregate::cache::Cache`] slots, loaded
/// from a stand-in for KV when first touched, written back (dirty ones) at `flush_at`
/// and then forgotten, as when the cache outgrows its limit.
fn fold_through_cache(
    m: &CompiledMeter,
    events: &[Event],
    flush_at: &[usize],
) -> (HashMap<ReadingKey, Reading>, Vec<Applied>) {
    use crate::aggregate::cache::Cache;
    let mut cache = Cache::default();
    let mut kv: HashMap<ReadingKey, Reading> = HashMap::new();
    let write_back = |cache: &mut Cache, kv: &mut HashMap<ReadingKey, Reading>| {
        for i in cache.take_dirty() {
            let slot = cache.slot(i);
            kv.insert(slot.key.clone(), slot.reading.clone());
        }
    };
    let load = |cache: &mut Cache, kv: &HashMap<ReadingKey, Reading>| {
        for i in cache.take_unloaded() {
            let stored = kv.get(&cache.slot(i).key).map(|r| (r.clone(), 1));
            cache.loaded(i, stored);
        }
    };
    let mut outcomes = vec![];
    for (i, e) in events.iter().enumerate() {
        if flush_at.contains(&i) {
            write_back(&mut cache, &mut kv);
            cache.clear();
        }
        let seq = i as u64 + 1;
        let outcome = match contribution(m, e) {
            Contribution::Valid { value, group } => {
                let slots = cache.touch(
                    m,
                    &e.subject,
                    group,
                    || group_values(m, e),
                    e.time.timestamp(),
                );
                load(&mut cache, &kv);
                let g = slots.group.as_deref().map(|g| Group {
                    token: &g.token,
                    values: &g.values,
                });
                let applied = apply_valid(
                    &mut cache.touched(&slots),
                    seq,
                    e.time,
                    &value,
                    g,
                    Detail::of(m),
                );
                match applied {
                    Applied::Counted => slots.slots().iter().for_each(|&s| cache.mark_dirty(s)),
                    Applied::Invalid(_) => cache.mark_dirty(slots.slots()[0]),
                    Applied::AlreadyApplied | Applied::Filtered => {}
                }
                applied
            }
            Contribution::Filtered => Applied::Filtered,
            Contribution::Invalid(why) => {
                let s = cache.summary(m);
                load(&mut cache, &kv);
                let applied = apply_invalid(cache.reading_mut(s), seq, &why);
                cache.mark_dirty(s);
                applied
            }
        };
        outcomes.push(outcome);
    }
    write_back(&mut cache, &mut kv);
    (kv, outcomes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn the_slot_cache_folds_exactly_like_the_map_of_keys(
        m in arb_meter(),
        events in arb_events(),
        flush_at in proptest::collection::vec(0usize..40, 0..4),
    ) {
        let expected = fold_all(&m, &events);
        prop_assert_eq!(fold_through_cache(&m, &events, &flush_at), expected);
    }
}

#[test]
fn the_slot_cache_reuses_slots_within_a_window_and_moves_with_time() {
    let m = meter(
        json!({"id":"m","eventType":"t","aggregation":"sum","valueProperty":"$.v","groupBy":{"g":"$.g"},"windowSize":"MINUTE"}),
    );
    let mut cache = crate::aggregate::cache::Cache::default();
    let mut touch = |subject: &str, g: &str, time: &str| {
        let e = ev(subject, time, json!({"v": 1, "g": g}));
        let Contribution::Valid { group, .. } = contribution(&m, &e) else {
            panic!()
        };
        cache
            .touch(
                &m,
                subject,
                group,
                || group_values(&m, &e),
                e.time.timestamp(),
            )
            .slots()
            .to_vec()
    };
    let a = touch("s1", "x", "2026-11-24T10:00:01Z");
    // summary, total, minute, hour, day, month, the group's total
    assert_eq!(a.len(), 7);
    assert_eq!(touch("s1", "x", "2026-11-24T10:00:59Z"), a);
    let next_minute = touch("s1", "x", "2026-11-24T10:01:00Z");
    assert_eq!((&next_minute[..2], &next_minute[3..]), (&a[..2], &a[3..]));
    assert_ne!(next_minute[2], a[2]);
    // back to the first minute: the same slot again, found through its key
    assert_eq!(touch("s1", "x", "2026-11-24T10:00:30Z"), a);
    let other_group = touch("s1", "y", "2026-11-24T10:00:30Z");
    assert_eq!(&other_group[..2], &a[..2]);
    assert!(other_group[2..].iter().all(|s| !a.contains(s)));
    let other_subject = touch("s2", "x", "2026-11-24T10:00:30Z");
    assert_eq!(other_subject[0], a[0]);
    assert!(other_subject[1..].iter().all(|s| !a.contains(s)));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn meters_said_to_share_a_contribution_get_the_same_one_from_every_event(
        a in arb_meter(),
        b in arb_meter(),
        events in arb_events(),
    ) {
        if same_contribution(&a, &b) {
            for e in &events {
                prop_assert_eq!(contribution(&a, e), contribution(&b, e));
            }
        }
    }
}

#[test]
fn contribution_sharing_tells_kinds_properties_and_groups_apart() {
    let m = |agg: &str, v: Option<&str>, g: serde_json::Value| {
        let mut def = json!({"id":"m","eventType":"t","aggregation":agg,"groupBy":g});
        if let Some(v) = v {
            def["valueProperty"] = json!(v);
        }
        meter(def)
    };
    let g = json!({"g":"$.g"});
    assert!(same_contribution(
        &m("sum", Some("$.v"), g.clone()),
        &m("max", Some("$.v"), g.clone())
    ));
    assert!(same_contribution(
        &m("count", None, g.clone()),
        &m("count", Some("$.x"), g.clone())
    ));
    assert!(!same_contribution(
        &m("sum", Some("$.v"), g.clone()),
        &m("sum", Some("$.w"), g.clone())
    ));
    assert!(!same_contribution(
        &m("sum", Some("$.v"), g.clone()),
        &m("unique_count", Some("$.v"), g.clone())
    ));
    assert!(!same_contribution(
        &m("sum", Some("$.v"), g.clone()),
        &m("count", Some("$.v"), g.clone())
    ));
    assert!(!same_contribution(
        &m("sum", Some("$.v"), g),
        &m("sum", Some("$.v"), json!({"h":"$.g"}))
    ));
}

proptest! {
    /// A stored time reads back as what was written, through the fast path for chrono's
    /// own format; any other RFC 3339 shape reads as chrono reads it.
    #[test]
    fn stored_times_read_back_exactly(secs in -62_000_000_000i64..250_000_000_000, nanos in 0u32..1_000_000_000, offset in -50_400i32..50_400) {
        let time = chrono::DateTime::from_timestamp(secs, nanos).unwrap();
        let latest = Latest { value: 1.into(), time, seq: 7 };
        let json = serde_json::to_string(&latest).unwrap();
        prop_assert_eq!(serde_json::from_str::<Latest>(&json).unwrap(), latest);
        let zoned = time
            .with_timezone(&chrono::FixedOffset::east_opt(offset - offset % 60).unwrap())
            .to_rfc3339();
        let read: Latest = serde_json::from_value(json!({"value": "1", "time": zoned, "seq": 7})).unwrap();
        prop_assert_eq!(read.time, time);
    }
}

#[test]
fn stored_times_that_are_no_times_are_refused() {
    for bad in [
        "2026-02-30T00:00:00Z",
        "2026-11-24T24:00:00Z",
        "2026-11-24T10:05:00.Z",
        "2026-11-24T10:05:00+25:00",
        "yesterday",
    ] {
        let r = serde_json::from_value::<Latest>(json!({"value": "1", "time": bad, "seq": 7}));
        assert!(r.is_err(), "{bad}");
    }
}
