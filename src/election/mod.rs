//! Who leads: exactly one process reconciles Meters and aggregates at a time. Standalone
//! the lease is a key in a NATS KV bucket whose entries expire ([`nats_lease`]); as an
//! operator it is a coordination.k8s.io Lease ([`kube_lease`]). Both publish whether this
//! process leads on a watch channel and release the lease on shutdown.

pub mod kube_lease;
pub mod nats_lease;
