use super::*;
use serde_json::json;

fn parse(v: serde_json::Value) -> Result<MeterDef, FieldError> {
    parse_meter_json(&v, None)
}

#[test]
fn accepts_seed_shape_and_defaults_window() {
    let m = parse(json!({"id":"m1","eventType":"api","aggregation":"SUM","valueProperty":"$.tokens","groupBy":{"model":"$.model"}})).unwrap();
    assert_eq!(m.aggregation, Aggregation::Sum);
    assert_eq!(m.window_size, WindowSize::Hour);
    assert_eq!(m.group_by.get("model").map(String::as_str), Some("$.model"));
    assert_eq!(
        parse(json!({"id":"u","eventType":"a","aggregation":"unique","valueProperty":"$.u"}))
            .unwrap()
            .aggregation,
        Aggregation::UniqueCount
    );
}

#[test]
fn errors_name_the_field() {
    let cases = [
        (
            json!({"eventType":"a","aggregation":"count"}),
            "id: is required",
        ),
        (
            json!({"id":"a b","eventType":"a","aggregation":"count"}),
            "id: ",
        ),
        (
            json!({"id":"m","eventType":"a","aggregation":"median","valueProperty":"$.x"}),
            "aggregation: unknown",
        ),
        (
            json!({"id":"m","eventType":"a","aggregation":"sum"}),
            "valueProperty: is required",
        ),
        (
            json!({"id":"m","eventType":"a","aggregation":"sum","valueProperty":"tokens"}),
            "valueProperty: JSONPath must start",
        ),
        (
            json!({"id":"m","eventType":"a","aggregation":"sum","valueProperty":"$.[["}),
            "valueProperty: invalid JSONPath",
        ),
        (
            json!({"id":"m","eventType":"a","aggregation":"count","groupBy":{"g":"x"}}),
            "groupBy.g: JSONPath must start",
        ),
        (
            json!({"id":"m","eventType":"a","aggregation":"count","windowSize":"WEEK"}),
            "windowSize: unknown",
        ),
        (
            json!({"id":"m","aggregation":"count"}),
            "eventType: is required",
        ),
        (
            json!({"id":"m","eventType":7,"aggregation":"count"}),
            "eventType: must be a string",
        ),
        (json!([1]), "body: must be a JSON object"),
        (
            json!({"id":"m","eventType":"a","aggregation":"count","groupby":{"g":"$.g"}}),
            "groupby: unknown field; did you mean groupBy?",
        ),
        (
            json!({"id":"m","eventType":"a","aggregation":"sum","valuProperty":"$.x"}),
            "valuProperty: unknown field; did you mean valueProperty?",
        ),
        (
            json!({"id":"m","eventType":"a","aggregation":"count","window_size":"DAY"}),
            "window_size: unknown field; did you mean windowSize?",
        ),
        (
            json!({"id":"m","eventType":"a","aggregation":"count","colour":"red"}),
            "colour: unknown field (the fields are id, description, eventType",
        ),
    ];
    for (body, want) in cases {
        let err = parse(body.clone()).unwrap_err().to_string();
        assert!(
            err.starts_with(want),
            "{body}: got {err:?}, want prefix {want:?}"
        );
    }
}

#[test]
fn semantic_hash_ignores_description_only() {
    let a =
        parse(json!({"id":"m","eventType":"a","aggregation":"sum","valueProperty":"$.x"})).unwrap();
    let mut b = a.clone();
    b.description = "changed".into();
    assert_eq!(a.semantic_hash(), b.semantic_hash());
    b.value_property = Some("$.y".into());
    assert_ne!(a.semantic_hash(), b.semantic_hash());
}

