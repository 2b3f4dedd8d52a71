//! All-time readings: a meter's summary and its subjects' totals.

use axum::extract::{Query, State};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{ApiError, ApiResult, AppState};
use chrono::{DateTime, Utc};

use super::meters::{required_key, KeyQuery};
use crate::access::{Caller, Permission, Verb};
use crate::domain::meter::MeterDef;
use crate::nats::meters::Readings;
use crate::nats::store::Store;

#[derive(Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeterReading {
    meter: String,
    aggregation: String,
    value: Option<String>,
    events: u64,
    invalid_events: u64,
    subjects: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_event_time: Option<DateTime<Utc>>,
    /// False while the meter is being built or rebuilt from retained events (its
    /// previous readings, if any, are shown meanwhile), and while it is suspended.
    ready: bool,
    /// While the meter is being built: percent of its retained events replayed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 100))]
    progress: Option<u8>,
    /// Windows starting before this instant keep the readings of the meter's previous
    /// definition: their events had left the stream (EVENT_RETENTION) when it was
    /// rebuilt. Totals include them.
    #[serde(skip_serializing_if = "Option::is_none")]
    rebuilt_from: Option<DateTime<Utc>>,
    /// The meter is suspended: it counts nothing until resumed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    suspended: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    by_subject: Option<Vec<SubjectReading>>,
}

/// All-time reading of one subject of one meter.
#[derive(Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SubjectReading {
    meter: String,
    subject: String,
    value: Option<String>,
    events: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_event_time: Option<DateTime<Utc>>,
}

/// One subject's all-time reading in the original KloudMeter's shape: what
/// `GET /api/readings` lists after each meter's row, and what `GET /api/reading/?key=`
/// answers for such a key. For meters with `groupBy`, each subject's entry is followed
/// by one per group, carrying the group's values instead of a key.
#[derive(Serialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SeedReading {
    /// `<eventType>.<aggregation>.<meterId>.<subject>`, as the original stored readings
    /// (a subject's entry; a group's has none).
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    meter_id: String,
    subject: String,
    /// A group's entry: its values, by groupBy name.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<std::collections::BTreeMap<String, serde_json::Value>>")]
    group_by: Option<crate::domain::fold::SharedGroup>,
    value: Option<String>,
    /// Events counted for the subject.
    count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_event_time: Option<DateTime<Utc>>,
}

/// An entry of `GET /api/readings`: a meter's row, or one of its subjects'.
#[derive(Serialize, schemars::JsonSchema)]
#[serde(untagged)]
pub enum ReadingEntry {
    Meter(MeterReading),
    Subject(SeedReading),
}

/// The original KloudMeter's key of a subject's reading.
fn seed_key(def: &MeterDef, subject: &str) -> String {
    format!(
        "{}.{}.{}.{subject}",
        def.event_type, def.aggregation, def.id
    )
}

fn seed_reading(def: &MeterDef, subject: String, r: &crate::domain::fold::Reading) -> SeedReading {
    SeedReading {
        key: Some(seed_key(def, &subject)),
        group_by: None,
        meter_id: def.id.clone(),
        value: r.acc.value(def.aggregation).map(|d| d.to_string()),
        count: r.acc.count,
        last_event_time: r.last_event_time,
        subject,
    }
}

async fn meter_reading(
    store: &Store,
    def: &MeterDef,
    with_subjects: bool,
) -> ApiResult<MeterReading> {
    let served = store.served(def).await?;
    let summary = store.summary(&served.readings).await?.unwrap_or_default();
    let by_subject = if with_subjects {
        Some(subject_readings(store, def, &served.readings, None).await?)
    } else {
        None
    };
    Ok(MeterReading {
        meter: def.id.clone(),
        aggregation: def.aggregation.to_string(),
        value: summary.acc.value(def.aggregation).map(|d| d.to_string()),
        events: summary.acc.count,
        invalid_events: summary.invalid_events,
        subjects: summary.subjects,
        last_event_time: summary.last_event_time,
        ready: served.ready,
        progress: served.progress,
        rebuilt_from: served.rebuilt_from,
        suspended: served.suspended,
        by_subject,
    })
}

/// `at`: where the meter's served readings are stored ([`Store::served`]).
async fn subject_readings(
    store: &Store,
    def: &MeterDef,
    at: &Readings,
    subject: Option<&str>,
) -> ApiResult<Vec<SubjectReading>> {
    let totals = store.subject_totals(at, subject).await?;
    let out: Vec<SubjectReading> = totals
        .into_iter()
        .map(|(subject, r)| SubjectReading {
            meter: def.id.clone(),
            subject,
            value: r.acc.value(def.aggregation).map(|d| d.to_string()),
            events: r.acc.count,
            last_event_time: r.last_event_time,
        })
        .collect();
    Ok(out)
}

