//! The HTTP API: the seed endpoints (byte-compatible with the original KloudMeter), the
//! versioned `/api/v1` endpoints, health and metrics. Handlers validate, then call the
//! NATS layer; no aggregation happens here.

use std::sync::{Arc, OnceLock};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::config::Config;
use crate::event::{parse_events, BodyKind};
use crate::fold::Reading;
use crate::keys::{self, ReadingKey};
use crate::meter::{parse_meter_json, MeterDef};
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;

/// Largest request body accepted (CONTRACT §3).
pub const BODY_LIMIT: usize = 1 << 20;

#[derive(Clone)]
pub struct AppState(Arc<Inner>);

struct Inner {
    store: OnceLock<Store>,
    registry: Registry,
    metrics: Metrics,
    cfg: Config,
    inflight: Semaphore,
    kube: Option<KubeMode>,
    kube_synced: tokio::sync::watch::Receiver<bool>,
}

/// Operator mode: meters created or deleted through the API are Meter resources in
/// the operator's namespace (the resource is the single source of truth).
#[derive(Clone)]
pub struct KubeMode {
    pub client: kube::Client,
    pub namespace: String,
}

impl AppState {
    pub fn new(
        cfg: Config,
        registry: Registry,
        metrics: Metrics,
        kube: Option<KubeMode>,
        kube_synced: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        let inflight = Semaphore::new(cfg.max_inflight_events);
        AppState(Arc::new(Inner {
            store: OnceLock::new(),
            registry,
            metrics,
            cfg,
            inflight,
            kube,
            kube_synced,
        }))
    }
    /// A meter id as given in a request: in operator mode a bare name means the
    /// operator's namespace.
    fn resolve_id(&self, raw: &str) -> String {
        match &self.0.kube {
            Some(k) if !raw.contains('/') => format!("{}/{raw}", k.namespace),
            _ => raw.to_string(),
        }
    }
    /// Called once NATS is connected and set up; until then the API answers 503.
    pub fn set_store(&self, store: Store) {
        let _ = self.0.store.set(store);
    }
    fn store(&self) -> Result<&Store, ApiError> {
        self.0
            .store
            .get()
            .ok_or_else(|| ApiError::unavailable("NATS is not connected yet"))
    }
}

/// An error answer: `{"status":"error","message":"<field>: <what is wrong>"}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }
    fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, message)
    }
    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "request failed");
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("storage unavailable: {e}"),
        )
    }
}

impl From<crate::error::FieldError> for ApiError {
    fn from(e: crate::error::FieldError) -> Self {
        ApiError::bad_request(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"status": "error", "message": self.message})),
        )
            .into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE
            || self.status == StatusCode::TOO_MANY_REQUESTS
        {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

type ApiResult<T> = Result<T, ApiError>;

fn ok_status(code: StatusCode) -> Response {
    (code, Json(json!({"status": "ok"}))).into_response()
}

fn body_or_error(body: Result<Bytes, BytesRejection>) -> ApiResult<Bytes> {
    body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("body: larger than {BODY_LIMIT} bytes"),
            )
        } else {
            ApiError::new(r.status(), format!("body: {}", r.body_text()))
        }
    })
}

/// The handler of each route in [`crate::openapi::ROUTES`], the one list of what the
/// server serves (so `/openapi.json` cannot leave an endpoint out).
fn handler(method: &str, path: &str) -> axum::routing::MethodRouter<AppState> {
    use axum::routing::{delete, put};
    match (method, path) {
        ("get", "/healthz" | "/healthy") => get(|| async { ok_status(StatusCode::OK) }),
        ("get", "/readyz") => get(readyz),
        ("get", "/metrics") => get(metrics),
        ("get", "/openapi.json") => get(|| async { Json(crate::openapi::document()) }),
        ("post", "/api/register-event") => post(register_event),
        ("post", "/api/create-meter") => post(create_meter),
        ("get", "/api/meters" | "/api/v1/meters") => get(list_meters),
        ("get", "/api/meter" | "/api/meter/") => get(get_meter_seed),
        ("delete", "/api/meter" | "/api/meter/") => delete(delete_meter_seed),
        ("get", "/api/readings") => get(list_readings),
        ("get", "/api/reading" | "/api/reading/") => get(get_reading_seed),
        ("post", "/api/v1/events") => post(post_events),
        ("post", "/api/v1/meters") => post(create_meter_v1),
        ("get", "/api/v1/meters/{id}") => get(get_meter_v1),
        ("put", "/api/v1/meters/{id}") => put(put_meter_v1),
        ("delete", "/api/v1/meters/{id}") => delete(delete_meter_v1),
        ("get", "/api/v1/meters/{namespace}/{name}") => get(get_meter_v1_ns),
        ("put", "/api/v1/meters/{namespace}/{name}") => put(put_meter_v1_ns),
        ("delete", "/api/v1/meters/{namespace}/{name}") => delete(delete_meter_v1_ns),
        ("get", "/api/v1/meters/{id}/query") => get(query_v1),
        ("get", "/api/v1/meters/{namespace}/{name}/query") => get(query_v1_ns),
        ("get", "/api/v1/readings") => get(readings_v1),
        _ => panic!("route {method} {path} is listed in openapi::ROUTES but has no handler"),
    }
}

