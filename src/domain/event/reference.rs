//! The parser ingestion used before it borrowed from the body: the whole body into a
//! `serde_json::Value`, then the checks. Kept to prove the borrowing parser accepts,
//! refuses and stores exactly the same (see `hostile` in the parent module).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use super::{BodyKind, Event, MAX_LEN};
use crate::error::FieldError;

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
        namespace: None,
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
