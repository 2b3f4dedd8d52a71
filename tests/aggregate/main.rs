//! Aggregation against real nats-server and kloudmeter processes: the pipeline end to end,
//! meter builds beside the live pass,
//! the pull loop, exactly-once through faults and chaos.

#[path = "../common/mod.rs"]
mod common;

mod builds;
mod chaos;
mod faults;
mod pipeline;
mod pull;
