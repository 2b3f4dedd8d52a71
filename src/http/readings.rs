//! All-time readings: a meter's summary and its subjects' totals.

use axum::extract::{Query, State};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{ApiError, ApiResult, AppState};
use chrono::{DateTime, Utc};

use super::meters::{required_key, KeyQuery};
use crate::domain::meter::MeterDef;
use crate::domain::window::ReadingKey;
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

async fn meter_reading(
    store: &Store,
    def: &MeterDef,
    with_subjects: bool,
) -> ApiResult<MeterReading> {
    let served = store.served(def).await?;
    let summary = store
        .reading(&ReadingKey::Summary {
            meter: served.readings_id.as_str().into(),
        })
        .await?
        .unwrap_or_default();
    let by_subject = if with_subjects {
        Some(subject_readings(store, def, &served.readings_id, None).await?)
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

/// `readings_id`: where the meter's served readings are stored ([`Store::served`]).
async fn subject_readings(
    store: &Store,
    def: &MeterDef,
    readings_id: &str,
    subject: Option<&str>,
) -> ApiResult<Vec<SubjectReading>> {
    let totals = store.subject_totals(readings_id, subject).await?;
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

pub(super) async fn list(State(state): State<AppState>) -> ApiResult<Json<Vec<MeterReading>>> {
    let store = state.store()?;
    let mut out = Vec::new();
    for def in store.all_meters().await? {
        out.push(meter_reading(store, &def, false).await?);
    }
    Ok(Json(out))
}

pub(super) async fn get_seed(
    State(state): State<AppState>,
    Query(q): Query<KeyQuery>,
) -> ApiResult<Json<MeterReading>> {
    let id = state.resolve_id(&required_key(q)?);
    let store = state.store()?;
    let def = store
        .meter(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("key: no meter {id:?}")))?;
    Ok(Json(meter_reading(store, &def, true).await?))
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
        let summary = store
            .reading(&ReadingKey::Summary {
                meter: served.readings_id.as_str().into(),
            })
            .await?
            .unwrap_or_default();
        let mut top_subjects = Vec::new();
        if let Some(export) = &def.export {
            let mut totals: Vec<(String, rust_decimal::Decimal)> = store
                .subject_totals(&served.readings_id, None)
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
    Query(q): Query<ReadingsQuery>,
) -> ApiResult<Json<Value>> {
    let store = state.store()?;
    let defs = match q.meter.as_deref().filter(|m| !m.is_empty()) {
        Some(id) => vec![store
            .meter(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("meter: no meter {id:?}")))?],
        None => store.all_meters().await?,
    };
    let mut data = Vec::new();
    for def in &defs {
        let served = store.served(def).await?;
        let subject = q.subject.as_deref().filter(|s| !s.is_empty());
        data.extend(subject_readings(store, def, &served.readings_id, subject).await?);
    }
    Ok(Json(json!({"data": data})))
}
