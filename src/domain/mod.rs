//! The pure core: what an event and a meter are, how events fold into exact readings,
//! how duplicates are decided, and how a query is planned over stored windows and
//! merged. No I/O and no storage names: the [`crate::nats`] layer renders the
//! [`window::ReadingKey`]s chosen here into KV keys.
//!
//! - [`event`]: parsing and validating ingested events (seed shape and CloudEvents).
//! - [`meter`]: meter definitions, their validation and compiled JSONPaths.
//! - [`window`]: which reading a contribution lands in (subject totals, windows, UTC
//!   rollups).
//! - [`fold`]: readings and the exact arithmetic that updates and merges them.
//! - [`dedup`]: which events of a batch repeat an id already counted.
//! - [`build`]: generations of a meter's readings: which is served, which is built,
//!   what history a rebuild keeps.
//! - [`query`]: query parameters, output windows and the cover of stored windows.
//! - [`tenancy`]: which namespaces' events a meter may count.
//! - [`partition`]: which partition a subject's events go to, and each process's share.

pub mod build;
pub mod dedup;
pub mod event;
pub mod filter;
pub mod fold;
pub mod meter;
pub mod partition;
pub mod query;
pub mod tenancy;
pub mod threshold;
pub mod window;
