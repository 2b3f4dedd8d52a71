//! Kubernetes against a real kube-apiserver: the operator and the Helm chart.

#[path = "../common/mod.rs"]
mod common;

mod access;
mod cel;
mod helm;
mod operator;
mod thresholds;
