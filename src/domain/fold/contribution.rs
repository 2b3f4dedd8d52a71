//! What an event contributes to a meter: its value (parsed exactly), its group, or why
//! it is invalid for the meter. Meters that read the same property with the same groupBy
//! share one evaluation per event.

use std::collections::BTreeMap;
use std::str::FromStr;

use jsonpath_rust::query::js_path_process;
use rust_decimal::Decimal;
use serde_json::Value;

use crate::domain::event::Event;
use crate::domain::meter::{Aggregation, CompiledMeter, Path};

/// Distinct values a single reading tracks exactly for `unique_count`. Beyond it the
/// reading keeps counting values it has not seen, without remembering them (so repeats
/// of such values are over-counted), and says so with `overflow > 0`. Sized to keep one
/// reading under NATS's default 1 MiB message limit.
pub const DISTINCT_CAP: usize = 100_000;

/// The value an event contributes to a meter.
#[derive(Clone, Debug, PartialEq)]
pub enum Value_ {
    /// `count`: no value needed.
    None,
    Number(Decimal),
    /// `unique_count`: a 64-bit hash of the value's canonical form.
    Distinct(u64),
}

/// The values of a meter's groupBy properties for one event (name to value, `null`
/// where the event lacks the property).
pub type GroupValues = BTreeMap<String, Value>;

/// Group values as readings hold them: shared, since every window of a group (and the
/// subject's total) carries the same ones.
pub type SharedGroup = std::sync::Arc<GroupValues>;

pub(super) fn no_group(g: &SharedGroup) -> bool {
    g.is_empty()
}

/// What one event means to one meter.
#[derive(Clone, Debug, PartialEq)]
pub enum Contribution {
    Valid {
        value: Value_,
        /// Hash of the event's group values ([`group_hash`]); `None` without groupBy.
        group: Option<u64>,
    },
    Invalid(String),
    /// The event does not match the meter's `filter`: not the meter's to count.
    Filtered,
}

pub(crate) fn first_match<'a>(path: &Path, data: &'a Value) -> Option<&'a Value> {
    match path {
        // Most meters name plain fields: walking them directly is several times cheaper
        // than the general JSONPath engine, with the same answer (see meter.rs tests).
        Path::Fields(fields) => fields.iter().try_fold(data, |v, f| v.get(f.as_str())),
        Path::Query(q) => js_path_process(q, data)
            .ok()?
            .into_iter()
            .next()
            .map(|r| r.val()),
    }
}

/// Parse a JSON number or numeric string as an exact decimal.
pub fn parse_number(v: &Value) -> Result<Decimal, String> {
    match v {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(Decimal::from(i))
            } else if let Some(u) = n.as_u64() {
                Ok(Decimal::from(u))
            } else {
                // The shortest text that round-trips the float is the literal the client
                // sent whenever it had at most 15 significant digits.
                let f = n.as_f64().ok_or("value is not a finite number")?;
                let text = f.to_string();
                Decimal::from_str(&text)
                    .or_else(|_| Decimal::from_scientific(&format!("{f:e}")))
                    .map_err(|_| format!("value {n} is out of the exact decimal range"))
            }
        }
        Value::String(s) => {
            let t = s.trim();
            let parsed = if t.contains(['e', 'E']) {
                Decimal::from_scientific(t)
            } else {
                Decimal::from_str_exact(t)
            };
            parsed.map_err(|_| format!("value {s:?} is not a number"))
        }
        Value::Null => Err("value is null".into()),
        other => Err(format!("value {other} is not a number")),
    }
}

/// Canonical hash for `unique_count`: numbers by their exact decimal value (so `1`,
/// `1.0` and `"1"` are one value), strings and booleans by their text.
pub(super) fn distinct_hash(v: &Value) -> Result<u64, String> {
    let canon = match v {
        Value::Number(_) => format!("n:{}", parse_number(v)?.normalize()),
        Value::String(s) => match parse_number(v) {
            Ok(d) => format!("n:{}", d.normalize()),
            Err(_) => format!("s:{s}"),
        },
        Value::Bool(b) => format!("b:{b}"),
        Value::Null => return Err("value is null".into()),
        _ => return Err("value must be a string, number or boolean".into()),
    };
    Ok(xxhash_rust::xxh3::xxh3_64(canon.as_bytes()))
}

