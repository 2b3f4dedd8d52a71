//! Ingestion endpoints: validate a request completely, then publish its events and
//! answer once JetStream has stored every one.

use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use bytes::Bytes;
use serde_json::json;

use super::{body_or_error, ok_status, ApiError, ApiResult, AppState};
use chrono::Utc;

use crate::access::{Caller, Permission};
use crate::domain::event::{parse_events, BodyKind};

/// Validate a request's events, publish them and wait until JetStream has stored every
/// one; the number stored.
#[tracing::instrument(name = "ingest", level = "debug", skip_all)]
async fn ingest(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<usize> {
    // a ServiceAccount posts into its own namespace; anyone else needs the grant
    // cluster-wide
    state
        .authorize(caller, Permission::post_events(caller.home_namespace()))
        .await?;
    let started = std::time::Instant::now();
    let answer = ingest_events(state, caller, headers, body).await;
    state
        .0
        .metrics
        .ingest
        .request_seconds
        .observe(started.elapsed().as_secs_f64());
    answer
}

async fn ingest_events(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<usize> {
    let m = &state.0.metrics;
    let body = body_or_error(body).inspect_err(|_| {
        m.ingest.rejected.inc();
    })?;
    let kind = BodyKind::from_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let mut events = parse_events(&body, kind, true, Utc::now()).inspect_err(|_| {
        m.ingest.rejected.inc();
    })?;
    let n = events.len();
    let store = state.store()?;
    // TENANCY=namespaced: each event records where it was posted from (none for callers
    // without a ServiceAccount namespace), whatever its body says
    if store.tenancy.records_namespace() {
        if let Some(ns) = caller.home_namespace() {
            for e in &mut events {
                e.namespace = Some(ns.into());
            }
        }
    }
    let permits = u32::try_from(n.min(state.0.cfg.max_inflight_events)).unwrap_or(u32::MAX);
    let _permit = state.0.inflight.try_acquire_many(permits).map_err(|_| {
        m.ingest.rejected.inc_by(n as u64);
        ApiError::unavailable("ingestion is at capacity; retry shortly")
    })?;
    crate::ingest::publish(store, &events).await.map_err(|e| {
        m.ingest.rejected.inc_by(n as u64);
        ApiError::unavailable(e)
    })?;
    m.ingest.accepted.inc_by(n as u64);
    Ok(n)
}

pub(super) async fn register_event(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    ingest(&state, &caller, &headers, body).await?;
    Ok(ok_status(StatusCode::ACCEPTED))
}

pub(super) async fn post_events(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let n = ingest(&state, &caller, &headers, body).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": n}))).into_response())
}
