//! A meter's `thresholds`: usage levels per subject and period. Each time a subject's
//! value for a period reaches a level — a crossing: (meter, subject, period start,
//! level) — one notification fires, once, whatever restarts or replays happen.
//!
//! `{"value": "100", "period": "MONTH", "timeZone": "Europe/Berlin", "every": "100"}`:
//! the level 100, and with `every` the recurring levels 200, 300 … above it, per
//! calendar month in Berlin. `period` is `DAY`, `MONTH` or `ALL` (all time); `timeZone`
//! defaults to UTC. Pure: the notifier reads the values and records the crossings.

use std::str::FromStr;

use chrono::{DateTime, Datelike, NaiveDate, Utc};
use chrono_tz::Tz;
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::domain::query::local_midnight;
use crate::error::FieldError;

/// A period as [start, end); both None for all time.
pub type Bounds = (Option<DateTime<Utc>>, Option<DateTime<Utc>>);

/// Most thresholds a meter has, and most levels one evaluation fires for one subject
/// (a recurring threshold far below a subject's value stops there).
pub const MAX_THRESHOLDS: usize = 20;
pub const MAX_LEVELS: usize = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum Period {
    Day,
    Month,
    All,
}

/// One threshold as users write it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// The CRD's CEL rule for what the schema can say of a threshold (see `operator::crd`).
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "!(self.period == 'ALL' && has(self.timeZone))",
    "message": "timeZone has no meaning for period ALL",
    "fieldPath": ".timeZone"
}]))]
pub struct Threshold {
    /// The level, an exact decimal (`"100"`, `"2.5"`).
    pub value: String,
    /// DAY, MONTH or ALL: the period a subject's value is summed over.
    pub period: Period,
    /// IANA time zone whose days and months the periods follow (default UTC). A DAY
    /// meter's windows are UTC days: it takes only zones without an offset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
    /// Recurring: also value + every, value + 2·every, … (a positive decimal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
}

/// A threshold checked and parsed once per meter.
#[derive(Clone, Debug)]
pub struct CompiledThreshold {
    pub value: Decimal,
    pub every: Option<Decimal>,
    pub period: Period,
    pub tz: Tz,
}

fn decimal(field: &str, raw: &str) -> Result<Decimal, FieldError> {
    Decimal::from_str_exact(raw.trim())
        .map_err(|_| FieldError::new(field, format!("{raw:?} is not a decimal number")))
}

impl CompiledThreshold {
    /// Check threshold `i` of a meter; errors name `thresholds[i].<field>`.
    pub fn compile(i: usize, t: &Threshold) -> Result<Self, FieldError> {
        let at = |f: &str| format!("thresholds[{i}].{f}");
        let value = decimal(&at("value"), &t.value)?;
        let every = match &t.every {
            None => None,
            Some(raw) => {
                let e = decimal(&at("every"), raw)?;
                if e <= Decimal::ZERO {
                    return Err(FieldError::new(at("every"), "must be greater than zero"));
                }
                Some(e)
            }
        };
        let tz = match &t.time_zone {
            None => chrono_tz::UTC,
            Some(raw) => raw.parse::<Tz>().map_err(|_| {
                FieldError::new(at("timeZone"), format!("unknown IANA time zone {raw:?}"))
            })?,
        };
        if t.period == Period::All && t.time_zone.is_some() {
            return Err(FieldError::new(
                at("timeZone"),
                "has no meaning for period ALL",
            ));
        }
        Ok(CompiledThreshold {
            value,
            every,
            period: t.period,
            tz,
        })
    }

    /// The levels a value has reached, lowest first: the threshold, then (recurring)
    /// every `every` above it; at most [`MAX_LEVELS`].
    pub fn levels(&self, reached: Decimal) -> Vec<Decimal> {
        if reached < self.value {
            return Vec::new();
        }
        let Some(every) = self.every else {
            return vec![self.value];
        };
        let mut out = Vec::new();
        let mut level = self.value;
        while level <= reached && out.len() < MAX_LEVELS {
            out.push(level);
            level += every;
        }
        out
    }

    /// The periods to evaluate at `now`, newest first: the current one and the one
    /// before it (a late event can still cross there), as [start, end); ALL is one
    /// period without bounds.
    pub fn periods(&self, now: DateTime<Utc>) -> Vec<Bounds> {
        let Some(current) = self.period_at(now) else {
            return vec![(None, None)];
        };
        // the previous period holds the last second before the current one starts
        let previous = current
            .0
            .and_then(|start| self.period_at(start - chrono::Duration::seconds(1)));
        [Some(current), previous].into_iter().flatten().collect()
    }

    /// The period holding the instant `t`, as [start, end); `None` for ALL (which
    /// [`Self::periods`] always evaluates).
    pub fn period_at(&self, t: DateTime<Utc>) -> Option<Bounds> {
        let local = t.with_timezone(&self.tz).date_naive();
        let (first, next) = match self.period {
            Period::All => return None,
            Period::Day => (local, local.succ_opt().unwrap_or(local)),
            Period::Month => {
                let first = local.with_day(1).unwrap_or(local);
                let (y, m) = if first.month() == 12 {
                    (first.year() + 1, 1)
                } else {
                    (first.year(), first.month() + 1)
                };
                (first, NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(first))
            }
        };
        Some((
            Some(local_midnight(self.tz, first)),
            Some(local_midnight(self.tz, next)),
        ))
    }

