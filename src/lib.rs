//! KloudMeter: exact usage metering on NATS JetStream, for Kubernetes or standalone.
//!
//! # The map
//!
//! | folder | owns | may not touch |
//! |---|---|---|
//! | [`domain`] | events, meters, windows, the fold, dedup decisions, query planning: pure | I/O, storage names |
//! | [`ingest`] | a request's validated events → JetStream, answered once every one is stored | readings |
//! | [`aggregate`] | the leader's loop: batches, dedup, fold, flush, rebuilds, cursor, dead letters | HTTP |
//! | [`claims`] | the claim log in NATS and this process's local index of it | readings |
//! | [`usage`] | the read side of queries: stored windows read as the domain plans them, merged exactly | HTTP |
//! | [`notify`] | threshold crossings → one CloudEvent each on the notifications stream (values from [`usage`]), webhook delivery | writing readings, Kubernetes |
//! | [`nats`] | stream, bucket and key names; connection and set-up; the meter registry | domain rules |
//! | [`http`] | the route table, handlers, OpenAPI, the server | aggregation |
//! | [`access`] | who may call the API: the shared token, or Kubernetes TokenReviews and SubjectAccessReviews, cached | HTTP, storage |
//! | [`operator`] | the Meter CRD, its controller, status write-back | the event stream |
//! | [`election`] | the NATS and Kubernetes leases of the partitions, and each process's fair share of them | everything else |
//!
//! [`config`] is the command line and environment, [`metrics`] the Prometheus registry,
//! [`run`] wires the parts together, [`error`] holds the error a field names.
//!
//! # Architecture
//!
//! One process serves the API and, when elected, aggregates. Ingestion validates a request
//! completely, publishes every event to the stream `<METER_NATS_STREAM>` on the subject
//! `<stream>.events.<escaped eventType>` with a header carrying the SHA-256 of its dedup key,
//! and answers 2xx only after JetStream has acknowledged every message (publishes are
//! pipelined, acknowledgements awaited together). Nothing is deduplicated at ingest: a claim
//! made before the write could swallow a retry whose first attempt failed.
//!
//! Events are spread by subject over `PARTITIONS` partitions ([`domain::partition`]): each
//! is a stream of its own (`<stream>` for partition 0, `<stream>-p<N>` for the others)
//! with its own claim log, cursor, build progress and readings names (`<meter>#<N>` for
//! partition N > 0), so everything below happens per partition, and readers merge a
//! meter's partitions ([`nats::meters::Readings`]). Exactly one process aggregates a
//! partition at a time: it holds the partition's lease, a key in the KV bucket
//! `<stream>-leader` whose entries expire after `LEADER_TTL`, renewed every third of it
//! (or a coordination.k8s.io Lease as an operator). Processes announce themselves in the
//! same bucket and each takes its fair share of the partitions
//! ([`election::partitions`]); partition 0's holder also reconciles Meters and writes
//! their status.
//! The leader reads the stream in order from its cursor (`cursor` in `<stream>-state`) in
//! batches of up to 5,000, through an ephemeral pull consumer without acks that keeps the
//! next batch coming while one is folded (a gap in its delivery sequence restarts the
//! aggregator from the cursor). For each batch it (1) decides which events repeat an id
//! already counted within `DEDUP_WINDOW` and records the new claims (below), deletes repeats
//! from the stream (so backfills and rebuilds never see them), and (2) folds the events into
//! the readings it keeps in memory with pure functions (`src/fold.rs`). The readings sit in
//! numbered slots (`src/cache.rs`): each meter remembers, per subject and group, which slots
//! hold its total and current windows, so folding an event costs a few array accesses, and
//! meters that read the same property with the same groupBy evaluate an event once. Every
//! 250 ms (every 1–5 s while a backlog is worked off, spaced so that writing takes at most a
//! fifth of the time, or as soon as 100,000 readings changed) it (3) writes each changed
//! reading with compare-and-swap — serialized at once, sent by a separate task while folding
//! goes on — and only when all are acknowledged (4) advances the cursor. Every reading
//! records the highest stream sequence applied to it, so replaying any part of the stream —
//! after a crash anywhere in (1)–(4), or by a leader that lost its lease without noticing —
//! changes nothing; a lost compare-and-swap restarts the aggregator from the stored cursor.
//!
//! Dedup claims (which stream sequence first claimed each event id, and when) are kept
//! where they cost nats-server no memory per id: the claim log, a stream
//! `<stream>-claims` with one subject, each message a batch of up to 16,384 claims of 32
//! bytes, retained for twice `DEDUP_WINDOW` (at least `DEDUP_WINDOW` + 1 h). Every process
//! keeps a local on-disk index of that log (redb, in `DATA_DIR`, with a fixed 16 MiB page
//! cache), so a lookup is a local read; standbys follow the log every second, so a new
//! leader starts warm. The leader publishes a snapshot of its index every
//! `CLAIM_SNAPSHOT_INTERVAL` (every claim still in the window, sorted by id, to the object
//! store bucket `<stream>-claim-snapshots`); a process starting on an empty `DATA_DIR`
//! fetches it, uses it in place as the lower layer of its index (never inserted into the
//! B-tree) and reads only the log after it, before it campaigns ([`claims::snapshot`]);
//! an index built from another log (the stream was recreated, at
//! start or while running) is emptied and rebuilt from the new one. The leader appends with `Nats-Expected-Last-Sequence` set to the
//! last log entry it has read: if another process appended meanwhile (two leaders during a
//! hand-over), the append fails and the aggregator restarts from its cursor after reading
//! the log, so decisions always follow one history. A claim is made after the event is
//! durably in the stream and names the event's own sequence, so a crash between claim and
//! fold still lets that event through when the batch is replayed.
//!
//! Readings live in the KV bucket `<stream>-readings`, with user-supplied names escaped into
//! single key tokens (`[A-Za-z0-9_-]` kept, every other byte `=XX`):
//!
//! | key | holds |
//! |---|---|
//! | `r.<meter>.summary` | the meter's all-time aggregate, events, invalid events, distinct subjects |
//! | `r.<meter>.<subject>.total` | one subject's all-time aggregate |
//! | `r.<meter>.<subject>.<group>.<windowStart>` | one window (epoch seconds) of one subject and group (`_`, or a hash of the group values, which the reading stores) |
//!
//! Each reading keeps count, exact sum, min, max, the latest value (by event time, then
//! sequence) and, for `unique_count`, the set of 64-bit hashes of the distinct values, so
//! readings can be merged exactly into coarser windows. Meter definitions live in
//! `<stream>-meters`; every process follows that bucket with a KV watch. For each meter the
//! state bucket records which definition its readings were built for; a new or changed
//! definition is rebuilt by replaying the stream (filtered to its event type) up to the
//! cursor before the main pass continues, and a deleted meter's keys are purged.
//!
//! Limits, on purpose: `unique_count` is exact up to 100,000 distinct values per reading
//! (a 64-bit hash per value, kept under NATS's 1 MiB message size); past that the reading
//! keeps counting values it has not seen without remembering them, so repeats of those are
//! over-counted. The local claim index takes about 170 bytes of disk per event id inside
//! `DEDUP_WINDOW` (measured with 400,000 random ids; the file includes the B-tree's free
//! space; the log and a snapshot take 32 bytes); a process on an empty `DATA_DIR`
//! downloads the snapshot (32 bytes per id in the window) before it may lead.

// The crate docs are the maintainers' map of the code, built with
// `--document-private-items` (`task lint`): they link to internal modules on purpose.
#![allow(rustdoc::private_intra_doc_links)]

pub(crate) mod access;
pub mod aggregate;
pub mod claims;
pub mod config;
pub mod domain;
pub(crate) mod election;
pub mod error;
pub mod http;
pub mod ingest;
pub(crate) mod metrics;
pub mod nats;
pub(crate) mod notify;
pub mod operator;
pub mod run;
pub(crate) mod usage;
