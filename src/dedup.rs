//! Deduplication decisions: which events of a batch are repeats of an id already counted
//! within DEDUP_WINDOW. Pure: the aggregator loads and stores the records.
//!
//! A record `seq time` says which stream sequence first claimed a key, and when it was
//! received. Claims are made by the aggregator *after* the event is durably in the
//! stream, never at ingest time, so a failed write can never swallow a client's retry;
//! a crash after the claim is harmless because the claim names the event's own sequence.

use std::collections::HashMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// Receipt time (the stream's timestamp), nanoseconds since the epoch.
    pub time_ns: i64,
}

impl Record {
    pub fn encode(&self) -> String {
        format!("{} {}", self.seq, self.time_ns)
    }
    pub fn decode(raw: &[u8]) -> Option<Record> {
        let text = std::str::from_utf8(raw).ok()?;
        let (seq, t) = text.split_once(' ')?;
        Some(Record {
            seq: seq.parse().ok()?,
            time_ns: t.parse().ok()?,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Unique,
    Duplicate,
}

/// One event of a batch, in stream order.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub key: String,
    pub seq: u64,
    pub time_ns: i64,
}

/// Decide every candidate in order, starting from the stored records (`stored`, by key;
/// absent keys have none). Returns the decisions and the records that must be stored
/// because a decision changed them.
pub fn decide(
    batch: &[Candidate],
    stored: &HashMap<String, Record>,
    window_ns: i64,
) -> (Vec<Decision>, HashMap<String, Record>) {
    let mut state: HashMap<&str, Record> = HashMap::new();
    let mut changed: HashMap<String, Record> = HashMap::new();
    let mut decisions = Vec::with_capacity(batch.len());
    for c in batch {
        let current = state
            .get(c.key.as_str())
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
                changed.insert(c.key.clone(), rec);
            }
            state.insert(c.key.as_str(), rec);
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

    fn c(key: &str, seq: u64, t: i64) -> Candidate {
        Candidate {
            key: key.into(),
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
        let (d, changed) = decide(&batch, &HashMap::new(), 10);
        // a@3 is 9ns after a@1: repeat; a@4 is 10ns after: outside the window, counted;
        // a@5 is 15ns after a@4: counted again.
        assert_eq!(d, vec![Unique, Unique, Duplicate, Unique, Unique]);
        assert_eq!(
            changed["a"],
            Record {
                seq: 5,
                time_ns: 25
            }
        );
        assert_eq!(changed["b"], Record { seq: 2, time_ns: 5 });
    }

    #[test]
    fn stored_records_decide_across_batches_and_replays() {
        let mut stored = HashMap::new();
        stored.insert(
            "a".to_string(),
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

    #[test]
    fn records_encode_round_trip() {
        let r = Record {
            seq: 42,
            time_ns: -7,
        };
        assert_eq!(Record::decode(r.encode().as_bytes()), Some(r));
        assert_eq!(Record::decode(b"garbage"), None);
    }
}
