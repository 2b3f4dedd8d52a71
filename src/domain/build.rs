//! Meter builds, as decisions: which generation of a meter's readings is served, which
//! is being built and from where, and what history a rebuild keeps from the previous
//! definition. The aggregator carries the decisions out; nothing here does I/O.
//!
//! A meter's readings come in generations. The live pass follows one (`complete`); a
//! new or changed definition is built into the next generation by a worker of its own,
//! while readers keep reading the previous one ([`Progress::previous`], frozen where
//! the live pass stopped following it). One write of the progress record switches
//! readers over.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::domain::fold::{self, Reading};
use crate::domain::meter::{CompiledMeter, MeterDef, WindowSize};
use crate::domain::window::{ReadingKey, Split};

/// Per meter: the generation of readings built (or being built) and for which
/// definition. Stored as JSON; every field added since the first version has a default,
/// so records written before builds had generations read as generation 0, complete.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Progress {
    /// Semantic hash of the definition `generation` holds.
    pub hash: String,
    /// `generation` is complete and the live pass follows it.
    pub complete: bool,
    #[serde(default)]
    pub generation: u64,
    /// Not complete: stream sequence through which `generation` holds every event.
    #[serde(default)]
    pub through: u64,
    /// The window size of `generation` (for the history a later rebuild keeps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_size: Option<WindowSize>,
    /// Not complete: the generation readers are served meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<Frozen>,
    /// Windows starting before this (epoch seconds) kept the previous definition's
    /// readings: their events had left the stream when the meter was rebuilt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuilt_from: Option<i64>,
    /// The kept windows are already in `generation` (a resumed build must not add
    /// them twice).
    #[serde(default)]
    pub kept_merged: bool,
    #[serde(default)]
    pub suspended: bool,
    /// Building: events replayed so far, events left (an estimate), events per second.
    #[serde(default)]
    pub replayed: u64,
    #[serde(default)]
    pub remaining: u64,
    #[serde(default)]
    pub rate: u64,
    /// Generations whose readings are to be removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<u64>,
}

/// A generation that the live pass stopped following, and where.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Frozen {
    pub generation: u64,
    /// Every event through this stream sequence is in it, none after.
    pub through: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_size: Option<WindowSize>,
}

impl Progress {
    /// The generation readers are served, if any.
    pub fn served(&self) -> Option<u64> {
        if self.complete {
            Some(self.generation)
        } else {
            self.previous.as_ref().map(|p| p.generation)
        }
    }

    /// Whether the readings are complete for this definition and followed live.
    pub fn built(&self, def: &MeterDef) -> bool {
        self.complete && !self.suspended && self.hash == def.semantic_hash()
    }

    /// Building `def`: percent done (0–100).
    pub fn percent(&self, def: &MeterDef) -> Option<u8> {
        if self.complete || self.suspended || self.hash != def.semantic_hash() {
            return None;
        }
        // 100 only once the readings are switched over
        Some(self.replay_percent().min(99))
    }

    /// Percent of the replay done (events replayed of replayed and left).
    pub fn replay_percent(&self) -> u8 {
        let total = self.replayed + self.remaining;
        (self.replayed * 100)
            .checked_div(total)
            .unwrap_or(0)
            .min(100) as u8
    }

    /// Building: the time left at the current rate, if there is one.
    pub fn eta_seconds(&self) -> Option<u64> {
        (self.rate > 0).then(|| self.remaining.div_ceil(self.rate))
    }

    /// Every generation that holds readings (for a deletion).
    pub fn generations(&self) -> Vec<u64> {
        let mut all = vec![self.generation];
        all.extend(self.previous.as_ref().map(|p| p.generation));
        all.extend(&self.retired);
        all.sort_unstable();
        all.dedup();
        all
    }

    fn next_generation(&self) -> u64 {
        self.generations().into_iter().max().unwrap_or(0) + 1
    }
}

/// The generation the live pass follows for a meter.
#[derive(Clone, Debug)]
pub struct Followed {
    pub generation: u64,
    pub hash: String,
    pub window_size: WindowSize,
}

/// What to do with one meter.
#[derive(Clone, Debug, PartialEq)]
pub enum Plan {
    /// Follow the stored complete generation live (nothing to write).
    Follow,
    /// Keep following as now.
    Unchanged,
    /// Build `progress.generation` from `progress.through` (write `progress` first).
    Build(Progress),
    /// Aggregate nothing (write `progress`).
    Suspend(Progress),
}

