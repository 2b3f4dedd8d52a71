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
use crate::nats::store::Store;
use crate::usage::UsageError;
use futures::StreamExt as _;

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
    // (readings are stored under the served generation's name in each partition)
    let (def, at) = store
        .meter_and_readings(&id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("id: no meter {id:?}")))?;
    let p = query::parse_query(&pairs, &def, Utc::now())?;
    if wants_csv(headers) && p.page.is_none() && p.subjects.is_empty() {
        return stream_csv(store.clone(), def, at, p).await;
    }
    let (rows, next) = crate::usage::execute_page(store, &def, &at, &p).await?;
    Ok(answer(rows, next, &p, headers))
}

/// Subjects per page of a streamed CSV answer: what bounds its memory.
const CSV_PAGE: usize = 1_000;

fn wants_csv(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/csv"))
}

/// Every subject's rows as CSV, read and written a page of subjects at a time, so that
/// the whole set never sits in memory. The subject list and first page are read before
/// answering (an invalid query is still a 4xx); a failure later cuts the body short
/// (and is logged).
async fn stream_csv(
    store: Store,
    def: MeterDef,
    at: crate::nats::meters::Readings,
    p: query::QueryParams,
) -> ApiResult<Response> {
    let dims = p.group_by.clone();
    let mut pages = crate::usage::Pages::start(store, def, at, p, CSV_PAGE).await?;
    let mut first = query::csv_header(&dims);
    if let Some(rows) = pages.next_rows().await {
        first.push_str(&query::csv_rows(&rows?, &dims));
    }
    let rest = futures::stream::unfold(Some(pages), move |pages| {
        let dims = dims.clone();
        async move {
            let mut pages = pages?;
            match pages.next_rows().await? {
                Ok(rows) => Some((
                    Ok(bytes::Bytes::from(query::csv_rows(&rows, &dims))),
                    Some(pages),
                )),
                Err(e) => {
                    tracing::error!(error = %e, "a streamed CSV answer was cut short");
                    Some((Err(std::io::Error::other("query failed")), None))
                }
            }
        }
    });
    let body = futures::stream::once(async move { Ok(bytes::Bytes::from(first)) }).chain(rest);
    Ok((
        [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

/// The rows as JSON, or CSV when the client accepts it; a page's next cursor in the
/// `Kloudmeter-Next-Cursor` header (and the JSON's `nextCursor`).
fn answer(
    rows: Vec<query::Row>,
    next: Option<String>,
    p: &query::QueryParams,
    headers: &HeaderMap,
) -> Response {
    let mut response = if wants_csv(headers) {
        (
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            query::to_csv(&rows, &p.group_by),
        )
            .into_response()
    } else {
        Json(query::Answer {
            window_size: p.window,
            window_time_zone: p.tz.name().to_string(),
            from: query::rfc3339(p.from),
            to: query::rfc3339(p.to),
            data: rows,
            next_cursor: next.clone(),
        })
        .into_response()
    };
    if let Some(v) = next.and_then(|n| axum::http::HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert("kloudmeter-next-cursor", v);
    }
    response
}
