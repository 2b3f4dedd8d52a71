//! The aggregation core: folding events into readings. Pure functions over values,
//! no I/O; the aggregator loads readings, calls [`apply`], and stores what changed.
//!
//! Exactly-once rests on one rule: every reading records the highest stream sequence
//! applied to it (`seq`), and an event is applied to a reading only when its sequence is
//! higher. Events reach each reading in stream order, so replaying any prefix of the
//! stream (after a crash, or by a second leader) changes nothing.

mod contribution;
mod days;
mod reading;

pub use contribution::*;
pub use days::DaySet;
pub use reading::*;

use std::collections::HashMap;
use std::hash::BuildHasher;

use chrono::{DateTime, Utc};

use crate::domain::event::Event;
use crate::domain::meter::{Aggregation, CompiledMeter, WindowSize};
use crate::domain::window::ReadingKey;

/// The keys an event touches for a meter: always the summary; when valid, the subject's
/// all-time total and its window.
pub fn keys_for(meter: &CompiledMeter, event: &Event, c: &Contribution) -> Vec<ReadingKey> {
    // shared, not copied: each key holds the same three strings
    let id = &meter.id;
    let mut keys = Vec::with_capacity(2 + 2 + meter.def.window_size.rollups().len());
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

/// The keys of one subject and group at time `t` (epoch seconds) beside the subject's
/// total: the meter's own window first, then each other tier (coarsest last), then, for
/// meters with `groupBy`, the group's all-time total.
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
    if !meter.def.group_by.is_empty() {
        each(ReadingKey::GroupTotal {
            meter: meter.id.clone(),
            subject: subject.clone(),
            group: group_token.clone(),
        });
    }
}

/// Start of the `i`th window (in [`window_keys`] order) holding `t`: the meter's own,
/// then each rollup.
fn window_start(size: WindowSize, i: usize, t: i64) -> i64 {
    match i {
        0 => size.window_start(t),
        _ => size.rollups().get(i - 1).map_or(t, |r| r.start(t)),
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
    /// Not the meter's event (its `filter` does not match): nothing changed.
    Filtered,
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

/// What a meter's windows keep finer parts of ([`crate::domain::window::Split`]), for
/// [`apply_valid`]: its window size (which says which of the windows an event touches
/// keep parts) and its aggregation (what the parts keep).
#[derive(Clone, Copy, Debug)]
pub struct Detail {
    pub window_size: WindowSize,
    pub aggregation: Aggregation,
}

impl Detail {
    pub fn of(meter: &CompiledMeter) -> Detail {
        Detail {
            window_size: meter.def.window_size,
            aggregation: meter.def.aggregation,
        }
    }
}

/// Position of the meter's own window among the readings an event touches.
const OWN_WINDOW: usize = 2;

/// Where an event's subject total is among the readings it touches.
const SUBJECT_TOTAL: usize = 1;

/// The group an event belongs to, as windows and subject totals record it.
#[derive(Clone, Copy, Debug)]
pub struct Group<'a> {
    pub token: &'a str,
    pub values: &'a SharedGroup,
}

/// Apply one valid event (stream sequence `seq`) to the readings it touches. A reading
/// that already holds the sequence is left alone, so replays change nothing. Windows
/// that keep finer parts ([`Detail`]) note the event in the part it falls in.
pub fn apply_valid(
    r: &mut impl Touched,
    seq: u64,
    time: DateTime<Utc>,
    value: &Value_,
    group: Option<Group<'_>>,
    detail: Detail,
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
        if let Some(split) = i
            .checked_sub(OWN_WINDOW)
            .and_then(|w| detail.window_size.split_at(w))
        {
            let t = time.timestamp();
            let start = window_start(detail.window_size, i - OWN_WINDOW, t);
            x.add_part(
                split,
                split.part_of(start, t),
                detail.aggregation,
                value,
                time,
                seq,
            );
        }
        if i == SUBJECT_TOTAL {
            x.note_day(time);
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
        Contribution::Filtered => Applied::Filtered,
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
            apply_valid(
                &mut touched,
                seq,
                event.time,
                value,
                group,
                Detail::of(meter),
            )
        }
    }
}

#[cfg(test)]
mod tests;
