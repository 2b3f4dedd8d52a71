//! Who leads: exactly one process aggregates each partition at a time, and the holder of
//! partition 0 also reconciles Meters. Standalone a lease is a key in a NATS KV bucket
//! whose entries expire ([`nats_lease`]); as an operator it is a coordination.k8s.io
//! Lease ([`kube_lease`]). Both publish whether this process holds it on a watch channel
//! and release it on shutdown. [`partitions`] shares the partitions among processes.

pub mod kube_lease;
pub mod nats_lease;
pub mod partitions;
