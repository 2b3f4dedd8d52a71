//! The OpenAPI 3.1 description, generated from the same route table the router is built
//! from ([`super::routes`]), so no endpoint can be served without appearing in
//! `/openapi.json`; schemas come from the Rust types through schemars.

use schemars::{JsonSchema, SchemaGenerator};
use serde::Serialize;
use serde_json::{json, Map, Value};

use super::routes::{Route, Shape};

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
    /// JSONPath into `data` to one condition (`{"eq": v}`, `ne`, `in`, `nin`, `gt`, `gte`,
    /// `lt`, `lte`, `exists`); only events meeting all of them are counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filter: Option<std::collections::BTreeMap<String, Value>>,
    /// Levels per subject and period that notify once each when reached.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thresholds: Option<Vec<crate::domain::threshold::Threshold>>,
    /// `{"topSubjects": N}` (1-100): the N highest subjects also on `/metrics`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub export: Option<crate::domain::meter::Export>,
    /// Stop aggregating until set back to false (events count once it resumes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suspend: Option<bool>,
}

#[derive(Serialize, JsonSchema)]
pub struct SubjectReadings {
    pub data: Vec<super::readings::SubjectReading>,
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

/// The query-string parameters of a route.
fn query_params(shape: Shape) -> Vec<Value> {
    let string = json!({"type": "string"});
    let repeated = json!({"type": "array", "items": {"type": "string"}});
    match shape {
        Shape::GetMeterSeed | Shape::DeleteMeterSeed => {
            vec![query_param("key", true, string, "meter id")]
        }
        Shape::GetReadingSeed => vec![query_param(
            "key",
            true,
            string,
            "meter id, or a subject's reading key <eventType>.<aggregation>.<meterId>.<subject>",
        )],
        Shape::ListReadings => vec![
            query_param(
                "limit",
                false,
                json!({"type": "integer", "minimum": 1, "maximum": 10000}),
                "most entries in the answer; the Kloudmeter-Next-Cursor header then gives the next page's cursor",
            ),
            query_param("cursor", false, string, "from Kloudmeter-Next-Cursor"),
        ],
        Shape::Readings => vec![
            query_param("meter", false, string.clone(), "meter id"),
            query_param("subject", false, string, "subject"),
        ],
        Shape::Query => {
            let t = json!({"type": "string", "format": "date-time"});
            let mut filter = query_param(
                "filterGroupBy",
                false,
                json!({"type": "object", "additionalProperties": {"type": "string"}}),
                "filterGroupBy[<group key>]=<value> keeps the groups with that value; with an operator, filterGroupBy[<key>][eq|ne]=<value> or filterGroupBy[<key>][in|nin]=<a>,<b>; all must hold (curl needs -g for the brackets)",
            );
            filter["style"] = json!("deepObject");
            filter["explode"] = json!(true);
            vec![
                query_param("from", true, t.clone(), "start, inclusive (RFC 3339)"),
                query_param(
                    "to",
                    false,
                    t,
                    "end, exclusive (RFC 3339; default now, rounded up to the meter's window)",
                ),
                query_param(
                    "windowSize",
                    false,
                    json!({"type": "string", "enum": ["MINUTE", "HOUR", "DAY", "MONTH"]}),
                    "one row per window of this size",
                ),
                query_param(
                    "windowTimeZone",
                    false,
                    string.clone(),
                    "IANA time zone whose midnights DAY and MONTH windows start at (default UTC); boundaries must fall on the meter's windows, for HOUR meters on any quarter hour, so MINUTE and HOUR meters answer every zone in use",
                ),
                query_param("subject", false, repeated.clone(), "repeatable"),
                query_param(
                    "groupBy",
                    false,
                    repeated,
                    "repeatable: group keys of the meter; `subject` is accepted (rows are per subject)",
                ),
                filter,
                query_param(
                    "limit",
                    false,
                    json!({"type": "integer", "minimum": 1, "maximum": 10000}),
                    "one page of at most this many subjects, in subject order; nextCursor (and the Kloudmeter-Next-Cursor header) gives the next page's cursor. Without it, an all-subject CSV answer is streamed",
                ),
                query_param("cursor", false, string, "the nextCursor of the previous page (needs limit)"),
            ]
        }
        _ => Vec::new(),
    }
}

/// The request body a route takes, if any.
fn request_body(g: &mut SchemaGenerator, shape: Shape) -> Option<Value> {
    match shape {
        Shape::RegisterEvent | Shape::PostEvents => {
            let one = sch::<EventBody>(g);
            let schema = if shape == Shape::PostEvents {
                let many = json!({"type": "array", "items": one.clone(), "minItems": 1});
                json!({"oneOf": [one, many]})
            } else {
                one
            };
            Some(json!({"required": true, "content": {
                "application/json": {"schema": schema},
                "application/cloudevents+json": {"schema": {"type": "object"}},
                "application/cloudevents-batch+json": {"schema": {"type": "array", "items": {"type": "object"}}},
            }}))
        }
        Shape::CreateMeterSeed | Shape::CreateMeter | Shape::PutMeter => {
            let input = sch::<MeterInput>(g);
            let schema = if shape == Shape::PutMeter {
                input
            } else {
                json!({"allOf": [input], "required": ["id"]})
            };
            Some(json!({"required": true, "content": content(schema)}))
        }
        _ => None,
    }
}

/// A route's success status and content (`Null`: no body).
fn success(g: &mut SchemaGenerator, shape: Shape) -> (&'static str, Value) {
    use super::readings::MeterReading;
    use crate::domain::meter::MeterDef;
    match shape {
        Shape::Health => ("200", content(sch::<OkBody>(g))),
        Shape::Ready => ("200", content(sch::<Readiness>(g))),
        Shape::Metrics => ("200", json!({"text/plain": {"schema": {"type": "string"}}})),
        Shape::OpenApi => ("200", content(json!({"type": "object"}))),
        Shape::RegisterEvent | Shape::CreateMeterSeed => ("202", content(sch::<OkBody>(g))),
        Shape::DeleteMeterSeed => ("202", content(sch::<OkBody>(g))),
        Shape::PostEvents => ("202", content(sch::<Accepted>(g))),
        Shape::CreateMeter => ("201", content(sch::<MeterDef>(g))),
        Shape::PutMeter | Shape::GetMeter | Shape::GetMeterSeed => {
            ("200", content(sch::<MeterDef>(g)))
        }
        Shape::ListMeters => ("200", content(sch::<Vec<MeterDef>>(g))),
        Shape::DeleteMeter => ("204", Value::Null),
        Shape::GetReadingSeed => {
            let one =
                json!({"anyOf": [sch::<MeterReading>(g), sch::<super::readings::SeedReading>(g)]});
            ("200", content(one))
        }
        Shape::ListReadings => ("200", content(sch::<Vec<super::readings::ReadingEntry>>(g))),
        Shape::Readings => ("200", content(sch::<SubjectReadings>(g))),
        Shape::Query => {
            let answer = sch::<crate::domain::query::Answer>(g);
            (
                "200",
                json!({"application/json": {"schema": answer}, "text/csv": {"schema": {"type": "string"}}}),
            )
        }
    }
}

/// Every answer a route gives: its successes and the errors its shape can answer.
fn responses(g: &mut SchemaGenerator, route: &Route) -> Map<String, Value> {
    let mut responses = error_responses(g, route.shape.errors());
    if route.auth {
        let err = sch::<ErrorBody>(g);
        responses.insert(
            "401".into(),
            json!({"description": "no bearer token, or one not valid (AUTH_MODE token: not API_TOKEN; kubernetes: not a Kubernetes token for AUTH_AUDIENCE)", "content": content(err.clone())}),
        );
        // lists show only what the caller may list; every other route asks for one
        // permission and names it when it is missing
        if !matches!(route.shape, Shape::ListMeters | Shape::ListReadings) {
            responses.insert(
                "403".into(),
                json!({"description": "AUTH_MODE kubernetes: the caller lacks the permission the message names (e.g. `create events.kloudmeter.io in namespace team-a`)", "content": content(err)}),
            );
        }
    }
    let (code, ok) = success(g, route.shape);
    let mut ok_resp = json!({"description": "success"});
    if !ok.is_null() {
        ok_resp["content"] = ok;
    }
    // the other success a route can give: POST of an identical meter is 200, PUT of a
    // new one 201
    match route.shape {
        Shape::CreateMeter => _ = responses.insert("200".into(), ok_resp.clone()),
        Shape::PutMeter => _ = responses.insert("201".into(), ok_resp.clone()),
        Shape::Ready => {
            let not_ready =
                json!({"description": "not ready", "content": content(sch::<Readiness>(g))});
            responses.insert("503".into(), not_ready);
        }
        _ => {}
    }
    responses.insert(code.to_string(), ok_resp);
    responses
}

fn operation(g: &mut SchemaGenerator, route: &Route) -> Value {
    let mut params = path_params(route.path);
    params.extend(query_params(route.shape));
    let id = format!(
        "{}{}",
        route.method,
        route.path.replace(['/', '{', '}', '-'], "_")
    );
    let mut op = json!({"summary": route.summary, "operationId": id, "parameters": params,
                        "responses": responses(g, route)});
    if let Some(body) = request_body(g, route.shape) {
        op["requestBody"] = body;
    }
    if route.auth {
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
    for route in super::routes::ROUTES {
        let op = operation(&mut g, route);
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
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "required on /api/** unless AUTH_MODE is none: API_TOKEN (AUTH_MODE token), or a Kubernetes token for the audience AUTH_AUDIENCE, typically a projected ServiceAccount token (AUTH_MODE kubernetes: authorized per request with a SubjectAccessReview on kloudmeter.io events and meters)"}},
        },
    })
}
