//! Partitions: events are spread by subject over `PARTITIONS` independent streams, each
//! aggregated by whichever process holds its lease. Which partition a subject lands in,
//! and how many partitions a process should hold, are decided here.

use std::collections::BTreeSet;

/// Most partitions an installation may have (each is a stream, a claim log and a lease).
pub const MAX_PARTITIONS: u16 = 64;

/// The number of partitions an installation was created with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Partitions(u16);

impl Partitions {
    /// `None` outside 1..=[`MAX_PARTITIONS`].
    pub fn new(count: u16) -> Option<Partitions> {
        (1..=MAX_PARTITIONS)
            .contains(&count)
            .then_some(Partitions(count))
    }

    /// One partition: everything in partition 0 (today's streams and names).
    pub const ONE: Partitions = Partitions(1);

    pub fn count(self) -> u16 {
        self.0
    }

    /// The partition of a subject: a stable hash of its bytes, so that every event (and
    /// every reading) of one subject stays in one partition, whichever process routes it.
    pub fn of(self, subject: &str) -> u16 {
        if self.0 == 1 {
            return 0;
        }
        (xxhash_rust::xxh3::xxh3_64(subject.as_bytes()) % u64::from(self.0)) as u16
    }

    pub fn all(self) -> impl Iterator<Item = u16> {
        0..self.0
    }

    /// A process's fair share when `members` processes are alive: every partition has
    /// room with someone, and no process holds more than one above another.
    pub fn share(self, members: usize) -> usize {
        usize::from(self.0).div_ceil(members.max(1))
    }
}

/// What a process holds and asks for, and what the leases say, at one look.
#[derive(Debug, Default)]
pub struct Holding {
    /// Partitions whose lease this process holds.
    pub owned: BTreeSet<u16>,
    /// Partitions this process campaigns for without holding them yet.
    pub campaigning: BTreeSet<u16>,
    /// Partitions whose lease someone else holds (unexpired).
    pub held_elsewhere: BTreeSet<u16>,
}

/// Changes a process makes to its campaigns after a look at the leases.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Moves {
    /// Owned partitions to hand over (the process holds more than its share).
    pub release: Vec<u16>,
    /// Campaigns to drop (someone else won, or the share is reached).
    pub stop: Vec<u16>,
    /// Free partitions to campaign for.
    pub start: Vec<u16>,
}

/// Bring one process's holding towards its fair share of `partitions` among `members`
/// live processes. `first` is where this process starts looking for free partitions (a
/// hash of its name), so that newcomers spread over different ones. Every process
/// applying this to the same leases converges on each partition having one owner.
pub fn rebalance(partitions: Partitions, members: usize, first: u16, h: &Holding) -> Moves {
    let share = partitions.share(members);
    let mut moves = Moves::default();
    // hand over the highest-numbered extras: partition 0 (which carries the operator
    // role) moves last
    let extra = h.owned.len().saturating_sub(share);
    moves.release = h.owned.iter().rev().take(extra).copied().collect();
    let kept = h.owned.len() - extra;
    let mut room = share - kept;
    for &p in &h.campaigning {
        if h.owned.contains(&p) {
            continue;
        }
        if room == 0 || h.held_elsewhere.contains(&p) {
            moves.stop.push(p);
        } else {
            room -= 1;
        }
    }
    let count = partitions.count();
    for i in 0..count {
        if room == 0 {
            break;
        }
        let p = (first % count + i) % count;
        let free =
            !h.owned.contains(&p) && !h.campaigning.contains(&p) && !h.held_elsewhere.contains(&p);
        if free {
            moves.start.push(p);
            room -= 1;
        }
    }
    moves
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn one_partition_holds_every_subject() {
        assert_eq!(Partitions::ONE.of("anything"), 0);
        assert_eq!(Partitions::new(0), None);
        assert_eq!(Partitions::new(65), None);
    }

    #[test]
    fn subjects_spread_over_partitions() {
        let p = Partitions::new(8).unwrap();
        let mut counts = [0u32; 8];
        for i in 0..8_000 {
            counts[usize::from(p.of(&format!("customer-{i}")))] += 1;
        }
        // each partition within a fifth of its even share
        assert!(
            counts.iter().all(|&c| (800..=1_200).contains(&c)),
            "{counts:?}"
        );
        // stable: the same subject always lands in the same partition
        assert_eq!(p.of("customer-1"), p.of("customer-1"));
    }

    #[test]
    fn a_newcomer_takes_free_partitions_and_an_owner_hands_over_extras() {
        let six = Partitions::new(6).unwrap();
        let alone = Holding {
            owned: (0..6).collect(),
            ..Default::default()
        };
        // a second process appears: the owner keeps 0..3 and hands over 3..6
        let moves = rebalance(six, 2, 0, &alone);
        assert_eq!(moves.release, vec![5, 4, 3]);
        let newcomer = Holding {
            held_elsewhere: (0..3).collect(),
            ..Default::default()
        };
        assert_eq!(rebalance(six, 2, 4, &newcomer).start, vec![4, 5, 3]);
        // a campaign someone else won is dropped
        let lost = Holding {
            campaigning: [1].into(),
            held_elsewhere: [1].into(),
            ..Default::default()
        };
        let moves = rebalance(six, 3, 1, &lost);
        assert_eq!(moves.stop, vec![1]);
        assert_eq!(moves.start, vec![2, 3]);
    }

    proptest! {
        /// Processes taking turns at `rebalance` (each campaign won at once when free)
        /// end with every partition owned by exactly one, none above its share.
        #[test]
        fn turns_converge_on_one_owner_each(count in 1u16..=16, members in 1usize..=8, seed in 0u64..1_000) {
            let parts = Partitions::new(count).unwrap();
            let mut owner: Vec<Option<usize>> = vec![None; usize::from(count)];
            // start from a lopsided holding: everything with process 0
            for o in owner.iter_mut() { *o = Some(0); }
            for round in 0..4 * members {
                let m = (round + seed as usize) % members;
                let h = Holding {
                    owned: (0..count).filter(|&p| owner[usize::from(p)] == Some(m)).collect(),
                    campaigning: BTreeSet::new(),
                    held_elsewhere: (0..count).filter(|&p| owner[usize::from(p)].is_some_and(|o| o != m)).collect(),
                };
                let moves = rebalance(parts, members, (m as u16).wrapping_mul(7), &h);
                for p in moves.release { owner[usize::from(p)] = None; }
                for p in moves.start { owner[usize::from(p)] = Some(m); }
            }
            // a last round in order lets everyone take what the others released
            for m in 0..members {
                let h = Holding {
                    owned: (0..count).filter(|&p| owner[usize::from(p)] == Some(m)).collect(),
                    campaigning: BTreeSet::new(),
                    held_elsewhere: (0..count).filter(|&p| owner[usize::from(p)].is_some_and(|o| o != m)).collect(),
                };
                for p in rebalance(parts, members, m as u16, &h).start { owner[usize::from(p)] = Some(m); }
            }
            prop_assert!(owner.iter().all(Option::is_some), "{owner:?}");
            for m in 0..members {
                let held = owner.iter().filter(|o| **o == Some(m)).count();
                prop_assert!(held <= parts.share(members), "{m} holds {held}: {owner:?}");
            }
        }
    }
}
