//! Usage queries: plan the stored windows with [`crate::domain::query`], read them from
//! the readings bucket, merge them into rows.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::Value;

use super::{ApiError, ApiResult, AppState};
use chrono::Utc;

use std::collections::{BTreeMap, HashMap};

use chrono::DateTime;
use futures::{StreamExt, TryStreamExt};

use crate::access::{Caller, Permission, Verb};
use crate::domain::fold::Reading;
use crate::domain::meter::MeterDef;
use crate::domain::query;
use crate::domain::window::{ReadingKey, Rollup};
use crate::nats::keys;
use crate::nats::store::KvItem;
use crate::nats::store::Store;

/// One stored window read for a query: (output window, subject, projected group, reading).
type Fetched = (
    usize,
    String,
    std::collections::BTreeMap<String, Value>,
    Option<Reading>,
);

/// Stored windows a query reads at once (direct gets pipelined on one connection).
const QUERY_PIPELINE: usize = 2048;

/// Most stored windows one query may read.
const QUERY_KEY_LIMIT: usize = 500_000;

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

/// Subjects to answer for, with every group each has seen.
async fn query_subjects(
    store: &Store,
    def: &MeterDef,
    wanted: &[String],
) -> ApiResult<
    Vec<(
        String,
        std::collections::BTreeMap<String, crate::domain::fold::SharedGroup>,
    )>,
> {
    let totals = if wanted.is_empty() {
        store.subject_totals(&def.id, None).await?
    } else {
        let mut found = Vec::with_capacity(wanted.len());
        for subject in wanted {
            let key = ReadingKey::SubjectTotal {
                meter: def.id.as_str().into(),
                subject: subject.as_str().into(),
            };
            if let Some(reading) = store.reading(&key).await? {
                found.push((subject.clone(), reading));
            }
        }
        found
    };
    Ok(totals
        .into_iter()
        .map(|(s, r)| {
            let groups = if r.groups.is_empty() {
                std::collections::BTreeMap::from([("_".to_string(), Default::default())])
            } else {
                r.groups
            };
            (s, groups)
        })
        .collect())
}

/// Stored windows: (rollup, start) chunks, per output window.
type Covers = Vec<Vec<(Option<Rollup>, i64)>>;

/// One stored window to read: (output window, subject, projected group, KV key).
type Planned = (usize, String, BTreeMap<String, Value>, String);

/// Subjects and their groups, as [`query_subjects`] finds them.
type Subjects = Vec<(String, BTreeMap<String, crate::domain::fold::SharedGroup>)>;

fn too_many_windows() -> ApiError {
    ApiError::bad_request(format!(
        "windowSize: the query would read more than {QUERY_KEY_LIMIT} stored windows; narrow from/to or use a coarser windowSize"
    ))
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
    let rows = execute(store, &def, &p).await?;
    Ok(answer(rows, &p, headers))
}

/// The rows of a parsed query. `def.id` names the meter's served readings
/// ([`Store::served`]). Also what threshold evaluation reads period values with.
pub(crate) async fn execute(
    store: &Store,
    def: &MeterDef,
    p: &query::QueryParams,
) -> ApiResult<Vec<query::Row>> {
    let windows = query::output_windows(p).ok_or_else(|| {
        ApiError::bad_request(format!(
            "windowSize: more than {} windows between from and to; narrow the range or use a coarser windowSize",
            query::MAX_WINDOWS
        ))
    })?;
    let covers = cover_windows(&windows, def, p)?;
    let mut chunk_list: Vec<(Option<Rollup>, i64)> = covers.iter().flatten().copied().collect();
    chunk_list.sort();
    chunk_list.dedup();
    // Every subject over few stored windows: one snapshot read per stored window (all
    // subjects and groups at once) is far cheaper than a get per subject, and runs
    // beside the read of the subject list.
    let scan_mode = p.subjects.is_empty() && chunk_list.len() <= 64;
    let scans = async {
        if scan_mode {
            scan_windows(store, def, chunk_list).await
        } else {
            Ok(Vec::new())
        }
    };
    let (subjects, scans) = futures::try_join!(query_subjects(store, def, &p.subjects), scans)?;
    let plan = plan_reads(def, p, &covers, &subjects)?;
    let fetched = if scan_mode {
        pick_scanned(plan, scans)?
    } else {
        get_each(store, plan).await?
    };
    Ok(query::rows(&windows, merge(fetched), def))
}

