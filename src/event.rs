//! Incoming usage events: parsing, validation and the normalised form kept in the stream.
//! Pure: no I/O.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::error::FieldError;

/// An event as stored in the JetStream stream (one JSON object per message).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Event {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    pub event_type: String,
    pub subject: String,
    pub time: DateTime<Utc>,
    #[serde(default)]
    pub data: Value,
}

impl Event {
    /// Key under which repeats of this event are recognised: `source`+`id` where a
    /// source is given, else `id`. Hashed so the key is fixed-size and safe in a subject.
    pub fn dedup_hash(&self) -> String {
        let mut h = Sha256::new();
        match &self.source {
            Some(src) => {
                h.update(b"s");
                h.update((src.len() as u64).to_be_bytes());
                h.update(src.as_bytes());
            }
            None => h.update(b"i"),
        }
        h.update(self.id.as_bytes());
        let digest = h.finalize();
        // hex by hand: this runs once per ingested event
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(32);
        for b in &digest[..16] {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
        out
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events serialise")
    }

    pub fn time_rfc3339(&self) -> String {
        self.time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }
}

/// How the request body announced itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `application/json` (or unspecified): seed shape or CloudEvents, one or an array.
    Json,
    /// `application/cloudevents+json`: exactly one CloudEvent.
    CloudEvent,
    /// `application/cloudevents-batch+json`: an array of CloudEvents.
    CloudEventBatch,
}

impl BodyKind {
    pub fn from_content_type(ct: Option<&str>) -> Self {
        let ct = ct
            .unwrap_or("")
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match ct.as_str() {
            "application/cloudevents+json" => BodyKind::CloudEvent,
            "application/cloudevents-batch+json" => BodyKind::CloudEventBatch,
            _ => BodyKind::Json,
        }
    }
}

const MAX_LEN: usize = 256;

/// Parse a request body into events. All-or-nothing: the first invalid event rejects the
/// whole body, with an error naming its index and field. `now` fills in a missing time.
pub fn parse_events(
    body: &[u8],
    kind: BodyKind,
    allow_batch: bool,
    now: DateTime<Utc>,
) -> Result<Vec<Event>, FieldError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| FieldError::new("body", format!("invalid JSON: {e}")))?;
    match (value, kind) {
        (Value::Array(items), BodyKind::Json | BodyKind::CloudEventBatch) if allow_batch => {
            if items.is_empty() {
                return Err(FieldError::new(
                    "body",
                    "batch must hold at least one event",
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    parse_one(v, kind == BodyKind::CloudEventBatch, now).map_err(|e| e.at_index(i))
                })
                .collect()
        }
        (Value::Array(_), _) => Err(FieldError::new("body", "must be a single event object")),
        (_, BodyKind::CloudEventBatch) => Err(FieldError::new(
            "body",
            "must be a JSON array of CloudEvents",
        )),
        (v, kind) => Ok(vec![parse_one(&v, kind == BodyKind::CloudEvent, now)?]),
    }
}

fn parse_one(v: &Value, force_cloudevent: bool, now: DateTime<Utc>) -> Result<Event, FieldError> {
    let obj = v
        .as_object()
        .ok_or_else(|| FieldError::new("event", "must be a JSON object"))?;
    let cloudevent = force_cloudevent || obj.contains_key("specversion");
    if cloudevent {
        match obj.get("specversion") {
            Some(Value::String(s)) if s == "1.0" => {}
            Some(Value::String(s)) => {
                return Err(FieldError::new(
                    "specversion",
                    format!("unsupported version {s:?} (1.0)"),
                ))
            }
            _ => {
                return Err(FieldError::new(
                    "specversion",
                    "is required and must be \"1.0\"",
                ))
            }
        }
    }
    let type_field = if cloudevent { "type" } else { "eventType" };
    let id = required_text(obj, "id")?;
    let event_type = required_text(obj, type_field)?;
    if event_type.chars().any(char::is_control) {
        return Err(FieldError::new(
            type_field,
            "must not contain control characters",
        ));
    }
    let subject = required_text(obj, "subject")?;
    if !subject
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
    {
        return Err(FieldError::new(
            "subject",
            "must be 1-256 characters of [A-Za-z0-9_.:@-]",
        ));
    }
    let source = match obj.get("source") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.chars().count() <= MAX_LEN => Some(s.clone()),
        Some(_) => {
            return Err(FieldError::new(
                "source",
                "must be a string of 1-256 characters",
            ))
        }
    };
    let time = match obj.get("time") {
        None | Some(Value::Null) => now,
        Some(Value::String(s)) => DateTime::parse_from_rfc3339(s)
            .map_err(|e| FieldError::new("time", format!("must be an RFC 3339 timestamp: {e}")))?
            .with_timezone(&Utc),
        Some(_) => {
            return Err(FieldError::new(
                "time",
                "must be an RFC 3339 timestamp string",
            ))
        }
    };
    let data = match obj.get("data") {
        None | Some(Value::Null) => Value::Object(Map::new()),
        Some(d @ Value::Object(_)) => d.clone(),
        Some(_) => return Err(FieldError::new("data", "must be a JSON object")),
    };
    Ok(Event {
        id,
        source,
        event_type,
        subject,
        time,
        data,
    })
}

