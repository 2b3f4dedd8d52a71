use super::*;
use crate::domain::meter::parse_meter_json;
use proptest::prelude::*;
use serde_json::json;

fn t(s: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
}

fn meter(window: &str) -> MeterDef {
    parse_meter_json(
        &json!({"id": "m", "eventType": "e", "aggregation": "sum", "valueProperty": "$.v", "groupBy": {"model": "$.model"}, "windowSize": window}),
        None,
    )
    .unwrap()
}

fn q(pairs: &[(&str, &str)], window: &str) -> Result<QueryParams, FieldError> {
    let pairs: Vec<(String, String)> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    parse_query(&pairs, &meter(window), t("2026-12-01T00:00:00Z"))
}

fn windows(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    output_windows(&q(pairs, "HOUR").unwrap())
        .unwrap()
        .into_iter()
        .map(|(a, b)| (rfc3339(a), rfc3339(b)))
        .collect()
}

fn pair(a: &str, b: &str) -> (String, String) {
    (a.to_string(), b.to_string())
}

#[test]
#[allow(clippy::type_complexity)]
fn bad_parameters_name_themselves() {
    let cases: &[(&[(&str, &str)], &str, &str)] = &[
        (&[], "HOUR", "from: is required"),
        (
            &[("from", "yesterday")],
            "HOUR",
            "from: must be an RFC 3339",
        ),
        (
            &[
                ("from", "2026-11-02T00:00:00Z"),
                ("to", "2026-11-01T00:00:00Z"),
            ],
            "HOUR",
            "from: must be before to",
        ),
        (
            &[("from", "2026-11-01T00:00:00Z"), ("windowSize", "MINUTE")],
            "HOUR",
            "windowSize: MINUTE is finer than the meter's windowSize HOUR",
        ),
        (
            &[("from", "2026-11-01T00:00:00Z"), ("windowSize", "HOUR")],
            "DAY",
            "windowSize: HOUR is finer",
        ),
        (
            &[("from", "2026-11-01T00:00:00Z"), ("windowSize", "WEEK")],
            "HOUR",
            "windowSize: unknown window size",
        ),
        (
            &[
                ("from", "2026-11-01T00:00:00Z"),
                ("windowTimeZone", "Mars/Olympus"),
            ],
            "HOUR",
            "windowTimeZone: unknown IANA time zone",
        ),
        (
            &[("from", "2026-11-01T00:00:00Z"), ("groupBy", "region")],
            "HOUR",
            "groupBy: unknown group key \"region\"",
        ),
        (
            &[
                ("from", "2026-11-01T00:00:00Z"),
                ("filterGroupBy[region]", "eu"),
            ],
            "HOUR",
            "filterGroupBy[region]: unknown group key",
        ),
    ];
    for (pairs, window, want) in cases {
        let err = q(pairs, window).unwrap_err().to_string();
        assert!(err.starts_with(want), "{pairs:?}: {err}");
    }
    let ok = q(
        &[
            ("from", "2026-11-01T00:00:00Z"),
            ("windowSize", "month"),
            ("subject", "a"),
            ("subject", "b"),
            ("groupBy", "model"),
            ("filterGroupBy[model]", "x"),
        ],
        "DAY",
    )
    .unwrap();
    assert_eq!(
        (ok.window, ok.subjects.len(), ok.to),
        (Some(QueryWindow::Month), 2, t("2026-12-01T00:00:00Z"))
    );
    assert_eq!(
        ok.filters,
        vec![GroupFilter {
            key: "model".into(),
            op: FilterOp::Eq,
            values: vec!["x".into()]
        }]
    );
}

