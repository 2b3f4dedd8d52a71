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
mod tests;

/// Hostile input: whatever the bytes, parsing returns a value or an error naming a
/// field, never panics; and what it accepts is stored under collision-free keys.
#[cfg(test)]
mod hostile;