fn required_text(obj: &Map<String, Value>, field: &str) -> Result<String, FieldError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(FieldError::new(field, "is required")),
        Some(Value::String(s)) if s.is_empty() => Err(FieldError::new(field, "must not be empty")),
        Some(Value::String(s)) if s.chars().count() > MAX_LEN => Err(FieldError::new(
            field,
            format!("must be at most {MAX_LEN} characters"),
        )),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(FieldError::new(field, "must be a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-11-24T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }
    fn one(v: Value) -> Result<Event, FieldError> {
        parse_events(v.to_string().as_bytes(), BodyKind::Json, true, now()).map(|mut e| e.remove(0))
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
        let body = json!([{"specversion":"1.0","id":"a","type":"com.acme.call","source":"/svc","subject":"c1"}]);
        let evs = parse_events(
            body.to_string().as_bytes(),
            BodyKind::CloudEventBatch,
            true,
            now(),
        )
        .unwrap();
        assert_eq!(evs[0].event_type, "com.acme.call");
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
        let err =
            parse_events(batch.to_string().as_bytes(), BodyKind::Json, true, now()).unwrap_err();
        assert_eq!(err.to_string(), "[1].subject: is required");
        let err = parse_events(b"{\"id\": NaN}", BodyKind::Json, true, now()).unwrap_err();
        assert_eq!(err.field, "body");
        let err = parse_events(b"[]", BodyKind::Json, true, now()).unwrap_err();
        assert_eq!(err.field, "body");
        let err = parse_events(b"[{}]", BodyKind::Json, false, now()).unwrap_err();
        assert_eq!(err.to_string(), "body: must be a single event object");
    }
}

/// Hostile input: whatever the bytes, parsing returns a value or an error naming a
/// field, never panics; and what it accepts is stored under collision-free keys.
#[cfg(test)]
mod hostile {
    use super::*;
    use proptest::prelude::*;

    fn now() -> DateTime<Utc> {
        Utc::now()
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
                            "x"
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

        #[test]
        fn arbitrary_json_is_accepted_whole_or_refused_by_field(text in json_text()) {
            for kind in [BodyKind::Json, BodyKind::CloudEvent, BodyKind::CloudEventBatch] {
                match parse_events(text.as_bytes(), kind, true, now()) {
                    Ok(events) => {
                        for e in events {
                            prop_assert!(!e.id.is_empty() && !e.subject.is_empty() && !e.event_type.is_empty());
                            prop_assert!(e.data.is_object());
                            // the subject the event is stored on is one escaped token
                            let subject = crate::keys::Names::new("s").event_subject(&e.event_type);
                            prop_assert_eq!(subject.matches('.').count(), 2);
                            prop_assert!(!subject.contains(['*', '>', ' ']));
                        }
                    }
                    Err(err) => prop_assert!(!err.field.is_empty() && !err.message.is_empty()),
                }
            }
        }

        #[test]
        fn tokens_are_injective_and_safe(a in "\\PC{0,40}", b in "\\PC{0,40}") {
            let (ta, tb) = (crate::keys::token(&a), crate::keys::token(&b));
            prop_assert!(ta.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-' || c == b'='));
            prop_assert_eq!(ta == tb, a == b);
            prop_assert_eq!(crate::keys::untoken(&ta), Some(a.clone()));
        }

        #[test]
        fn meter_definitions_and_jsonpaths_never_panic(
            path in "\\$?[\\[\\]\\.\\*a-z0-9'\"?@()=<>!, $]{0,30}",
            agg in "[a-zA-Z_]{0,12}",
        ) {
            let body = serde_json::json!({"id": "m", "eventType": "t", "aggregation": agg, "valueProperty": path, "groupBy": {"g": path}});
            if let Ok(def) = crate::meter::parse_meter_json(&body, None) {
                let m = crate::meter::CompiledMeter::compile(&def).unwrap();
                let e = Event { id: "1".into(), source: None, event_type: "t".into(), subject: "s".into(), time: now(),
                    data: serde_json::json!({"a": [1, {"b": "2"}], "c": {"d": [[]]}, "e": "NaN"}) };
                let _ = crate::fold::contribution(&m, &e);
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
}
