//! Usage queries through the real pipeline (HTTP → JetStream → aggregator → KV → query).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::common::*;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

async fn setup(stream: &str, meters: &[Value], events: &[Value]) -> (Nats, Km) {
    setup_with(stream, &[], meters, events).await
}

async fn setup_with(
    stream: &str,
    env: &[(&str, &str)],
    meters: &[Value],
    events: &[Value],
) -> (Nats, Km) {
    let nats = Nats::start();
    let km = Km::start(&nats, stream, env).await;
    for m in meters {
        let (s, b) = post(&km.url("/api/v1/meters"), m).await;
        assert_eq!(s, 201, "{b}");
    }
    for chunk in events.chunks(500) {
        let (s, b) = post(&km.url("/api/v1/events"), &Value::Array(chunk.to_vec())).await;
        assert_eq!(s, 202, "{b}");
    }
    caught_up(&nats.client().await, stream, T).await;
    for m in meters {
        let id = m["id"].as_str().unwrap().to_string();
        wait_for("meter ready", T, || async {
            meter_reading(&km, &id).await["ready"] == json!(true)
        })
        .await;
    }
    (nats, km)
}

async fn query(km: &Km, meter: &str, params: &str) -> Value {
    let (s, b) = get(&km.url(&format!("/api/v1/meters/{meter}/query?{params}"))).await;
    assert_eq!(s, 200, "{params}: {b}");
    b
}

/// Rows as (windowStart, subject, groupBy, value) for compact comparison.
fn rows(b: &Value) -> Vec<(String, String, String, String)> {
    b["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["windowStart"].as_str().unwrap().to_string(),
                r["subject"].as_str().unwrap().to_string(),
                r["groupBy"].to_string(),
                r["value"].as_str().unwrap_or("null").to_string(),
            )
        })
        .collect()
}

fn row(w: &str, s: &str, g: Value, v: &str) -> (String, String, String, String) {
    (w.to_string(), s.to_string(), g.to_string(), v.to_string())
}

