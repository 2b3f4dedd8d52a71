//! Readings and their exact arithmetic: the accumulator keeps count, exact sum, min,
//! max, the latest value and the distinct set, so readings merge exactly into coarser
//! windows.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::contribution::*;
use crate::domain::meter::Aggregation;
use crate::domain::window::Split;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latest {
    #[serde(with = "rust_decimal::serde::str")]
    pub value: Decimal,
    #[serde(deserialize_with = "utc_time")]
    pub time: DateTime<Utc>,
    pub seq: u64,
}

/// A stored time, as chrono writes a UTC time (`2026-11-24T10:05:00Z`, or with a
/// fraction of 1-9 digits), read without chrono's general parser: every accumulator
/// carries one, and a query decodes hundreds of them. Any other shape goes to chrono.
fn utc_time<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
    struct Visitor;
    impl serde::de::Visitor<'_> for Visitor {
        type Value = DateTime<Utc>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an RFC 3339 time")
        }
        fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Self::Value, E> {
            match canonical_utc(s.as_bytes()) {
                Some(t) => Ok(t),
                None => DateTime::parse_from_rfc3339(s)
                    .map(|t| t.with_timezone(&Utc))
                    .map_err(E::custom),
            }
        }
    }
    d.deserialize_str(Visitor)
}

/// `YYYY-MM-DDTHH:MM:SS[.f{1,9}]Z`; `None` for anything else (or an impossible date).
fn canonical_utc(b: &[u8]) -> Option<DateTime<Utc>> {
    let digits = |r: std::ops::Range<usize>| -> Option<u32> {
        b.get(r)?.iter().try_fold(0u32, |n, &c| {
            c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
        })
    };
    let fixed = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if b.len() < 20 || fixed.iter().any(|&(i, c)| b[i] != c) || b[b.len() - 1] != b'Z' {
        return None;
    }
    let nanos = match b.len() - 20 {
        0 => 0,
        n if (2..=10).contains(&n) && b[19] == b'.' => {
            digits(20..b.len() - 1)? * 10u32.pow(10 - n as u32)
        }
        _ => return None,
    };
    let date =
        chrono::NaiveDate::from_ymd_opt(digits(0..4)? as i32, digits(5..7)?, digits(8..10)?)?;
    let time = chrono::NaiveTime::from_hms_nano_opt(
        digits(11..13)?,
        digits(14..16)?,
        digits(17..19)?,
        nanos,
    )?;
    Some(date.and_time(time).and_utc())
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
    pub(super) fn can_add(&self, v: &Value_) -> bool {
        match v {
            Value_::Number(d) => self.sum.checked_add(*d).is_some(),
            Value_::None | Value_::Distinct(_) => true,
        }
    }

    /// Add one value in place (callers check [`Self::can_add`] first).
    pub(crate) fn add(&mut self, v: &Value_, time: DateTime<Utc>, seq: u64) {
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
    /// Take away a reading that [`Self::merge`] added before (or one covering part of
    /// what was added): exact for the count and the sum, and so for `count`, `sum`
    /// and `avg`; what else the accumulator holds is left as it was, and is not read
    /// for those aggregations.
    pub fn take_away(&mut self, other: &Acc) {
        self.count = self.count.saturating_sub(other.count);
        self.sum = self.sum.checked_sub(other.sum).unwrap_or(self.sum);
    }

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

    /// Drop what `aggregation` never reads (kept in the finer parts of a reading only:
    /// its whole accumulators keep everything).
    pub(super) fn keep_only(&mut self, aggregation: Aggregation) {
        use Aggregation::*;
        if !matches!(aggregation, Sum | Avg) {
            self.sum = Decimal::ZERO;
        }
        if aggregation != Min {
            self.min = None;
        }
        if aggregation != Max {
            self.max = None;
        }
        if aggregation != Latest {
            self.latest = None;
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
    /// Windows that keep finer parts ([`Split`]), with [`Self::parts`]: while every
    /// event of the window fell in one part, which (the window's own accumulator is then
    /// that part's: the common case, stored in a few bytes). Stored as `onlyQuarter`
    /// before days and months kept parts too.
    #[serde(
        default,
        rename = "onlyPart",
        alias = "onlyQuarter",
        skip_serializing_if = "Option::is_none"
    )]
    pub only_part: Option<u8>,
    /// Windows that keep finer parts ([`Split`]: an HOUR meter's hours their 15-minute
    /// quarters, UTC day rollups their hours, UTC month rollups their days), once their
    /// events span parts: each part (`null` while empty) an accumulator of what the
    /// meter's aggregation reads, so that a range whose edge falls inside the window —
    /// a day in a zone whose offset is not a whole hour (India, Nepal, Chatham), or any
    /// zone's day in a UTC day — reads this one window rather than every finer one up to
    /// the edge: at the cost of a larger value, not of more keys. Complete only while
    /// their counts add up to the window's ([`Self::part`]): a window written before it
    /// kept parts, or whose distinct sets outgrew [`DISTINCT_CAP`] together, has none.
    /// (Boxed: the aggregator keeps hundreds of thousands of readings in memory.)
    #[serde(
        default,
        rename = "parts",
        alias = "quarters",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub parts: Vec<Option<Box<Acc>>>,
    /// Subject totals only: the UTC days the subject has events on, so that queries read
    /// only those days' windows. Kept from the total's first event on; `None` (a total
    /// written before this was kept, or a subject active on more than
    /// [`super::days::MAX_RUNS`] separate stretches of days) means every window is read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub days: Option<super::DaySet>,
}

/// What a query reads of a stored window: its accumulator and its parts. Decoding only
/// these skips the group values, sequences and times a query has no use for.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct QueriedWindow {
    acc: Acc,
    #[serde(default, rename = "onlyPart", alias = "onlyQuarter")]
    only_part: Option<u8>,
    #[serde(default, rename = "parts", alias = "quarters")]
    parts: Vec<Option<Box<Acc>>>,
}