#[test]
fn group_filters_take_operators_and_name_the_parameter() {
    let ok = q(
        &[
            ("from", "2026-11-01T00:00:00Z"),
            ("groupBy", "subject"),
            ("filterGroupBy[model][in]", "a,b"),
            ("filterGroupBy[model][nin]", "b"),
            ("filterGroupBy[model][ne]", "c"),
            ("filterGroupBy[model][eq]", "a"),
        ],
        "HOUR",
    )
    .unwrap();
    assert!(
        ok.group_by.is_empty(),
        "groupBy=subject: rows are per subject anyway"
    );
    let ops: Vec<(FilterOp, Vec<String>)> = ok
        .filters
        .iter()
        .map(|f| (f.op, f.values.clone()))
        .collect();
    let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    assert_eq!(
        ops,
        vec![
            (FilterOp::In, list(&["a", "b"])),
            (FilterOp::Nin, list(&["b"])),
            (FilterOp::Ne, list(&["c"])),
            (FilterOp::Eq, list(&["a"])),
        ]
    );
    let group = |m: &str| BTreeMap::from([("model".to_string(), serde_json::json!(m))]);
    assert!(group_matches(&group("a"), &ok.filters));
    assert!(!group_matches(&group("b"), &ok.filters));
    for (param, value, want) in [
        (
            "filterGroupBy[model][like]",
            "a",
            "filterGroupBy[model][like]: unknown operator \"like\"",
        ),
        (
            "filterGroupBy[colour][in]",
            "a",
            "filterGroupBy[colour][in]: unknown group key \"colour\"",
        ),
    ] {
        let err = q(&[("from", "2026-11-01T00:00:00Z"), (param, value)], "HOUR")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(want), "{err}");
    }
}

#[test]
fn day_windows_follow_berlin_midnight_across_the_autumn_change() {
    // Berlin leaves summer time on Sunday 2026-10-25: that day has 25 hours.
    let w = windows(&[
        ("from", "2026-10-22T22:00:00Z"),
        ("to", "2026-10-27T23:00:00Z"),
        ("windowSize", "DAY"),
        ("windowTimeZone", "Europe/Berlin"),
    ]);
    assert_eq!(
        w,
        vec![
            pair("2026-10-22T22:00:00Z", "2026-10-23T22:00:00Z"),
            pair("2026-10-23T22:00:00Z", "2026-10-24T22:00:00Z"),
            pair("2026-10-24T22:00:00Z", "2026-10-25T23:00:00Z"),
            pair("2026-10-25T23:00:00Z", "2026-10-26T23:00:00Z"),
            pair("2026-10-26T23:00:00Z", "2026-10-27T23:00:00Z"),
        ]
    );
    // and the spring change on 2026-03-29: a 23-hour day
    let w = windows(&[
        ("from", "2026-03-27T23:00:00Z"),
        ("to", "2026-03-29T22:00:00Z"),
        ("windowSize", "DAY"),
        ("windowTimeZone", "Europe/Berlin"),
    ]);
    assert_eq!(
        w,
        vec![
            pair("2026-03-27T23:00:00Z", "2026-03-28T23:00:00Z"),
            pair("2026-03-28T23:00:00Z", "2026-03-29T22:00:00Z")
        ]
    );
}

#[test]
fn day_windows_follow_new_york_midnight_across_the_autumn_change() {
    // New York leaves daylight time on Sunday 2026-11-01.
    let w = windows(&[
        ("from", "2026-10-31T04:00:00Z"),
        ("to", "2026-11-03T05:00:00Z"),
        ("windowSize", "DAY"),
        ("windowTimeZone", "America/New_York"),
    ]);
    assert_eq!(
        w,
        vec![
            pair("2026-10-31T04:00:00Z", "2026-11-01T04:00:00Z"),
            pair("2026-11-01T04:00:00Z", "2026-11-02T05:00:00Z"),
            pair("2026-11-02T05:00:00Z", "2026-11-03T05:00:00Z"),
        ]
    );
}