pub fn router(state: AppState) -> Router {
    let request_timeout = state.0.cfg.request_timeout;
    let mut by_path: std::collections::BTreeMap<&str, axum::routing::MethodRouter<AppState>> =
        Default::default();
    for r in crate::openapi::ROUTES {
        let h = handler(r.method, r.path);
        let merged = match by_path.remove(r.path) {
            Some(existing) => existing.merge(h),
            None => h,
        };
        by_path.insert(r.path, merged);
    }
    let (mut api, mut open) = (Router::new(), Router::new());
    for (path, methods) in by_path {
        if path.starts_with("/api/") {
            api = api.route(path, methods);
        } else {
            open = open.route(path, methods);
        }
    }
    let api = api.layer(middleware::from_fn_with_state(state.clone(), require_token));
    open.merge(api)
        .fallback(|| async { ApiError::not_found("path: no such endpoint") })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method: {} is not served on this path", req.method()),
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .with_state(state)
}

/// Constant-time comparison, so the token cannot be guessed byte by byte from timing.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = given.len() ^ expected.len();
    for (i, b) in expected.iter().enumerate() {
        diff |= usize::from(b ^ given.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

async fn require_token(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(expected) = state.0.cfg.api_token.as_deref() {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !token_matches(given.as_bytes(), expected.as_bytes()) {
            let mut resp = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "authorization: a valid bearer token is required",
            )
            .into_response();
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    next.run(req).await
}

async fn readyz(State(state): State<AppState>) -> Response {
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

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.0.metrics.render(),
    )
        .into_response()
}

// ---- events ----

async fn ingest(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<usize> {
    let m = &state.0.metrics;
    let body = body_or_error(body).inspect_err(|_| {
        m.events_rejected.inc();
    })?;
    let kind = BodyKind::from_content_type(
        headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok()),
    );
    let events = parse_events(&body, kind, true, Utc::now()).inspect_err(|_| {
        m.events_rejected.inc();
    })?;
    let n = events.len();
    let store = state.store()?;
    let permits = u32::try_from(n.min(state.0.cfg.max_inflight_events)).unwrap_or(u32::MAX);
    let _permit = state.0.inflight.try_acquire_many(permits).map_err(|_| {
        m.events_rejected.inc_by(n as u64);
        ApiError::unavailable("ingestion is at capacity; retry shortly")
    })?;
    crate::ingest::publish(store, &events).await.map_err(|e| {
        m.events_rejected.inc_by(n as u64);
        ApiError::unavailable(e)
    })?;
    m.events_accepted.inc_by(n as u64);
    Ok(n)
}

async fn register_event(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    ingest(&state, &headers, body).await?;
    Ok(ok_status(StatusCode::ACCEPTED))
}

async fn post_events(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let n = ingest(&state, &headers, body).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({"accepted": n}))).into_response())
}

// ---- meters ----

fn parse_json_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let body = body_or_error(body)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("body: invalid JSON: {e}")))
}

async fn load_meter(store: &Store, id: &str) -> ApiResult<Option<MeterDef>> {
    let raw = store
        .meters
        .get(keys::meter_key(id))
        .await
        .map_err(ApiError::internal)?;
    raw.map(|b| serde_json::from_slice(&b).map_err(ApiError::internal))
        .transpose()
}

async fn save_meter(store: &Store, def: &MeterDef) -> ApiResult<()> {
    let body = serde_json::to_vec(def).map_err(ApiError::internal)?;
    store
        .meters
        .put(keys::meter_key(&def.id), body.into())
        .await
        .map_err(ApiError::internal)?;
    Ok(())
}

