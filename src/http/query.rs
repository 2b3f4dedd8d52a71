//! Usage queries over HTTP: the parameters parsed by [`crate::domain::query`], the rows
//! from [`crate::usage`], answered as JSON or CSV.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use chrono::Utc;

use super::{ApiError, ApiResult, AppState};
use crate::access::{Caller, Permission, Verb};
use crate::domain::meter::MeterDef;
use crate::domain::query;
use crate::usage::UsageError;

impl From<UsageError> for ApiError {
    fn from(e: UsageError) -> Self {
        match e {
            UsageError::Invalid(f) => ApiError::bad_request(f.to_string()),
            UsageError::Storage(_) => ApiError::storage(e),
            UsageError::Corrupt(_) => ApiError::internal(e),
        }
    }
}

pub(super) async fn query_v1(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    run_query(&state, &caller, &id, pairs, &headers).await
}

pub(super) async fn query_v1_ns(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ns, name)): Path<(String, String)>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    run_query(&state, &caller, &format!("{ns}/{name}"), pairs, &headers).await
}

#[tracing::instrument(name = "query", level = "debug", skip(state, caller, pairs, headers))]
async fn run_query(
    state: &AppState,
    caller: &Caller,
    id: &str,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    let id = state.resolve_id(id);
    state
        .authorize(caller, Permission::meter(Verb::Get, &id))
        .await?;
    let store = state.store()?;
    let def = store
        .meter(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("id: no meter {id:?}")))?;
    // Readings are stored under the served generation's name; from here on the
    // definition stands for them.
    let def = MeterDef {
        id: store.served(&def).await?.readings_id,
        ..def
    };
    let p = query::parse_query(&pairs, &def, Utc::now())?;
    let rows = crate::usage::execute(store, &def, &p).await?;
    Ok(answer(rows, &p, headers))
}

/// The rows as JSON, or CSV when the client accepts it.
fn answer(rows: Vec<query::Row>, p: &query::QueryParams, headers: &HeaderMap) -> Response {
    let wants_csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/csv"));
    if wants_csv {
        return (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            query::to_csv(&rows, &p.group_by),
        )
            .into_response();
    }
    Json(query::Answer {
        window_size: p.window,
        window_time_zone: p.tz.name().to_string(),
        from: query::rfc3339(p.from),
        to: query::rfc3339(p.to),
        data: rows,
    })
    .into_response()
}