/// Decide what to do with a meter whose definition is `def`, given its stored progress,
/// the generation the live pass follows (if any) and the live pass's position.
pub fn plan(
    def: &MeterDef,
    stored: Option<&Progress>,
    followed: Option<&Followed>,
    cursor: u64,
) -> Plan {
    let hash = def.semantic_hash();
    let fresh = |generation: u64, previous: Option<Frozen>, retired: Vec<u64>| Progress {
        hash: hash.clone(),
        generation,
        window_size: Some(def.window_size),
        previous,
        retired,
        suspended: def.suspend,
        ..Progress::default()
    };
    let frozen_record = |p: Progress, frozen: Frozen| Progress {
        complete: false,
        through: frozen.through,
        previous: Some(frozen),
        suspended: true,
        replayed: 0,
        remaining: 0,
        rate: 0,
        ..p
    };
    let stored = stored.cloned();
    // The generation being followed (or complete in store) stops at the cursor.
    let complete = match (followed, &stored) {
        (Some(f), p) => Some((
            Progress {
                hash: f.hash.clone(),
                complete: true,
                generation: f.generation,
                window_size: Some(f.window_size),
                ..p.clone().unwrap_or_default()
            },
            f.hash.clone(),
        )),
        (None, Some(p)) if p.complete => Some((p.clone(), p.hash.clone())),
        _ => None,
    };
    if let Some((p, built_hash)) = complete {
        if built_hash == hash && !def.suspend {
            return if followed.is_some() {
                Plan::Unchanged
            } else {
                Plan::Follow
            };
        }
        let frozen = Frozen {
            generation: p.generation,
            through: cursor,
            window_size: p.window_size,
        };
        if def.suspend {
            return Plan::Suspend(frozen_record(p, frozen));
        }
        let next = p.next_generation();
        return Plan::Build(fresh(next, Some(frozen), p.retired.clone()));
    }
    let Some(p) = stored else {
        let new = fresh(0, None, Vec::new());
        return if def.suspend {
            Plan::Suspend(new)
        } else {
            Plan::Build(new)
        };
    };
    // Not complete: a build (perhaps interrupted) or a suspension.
    if p.hash == hash {
        let p = Progress {
            suspended: def.suspend,
            ..p
        };
        return if def.suspend {
            Plan::Suspend(p)
        } else {
            Plan::Build(p)
        };
    }
    // Another definition than the one built or being built.
    let serving_itself = p
        .previous
        .as_ref()
        .is_some_and(|f| f.generation == p.generation);
    if def.suspend && serving_itself {
        // suspended readings stay as they are; the new definition is built on resume
        return Plan::Suspend(p);
    }
    let mut retired = p.retired.clone();
    if !serving_itself {
        // an unfinished build of a definition no longer wanted
        retired.push(p.generation);
    }
    let next = p.next_generation();
    let new = fresh(next, p.previous.clone(), retired);
    if def.suspend {
        Plan::Suspend(new)
    } else {
        Plan::Build(new)
    }
}

/// Where kept history ends: the first window boundary, at the coarser of both
/// definitions' window sizes, at or after `end` (epoch seconds), the end of the last
/// window that counted an event no longer retained ([`lost_events`]).
pub fn rebuilt_from(end: i64, old: WindowSize, new: WindowSize) -> i64 {
    let oldest_retained = end;
    let size = old.seconds().max(new.seconds());
    oldest_retained.div_euclid(size) * size
        + if oldest_retained.rem_euclid(size) == 0 {
            0
        } else {
            size
        }
}

/// Whether a window of the previous generation counted events that have left the
/// stream: it applied one before the oldest retained event of its type (`None`: none
/// is retained). Windows record the first sequence applied; one written before they
/// did (0) is taken to have.
pub fn lost_events(window: &Reading, oldest_retained: Option<u64>) -> bool {
    window.acc.count > 0
        && (window.first_seq == 0 || oldest_retained.is_none_or(|o| window.first_seq < o))
}

/// Whether a build skips an event: it is already in the kept windows (the previous
/// generation counted every event through `frozen_through`, and the windows before
/// `rebuilt_from` are kept from it).
pub fn kept_already(
    seq: u64,
    time: DateTime<Utc>,
    frozen_through: u64,
    rebuilt_from: Option<i64>,
) -> bool {
    rebuilt_from.is_some_and(|from| seq <= frozen_through && time.timestamp() < from)
}

