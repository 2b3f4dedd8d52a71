//! Ingestion against real nats-server and kloudmeter processes: bad input refused whole,
//! and the publisher that stores a request's events.

#[path = "../common/mod.rs"]
mod common;

mod input;
mod publisher;
