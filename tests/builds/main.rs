//! Meter builds beside the live pass, against real nats-server and kloudmeter processes.
//! A binary of its own: its freshness test measures a live meter's latency to the
//! millisecond, which other heavy tests sharing the two cores would blur.

#[path = "../common/mod.rs"]
mod common;

mod builds;