#[test]
fn month_windows_cross_the_year_in_a_zone() {
    let w = windows(&[
        ("from", "2026-12-01T05:00:00Z"),
        ("to", "2027-02-01T05:00:00Z"),
        ("windowSize", "MONTH"),
        ("windowTimeZone", "America/New_York"),
    ]);
    assert_eq!(
        w,
        vec![
            pair("2026-12-01T05:00:00Z", "2027-01-01T05:00:00Z"),
            pair("2027-01-01T05:00:00Z", "2027-02-01T05:00:00Z")
        ]
    );
    // clipped to from/to when they fall inside a window
    let w = windows(&[
        ("from", "2026-12-15T00:00:00Z"),
        ("to", "2027-01-10T00:00:00Z"),
        ("windowSize", "MONTH"),
        ("windowTimeZone", "Asia/Tokyo"),
    ]);
    assert_eq!(
        w,
        vec![
            pair("2026-12-15T00:00:00Z", "2026-12-31T15:00:00Z"),
            pair("2026-12-31T15:00:00Z", "2027-01-10T00:00:00Z")
        ]
    );
}

/// A chunk reading parts `lo..hi` of a stored window.
fn part(rollup: Option<Rollup>, at: &str, lo: u8, hi: u8) -> Chunk {
    Chunk {
        part: Some((lo, hi)),
        ..Chunk::whole(rollup, t(at).timestamp())
    }
}

#[test]
fn cover_uses_the_coarsest_stored_windows() {
    let (a, b) = (
        t("2026-12-01T05:00:00Z").timestamp(),
        t("2027-01-01T05:00:00Z").timestamp(),
    );
    // the hours of 1 December from 05:00, the days of December from the 2nd, the
    // first five hours of 1 January: three readings, not 54 days and hours
    assert_eq!(
        cover(a, b, WindowSize::Hour).unwrap(),
        [
            part(Some(Rollup::Day), "2026-12-01T00:00:00Z", 5, 24),
            part(Some(Rollup::Month), "2026-12-01T00:00:00Z", 1, 31),
            part(Some(Rollup::Day), "2027-01-01T00:00:00Z", 0, 5),
        ]
    );
    // without parts of rollups (what a rollup written before they existed is read as):
    // the hours, then whole days
    let c = cover_in_windows(a, b, WindowSize::Hour).unwrap();
    let hours = c.iter().filter(|c| c.rollup.is_none()).count();
    let days = c.iter().filter(|c| c.rollup == Some(Rollup::Day)).count();
    assert_eq!((hours, days, c.len()), (19 + 5, 30, 54));
    assert!(c.iter().all(|c| c.part.is_none()));
    let (a, b) = (
        t("2026-01-01T00:00:00Z").timestamp(),
        t("2027-01-01T00:00:00Z").timestamp(),
    );
    assert_eq!(cover(a, b, WindowSize::Hour).unwrap().len(), 12);
    assert_eq!(cover(a + 600, b, WindowSize::Hour), Err(a + 600));
    assert_eq!(cover(a, b + 900, WindowSize::Day), Err(b + 900));
    // DAY meters: the days of a month are parts of the month's reading
    assert_eq!(
        cover(a + 86_400, a + 10 * 86_400, WindowSize::Day).unwrap(),
        [part(Some(Rollup::Month), "2026-01-01T00:00:00Z", 1, 10)]
    );
    // Asia/Kolkata is UTC+5:30: its midnights fall inside hours, on the quarter hours
    // an HOUR window keeps
    let p = q(
        &[
            ("from", "2026-11-01T18:30:00Z"),
            ("to", "2026-11-02T18:30:00Z"),
            ("windowSize", "DAY"),
            ("windowTimeZone", "Asia/Kolkata"),
        ],
        "HOUR",
    )
    .unwrap();
    let (s, e) = output_windows(&p).unwrap()[0];
    // 18:30-19:00 is the second half of 18:00, then 19:00-24:00 and 00:00-18:00 are
    // hours of two UTC days, then the first half of 18:00
    assert_eq!(
        cover(s.timestamp(), e.timestamp(), WindowSize::Hour).unwrap(),
        [
            part(None, "2026-11-01T18:00:00Z", 2, 4),
            part(Some(Rollup::Day), "2026-11-01T00:00:00Z", 19, 24),
            part(Some(Rollup::Day), "2026-11-02T00:00:00Z", 0, 18),
            part(None, "2026-11-02T18:00:00Z", 0, 2),
        ]
    );
    // Kathmandu (+05:45) across a month: one quarter at each end, hours, the days of
    // November between
    let (a, b) = (
        t("2026-10-31T18:15:00Z").timestamp(),
        t("2026-11-30T18:15:00Z").timestamp(),
    );
    assert_eq!(
        cover(a, b, WindowSize::Hour).unwrap(),
        [
            part(None, "2026-10-31T18:00:00Z", 1, 4),
            part(Some(Rollup::Day), "2026-10-31T00:00:00Z", 19, 24),
            part(Some(Rollup::Month), "2026-11-01T00:00:00Z", 0, 29),
            part(Some(Rollup::Day), "2026-11-30T00:00:00Z", 0, 18),
            part(None, "2026-11-30T18:00:00Z", 0, 1),
        ]
    );
    // one quarter alone
    assert_eq!(
        cover(a, a + 900, WindowSize::Hour).unwrap(),
        [part(None, "2026-10-31T18:00:00Z", 1, 2)]
    );
    // MINUTE meters: the half hours at the ends in minutes, the hours between as parts
    // of their days
    assert_eq!(
        cover(s.timestamp(), e.timestamp(), WindowSize::Minute)
            .unwrap()
            .len(),
        30 + 1 + 1 + 30
    );
}

