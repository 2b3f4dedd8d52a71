//! KloudMeter: exact usage metering on NATS JetStream, for Kubernetes or standalone.

pub mod aggregator;
pub mod api;
pub mod cache;
pub mod claims;
pub mod config;
pub mod controller;
pub mod crd;
pub mod dedup;
pub mod error;
pub mod event;
pub mod fold;
pub mod ingest;
pub mod keys;
pub mod leader;
pub mod lease;
pub mod meter;
pub mod metrics;
pub mod openapi;
pub mod publisher;
pub mod pull;
pub mod query;
pub mod registry;
pub mod run;
pub mod server;
pub mod status;
pub mod store;
