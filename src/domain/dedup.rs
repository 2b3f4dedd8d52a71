//! Deduplication decisions: which events of a batch are repeats of an id already counted
//! within DEDUP_WINDOW. Pure: the aggregator loads and stores the records.
//!
//! A record `seq time` says which stream sequence first claimed a key, and when it was
//! received. Claims are made by the aggregator *after* the event is durably in the
//! stream, never at ingest time, so a failed write can never swallow a client's retry;
//! a crash after the claim is harmless because the claim names the event's own sequence.

use std::collections::HashMap;

/// An event's dedup key: the first 16 bytes of the SHA-256 of `source`+`id`.
pub type IdKey = [u8; 16];

/// Maps by dedup key, with a hasher much cheaper than SipHash (a map operation per event
/// and the keys are not chosen by clients: they are SHA-256 output).
pub type IdMap<V> = HashMap<IdKey, V, foldhash::fast::RandomState>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Receipt time (the stream's timestamp), nanoseconds since the epoch.
    pub time_ns: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Unique,
    Duplicate,
}

/// One event of a batch, in stream order.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub key: IdKey,
    pub seq: u64,
    pub time_ns: i64,
}

/// Decide every candidate in order, starting from the stored records (`stored`, by key;
/// absent keys have none). Returns the decisions and the records that must be stored
/// because a decision changed them.
pub fn decide(
    batch: &[Candidate],
    stored: &IdMap<Record>,
    window_ns: i64,
) -> (Vec<Decision>, IdMap<Record>) {
    let capacity = || IdMap::with_capacity_and_hasher(batch.len(), Default::default());
    let mut state: IdMap<Record> = capacity();
    let mut changed: IdMap<Record> = capacity();
    let mut decisions = Vec::with_capacity(batch.len());
    for c in batch {
        let current = state
            .get(&c.key)
            .copied()
            .or_else(|| stored.get(&c.key).copied());
        let unique = match current {
            None => true,
            // The event's own claim, made before a crash: it is the counted one.
            Some(r) if r.seq == c.seq => true,
            // Claimed by a later event: this one was judged earlier and kept (repeats are
            // deleted from the stream before the cursor passes them).
            Some(r) if r.seq > c.seq => true,
            Some(r) => c.time_ns.saturating_sub(r.time_ns) >= window_ns,
        };
        if unique {
            let rec = Record {
                seq: c.seq,
                time_ns: c.time_ns,
            };
            if current != Some(rec) {
                changed.insert(c.key, rec);
            }
            state.insert(c.key, rec);
            decisions.push(Decision::Unique);
        } else {
            decisions.push(Decision::Duplicate);
        }
    }
    (decisions, changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use Decision::*;

    fn k(name: &str) -> IdKey {
        let mut key = [0u8; 16];
        key[..name.len()].copy_from_slice(name.as_bytes());
        key
    }

    fn c(key: &str, seq: u64, t: i64) -> Candidate {
        Candidate {
            key: k(key),
            seq,
            time_ns: t,
        }
    }

    #[test]
    fn repeats_within_the_window_are_duplicates() {
        let batch = [
            c("a", 1, 0),
            c("b", 2, 5),
            c("a", 3, 9),
            c("a", 4, 10),
            c("a", 5, 25),
        ];
        let (d, changed) = decide(&batch, &IdMap::default(), 10);
        // a@3 is 9ns after a@1: repeat; a@4 is 10ns after: outside the window, counted;
        // a@5 is 15ns after a@4: counted again.
        assert_eq!(d, vec![Unique, Unique, Duplicate, Unique, Unique]);
        assert_eq!(
            changed[&k("a")],
            Record {
                seq: 5,
                time_ns: 25
            }
        );
        assert_eq!(changed[&k("b")], Record { seq: 2, time_ns: 5 });
    }

    #[test]
    fn stored_records_decide_across_batches_and_replays() {
        let mut stored = IdMap::default();
        stored.insert(
            k("a"),
            Record {
                seq: 7,
                time_ns: 100,
            },
        );
        let (d, changed) = decide(&[c("a", 7, 100), c("a", 9, 150)], &stored, 1000);
        assert_eq!(d, vec![Unique, Duplicate]);
        assert!(
            changed.is_empty(),
            "a replay of the claiming event changes nothing"
        );
        let (d, _) = decide(&[c("a", 3, 50)], &stored, 1000);
        assert_eq!(d, vec![Unique]);
    }
}
