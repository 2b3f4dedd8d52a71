//! The HTTP API against a running kloudmeter: the OpenAPI description, queries, and the
//! README's examples.

#[path = "../common/mod.rs"]
mod common;

mod openapi;
mod query;
mod readme;