/// What a query reads of a stored window it takes whole: its accumulator only (a
/// month's 31 days of parts cost more to decode than the month itself).
#[derive(Deserialize)]
struct WholeWindow {
    acc: Acc,
}

impl Reading {
    /// A stored window as a query reads it: the accumulator of its JSON, and its parts
    /// when `with_parts` (everything else left at its default).
    pub fn queried_window(raw: &[u8], with_parts: bool) -> serde_json::Result<Reading> {
        if !with_parts {
            let w: WholeWindow = serde_json::from_slice(raw)?;
            return Ok(Reading {
                acc: w.acc,
                ..Reading::default()
            });
        }
        let w: QueriedWindow = serde_json::from_slice(raw)?;
        Ok(Reading {
            acc: w.acc,
            only_part: w.only_part,
            parts: w.parts,
            ..Reading::default()
        })
    }

    /// Add another partition's part of a meter's summary: the accumulators merge
    /// exactly, and subjects and invalid events add up (a subject lives in one
    /// partition). Sequences are per partition's stream: only the highest is kept, as
    /// a marker that something was applied.
    pub fn merge_summary(&mut self, other: &Reading) {
        self.acc.merge(&other.acc);
        self.subjects += other.subjects;
        self.invalid_events += other.invalid_events;
        self.last_event_time = self.last_event_time.max(other.last_event_time);
        self.seq = self.seq.max(other.seq);
        self.first_seq = match (self.first_seq, other.first_seq) {
            (0, b) => b,
            (a, 0) => a,
            (a, b) => a.min(b),
        };
    }

    /// Note in part `p` of `split` a value the window is about to take (called before
    /// the window's own accumulator takes it), keeping only what `aggregation` reads.
    /// Parts start with the window's first event: a window that holds events without
    /// them keeps none, and one whose parts cannot take the value (their distinct sets
    /// would outgrow the window's budget, or a sum its range) drops them, so that an
    /// incomplete set of parts is never taken for a whole one.
    pub(super) fn add_part(
        &mut self,
        split: Split,
        p: usize,
        aggregation: Aggregation,
        v: &Value_,
        time: DateTime<Utc>,
        seq: u64,
    ) {
        if p >= split.parts() {
            return;
        }
        if self.parts.is_empty() {
            match self.only_part {
                None if self.acc.count == 0 => {
                    self.only_part = Some(p as u8);
                    return;
                }
                // written without parts
                None => return,
                Some(only) if usize::from(only) == p => return,
                Some(only) => {
                    // the second part: the first one's events are the window's so far
                    let mut first = self.acc.clone();
                    first.keep_only(aggregation);
                    self.parts = vec![None; split.parts()];
                    if let Some(slot) = self.parts.get_mut(usize::from(only)) {
                        *slot = Some(Box::new(first));
                    }
                    self.only_part = None;
                }
            }
        }
        let Some(part) = self.parts.get_mut(p) else {
            // (a stored window of another shape: its parts cannot be trusted)
            self.parts.clear();
            return;
        };
        let part = part.get_or_insert_with(Box::default);
        if !part.can_add(v) {
            self.parts.clear();
            return;
        }
        part.add(v, time, seq);
        part.keep_only(aggregation);
        if aggregation == Aggregation::UniqueCount {
            let distinct = |a: &Acc| a.distinct.as_ref().map_or(0, |d| d.hashes.len());
            let held = distinct(&self.acc)
                + self
                    .parts
                    .iter()
                    .flatten()
                    .map(|q| distinct(q))
                    .sum::<usize>();
            if held >= DISTINCT_CAP {
                // (the window's own set keeps its exactness; one reading stays under
                // NATS's message limit)
                self.parts.clear();
            }
        }
    }