#[derive(Deserialize)]
pub(super) struct PageQuery {
    limit: Option<String>,
    cursor: Option<String>,
}

/// Where an entry of `GET /api/readings` stands: meters by id, each meter's row before its
/// subjects, subjects by name, each subject's entry before its groups, groups by token. A
/// cursor is the last position a page gave.
type Position = (String, Option<String>, Option<String>);

fn encode_cursor(p: &Position) -> String {
    use base64::Engine as _;
    let raw = serde_json::to_vec(p).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw)
}

fn decode_cursor(raw: &str) -> Result<Position, ApiError> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(raw)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| ApiError::bad_request("cursor: not a cursor this API gave"))
}

/// A meter's row, then its subjects' entries, each subject's followed by its groups'
/// (meters with `groupBy`), with their positions.
async fn meter_entries(store: &Store, def: &MeterDef) -> ApiResult<Vec<(Position, ReadingEntry)>> {
    let mut out = vec![(
        (def.id.clone(), None, None),
        ReadingEntry::Meter(meter_reading(store, def, false).await?),
    )];
    let served = store.served(def).await?;
    let mut groups = if def.group_by.is_empty() {
        Vec::new()
    } else {
        store.group_totals(&served.readings).await?
    }
    .into_iter()
    .peekable();
    for (subject, r) in store.subject_totals(&served.readings, None).await? {
        out.push((
            (def.id.clone(), Some(subject.clone()), None),
            ReadingEntry::Subject(seed_reading(def, subject.clone(), &r)),
        ));
        // group totals come sorted by subject too: take this subject's
        while let Some((s, token, g)) = groups.next_if(|(s, _, _)| *s <= subject) {
            if s == subject {
                let mut entry = seed_reading(def, s, &g);
                entry.key = None;
                entry.group_by = Some(g.group_by.clone());
                out.push((
                    (def.id.clone(), Some(subject.clone()), Some(token)),
                    ReadingEntry::Subject(entry),
                ));
            }
        }
    }
    Ok(out)
}

/// Every meter's row followed by one entry per subject (the original KloudMeter's
/// readings) and per group, in a stable order. `limit` pages it (the
/// `Kloudmeter-Next-Cursor` header gives the `cursor` of the next page); without it the
/// answer is streamed a meter at a time.
pub(super) async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse as _;
    let limit = q
        .limit
        .as_deref()
        .map(crate::domain::query::parse_limit)
        .transpose()?;
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    let store = state.store()?;
    let defs = state.visible(&caller, store.all_meters().await?).await?;
    let Some(limit) = limit else {
        return stream_entries(store.clone(), defs, after).await;
    };
    let mut page: Vec<ReadingEntry> = Vec::new();
    let mut last: Option<Position> = None;
    let mut more = false;
    'meters: for def in defs {
        // a meter wholly before the cursor is not read at all
        if after.as_ref().is_some_and(|(id, _, _)| def.id < *id) {
            continue;
        }
        for (at, entry) in meter_entries(store, &def).await? {
            if after.as_ref().is_some_and(|a| at <= *a) {
                continue;
            }
            if page.len() == limit {
                more = true;
                break 'meters;
            }
            page.push(entry);
            last = Some(at);
        }
    }
    let mut response = Json(page).into_response();
    if let (true, Some(last)) = (more, last) {
        if let Ok(v) = axum::http::HeaderValue::from_str(&encode_cursor(&last)) {
            response.headers_mut().insert("kloudmeter-next-cursor", v);
        }
    }
    Ok(response)
}

