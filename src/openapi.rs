//! The API's routes and their OpenAPI 3 description. The router is built from
//! [`ROUTES`] (see `api::router`), so no endpoint can be served without appearing in
//! `/openapi.json`; schemas come from the Rust types through schemars.

use schemars::{JsonSchema, SchemaGenerator};
use serde::Serialize;
use serde_json::{json, Map, Value};

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
    /// is checked). 503: NATS unavailable, ingestion at capacity or REQUEST_TIMEOUT.
    fn errors(self) -> &'static [&'static str] {
        match self {
            Shape::Health | Shape::Metrics | Shape::OpenApi => &[],
            // readiness answers 503 with its own body (see `operation`)
            Shape::Ready => &[],
            Shape::ListMeters | Shape::ListReadings => &["503"],
            Shape::RegisterEvent | Shape::PostEvents | Shape::CreateMeterSeed | Shape::PutMeter => {
                &["400", "413", "503"]
            }
            Shape::CreateMeter => &["400", "409", "413", "503"],
            Shape::GetMeter | Shape::DeleteMeter | Shape::Readings => &["404", "503"],
            Shape::GetMeterSeed | Shape::DeleteMeterSeed | Shape::GetReadingSeed | Shape::Query => {
                &["400", "404", "503"]
            }
        }
    }
}

pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    pub shape: Shape,
}

const fn r(method: &'static str, path: &'static str, summary: &'static str, shape: Shape) -> Route {
    Route {
        method,
        path,
        summary,
        shape,
    }
}

/// Every route the server serves.
pub const ROUTES: &[Route] = &[
    r("get", "/healthz", "Liveness", Shape::Health),
    r("get", "/healthy", "Liveness (seed name)", Shape::Health),
    r(
        "get",
        "/readyz",
        "Readiness: NATS connected, meters loaded, Kubernetes synced",
        Shape::Ready,
    ),
    r("get", "/metrics", "Prometheus metrics", Shape::Metrics),
    r("get", "/openapi.json", "This description", Shape::OpenApi),
    r(
        "post",
        "/api/register-event",
        "Ingest one event (seed)",
        Shape::RegisterEvent,
    ),
    r(
        "post",
        "/api/create-meter",
        "Create or replace a meter (seed)",
        Shape::CreateMeterSeed,
    ),
    r(
        "get",
        "/api/meters",
        "List meters (seed)",
        Shape::ListMeters,
    ),
    r(
        "get",
        "/api/meter",
        "Get a meter by key (seed)",
        Shape::GetMeterSeed,
    ),
    r(
        "delete",
        "/api/meter",
        "Delete a meter by key (seed)",
        Shape::DeleteMeterSeed,
    ),
    r(
        "get",
        "/api/meter/",
        "Get a meter by key (seed)",
        Shape::GetMeterSeed,
    ),
    r(
        "delete",
        "/api/meter/",
        "Delete a meter by key (seed)",
        Shape::DeleteMeterSeed,
    ),
    r(
        "get",
        "/api/readings",
        "All meters' all-time readings (seed)",
        Shape::ListReadings,
    ),
    r(
        "get",
        "/api/reading",
        "One meter's reading with a row per subject (seed)",
        Shape::GetReadingSeed,
    ),
    r(
        "get",
        "/api/reading/",
        "One meter's reading with a row per subject (seed)",
        Shape::GetReadingSeed,
    ),
    r(
        "post",
        "/api/v1/events",
        "Ingest one event or a batch (seed shape or CloudEvents)",
        Shape::PostEvents,
    ),
    r("get", "/api/v1/meters", "List meters", Shape::ListMeters),
    r(
        "post",
        "/api/v1/meters",
        "Create a meter",
        Shape::CreateMeter,
    ),
    r("get", "/api/v1/meters/{id}", "Get a meter", Shape::GetMeter),
    r(
        "put",
        "/api/v1/meters/{id}",
        "Create or replace a meter",
        Shape::PutMeter,
    ),
    r(
        "delete",
        "/api/v1/meters/{id}",
        "Delete a meter",
        Shape::DeleteMeter,
    ),
    r(
        "get",
        "/api/v1/meters/{namespace}/{name}",
        "Get a Meter resource's meter",
        Shape::GetMeter,
    ),
    r(
        "put",
        "/api/v1/meters/{namespace}/{name}",
        "Create or replace a Meter resource's meter",
        Shape::PutMeter,
    ),
    r(
        "delete",
        "/api/v1/meters/{namespace}/{name}",
        "Delete a Meter resource",
        Shape::DeleteMeter,
    ),
    r(
        "get",
        "/api/v1/meters/{id}/query",
        "Query usage",
        Shape::Query,
    ),
    r(
        "get",
        "/api/v1/meters/{namespace}/{name}/query",
        "Query a Meter resource's usage",
        Shape::Query,
    ),
    r(
        "get",
        "/api/v1/readings",
        "All-time readings per subject",
        Shape::Readings,
    ),
];

