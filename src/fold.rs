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
use jsonpath_rust::query::js_path_process;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::Event;
use crate::keys::ReadingKey;
use crate::meter::{Aggregation, CompiledMeter, Path};

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

fn no_group(g: &SharedGroup) -> bool {
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
}

fn first_match<'a>(path: &Path, data: &'a Value) -> Option<&'a Value> {
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
/// same property, and the same groupBy.
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
    Contribution::Valid {
        value,
        group: group_hash(meter, event),
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
    /// Whether [`Self::add`] can take the value: false when the sum would overflow.
    fn can_add(&self, v: &Value_) -> bool {
        match v {
            Value_::Number(d) => self.sum.checked_add(*d).is_some(),
            Value_::None | Value_::Distinct(_) => true,
        }
    }

    /// Add one value in place (callers check [`Self::can_add`] first).
    fn add(&mut self, v: &Value_, time: DateTime<Utc>, seq: u64) {
        self.count += 1;
        match v {
            Value_::None => {}
            Value_::Number(d) => {
                self.sum = self.sum.checked_add(*d).unwrap_or(self.sum);
                self.min = Some(self.min.map_or(*d, |m| m.min(*d)));
                self.max = Some(self.max.map_or(*d, |m| m.max(*d)));
                let newer = self
                    .latest
                    .as_ref()
                    .is_none_or(|l| (time, seq) > (l.time, l.seq));
                if newer {
                    self.latest = Some(Latest {
                        value: *d,
                        time,
                        seq,
                    });
                }
            }
            Value_::Distinct(h) => self
                .distinct
                .get_or_insert_with(Distinct::default)
                .insert(*h),
        }
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
    #[serde(default, skip_serializing_if = "no_group")]
    pub group_by: SharedGroup,
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
    pub groups: BTreeMap<String, SharedGroup>,
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
    if let Contribution::Valid { group, .. } = c {
        let subject: std::sync::Arc<str> = event.subject.as_str().into();
        let group_token: std::sync::Arc<str> = token_of(*group).into();
        keys.push(ReadingKey::SubjectTotal {
            meter: id.clone(),
            subject: subject.clone(),
        });
        let t = event.time.timestamp();
        window_keys(meter, &subject, &group_token, t, |k| keys.push(k));
    }
    keys
}

/// The window keys of one subject and group at time `t` (epoch seconds): the meter's own
/// window first, then each rollup, coarsest last.
pub fn window_keys(
    meter: &CompiledMeter,
    subject: &std::sync::Arc<str>,
    group_token: &std::sync::Arc<str>,
    t: i64,
    mut each: impl FnMut(ReadingKey),
) {
    each(ReadingKey::Window {
        meter: meter.id.clone(),
        subject: subject.clone(),
        group: group_token.clone(),
        rollup: None,
        start: meter.def.window_size.window_start(t),
    });
    for &rollup in meter.def.window_size.rollups() {
        each(ReadingKey::Window {
            meter: meter.id.clone(),
            subject: subject.clone(),
            group: group_token.clone(),
            rollup: Some(rollup),
            start: rollup.start(t),
        });
    }
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

/// The readings one valid event touches for one meter, by position: 0 the meter's
/// summary, 1 the subject's total, then its windows in [`keys_for`] order. How they are
/// stored is the caller's business (a map of keys in tests, the aggregator's slots).
pub trait Touched {
    /// How many readings (at least 2).
    fn count(&self) -> usize;
    /// The reading at `i` if it exists (absent is as good as empty).
    fn get(&self, i: usize) -> Option<&Reading>;
    /// The reading at `i`, created empty if absent.
    fn at(&mut self, i: usize) -> &mut Reading;
}

/// The group an event belongs to, as windows and subject totals record it.
#[derive(Clone, Copy, Debug)]
pub struct Group<'a> {
    pub token: &'a str,
    pub values: &'a SharedGroup,
}

/// Apply one valid event (stream sequence `seq`) to the readings it touches. A reading
/// that already holds the sequence is left alone, so replays change nothing.
pub fn apply_valid(
    r: &mut impl Touched,
    seq: u64,
    time: DateTime<Utc>,
    value: &Value_,
    group: Option<Group<'_>>,
) -> Applied {
    let summary_seq = r.get(0).map_or(0, |s| s.seq);
    // Check every reading first, so an overflow leaves all of them untouched.
    let mut needed = false;
    for i in 0..r.count() {
        let Some(cur) = r.get(i) else {
            needed = true; // an empty reading takes any single value
            continue;
        };
        if cur.seq >= seq {
            continue;
        }
        needed = true;
        if !cur.acc.can_add(value) {
            if seq <= summary_seq {
                return Applied::AlreadyApplied;
            }
            return apply_invalid(
                r.at(0),
                seq,
                "valueProperty: sum exceeds the exact decimal range",
            );
        }
    }
    if !needed {
        return Applied::AlreadyApplied;
    }
    // Subject total and windows first: the summary learns from the total whether this
    // event is the subject's first, which stays true when the event is replayed.
    for i in 1..r.count() {
        let x = r.at(i);
        if x.seq >= seq {
            continue;
        }
        x.acc.add(value, time, seq);
        x.note_event(seq, time);
        if let Some(g) = group {
            if i == 1 {
                if !x.groups.contains_key(g.token) {
                    x.groups.insert(g.token.to_string(), g.values.clone());
                }
            } else if x.group_by.is_empty() {
                // a window's group never changes (its key is derived from it)
                x.group_by = g.values.clone();
            }
        }
    }
    // (also when the total was already written before a crash and only the summary not)
    let new_subject = r.get(1).is_some_and(|t| t.first_seq == seq);
    let s = r.at(0);
    if s.seq < seq {
        s.acc.add(value, time, seq);
        s.note_event(seq, time);
        if new_subject {
            s.subjects += 1;
        }
    }
    Applied::Counted
}

/// Count an event that is invalid for a meter in the meter's summary (once).
pub fn apply_invalid(summary: &mut Reading, seq: u64, why: &str) -> Applied {
    if seq <= summary.seq {
        return Applied::AlreadyApplied;
    }
    summary.seq = seq;
    summary.invalid_events += 1;
    Applied::Invalid(why.to_string())
}

/// [`Touched`] over a map of readings and an event's keys.
struct Keyed<'a, S> {
    readings: &'a mut HashMap<ReadingKey, Reading, S>,
    keys: &'a [ReadingKey],
}

