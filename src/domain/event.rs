//! Incoming usage events: parsing, validation and the normalised form kept in the stream.
//! Pure: no I/O.

use std::borrow::Cow;
use std::sync::LazyLock;

use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
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
    /// The namespace it was posted from, recorded with TENANCY=namespaced only (see
    /// [`crate::domain::tenancy`]); never taken from the request body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

impl Event {
    /// Key under which repeats of this event are recognised: `source`+`id` where a
    /// source is given, else `id`, within the namespace it was posted from when one is
    /// recorded. Hashed so the key is fixed-size and safe in a subject.
    pub fn dedup_hash(&self) -> String {
        dedup_hash(self.namespace.as_deref(), self.source.as_deref(), &self.id)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events serialise")
    }

    pub fn time_rfc3339(&self) -> String {
        self.time.to_rfc3339_opts(SecondsFormat::AutoSi, true)
    }
}

/// See [`Event::dedup_hash`].
fn dedup_hash(namespace: Option<&str>, source: Option<&str>, id: &str) -> String {
    let mut h = Sha256::new();
    // a namespace-less key hashes exactly as before namespaces were recorded
    if let Some(ns) = namespace {
        h.update(b"n");
        h.update((ns.len() as u64).to_be_bytes());
        h.update(ns.as_bytes());
    }
    match source {
        Some(src) => {
            h.update(b"s");
            h.update((src.len() as u64).to_be_bytes());
            h.update(src.as_bytes());
        }
        None => h.update(b"i"),
    }
    h.update(id.as_bytes());
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

/// A validated event as it arrived, borrowing from the request body: ingestion only
/// checks the envelope and passes `data` on as the client wrote it, so an event costs
/// no tree of maps and strings on its way to the stream.
#[derive(Clone, Debug)]
pub struct Incoming<'a> {
    pub id: Cow<'a, str>,
    pub source: Option<Cow<'a, str>>,
    pub event_type: Cow<'a, str>,
    pub subject: Cow<'a, str>,
    pub time: DateTime<Utc>,
    /// A JSON object, checked to parse exactly as [`Event::data`] will (`None`: `{}`),
    /// passed on as written.
    pub data: Option<&'a RawValue>,
    /// Set by ingestion, never from the body: see [`Event::namespace`].
    pub namespace: Option<Cow<'a, str>>,
}

/// The stored layout, field for field the one [`Event`] reads.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Stored<'e> {
    id: &'e str,
    #[serde(skip_serializing_if = "Option::is_none")]
    source: Option<&'e str>,
    event_type: &'e str,
    subject: &'e str,
    time: DateTime<Utc>,
    data: &'e RawValue,
    #[serde(skip_serializing_if = "Option::is_none")]
    namespace: Option<&'e str>,
}

static EMPTY_OBJECT: LazyLock<Box<RawValue>> =
    LazyLock::new(|| RawValue::from_string("{}".to_owned()).expect("valid JSON"));

impl Incoming<'_> {
    pub fn dedup_hash(&self) -> String {
        dedup_hash(self.namespace.as_deref(), self.source.as_deref(), &self.id)
    }

    /// The message stored in the stream: an [`Event`] in JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        let stored = Stored {
            id: &self.id,
            source: self.source.as_deref(),
            event_type: &self.event_type,
            subject: &self.subject,
            time: self.time,
            data: self.data.unwrap_or(&EMPTY_OBJECT),
            namespace: self.namespace.as_deref(),
        };
        let mut out = Vec::with_capacity(160 + self.data.map_or(2, |d| d.get().len()));
        serde_json::to_writer(&mut out, &stored).expect("events serialise");
        out
    }

    /// The event as the aggregator will read it back from the stream.
    pub fn to_event(&self) -> Result<Event, serde_json::Error> {
        serde_json::from_slice(&self.to_bytes())
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
///
/// Accepts and refuses exactly what parsing the body into a `serde_json::Value` and
/// checking that would (every value is parsed, numbers and escapes included), but keeps
/// only the envelope's fields, borrowed from `body` where they hold no escapes.
pub fn parse_events(
    body: &[u8],
    kind: BodyKind,
    allow_batch: bool,
    now: DateTime<Utc>,
) -> Result<Vec<Incoming<'_>>, FieldError> {
    let parsed: Body<'_> = serde_json::from_slice(body)
        .map_err(|e| FieldError::new("body", format!("invalid JSON: {e}")))?;
    match (parsed, kind) {
        (Body::Many(items), BodyKind::Json | BodyKind::CloudEventBatch) if allow_batch => {
            if items.is_empty() {
                return Err(FieldError::new(
                    "body",
                    "batch must hold at least one event",
                ));
            }
            items
                .into_iter()
                .enumerate()
                .map(|(i, item)| {
                    parse_one(item, kind == BodyKind::CloudEventBatch, now)
                        .map_err(|e| e.at_index(i))
                })
                .collect()
        }
        (Body::Many(_), _) => Err(FieldError::new("body", "must be a single event object")),
        (_, BodyKind::CloudEventBatch) => Err(FieldError::new(
            "body",
            "must be a JSON array of CloudEvents",
        )),
        (Body::One(item), kind) => Ok(vec![parse_one(item, kind == BodyKind::CloudEvent, now)?]),
    }
}

