//! Partitions: events are spread by subject over `PARTITIONS` independent streams, each
//! aggregated by whichever process holds its lease. Which partition a subject lands in,
//! and how many partitions a process should hold, are decided here.

use std::collections::{BTreeMap, BTreeSet};

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

    /// The most partitions a process holds when `members` processes are alive:
    /// ⌈partitions ÷ members⌉, so that every partition has room with someone.
    pub fn share(self, members: usize) -> usize {
        usize::from(self.0).div_ceil(members.max(1))
    }

    /// The fewest a process holds once settled: ⌊partitions ÷ members⌋.
    pub fn least(self, members: usize) -> usize {
        usize::from(self.0) / members.max(1)
    }
}

/// What a process holds and asks for, and what the leases say, at one look.
#[derive(Debug, Default)]
pub struct Holding {
    /// Partitions whose lease this process holds.
    pub owned: BTreeSet<u16>,
    /// Partitions this process campaigns for without holding them yet.
    pub campaigning: BTreeSet<u16>,
    /// Partitions whose lease someone else holds (unexpired), and who.
    pub held_elsewhere: BTreeMap<u16, String>,
    /// The other live processes (their announcements).
    pub others: BTreeSet<String>,
    /// Free partitions that stayed free over the last looks: nobody entitled to them
    /// took them, so anyone below the share may.
    pub long_free: BTreeSet<u16>,
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

/// Bring process `me`'s holding towards its fair share of `partitions`: settled, every
/// process holds ⌊P÷N⌋ or ⌈P÷N⌉ of them (N live processes, those holding a lease
/// included). A process takes free partitions up to ⌊P÷N⌋ while another holds fewer
/// (they are left for it), up to ⌈P÷N⌉ otherwise; when someone holds fewer than ⌊P÷N⌋
/// and nothing is free, the process holding most (ties: the first by name) hands one
/// over. A partition nobody took for a while may be taken by anyone below ⌈P÷N⌉, so a
/// process that announces itself but never takes one cannot strand it. `first` is where
/// `me` starts looking for free partitions (a hash of its name), so that newcomers
/// spread over different ones.
pub fn rebalance(partitions: Partitions, me: &str, first: u16, h: &Holding) -> Moves {
    let mut members: BTreeMap<&str, usize> = h.others.iter().map(|m| (m.as_str(), 0)).collect();
    for holder in h.held_elsewhere.values() {
        *members.entry(holder.as_str()).or_default() += 1;
    }
    members.remove(me);
    let n = members.len() + 1;
    let (least, share) = (partitions.least(n), partitions.share(n));
    let free: Vec<u16> = preferred(partitions, first)
        .filter(|p| {
            !h.owned.contains(p) && !h.campaigning.contains(p) && !h.held_elsewhere.contains_key(p)
        })
        .collect();
    let needy = members.values().any(|&c| c < least);
    let pending = h
        .campaigning
        .iter()
        .filter(|p| !h.owned.contains(p))
        .count();
    let mut moves = Moves::default();
    // hand over the highest-numbered: partition 0 (which carries the operator role)
    // moves last
    let mut extra = h.owned.len().saturating_sub(share);
    let most = members
        .iter()
        .map(|(m, &c)| (c, std::cmp::Reverse(*m)))
        .max();
    let giver = most.is_none_or(|(c, std::cmp::Reverse(m))| {
        (h.owned.len(), std::cmp::Reverse(me)) > (c, std::cmp::Reverse(m))
    });
    if extra == 0 && needy && free.is_empty() && pending == 0 && h.owned.len() > least && giver {
        extra = 1;
    }
    moves.release = h.owned.iter().rev().take(extra).copied().collect();
    let kept = h.owned.len() - extra;
    let cap = if needy { least } else { share };
    let mut room = cap.saturating_sub(kept);
    let mut long_room = share.saturating_sub(kept);
    for &p in &h.campaigning {
        if h.owned.contains(&p) {
            continue;
        }
        if long_room == 0 || h.held_elsewhere.contains_key(&p) {
            moves.stop.push(p);
        } else {
            room = room.saturating_sub(1);
            long_room -= 1;
        }
    }
    for p in free {
        let entitled = room > 0;
        if entitled || (long_room > 0 && h.long_free.contains(&p)) {
            moves.start.push(p);
            room = room.saturating_sub(1);
            long_room -= 1;
        }
    }
    moves
}

/// Every partition once, starting at `first`.
fn preferred(partitions: Partitions, first: u16) -> impl Iterator<Item = u16> {
    let count = partitions.count();
    (0..count).map(move |i| (first % count + i) % count)
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

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|m| format!("m{m}")).collect()
    }

    /// What process `m` sees when `owner` says who holds each partition.
    fn look(
        owner: &[Option<usize>],
        m: usize,
        members: usize,
        long_free: BTreeSet<u16>,
    ) -> Holding {
        let names = names(members);
        Holding {
            owned: (0..owner.len() as u16)
                .filter(|&p| owner[usize::from(p)] == Some(m))
                .collect(),
            campaigning: BTreeSet::new(),
            held_elsewhere: (0..owner.len() as u16)
                .filter_map(|p| match owner[usize::from(p)] {
                    Some(o) if o != m => Some((p, names[o].clone())),
                    _ => None,
                })
                .collect(),
            others: names
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != m)
                .map(|(_, n)| n.clone())
                .collect(),
            long_free,
        }
    }

    #[test]
    fn a_newcomer_takes_free_partitions_and_an_owner_hands_over_extras() {
        let six = Partitions::new(6).unwrap();
        // a second process appears: the owner keeps 0..3 and hands over 3..6
        let alone = look(&[Some(0); 6], 0, 2, BTreeSet::new());
        assert_eq!(rebalance(six, "m0", 0, &alone).release, vec![5, 4, 3]);
        let owner = [Some(0), Some(0), Some(0), None, None, None];
        assert_eq!(
            rebalance(six, "m1", 4, &look(&owner, 1, 2, BTreeSet::new())).start,
            vec![4, 5, 3]
        );
        // a fourth process joins three holding two each: the first of them by name hands
        // one over (nothing is free), and the newcomer takes it
        let owner = [Some(0), Some(0), Some(1), Some(1), Some(2), Some(2)];
        let moves: Vec<Moves> = (0..3)
            .map(|m| {
                rebalance(
                    six,
                    &format!("m{m}"),
                    0,
                    &look(&owner, m, 4, BTreeSet::new()),
                )
            })
            .collect();
        assert_eq!(moves[0].release, vec![1]);
        assert!(moves[1].release.is_empty() && moves[2].release.is_empty());
        let owner = [Some(0), None, Some(1), Some(1), Some(2), Some(2)];
        // the freed partition is left for the process holding none
        assert!(
            rebalance(six, "m0", 0, &look(&owner, 0, 4, BTreeSet::new()))
                .start
                .is_empty()
        );
        assert_eq!(
            rebalance(six, "m3", 0, &look(&owner, 3, 4, BTreeSet::new())).start,
            vec![1]
        );
        // ...unless it stays free (its process announces itself but never takes it)
        assert_eq!(
            rebalance(six, "m0", 0, &look(&owner, 0, 4, [1].into())).start,
            vec![1]
        );
        // a campaign someone else won is dropped
        let lost = Holding {
            campaigning: [1].into(),
            held_elsewhere: [(1, "m1".to_string())].into(),
            others: ["m1".to_string(), "m2".to_string()].into(),
            ..Default::default()
        };
        let moves = rebalance(six, "m0", 1, &lost);
        assert_eq!(moves.stop, vec![1]);
        assert_eq!(moves.start, vec![2, 3]);
    }

    proptest! {
        /// Processes taking turns at `rebalance` (a campaign for a free partition won at
        /// once) end with every partition owned by exactly one, each process holding
        /// ⌊P÷N⌋ or ⌈P÷N⌉.
        #[test]
        fn turns_converge_on_a_fair_share_each(count in 1u16..=16, members in 1usize..=8, seed in 0u64..1_000, start in 0..3) {
            let parts = Partitions::new(count).unwrap();
            // from nothing held, from everything with process 0, or from the partitions
            // spread over all but the last process (which has just joined)
            let mut owner: Vec<Option<usize>> = (0..usize::from(count))
                .map(|p| match start {
                    0 => None,
                    1 => Some(0),
                    _ => Some(p % (members - 1).max(1)),
                })
                .collect();
            let mut free_for = vec![0usize; usize::from(count)];
            let mut order: Vec<usize> = (0..members).collect();
            let mut seed = seed;
            for _ in 0..6 * members + 6 {
                // each round every process looks once, in a shuffled order
                for i in (1..order.len()).rev() {
                    seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    order.swap(i, (seed >> 33) as usize % (i + 1));
                }
                for &m in &order {
                    let long_free = (0..count).filter(|&p| free_for[usize::from(p)] >= 2).collect();
                    let moves = rebalance(parts, &format!("m{m}"), (m as u16).wrapping_mul(7), &look(&owner, m, members, long_free));
                    for p in moves.release { owner[usize::from(p)] = None; }
                    for p in moves.start { owner[usize::from(p)] = Some(m); }
                }
                for (p, o) in owner.iter().enumerate() {
                    free_for[p] = if o.is_none() { free_for[p] + 1 } else { 0 };
                }
            }
            prop_assert!(owner.iter().all(Option::is_some), "{owner:?}");
            for m in 0..members {
                let held = owner.iter().filter(|o| **o == Some(m)).count();
                prop_assert!((parts.least(members)..=parts.share(members)).contains(&held), "{m} holds {held}: {owner:?}");
            }
        }
    }
}
