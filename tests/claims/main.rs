//! The claim log and the local claim index against a real nats-server.

#[path = "../common/mod.rs"]
mod common;

mod cold_start;
mod log;