proptest! {
    #[test]
    fn cover_is_exact_and_contiguous(offset in 0i64..5_000_000, len in 1i64..3000, base in prop::sample::select(vec![WindowSize::Minute, WindowSize::Hour, WindowSize::Day])) {
        let s = base.seconds();
        // HOUR meters answer on any quarter hour
        let step = if base == WindowSize::Hour { 900 } else { s };
        let a = (1_750_000_000 + offset * 60).div_euclid(step) * step;
        let b = a + len * step;
        let chunks = cover(a, b, base).unwrap();
        // parts of windows only at the two edges
        let parts = chunks.iter().filter(|c| c.rollup.is_none() && c.part.is_some()).count();
        prop_assert!(parts <= 2, "{} parts", parts);
        let mut t = a;
        for c in chunks {
            prop_assert!(!c.minus);
            let (start, end) = span(&c, base);
            prop_assert_eq!(start, t);
            t = end;
        }
        prop_assert_eq!(t, b);
    }

    /// A signed cover counts every instant of [a, b) once and nothing else: at each
    /// instant at most one chunk adds and at most one takes away, so a running sum of
    /// additions first, then removals, never goes below zero. It reads no more than
    /// the plain cover.
    #[test]
    fn signed_cover_counts_each_instant_once(offset in 0i64..5_000_000, len in 1i64..3000, base in prop::sample::select(vec![WindowSize::Minute, WindowSize::Hour, WindowSize::Day])) {
        let step = if base == WindowSize::Hour { 900 } else { base.seconds() };
        let a = (1_750_000_000 + offset * 60).div_euclid(step) * step;
        let b = a + len * step;
        let signed = signed_cover(a, b, base).unwrap();
        prop_assert!(signed.len() <= cover(a, b, base).unwrap().len());
        let spans: Vec<(i64, i64, bool)> = signed.iter().map(|c| {
            let (lo, hi) = span(c, base);
            (lo, hi, c.minus)
        }).collect();
        let mut t = a - 86_400;
        while t < b + 86_400 {
            let adds = spans.iter().filter(|(lo, hi, m)| !m && *lo <= t && t < *hi).count();
            let takes = spans.iter().filter(|(lo, hi, m)| *m && *lo <= t && t < *hi).count();
            prop_assert!(adds <= 1 && takes <= adds, "at {}: {} added, {} taken", t, adds, takes);
            prop_assert_eq!(adds - takes, usize::from(a <= t && t < b), "at {}", t);
            t += step;
        }
    }
}

/// [start, end) of a chunk of a cover over `base` windows.
fn span(c: &Chunk, base: WindowSize) -> (i64, i64) {
    if let Some((lo, hi)) = c.part {
        let split = c.split(base).expect("parts of a window that keeps none");
        assert!(lo < hi && usize::from(hi) <= split.parts());
    }
    c.span(base)
}

