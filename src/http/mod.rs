//! The HTTP API: the seed endpoints (compatible with the original KloudMeter), the
//! versioned `/api/v1` endpoints, health and metrics. [`routes`] is the one table of what
//! is served; the router and [`openapi`] are built from it. Handlers validate with
//! [`crate::domain`] and call [`crate::nats`] or [`crate::ingest`]; nothing here
//! aggregates. Every error answer is an [`ApiError`].
//!
//! - [`events`]: ingestion endpoints.
//! - [`meters`]: meter definitions, standalone (NATS KV) or as Meter resources.
//! - [`readings`]: all-time readings per meter and subject.
//! - [`query`]: usage over time windows.
//! - [`ops`]: health, readiness, metrics, the description.
//! - [`server`]: the listener, its timeouts and graceful shutdown.

mod events;
mod meters;
pub(crate) mod openapi;
mod ops;
pub(crate) mod query;
mod readings;
pub mod routes;
pub(crate) mod server;

use std::sync::{Arc, OnceLock};

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::access::{Caller, Denied, Gate, Permission};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::nats::registry::Registry;
use crate::nats::store::Store;
use crate::operator::api_meters::KubeMeters;

/// Largest request body accepted (CONTRACT §3).
pub const BODY_LIMIT: usize = 1 << 20;

#[derive(Clone)]
pub(crate) struct AppState(Arc<Inner>);

struct Inner {
    store: OnceLock<Store>,
    registry: Registry,
    metrics: Metrics,
    cfg: Config,
    inflight: Semaphore,
    kube: Option<KubeMeters>,
    kube_synced: tokio::sync::watch::Receiver<bool>,
    /// Who may call the `/api` routes.
    gate: Gate,
    /// `/openapi.json`, generated once from the route table.
    description: Value,
}

impl AppState {
    pub fn new(
        cfg: Config,
        registry: Registry,
        metrics: Metrics,
        kube: Option<KubeMeters>,
        kube_synced: tokio::sync::watch::Receiver<bool>,
        gate: Gate,
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
            gate,
            description: openapi::document(),
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
    /// Ok when `caller` holds `permission` (always, unless AUTH_MODE is kubernetes).
    async fn authorize(&self, caller: &Caller, permission: Permission) -> ApiResult<()> {
        Ok(self.0.gate.authorize(caller, permission).await?)
    }
    /// Whether `caller` holds `permission`: what lists show.
    async fn allowed(&self, caller: &Caller, permission: &Permission) -> ApiResult<bool> {
        Ok(self.0.gate.allowed(caller, permission).await?)
    }
    /// The meters among `defs` the caller may list: those of the namespaces (cluster-wide
    /// for standalone meters) where it may `list meters`, one review per namespace.
    async fn visible(
        &self,
        caller: &Caller,
        mut defs: Vec<crate::domain::meter::MeterDef>,
    ) -> ApiResult<Vec<crate::domain::meter::MeterDef>> {
        let namespaces: std::collections::BTreeSet<Option<&str>> = defs
            .iter()
            .map(|d| Permission::namespace_of(&d.id))
            .collect();
        let mut shown = std::collections::BTreeSet::new();
        for ns in namespaces {
            if self.allowed(caller, &Permission::list_meters(ns)).await? {
                shown.insert(ns.map(str::to_string));
            }
        }
        defs.retain(|d| shown.contains(&Permission::namespace_of(&d.id).map(str::to_string)));
        Ok(defs)
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
    /// A bug or a corrupt record: 500 with a generic message, the details in the log.
    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "a stored record did not decode");
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
    }
    /// NATS or the Kubernetes API failed: 503, so clients retry. What failed goes to the
    /// log, never on the wire.
    fn storage(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "storage request failed");
        Self::unavailable("storage unavailable; retry shortly")
    }
}

impl From<Denied> for ApiError {
    fn from(e: Denied) -> Self {
        match e {
            Denied::Unauthenticated(_) => ApiError::new(StatusCode::UNAUTHORIZED, e.to_string()),
            Denied::Forbidden(_) => ApiError::new(StatusCode::FORBIDDEN, e.to_string()),
            Denied::Unavailable(_) => ApiError::storage(e),
        }
    }
}

impl From<crate::nats::meters::StoreError> for ApiError {
    fn from(e: crate::nats::meters::StoreError) -> Self {
        use crate::nats::meters::StoreError;
        match e {
            StoreError::Unavailable(_) => ApiError::storage(e),
            StoreError::Corrupt { .. } => ApiError::internal(e),
        }
    }
}

/// A stored record that does not decode (or a value that does not encode) is a bug or
/// corruption, not the caller's doing: 500 with a generic message, details in the log.
impl From<serde_json::Error> for ApiError {
    fn from(e: serde_json::Error) -> Self {
        ApiError::internal(e)
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
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
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

/// The server's routes, from [`routes::ROUTES`]: authenticated where the table says so,
/// JSON errors for unknown paths and methods, the body limit and the request timeout.
pub(crate) fn router(state: AppState) -> Router {
    let request_timeout = state.0.cfg.request_timeout;
    let mut by_path: std::collections::BTreeMap<&str, MethodRouter<AppState>> = Default::default();
    for r in routes::ROUTES {
        let mut handler = (r.handler)();
        if r.auth {
            handler =
                handler.route_layer(middleware::from_fn_with_state(state.clone(), authenticate));
        }
        let merged = match by_path.remove(r.path) {
            Some(existing) => existing.merge(handler),
            None => handler,
        };
        by_path.insert(r.path, merged);
    }
    by_path
        .into_iter()
        .fold(Router::new(), |router, (path, methods)| {
            router.route(path, methods)
        })
        .fallback(|| async { ApiError::not_found("path: no such endpoint") })
        .method_not_allowed_fallback(|req: Request| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("method: {} is not served on this path", req.method()),
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        // a span per request (method, path, status, latency) at debug level
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .layer(tower_http::timeout::TimeoutLayer::with_status_code(
            StatusCode::SERVICE_UNAVAILABLE,
            request_timeout,
        ))
        .with_state(state)
}

/// Who calls (AUTH_MODE): answered 401 here, or handed to the handler as a [`Caller`],
/// which asks for the permission its request needs.
async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match state.0.gate.authenticate(bearer).await {
        Ok(caller) => {
            req.extensions_mut().insert(caller);
            next.run(req).await
        }
        Err(denied) => ApiError::from(denied).into_response(),
    }
}

fn parse_json_body(body: Result<Bytes, BytesRejection>) -> ApiResult<Value> {
    let body = body_or_error(body)?;
    serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("body: invalid JSON: {e}")))
}