/// Body of every error answer.
#[derive(Serialize, JsonSchema)]
pub struct ErrorBody {
    /// Always `error`.
    pub status: String,
    /// `<field>: <what is wrong>`.
    pub message: String,
}

/// Body of the seed endpoints' success answers.
#[derive(Serialize, JsonSchema)]
pub struct OkBody {
    /// Always `ok`.
    pub status: String,
}

#[derive(Serialize, JsonSchema)]
pub struct Accepted {
    /// Events stored.
    pub accepted: u64,
}

#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Readiness {
    pub nats: bool,
    pub meters_synced: bool,
    pub kubernetes_synced: bool,
}

/// A usage event in the seed shape (CloudEvents 1.0 are accepted too: `type` for
/// eventType, with `specversion` and an optional `source`).
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventBody {
    /// 1-256 characters; repeats within DEDUP_WINDOW count once.
    pub id: String,
    /// 1-256 characters.
    pub event_type: String,
    /// 1-256 characters of `[A-Za-z0-9_.:@-]`.
    pub subject: String,
    /// RFC 3339; default: receipt time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// With `source`, the dedup key is source + id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Map<String, Value>>,
}

/// A meter definition as a request body (POST and PUT). Unknown fields are refused
/// (400 naming the field), so a typo cannot silently define another meter.
#[derive(Serialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeterInput {
    /// 1-253 characters of [A-Za-z0-9_.-]; required by POST, taken from the path by PUT.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The eventType (CloudEvents `type`) of the events the meter aggregates.
    pub event_type: String,
    /// count, sum, avg, min, max, unique_count (alias unique) or latest; any case.
    pub aggregation: String,
    /// JSONPath starting with `$`; required for every aggregation but count.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_property: Option<String>,
    /// Group name to JSONPath.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_by: Option<std::collections::BTreeMap<String, String>>,
    /// MINUTE, HOUR (default) or DAY; any case.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub window_size: Option<String>,
}

#[derive(Serialize, JsonSchema)]
pub struct SubjectReadings {
    pub data: Vec<crate::api::SubjectReading>,
}

fn sch<T: JsonSchema>(g: &mut SchemaGenerator) -> Value {
    serde_json::to_value(g.subschema_for::<T>()).unwrap_or_default()
}

fn content(schema: Value) -> Value {
    json!({"application/json": {"schema": schema}})
}

fn error_responses(g: &mut SchemaGenerator, codes: &[&str]) -> Map<String, Value> {
    let err = sch::<ErrorBody>(g);
    codes
        .iter()
        .map(|c| {
            (
                c.to_string(),
                json!({"description": "error", "content": content(err.clone())}),
            )
        })
        .collect()
}

fn query_param(name: &str, required: bool, schema: Value, doc: &str) -> Value {
    json!({"name": name, "in": "query", "required": required, "schema": schema, "description": doc})
}

fn path_params(path: &str) -> Vec<Value> {
    path.split('/')
        .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
        .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
        .collect()
}