    /// The one part all of the window's events fell in, while it has no others.
    fn sole_part(&self) -> Option<usize> {
        self.only_part
            .filter(|_| self.parts.is_empty())
            .map(usize::from)
    }

    /// Whether the window's parts hold every one of its events (see [`Self::parts`]).
    fn parts_complete(&self) -> bool {
        self.sole_part().is_some()
            || (!self.parts.is_empty()
                && self.parts.iter().flatten().map(|q| q.count).sum::<u64>() == self.acc.count)
    }

    /// The window's `split` parts, each `None` while empty; `None` when they do not hold
    /// every event of the window.
    pub(crate) fn part_accs(&self, split: Split) -> Option<Vec<Option<Acc>>> {
        if let Some(only) = self.sole_part() {
            let mut out = vec![None; split.parts()];
            *out.get_mut(only)? = Some(self.acc.clone());
            return Some(out);
        }
        (self.parts_complete() && self.parts.len() == split.parts())
            .then(|| self.parts.iter().map(|q| q.as_deref().cloned()).collect())
    }

    /// The parts `range` of the window merged; `None` when the window does not hold
    /// every one of its events in parts (see [`Self::parts`]).
    pub fn part(&self, range: std::ops::Range<usize>) -> Option<Acc> {
        if self.acc.count == 0 {
            return Some(Acc::default());
        }
        if !self.parts_complete() {
            return None;
        }
        // (read in place: an edge of a query costs no copy of the other parts)
        if let Some(only) = self.sole_part() {
            return Some(if range.contains(&only) {
                self.acc.clone()
            } else {
                Acc::default()
            });
        }
        let mut out = Acc::default();
        for q in self.parts.get(range)?.iter().flatten() {
            out.merge(q);
        }
        Some(out)
    }

    /// Merge into these parts the `split` parts of something the window is about to
    /// take whole (kept history: another window of the same span's parts, or a finer
    /// window that is one part — [`Acc::keep_only`]'d by the caller), before the
    /// accumulators themselves merge: they stay complete only when both sides are.
    pub(crate) fn merge_parts(&mut self, split: Split, theirs: Option<Vec<Option<Acc>>>) {
        let ours = if self.acc.count == 0 {
            Some(vec![None; split.parts()])
        } else {
            self.part_accs(split)
        };
        self.only_part = None;
        self.parts.clear();
        let (Some(ours), Some(theirs)) = (ours, theirs) else {
            return;
        };
        if theirs.len() != ours.len() {
            return;
        }
        self.parts = ours
            .into_iter()
            .zip(theirs)
            .map(|(a, b)| match (a, b) {
                (Some(mut a), Some(b)) => {
                    a.merge(&b);
                    Some(Box::new(a))
                }
                (a, b) => a.or(b).map(Box::new),
            })
            .collect();
    }

    /// `acc` as the only part `p` of `split`, keeping what `aggregation` reads: what a
    /// finer window that is one of its parts brings to [`Self::merge_parts`].
    pub(crate) fn one_part(
        split: Split,
        p: usize,
        acc: &Acc,
        aggregation: Aggregation,
    ) -> Option<Vec<Option<Acc>>> {
        let mut out = vec![None; split.parts()];
        let mut acc = acc.clone();
        acc.keep_only(aggregation);
        *out.get_mut(p)? = (acc.count > 0).then_some(acc);
        Some(out)
    }

    /// Note the day of an event a subject total is about to take (called before its
    /// accumulator takes it, so that a total knows whether it is its first).
    pub(crate) fn note_day(&mut self, time: DateTime<Utc>) {
        let day = super::DaySet::day_of(time.timestamp());
        let fits = match &mut self.days {
            Some(days) => days.insert(day),
            None if self.acc.count == 0 => {
                let mut days = super::DaySet::default();
                days.insert(day);
                self.days = Some(days);
                true
            }
            // written before days were kept: they stay unknown
            None => true,
        };
        if !fits {
            self.days = None;
        }
    }

    pub(super) fn note_event(&mut self, seq: u64, time: DateTime<Utc>) {
        self.seq = seq;
        if self.first_seq == 0 {
            self.first_seq = seq;
        }
        if self.last_event_time.is_none_or(|t| time > t) {
            self.last_event_time = Some(time);
        }
    }
}