#[test]
fn a_signed_cover_is_taken_only_where_it_reads_fewer() {
    // Europe/Berlin's 2 November: the hours of the two UTC days it overlaps, as the
    // plain cover reads it (the signed one would read the UTC day and two hours)
    let (a, b) = (
        t("2026-11-01T23:00:00Z").timestamp(),
        t("2026-11-02T23:00:00Z").timestamp(),
    );
    assert_eq!(
        signed_cover(a, b, WindowSize::Hour).unwrap(),
        [
            part(Some(Rollup::Day), "2026-11-01T00:00:00Z", 23, 24),
            part(Some(Rollup::Day), "2026-11-02T00:00:00Z", 0, 23),
        ]
    );
    assert_eq!(
        signed_cover(a, b, WindowSize::Hour),
        cover(a, b, WindowSize::Hour)
    );
    // two days from 23:15: the days between and the last quarters of the hour before
    // each end — the first added, the second taken away (three readings, where the
    // plain cover reads four)
    let (a, b) = (
        t("2026-11-01T23:15:00Z").timestamp(),
        t("2026-11-03T23:15:00Z").timestamp(),
    );
    assert_eq!(cover(a, b, WindowSize::Hour).unwrap().len(), 4);
    assert_eq!(
        signed_cover(a, b, WindowSize::Hour).unwrap(),
        [
            part(Some(Rollup::Month), "2026-11-01T00:00:00Z", 1, 3),
            part(None, "2026-11-01T23:00:00Z", 1, 4),
            Chunk {
                minus: true,
                ..part(None, "2026-11-03T23:00:00Z", 1, 4)
            },
        ]
    );
    // boundaries the meter does not keep are refused as by the plain cover
    assert_eq!(signed_cover(a + 60, b, WindowSize::Hour), Err(a + 60));
}

#[test]
fn csv_has_a_header_and_quotes() {
    let rows = vec![Row {
        window_start: "a".into(),
        window_end: "b".into(),
        subject: "c,1".into(),
        group_by: BTreeMap::from([("model".to_string(), json!("x\"y"))]),
        value: Some("1.5".into()),
    }];
    assert_eq!(
        to_csv(&rows, &["model".to_string()]),
        "windowStart,windowEnd,subject,model,value\na,b,\"c,1\",\"x\"\"y\",1.5\n"
    );
}

#[test]
fn to_defaults_to_now_rounded_up_to_the_meters_window() {
    let pairs = |from: &str| vec![("from".to_string(), from.to_string())];
    let now = t("2026-11-30T10:17:05Z");
    let hour = parse_query(&pairs("2026-11-30T00:00:00Z"), &meter("HOUR"), now).unwrap();
    assert_eq!(hour.to, t("2026-11-30T11:00:00Z"));
    let minute = parse_query(&pairs("2026-11-30T00:00:00Z"), &meter("MINUTE"), now).unwrap();
    assert_eq!(minute.to, t("2026-11-30T10:18:00Z"));
    let day = parse_query(&pairs("2026-11-30T00:00:00Z"), &meter("DAY"), now).unwrap();
    assert_eq!(day.to, t("2026-12-01T00:00:00Z"));
    // already on a boundary: unchanged
    let on = parse_query(
        &pairs("2026-11-30T00:00:00Z"),
        &meter("HOUR"),
        t("2026-11-30T10:00:00Z"),
    )
    .unwrap();
    assert_eq!(on.to, t("2026-11-30T10:00:00Z"));
    // the whole range is then coverable by the meter's windows
    assert!(cover(hour.from.timestamp(), hour.to.timestamp(), WindowSize::Hour).is_ok());
    assert_eq!(
        parse_query(&pairs("2026-12-01T00:00:00Z"), &meter("HOUR"), now)
            .unwrap_err()
            .to_string(),
        "from: must be before to (default: now)"
    );
}
