use super::*;
use proptest::prelude::*;

fn now() -> DateTime<Utc> {
    Utc::now()
}

/// Compare with the reference parser for every body kind; how many events were
/// accepted as JSON.
fn same_as_reference(text: &str) -> Result<usize, TestCaseError> {
    let (mut accepted, now) = (0, now());
    for kind in [
        BodyKind::Json,
        BodyKind::CloudEvent,
        BodyKind::CloudEventBatch,
    ] {
        let expected = super::reference::parse_events(text.as_bytes(), kind, true, now);
        match (parse_events(text.as_bytes(), kind, true, now), expected) {
            (Ok(events), Ok(expected)) => {
                prop_assert_eq!(events.len(), expected.len());
                for (e, want) in events.iter().zip(&expected) {
                    let stored = e.to_event();
                    prop_assert!(stored.is_ok(), "stored form unreadable: {:?}", stored);
                    let stored = stored.unwrap();
                    prop_assert_eq!(&stored, want);
                    prop_assert_eq!(e.dedup_hash(), want.dedup_hash());
                    prop_assert!(
                        !e.id.is_empty() && !e.subject.is_empty() && !e.event_type.is_empty()
                    );
                    prop_assert!(stored.data.is_object());
                }
                if kind == BodyKind::Json {
                    accepted = events.len();
                }
            }
            (Err(err), Err(want)) => {
                prop_assert!(!err.field.is_empty() && !err.message.is_empty());
                let invalid =
                    |e: &FieldError| e.field == "body" && e.message.starts_with("invalid JSON");
                if invalid(&want) {
                    prop_assert!(
                        invalid(&err),
                        "{}: got {:?}, reference {:?}",
                        text,
                        err,
                        want
                    );
                } else {
                    prop_assert_eq!(err, want);
                }
            }
            (got, want) => prop_assert!(false, "{}: got {:?}, reference {:?}", text, got, want),
        }
    }
    Ok(accepted)
}

