//! The one table of what the server serves: each route's method, path, summary, the
//! shape of what it takes and answers (for `/openapi.json`), whether it needs the API
//! token, and its handler. [`super::router`] and [`super::openapi::document`] are both
//! built from it, so they cannot disagree; the description is handed to its handler
//! through the state, so nothing here depends on the description.

use axum::routing::{delete, get, post, put, MethodRouter};

use super::{events, meters, ops, query, readings, AppState};

/// What a route takes and gives, for the description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    Health,
    Ready,
    Metrics,
    OpenApi,
    RegisterEvent,
    PostEvents,
    CreateMeterSeed,
    CreateMeter,
    ListMeters,
    GetMeterSeed,
    DeleteMeterSeed,
    GetMeter,
    PutMeter,
    DeleteMeter,
    ListReadings,
    GetReadingSeed,
    Readings,
    Query,
}

impl Shape {
    /// The error statuses a route of this shape answers (401 is added where a token
    /// is checked). 503: NATS unavailable, ingestion at capacity or REQUEST_TIMEOUT; 500:
    /// a stored record that does not decode (a bug or corruption, never the caller's).
    pub(super) fn errors(self) -> &'static [&'static str] {
        match self {
            Shape::Health | Shape::Metrics | Shape::OpenApi => &[],
            // readiness answers 503 with its own body (see `openapi::operation`)
            Shape::Ready => &[],
            Shape::ListMeters => &["500", "503"],
            Shape::ListReadings => &["400", "500", "503"],
            Shape::RegisterEvent | Shape::PostEvents => &["400", "413", "503"],
            Shape::CreateMeterSeed | Shape::PutMeter => &["400", "413", "500", "503"],
            Shape::CreateMeter => &["400", "409", "413", "500", "503"],
            Shape::GetMeter | Shape::DeleteMeter | Shape::Readings => &["404", "500", "503"],
            Shape::GetMeterSeed | Shape::DeleteMeterSeed | Shape::GetReadingSeed | Shape::Query => {
                &["400", "404", "500", "503"]
            }
        }
    }
}

pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub shape: Shape,
    /// Guarded by the API token (every `/api/**` route).
    pub auth: bool,
    pub(super) handler: fn() -> MethodRouter<AppState>,
}

const fn open(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    shape: Shape,
    handler: fn() -> MethodRouter<AppState>,
) -> Route {
    Route {
        method,
        path,
        summary,
        shape,
        auth: false,
        handler,
    }
}

const fn api(
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    shape: Shape,
    handler: fn() -> MethodRouter<AppState>,
) -> Route {
    Route {
        auth: true,
        ..open(method, path, summary, shape, handler)
    }
}

/// Every route the server serves.
pub const ROUTES: &[Route] = &[
    open("get", "/healthz", "Liveness", Shape::Health, || {
        get(ops::alive)
    }),
    open(
        "get",
        "/healthy",
        "Liveness (seed name)",
        Shape::Health,
        || get(ops::alive),
    ),
    open(
        "get",
        "/readyz",
        "Readiness: NATS connected, meters loaded, Kubernetes synced",
        Shape::Ready,
        || get(ops::readyz),
    ),
    open(
        "get",
        "/metrics",
        "Prometheus metrics",
        Shape::Metrics,
        || get(ops::metrics),
    ),
    open(
        "get",
        "/openapi.json",
        "This description",
        Shape::OpenApi,
        || get(ops::openapi),
    ),
    api(
        "post",
        "/api/register-event",
        "Ingest one event (seed)",
        Shape::RegisterEvent,
        || post(events::register_event),
    ),
    api(
        "post",
        "/api/create-meter",
        "Create or replace a meter (seed)",
        Shape::CreateMeterSeed,
        || post(meters::create_seed),
    ),
    api(
        "get",
        "/api/meters",
        "List meters (seed)",
        Shape::ListMeters,
        || get(meters::list),
    ),
    api(
        "get",
        "/api/meter",
        "Get a meter by key (seed)",
        Shape::GetMeterSeed,
        || get(meters::get_seed),
    ),
    api(
        "delete",
        "/api/meter",
        "Delete a meter by key (seed)",
        Shape::DeleteMeterSeed,
        || delete(meters::delete_seed),
    ),
    api(
        "get",
        "/api/meter/",
        "Get a meter by key (seed)",
        Shape::GetMeterSeed,
        || get(meters::get_seed),
    ),
    api(
        "delete",
        "/api/meter/",
        "Delete a meter by key (seed)",
        Shape::DeleteMeterSeed,
        || delete(meters::delete_seed),
    ),
    api(
        "get",
        "/api/readings",
        "All meters' all-time readings, each followed by its subjects' (seed)",
        Shape::ListReadings,
        || get(readings::list),
    ),
    api(
        "get",
        "/api/reading",
        "One meter's reading with a row per subject, or one subject's by reading key (seed)",
        Shape::GetReadingSeed,
        || get(readings::get_seed),
    ),
    api(
        "get",
        "/api/reading/",
        "One meter's reading with a row per subject, or one subject's by reading key (seed)",
        Shape::GetReadingSeed,
        || get(readings::get_seed),
    ),
    api(
        "post",
        "/api/v1/events",
        "Ingest one event or a batch (seed shape or CloudEvents)",
        Shape::PostEvents,
        || post(events::post_events),
    ),
    api(
        "get",
        "/api/v1/meters",
        "List meters",
        Shape::ListMeters,
        || get(meters::list),
    ),
    api(
        "post",
        "/api/v1/meters",
        "Create a meter",
        Shape::CreateMeter,
        || post(meters::create_v1),
    ),
    api(
        "get",
        "/api/v1/meters/{id}",
        "Get a meter",
        Shape::GetMeter,
        || get(meters::get_v1),
    ),
    api(
        "put",
        "/api/v1/meters/{id}",
        "Create or replace a meter",
        Shape::PutMeter,
        || put(meters::put_v1),
    ),
    api(
        "delete",
        "/api/v1/meters/{id}",
        "Delete a meter",
        Shape::DeleteMeter,
        || delete(meters::delete_v1),
    ),
    api(
        "get",
        "/api/v1/meters/{namespace}/{name}",
        "Get a Meter resource's meter",
        Shape::GetMeter,
        || get(meters::get_v1_ns),
    ),
    api(
        "put",
        "/api/v1/meters/{namespace}/{name}",
        "Create or replace a Meter resource's meter",
        Shape::PutMeter,
        || put(meters::put_v1_ns),
    ),
    api(
        "delete",
        "/api/v1/meters/{namespace}/{name}",
        "Delete a Meter resource",
        Shape::DeleteMeter,
        || delete(meters::delete_v1_ns),
    ),
    api(
        "get",
        "/api/v1/meters/{id}/query",
        "Query usage",
        Shape::Query,
        || get(query::query_v1),
    ),
    api(
        "get",
        "/api/v1/meters/{namespace}/{name}/query",
        "Query a Meter resource's usage",
        Shape::Query,
        || get(query::query_v1_ns),
    ),
    api(
        "get",
        "/api/v1/readings",
        "All-time readings per subject",
        Shape::Readings,
        || get(readings::readings_v1),
    ),
];
