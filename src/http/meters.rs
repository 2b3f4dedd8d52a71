//! Meter definitions over the API: kept in NATS KV standalone, or as Meter resources in
//! operator mode (the resource is then the single source of truth).

use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use super::{ok_status, parse_json_body, ApiError, ApiResult, AppState};
use crate::operator::api_meters::{KubeMeterError, KubeMeters};

use crate::access::{Caller, Permission, Verb};
use crate::domain::meter::{parse_meter_json, MeterDef};
use crate::nats::store::Store;

impl From<KubeMeterError> for ApiError {
    fn from(e: KubeMeterError) -> Self {
        match e {
            KubeMeterError::NotFound(_) => ApiError::not_found(e.to_string()),
            KubeMeterError::Conflict(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            KubeMeterError::BadName | KubeMeterError::Invalid(_) => {
                ApiError::bad_request(e.to_string())
            }
            KubeMeterError::Unavailable(e) => ApiError::storage(e),
        }
    }
}

/// Where meters defined through the API live: NATS KV standalone, Meter resources in
/// operator mode. Reads always come from NATS (the controller copies resources there).
enum Backend<'a> {
    Nats(&'a Store),
    Kube(&'a KubeMeters),
}

impl AppState {
    fn meter_backend(&self) -> ApiResult<Backend<'_>> {
        match &self.0.kube {
            Some(k) => Ok(Backend::Kube(k)),
            None => self.store().map(Backend::Nats),
        }
    }
}

impl Backend<'_> {
    /// Create a meter: 201, 200 when the same definition already exists (NATS), 409
    /// when a different one does.
    async fn create(&self, def: MeterDef) -> ApiResult<(StatusCode, MeterDef)> {
        let store = match self {
            Backend::Kube(k) => return Ok((StatusCode::CREATED, k.create(&def).await?)),
            Backend::Nats(store) => store,
        };
        if store.create_meter(&def).await? {
            return Ok((StatusCode::CREATED, def));
        }
        match store.meter(&def.id).await? {
            Some(existing) if existing == def => Ok((StatusCode::OK, def)),
            _ => Err(ApiError::new(
                StatusCode::CONFLICT,
                format!("id: meter {:?} already exists", def.id),
            )),
        }
    }

    /// Create or replace a meter: whether it existed, and the meter as stored.
    async fn put(&self, def: MeterDef) -> ApiResult<(bool, MeterDef)> {
        match self {
            Backend::Kube(k) => Ok(k.apply(&def).await?),
            Backend::Nats(store) => {
                let existed = store.meter(&def.id).await?.is_some();
                store.put_meter(&def).await?;
                Ok((existed, def))
            }
        }
    }

    async fn delete(&self, id: &str) -> ApiResult<()> {
        match self {
            Backend::Kube(k) => Ok(k.delete(id).await?),
            Backend::Nats(store) => {
                if store.meter(id).await?.is_none() {
                    return Err(ApiError::not_found(format!("key: no meter {id:?}")));
                }
                Ok(store.delete_meter(id).await?)
            }
        }
    }
}

impl AppState {
    /// What writing the meter `id` (as resolved) needs: `update` when it exists,
    /// `create` when the write creates it.
    async fn authorize_write(&self, caller: &Caller, id: &str) -> ApiResult<()> {
        let verb = match caller {
            Caller::Trusted => return Ok(()),
            Caller::Kubernetes(_) if self.store()?.meter(id).await?.is_some() => Verb::Update,
            Caller::Kubernetes(_) => Verb::Create,
        };
        self.authorize(caller, Permission::meter(verb, id)).await
    }
}

/// Seed `create-meter`: creates or replaces.
pub(super) async fn create_seed(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let def = parse_meter_json(&parse_json_body(body)?, None)?;
    state
        .authorize_write(&caller, &state.resolve_id(&def.id))
        .await?;
    state.meter_backend()?.put(def).await?;
    Ok(ok_status(StatusCode::ACCEPTED))
}