/// A valid event in the seed shape or as a CloudEvent, written in varied ways.
fn event_text() -> impl Strategy<Value = String> {
    let text = prop_oneof![
        "[a-zA-Z0-9_.:@-]{1,12}".prop_map(|s| format!("\"{s}\"")),
        Just("\"a\\u0062c\"".to_string()),
        Just("\"x\\/y\"".to_string()),
    ];
    let number = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| format!("{f:e}")),
        Just("-0".to_string()),
        Just("123456789012345678901234567890.5".to_string()),
        Just("1.50".to_string()),
    ];
    let leaf = prop_oneof![
        number,
        text.clone(),
        Just("null".to_string()),
        Just("true".to_string()),
        Just("\"caf\\u00e9 \\\"q\\\"\"".to_string()),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec(("[a-z]{1,3}", inner), 0..4).prop_map(|kv| format!(
                "{{{}}}",
                kv.iter()
                    .map(|(k, v)| format!("\"{k}\": {v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        ]
    });
    let data = proptest::collection::vec(("[a-z]{1,3}", value.clone()), 0..4).prop_map(|kv| {
        format!(
            "{{ {} }}",
            kv.iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    });
    let time = prop_oneof![
        Just("\"2026-11-24T10:00:00Z\"".to_string()),
        Just("\"2026-11-24T10:00:00.123456789+05:30\"".to_string()),
        Just("null".to_string()),
    ];
    let subject = prop_oneof![
        "[a-zA-Z0-9_.:@-]{1,12}".prop_map(|s| format!("\"{s}\"")),
        Just("\"a\\u0062c\"".to_string()),
    ];
    (
        any::<bool>(),
        text.clone(),
        text,
        subject,
        proptest::option::of(time),
        proptest::option::of(prop_oneof![
            Just("\"/svc\"".to_string()),
            Just("null".to_string())
        ]),
        proptest::option::of(prop_oneof![data, Just("null".to_string())]),
        proptest::option::of(value),
    )
        .prop_map(|(cloud, id, ty, subject, time, source, data, extra)| {
            let mut fields = vec![
                format!("\"id\":{id}"),
                if cloud {
                    format!("\"type\":{ty},\"specversion\":\"1.0\"")
                } else {
                    format!("\"eventType\":{ty}")
                },
                format!("\"subject\":{subject}"),
            ];
            fields.extend(time.map(|t| format!("\"time\":{t}")));
            fields.extend(source.map(|s| format!("\"source\":{s}")));
            fields.extend(data.map(|d| format!("\"data\" : {d}")));
            fields.extend(extra.map(|x| format!("\"extra\":{x}")));
            format!("{{{}}}", fields.join(","))
        })
}

fn json_text() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        Just("null".to_string()),
        Just("NaN".to_string()),
        Just("Infinity".to_string()),
        Just("-0".to_string()),
        Just("1e999999".to_string()),
        Just("123456789012345678901234567890.5".to_string()),
        "\"[^\"\\\\]{0,12}\"".prop_map(|s| s),
        Just("\"*.>\"".to_string()),
        Just("\"a b\"".to_string()),
        Just("\"\\ud800\"".to_string()),
        Just("\"\\u0031\\\"x\"".to_string()),
        Just("\"2026-11-24T10:00:00+01:00\"".to_string()),
        Just("\"1.0\"".to_string()),
        Just(" {\"v\": 1.5e3, \"s\":\"\\u00e9\"} ".to_string()),
    ];
    leaf.prop_recursive(6, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5)
                .prop_map(|v| format!("[{}]", v.join(","))),
            proptest::collection::vec(
                (
                    prop::sample::select(vec![
                        "id",
                        "eventType",
                        "type",
                        "subject",
                        "time",
                        "data",
                        "source",
                        "specversion",
                        "x",
                        "d\\u0061ta",
                        "i\\u0064"
                    ]),
                    inner
                ),
                0..7
            )
            .prop_map(|kv| format!(
                "{{{}}}",
                kv.iter()
                    .map(|(k, v)| format!("\"{k}\":{v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            )),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        for kind in [BodyKind::Json, BodyKind::CloudEvent, BodyKind::CloudEventBatch] {
            let _ = parse_events(&bytes, kind, true, now());
        }
    }

    /// ... and exactly as the reference parser (whole body into a `Value`) would:
    /// the same events stored, the same refusals (for invalid JSON the position in
    /// the message may differ).
    #[test]
    fn arbitrary_json_is_accepted_whole_or_refused_by_field(text in json_text()) {
        same_as_reference(&text)?;
    }

    /// Mostly valid events (escapes, odd numbers, nested data, unknown fields,
    /// CloudEvents), which arbitrary JSON rarely is: accepted, and stored exactly as
    /// the reference would store them.
    #[test]
    fn valid_events_are_stored_as_the_reference_stores_them(
        events in proptest::collection::vec(event_text(), 1..4),
        as_batch in any::<bool>(),
    ) {
        let body = if as_batch || events.len() > 1 {
            format!("[{}]", events.join(" , "))
        } else {
            events[0].clone()
        };
        let accepted = same_as_reference(&body)?;
        prop_assert_eq!(accepted, events.len(), "{}", body);
    }

    #[test]
    fn meter_definitions_and_jsonpaths_never_panic(
        path in "\\$?[\\[\\]\\.\\*a-z0-9'\"?@()=<>!, $]{0,30}",
        agg in "[a-zA-Z_]{0,12}",
    ) {
        let body = serde_json::json!({"id": "m", "eventType": "t", "aggregation": agg, "valueProperty": path, "groupBy": {"g": path}});
        if let Ok(def) = crate::domain::meter::parse_meter_json(&body, None) {
            let m = crate::domain::meter::CompiledMeter::compile(&def).unwrap();
            let e = Event { id: "1".into(), source: None, event_type: "t".into(), subject: "s".into(), time: now(),
                data: serde_json::json!({"a": [1, {"b": "2"}], "c": {"d": [[]]}, "e": "NaN"}), namespace: None };
            let _ = crate::domain::fold::contribution(&m, &e);
        }
    }
}

/// The kept corpus (tests/corpus): hostile bodies found or written so far. Each is
/// refused with a named field, except those named `accepted-*`.
#[test]
fn the_kept_corpus_is_refused_by_field_or_accepted() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let body = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let got = parse_events(&body, BodyKind::Json, true, now());
        if name.starts_with("accepted-") {
            assert!(got.is_ok(), "{name}: {got:?}");
        } else {
            let err = got.expect_err(&name);
            assert!(!err.field.is_empty() && !err.message.is_empty(), "{name}");
        }
        seen += 1;
    }
    assert!(seen >= 10, "corpus has {seen} entries");
}

#[test]
fn deep_nesting_and_huge_strings_are_refused_or_accepted_without_panic() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    assert_eq!(
        parse_events(deep.as_bytes(), BodyKind::Json, true, now())
            .unwrap_err()
            .field,
        "body"
    );
    let big = format!(
        "{{\"id\":\"{}\",\"eventType\":\"t\",\"subject\":\"s\"}}",
        "x".repeat(1 << 20)
    );
    assert_eq!(
        parse_events(big.as_bytes(), BodyKind::Json, true, now())
            .unwrap_err()
            .field,
        "id"
    );
    let bad_utf8 = b"{\"id\":\"\xff\xfe\",\"eventType\":\"t\",\"subject\":\"s\"}";
    assert_eq!(
        parse_events(bad_utf8, BodyKind::Json, true, now())
            .unwrap_err()
            .field,
        "body"
    );
}
