//! Kubernetes: the `Meter` custom resource ([`crd`]), the controller that reconciles
//! Meters into meter definitions in NATS and cleans up with a finalizer
//! ([`controller`]), and the leader's write-back of readings into Meter statuses
//! ([`status`], with where subjects stand against thresholds), Events for threshold
//! crossings ([`crossings`]); in operator mode, meters defined through the HTTP API are
//! Meter resources too ([`api_meters`]). [`uninstall`] is what the chart's pre-delete
//! hook runs, so that no Meter is left on a finalizer nobody removes.

pub(crate) mod api_meters;
pub(crate) mod controller;
pub mod crd;
pub(crate) mod crossings;
pub(crate) mod status;
pub mod uninstall;
