//! Aggregation against real nats-server and kloudmeter processes: the pipeline end to end,
//! the pull loop, exactly-once through faults and chaos.

#[path = "../common/mod.rs"]
mod common;

mod chaos;
mod faults;
mod notify;
mod pipeline;
mod pull;
