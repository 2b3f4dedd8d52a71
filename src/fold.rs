//! The aggregation core: folding events into readings. Pure functions over values,
//! no I/O; the aggregator loads readings, calls [`apply`], and stores what changed.
//!
//! Exactly-once rests on one rule: every reading records the highest stream sequence
//! applied to it (`seq`), and an event is applied to a reading only when its sequence is
//! higher. Events reach each reading in stream order, so replaying any prefix of the
//! stream (after a crash, or by a second leader) changes nothing.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::BuildHasher;
use std::str::FromStr;

use base64::Engine;
use chrono::{DateTime, Utc};
use jsonpath_rust::parser::model::JpQuery;
use jsonpath_rust::query::js_path_process;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::Event;
use crate::keys::ReadingKey;
use crate::meter::{Aggregation, CompiledMeter};

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

/// What one event means to one meter.
#[derive(Clone, Debug, PartialEq)]
pub enum Contribution {
    Valid {
        value: Value_,
        group: BTreeMap<String, Value>,
        group_token: String,
    },
    Invalid(String),
}

fn first_match<'a>(path: &JpQuery, data: &'a Value) -> Option<&'a Value> {
    js_path_process(path, data)
        .ok()?
        .into_iter()
        .next()
        .map(|r| r.val())
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
fn distinct_hash(v: &Value) -> Result<u64, String> {
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
pub fn group_token(group: &BTreeMap<String, Value>) -> String {
    if group.is_empty() {
        "_".into()
    } else {
        let canon = serde_json::to_string(group).unwrap_or_default();
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(canon.as_bytes()))
    }
}

/// Evaluate a meter against one event.
pub fn contribution(meter: &CompiledMeter, event: &Event) -> Contribution {
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
    let group: BTreeMap<String, Value> = meter
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
        .collect();
    let group_token = group_token(&group);
    Contribution::Valid {
        value,
        group,
        group_token,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
    pub time: DateTime<Utc>,
    pub seq: u64,
}

/// Exact set of distinct-value hashes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Distinct {
    pub hashes: BTreeSet<u64>,
    /// Values counted after the set reached [`DISTINCT_CAP`].
    pub overflow: u64,
}

impl Distinct {
    pub fn insert(&mut self, h: u64) {
        if self.hashes.contains(&h) {
            return;
        }
        if self.hashes.len() < DISTINCT_CAP {
            self.hashes.insert(h);
        } else {
            self.overflow += 1;
        }
    }
    pub fn count(&self) -> u64 {
        self.hashes.len() as u64 + self.overflow
    }
    pub fn merge(&mut self, other: &Distinct) {
        for h in &other.hashes {
            self.insert(*h);
        }
        self.overflow += other.overflow;
    }
}

/// Compact form: sorted hashes as delta-encoded LEB128 varints, base64.
impl Serialize for Distinct {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = Vec::with_capacity(self.hashes.len() * 8);
        let mut prev = 0u64;
        for &h in &self.hashes {
            let mut d = h - prev;
            prev = h;
            loop {
                let byte = (d & 0x7f) as u8;
                d >>= 7;
                if d == 0 {
                    buf.push(byte);
                    break;
                }
                buf.push(byte | 0x80);
            }
        }
        let enc = base64::engine::general_purpose::STANDARD_NO_PAD.encode(buf);
        (enc, self.overflow).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Distinct {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (enc, overflow): (String, u64) = Deserialize::deserialize(d)?;
        let buf = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(enc)
            .map_err(serde::de::Error::custom)?;
        let mut hashes = BTreeSet::new();
        let (mut prev, mut cur, mut shift) = (0u64, 0u64, 0u32);
        for b in buf {
            if shift >= 64 {
                return Err(serde::de::Error::custom("bad varint"));
            }
            cur |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                prev = prev.wrapping_add(cur);
                hashes.insert(prev);
                cur = 0;
                shift = 0;
            } else {
                shift += 7;
            }
        }
        Ok(Distinct { hashes, overflow })
    }
}

/// Running aggregate of one reading: enough to answer every aggregation, and to merge
/// readings exactly (sum and count add, min/max compare, latest by time then sequence,
/// distinct sets unite).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Acc {
    pub count: u64,
    #[serde(with = "rust_decimal::serde::str")]
    pub sum: Decimal,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    pub min: Option<Decimal>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        with = "rust_decimal::serde::str_option"
    )]
    pub max: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<Latest>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distinct: Option<Distinct>,
}

