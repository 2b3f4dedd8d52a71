//! Readings by what they cover: a meter's summary, a subject's all-time total, or one
//! window of a subject and group — at the meter's own size or a coarser UTC rollup kept
//! so that queries over long ranges read few readings.

use std::sync::Arc;

/// Which reading a contribution lands in: a meter's summary, one subject's all-time
/// total, or one window of one subject and group. [`crate::nats::keys`] renders it
/// into a KV key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ReadingKey {
    Summary {
        meter: Arc<str>,
    },
    SubjectTotal {
        meter: Arc<str>,
        subject: Arc<str>,
    },
    /// One subject's all-time reading of one group (meters with `groupBy` only): what
    /// the original KloudMeter's readings list shows per group.
    GroupTotal {
        meter: Arc<str>,
        subject: Arc<str>,
        group: Arc<str>,
    },
    /// A window at the meter's own size (`rollup: None`), or a coarser UTC rollup kept
    /// so that queries over long ranges read few keys.
    Window {
        meter: Arc<str>,
        subject: Arc<str>,
        group: Arc<str>,
        rollup: Option<Rollup>,
        start: i64,
    },
}

/// How a stored window is split into finer parts that a query can read on their own
/// (kept inside the window's reading, not as keys of their own): an HOUR meter's hour
/// into 15-minute quarters, a UTC day rollup into its hours, a UTC month rollup into its
/// days. A range whose edges fall inside a window then reads that one window, not every
/// finer window up to the edge: a day in Asia/Kolkata reads the UTC days it overlaps
/// (their hours) and the hour its midnight falls in (its quarters).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Split {
    Quarters,
    Hours,
    Days,
}

impl Split {
    /// Seconds in one part (a month's days are all 86,400 s long in UTC).
    pub fn unit(self) -> i64 {
        match self {
            Split::Quarters => 900,
            Split::Hours => 3600,
            Split::Days => 86_400,
        }
    }

    /// Parts a window holds (a month has up to 31 days; those past its end stay empty).
    pub fn parts(self) -> usize {
        match self {
            Split::Quarters => 4,
            Split::Hours => 24,
            Split::Days => 31,
        }
    }

    /// The part of the window starting at `start` that `t` (epoch seconds) falls in.
    pub fn part_of(self, start: i64, t: i64) -> usize {
        ((t - start).max(0) / self.unit()) as usize
    }
}

/// Coarser windows kept beside the meter's own, all in UTC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rollup {
    Hour,
    Day,
    Month,
}

impl Rollup {
    /// Start (epoch seconds) of the UTC rollup window holding `epoch_seconds`.
    pub fn start(self, epoch_seconds: i64) -> i64 {
        match self {
            Rollup::Hour => epoch_seconds.div_euclid(3600) * 3600,
            Rollup::Day => epoch_seconds.div_euclid(86_400) * 86_400,
            Rollup::Month => {
                use chrono::{Datelike, TimeZone};
                let t = chrono::DateTime::from_timestamp(epoch_seconds, 0).unwrap_or_default();
                chrono::Utc
                    .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
                    .single()
                    .map_or(epoch_seconds, |m| m.timestamp())
            }
        }
    }

    /// The finer parts its readings keep (none for an hour: only MINUTE meters keep
    /// hour rollups, and their own minutes are fine enough).
    pub fn split(self) -> Option<Split> {
        match self {
            Rollup::Hour => None,
            Rollup::Day => Some(Split::Hours),
            Rollup::Month => Some(Split::Days),
        }
    }

    /// Start of the next rollup window after the one starting at `start`.
    pub fn next(self, start: i64) -> i64 {
        match self {
            Rollup::Hour => start + 3600,
            Rollup::Day => start + 86_400,
            Rollup::Month => {
                use chrono::{Datelike, TimeZone};
                let t = chrono::DateTime::from_timestamp(start, 0).unwrap_or_default();
                let (y, m) = if t.month() == 12 {
                    (t.year() + 1, 1)
                } else {
                    (t.year(), t.month() + 1)
                };
                chrono::Utc
                    .with_ymd_and_hms(y, m, 1, 0, 0, 0)
                    .single()
                    .map_or(start, |d| d.timestamp())
            }
        }
    }
}
