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
    /// False while the meter is being built or rebuilt from retained events.
    ready: bool,
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
    let summary = store
        .reading(&ReadingKey::Summary {
            meter: def.id.as_str().into(),
        })
        .await?
        .unwrap_or_default();
    let ready = store.progress(&def.id).await?.is_some_and(|p| p.built(def));
    let by_subject = if with_subjects {
        Some(subject_readings(store, def, None).await?)
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
        ready,
        by_subject,
    })
}

async fn subject_readings(
    store: &Store,
    def: &MeterDef,
    subject: Option<&str>,
) -> ApiResult<Vec<SubjectReading>> {
    let totals = store.subject_totals(&def.id, subject).await?;
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
        data.extend(
            subject_readings(store, def, q.subject.as_deref().filter(|s| !s.is_empty())).await?,
        );
    }
    Ok(Json(json!({"data": data})))
}
