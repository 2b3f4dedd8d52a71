//! Usage queries, the pure part: parse the request, lay out the output windows in the
//! requested time zone, and cover each one exactly with the fewest stored windows
//! (UTC month, day and hour rollups, whole or the run of days or hours they keep inside
//! them, then the meter's own windows and their quarters at the edges). The API layer
//! fetches those readings and [`rows`] turns them into rows.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, NaiveDate, Offset, SecondsFormat, TimeZone, Utc};
use chrono_tz::Tz;
use serde::Serialize;
use serde_json::Value;

use crate::domain::fold::Acc;
use crate::domain::meter::{MeterDef, WindowSize};
use crate::domain::window::{Rollup, Split};
use crate::error::FieldError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum QueryWindow {
    Minute,
    Hour,
    Day,
    Month,
}

impl QueryWindow {
    fn parse(raw: &str) -> Option<Self> {
        Some(match raw.to_ascii_uppercase().as_str() {
            "MINUTE" => QueryWindow::Minute,
            "HOUR" => QueryWindow::Hour,
            "DAY" => QueryWindow::Day,
            "MONTH" => QueryWindow::Month,
            _ => return None,
        })
    }
    fn rank(self) -> u8 {
        self as u8
    }
}

fn meter_rank(w: WindowSize) -> u8 {
    match w {
        WindowSize::Minute => 0,
        WindowSize::Hour => 1,
        WindowSize::Day => 2,
    }
}

#[derive(Clone, Debug)]
pub struct QueryParams {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub window: Option<QueryWindow>,
    pub tz: Tz,
    pub subjects: Vec<String>,
    pub group_by: Vec<String>,
    /// `filterGroupBy`: every one must hold for a group to be kept.
    pub filters: Vec<GroupFilter>,
    /// `limit` (and `cursor`): one page of subjects, in subject order.
    pub page: Option<Page>,
}

/// One page of an all-subject (or many-subject) query: up to `limit` subjects after the
/// subject `after` (the cursor the previous page gave).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    pub limit: usize,
    pub after: Option<String>,
}

/// Most subjects one page holds.
pub const MAX_PAGE: usize = 10_000;

/// The cursor of the page after the one ending with `subject` (opaque to clients).
pub fn encode_cursor(subject: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(subject.as_bytes())
}

fn decode_cursor(raw: &str) -> Result<String, FieldError> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| FieldError::new("cursor", "not a cursor this API gave"))
}

/// One `filterGroupBy[<key>][<op>]=<values>` of a query. Values compare as text (a group
/// value that is not a string by its JSON text, null as `null`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupFilter {
    pub key: String,
    pub op: FilterOp,
    /// One value for `eq`/`ne`; the comma-separated list for `in`/`nin`.
    pub values: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterOp {
    Eq,
    Ne,
    In,
    Nin,
}

/// `filterGroupBy[k]=v` (eq, as before operators existed) or `filterGroupBy[k][op]=v`.
fn parse_group_filter(
    param: &str,
    inner: &str,
    raw: &str,
    meter: &MeterDef,
) -> Result<GroupFilter, FieldError> {
    let (key, op) = match inner.split_once("][") {
        Some((key, op)) => (key, Some(op)),
        None => (inner, None),
    };
    if !meter.group_by.contains_key(key) {
        return Err(FieldError::new(param, format!("unknown group key {key:?}")));
    }
    let op = match op {
        None | Some("eq") => FilterOp::Eq,
        Some("ne") => FilterOp::Ne,
        Some("in") => FilterOp::In,
        Some("nin") => FilterOp::Nin,
        Some(other) => {
            return Err(FieldError::new(
                param,
                format!("unknown operator {other:?} (eq, ne, in, nin)"),
            ))
        }
    };
    let values = match op {
        FilterOp::Eq | FilterOp::Ne => vec![raw.to_string()],
        FilterOp::In | FilterOp::Nin => raw.split(',').map(str::to_string).collect(),
    };
    Ok(GroupFilter {
        key: key.to_string(),
        op,
        values,
    })
}

fn parse_time(field: &str, raw: &str) -> Result<DateTime<Utc>, FieldError> {
    DateTime::parse_from_rfc3339(raw)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| FieldError::new(field, format!("must be an RFC 3339 timestamp: {e}")))
}