async fn all_meters(store: &Store) -> ApiResult<Vec<MeterDef>> {
    let items = store
        .scan(&store.meters, "m.*")
        .await
        .map_err(ApiError::internal)?;
    let mut defs: Vec<MeterDef> = items
        .iter()
        .filter_map(|i| serde_json::from_slice(&i.value).ok())
        .collect();
    defs.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(defs)
}

/// Seed `create-meter`: creates or replaces.
async fn create_meter(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let def = parse_meter_json(&parse_json_body(body)?, None)?;
    match &state.0.kube {
        Some(k) => {
            kube_apply_meter(k, &def, true).await?;
        }
        None => save_meter(state.store()?, &def).await?,
    }
    Ok(ok_status(StatusCode::ACCEPTED))
}

fn kube_name(id: &str) -> ApiResult<()> {
    let ok = !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id.as_bytes()[id.len() - 1].is_ascii_alphanumeric();
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "id: must be a lowercase DNS-1123 name ([a-z0-9.-]) to become a Meter resource",
        ))
    }
}

fn kube_error(e: kube::Error) -> ApiError {
    match e {
        kube::Error::Api(s) if s.code == 404 => ApiError::not_found(format!("key: {}", s.message)),
        kube::Error::Api(s) if s.code == 409 => {
            ApiError::new(StatusCode::CONFLICT, format!("id: {}", s.message))
        }
        kube::Error::Api(s) if s.code == 422 || s.code == 400 => ApiError::bad_request(s.message),
        other => ApiError::internal(other),
    }
}

/// Create (or, with `replace`, create or replace the spec of) the Meter resource for
/// an API-defined meter. Returns the meter as the API shows it (id `<namespace>/<name>`).
async fn kube_apply_meter(k: &KubeMode, def: &MeterDef, replace: bool) -> ApiResult<MeterDef> {
    use kube::api::{Api, Patch, PatchParams, PostParams};
    let (ns, name) = match def.id.split_once('/') {
        Some((ns, name)) => (ns.to_string(), name.to_string()),
        None => (k.namespace.clone(), def.id.clone()),
    };
    kube_name(&name)?;
    let api: Api<crate::crd::Meter> = Api::namespaced(k.client.clone(), &ns);
    let spec = crate::crd::MeterSpec::from_def(def);
    if replace {
        let patch = json!({"apiVersion": "kloudmeter.io/v1alpha1", "kind": "Meter", "metadata": {"name": name}, "spec": spec});
        api.patch(
            &name,
            &PatchParams::apply("kloudmeter-api").force(),
            &Patch::Apply(&patch),
        )
        .await
        .map_err(kube_error)?;
    } else {
        let meter = crate::crd::Meter::new(&name, spec);
        api.create(&PostParams::default(), &meter)
            .await
            .map_err(kube_error)?;
    }
    Ok(MeterDef {
        id: crate::crd::meter_id(&ns, &name),
        ..def.clone()
    })
}

/// v1 create: 201, or 409 when a different meter already has the id.
async fn create_meter_v1(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let def = parse_meter_json(&parse_json_body(body)?, None)?;
    if let Some(k) = &state.0.kube {
        let created = kube_apply_meter(k, &def, false).await?;
        return Ok((StatusCode::CREATED, Json(created)).into_response());
    }
    let store = state.store()?;
    let body = serde_json::to_vec(&def).map_err(ApiError::internal)?;
    match store
        .meters
        .create(keys::meter_key(&def.id), body.into())
        .await
    {
        Ok(_) => Ok((StatusCode::CREATED, Json(def)).into_response()),
        Err(e) if e.kind() == async_nats::jetstream::kv::CreateErrorKind::AlreadyExists => {
            match load_meter(store, &def.id).await? {
                Some(existing) if existing == def => {
                    Ok((StatusCode::OK, Json(def)).into_response())
                }
                _ => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    format!("id: meter {:?} already exists", def.id),
                )),
            }
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

async fn list_meters(State(state): State<AppState>) -> ApiResult<Json<Vec<MeterDef>>> {
    Ok(Json(all_meters(state.store()?).await?))
}

#[derive(Deserialize)]
struct KeyQuery {
    key: Option<String>,
}

fn required_key(q: KeyQuery) -> ApiResult<String> {
    q.key
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::bad_request("key: is required"))
}

async fn get_meter(state: &AppState, id: &str) -> ApiResult<Json<MeterDef>> {
    let id = &state.resolve_id(id);
    load_meter(state.store()?, id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("key: no meter {id:?}")))
}