fn operation(g: &mut SchemaGenerator, route: &Route, with_auth: bool) -> Value {
    let mut params = path_params(route.path);
    let mut body = Value::Null;
    let (code, ok): (&str, Value) = match route.shape {
        Shape::Health => ("200", content(sch::<OkBody>(g))),
        Shape::Ready => ("200", content(sch::<Readiness>(g))),
        Shape::Metrics => ("200", json!({"text/plain": {"schema": {"type": "string"}}})),
        Shape::OpenApi => ("200", content(json!({"type": "object"}))),
        Shape::RegisterEvent | Shape::PostEvents => {
            let one = sch::<EventBody>(g);
            let many = json!({"type": "array", "items": one.clone(), "minItems": 1});
            let schema = if route.shape == Shape::PostEvents {
                json!({"oneOf": [one, many]})
            } else {
                one
            };
            body = json!({"required": true, "content": {
                "application/json": {"schema": schema},
                "application/cloudevents+json": {"schema": {"type": "object"}},
                "application/cloudevents-batch+json": {"schema": {"type": "array", "items": {"type": "object"}}},
            }});
            if route.shape == Shape::PostEvents {
                ("202", content(sch::<Accepted>(g)))
            } else {
                ("202", content(sch::<OkBody>(g)))
            }
        }
        Shape::CreateMeterSeed | Shape::CreateMeter | Shape::PutMeter => {
            let input = sch::<MeterInput>(g);
            let schema = if route.shape == Shape::PutMeter {
                input
            } else {
                json!({"allOf": [input], "required": ["id"]})
            };
            body = json!({"required": true, "content": content(schema)});
            match route.shape {
                Shape::CreateMeterSeed => ("202", content(sch::<OkBody>(g))),
                Shape::CreateMeter => ("201", content(sch::<crate::meter::MeterDef>(g))),
                _ => ("200", content(sch::<crate::meter::MeterDef>(g))),
            }
        }
        Shape::ListMeters => ("200", content(sch::<Vec<crate::meter::MeterDef>>(g))),
        Shape::GetMeterSeed | Shape::DeleteMeterSeed | Shape::GetReadingSeed => {
            params.push(query_param(
                "key",
                true,
                json!({"type": "string"}),
                "meter id",
            ));
            match route.shape {
                Shape::GetMeterSeed => ("200", content(sch::<crate::meter::MeterDef>(g))),
                Shape::DeleteMeterSeed => ("202", content(sch::<OkBody>(g))),
                _ => ("200", content(sch::<crate::api::MeterReading>(g))),
            }
        }
        Shape::GetMeter => ("200", content(sch::<crate::meter::MeterDef>(g))),
        Shape::DeleteMeter => ("204", Value::Null),
        Shape::ListReadings => ("200", content(sch::<Vec<crate::api::MeterReading>>(g))),
        Shape::Readings => {
            params.push(query_param(
                "meter",
                false,
                json!({"type": "string"}),
                "meter id",
            ));
            params.push(query_param(
                "subject",
                false,
                json!({"type": "string"}),
                "subject",
            ));
            ("200", content(sch::<SubjectReadings>(g)))
        }
        Shape::Query => {
            let t = json!({"type": "string", "format": "date-time"});
            params.push(query_param(
                "from",
                true,
                t.clone(),
                "start, inclusive (RFC 3339)",
            ));
            params.push(query_param(
                "to",
                false,
                t,
                "end, exclusive (RFC 3339; default now)",
            ));
            params.push(query_param(
                "windowSize",
                false,
                json!({"type": "string", "enum": ["MINUTE", "HOUR", "DAY", "MONTH"]}),
                "one row per window of this size",
            ));
            params.push(query_param(
                "windowTimeZone",
                false,
                json!({"type": "string"}),
                "IANA time zone (default UTC)",
            ));
            params.push(query_param(
                "subject",
                false,
                json!({"type": "array", "items": {"type": "string"}}),
                "repeatable",
            ));
            params.push(query_param(
                "groupBy",
                false,
                json!({"type": "array", "items": {"type": "string"}}),
                "repeatable",
            ));
            let mut filter = query_param(
                "filterGroupBy",
                false,
                json!({"type": "object", "additionalProperties": {"type": "string"}}),
                "filterGroupBy[<group key>]=<value> keeps the groups with that value (curl needs -g for the brackets)",
            );
            filter["style"] = json!("deepObject");
            filter["explode"] = json!(true);
            params.push(filter);
            let answer = sch::<crate::query::Answer>(g);
            (
                "200",
                json!({"application/json": {"schema": answer}, "text/csv": {"schema": {"type": "string"}}}),
            )
        }
    };
    let mut responses = error_responses(g, route.shape.errors());
    if with_auth {
        responses.extend(error_responses(g, &["401"]));
    }
    let mut ok_resp = json!({"description": "success"});
    if !ok.is_null() {
        ok_resp["content"] = ok;
    }
    // the other success a route can give: POST of an identical meter is 200, PUT of a
    // new one 201
    let also = match route.shape {
        Shape::CreateMeter => Some("200"),
        Shape::PutMeter => Some("201"),
        _ => None,
    };
    if let Some(also) = also {
        responses.insert(also.to_string(), ok_resp.clone());
    }
    if route.shape == Shape::Ready {
        responses.insert(
            "503".into(),
            json!({"description": "not ready", "content": content(sch::<Readiness>(g))}),
        );
    }
    responses.insert(code.to_string(), ok_resp);
    let mut op = json!({"summary": route.summary, "operationId": format!("{}{}", route.method, route.path.replace(['/', '{', '}', '-'], "_")), "parameters": params, "responses": responses});
    if !body.is_null() {
        op["requestBody"] = body;
    }
    if with_auth {
        op["security"] = json!([{"bearer": []}]);
    }
    op
}

/// The OpenAPI 3.1 document.
pub fn document() -> Value {
    let mut settings = schemars::generate::SchemaSettings::draft2020_12();
    settings.definitions_path = "/components/schemas".into();
    let mut g = settings.into_generator();
    let mut paths = Map::new();
    for route in ROUTES {
        let with_auth = route.path.starts_with("/api/");
        let op = operation(&mut g, route, with_auth);
        let item = paths
            .entry(route.path.to_string())
            .or_insert_with(|| json!({}));
        item[route.method] = op;
    }
    let schemas: Map<String, Value> = g.take_definitions(true).into_iter().collect();
    json!({
        "openapi": "3.1.0",
        "info": {"title": "KloudMeter", "version": env!("CARGO_PKG_VERSION"),
                 "description": "Exact usage metering on NATS JetStream. Errors are {\"status\":\"error\",\"message\":\"<field>: <what is wrong>\"}."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "required on /api/** when API_TOKEN is set"}},
        },
    })
}