impl Acc {
    /// The accumulator after adding one value, or `None` when the sum would overflow.
    fn added(&self, v: &Value_, time: DateTime<Utc>, seq: u64) -> Option<Acc> {
        let mut next = self.clone();
        next.count += 1;
        match v {
            Value_::None => {}
            Value_::Number(d) => {
                next.sum = self.sum.checked_add(*d)?;
                next.min = Some(self.min.map_or(*d, |m| m.min(*d)));
                next.max = Some(self.max.map_or(*d, |m| m.max(*d)));
                let newer = self
                    .latest
                    .as_ref()
                    .is_none_or(|l| (time, seq) > (l.time, l.seq));
                if newer {
                    next.latest = Some(Latest {
                        value: *d,
                        time,
                        seq,
                    });
                }
            }
            Value_::Distinct(h) => next
                .distinct
                .get_or_insert_with(Distinct::default)
                .insert(*h),
        }
        Some(next)
    }

    /// Merge another accumulator of the same meter into this one (for queries).
    pub fn merge(&mut self, other: &Acc) {
        self.count += other.count;
        self.sum = self.sum.checked_add(other.sum).unwrap_or(self.sum);
        self.min = match (self.min, other.min) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.max = match (self.max, other.max) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        if let Some(o) = &other.latest {
            if self
                .latest
                .as_ref()
                .is_none_or(|l| (o.time, o.seq) > (l.time, l.seq))
            {
                self.latest = Some(o.clone());
            }
        }
        if let Some(o) = &other.distinct {
            self.distinct.get_or_insert_with(Distinct::default).merge(o);
        }
    }

    /// The reading's value under an aggregation; `None` before any event.
    pub fn value(&self, agg: Aggregation) -> Option<Decimal> {
        let v = match agg {
            Aggregation::Count => Decimal::from(self.count),
            Aggregation::Sum => self.sum,
            Aggregation::Avg if self.count == 0 => return None,
            Aggregation::Avg => self.sum.checked_div(Decimal::from(self.count))?,
            Aggregation::Min => self.min?,
            Aggregation::Max => self.max?,
            Aggregation::UniqueCount => {
                Decimal::from(self.distinct.as_ref().map_or(0, Distinct::count))
            }
            Aggregation::Latest => self.latest.as_ref()?.value,
        };
        Some(v.normalize())
    }
}

/// One stored reading (value of one KV key in the readings bucket).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Reading {
    /// Highest stream sequence applied: the exactly-once watermark.
    pub seq: u64,
    /// Sequence of the first event applied (0: none yet).
    #[serde(default)]
    pub first_seq: u64,
    pub acc: Acc,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub group_by: BTreeMap<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_time: Option<DateTime<Utc>>,
    /// Summary only: events invalid for the meter.
    #[serde(default)]
    pub invalid_events: u64,
    /// Summary only: distinct subjects seen.
    #[serde(default)]
    pub subjects: u64,
    /// Subject totals only: every group seen for the subject (token to values), so that
    /// queries can address its windows directly.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub groups: BTreeMap<String, BTreeMap<String, Value>>,
}

impl Reading {
    fn note_event(&mut self, seq: u64, time: DateTime<Utc>) {
        self.seq = seq;
        if self.first_seq == 0 {
            self.first_seq = seq;
        }
        if self.last_event_time.is_none_or(|t| time > t) {
            self.last_event_time = Some(time);
        }
    }
}

/// The keys an event touches for a meter: always the summary; when valid, the subject's
/// all-time total and its window.
pub fn keys_for(meter: &CompiledMeter, event: &Event, c: &Contribution) -> Vec<ReadingKey> {
    // shared, not copied: each key holds the same three strings
    let id = &meter.id;
    let mut keys = Vec::with_capacity(2 + 1 + meter.def.window_size.rollups().len());
    keys.push(ReadingKey::Summary { meter: id.clone() });
    if let Contribution::Valid { group_token, .. } = c {
        let subject: std::sync::Arc<str> = event.subject.as_str().into();
        let group_token: std::sync::Arc<str> = group_token.as_str().into();
        keys.push(ReadingKey::SubjectTotal {
            meter: id.clone(),
            subject: subject.clone(),
        });
        let t = event.time.timestamp();
        keys.push(ReadingKey::Window {
            meter: id.clone(),
            subject: subject.clone(),
            group: group_token.clone(),
            rollup: None,
            start: meter.def.window_size.window_start(t),
        });
        for &rollup in meter.def.window_size.rollups() {
            keys.push(ReadingKey::Window {
                meter: id.clone(),
                subject: subject.clone(),
                group: group_token.clone(),
                rollup: Some(rollup),
                start: rollup.start(t),
            });
        }
    }
    keys
}