/// A query's answer as CSV (`accept: text/csv`), read to its end.
async fn csv_of(url: &str) -> String {
    reqwest::Client::new()
        .get(url)
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn ev(id: usize, subject: &str, time: &str, data: Value) -> Value {
    json!({"id": format!("q{id}"), "eventType": "use", "subject": subject, "time": time, "data": data})
}

#[tokio::test]
async fn every_aggregation_at_every_window_size() {
    let aggs = [
        "count",
        "sum",
        "avg",
        "min",
        "max",
        "unique_count",
        "latest",
    ];
    let meters: Vec<Value> = aggs
        .iter()
        .map(|a| {
            let vp = if *a == "unique_count" { "$.u" } else { "$.v" };
            json!({"id": a, "eventType": "use", "aggregation": a, "valueProperty": vp, "groupBy": {"model": "$.model"}, "windowSize": "MINUTE"})
        })
        .collect();
    // c1: three events in one minute and one an hour later, then one on the next day;
    // c2: one event.
    let events = vec![
        ev(
            1,
            "c1",
            "2026-11-24T10:00:05Z",
            json!({"v": 4, "u": "a", "model": "x"}),
        ),
        ev(
            2,
            "c1",
            "2026-11-24T10:00:50Z",
            json!({"v": "1.5", "u": "b", "model": "y"}),
        ),
        ev(
            3,
            "c1",
            "2026-11-24T10:00:30Z",
            json!({"v": 10, "u": "a", "model": "x"}),
        ),
        ev(
            4,
            "c1",
            "2026-11-24T11:20:00Z",
            json!({"v": -2, "u": "a", "model": "x"}),
        ),
        ev(
            5,
            "c1",
            "2026-11-25T09:00:00Z",
            json!({"v": 7, "u": "c", "model": "y"}),
        ),
        ev(
            6,
            "c2",
            "2026-11-24T10:00:00Z",
            json!({"v": 3, "u": "z", "model": "x"}),
        ),
    ];
    let (_nats, km) = setup("qa", &meters, &events).await;
    let range = "from=2026-11-24T00:00:00Z&to=2026-11-26T00:00:00Z";
    // per aggregation: c1 at MINUTE 10:00 (3 events), c1 at HOUR 11:00, c1 per DAY (24th, 25th), c1 whole range, c2 whole range
    let expected = [
        ("count", ["3", "1", "4", "1", "5", "1"]),
        ("sum", ["15.5", "-2", "13.5", "7", "20.5", "3"]),
        (
            "avg",
            [
                "5.1666666666666666666666666667",
                "-2",
                "3.375",
                "7",
                "4.1",
                "3",
            ],
        ),
        ("min", ["1.5", "-2", "-2", "7", "-2", "3"]),
        ("max", ["10", "-2", "10", "7", "10", "3"]),
        ("unique_count", ["2", "1", "2", "1", "3", "1"]),
        // latest by event time: 10:00:50 in the first minute
        ("latest", ["1.5", "-2", "-2", "7", "7", "3"]),
    ];
    for (agg, want) in expected {
        let minute = query(&km, agg, &format!("{range}&windowSize=MINUTE&subject=c1")).await;
        assert_eq!(
            rows(&minute)[0],
            row("2026-11-24T10:00:00Z", "c1", json!({}), want[0]),
            "{agg} minute"
        );
        assert_eq!(rows(&minute).len(), 3, "{agg}: three minutes with events");
        let hour = query(&km, agg, &format!("{range}&windowSize=HOUR&subject=c1")).await;
        assert_eq!(
            rows(&hour)[1],
            row("2026-11-24T11:00:00Z", "c1", json!({}), want[1]),
            "{agg} hour"
        );
        let day = query(&km, agg, &format!("{range}&windowSize=DAY&subject=c1")).await;
        assert_eq!(
            rows(&day),
            vec![
                row("2026-11-24T00:00:00Z", "c1", json!({}), want[2]),
                row("2026-11-25T00:00:00Z", "c1", json!({}), want[3])
            ],
            "{agg} day"
        );
        let month = query(&km, agg, &format!("{range}&windowSize=MONTH&subject=c1")).await;
        assert_eq!(
            rows(&month),
            vec![row("2026-11-24T00:00:00Z", "c1", json!({}), want[4])],
            "{agg} month"
        );
        let all = query(&km, agg, range).await;
        assert_eq!(
            rows(&all),
            vec![
                row("2026-11-24T00:00:00Z", "c1", json!({}), want[4]),
                row("2026-11-24T00:00:00Z", "c2", json!({}), want[5])
            ],
            "{agg} total"
        );
        assert_eq!(all["data"][0]["windowEnd"], json!("2026-11-26T00:00:00Z"));
    }
    // groupBy and filterGroupBy
    let by = query(&km, "sum", &format!("{range}&groupBy=model&subject=c1")).await;
    assert_eq!(
        rows(&by),
        vec![
            row("2026-11-24T00:00:00Z", "c1", json!({"model": "x"}), "12"),
            row("2026-11-24T00:00:00Z", "c1", json!({"model": "y"}), "8.5")
        ]
    );
    let filtered = query(&km, "sum", &format!("{range}&filterGroupBy[model]=x")).await;
    assert_eq!(
        rows(&filtered),
        vec![
            row("2026-11-24T00:00:00Z", "c1", json!({}), "12"),
            row("2026-11-24T00:00:00Z", "c2", json!({}), "3")
        ]
    );
    // CSV
    let csv = reqwest::Client::new()
        .get(km.url(&format!(
            "/api/v1/meters/sum/query?{range}&windowSize=DAY&groupBy=model&subject=c1"
        )))
        .header("accept", "text/csv")
        .send()
        .await
        .unwrap();
    assert_eq!(csv.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        csv.text().await.unwrap(),
        "windowStart,windowEnd,subject,model,value\n\
         2026-11-24T00:00:00Z,2026-11-25T00:00:00Z,c1,x,12\n\
         2026-11-24T00:00:00Z,2026-11-25T00:00:00Z,c1,y,1.5\n\
         2026-11-25T00:00:00Z,2026-11-26T00:00:00Z,c1,y,7\n"
    );
    // errors name the parameter
    for (params, want) in [
        ("", "from: is required"),
        (
            "from=2026-11-24T00:00:00Z&to=2026-11-23T00:00:00Z",
            "from: must be before to",
        ),
        (
            "from=2026-11-24T00:00:30Z&to=2026-11-25T00:00:00Z",
            "from: window boundaries",
        ),
        (
            "from=2026-11-24T00:00:00Z&windowTimeZone=Nowhere/City",
            "windowTimeZone: unknown",
        ),
        (
            "from=2026-11-24T00:00:00Z&groupBy=colour",
            "groupBy: unknown group key",
        ),
    ] {
        let (s, b) = get(&km.url(&format!("/api/v1/meters/sum/query?{params}"))).await;
        assert_eq!(s, 400, "{params}: {b}");
        assert!(
            b["message"].as_str().unwrap().starts_with(want),
            "{params}: {b}"
        );
    }
    let (s, _) = get(&km.url("/api/v1/meters/nope/query?from=2026-11-24T00:00:00Z")).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn unique_count_merges_distinct_values_across_hours() {
    let meters = [
        json!({"id": "users", "eventType": "use", "aggregation": "unique_count", "valueProperty": "$.user", "windowSize": "HOUR"}),
    ];
    // the same users return hour after hour: per hour 2, 2, 2; per day 3 (not 6)
    let events = vec![
        ev(1, "c", "2026-11-24T01:10:00Z", json!({"user": "ann"})),
        ev(2, "c", "2026-11-24T01:20:00Z", json!({"user": "bob"})),
        ev(3, "c", "2026-11-24T02:10:00Z", json!({"user": "ann"})),
        ev(4, "c", "2026-11-24T02:20:00Z", json!({"user": "cy"})),
        ev(5, "c", "2026-11-24T03:10:00Z", json!({"user": "bob"})),
        ev(6, "c", "2026-11-24T03:20:00Z", json!({"user": "cy"})),
        ev(7, "c", "2026-11-24T03:30:00Z", json!({"user": "cy"})),
    ];
    let (_nats, km) = setup("qu", &meters, &events).await;
    let hours = query(
        &km,
        "users",
        "from=2026-11-24T00:00:00Z&to=2026-11-25T00:00:00Z&windowSize=HOUR",
    )
    .await;
    assert_eq!(
        rows(&hours)
            .iter()
            .map(|r| r.3.as_str())
            .collect::<Vec<_>>(),
        vec!["2", "2", "2"]
    );
    let day = query(
        &km,
        "users",
        "from=2026-11-24T00:00:00Z&to=2026-11-25T00:00:00Z&windowSize=DAY",
    )
    .await;
    assert_eq!(
        rows(&day),
        vec![row("2026-11-24T00:00:00Z", "c", json!({}), "3")]
    );
    // a range that is not whole UTC days merges hour windows: 02:00-04:00 has ann, cy, bob
    let part = query(
        &km,
        "users",
        "from=2026-11-24T02:00:00Z&to=2026-11-24T04:00:00Z",
    )
    .await;
    assert_eq!(
        rows(&part),
        vec![row("2026-11-24T02:00:00Z", "c", json!({}), "3")]
    );
}

#[tokio::test]
async fn days_follow_the_zone_across_dst_and_months_cross_the_year() {
    let meters =
        [json!({"id": "calls", "eventType": "use", "aggregation": "count", "windowSize": "HOUR"})];
    // one event every 6 hours from 2026-10-20 to 2026-11-05 (UTC), and around New Year
    let mut events = Vec::new();
    let start = chrono::DateTime::parse_from_rfc3339("2026-10-20T00:30:00Z")
        .unwrap()
        .timestamp();
    for i in 0..(16 * 4) {
        let t = chrono::DateTime::from_timestamp(start + i * 6 * 3600, 0).unwrap();
        events.push(ev(
            i as usize,
            "c",
            &t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            json!({}),
        ));
    }
    for (i, t) in [
        "2026-12-31T22:30:00Z",
        "2027-01-01T04:30:00Z",
        "2027-01-01T05:30:00Z",
        "2027-01-31T23:30:00Z",
        "2027-02-01T06:30:00Z",
    ]
    .iter()
    .enumerate()
    {
        events.push(ev(1000 + i, "c", t, json!({})));
    }
    let (_nats, km) = setup("qz", &meters, &events).await;
    // Berlin, the week of its autumn change (Sunday 2026-10-25 has 25 hours)
    let b = query(&km, "calls", "from=2026-10-22T22:00:00Z&to=2026-10-27T23:00:00Z&windowSize=DAY&windowTimeZone=Europe/Berlin").await;
    let got: Vec<(String, String, String)> = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["windowStart"].as_str().unwrap().into(),
                r["windowEnd"].as_str().unwrap().into(),
                r["value"].as_str().unwrap().into(),
            )
        })
        .collect();
    // events at 00:30, 06:30, 12:30, 18:30 UTC. Berlin day of the 25th: 24th 22:00Z..25th 23:00Z
    // holds 25th 00:30, 06:30, 12:30, 18:30 = 4; the 24th (23rd 22:00Z..24th 22:00Z) likewise 4.
    let want: Vec<(String, String, String)> = [
        ("2026-10-22T22:00:00Z", "2026-10-23T22:00:00Z", "4"),
        ("2026-10-23T22:00:00Z", "2026-10-24T22:00:00Z", "4"),
        ("2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z", "4"),
        ("2026-10-25T23:00:00Z", "2026-10-26T23:00:00Z", "4"),
        ("2026-10-26T23:00:00Z", "2026-10-27T23:00:00Z", "4"),
    ]
    .iter()
    .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
    .collect();
    assert_eq!(got, want);
    // New York around its change on 2026-11-01: the 1st runs 04:00Z..05:00Z next day
    let ny = query(&km, "calls", "from=2026-10-31T04:00:00Z&to=2026-11-02T05:00:00Z&windowSize=DAY&windowTimeZone=America/New_York").await;
    let got: Vec<(String, String)> = row_pairs(&ny, "windowStart", "value").into_iter().collect();
    assert_eq!(
        got,
        vec![
            ("2026-10-31T04:00:00Z".to_string(), "4".to_string()),
            ("2026-11-01T04:00:00Z".to_string(), "4".to_string())
        ]
    );
    // MONTH windows across the year boundary in New York (UTC-5 in winter)
    let m = query(&km, "calls", "from=2026-12-01T05:00:00Z&to=2027-03-01T05:00:00Z&windowSize=MONTH&windowTimeZone=America/New_York").await;
    let got: Vec<(String, String)> = row_pairs(&m, "windowStart", "value").into_iter().collect();
    // December (NY) holds 12-31 22:30Z and 01-01 04:30Z; January holds 05:30Z and 01-31 23:30Z;
    // February holds 02-01 06:30Z.
    assert_eq!(
        got,
        vec![
            ("2026-12-01T05:00:00Z".to_string(), "2".to_string()),
            ("2027-01-01T05:00:00Z".to_string(), "2".to_string()),
            ("2027-02-01T05:00:00Z".to_string(), "1".to_string())
        ]
    );
}