/// The stored windows that cover each output window exactly; an output boundary that is
/// not a boundary of the meter's windows is refused, naming the parameter that set it.
fn cover_windows(
    windows: &[(DateTime<Utc>, DateTime<Utc>)],
    def: &MeterDef,
    p: &query::QueryParams,
) -> ApiResult<Covers> {
    windows
        .iter()
        .map(|(a, b)| {
            query::cover(a.timestamp(), b.timestamp(), def.window_size).map_err(|t| {
                let base = format!("{:?}", def.window_size).to_uppercase();
                let field = if t == p.from.timestamp() {
                    "from"
                } else if t == p.to.timestamp() {
                    "to"
                } else {
                    "windowTimeZone"
                };
                ApiError::bad_request(format!(
                    "{field}: window boundaries must fall on the meter's {base} windows"
                ))
            })
        })
        .collect()
}

/// Every subject's and group's reading of each stored window, one scan per window.
async fn scan_windows(
    store: &Store,
    def: &MeterDef,
    chunks: Vec<(Option<Rollup>, i64)>,
) -> ApiResult<Vec<Vec<KvItem>>> {
    futures::stream::iter(chunks)
        .map(|(rollup, start)| {
            let filter = keys::window_filter(&def.id, rollup, start);
            async move {
                store
                    .scan(&store.readings, &filter)
                    .await
                    .map_err(ApiError::storage)
            }
        })
        .buffer_unordered(8)
        .try_collect()
        .await
}

/// Which stored windows to read, for which output window, subject and projected group.
/// Refused before anything large is built when it would read too many.
fn plan_reads(
    def: &MeterDef,
    p: &query::QueryParams,
    covers: &Covers,
    subjects: &Subjects,
) -> ApiResult<Vec<Planned>> {
    let chunks: usize = covers.iter().map(Vec::len).sum();
    let groups: usize = subjects.iter().map(|(_, g)| g.len()).sum();
    if chunks.saturating_mul(groups) > QUERY_KEY_LIMIT {
        return Err(too_many_windows());
    }
    let mut plan = Vec::new();
    for (wi, chunks) in covers.iter().enumerate() {
        for (subject, groups) in subjects {
            for (token, values) in groups {
                if !query::group_matches(values, &p.filters) {
                    continue;
                }
                let projected = query::project(values, &p.group_by);
                for (rollup, start) in chunks {
                    let key = ReadingKey::Window {
                        meter: def.id.as_str().into(),
                        subject: subject.as_str().into(),
                        group: token.as_str().into(),
                        rollup: *rollup,
                        start: *start,
                    };
                    plan.push((wi, subject.clone(), projected.clone(), key.kv_key()));
                }
            }
        }
        if plan.len() > QUERY_KEY_LIMIT {
            return Err(too_many_windows());
        }
    }
    Ok(plan)
}

/// The planned readings out of the window scans.
fn pick_scanned(plan: Vec<Planned>, scans: Vec<Vec<KvItem>>) -> ApiResult<Vec<Fetched>> {
    let found: HashMap<String, bytes::Bytes> = scans
        .into_iter()
        .flatten()
        .map(|item| (item.key, item.value))
        .collect();
    plan.into_iter()
        .map(|(wi, subject, projected, key)| {
            let reading = match found.get(&key) {
                Some(raw) => Some(serde_json::from_slice::<Reading>(raw)?),
                None => None,
            };
            Ok((wi, subject, projected, reading))
        })
        .collect()
}

/// The planned readings, one pipelined get each.
async fn get_each(store: &Store, plan: Vec<Planned>) -> ApiResult<Vec<Fetched>> {
    let readings = store.readings.clone();
    futures::stream::iter(plan)
        .map(|(wi, subject, projected, key)| {
            let readings = readings.clone();
            async move {
                let reading = match readings.get(key).await.map_err(ApiError::storage)? {
                    Some(raw) => Some(serde_json::from_slice::<Reading>(&raw)?),
                    None => None,
                };
                Ok::<_, ApiError>((wi, subject, projected, reading))
            }
        })
        .buffer_unordered(QUERY_PIPELINE)
        .try_collect()
        .await
}

/// Readings merged exactly per (output window, subject, projected group).
fn merge(fetched: Vec<Fetched>) -> query::Merged {
    let mut merged: query::Merged = BTreeMap::new();
    for (wi, subject, projected, reading) in fetched {
        let Some(reading) = reading else { continue };
        let gkey = serde_json::to_string(&projected).unwrap_or_default();
        merged
            .entry((wi, subject, gkey))
            .or_insert_with(|| (projected, crate::domain::fold::Acc::default()))
            .1
            .merge(&reading.acc);
    }
    merged
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