/// The whole list as one JSON array written a meter at a time, so that no answer holds
/// every meter's subjects at once. The first meter is read before answering (a failure
/// there is still an error status); a failure later cuts the body short (and is logged).
async fn stream_entries(
    store: Store,
    defs: Vec<MeterDef>,
    after: Option<Position>,
) -> ApiResult<axum::response::Response> {
    use axum::response::IntoResponse as _;
    use futures::StreamExt as _;
    // one meter's entries as the array's next part (`[` before the first, `,` between)
    async fn part(
        store: &Store,
        def: &MeterDef,
        after: &Option<Position>,
        first: &mut bool,
    ) -> ApiResult<String> {
        let mut out = String::new();
        if after.as_ref().is_some_and(|(id, _, _)| def.id < *id) {
            return Ok(out);
        }
        for (at, entry) in meter_entries(store, def).await? {
            if after.as_ref().is_some_and(|a| at <= *a) {
                continue;
            }
            out.push(if std::mem::take(first) { '[' } else { ',' });
            out.push_str(
                &serde_json::to_string(&entry)
                    .map_err(|e| ApiError::internal(format!("serializing a reading: {e}")))?,
            );
        }
        Ok(out)
    }
    let mut defs = defs.into_iter();
    let mut first = true;
    let head = match defs.next() {
        Some(def) => part(&store, &def, &after, &mut first).await?,
        None => String::new(),
    };
    let rest = futures::stream::unfold(Some((store, defs, after, first)), |state| async move {
        let (store, mut defs, after, mut first) = state?;
        let Some(def) = defs.next() else {
            // the closing bracket (an empty list when nothing came before)
            let end = if first { "[]" } else { "]" };
            return Some((Ok(bytes::Bytes::from(end)), None));
        };
        match part(&store, &def, &after, &mut first).await {
            Ok(text) => Some((
                Ok(bytes::Bytes::from(text)),
                Some((store, defs, after, first)),
            )),
            Err(e) => {
                tracing::error!(meter = %def.id, error = ?e, "a streamed readings list was cut short");
                Some((Err(std::io::Error::other("reading failed")), None))
            }
        }
    });
    let body = futures::stream::once(async move { Ok(bytes::Bytes::from(head)) }).chain(rest);
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// A meter's reading by its id, or one subject's by the original KloudMeter's reading key
/// (`<eventType>.<aggregation>.<meterId>.<subject>`).
pub(super) async fn get_seed(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<KeyQuery>,
) -> ApiResult<Json<Value>> {
    let key = required_key(q)?;
    let id = state.resolve_id(&key);
    let store = state.store()?;
    if let Some(def) = store.meter(&id).await? {
        state
            .authorize(&caller, Permission::meter(Verb::Get, &def.id))
            .await?;
        return Ok(Json(serde_json::to_value(
            meter_reading(store, &def, true).await?,
        )?));
    }
    // a reading key: the meter whose prefix it carries (the longest, should ids nest)
    let defs = store.all_meters().await?;
    let owner = defs
        .iter()
        .filter_map(|def| {
            let prefix = seed_key(def, "");
            key.strip_prefix(&prefix)
                .filter(|subject| !subject.is_empty())
                .map(|subject| (prefix.len(), def, subject))
        })
        .max_by_key(|(len, _, _)| *len);
    let Some((_, def, subject)) = owner else {
        return Err(ApiError::not_found(format!(
            "key: no meter or reading {key:?}"
        )));
    };
    state
        .authorize(&caller, Permission::meter(Verb::Get, &def.id))
        .await?;
    let served = store.served(def).await?;
    let found = store
        .subject_totals(&served.readings, Some(subject))
        .await?
        .into_iter()
        .next();
    match found {
        Some((subject, r)) => Ok(Json(serde_json::to_value(seed_reading(def, subject, &r))?)),
        None => Err(ApiError::not_found(format!("key: no reading {key:?}"))),
    }
}

/// Set the usage series of `/metrics` from the served readings: every meter's value and
/// events, and the highest subjects of the meters that export them.
pub(super) async fn refresh_usage(
    store: &Store,
    usage: &crate::metrics::UsageMetrics,
) -> ApiResult<()> {
    use rust_decimal::prelude::ToPrimitive;
    let mut out = Vec::new();
    for def in store.all_meters().await? {
        let served = store.served(&def).await?;
        let summary = store.summary(&served.readings).await?.unwrap_or_default();
        let mut top_subjects = Vec::new();
        if let Some(export) = &def.export {
            let mut totals: Vec<(String, rust_decimal::Decimal)> = store
                .subject_totals(&served.readings, None)
                .await?
                .into_iter()
                .filter_map(|(s, r)| r.acc.value(def.aggregation).map(|v| (s, v)))
                .collect();
            // highest first; ties by subject, so the same subjects show at every scrape
            totals.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            totals.truncate(export.top_subjects as usize);
            top_subjects = totals
                .into_iter()
                .filter_map(|(s, v)| v.to_f64().map(|f| (s, f)))
                .collect();
        }
        out.push(crate::metrics::MeterUsage {
            value: summary.acc.value(def.aggregation).and_then(|v| v.to_f64()),
            events: summary.acc.count,
            meter: def.id,
            top_subjects,
        });
    }
    usage.set(out);
    Ok(())
}

#[derive(Deserialize)]
pub(super) struct ReadingsQuery {
    meter: Option<String>,
    subject: Option<String>,
}

pub(super) async fn readings_v1(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ReadingsQuery>,
) -> ApiResult<Json<Value>> {
    let store = state.store()?;
    let defs = match q.meter.as_deref().filter(|m| !m.is_empty()) {
        Some(id) => {
            state
                .authorize(&caller, Permission::meter(Verb::Get, id))
                .await?;
            vec![store
                .meter(id)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("meter: no meter {id:?}")))?]
        }
        None => state.visible(&caller, store.all_meters().await?).await?,
    };
    let mut data = Vec::new();
    for def in &defs {
        let served = store.served(def).await?;
        let subject = q.subject.as_deref().filter(|s| !s.is_empty());
        data.extend(subject_readings(store, def, &served.readings, subject).await?);
    }
    Ok(Json(json!({"data": data})))
}
