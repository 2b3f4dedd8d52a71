//! Meters created, replaced and deleted through the HTTP API in operator mode: they are
//! Meter resources (the resource is the single source of truth), by default in the
//! operator's own namespace. The controller then brings them into NATS like any Meter.

use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::domain::meter::MeterDef;
use crate::operator::crd::{meter_id, Meter, MeterSpec};

/// The field manager of resources written through the API.
const API_MANAGER: &str = "kloudmeter-api";

#[derive(Clone)]
pub struct KubeMeters {
    pub client: kube::Client,
    /// Where a meter id without a namespace goes.
    pub namespace: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeMeterError {
    #[error("id: must be a lowercase DNS-1123 name ([a-z0-9.-]) to become a Meter resource")]
    BadName,
    #[error("key: {0}")]
    NotFound(String),
    #[error("id: {0}")]
    Conflict(String),
    /// The API server refused the resource (its schema): the message names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("Kubernetes API: {0}")]
    Unavailable(kube::Error),
}

impl From<kube::Error> for KubeMeterError {
    fn from(e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) if s.code == 404 => KubeMeterError::NotFound(s.message),
            kube::Error::Api(s) if s.code == 409 => KubeMeterError::Conflict(s.message),
            kube::Error::Api(s) if s.code == 422 || s.code == 400 => {
                KubeMeterError::Invalid(s.message)
            }
            other => KubeMeterError::Unavailable(other),
        }
    }
}

fn dns1123(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric()
}

impl KubeMeters {
    /// (namespace, name) of a meter id: `<namespace>/<name>`, or a bare name in the
    /// operator's namespace.
    pub fn locate<'a>(&'a self, id: &'a str) -> (&'a str, &'a str) {
        id.split_once('/').unwrap_or((self.namespace.as_str(), id))
    }

    fn api(&self, namespace: &str) -> Api<Meter> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Create the resource; a name already taken is a conflict. Returns the meter as the
    /// API shows it (id `<namespace>/<name>`).
    pub async fn create(&self, def: &MeterDef) -> Result<MeterDef, KubeMeterError> {
        let (ns, name) = self.locate(&def.id);
        if !dns1123(name) {
            return Err(KubeMeterError::BadName);
        }
        let meter = Meter::new(name, MeterSpec::from_def(def));
        self.api(ns).create(&PostParams::default(), &meter).await?;
        Ok(MeterDef {
            id: meter_id(ns, name),
            ..def.clone()
        })
    }

    /// Create or replace the resource's spec; whether it existed, and the meter as the
    /// API shows it.
    pub async fn apply(&self, def: &MeterDef) -> Result<(bool, MeterDef), KubeMeterError> {
        let (ns, name) = self.locate(&def.id);
        if !dns1123(name) {
            return Err(KubeMeterError::BadName);
        }
        let api = self.api(ns);
        let existed = api.get_opt(name).await?.is_some();
        let patch = json!({"apiVersion": "kloudmeter.io/v1alpha1", "kind": "Meter",
                           "metadata": {"name": name}, "spec": MeterSpec::from_def(def)});
        api.patch(
            name,
            &PatchParams::apply(API_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        Ok((
            existed,
            MeterDef {
                id: meter_id(ns, name),
                ..def.clone()
            },
        ))
    }

    /// Delete the resource (its finalizer then removes the readings).
    pub async fn delete(&self, id: &str) -> Result<(), KubeMeterError> {
        let (ns, name) = self.locate(id);
        self.api(ns).delete(name, &Default::default()).await?;
        Ok(())
    }
}