#[test]
fn a_filter_rebuilds_and_export_does_not_and_unfiltered_hashes_stay() {
    let a = parse(
        json!({"id":"m","eventType":"a","aggregation":"sum","valueProperty":"$.x",
        "windowSize": "MINUTE"}),
    )
    .unwrap();
    // the fingerprint meters had before filters existed: upgrading rebuilds nothing
    let before = serde_json::json!({"eventType": "a", "aggregation": "sum",
        "valueProperty": "$.x", "groupBy": {}, "windowSize": "MINUTE"});
    let hash = |canon: serde_json::Value| {
        format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(canon.to_string().as_bytes())
        )
    };
    assert_eq!(a.semantic_hash(), hash(before));
    // meters with groupBy gained per-group totals: theirs changed once, to rebuild them
    let grouped = parse(
        json!({"id":"m","eventType":"a","aggregation":"sum","valueProperty":"$.x",
        "groupBy": {"g": "$.g"}, "windowSize": "MINUTE"}),
    )
    .unwrap();
    let with_totals = serde_json::json!({"eventType": "a", "aggregation": "sum",
        "valueProperty": "$.x", "groupBy": {"g": "$.g"}, "windowSize": "MINUTE", "groupTotals": true});
    assert_eq!(grouped.semantic_hash(), hash(with_totals));
    // HOUR meters' windows gained quarters: theirs changed once, to rebuild them
    let hourly =
        parse(json!({"id":"m","eventType":"a","aggregation":"sum","valueProperty":"$.x"})).unwrap();
    let with_quarters = serde_json::json!({"eventType": "a", "aggregation": "sum",
        "valueProperty": "$.x", "groupBy": {}, "windowSize": "HOUR", "quarters": true});
    assert_eq!(hourly.semantic_hash(), hash(with_quarters));
    let mut b = a.clone();
    b.export = Some(Export { top_subjects: 5 });
    assert_eq!(a.semantic_hash(), b.semantic_hash());
    b.filter = serde_json::from_value(json!({"$.region": {"eq": "eu"}})).unwrap();
    assert_ne!(a.semantic_hash(), b.semantic_hash());
    let parsed = parse(json!({"id":"m","eventType":"a","aggregation":"count",
        "filter": {"$.region": {"nin": ["eu"]}}, "export": {"topSubjects": 3}}))
    .unwrap();
    assert_eq!(parsed.export, Some(Export { top_subjects: 3 }));
    assert_eq!(parsed.filter["$.region"], json!({"nin": ["eu"]}));
    assert_eq!(
        parse(json!({"id":"m","eventType":"a","aggregation":"count","filter": []}))
            .unwrap_err()
            .field,
        "filter"
    );
}

#[test]
fn window_start_floors_negative_times() {
    assert_eq!(WindowSize::Hour.window_start(3599), 0);
    assert_eq!(WindowSize::Hour.window_start(-1), -3600);
    assert_eq!(WindowSize::Day.window_start(86_400 * 3 + 5), 86_400 * 3);
}

#[test]
fn thresholds_in_zones_the_windows_cannot_follow_are_refused() {
    let with = |size: &str, tz: &str| {
        parse(json!({"id":"m","eventType":"a","aggregation":"count","windowSize":size,
            "thresholds":[{"value":"1","period":"DAY"},{"value":"5","period":"MONTH","timeZone":tz}]}))
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    // Berlin's days start at 22:00 or 23:00 UTC: not on a DAY meter's UTC days
    assert_eq!(
        with("DAY", "Europe/Berlin"),
        Err("thresholds[1].timeZone: days in Europe/Berlin do not start on the DAY windows this meter keeps; use a MINUTE or HOUR meter".into())
    );
    assert_eq!(with("DAY", "Etc/UTC"), Ok(()));
    assert_eq!(with("DAY", "Africa/Abidjan"), Ok(()));
    // HOUR meters keep quarter hours: India, Nepal and Chatham are fine
    for tz in [
        "Asia/Kolkata",
        "Asia/Kathmandu",
        "Pacific/Chatham",
        "Europe/Berlin",
    ] {
        assert_eq!(with("HOUR", tz), Ok(()), "{tz}");
        assert_eq!(with("MINUTE", tz), Ok(()), "{tz}");
    }
    // a definition stored before the rule still compiles, so it keeps running
    let mut stored =
        parse(json!({"id":"m","eventType":"a","aggregation":"count","windowSize":"DAY"})).unwrap();
    stored.thresholds =
        serde_json::from_value(json!([{"value":"5","period":"DAY","timeZone":"Europe/Berlin"}]))
            .unwrap();
    assert!(CompiledMeter::compile(&stored).is_ok());
}