impl<S: BuildHasher> Touched for Keyed<'_, S> {
    fn count(&self) -> usize {
        self.keys.len()
    }
    fn get(&self, i: usize) -> Option<&Reading> {
        self.readings.get(&self.keys[i])
    }
    fn at(&mut self, i: usize) -> &mut Reading {
        self.readings.entry(self.keys[i].clone()).or_default()
    }
}

/// Apply one event (stream sequence `seq`) to the readings of one meter kept in a map.
/// Readings absent from `readings` are created. Applying an event whose sequence a
/// reading already holds is a no-op for that reading.
pub fn apply<S: BuildHasher>(
    readings: &mut HashMap<ReadingKey, Reading, S>,
    meter: &CompiledMeter,
    seq: u64,
    event: &Event,
    c: &Contribution,
) -> Applied {
    let keys = keys_for(meter, event, c);
    match c {
        Contribution::Invalid(why) => {
            apply_invalid(readings.entry(keys[0].clone()).or_default(), seq, why)
        }
        Contribution::Valid { value, group } => {
            let values = SharedGroup::new(group_values(meter, event));
            let token = token_of(*group);
            let group = group.map(|_| Group {
                token: &token,
                values: &values,
            });
            let mut touched = Keyed {
                readings,
                keys: &keys,
            };
            apply_valid(&mut touched, seq, event.time, value, group)
        }
    }
}

#[cfg(test)]
mod tests;