/// The reading under `key`, created empty if absent (keys share their strings, so the
/// clone is three reference counts, not a copy).
fn slot<'a, S: BuildHasher>(
    readings: &'a mut HashMap<ReadingKey, Reading, S>,
    key: &ReadingKey,
) -> &'a mut Reading {
    readings.entry(key.clone()).or_default()
}

/// What applying one event did, for counters and the dead-letter subject.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    Counted,
    /// Invalid for this meter, first time seen (dead-letter it).
    Invalid(String),
    /// Already applied earlier (replay): nothing changed.
    AlreadyApplied,
}

/// Apply one event (stream sequence `seq`) to the readings of one meter. Readings absent
/// from `readings` are created. Applying an event whose sequence a reading already holds
/// is a no-op for that reading.
pub fn apply<S: BuildHasher>(
    readings: &mut HashMap<ReadingKey, Reading, S>,
    meter: &CompiledMeter,
    seq: u64,
    event: &Event,
    c: &Contribution,
) -> Applied {
    apply_keyed(readings, &keys_for(meter, event, c), seq, event, c)
}

/// [`apply`] with the event's keys already computed by [`keys_for`] (the aggregator
/// needs them before and after applying, so it derives them once).
pub fn apply_keyed<S: BuildHasher>(
    readings: &mut HashMap<ReadingKey, Reading, S>,
    keys: &[ReadingKey],
    seq: u64,
    event: &Event,
    c: &Contribution,
) -> Applied {
    let summary_key = &keys[0];
    let summary_seq = readings.get(summary_key).map_or(0, |r| r.seq);
    let (value, group) = match c {
        Contribution::Invalid(why) => {
            if seq <= summary_seq {
                return Applied::AlreadyApplied;
            }
            let s = slot(readings, summary_key);
            s.seq = seq;
            s.invalid_events += 1;
            return Applied::Invalid(why.clone());
        }
        Contribution::Valid { value, group, .. } => (value, group),
    };
    let time = event.time;
    // Compute every new accumulator first, so an overflow leaves all three untouched.
    let mut next = Vec::with_capacity(3);
    for key in keys {
        let cur = readings.get(key);
        if cur.is_some_and(|r| r.seq >= seq) {
            next.push(None);
            continue;
        }
        let base = cur.map(|r| r.acc.clone()).unwrap_or_default();
        match base.added(value, time, seq) {
            Some(acc) => next.push(Some(acc)),
            None => {
                if seq <= summary_seq {
                    return Applied::AlreadyApplied;
                }
                let s = slot(readings, summary_key);
                s.seq = seq;
                s.invalid_events += 1;
                return Applied::Invalid(
                    "valueProperty: sum exceeds the exact decimal range".into(),
                );
            }
        }
    }
    if next.iter().all(Option::is_none) {
        return Applied::AlreadyApplied;
    }
    // Subject total and window first: the summary learns from the total whether this
    // event is the subject's first, which stays true when the event is replayed.
    for (key, acc) in keys.iter().zip(next.iter_mut()).skip(1) {
        if let Some(acc) = acc.take() {
            let r = slot(readings, key);
            r.acc = acc;
            r.note_event(seq, time);
            match key {
                // a window's group never changes (its key is derived from it)
                ReadingKey::Window { .. } => {
                    if r.group_by != *group {
                        r.group_by = group.clone();
                    }
                }
                ReadingKey::SubjectTotal { .. } => {
                    if let Contribution::Valid { group_token, .. } = c {
                        if !group.is_empty() && !r.groups.contains_key(group_token) {
                            r.groups.insert(group_token.clone(), group.clone());
                        }
                    }
                }
                ReadingKey::Summary { .. } => {}
            }
        }
    }
    // (also when the total was already written before a crash and only the summary not)
    let new_subject = readings.get(&keys[1]).is_some_and(|r| r.first_seq == seq);
    if let Some(acc) = next[0].take() {
        let s = slot(readings, summary_key);
        s.acc = acc;
        s.note_event(seq, time);
        if new_subject {
            s.subjects += 1;
        }
    }
    Applied::Counted
}

#[cfg(test)]
mod tests;