/// Random events folded in memory with the crate's own pure fold; the query answers and
/// the stored readings must both agree with it.
/// A query's rows as (subject, group `g`, day start) → value.
fn day_rows(answer: &Value) -> BTreeMap<(String, String, i64), String> {
    answer["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let day = chrono::DateTime::parse_from_rfc3339(r["windowStart"].as_str().unwrap())
                .unwrap()
                .timestamp();
            let key = (
                r["subject"].as_str().unwrap().to_string(),
                r["groupBy"]["g"].as_str().unwrap().to_string(),
                day,
            );
            (key, r["value"].as_str().unwrap().to_string())
        })
        .collect()
}

#[tokio::test]
async fn queries_and_readings_agree_with_an_in_memory_fold() {
    agree_with_an_in_memory_fold("qr", "1").await;
}

/// The same with the subjects spread over partitions: every answer is merged from them.
#[tokio::test]
async fn queries_over_partitions_agree_with_an_in_memory_fold() {
    agree_with_an_in_memory_fold("qp", "4").await;
}

async fn agree_with_an_in_memory_fold(stream: &str, partitions: &str) {
    use kloudmeter::domain::event::Event;
    use kloudmeter::domain::fold;
    use kloudmeter::domain::meter::{parse_meter_json, CompiledMeter};
    let def = json!({"id": "r", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v", "groupBy": {"g": "$.g"}, "windowSize": "HOUR"});
    let compiled = CompiledMeter::compile(&parse_meter_json(&def, None).unwrap()).unwrap();
    let mut seed = 0x2545F4914F6CDD1Du64;
    let mut rnd = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let base = chrono::DateTime::parse_from_rfc3339("2026-11-01T00:00:00Z")
        .unwrap()
        .timestamp();
    let mut events = Vec::new();
    let mut memory: BTreeMap<(String, String, i64), rust_decimal::Decimal> = BTreeMap::new();
    let mut totals: BTreeMap<String, rust_decimal::Decimal> = BTreeMap::new();
    // days in Europe/Berlin (UTC+01:00 all November) and Asia/Kolkata (UTC+05:30), by
    // the UTC instant they start at
    let mut zoned: [BTreeMap<(String, String, i64), rust_decimal::Decimal>; 2] = Default::default();
    const OFFSETS: [i64; 2] = [3_600, 19_800];
    for i in 0..600usize {
        let subject = format!("s{}", rnd(7));
        // s6 has events on two days a fortnight apart only: its other days' windows
        // are not read, and must not be missed
        let at = if subject == "s6" {
            rnd(2) * 14 * 86_400 + rnd(86_400)
        } else {
            rnd(20 * 86_400)
        };
        let t = chrono::DateTime::from_timestamp(base + at as i64, 0).unwrap();
        let v = format!("{}.{}", rnd(100), rnd(10));
        let g = format!("g{}", rnd(3));
        let e = ev(i, &subject, &t.to_rfc3339(), json!({"v": v, "g": g}));
        let parsed: Event = kloudmeter::domain::event::parse_events(
            e.to_string().as_bytes(),
            kloudmeter::domain::event::BodyKind::Json,
            false,
            chrono::Utc::now(),
        )
        .unwrap()
        .remove(0)
        .to_event()
        .unwrap();
        let fold::Contribution::Valid {
            value: fold::Value_::Number(d),
            ..
        } = fold::contribution(&compiled, &parsed)
        else {
            panic!("valid")
        };
        let day = t.timestamp().div_euclid(86_400) * 86_400;
        for (zone, offset) in zoned.iter_mut().zip(OFFSETS) {
            let start = (t.timestamp() + offset).div_euclid(86_400) * 86_400 - offset;
            *zone.entry((subject.clone(), g.clone(), start)).or_default() += d;
        }
        *memory.entry((subject.clone(), g, day)).or_default() += d;
        *totals.entry(subject).or_default() += d;
        events.push(e);
    }
    let (nats, km) = setup_with(stream, &[("PARTITIONS", partitions)], &[def], &events).await;
    let js = nats.client().await;
    caught_up_partitions(&js, stream, partitions.parse().unwrap(), T).await;
    // every partition got some of the subjects (so every answer below is merged)
    for p in 0..partitions.parse::<u16>().unwrap() {
        let name = kloudmeter::nats::keys::Names::new(stream)
            .partition(p)
            .stream;
        let mut events = js.get_stream(&name).await.unwrap();
        assert!(
            events.info().await.unwrap().state.messages > 0,
            "{name} is empty"
        );
    }
    let b = query(
        &km,
        "r",
        "from=2026-11-01T00:00:00Z&to=2026-11-21T00:00:00Z&windowSize=DAY&groupBy=g",
    )
    .await;
    let got = day_rows(&b);
    let want: BTreeMap<(String, String, i64), String> = memory
        .into_iter()
        .map(|(k, v)| (k, v.normalize().to_string()))
        .collect();
    assert_eq!(got, want);
    // days in zones whose midnight is not UTC's: read as UTC days with the hours (and
    // quarters) between added and taken away
    for ((zone, range), memory) in [
        (
            "Europe/Berlin",
            "from=2026-10-31T23:00:00Z&to=2026-11-21T23:00:00Z",
        ),
        (
            "Asia/Kolkata",
            "from=2026-10-31T18:30:00Z&to=2026-11-21T18:30:00Z",
        ),
    ]
    .into_iter()
    .zip(zoned)
    {
        let b = query(
            &km,
            "r",
            &format!("{range}&windowSize=DAY&windowTimeZone={zone}&groupBy=g"),
        )
        .await;
        let want: BTreeMap<(String, String, i64), String> = memory
            .into_iter()
            .map(|(k, v)| (k, v.normalize().to_string()))
            .collect();
        assert_eq!(day_rows(&b), want, "{zone}");
    }
    // the same rows through each filter operator (and an explicit groupBy=subject)
    for (filter, keep) in [
        ("filterGroupBy[g][in]=g0,g2", ["g0", "g2"].as_slice()),
        ("filterGroupBy[g][nin]=g1", ["g0", "g2"].as_slice()),
        (
            "filterGroupBy[g][ne]=g1&filterGroupBy[g][ne]=g2",
            ["g0"].as_slice(),
        ),
        ("filterGroupBy[g][eq]=g1", ["g1"].as_slice()),
    ] {
        let b = query(
            &km,
            "r",
            &format!("from=2026-11-01T00:00:00Z&to=2026-11-21T00:00:00Z&windowSize=DAY&groupBy=subject&groupBy=g&{filter}"),
        )
        .await;
        let filtered = day_rows(&b);
        let expected: BTreeMap<_, _> = want
            .iter()
            .filter(|((_, g, _), _)| keep.contains(&g.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        assert_eq!(filtered, expected, "{filter}");
    }
    let readings = subject_values(&km, "r").await;
    let want: BTreeMap<String, String> = totals
        .iter()
        .map(|(k, v)| (k.clone(), v.normalize().to_string()))
        .collect();
    assert_eq!(readings, want);
    let all = query(
        &km,
        "r",
        "from=2026-11-01T00:00:00Z&to=2026-11-21T00:00:00Z",
    )
    .await;
    let from_query: BTreeMap<String, String> =
        row_pairs(&all, "subject", "value").into_iter().collect();
    assert_eq!(from_query, want);
    // pages of two subjects: each subject once, in order
    let mut paged = Vec::new();
    let mut cursor = String::new();
    loop {
        let b = query(
            &km,
            "r",
            &format!("from=2026-11-01T00:00:00Z&to=2026-11-21T00:00:00Z&limit=2{cursor}"),
        )
        .await;
        paged.extend(row_pairs(&b, "subject", "value"));
        match b["nextCursor"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => break,
        }
    }
    assert_eq!(paged, want.clone().into_iter().collect::<Vec<_>>());
    // the meter's value: every partition's part of its summary
    let total: rust_decimal::Decimal = totals.values().sum();
    assert_eq!(
        meter_reading(&km, "r").await["value"],
        json!(total.normalize().to_string())
    );
}

#[tokio::test]
async fn to_defaults_to_now_and_errors_name_what_was_sent() {
    let now = chrono::Utc::now();
    let recent = (now - chrono::Duration::minutes(90)).to_rfc3339();
    let (_nats, km) = setup(
        "qto",
        &[json!({"id": "m", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v"})],
        &[
            ev(1, "s1", "2026-01-05T10:00:00Z", json!({"v": 2})),
            ev(2, "s1", &recent, json!({"v": 3})),
        ],
    )
    .await;
    // no `to`: up to now, rounded up to the meter's hour, so the last hour counts
    let b = query(&km, "m", "from=2026-01-01T00:00:00Z").await;
    assert_eq!(
        rows(&b),
        [row("2026-01-01T00:00:00Z", "s1", json!({}), "5")]
    );
    let to = chrono::DateTime::parse_from_rfc3339(b["to"].as_str().unwrap()).unwrap();
    assert_eq!(to.timestamp() % 3600, 0);
    assert!(to >= now && to <= now + chrono::Duration::hours(1), "{to}");
    // an error names a parameter the caller sent
    let (s, body) = get(&km.url("/api/v1/meters/m/query?from=2026-01-01T00:10:00Z")).await;
    assert_eq!(
        (s, body["message"].clone()),
        (
            400,
            json!("from: window boundaries must fall on a quarter hour")
        )
    );
    // Monrovia kept -0:44:30 until 1972: its midnights fall on no quarter hour
    let (s, body) = get(&km.url(
        "/api/v1/meters/m/query?from=1971-01-01T00:00:00Z&to=1971-01-03T00:00:00Z&windowSize=DAY&windowTimeZone=Africa/Monrovia",
    ))
    .await;
    assert_eq!(
        (s, body["message"].clone()),
        (
            400,
            json!("windowTimeZone: window boundaries must fall on a quarter hour")
        )
    );
}

/// Queries keep what they read (QUERY_CACHE_MB) and answer it again without nats-server:
/// an answer asked again right after new events were aggregated counts them, and once a
/// meter is deleted and made again, nothing of the old one is answered.
#[tokio::test]
async fn queries_asked_again_answer_what_changed_since() {
    let day = |d: u32| format!("2026-11-0{d}T00:00:00Z");
    let (nats, km) = setup(
        "qcache",
        &[json!({"id": "c", "eventType": "use", "aggregation": "count"})],
        &[
            ev(1, "s1", "2026-11-02T10:00:00Z", json!({})),
            ev(2, "s1", "2026-11-02T11:00:00Z", json!({})),
            ev(3, "s1", "2026-11-03T10:00:00Z", json!({})),
        ],
    )
    .await;
    let month = "from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z&windowSize=DAY&subject=s1";
    // asked until some of an answer came out of the cache (the first query starts its
    // watch), every answer checked
    let hits = "kloudmeter_query_cache_reads_total{result=\"hit\"}";
    let asked_again = |want: Vec<(String, String, String, String)>| {
        let km = &km;
        async move {
            let before = km.metric(hits).await;
            let deadline = std::time::Instant::now() + T;
            loop {
                assert_eq!(rows(&query(km, "c", month).await), want);
                if km.metric(hits).await > before {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "no query was answered from the cache"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    asked_again(vec![
        row(&day(2), "s1", json!({}), "2"),
        row(&day(3), "s1", json!({}), "1"),
    ])
    .await;
    // new events in a day asked before, and in one that had none
    let (s, b) = post(
        &km.url("/api/v1/events"),
        &json!([
            ev(4, "s1", "2026-11-02T12:00:00Z", json!({})),
            ev(5, "s1", "2026-11-04T12:00:00Z", json!({}))
        ]),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    let js = nats.client().await;
    caught_up(&js, "qcache", T).await;
    let second = vec![
        row(&day(2), "s1", json!({}), "3"),
        row(&day(3), "s1", json!({}), "1"),
        row(&day(4), "s1", json!({}), "1"),
    ];
    // the first answer after the events were aggregated already counts them
    assert_eq!(rows(&query(&km, "c", month).await), second);
    asked_again(second).await;

    // deleted and made again over other events: the days only the old meter had are gone
    let r = reqwest::Client::new()
        .delete(km.url("/api/v1/meters/c"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let readings = js.get_key_value("qcache-readings").await.unwrap();
    wait_for("c's readings purged", T, || async {
        let mut keys = readings.keys().await.unwrap();
        let mut left = 0;
        while let Some(k) = futures::StreamExt::next(&mut keys).await {
            left += usize::from(k.unwrap().starts_with("r.c."));
        }
        left == 0
    })
    .await;
    let (s, b) = post(
        &km.url("/api/v1/meters"),
        &json!({"id": "c", "eventType": "other", "aggregation": "count"}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = post(
        &km.url("/api/v1/events"),
        &json!([{"id": "o1", "eventType": "other", "subject": "s1", "time": "2026-11-02T09:00:00Z", "data": {}}]),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    caught_up(&js, "qcache", T).await;
    wait_for("c made again ready", T, || async {
        meter_reading(&km, "c").await["ready"] == json!(true)
    })
    .await;
    // (the 3rd and 4th were cached from the old meter)
    let third = vec![row(&day(2), "s1", json!({}), "1")];
    assert_eq!(rows(&query(&km, "c", month).await), third);
    asked_again(third).await;
}

/// The query cache against a real nats-server alone: a write from another connection is
/// in the next read, and a purge (which leaves nothing on the stream to watch) drops
/// what it removed.
#[tokio::test]
async fn the_query_cache_forgets_rewritten_and_purged_readings() {
    let nats = Nats::start();
    let store = store_alone(&nats, "rcache").await;
    let other = nats
        .client()
        .await
        .get_key_value("rcache-readings")
        .await
        .unwrap();
    let key = "r.x.s.d1";
    other.put(key, "one".into()).await.unwrap();
    cached_read(&store, key, Some("one")).await;
    other.put(key, "two".into()).await.unwrap();
    assert_eq!(cache_read(&store, key).await.as_deref(), Some("two"));
    cached_read(&store, key, Some("two")).await;
    store.purge_keys(&store.readings, "r.x.>").await.unwrap();
    assert_eq!(cache_read(&store, key).await, None);
    cached_read(&store, key, None).await;
}

/// A query reads its totals and then its windows: both wait for the watcher to reach
/// one look at the stream, taken after the query began (counted by nats-server's
/// JetStream API requests, which a read out of the cache makes only for that look).
#[tokio::test]
async fn the_reads_of_one_query_share_one_look_at_the_stream() {
    let nats = Nats::start();
    let store = store_alone(&nats, "scache").await;
    let js = nats.client().await;
    let other = js.get_key_value("scache-readings").await.unwrap();
    let (totals, windows) = ("r.x.s.total", "r.x.s.d1");
    other.put(totals, "3".into()).await.unwrap();
    other.put(windows, "1".into()).await.unwrap();
    cached_read(&store, totals, Some("3")).await;
    cached_read(&store, windows, Some("1")).await;
    let api = || async { js.query_account().await.unwrap().requests.total };
    // what asking for the count adds by itself
    let (a, b) = (api().await, api().await);
    let asking = b - a;
    let reads = |began: std::time::Instant| {
        let store = &store;
        async move {
            let before = api().await;
            let hits = store.query_cache_reads().0;
            for key in [totals, windows] {
                let got = store.get_readings(vec![key.into()], began).await.unwrap();
                assert!(got.contains_key(key), "{key}");
            }
            assert_eq!(
                store.query_cache_reads().0,
                hits + 2,
                "both out of the cache"
            );
            api().await - before - asking
        }
    };
    assert_eq!(reads(std::time::Instant::now()).await, 1);
    // a query begun before that look takes it too; one begun after a write does not,
    // and its answer has the write
    let began = std::time::Instant::now();
    assert_eq!(reads(began).await, 1);
    assert_eq!(reads(began).await, 0);
    other.put(windows, "2".into()).await.unwrap();
    let after = std::time::Instant::now();
    assert_eq!(
        cache_read_at(&store, windows, after).await.as_deref(),
        Some("2")
    );
}

async fn cache_read(store: &kloudmeter::nats::store::Store, key: &str) -> Option<String> {
    cache_read_at(store, key, std::time::Instant::now()).await
}

async fn cache_read_at(
    store: &kloudmeter::nats::store::Store,
    key: &str,
    began: std::time::Instant,
) -> Option<String> {
    let got = store
        .get_readings(vec![key.to_string()], began)
        .await
        .unwrap();
    got.get(key).map(|b| String::from_utf8(b.to_vec()).unwrap())
}

/// Read until the cache answered (its watch starts with the first read), each read
/// checked.
async fn cached_read(store: &kloudmeter::nats::store::Store, key: &str, want: Option<&str>) {
    let deadline = std::time::Instant::now() + T;
    loop {
        let before = store.query_cache_reads().0;
        assert_eq!(cache_read(store, key).await.as_deref(), want);
        if store.query_cache_reads().0 > before {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no read was answered from the cache"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// DAY and MONTH windows in zones whose offset is not a whole hour, computed by hand, on
/// HOUR meters (through the quarters their windows keep) and MINUTE meters: Kolkata
/// (+05:30) and Kathmandu (+05:45) across October's end, Chatham across the start of its
/// summer time (+12:45 → +13:45 on 27 September 2026) and September's end.
#[tokio::test]
async fn days_and_months_are_exact_in_every_zone() {
    let events = [
        // Kolkata's November starts 18:30Z, Kathmandu's 18:15Z, all in one UTC hour
        ev(1, "india", "2026-10-31T18:10:00Z", json!({"v": 1})),
        ev(2, "india", "2026-10-31T18:20:00Z", json!({"v": 2})),
        ev(3, "india", "2026-10-31T18:40:00Z", json!({"v": 4})),
        // Chatham: 26 Sep 23:55 (+12:45), 27 Sep 23:55 (+13:45), 28 Sep 00:05
        ev(4, "chatham", "2026-09-26T11:10:00Z", json!({"v": 8})),
        ev(5, "chatham", "2026-09-27T10:10:00Z", json!({"v": 16})),
        ev(6, "chatham", "2026-09-27T10:20:00Z", json!({"v": 32})),
        // 30 Sep 23:50 and 1 Oct 00:10 in Chatham
        ev(7, "chatham", "2026-09-30T10:05:00Z", json!({"v": 64})),
        ev(8, "chatham", "2026-09-30T10:25:00Z", json!({"v": 128})),
    ];
    let meters = [
        json!({"id": "hourly", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v"}),
        json!({"id": "minutely", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v",
            "windowSize": "MINUTE"}),
        json!({"id": "distinct", "eventType": "use", "aggregation": "unique_count",
            "valueProperty": "$.v"}),
    ];
    let (nats, km) = setup("qzones", &meters, &events).await;
    // distinct values by quarter too: Kathmandu's October holds 1, its November 2 and 4
    let b = query(
        &km,
        "distinct",
        "from=2026-09-30T18:15:00Z&to=2026-11-30T18:15:00Z&windowSize=MONTH&windowTimeZone=Asia/Kathmandu&subject=india",
    )
    .await;
    assert_eq!(
        rows(&b),
        [
            row("2026-09-30T18:15:00Z", "india", json!({}), "1"),
            row("2026-10-31T18:15:00Z", "india", json!({}), "2"),
        ]
    );
    for meter in ["hourly", "minutely"] {
        let months = |tz: &str| {
            format!("from=2026-09-01T00:00:00Z&to=2026-12-01T00:00:00Z&windowSize=MONTH&windowTimeZone={tz}&subject=india")
        };
        let b = query(&km, meter, &months("Asia/Kolkata")).await;
        assert_eq!(
            rows(&b),
            [
                row("2026-09-30T18:30:00Z", "india", json!({}), "3"),
                row("2026-10-31T18:30:00Z", "india", json!({}), "4"),
            ],
            "{meter}"
        );
        let b = query(&km, meter, &months("Asia/Kathmandu")).await;
        assert_eq!(
            rows(&b),
            [
                row("2026-09-30T18:15:00Z", "india", json!({}), "1"),
                row("2026-10-31T18:15:00Z", "india", json!({}), "6"),
            ],
            "{meter}"
        );
        let b = query(
            &km,
            meter,
            "from=2026-09-25T11:15:00Z&to=2026-10-01T10:15:00Z&windowSize=DAY&windowTimeZone=Pacific/Chatham&subject=chatham",
        )
        .await;
        assert_eq!(
            rows(&b),
            [
                row("2026-09-25T11:15:00Z", "chatham", json!({}), "8"),
                row("2026-09-26T11:15:00Z", "chatham", json!({}), "16"),
                row("2026-09-27T10:15:00Z", "chatham", json!({}), "32"),
                row("2026-09-29T10:15:00Z", "chatham", json!({}), "64"),
                row("2026-09-30T10:15:00Z", "chatham", json!({}), "128"),
            ],
            "{meter}"
        );
        // the day of the change is 23 hours long
        let day = &b["data"][1];
        assert_eq!(
            (day["windowStart"].clone(), day["windowEnd"].clone()),
            (json!("2026-09-26T11:15:00Z"), json!("2026-09-27T10:15:00Z"))
        );
    }
    // an hour whose distinct values, over two quarters, outgrow what its quarters may
    // hold beside it keeps none: a boundary inside it is refused, naming the parameter that set it; whole
    // hours answer
    let many = (0..=50_000).map(|i| {
        let at = if i % 2 == 0 {
            "2026-11-02T18:05:00Z"
        } else {
            "2026-11-02T18:20:00Z"
        };
        let e = json!({"id": format!("many-{i}"), "eventType": "use", "subject": "many",
            "time": at, "data": {"v": i}});
        (format!("{i:032x}"), e)
    });
    let js = nats.client().await;
    store_events(&js, "qzones.events.use", many).await;
    caught_up(&js, "qzones", Duration::from_secs(120)).await;
    let days = "from=2026-11-01T18:30:00Z&to=2026-11-03T18:30:00Z&windowSize=DAY&windowTimeZone=Asia/Kolkata&subject=many";
    let refused = |field: &str| {
        json!(format!("{field}: a window boundary falls inside the hour from 2026-11-02T18:00:00Z, which holds events without 15-minute detail (recorded before quarters were kept, or more distinct values than one reading keeps); choose boundaries on whole hours"))
    };
    let (s, body) = get(&km.url(&format!("/api/v1/meters/distinct/query?{days}"))).await;
    assert_eq!(
        (s, body["message"].clone()),
        (400, refused("windowTimeZone"))
    );
    let (s, body) = get(&km.url(
        "/api/v1/meters/distinct/query?from=2026-11-02T18:15:00Z&to=2026-11-02T19:00:00Z&subject=many",
    ))
    .await;
    assert_eq!((s, body["message"].clone()), (400, refused("from")));
    let b = query(
        &km,
        "distinct",
        "from=2026-11-02T00:00:00Z&to=2026-11-03T00:00:00Z&subject=many",
    )
    .await;
    assert_eq!(
        rows(&b),
        [row("2026-11-02T00:00:00Z", "many", json!({}), "50001")]
    );
    // the sum meter's quarters took the same events: Kolkata's days are exact
    let b = query(&km, "hourly", days).await;
    assert_eq!(
        rows(&b),
        [row("2026-11-01T18:30:00Z", "many", json!({}), "1250025000")]
    );
}

/// Day and month rollups keep their hours and days as parts, so that a zone's day reads
/// the two UTC days it overlaps. Rollups written before they kept parts (stripped here
/// in KV, as an earlier version stored them) answer the same, read through the windows
/// inside them — also after a late event lands in one.
#[tokio::test]
async fn rollups_without_parts_are_read_through_their_windows() {
    let events = [
        ev(1, "old", "2026-11-01T10:00:00Z", json!({"v": 1})),
        ev(2, "old", "2026-11-01T20:00:00Z", json!({"v": 2})),
        ev(3, "old", "2026-11-02T05:00:00Z", json!({"v": 4})),
        ev(4, "old", "2026-11-02T18:40:00Z", json!({"v": 8})),
        ev(5, "old", "2026-11-02T18:20:00Z", json!({"v": 16})),
        ev(6, "old", "2026-11-03T12:00:00Z", json!({"v": 32})),
    ];
    let meters = [
        json!({"id": "total", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v"}),
        json!({"id": "peak", "eventType": "use", "aggregation": "max", "valueProperty": "$.v"}),
    ];
    let (nats, km) = setup("qparts", &meters, &events).await;
    let kolkata = "from=2026-10-31T18:30:00Z&to=2026-11-03T18:30:00Z&windowSize=DAY&windowTimeZone=Asia/Kolkata&subject=old";
    let berlin = "from=2026-10-31T23:00:00Z&to=2026-11-03T23:00:00Z&windowSize=DAY&windowTimeZone=Europe/Berlin&subject=old";
    let month = "from=2026-11-01T00:00:00Z&to=2026-12-01T00:00:00Z&windowSize=MONTH&subject=old";
    let values = |b: Value| -> Vec<String> { rows(&b).into_iter().map(|r| r.3).collect() };
    let answers = || {
        let km = &km;
        async move {
            let mut out = Vec::new();
            for meter in ["total", "peak"] {
                for params in [kolkata, berlin, month] {
                    out.push(values(query(km, meter, params).await));
                }
            }
            out
        }
    };
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let want = |late: u64| {
        vec![
            strings(&["1", &(22 + late).to_string(), "40"]),
            strings(&["3", &(28 + late).to_string(), "32"]),
            strings(&[&(63 + late).to_string()]),
            strings(&["1", if late > 0 { "64" } else { "16" }, "32"]),
            strings(&["2", if late > 0 { "64" } else { "16" }, "32"]),
            strings(&[if late > 0 { "64" } else { "32" }]),
        ]
    };
    assert_eq!(answers().await, want(0));
    // every day and month rollup as an earlier version stored it: no parts (once the
    // aggregator holds none of them in memory)
    let cached = "kloudmeter_aggregator_cached_readings{partition=\"0\"}";
    wait_for("the idle aggregator to drop its readings", T, || async {
        km.metric(cached).await == 0.0
    })
    .await;
    let js = nats.client().await;
    let kv = js.get_key_value("qparts-readings").await.unwrap();
    let mut keys = kv.keys().await.unwrap();
    let mut stripped = 0;
    use futures::StreamExt;
    while let Some(k) = keys.next().await {
        let k = k.unwrap();
        let last = k.rsplit('.').next().unwrap();
        if !(last.starts_with('d') || last.starts_with('M')) {
            continue;
        }
        let mut r: Value = serde_json::from_slice(&kv.get(&k).await.unwrap().unwrap()).unwrap();
        let had = r.as_object_mut().unwrap().remove("parts").is_some()
            | r.as_object_mut().unwrap().remove("onlyPart").is_some();
        assert!(had, "{k} kept no parts: {r}");
        kv.put(&k, serde_json::to_vec(&r).unwrap().into())
            .await
            .unwrap();
        stripped += 1;
    }
    // 3 days and a month, for each meter
    assert_eq!(stripped, 8);
    assert_eq!(answers().await, want(0));
    // a late event in a day without parts: the day stays without (its parts would not
    // hold its earlier events), and still answers exactly
    let (s, b) = post(
        &km.url("/api/v1/events"),
        &ev(7, "old", "2026-11-02T03:00:00Z", json!({"v": 64})),
    )
    .await;
    assert_eq!(s, 202, "{b}");
    caught_up(&js, "qparts", Duration::from_secs(60)).await;
    assert_eq!(answers().await, want(64));
}

#[tokio::test]
async fn filters_split_one_event_type_into_meters_exactly() {
    let meters = [
        json!({"id": "eu", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v",
            "filter": {"$.region": {"eq": "eu"}}}),
        json!({"id": "americas", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v",
            "filter": {"$.region": {"in": ["us", "ca"]}}}),
        json!({"id": "all", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v"}),
        // the same contribution as `all` but for its filter: never shares its evaluation
        json!({"id": "big", "eventType": "use", "aggregation": "count",
            "filter": {"$.v": {"gte": 5}, "$.region": {"exists": true}}}),
    ];
    let regions = ["eu", "us", "ca", "apac"];
    let (mut eu, mut americas, mut all, mut big) = (0, 0, 0, 0);
    let mut events = Vec::new();
    for i in 0..400usize {
        let region = regions[i % 4];
        let v = (i * 7) % 10;
        // every 9th event has no region: only `all` counts it (and it is invalid for none)
        let data = if i % 9 == 0 {
            json!({"v": v})
        } else {
            match region {
                "eu" => eu += v,
                "us" | "ca" => americas += v,
                _ => {}
            }
            if v >= 5 {
                big += 1;
            }
            json!({"v": v, "region": region})
        };
        all += v;
        events.push(ev(i, &format!("c{}", i % 3), "2026-11-30T08:00:00Z", data));
    }
    let (_nats, km) = setup("filters", &meters, &events).await;
    for (id, want) in [
        ("eu", eu),
        ("americas", americas),
        ("all", all),
        ("big", big),
    ] {
        let r = meter_reading(&km, id).await;
        assert_eq!(r["value"], json!(want.to_string()), "{id}: {r}");
        assert_eq!(
            r["invalidEvents"],
            json!(0),
            "{id}: not matching is not invalid"
        );
    }
    // the definition keeps its filter; a bad one is refused naming the entry
    let (s, b) = get(&km.url("/api/v1/meters/americas")).await;
    assert_eq!(
        (s, &b["filter"]),
        (200, &json!({"$.region": {"in": ["us", "ca"]}}))
    );
    let (s, b) = post(
        &km.url("/api/v1/meters"),
        &json!({"id": "bad", "eventType": "use", "aggregation": "count", "filter": {"$.region": {"in": "eu"}}}),
    )
    .await;
    assert_eq!(
        (s, b["message"].as_str().unwrap()),
        (400, "filter[\"$.region\"].in: must be a list")
    );
}

/// The series of one metric family in an exposition, as `labels -> value`.
fn series(text: &str, name: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name))
        .filter_map(|rest| rest.strip_prefix('{'))
        .filter_map(|rest| rest.split_once("} "))
        .map(|(labels, value)| (labels.to_string(), value.to_string()))
        .collect()
}

#[tokio::test]
async fn usage_is_on_metrics_and_subjects_only_where_exported() {
    let meters = [
        json!({"id": "tokens", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v",
            "export": {"topSubjects": 2}}),
        json!({"id": "calls", "eventType": "use", "aggregation": "count"}),
    ];
    // c0 12.5, c1 30, c2 7.25, c3 30: the two highest are c1 and c3 (ties by name)
    let values = [("c0", "12.5"), ("c1", "30"), ("c2", "7.25"), ("c3", "30")];
    let events: Vec<Value> = values
        .iter()
        .enumerate()
        .map(|(i, (s, v))| ev(i, s, "2026-11-30T08:00:00Z", json!({"v": v})))
        .collect();
    let (_nats, km) = setup("usage", &meters, &events).await;
    let text = km.metrics_text().await;
    let value = series(&text, "kloudmeter_meter_value");
    assert_eq!(
        value.get(r#"meter="tokens""#).map(String::as_str),
        Some("79.75"),
        "{text}"
    );
    assert_eq!(
        value.get(r#"meter="calls""#).map(String::as_str),
        Some("4.0"),
        "{text}"
    );
    let events = series(&text, "kloudmeter_meter_events");
    assert_eq!(
        events.get(r#"meter="tokens""#).map(String::as_str),
        Some("4")
    );
    let subjects = series(&text, "kloudmeter_subject_value");
    let want: BTreeMap<String, String> = [
        (
            r#"meter="tokens",subject="c1""#.to_string(),
            "30.0".to_string(),
        ),
        (
            r#"meter="tokens",subject="c3""#.to_string(),
            "30.0".to_string(),
        ),
    ]
    .into();
    assert_eq!(subjects, want, "{text}");
    // a deleted meter's series go; a bad export is refused naming it
    let r = reqwest::Client::new()
        .delete(km.url("/api/v1/meters/calls"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    wait_for("calls gone from /metrics", T, || async {
        let text = km.metrics_text().await;
        !series(&text, "kloudmeter_meter_value").contains_key(r#"meter="calls""#)
    })
    .await;
    for (export, message) in [
        (
            json!({"topSubjects": 101}),
            "export.topSubjects: must be a whole number 1-100",
        ),
        (
            json!({"topSubjects": 0}),
            "export.topSubjects: must be a whole number 1-100",
        ),
        (json!({"top": 3}), "export.top: unknown field"),
    ] {
        let (s, b) = post(
            &km.url("/api/v1/meters"),
            &json!({"id": "bad", "eventType": "use", "aggregation": "count", "export": export}),
        )
        .await;
        assert_eq!(s, 400, "{b}");
        assert!(b["message"].as_str().unwrap().starts_with(message), "{b}");
    }
}

#[tokio::test]
async fn seed_readings_list_every_subject_once_across_pages() {
    let mut meters: Vec<Value> = ["a", "b", "c"]
        .iter()
        .map(|id| json!({"id": id, "eventType": "use", "aggregation": "sum", "valueProperty": "$.v"}))
        .collect();
    // a groupBy meter: an entry per subject, then one per group of it
    meters.push(
        json!({"id": "d", "eventType": "tok", "aggregation": "sum", "valueProperty": "$.v",
        "groupBy": {"model": "$.model"}}),
    );
    let mut events: Vec<Value> = (0..250usize)
        .map(|i| {
            ev(
                i,
                &format!("s{i:03}"),
                "2026-11-30T08:00:00Z",
                json!({"v": i}),
            )
        })
        .collect();
    for (i, (subject, model, v)) in [
        ("x1", json!("a"), 1),
        ("x1", json!("b"), 2),
        ("x1", json!("a"), 4),
        ("x2", Value::Null, 8),
    ]
    .into_iter()
    .enumerate()
    {
        let mut data = json!({"v": v});
        if !model.is_null() {
            data["model"] = model;
        }
        events.push(
            json!({"id": format!("t{i}"), "eventType": "tok", "subject": subject,
            "time": "2026-11-30T09:00:00Z", "data": data}),
        );
    }
    let (_nats, km) = setup("pages", &meters, &events).await;
    let client = reqwest::Client::new();
    let mut seen: Vec<String> = Vec::new();
    let mut groups: BTreeMap<String, (Value, Value)> = BTreeMap::new();
    let mut paged: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = km.url("/api/readings?limit=100");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let r = client.get(url).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        cursor = r
            .headers()
            .get("kloudmeter-next-cursor")
            .map(|v| v.to_str().unwrap().to_string());
        let page: Vec<Value> = r.json().await.unwrap();
        assert!(page.len() <= 100);
        pages += 1;
        paged.extend(page.iter().cloned());
        for e in page {
            // a meter's row, or a subject's entry with the original's key and exact value
            match (e.get("meter"), e.get("key")) {
                (Some(m), None) => seen.push(m.as_str().unwrap().to_string()),
                (None, Some(k)) if e["meterId"] == json!("d") => {
                    assert!(e.get("groupBy").is_none(), "{e}");
                    seen.push(k.as_str().unwrap().to_string());
                }
                (None, None) => {
                    let subject = e["subject"].as_str().unwrap();
                    seen.push(format!("{subject}/group"));
                    let group = e["groupBy"].to_string();
                    groups.insert(
                        format!("{subject} {group}"),
                        (e["value"].clone(), e["count"].clone()),
                    );
                }
                (None, Some(k)) => {
                    let i: usize = e["subject"].as_str().unwrap()[1..].parse().unwrap();
                    assert_eq!(
                        (e["value"].clone(), e["count"].clone()),
                        (json!(i.to_string()), json!(1)),
                        "{e}"
                    );
                    seen.push(k.as_str().unwrap().to_string());
                }
                _ => panic!("{e}"),
            }
        }
        if cursor.is_none() {
            break;
        }
    }
    let mut want: Vec<String> = Vec::new();
    for m in ["a", "b", "c"] {
        want.push(m.to_string());
        want.extend((0..250).map(|i| format!("use.sum.{m}.s{i:03}")));
    }
    want.extend(
        [
            "d",
            "tok.sum.d.x1",
            "x1/group",
            "x1/group",
            "tok.sum.d.x2",
            "x2/group",
        ]
        .map(String::from),
    );
    assert_eq!(seen, want, "every entry once, in order");
    assert_eq!(
        groups,
        BTreeMap::from([
            (r#"x1 {"model":"a"}"#.to_string(), (json!("5"), json!(2))),
            (r#"x1 {"model":"b"}"#.to_string(), (json!("2"), json!(1))),
            (r#"x2 {"model":null}"#.to_string(), (json!("8"), json!(1))),
        ])
    );
    assert_eq!(pages, 8);
    // without limit: the same entries, streamed as one array
    let (s, whole) = get(&km.url("/api/readings")).await;
    assert_eq!((s, whole), (200, Value::Array(paged)));
    for (param, message) in [
        ("limit=0", "limit: must be a whole number 1-10000"),
        ("limit=many", "limit: must be a whole number 1-10000"),
        ("cursor=nonsense", "cursor: not a cursor this API gave"),
    ] {
        let (s, b) = get(&km.url(&format!("/api/readings?{param}"))).await;
        assert_eq!((s, b["message"].as_str()), (400, Some(message)));
    }
    let (s, b) = get(&km.url("/api/reading/?key=use.sum.b.s007")).await;
    assert_eq!(
        (s, &b["value"], &b["meterId"]),
        (200, &json!("7"), &json!("b"))
    );
    let (s, _) = get(&km.url("/api/reading/?key=use.sum.b.nobody")).await;
    assert_eq!(s, 404);
}

/// 100,000 subjects: `limit`/`cursor` pages give each exactly once in subject order, and
/// the all-subject CSV answer (streamed a page of subjects at a time) has every one.
#[tokio::test]
async fn paging_through_100000_subjects_gives_each_once() {
    const N: usize = 100_000;
    let nats = Nats::start();
    let km = Km::start(&nats, "pg", &[]).await;
    let (s, b) = post(
        &km.url("/api/v1/meters"),
        &json!({"id": "calls", "eventType": "call", "aggregation": "count", "windowSize": "DAY"}),
    )
    .await;
    assert_eq!(s, 201, "{b}");
    // published straight into the stream (as ingestion would), one subject each
    let js = nats.client().await;
    let events = (0..N).map(|i| {
        let e = json!({"id": format!("e{i}"), "eventType": "call", "subject": format!("s{i:06}"),
            "time": "2026-11-02T10:00:00Z", "data": {}});
        (format!("{:032x}", i + 1), e)
    });
    store_events(&js, "pg.events.call", events).await;
    caught_up(&js, "pg", Duration::from_secs(240)).await;
    let base =
        km.url("/api/v1/meters/calls/query?from=2026-11-01T00:00:00Z&to=2026-11-03T00:00:00Z");
    let mut seen: Vec<String> = Vec::with_capacity(N);
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("{base}&limit=10000&cursor={c}"),
            None => format!("{base}&limit=10000"),
        };
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let header = r
            .headers()
            .get("kloudmeter-next-cursor")
            .map(|v| v.to_str().unwrap().to_string());
        let page: Value = r.json().await.unwrap();
        assert_eq!(page["nextCursor"].as_str().map(str::to_string), header);
        let rows = page["data"].as_array().unwrap();
        assert_eq!(rows.len(), 10_000, "page {pages}");
        for row in rows {
            assert_eq!(row["value"], json!("1"));
            seen.push(row["subject"].as_str().unwrap().to_string());
        }
        pages += 1;
        cursor = header;
        if cursor.is_none() {
            break;
        }
    }
    assert_eq!(pages, 10);
    let want: Vec<String> = (0..N).map(|i| format!("s{i:06}")).collect();
    assert_eq!(seen, want, "every subject once, in subject order");
    // the whole set as CSV, streamed
    let csv = csv_of(&base).await;
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("windowStart,windowEnd,subject,value"));
    let subjects: Vec<String> = lines
        .map(|l| {
            let cols: Vec<&str> = l.split(',').collect();
            assert_eq!(cols[3], "1", "{l}");
            cols[2].to_string()
        })
        .collect();
    assert_eq!(subjects, want);
    // pages list subjects from an index kept between pages: a subject counted since
    // shows on the next page that reaches it
    store_events(
        &js,
        "pg.events.call",
        [(
            format!("{:032x}", N + 1),
            json!({"id": "late", "eventType": "call", "subject": "a-late", "time": "2026-11-02T11:00:00Z", "data": {}}),
        )],
    )
    .await;
    caught_up(&js, "pg", Duration::from_secs(60)).await;
    let (s, b) = get(&format!("{base}&limit=2")).await;
    assert_eq!(s, 200, "{b}");
    let first: Vec<&str> = b["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["subject"].as_str().unwrap())
        .collect();
    assert_eq!(first, ["a-late", "s000000"], "{b}");
    // bad paging parameters name themselves
    for (q, field) in [
        ("&limit=0", "limit"),
        ("&limit=10001", "limit"),
        ("&limit=10&cursor=%21%21", "cursor"),
        ("&cursor=czAwMDAwMQ", "cursor"),
    ] {
        let (s, b) = get(&format!("{base}{q}")).await;
        assert_eq!(s, 400, "{q}: {b}");
        assert!(
            b["message"]
                .as_str()
                .unwrap()
                .starts_with(&format!("{field}: ")),
            "{q}: {b}"
        );
    }
}

/// Pages and the streamed CSV of a meter without `groupBy` answer what the whole answer
/// and an in-memory fold do, where each subject reads one or two stored windows (its
/// totals are then not read: a month's total, a total from a month's middle) and where
/// it reads more (a month of days, three months, a zone's days): subjects without events
/// in range show no rows.
#[tokio::test]
async fn pages_without_group_by_agree_with_an_in_memory_fold() {
    let start = chrono::DateTime::parse_from_rfc3339("2026-10-20T00:00:00Z")
        .unwrap()
        .timestamp();
    let mut seed = 7u64;
    let mut next = move || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        seed >> 33
    };
    let mut events = Vec::new();
    let mut at = Vec::new();
    for i in 0..600 {
        let subject = format!("s{:02}", next() % 40);
        // s35..s39 only in October: counted, with no events in November
        let span = if subject.as_str() >= "s35" { 11 } else { 50 } * 86_400;
        let t = start + (next() % span) as i64;
        let v = (next() % 100) as i64;
        let time = chrono::DateTime::from_timestamp(t, 0).unwrap().to_rfc3339();
        events.push(ev(i, &subject, &time, json!({"v": v})));
        at.push((t, subject, v));
    }
    let (_nats, km) = setup(
        "pgf",
        &[json!({"id": "m", "eventType": "use", "aggregation": "sum", "valueProperty": "$.v", "windowSize": "HOUR"})],
        &events,
    )
    .await;
    for (from, to, days, zone) in [
        ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z", false, "UTC"),
        ("2026-10-25T00:00:00Z", "2026-12-01T00:00:00Z", false, "UTC"),
        ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z", true, "UTC"),
        ("2026-10-15T00:00:00Z", "2026-12-15T00:00:00Z", true, "UTC"),
        (
            "2026-10-31T23:00:00Z",
            "2026-11-30T23:00:00Z",
            true,
            "Europe/Berlin",
        ),
    ] {
        let (a, b) = (
            chrono::DateTime::parse_from_rfc3339(from)
                .unwrap()
                .timestamp(),
            chrono::DateTime::parse_from_rfc3339(to)
                .unwrap()
                .timestamp(),
        );
        // Berlin is +01:00 all of November: its days start at 23:00 UTC
        let offset = if zone == "UTC" { 0 } else { 3_600 };
        let mut want: BTreeMap<(String, String), i64> = BTreeMap::new();
        for (t, subject, v) in &at {
            if (a..b).contains(t) {
                let day = if days {
                    (t + offset).div_euclid(86_400) * 86_400 - offset
                } else {
                    a
                };
                let day = chrono::DateTime::from_timestamp(day, 0)
                    .unwrap()
                    .format("%Y-%m-%dT%H:%M:%SZ")
                    .to_string();
                *want.entry((day, subject.clone())).or_default() += v;
            }
        }
        let want: BTreeMap<(String, String), String> =
            want.into_iter().map(|(k, v)| (k, v.to_string())).collect();
        let size = if days { "&windowSize=DAY" } else { "" };
        let params = format!("from={from}&to={to}{size}&windowTimeZone={zone}");
        let as_map = |b: &Value| -> Vec<((String, String), String)> {
            rows(b)
                .into_iter()
                .map(|(w, s, _, v)| ((w, s), v))
                .collect()
        };
        let whole: BTreeMap<_, _> = as_map(&query(&km, "m", &params).await)
            .into_iter()
            .collect();
        assert_eq!(whole, want, "{params}");
        let mut paged = Vec::new();
        let mut cursor = String::new();
        loop {
            let b = query(&km, "m", &format!("{params}&limit=7{cursor}")).await;
            paged.extend(as_map(&b));
            match b["nextCursor"].as_str() {
                Some(next) => cursor = format!("&cursor={next}"),
                None => break,
            }
        }
        let paged_rows = paged.len();
        let paged: BTreeMap<_, _> = paged.into_iter().collect();
        assert_eq!((paged_rows, &paged), (want.len(), &want), "{params}: pages");
        let csv = csv_of(&km.url(&format!("/api/v1/meters/m/query?{params}"))).await;
        let streamed: BTreeMap<(String, String), String> = csv
            .lines()
            .skip(1)
            .map(|l| {
                let cols: Vec<&str> = l.split(',').collect();
                (
                    (cols[0].to_string(), cols[2].to_string()),
                    cols[3].to_string(),
                )
            })
            .collect();
        assert_eq!(streamed, want, "{params}: CSV");
    }
}