/// Parse query-string pairs (repeatable keys kept in order). Every error names its
/// parameter.
pub fn parse_query(
    pairs: &[(String, String)],
    meter: &MeterDef,
    now: DateTime<Utc>,
) -> Result<QueryParams, FieldError> {
    let mut from = None;
    let mut to = None;
    let mut window = None;
    let mut tz = chrono_tz::UTC;
    let mut subjects = Vec::new();
    let mut group_by = Vec::new();
    let mut filters = Vec::new();
    let mut limit = None;
    let mut cursor = None;
    for (k, v) in pairs {
        match k.as_str() {
            "limit" => limit = Some(parse_limit(v)?),
            "cursor" => cursor = Some(decode_cursor(v)?),
            "from" => from = Some(parse_time("from", v)?),
            "to" => to = Some(parse_time("to", v)?),
            "windowSize" => window = Some(parse_window(v, meter)?),
            "windowTimeZone" => {
                tz = v.parse::<Tz>().map_err(|_| {
                    FieldError::new("windowTimeZone", format!("unknown IANA time zone {v:?}"))
                })?
            }
            "subject" => subjects.push(v.clone()),
            // rows are per subject already: grouping by it explicitly (as OpenMeter's
            // clients do) changes nothing, unless the meter has a group of that name
            "groupBy" if v == "subject" && !meter.group_by.contains_key(v) => {}
            "groupBy" => {
                if !meter.group_by.contains_key(v) {
                    return Err(FieldError::new(
                        "groupBy",
                        format!("unknown group key {v:?}"),
                    ));
                }
                if !group_by.contains(v) {
                    group_by.push(v.clone());
                }
            }
            other => {
                if let Some(inner) = other
                    .strip_prefix("filterGroupBy[")
                    .and_then(|r| r.strip_suffix(']'))
                {
                    filters.push(parse_group_filter(other, inner, v, meter)?);
                }
                // other parameters are ignored, as most HTTP APIs do
            }
        }
    }
    let from = from.ok_or_else(|| FieldError::new("from", "is required"))?;
    let to = to.unwrap_or_else(|| default_to(meter, now));
    if from >= to {
        return Err(FieldError::new("from", "must be before to (default: now)"));
    }
    let page = match (limit, cursor) {
        (Some(limit), after) => Some(Page { limit, after }),
        (None, Some(_)) => {
            return Err(FieldError::new(
                "cursor",
                "needs limit (the page size it continues with)",
            ))
        }
        (None, None) => None,
    };
    Ok(QueryParams {
        page,
        from,
        to,
        window,
        tz,
        subjects,
        group_by,
        filters,
    })
}

/// `limit`: a page of 1 to [`MAX_PAGE`] subjects.
pub(crate) fn parse_limit(v: &str) -> Result<usize, FieldError> {
    v.parse::<usize>()
        .ok()
        .filter(|n| (1..=MAX_PAGE).contains(n))
        .ok_or_else(|| FieldError::new("limit", format!("must be a whole number 1-{MAX_PAGE}")))
}

/// `windowSize`: one of the four, never finer than the meter's own windows.
fn parse_window(v: &str, meter: &MeterDef) -> Result<QueryWindow, FieldError> {
    let w = QueryWindow::parse(v).ok_or_else(|| {
        FieldError::new(
            "windowSize",
            format!("unknown window size {v:?} (MINUTE, HOUR, DAY, MONTH)"),
        )
    })?;
    if w.rank() < meter_rank(meter.window_size) {
        let base = format!("{:?}", meter.window_size).to_uppercase();
        return Err(FieldError::new(
            "windowSize",
            format!(
                "{} is finer than the meter's windowSize {base}",
                v.to_uppercase()
            ),
        ));
    }
    Ok(w)
}

/// `to` when absent: now, rounded up to the meter's window, so that the range ends on a
/// window the meter keeps and the current window is included whole.
fn default_to(meter: &MeterDef, now: DateTime<Utc>) -> DateTime<Utc> {
    let size = meter.window_size.seconds();
    let t = now.timestamp();
    let end = t.div_euclid(size) * size + if t.rem_euclid(size) == 0 { 0 } else { size };
    DateTime::from_timestamp(end, 0).unwrap_or(now)
}

