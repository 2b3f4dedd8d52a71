//! The UTC days on which a subject has events, kept in its all-time total so that a
//! query reads only the windows of those days: a month of DAY windows for a subject
//! seen on three days is three reads, not thirty.

use serde::{Deserialize, Serialize};

const DAY: i64 = 86_400;

/// Most runs a set keeps; a subject active on more separate stretches of days stops
/// being tracked ([`Reading::note_day`](super::Reading::note_day)), and its queries read
/// every window, as without a set.
pub const MAX_RUNS: usize = 256;

/// UTC days (counted from 1970-01-01) as sorted, disjoint, non-adjacent runs of
/// `(first day, days)`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DaySet(Vec<(i64, u32)>);

impl DaySet {
    /// The UTC day holding `t` (epoch seconds).
    pub fn day_of(t: i64) -> i64 {
        t.div_euclid(DAY)
    }

    /// Add a day; false when the set would need more than [`MAX_RUNS`] runs.
    pub fn insert(&mut self, day: i64) -> bool {
        let runs = &mut self.0;
        // the first run starting after `day`
        let next = runs.partition_point(|&(first, _)| first <= day);
        if next > 0 {
            let (first, len) = runs[next - 1];
            let end = first + i64::from(len);
            if day < end {
                return true;
            }
            if day == end {
                runs[next - 1].1 += 1;
                // now touching the next run: join them
                if next < runs.len() && runs[next].0 == day + 1 {
                    let (_, more) = runs.remove(next);
                    runs[next - 1].1 += more;
                }
                return true;
            }
        }
        if next < runs.len() && runs[next].0 == day + 1 {
            runs[next].0 = day;
            runs[next].1 += 1;
            return true;
        }
        if runs.len() >= MAX_RUNS {
            return false;
        }
        runs.insert(next, (day, 1));
        true
    }

    /// Whether the set holds a day that [start, end) (epoch seconds) touches.
    pub fn touches(&self, start: i64, end: i64) -> bool {
        if end <= start {
            return false;
        }
        let (lo, hi) = (Self::day_of(start), Self::day_of(end - 1));
        // the last run starting on or before `hi` is the only one that can reach it
        let i = self.0.partition_point(|&(first, _)| first <= hi);
        i > 0 && {
            let (first, len) = self.0[i - 1];
            first + i64::from(len) > lo
        }
    }

    pub fn runs(&self) -> usize {
        self.0.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// The set answers as the plain set of the days inserted, in few runs.
        #[test]
        fn a_day_set_is_the_set_of_its_days(days in prop::collection::vec(0i64..400, 0..200), probes in prop::collection::vec((0i64..400, 1i64..40), 1..50)) {
            let mut set = DaySet::default();
            let mut plain = std::collections::BTreeSet::new();
            for d in days {
                prop_assert!(set.insert(d));
                plain.insert(d);
            }
            // runs are sorted, disjoint and not adjacent
            for w in set.0.windows(2) {
                prop_assert!(w[0].0 + i64::from(w[0].1) < w[1].0);
            }
            let in_set: std::collections::BTreeSet<i64> = set.0.iter().flat_map(|&(f, n)| f..f + i64::from(n)).collect();
            prop_assert_eq!(&in_set, &plain);
            for (first, n) in probes {
                // a range of whole days, and one from midday to midday
                let want = plain.range(first..first + n).next().is_some();
                prop_assert_eq!(set.touches(first * DAY, (first + n) * DAY), want);
                let want = plain.range(first..=first + n).next().is_some();
                prop_assert_eq!(set.touches(first * DAY + DAY / 2, (first + n) * DAY + DAY / 2), want);
            }
        }
    }

    #[test]
    fn a_set_stops_at_its_run_limit() {
        let mut set = DaySet::default();
        for i in 0..MAX_RUNS as i64 {
            assert!(set.insert(i * 2));
        }
        // a new run is refused; joining runs or growing one is still fine
        assert!(!set.insert(10_000));
        assert!(set.insert(1));
        assert!(set.insert(-1));
        assert_eq!(set.runs(), MAX_RUNS - 1);
        assert!(set.insert(10_000));
        assert_eq!(set.runs(), MAX_RUNS);
    }
}