async fn delete_meter(state: &AppState, id: &str) -> ApiResult<()> {
    let id = &state.resolve_id(id);
    if let Some(k) = &state.0.kube {
        let (ns, name) = id
            .split_once('/')
            .unwrap_or((k.namespace.as_str(), id.as_str()));
        let api: kube::Api<crate::crd::Meter> = kube::Api::namespaced(k.client.clone(), ns);
        api.delete(name, &Default::default())
            .await
            .map_err(kube_error)?;
        return Ok(());
    }
    let store = state.store()?;
    if load_meter(store, id).await?.is_none() {
        return Err(ApiError::not_found(format!("key: no meter {id:?}")));
    }
    store
        .meters
        .delete(keys::meter_key(id))
        .await
        .map_err(ApiError::internal)?;
    Ok(())
}

async fn put_meter(
    state: &AppState,
    id: &str,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let mut value = parse_json_body(body)?;
    if let Some(obj) = value.as_object_mut() {
        match obj.get("id") {
            Some(Value::String(given)) if given != id => {
                return Err(ApiError::bad_request(format!(
                    "id: {given:?} does not match the path"
                )))
            }
            _ => {}
        }
        obj.insert("id".into(), Value::String(id.to_string()));
    }
    if let Some(k) = &state.0.kube {
        let (ns, name) = id.split_once('/').unwrap_or((k.namespace.as_str(), id));
        if let Some(obj) = value.as_object_mut() {
            obj.insert("id".into(), Value::String(name.to_string()));
        }
        let def = parse_meter_json(&value, None)?;
        let def = MeterDef {
            id: format!("{ns}/{name}"),
            ..def
        };
        let api: kube::Api<crate::crd::Meter> = kube::Api::namespaced(k.client.clone(), ns);
        let existed = api.get_opt(name).await.map_err(kube_error)?.is_some();
        let applied = kube_apply_meter(k, &def, true).await?;
        return Ok((put_status(existed), Json(applied)).into_response());
    }
    let def = parse_meter_json(&value, None)?;
    let store = state.store()?;
    let existed = load_meter(store, &def.id).await?.is_some();
    save_meter(store, &def).await?;
    Ok((put_status(existed), Json(def)).into_response())
}

/// PUT replaces (200) or creates (201).
fn put_status(existed: bool) -> StatusCode {
    if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    }
}

async fn get_meter_seed(
    State(state): State<AppState>,
    Query(q): Query<KeyQuery>,
) -> ApiResult<Json<MeterDef>> {
    get_meter(&state, &required_key(q)?).await
}
async fn delete_meter_seed(
    State(state): State<AppState>,
    Query(q): Query<KeyQuery>,
) -> ApiResult<Response> {
    delete_meter(&state, &required_key(q)?).await?;
    Ok(ok_status(StatusCode::ACCEPTED))
}
async fn get_meter_v1(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<MeterDef>> {
    get_meter(&state, &id).await
}
async fn get_meter_v1_ns(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<Json<MeterDef>> {
    get_meter(&state, &format!("{ns}/{name}")).await
}
async fn put_meter_v1(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    put_meter(&state, &id, body).await
}
async fn put_meter_v1_ns(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    put_meter(&state, &format!("{ns}/{name}"), body).await
}
async fn delete_meter_v1(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    delete_meter(&state, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
async fn delete_meter_v1_ns(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    delete_meter(&state, &format!("{ns}/{name}")).await?;
    Ok(StatusCode::NO_CONTENT)
}

// ---- readings ----

/// All-time reading of one meter.
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
    let key = ReadingKey::Summary {
        meter: def.id.as_str().into(),
    }
    .kv_key();
    let summary: Reading = match store.readings.get(key).await.map_err(ApiError::internal)? {
        Some(raw) => serde_json::from_slice(&raw).map_err(ApiError::internal)?,
        None => Reading::default(),
    };
    let progress = store
        .state
        .get(keys::progress_key(&def.id))
        .await
        .map_err(ApiError::internal)?;
    let ready = progress
        .and_then(|raw| serde_json::from_slice::<crate::aggregator::Progress>(&raw).ok())
        .is_some_and(|p| p.complete && p.hash == def.semantic_hash());
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
    let filter = keys::subject_totals_filter(&def.id, subject);
    let items = store
        .scan(&store.readings, &filter)
        .await
        .map_err(ApiError::internal)?;
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Some(subject) = item.key.split('.').nth(2).and_then(keys::untoken) else {
            continue;
        };
        let r: Reading = serde_json::from_slice(&item.value).map_err(ApiError::internal)?;
        out.push(SubjectReading {
            meter: def.id.clone(),
            subject,
            value: r.acc.value(def.aggregation).map(|d| d.to_string()),
            events: r.acc.count,
            last_event_time: r.last_event_time,
        });
    }
    out.sort_by(|a, b| a.subject.cmp(&b.subject));
    Ok(out)
}

async fn list_readings(State(state): State<AppState>) -> ApiResult<Json<Vec<MeterReading>>> {
    let store = state.store()?;
    let mut out = Vec::new();
    for def in all_meters(store).await? {
        out.push(meter_reading(store, &def, false).await?);
    }
    Ok(Json(out))
}

async fn get_reading_seed(
    State(state): State<AppState>,
    Query(q): Query<KeyQuery>,
) -> ApiResult<Json<MeterReading>> {
    let id = state.resolve_id(&required_key(q)?);
    let store = state.store()?;
    let def = load_meter(store, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("key: no meter {id:?}")))?;
    Ok(Json(meter_reading(store, &def, true).await?))
}

#[derive(Deserialize)]
struct ReadingsQuery {
    meter: Option<String>,
    subject: Option<String>,
}

async fn readings_v1(
    State(state): State<AppState>,
    Query(q): Query<ReadingsQuery>,
) -> ApiResult<Json<Value>> {
    let store = state.store()?;
    let defs = match q.meter.as_deref().filter(|m| !m.is_empty()) {
        Some(id) => vec![load_meter(store, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("meter: no meter {id:?}")))?],
        None => all_meters(store).await?,
    };
    let mut data = Vec::new();
    for def in &defs {
        data.extend(
            subject_readings(store, def, q.subject.as_deref().filter(|s| !s.is_empty())).await?,
        );
    }
    Ok(Json(json!({"data": data})))
}

