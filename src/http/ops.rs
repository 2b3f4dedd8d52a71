//! Health, readiness, metrics and the API's own description: open, never token-guarded.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::{ok_status, AppState};
use crate::nats::store::Store;

pub(super) async fn alive() -> Response {
    ok_status(StatusCode::OK)
}

/// The description the state was built with (the route table is fixed at compile time,
/// so it is generated once).
pub(super) async fn openapi(State(state): State<AppState>) -> Json<Value> {
    Json(state.0.description.clone())
}

pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let nats = state.0.store.get().is_some_and(Store::connected);
    let meters = state.0.registry.is_synced();
    let kube = *state.0.kube_synced.borrow();
    let code = if nats && meters && kube {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = json!({"nats": nats, "metersSynced": meters, "kubernetesSynced": kube});
    (code, Json(body)).into_response()
}

pub(super) async fn metrics(State(state): State<AppState>) -> Response {
    let usage = &state.0.metrics.usage;
    let _one_at_a_time = usage.refreshing.lock().await;
    // Usage comes from NATS: without it the last values stay (the other series are
    // this process's own and always there).
    if let Ok(store) = state.store() {
        if let Err(e) = super::readings::refresh_usage(store, usage).await {
            tracing::warn!(error = ?e, "reading usage for /metrics failed");
        }
        let (hits, misses) = store.read_cache.reads();
        usage.set_query_cache(hits, misses, store.read_cache.bytes());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.0.metrics.render(),
    )
        .into_response()
}
