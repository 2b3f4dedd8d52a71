//! A NATS cluster as the engine: three nats-servers and several kloudmeter processes.
//! A binary of its own: seven processes at once would starve the timing-sensitive fault
//! tests running beside it on a small machine.

#[path = "../common/mod.rs"]
mod common;

mod cluster;