// ---- queries ----

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

async fn query_v1(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    run_query(&state, &id, pairs, &headers).await
}

async fn query_v1_ns(
    State(state): State<AppState>,
    Path((ns, name)): Path<(String, String)>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    run_query(&state, &format!("{ns}/{name}"), pairs, &headers).await
}

/// Subjects to answer for, with every group each has seen.
async fn query_subjects(
    store: &Store,
    def: &MeterDef,
    wanted: &[String],
) -> ApiResult<
    Vec<(
        String,
        std::collections::BTreeMap<String, crate::fold::SharedGroup>,
    )>,
> {
    let mut totals: Vec<(String, Reading)> = Vec::new();
    if wanted.is_empty() {
        let filter = keys::subject_totals_filter(&def.id, None);
        for item in store
            .scan(&store.readings, &filter)
            .await
            .map_err(ApiError::internal)?
        {
            if let Some(subject) = item.key.split('.').nth(2).and_then(keys::untoken) {
                totals.push((
                    subject,
                    serde_json::from_slice(&item.value).map_err(ApiError::internal)?,
                ));
            }
        }
    } else {
        for subject in wanted {
            let key = ReadingKey::SubjectTotal {
                meter: def.id.as_str().into(),
                subject: subject.as_str().into(),
            }
            .kv_key();
            if let Some(raw) = store.readings.get(key).await.map_err(ApiError::internal)? {
                totals.push((
                    subject.clone(),
                    serde_json::from_slice(&raw).map_err(ApiError::internal)?,
                ));
            }
        }
    }
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

async fn run_query(
    state: &AppState,
    id: &str,
    pairs: Vec<(String, String)>,
    headers: &HeaderMap,
) -> ApiResult<Response> {
    use crate::query;
    use futures::{StreamExt, TryStreamExt};
    use std::collections::BTreeMap;
    let id = state.resolve_id(id);
    let store = state.store()?;
    let def = load_meter(store, &id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("id: no meter {id:?}")))?;
    let p = query::parse_query(&pairs, &def, Utc::now())?;
    let windows = query::output_windows(&p).ok_or_else(|| {
        ApiError::bad_request(format!(
            "windowSize: more than {} windows between from and to; narrow the range or use a coarser windowSize",
            query::MAX_WINDOWS
        ))
    })?;
    let mut covers = Vec::with_capacity(windows.len());
    for (a, b) in &windows {
        let chunks = query::cover(a.timestamp(), b.timestamp(), def.window_size).map_err(|t| {
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
        })?;
        covers.push(chunks);
    }
    let t0 = std::time::Instant::now();
    let mut chunk_list: Vec<(Option<keys::Rollup>, i64)> =
        covers.iter().flatten().copied().collect();
    chunk_list.sort();
    chunk_list.dedup();
    // Every subject over few stored windows: one snapshot read per stored window (all
    // subjects and groups at once) is far cheaper than a get per subject, and runs
    // beside the read of the subject list.
    let scan_mode = p.subjects.is_empty() && chunk_list.len() <= 64;
    let scan_all = async {
        if !scan_mode {
            return Ok(Vec::new());
        }
        futures::stream::iter(chunk_list.clone())
            .map(|(rollup, start)| {
                let filter = keys::window_filter(&def.id, rollup, start);
                async move {
                    store
                        .scan(&store.readings, &filter)
                        .await
                        .map_err(ApiError::internal)
                }
            })
            .buffer_unordered(8)
            .try_collect::<Vec<Vec<crate::store::KvItem>>>()
            .await
    };
    let (subjects, scans) = futures::try_join!(query_subjects(store, &def, &p.subjects), scan_all)?;
    let t_subjects = t0.elapsed();
    // refuse before building anything too large to answer
    let chunks: usize = covers.iter().map(Vec::len).sum();
    let groups: usize = subjects.iter().map(|(_, g)| g.len()).sum();
    if chunks.saturating_mul(groups) > QUERY_KEY_LIMIT {
        return Err(ApiError::bad_request(format!(
            "windowSize: the query would read more than {QUERY_KEY_LIMIT} stored windows; narrow from/to or use a coarser windowSize"
        )));
    }
    // (window, subject, projected group) for every stored window to read
    let mut plan: Vec<(usize, String, BTreeMap<String, Value>, String)> = Vec::new();
    for (wi, chunks) in covers.iter().enumerate() {
        for (subject, groups) in &subjects {
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
            return Err(ApiError::bad_request(format!(
                "windowSize: the query would read more than {QUERY_KEY_LIMIT} stored windows; narrow from/to or use a coarser windowSize"
            )));
        }
    }
    let readings = store.readings.clone();
    let fetched: Vec<Fetched> = if scan_mode {
        let mut found: std::collections::HashMap<String, bytes::Bytes> =
            std::collections::HashMap::new();
        for item in scans.into_iter().flatten() {
            found.insert(item.key, item.value);
        }
        let mut out = Vec::with_capacity(plan.len());
        for (wi, subject, projected, key) in plan {
            let r = match found.get(&key) {
                Some(raw) => {
                    Some(serde_json::from_slice::<Reading>(raw).map_err(ApiError::internal)?)
                }
                None => None,
            };
            out.push((wi, subject, projected, r));
        }
        out
    } else {
        futures::stream::iter(plan)
            .map(|(wi, subject, projected, key)| {
                let readings = readings.clone();
                async move {
                    let r = match readings.get(key).await.map_err(ApiError::internal)? {
                        Some(raw) => Some(
                            serde_json::from_slice::<Reading>(&raw).map_err(ApiError::internal)?,
                        ),
                        None => None,
                    };
                    Ok::<_, ApiError>((wi, subject, projected, r))
                }
            })
            .buffer_unordered(QUERY_PIPELINE)
            .try_collect()
            .await?
    };
    let mut merged: query::Merged = BTreeMap::new();
    for (wi, subject, projected, reading) in fetched {
        let Some(reading) = reading else { continue };
        let gkey = serde_json::to_string(&projected).unwrap_or_default();
        merged
            .entry((wi, subject, gkey))
            .or_insert_with(|| (projected, crate::fold::Acc::default()))
            .1
            .merge(&reading.acc);
    }
    let rows = query::rows(&windows, merged, &def);
    tracing::debug!(
        subjects_ms = t_subjects.as_millis() as u64,
        total_ms = t0.elapsed().as_millis() as u64,
        rows = rows.len(),
        "query"
    );
    let answer_zone = p.tz.name().to_string();
    let wants_csv = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("text/csv"));
    if wants_csv {
        return Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            query::to_csv(&rows, &p.group_by),
        )
            .into_response());
    }
    Ok(Json(query::Answer {
        window_size: p.window,
        window_time_zone: answer_zone,
        from: query::rfc3339(p.from),
        to: query::rfc3339(p.to),
        data: rows,
    })
    .into_response())
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn token_comparison() {
        assert!(token_matches(b"secret", b"secret"));
        assert!(!token_matches(b"secreT", b"secret"));
        assert!(!token_matches(b"secret1", b"secret"));
        assert!(!token_matches(b"", b"secret"));
    }
}