/// The first instant of a local day: midnight, or later where DST skips it (also what
/// threshold periods start at).
pub(crate) fn local_midnight(tz: Tz, date: NaiveDate) -> DateTime<Utc> {
    // Midnight can fall into a DST gap in a few zones: take the first instant of the day.
    let mut t = date.and_hms_opt(0, 0, 0).unwrap_or_default();
    for _ in 0..4 {
        if let Some(dt) = tz.from_local_datetime(&t).earliest() {
            return dt.with_timezone(&Utc);
        }
        t += Duration::minutes(30);
    }
    Utc.from_utc_datetime(&date.and_hms_opt(0, 0, 0).unwrap_or_default())
}

/// Start of the window (in `tz`) holding `t`, and the start of the next one.
fn window_bounds(w: QueryWindow, tz: Tz, t: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let local = t.with_timezone(&tz);
    match w {
        QueryWindow::Minute | QueryWindow::Hour => {
            let size = if w == QueryWindow::Minute { 60 } else { 3600 };
            // local wall-clock alignment: the zone's offset at t decides the boundary
            let offset = i64::from(local.offset().fix().local_minus_utc());
            let start = (t.timestamp() + offset).div_euclid(size) * size - offset;
            let start = DateTime::from_timestamp(start, 0).unwrap_or(t);
            (start, start + Duration::seconds(size))
        }
        QueryWindow::Day => {
            let date = local.date_naive();
            (
                local_midnight(tz, date),
                local_midnight(tz, date.succ_opt().unwrap_or(date)),
            )
        }
        QueryWindow::Month => {
            let first = NaiveDate::from_ymd_opt(local.year(), local.month(), 1).unwrap_or_default();
            let next = if local.month() == 12 {
                NaiveDate::from_ymd_opt(local.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(local.year(), local.month() + 1, 1)
            }
            .unwrap_or(first);
            (local_midnight(tz, first), local_midnight(tz, next))
        }
    }
}

/// Most output windows one query may ask for.
pub const MAX_WINDOWS: usize = 10_000;

/// The output windows, each clipped to [from, to); `None` past [`MAX_WINDOWS`].
pub fn output_windows(p: &QueryParams) -> Option<Vec<(DateTime<Utc>, DateTime<Utc>)>> {
    let Some(w) = p.window else {
        return Some(vec![(p.from, p.to)]);
    };
    let mut out = Vec::new();
    let mut t = p.from;
    while t < p.to {
        if out.len() >= MAX_WINDOWS {
            return None;
        }
        let (_, end) = window_bounds(w, p.tz, t);
        let end = end.min(p.to);
        if end <= t {
            break;
        }
        out.push((t, end));
        t = end;
    }
    Some(out)
}

/// A query answer (JSON form).
#[derive(Clone, Debug, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    pub window_size: Option<QueryWindow>,
    pub window_time_zone: String,
    pub from: String,
    pub to: String,
    pub data: Vec<Row>,
    /// With `limit`: the `cursor` of the next page, while more subjects remain (also in
    /// the `Kloudmeter-Next-Cursor` header).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// One stored window a cover reads: a rollup or the meter's own window
/// (`rollup: None`), whole — or only its parts `part.0..part.1`
/// ([`crate::domain::fold::Reading::part`]): an HOUR meter's own window's quarters at a
/// range's edge inside it, a UTC day's hours, a UTC month's days ([`Split`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Chunk {
    pub rollup: Option<Rollup>,
    pub start: i64,
    pub part: Option<(u8, u8)>,
    /// Taken away from the other chunks of its cover rather than added
    /// ([`signed_cover`]).
    pub minus: bool,
}

impl Chunk {
    pub fn whole(rollup: Option<Rollup>, start: i64) -> Chunk {
        Chunk {
            rollup,
            start,
            part: None,
            minus: false,
        }
    }

    /// How the stored window it reads is split into parts, for a meter of `base`
    /// windows.
    pub fn split(&self, base: WindowSize) -> Option<Split> {
        match self.rollup {
            Some(r) => r.split(),
            None => base.split(),
        }
    }