/// v1 create: 201, or 409 when a different meter already has the id.
pub(super) async fn create_v1(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    let def = parse_meter_json(&parse_json_body(body)?, None)?;
    let id = state.resolve_id(&def.id);
    state
        .authorize(&caller, Permission::meter(Verb::Create, &id))
        .await?;
    let (status, def) = state.meter_backend()?.create(def).await?;
    Ok((status, Json(def)).into_response())
}

/// The meters of every namespace the caller may list meters in.
pub(super) async fn list(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> ApiResult<Json<Vec<MeterDef>>> {
    let defs = state.store()?.all_meters().await?;
    Ok(Json(state.visible(&caller, defs).await?))
}

#[derive(Deserialize)]
pub(super) struct KeyQuery {
    key: Option<String>,
}

pub(super) fn required_key(q: KeyQuery) -> ApiResult<String> {
    q.key
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ApiError::bad_request("key: is required"))
}

async fn get_meter(state: &AppState, caller: &Caller, id: &str) -> ApiResult<Json<MeterDef>> {
    let id = &state.resolve_id(id);
    state
        .authorize(caller, Permission::meter(Verb::Get, id))
        .await?;
    state
        .store()?
        .meter(id)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("key: no meter {id:?}")))
}

async fn delete_meter(state: &AppState, caller: &Caller, id: &str) -> ApiResult<()> {
    let id = state.resolve_id(id);
    state
        .authorize(caller, Permission::meter(Verb::Delete, &id))
        .await?;
    state.meter_backend()?.delete(&id).await
}

/// PUT: the path names the meter; a body `id` must agree with it. 201 when it creates,
/// 200 when it replaces.
async fn put_meter(
    state: &AppState,
    caller: &Caller,
    id: &str,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    state.authorize_write(caller, &state.resolve_id(id)).await?;
    let mut value = parse_json_body(body)?;
    let backend = state.meter_backend()?;
    // a Meter resource's name is validated as the id; its namespace comes from the path
    let (namespace, name) = match &backend {
        Backend::Kube(k) => {
            let (ns, name) = k.locate(id);
            (Some(ns.to_string()), name.to_string())
        }
        Backend::Nats(_) => (None, id.to_string()),
    };
    if let Some(obj) = value.as_object_mut() {
        match obj.get("id") {
            Some(Value::String(given)) if given != id => {
                return Err(ApiError::bad_request(format!(
                    "id: {given:?} does not match the path"
                )))
            }
            _ => {}
        }
        obj.insert("id".into(), Value::String(name.clone()));
    }
    let mut def = parse_meter_json(&value, None)?;
    if let Some(ns) = namespace {
        def.id = format!("{ns}/{name}");
    }
    let (existed, def) = backend.put(def).await?;
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(def)).into_response())
}

pub(super) async fn get_seed(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<KeyQuery>,
) -> ApiResult<Json<MeterDef>> {
    get_meter(&state, &caller, &required_key(q)?).await
}
pub(super) async fn delete_seed(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<KeyQuery>,
) -> ApiResult<Response> {
    delete_meter(&state, &caller, &required_key(q)?).await?;
    Ok(ok_status(StatusCode::ACCEPTED))
}
pub(super) async fn get_v1(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<Json<MeterDef>> {
    get_meter(&state, &caller, &id).await
}
pub(super) async fn get_v1_ns(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<Json<MeterDef>> {
    get_meter(&state, &caller, &format!("{ns}/{name}")).await
}
pub(super) async fn put_v1(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    put_meter(&state, &caller, &id, body).await
}
pub(super) async fn put_v1_ns(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ns, name)): Path<(String, String)>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<Response> {
    put_meter(&state, &caller, &format!("{ns}/{name}"), body).await
}
pub(super) async fn delete_v1(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    delete_meter(&state, &caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
pub(super) async fn delete_v1_ns(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path((ns, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    delete_meter(&state, &caller, &format!("{ns}/{name}")).await?;
    Ok(StatusCode::NO_CONTENT)
}