    /// Before this instant an event is late for this threshold: older than the start of
    /// the previous period, which [`Self::periods`] no longer evaluates by itself.
    pub fn late_before(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.periods(now).last().and_then(|(start, _)| *start)
    }
}

/// The stable id of a crossing (the notification's CloudEvent id and dedup key).
pub fn crossing_id(
    meter: &str,
    subject: &str,
    period_start: Option<DateTime<Utc>>,
    level: Decimal,
) -> String {
    let start = period_start.map_or_else(|| "all".to_string(), |t| t.timestamp().to_string());
    let canon = serde_json::json!([meter, subject, start, level.normalize().to_string()]);
    format!(
        "{:032x}",
        xxhash_rust::xxh3::xxh3_128(canon.to_string().as_bytes())
    )
}

impl FromStr for Period {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        match s.to_ascii_uppercase().as_str() {
            "DAY" => Ok(Period::Day),
            "MONTH" => Ok(Period::Month),
            "ALL" => Ok(Period::All),
            _ => Err(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(value: &str, period: Period, tz: Option<&str>, every: Option<&str>) -> CompiledThreshold {
        CompiledThreshold::compile(
            0,
            &Threshold {
                value: value.into(),
                period,
                time_zone: tz.map(String::from),
                every: every.map(String::from),
            },
        )
        .unwrap()
    }

    fn d(s: &str) -> Decimal {
        Decimal::from_str_exact(s).unwrap()
    }

    #[test]
    fn the_period_holding_an_instant_and_when_events_are_late() {
        let at = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let month = t("1", Period::Month, Some("Asia/Kolkata"), None);
        // 2026-08-31T20:00Z is already September 1st in Kolkata (+05:30)
        assert_eq!(
            month.period_at(at("2026-08-31T20:00:00Z")),
            Some((
                Some(at("2026-08-31T18:30:00Z")),
                Some(at("2026-09-30T18:30:00Z"))
            ))
        );
        let day = t("1", Period::Day, None, None);
        assert_eq!(
            day.period_at(at("2026-11-03T23:59:59Z")),
            Some((
                Some(at("2026-11-03T00:00:00Z")),
                Some(at("2026-11-04T00:00:00Z"))
            ))
        );
        assert_eq!(
            t("1", Period::All, None, None).period_at(at("2026-11-03T00:00:00Z")),
            None
        );
        // late: before the previous period's start
        assert_eq!(
            day.late_before(at("2026-11-30T12:00:00Z")),
            Some(at("2026-11-29T00:00:00Z"))
        );
        assert_eq!(
            t("1", Period::Month, None, None).late_before(at("2026-11-30T12:00:00Z")),
            Some(at("2026-10-01T00:00:00Z"))
        );
    }

    #[test]
    fn levels_once_or_every() {
        let once = t("100", Period::Month, None, None);
        assert!(once.levels(d("99.99")).is_empty());
        assert_eq!(once.levels(d("150")), vec![d("100")]);
        let every = t("100", Period::Month, None, Some("100"));
        assert_eq!(every.levels(d("350")), vec![d("100"), d("200"), d("300")]);
        assert_eq!(every.levels(d("300")).len(), 3);
        let tiny = t("0", Period::All, None, Some("0.001"));
        assert_eq!(tiny.levels(d("1000000")).len(), MAX_LEVELS);
    }

    #[test]
    fn periods_follow_the_zone() {
        let now = DateTime::parse_from_rfc3339("2026-12-01T03:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let utc = t("1", Period::Month, None, None).periods(now);
        let s = |x: Option<DateTime<Utc>>| x.unwrap().to_rfc3339();
        assert_eq!(
            (s(utc[0].0), s(utc[0].1)),
            (
                "2026-12-01T00:00:00+00:00".into(),
                "2027-01-01T00:00:00+00:00".into()
            )
        );
        assert_eq!(s(utc[1].0), "2026-11-01T00:00:00+00:00");
        // 03:00 UTC is still November 30th in New York
        let ny = t("1", Period::Day, Some("America/New_York"), None).periods(now);
        assert_eq!(
            (s(ny[0].0), s(ny[0].1)),
            (
                "2026-11-30T05:00:00+00:00".into(),
                "2026-12-01T05:00:00+00:00".into()
            )
        );
        assert_eq!(
            t("1", Period::All, None, None).periods(now),
            vec![(None, None)]
        );
    }

    #[test]
    fn errors_name_the_field_and_ids_are_stable() {
        let bad = |value: &str, tz: Option<&str>, every: Option<&str>, period| {
            CompiledThreshold::compile(
                2,
                &Threshold {
                    value: value.into(),
                    period,
                    time_zone: tz.map(String::from),
                    every: every.map(String::from),
                },
            )
            .unwrap_err()
            .field
        };
        assert_eq!(bad("lots", None, None, Period::Day), "thresholds[2].value");
        assert_eq!(
            bad("1", Some("Mars/Olympus"), None, Period::Day),
            "thresholds[2].timeZone"
        );
        assert_eq!(
            bad("1", None, Some("0"), Period::Day),
            "thresholds[2].every"
        );
        assert_eq!(
            bad("1", Some("UTC"), None, Period::All),
            "thresholds[2].timeZone"
        );
        let a = crossing_id("m", "s", None, d("100"));
        assert_eq!(a, crossing_id("m", "s", None, d("100.0")));
        assert_ne!(a, crossing_id("m", "s", None, d("200")));
        assert_eq!(a.len(), 32);
    }
}