/// One window of the previous generation, at its own size.
#[derive(Clone, Debug)]
pub struct KeptWindow {
    pub subject: Arc<str>,
    pub group: Arc<str>,
    pub start: i64,
    pub reading: Reading,
}

/// The readings of a new generation that hold the kept windows: each kept window
/// merged into the new meter's window that holds its start, its rollups, its subject's
/// total and the summary. Merged readings carry sequence 0 and first sequence 1, so
/// that every replayed event (the stream was trimmed: none is at sequence 1) still
/// applies and finds its subject already counted.
pub fn merge_kept(
    meter: &CompiledMeter,
    kept_size: WindowSize,
    kept: impl IntoIterator<Item = KeptWindow>,
) -> HashMap<ReadingKey, Reading> {
    let mut out: HashMap<ReadingKey, Reading> = HashMap::new();
    let summary_key = ReadingKey::Summary {
        meter: meter.id.clone(),
    };
    let mut subjects = 0u64;
    for w in kept {
        let mut keys = Vec::new();
        fold::window_keys(meter, &w.subject, &w.group, w.start, |k| keys.push(k));
        let total_key = ReadingKey::SubjectTotal {
            meter: meter.id.clone(),
            subject: w.subject.clone(),
        };
        let new_subject = !out.contains_key(&total_key);
        let total = out.entry(total_key).or_default();
        // days of kept windows (each within one UTC day), as events would have noted them
        let day = DateTime::<Utc>::from_timestamp(w.start, 0).unwrap_or_default();
        total.note_day(day);
        merge_into(total, &w.reading);
        if !w.reading.group_by.is_empty() && w.group.as_ref() != "_" {
            total
                .groups
                .entry(w.group.to_string())
                .or_insert_with(|| w.reading.group_by.clone());
        }
        for (i, k) in keys.into_iter().enumerate() {
            let r = out.entry(k).or_default();
            if let Some(split) = meter.def.window_size.split_at(i) {
                r.merge_parts(split, kept_parts(meter, kept_size, i, split, &w));
            }
            merge_into(r, &w.reading);
            if r.group_by.is_empty() {
                r.group_by = w.reading.group_by.clone();
            }
        }
        if new_subject {
            subjects += 1;
        }
        merge_into(out.entry(summary_key.clone()).or_default(), &w.reading);
    }
    if let Some(s) = out.get_mut(&summary_key) {
        s.subjects = subjects;
    }
    out
}

/// What a kept window brings to the parts of the `i`th new window holding it (in
/// `window_keys` order): the new window that holds its start (first) has the kept
/// window's own parts when both are windows of one size; a coarser one takes the kept
/// window as one of its parts when it fits inside one. `None` (the new window keeps no
/// parts) otherwise.
fn kept_parts(
    meter: &CompiledMeter,
    kept_size: WindowSize,
    i: usize,
    split: Split,
    w: &KeptWindow,
) -> Option<Vec<Option<crate::domain::fold::Acc>>> {
    let size = meter.def.window_size;
    if i == 0 && kept_size == size {
        return w.reading.part_accs(split);
    }
    let start = match i {
        0 => size.window_start(w.start),
        _ => size.rollups().get(i - 1)?.start(w.start),
    };
    // (no longer than a part, a kept window lies inside one: window sizes and parts
    // are all aligned UTC units)
    if kept_size.seconds() > split.unit() {
        return None;
    }
    let p = split.part_of(start, w.start);
    Reading::one_part(split, p, &w.reading.acc, meter.def.aggregation)
}