    /// The time it covers, [start, end) in epoch seconds, for a meter of `base` windows.
    pub fn span(&self, base: WindowSize) -> (i64, i64) {
        let end = match self.rollup {
            Some(r) => r.next(self.start),
            None => self.start + base.seconds(),
        };
        match (self.part, self.split(base)) {
            (Some((lo, hi)), Some(split)) => (
                self.start + split.unit() * i64::from(lo),
                (self.start + split.unit() * i64::from(hi)).min(end),
            ),
            _ => (self.start, end),
        }
    }

    /// Whether it reads parts of a rollup (which a window written before rollups kept
    /// parts lacks: [`cover_in_windows`] covers its span again without them).
    pub fn rollup_part(&self) -> bool {
        self.rollup.is_some() && self.part.is_some()
    }
}

/// [`cover`] for aggregations whose readings can be taken away again (`count`, `sum`,
/// `avg`): the range's ends are moved to the nearest UTC midnight, that range is
/// covered, and what the move added is taken away again (`minus`) or what it left out
/// added. Taken only where it reads fewer windows than the plain cover (since rollups
/// keep parts, it saves a reading or so: two days from 23:15 read the days between and
/// the quarters of the hour before each end — 3 readings, where the plain cover reads
/// the quarters, a day's hours and the days — 4). Whatever is taken away lies
/// inside what is added, so the sum of a cover's readings never goes below zero on the
/// way.
pub fn signed_cover(a: i64, b: i64, base: WindowSize) -> Result<Vec<Chunk>, i64> {
    const DAY: i64 = 86_400;
    let plain = cover(a, b, base)?;
    let nearest_midnight = |t: i64| {
        let before = t.div_euclid(DAY) * DAY;
        if t - before <= DAY / 2 {
            before
        } else {
            before + DAY
        }
    };
    let (a2, b2) = (nearest_midnight(a), nearest_midnight(b));
    if a2 >= b2 || (a2 == a && b2 == b) {
        return Ok(plain);
    }
    let mut signed = cover(a2, b2, base)?;
    let mut edge = |lo: i64, hi: i64, minus: bool| -> Result<(), i64> {
        if lo < hi {
            signed.extend(
                cover(lo, hi, base)?
                    .into_iter()
                    .map(|c| Chunk { minus, ..c }),
            );
        }
        Ok(())
    };
    // at the start: added when the range begins before its midnight, else taken away
    edge(a.min(a2), a.max(a2), a2 < a)?;
    // at the end: taken away when the range ends before its midnight, else added
    edge(b.min(b2), b.max(b2), b < b2)?;
    Ok(if signed.len() < plain.len() {
        signed
    } else {
        plain
    })
}

/// Stored windows that together are exactly [a, b), read coarsest first: at each step
/// the coarsest UTC rollup that holds the next stretch — whole, or the run of its parts
/// (a month's days, a day's hours) the range takes of it —, else the meter's own
/// window, and quarters of one only at an edge inside it. A day in a zone a whole number
/// of hours off UTC is then the hours of two UTC days (2 readings), one in Asia/Kolkata
/// those and the quarters of the hour its midnight falls in (4, two of them shared with
/// the next day). Fails when a or b falls on no boundary stored: the meter's windows,
/// or a quarter hour for HOUR meters (every UTC offset in use is a whole number of
/// quarter hours).
pub fn cover(a: i64, b: i64, base: WindowSize) -> Result<Vec<Chunk>, i64> {
    cover_with(a, b, base, true)
}

/// [`cover`] without parts of rollups: whole rollups and the meter's own windows. What a
/// chunk of a rollup whose reading keeps no parts (written before rollups kept them) is
/// read as instead.
pub fn cover_in_windows(a: i64, b: i64, base: WindowSize) -> Result<Vec<Chunk>, i64> {
    cover_with(a, b, base, false)
}