/// Token for a set of group values: `_` without groupBy, else a hash of their canonical
/// JSON (the values themselves are stored inside the reading).
pub fn group_token(group: &GroupValues) -> String {
    if group.is_empty() {
        "_".into()
    } else {
        let canon = serde_json::to_string(group).unwrap_or_default();
        token_of(Some(xxhash_rust::xxh3::xxh3_64(canon.as_bytes())))
    }
}

/// The token of a group hash (`_` for none): the group's part of a window's key.
pub fn token_of(group: Option<u64>) -> String {
    match group {
        None => "_".into(),
        Some(h) => format!("{h:016x}"),
    }
}

/// Feeds serialized JSON straight into the hash, so no text is built per event.
struct HashWriter(xxhash_rust::xxh3::Xxh3);

impl std::io::Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hash of an event's group values for a meter: the same hash [`group_token`] takes of
/// [`group_values`] (the canonical JSON of the map), computed without building the map.
/// `None` when the meter has no groupBy.
pub fn group_hash(meter: &CompiledMeter, event: &Event) -> Option<u64> {
    if meter.group_paths.is_empty() {
        return None;
    }
    let mut w = HashWriter(xxhash_rust::xxh3::Xxh3::new());
    // group_paths is in name order, as a BTreeMap serializes
    w.0.update(b"{");
    for (i, (name, path)) in meter.group_paths.iter().enumerate() {
        if i > 0 {
            w.0.update(b",");
        }
        let v = first_match(path, &event.data).unwrap_or(&Value::Null);
        // writing into a hash cannot fail, and neither can serializing a Value
        let _ = serde_json::to_writer(&mut w, name);
        w.0.update(b":");
        let _ = serde_json::to_writer(&mut w, v);
    }
    w.0.update(b"}");
    Some(w.0.digest())
}

/// An event's group values for a meter (empty without groupBy).
pub fn group_values(meter: &CompiledMeter, event: &Event) -> GroupValues {
    meter
        .group_paths
        .iter()
        .map(|(name, path)| {
            (
                name.clone(),
                first_match(path, &event.data)
                    .cloned()
                    .unwrap_or(Value::Null),
            )
        })
        .collect()
}

/// Whether two meters draw the same contribution from every event, so that it is
/// evaluated once for both: the same kind of value (none, number, distinct) from the
/// same property, the same groupBy and the same filter.
pub fn same_contribution(a: &CompiledMeter, b: &CompiledMeter) -> bool {
    fn kind(agg: Aggregation) -> u8 {
        match agg {
            Aggregation::Count => 0,
            Aggregation::UniqueCount => 1,
            _ => 2,
        }
    }
    let (ka, kb) = (kind(a.def.aggregation), kind(b.def.aggregation));
    ka == kb
        && (ka == 0 || a.def.value_property == b.def.value_property)
        && a.def.group_by == b.def.group_by
        && a.def.filter == b.def.filter
        && a.def.scope == b.def.scope
}

/// Evaluate a meter against one event.
pub fn contribution(meter: &CompiledMeter, event: &Event) -> Contribution {
    if !meter.def.scope.admits(event.namespace.as_deref()) || !meter.filter.matches(&event.data) {
        return Contribution::Filtered;
    }
    let value = match (&meter.value_path, meter.def.aggregation) {
        (_, Aggregation::Count) => Value_::None,
        (None, _) => return Contribution::Invalid("meter has no valueProperty".into()),
        (Some(path), agg) => {
            let prop = meter.def.value_property.as_deref().unwrap_or("$");
            let Some(raw) = first_match(path, &event.data) else {
                return Contribution::Invalid(format!("valueProperty {prop}: missing"));
            };
            let parsed = if agg == Aggregation::UniqueCount {
                distinct_hash(raw).map(Value_::Distinct)
            } else {
                parse_number(raw).map(Value_::Number)
            };
            match parsed {
                Ok(v) => v,
                Err(why) => return Contribution::Invalid(format!("valueProperty {prop}: {why}")),
            }
        }
    };
    Contribution::Valid {
        value,
        group: group_hash(meter, event),
    }
}