fn merge_into(into: &mut Reading, from: &Reading) {
    into.acc.merge(&from.acc);
    into.first_seq = 1;
    if from.last_event_time > into.last_event_time {
        into.last_event_time = from.last_event_time;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::meter::parse_meter_json;
    use serde_json::json;

    fn def(value: &str, suspend: bool) -> MeterDef {
        parse_meter_json(
            &json!({"id": "m", "eventType": "t", "aggregation": "sum", "valueProperty": value, "suspend": suspend}),
            None,
        )
        .unwrap()
    }

    fn followed(d: &MeterDef, generation: u64) -> Followed {
        Followed {
            generation,
            hash: d.semantic_hash(),
            window_size: d.window_size,
        }
    }

    #[test]
    fn a_new_meter_builds_generation_zero_from_the_start() {
        let d = def("$.a", false);
        let Plan::Build(p) = plan(&d, None, None, 500) else {
            panic!()
        };
        assert_eq!(
            (p.generation, p.through, p.complete, &p.previous),
            (0, 0, false, &None)
        );
        assert_eq!(p.served(), None);
    }

    #[test]
    fn an_edit_builds_the_next_generation_and_serves_the_frozen_one() {
        let (old, new) = (def("$.a", false), def("$.b", false));
        let stored = Progress {
            hash: old.semantic_hash(),
            complete: true,
            generation: 3,
            ..Default::default()
        };
        let Plan::Build(p) = plan(&new, Some(&stored), Some(&followed(&old, 3)), 900) else {
            panic!()
        };
        assert_eq!(p.generation, 4);
        assert_eq!(p.through, 0);
        assert_eq!(p.served(), Some(3));
        assert_eq!(p.previous.as_ref().map(|f| f.through), Some(900));
        assert_eq!(p.hash, new.semantic_hash());
        // the same definition again: nothing to do
        assert_eq!(
            plan(&old, Some(&stored), Some(&followed(&old, 3)), 900),
            Plan::Unchanged
        );
        assert_eq!(plan(&old, Some(&stored), None, 900), Plan::Follow);
    }

    #[test]
    fn an_interrupted_build_resumes_and_an_edit_during_it_starts_over() {
        let (a, b, c) = (def("$.a", false), def("$.b", false), def("$.c", false));
        let building = Progress {
            hash: b.semantic_hash(),
            generation: 1,
            through: 4000,
            previous: Some(Frozen {
                generation: 0,
                through: 900,
                window_size: None,
            }),
            ..Default::default()
        };
        // same definition: resume where it was
        assert_eq!(
            plan(&b, Some(&building), None, 5000),
            Plan::Build(building.clone())
        );
        // edited again: generation 1 is given up, 2 starts from scratch, 0 still served
        let Plan::Build(p) = plan(&c, Some(&building), None, 5000) else {
            panic!()
        };
        assert_eq!((p.generation, p.through, p.served()), (2, 0, Some(0)));
        assert_eq!(p.retired, vec![1]);
        // and back to the first definition: still a build (generation 0 is frozen)
        assert!(matches!(plan(&a, Some(&p), None, 5000), Plan::Build(_)));
    }

    #[test]
    fn suspend_freezes_and_resume_catches_up_from_the_same_point() {
        let live = def("$.a", false);
        let stored = Progress {
            hash: live.semantic_hash(),
            complete: true,
            generation: 2,
            ..Default::default()
        };
        let Plan::Suspend(s) = plan(
            &def("$.a", true),
            Some(&stored),
            Some(&followed(&live, 2)),
            700,
        ) else {
            panic!()
        };
        assert_eq!(
            (s.generation, s.through, s.served(), s.suspended),
            (2, 700, Some(2), true)
        );
        // resumed: the same generation catches up from 700
        let Plan::Build(r) = plan(&live, Some(&s), None, 990) else {
            panic!()
        };
        assert_eq!(
            (r.generation, r.through, r.served(), r.suspended),
            (2, 700, Some(2), false)
        );
        // resumed with another definition: a new generation, the suspended one served
        let Plan::Build(n) = plan(&def("$.b", false), Some(&s), None, 990) else {
            panic!()
        };
        assert_eq!(
            (n.generation, n.through, n.served(), n.retired.len()),
            (3, 0, Some(2), 0)
        );
    }

    #[test]
    fn kept_history_ends_on_a_boundary_of_the_coarser_window() {
        use WindowSize::*;
        assert_eq!(rebuilt_from(7200, Hour, Hour), 7200);
        assert_eq!(rebuilt_from(7201, Hour, Hour), 10_800);
        assert_eq!(rebuilt_from(7201, Minute, Day), 86_400);
        assert_eq!(rebuilt_from(61, Minute, Minute), 120);
        let t = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        let mut w = Reading::default();
        assert!(!lost_events(&w, Some(5)), "an empty window lost nothing");
        w.acc.count = 1;
        w.first_seq = 4;
        assert!(lost_events(&w, Some(5)));
        assert!(!lost_events(&w, Some(4)));
        assert!(lost_events(&w, None));
        assert!(kept_already(10, t(100), 10, Some(3600)));
        assert!(
            !kept_already(11, t(100), 10, Some(3600)),
            "arrived after the freeze"
        );
        assert!(
            !kept_already(10, t(3600), 10, Some(3600)),
            "in a rebuilt window"
        );
        assert!(!kept_already(10, t(100), 10, None));
    }

    #[test]
    fn kept_windows_merge_into_windows_totals_and_summary() {
        let d = def("$.a", false);
        let m = CompiledMeter::compile(&d).unwrap();
        let reading = |n: u64, sum: i64| {
            let mut r = Reading::default();
            for i in 0..n {
                let v = crate::domain::fold::Value_::Number(rust_decimal::Decimal::from(sum));
                r.acc
                    .add(&v, DateTime::from_timestamp(0, 0).unwrap(), i + 1);
            }
            r.seq = 99;
            r
        };
        let kept = [
            ("a", 0, reading(1, 5)),
            ("a", 3600, reading(2, 7)),
            ("a", 3 * 86_400, reading(1, 0)),
            ("b", 0, reading(1, 1)),
        ]
        .map(|(s, start, reading)| KeptWindow {
            subject: s.into(),
            group: "_".into(),
            start,
            reading,
        });
        let out = merge_kept(&m, WindowSize::Hour, kept);
        let get = |k: ReadingKey| out[&k].clone();
        let summary = get(ReadingKey::Summary { meter: "m".into() });
        assert_eq!(summary.acc.count, 5);
        assert_eq!(summary.subjects, 2);
        assert_eq!(summary.seq, 0, "replayed events must still apply");
        let total_a = get(ReadingKey::SubjectTotal {
            meter: "m".into(),
            subject: "a".into(),
        });
        assert_eq!(total_a.acc.value(d.aggregation).unwrap().to_string(), "19");
        assert_eq!(total_a.first_seq, 1);
        // the total knows the days of its kept windows: 1 and 4 January 1970
        let days = total_a.days.as_ref().unwrap();
        assert!(days.touches(0, 86_400) && days.touches(3 * 86_400, 4 * 86_400));
        assert!(!days.touches(86_400, 3 * 86_400));
        let day = get(ReadingKey::Window {
            meter: "m".into(),
            subject: "a".into(),
            group: "_".into(),
            rollup: Some(crate::domain::window::Rollup::Day),
            start: 0,
        });
        assert_eq!(day.acc.count, 3);
        // kept hours are the hours of their UTC day, and their days the days of its
        // month, whether or not they kept quarters
        let sum = |r: &Reading, lo, hi| r.part(lo..hi).map(|a| a.sum.to_string());
        assert_eq!(
            (sum(&day, 0, 1), sum(&day, 1, 2), sum(&day, 2, 24)),
            (Some("5".into()), Some("14".into()), Some("0".into()))
        );
        let month = get(ReadingKey::Window {
            meter: "m".into(),
            subject: "a".into(),
            group: "_".into(),
            rollup: Some(crate::domain::window::Rollup::Month),
            start: 0,
        });
        assert_eq!(
            (sum(&month, 0, 1), sum(&month, 1, 3), sum(&month, 3, 4)),
            (Some("19".into()), Some("0".into()), Some("0".into()))
        );
        // kept windows without quarters (built before they existed) leave their hour
        // without: its quarters are never partial
        let hour = |start| {
            get(ReadingKey::Window {
                meter: "m".into(),
                subject: "a".into(),
                group: "_".into(),
                rollup: None,
                start,
            })
        };
        assert_eq!((hour(3600).acc.count, hour(3600).part(0..4)), (2, None));
    }

    #[test]
    fn kept_hours_bring_their_quarters() {
        let d = def("$.a", false);
        let m = CompiledMeter::compile(&d).unwrap();
        let v = |n: i64| crate::domain::fold::Value_::Number(rust_decimal::Decimal::from(n));
        let mut with_quarters = Reading::default();
        with_quarters
            .acc
            .add(&v(5), DateTime::from_timestamp(60, 0).unwrap(), 1);
        let mut first = crate::domain::fold::Acc::default();
        first.add(&v(5), DateTime::from_timestamp(60, 0).unwrap(), 1);
        with_quarters.parts = vec![Some(Box::new(first)), None, None, None];
        let kept = [("a", 0, with_quarters.clone()), ("a", 0, with_quarters)].map(
            |(s, start, reading)| KeptWindow {
                subject: s.into(),
                group: "_".into(),
                start,
                reading,
            },
        );
        let out = merge_kept(&m, WindowSize::Hour, kept);
        let hour = &out[&ReadingKey::Window {
            meter: "m".into(),
            subject: "a".into(),
            group: "_".into(),
            rollup: None,
            start: 0,
        }];
        let part = |lo, hi| hour.part(lo..hi).map(|a| a.sum.to_string());
        assert_eq!(
            (part(0, 1), part(1, 4)),
            (Some("10".into()), Some("0".into()))
        );
    }
}