fn cover_with(a: i64, b: i64, base: WindowSize, rollup_parts: bool) -> Result<Vec<Chunk>, i64> {
    let size = base.seconds();
    let finest = base.split().map_or(size, Split::unit);
    if a.rem_euclid(finest) != 0 {
        return Err(a);
    }
    if b.rem_euclid(finest) != 0 {
        return Err(b);
    }
    let mut out = Vec::new();
    let mut t = a;
    while t < b {
        if t.rem_euclid(size) != 0 || t + size > b {
            // an edge inside one of the meter's windows: the quarters of it in range
            let start = base.window_start(t);
            let end = (start + size).min(b);
            let quarter = |at: i64| ((at - start) / finest) as u8;
            out.push(Chunk {
                rollup: None,
                start,
                part: Some((quarter(t), quarter(end))),
                minus: false,
            });
            t = end;
            continue;
        }
        let chunk = base.rollups().iter().rev().find_map(|&ru| {
            let start = ru.start(t);
            let next = ru.next(start);
            if start == t && next <= b {
                return Some((Chunk::whole(Some(ru), t), next));
            }
            let split = ru.split().filter(|_| rollup_parts)?;
            // the run of whole parts from t, up to the rollup's end or b
            let unit = split.unit();
            let end = next.min(b);
            let (lo, hi) = ((t - start) / unit, (end - start) / unit);
            ((t - start) % unit == 0 && hi > lo).then(|| {
                let chunk = Chunk {
                    rollup: Some(ru),
                    start,
                    part: Some((lo as u8, hi as u8)),
                    minus: false,
                };
                (chunk, start + hi * unit)
            })
        });
        match chunk {
            Some((chunk, next)) => {
                out.push(chunk);
                t = next;
            }
            None => {
                out.push(Chunk::whole(None, t));
                t += size;
            }
        }
    }
    Ok(out)
}

/// One row of a query answer.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Row {
    pub window_start: String,
    pub window_end: String,
    pub subject: String,
    pub group_by: BTreeMap<String, Value>,
    pub value: Option<String>,
}

pub fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// Whether a group's values pass every `filterGroupBy` (compared as text; null as "null").
pub fn group_matches(values: &BTreeMap<String, Value>, filters: &[GroupFilter]) -> bool {
    filters.iter().all(|f| {
        let got = match values.get(&f.key) {
            Some(Value::String(s)) => s.clone(),
            Some(v) => v.to_string(),
            None => "null".into(),
        };
        let listed = f.values.contains(&got);
        match f.op {
            FilterOp::Eq | FilterOp::In => listed,
            FilterOp::Ne | FilterOp::Nin => !listed,
        }
    })
}

/// Keep only the requested dimensions of a group.
pub fn project(values: &BTreeMap<String, Value>, dims: &[String]) -> BTreeMap<String, Value> {
    dims.iter()
        .map(|d| (d.clone(), values.get(d).cloned().unwrap_or(Value::Null)))
        .collect()
}

/// Merged accumulators keyed by (output window, subject, projected group as JSON).
pub type Merged = BTreeMap<(usize, String, String), (BTreeMap<String, Value>, Acc)>;

/// Rows from merged accumulators keyed by (window index, subject, projected group).
pub fn rows(
    windows: &[(DateTime<Utc>, DateTime<Utc>)],
    merged: Merged,
    meter: &MeterDef,
) -> Vec<Row> {
    merged
        .into_iter()
        .filter(|(_, (_, acc))| acc.count > 0)
        .map(|((w, subject, _), (group_by, acc))| Row {
            window_start: rfc3339(windows[w].0),
            window_end: rfc3339(windows[w].1),
            subject,
            group_by,
            value: acc.value(meter.aggregation).map(|d| d.to_string()),
        })
        .collect()
}

/// CSV with a header line: windowStart, windowEnd, subject, one column per groupBy
/// dimension, value.
pub fn to_csv(rows: &[Row], dims: &[String]) -> String {
    let mut out = csv_header(dims);
    out.push_str(&csv_rows(rows, dims));
    out
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The CSV header line.
pub fn csv_header(dims: &[String]) -> String {
    let mut out = String::from("windowStart,windowEnd,subject");
    for d in dims {
        out.push(',');
        out.push_str(&csv_field(d));
    }
    out.push_str(",value\n");
    out
}

/// The CSV lines of `rows`, without the header (a streamed answer writes it once).
pub fn csv_rows(rows: &[Row], dims: &[String]) -> String {
    let mut out = String::new();
    for r in rows {
        let mut cols = vec![
            csv_field(&r.window_start),
            csv_field(&r.window_end),
            csv_field(&r.subject),
        ];
        for d in dims {
            let v = match r.group_by.get(d) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            };
            cols.push(csv_field(&v));
        }
        cols.push(csv_field(r.value.as_deref().unwrap_or("")));
        out.push_str(&cols.join(","));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests;