fn parse_one<'a>(
    item: Item<'a>,
    force_cloudevent: bool,
    now: DateTime<Utc>,
) -> Result<Incoming<'a>, FieldError> {
    let Item::Object(env) = item else {
        return Err(FieldError::new("event", "must be a JSON object"));
    };
    let cloudevent = force_cloudevent || !matches!(env.specversion, Loose::Absent);
    if cloudevent {
        match &env.specversion {
            Loose::Text(s) if s == "1.0" => {}
            Loose::Text(s) => {
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
    let (type_field, event_type) = if cloudevent {
        ("type", env.ce_type)
    } else {
        ("eventType", env.event_type)
    };
    let id = required_text(env.id, "id")?;
    let event_type = required_text(event_type, type_field)?;
    if event_type.chars().any(char::is_control) {
        return Err(FieldError::new(
            type_field,
            "must not contain control characters",
        ));
    }
    let subject = required_text(env.subject, "subject")?;
    if !subject
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'-'))
    {
        return Err(FieldError::new(
            "subject",
            "must be 1-256 characters of [A-Za-z0-9_.:@-]",
        ));
    }
    let source = match env.source {
        Loose::Absent | Loose::Null => None,
        Loose::Text(s) if !s.is_empty() && s.chars().count() <= MAX_LEN => Some(s),
        _ => {
            return Err(FieldError::new(
                "source",
                "must be a string of 1-256 characters",
            ))
        }
    };
    let time = match env.time {
        Loose::Absent | Loose::Null => now,
        Loose::Text(s) => DateTime::parse_from_rfc3339(&s)
            .map_err(|e| FieldError::new("time", format!("must be an RFC 3339 timestamp: {e}")))?
            .with_timezone(&Utc),
        Loose::Other => {
            return Err(FieldError::new(
                "time",
                "must be an RFC 3339 timestamp string",
            ))
        }
    };
    let data = match env.data {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) if raw.get().starts_with('{') => Some(raw),
        Some(_) => return Err(FieldError::new("data", "must be a JSON object")),
    };
    Ok(Incoming {
        id,
        source,
        event_type,
        subject,
        time,
        data,
        namespace: None,
    })
}

fn required_text<'a>(value: Loose<'a>, field: &str) -> Result<Cow<'a, str>, FieldError> {
    match value {
        Loose::Absent | Loose::Null => Err(FieldError::new(field, "is required")),
        Loose::Text(s) if s.is_empty() => Err(FieldError::new(field, "must not be empty")),
        Loose::Text(s) if s.chars().count() > MAX_LEN => Err(FieldError::new(
            field,
            format!("must be at most {MAX_LEN} characters"),
        )),
        Loose::Text(s) => Ok(s),
        Loose::Other => Err(FieldError::new(field, "must be a string")),
    }
}

// ---- the request body's shape, read in one pass ----

