use super::*;
use serde_json::json;

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}
fn one(v: Value) -> Result<Event, FieldError> {
    parse_events(v.to_string().as_bytes(), BodyKind::Json, true, now())
        .map(|mut e| e.remove(0).to_event().expect("stored form reads back"))
}

#[test]
fn seed_shape_is_accepted_as_is() {
    let e = one(json!({"id":"evt-1","time":"2026-11-24T10:00:00Z","eventType":"api.request","subject":"customer-1","data":{"tokens":120,"model":"gpt-x"}})).unwrap();
    assert_eq!(e.event_type, "api.request");
    assert_eq!(e.time_rfc3339(), "2026-11-24T10:00:00Z");
    assert_eq!(e.data["tokens"], json!(120));
    assert_eq!(e.source, None);
}

#[test]
fn defaults_time_and_data() {
    let e = one(json!({"id":"1","eventType":"t","subject":"s"})).unwrap();
    assert_eq!(e.time, now());
    assert_eq!(e.data, json!({}));
}

#[test]
fn cloudevents_map_type_and_source() {
    let body = json!([{"specversion":"1.0","id":"a","type":"com.acme.call","source":"/svc","subject":"c1"}]).to_string();
    let evs = parse_events(body.as_bytes(), BodyKind::CloudEventBatch, true, now()).unwrap();
    assert_eq!(evs[0].event_type, "com.acme.call");
    assert_eq!(evs[0].to_event().unwrap().data, json!({}));
    assert_eq!(evs[0].source.as_deref(), Some("/svc"));
    let single = json!({"specversion":"1.0","id":"a","type":"t","subject":"c1"});
    assert!(parse_events(
        single.to_string().as_bytes(),
        BodyKind::CloudEvent,
        true,
        now()
    )
    .is_ok());
    let err = parse_events(
        single.to_string().as_bytes(),
        BodyKind::CloudEventBatch,
        true,
        now(),
    )
    .unwrap_err();
    assert_eq!(err.field, "body");
    let no_ver = json!({"id":"a","type":"t","subject":"c1"});
    let err = parse_events(
        no_ver.to_string().as_bytes(),
        BodyKind::CloudEvent,
        true,
        now(),
    )
    .unwrap_err();
    assert_eq!(err.field, "specversion");
}

#[test]
fn dedup_key_uses_source_when_given() {
    let a = one(json!({"id":"1","eventType":"t","subject":"s"})).unwrap();
    let mut b = a.clone();
    b.source = Some("x".into());
    let mut c = a.clone();
    c.source = Some("y".into());
    assert_ne!(a.dedup_hash(), b.dedup_hash());
    assert_ne!(b.dedup_hash(), c.dedup_hash());
    let mut a2 = a.clone();
    a2.data = json!({"other": 1});
    assert_eq!(a.dedup_hash(), a2.dedup_hash());
    // the hex is the first 16 bytes of SHA-256("i" + id), lower case
    let reference: String = Sha256::digest(b"i1")[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(a.dedup_hash(), reference);
    assert_eq!(a.dedup_hash().len(), 32);
}

#[test]
fn errors_name_the_field_and_index() {
    let cases = [
        (json!({"eventType":"t","subject":"s"}), "id: is required"),
        (
            json!({"id":"","eventType":"t","subject":"s"}),
            "id: must not be empty",
        ),
        (
            json!({"id":1,"eventType":"t","subject":"s"}),
            "id: must be a string",
        ),
        (
            json!({"id":"x".repeat(257),"eventType":"t","subject":"s"}),
            "id: must be at most 256",
        ),
        (json!({"id":"1","subject":"s"}), "eventType: is required"),
        (
            json!({"id":"1","eventType":"t","subject":"a b"}),
            "subject: must be",
        ),
        (
            json!({"id":"1","eventType":"t","subject":"a*"}),
            "subject: must be",
        ),
        (
            json!({"id":"1","eventType":"t","subject":"a>"}),
            "subject: must be",
        ),
        (
            json!({"id":"1","eventType":"t","subject":"s","time":"yesterday"}),
            "time: must be an RFC 3339",
        ),
        (
            json!({"id":"1","eventType":"t","subject":"s","data":[1]}),
            "data: must be a JSON object",
        ),
        (json!("x"), "event: must be a JSON object"),
    ];
    for (body, want) in cases {
        let err = one(body.clone()).unwrap_err().to_string();
        assert!(err.starts_with(want), "{body}: got {err:?}");
    }
    let batch = json!([{"id":"1","eventType":"t","subject":"s"},{"id":"2","eventType":"t"}]);
    let err = parse_events(batch.to_string().as_bytes(), BodyKind::Json, true, now()).unwrap_err();
    assert_eq!(err.to_string(), "[1].subject: is required");
    let err = parse_events(b"{\"id\": NaN}", BodyKind::Json, true, now()).unwrap_err();
    assert_eq!(err.field, "body");
    let err = parse_events(b"[]", BodyKind::Json, true, now()).unwrap_err();
    assert_eq!(err.field, "body");
    let err = parse_events(b"[{}]", BodyKind::Json, false, now()).unwrap_err();
    assert_eq!(err.to_string(), "body: must be a single event object");
}