/// A whole body: one value, or an array of them.
enum Body<'a> {
    One(Item<'a>),
    Many(Vec<Item<'a>>),
}

/// One element: an object's envelope fields, or something else (refused by the caller,
/// which knows the element's index).
enum Item<'a> {
    Object(Envelope<'a>),
    Other,
}

/// The fields an event's envelope may have; others are parsed (so that invalid JSON is
/// refused wherever it is) and dropped. A repeated key keeps its last value, as in a
/// `serde_json::Value`.
#[derive(Default)]
struct Envelope<'a> {
    id: Loose<'a>,
    specversion: Loose<'a>,
    event_type: Loose<'a>,
    ce_type: Loose<'a>,
    subject: Loose<'a>,
    source: Loose<'a>,
    time: Loose<'a>,
    data: Option<&'a RawValue>,
}

/// An envelope field as met: absent, null, a string, or another kind of value.
#[derive(Default)]
enum Loose<'a> {
    #[default]
    Absent,
    Null,
    Text(Cow<'a, str>),
    Other,
}

/// Visitor methods for the JSON values a visitor does not look into, each giving
/// `$value`: numbers and booleans, and with `and text and null` strings and null too.
macro_rules! scalars_give {
    ($value:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
    ($value:expr, and text and null) => {
        scalars_give!($value);
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($value)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($value)
        }
    };
}

/// Any JSON value, parsed and checked exactly as `serde_json::Value` would be, but kept
/// nowhere.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(CheckedVisitor).map(|_| Checked)
    }
}

struct CheckedVisitor;

impl<'de> Visitor<'de> for CheckedVisitor {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    scalars_give!((), and text and null);
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(())
    }
}

impl<'de> Deserialize<'de> for Loose<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Loose<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, s: &'de str) -> Result<Loose<'de>, E> {
                Ok(Loose::Text(Cow::Borrowed(s)))
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Loose<'de>, E> {
                Ok(Loose::Text(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E: de::Error>(self, s: String) -> Result<Loose<'de>, E> {
                Ok(Loose::Text(Cow::Owned(s)))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Loose<'de>, E> {
                Ok(Loose::Null)
            }
            scalars_give!(Loose::Other);
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Loose<'de>, A::Error> {
                CheckedVisitor.visit_seq(seq).map(|_| Loose::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Loose<'de>, A::Error> {
                CheckedVisitor.visit_map(map).map(|_| Loose::Other)
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Item<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(ItemVisitor)
    }
}

struct ItemVisitor;

impl<'de> Visitor<'de> for ItemVisitor {
    type Value = Item<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an event object")
    }
    scalars_give!(Item::Other, and text and null);
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Item<'de>, A::Error> {
        CheckedVisitor.visit_seq(seq).map(|_| Item::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Item<'de>, A::Error> {
        let mut env = Envelope::default();
        while let Some(key) = map.next_key::<Loose<'de>>()? {
            let Loose::Text(key) = key else {
                return Err(de::Error::custom("object keys must be strings"));
            };
            match key.as_ref() {
                "id" => env.id = map.next_value()?,
                "specversion" => env.specversion = map.next_value()?,
                "eventType" => env.event_type = map.next_value()?,
                "type" => env.ce_type = map.next_value()?,
                "subject" => env.subject = map.next_value()?,
                "source" => env.source = map.next_value()?,
                "time" => env.time = map.next_value()?,
                "data" => {
                    let raw = map.next_value::<&'de RawValue>()?;
                    // Capturing a raw value only scans it: parse it as the aggregator
                    // will, so that what is accepted now is readable then.
                    if let Err(e) = serde_json::from_str::<Checked>(raw.get()) {
                        let text = e.to_string();
                        let reason = text.split(" at line ").next().unwrap_or_default();
                        return Err(de::Error::custom(format!("{reason} in data")));
                    }
                    env.data = Some(raw);
                }
                _ => {
                    map.next_value::<Checked>()?;
                }
            }
        }
        Ok(Item::Object(env))
    }
}

impl<'de> Deserialize<'de> for Body<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Body<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an event or an array of events")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Body<'de>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                Ok(Body::Many(items))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Body<'de>, A::Error> {
                ItemVisitor.visit_map(map).map(Body::One)
            }
            scalars_give!(Body::One(Item::Other), and text and null);
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod reference;

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
}
