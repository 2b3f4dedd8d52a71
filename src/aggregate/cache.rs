//! The aggregator's working set of readings, kept so that folding an event costs a few
//! array accesses instead of building and hashing five keys per meter.
//!
//! Readings live in slots addressed by number. A key is hashed once, when its slot is
//! made; after that, each meter remembers per subject and group which slots hold its
//! total and current windows, so a repeat of the same subject and group within the same
//! window finds them with one string lookup. Everything here is plain data: loading
//! slots from KV and writing them back is the aggregator's job.

use std::collections::HashMap;
use std::sync::Arc;

use crate::domain::fold::{GroupValues, Reading, SharedGroup, Touched};
use crate::domain::meter::CompiledMeter;
use crate::domain::window::ReadingKey;

/// Hash maps on the hot path: foldhash is several times cheaper than SipHash on reading
/// keys and still seeded per process, so crafted subjects cannot force collisions.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// Readings one event touches for one meter: summary, total, own window, rollups, the
/// group's total.
const MAX_TOUCHED: usize = 7;

/// One cached reading.
#[derive(Debug)]
pub struct Slot {
    pub key: ReadingKey,
    pub reading: Reading,
    /// KV revision of the stored reading (`None`: not stored yet).
    pub revision: Option<u64>,
    dirty: bool,
}

/// A group of values as readings record it: its token and the values, one copy shared
/// by every reading of the group (across meters with the same groupBy names, too).
#[derive(Debug)]
pub struct GroupInfo {
    pub token: String,
    pub values: SharedGroup,
}

/// The slots an event touches for one meter, in [`Touched`] order, and its group.
#[derive(Clone, Debug)]
pub struct EventSlots {
    idx: [u32; MAX_TOUCHED],
    len: u8,
    pub group: Option<Arc<GroupInfo>>,
}

impl EventSlots {
    pub fn slots(&self) -> &[u32] {
        &self.idx[..usize::from(self.len)]
    }
}

#[derive(Debug)]
struct GroupSlots {
    token: Arc<str>,
    group: Option<Arc<GroupInfo>>,
    /// Start of the meter's own window the slots below are for: rollups contain it, so
    /// the same start means the same slots at every level.
    start: i64,
    windows: [u32; MAX_TOUCHED - 2],
    len: u8,
}

#[derive(Debug)]
struct SubjectSlots {
    total: u32,
    groups: FastMap<Option<u64>, GroupSlots>,
}

/// A meter known to the cache (its number here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MeterRef(u32);

/// A subject known to the cache (its number here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubjectRef(u32);

/// Slots in fixed-size chunks: growing never copies (or briefly doubles) them all.
const CHUNK: usize = 4096;

#[derive(Debug, Default)]
struct Slots(Vec<Vec<Slot>>);

impl Slots {
    fn len(&self) -> usize {
        self.0
            .last()
            .map_or(0, |c| (self.0.len() - 1) * CHUNK + c.len())
    }
    fn push(&mut self, slot: Slot) {
        if self.0.last().is_none_or(|c| c.len() == CHUNK) {
            self.0.push(Vec::with_capacity(CHUNK));
        }
        if let Some(c) = self.0.last_mut() {
            c.push(slot);
        }
    }
}

impl std::ops::Index<u32> for Slots {
    type Output = Slot;
    fn index(&self, i: u32) -> &Slot {
        &self.0[i as usize / CHUNK][i as usize % CHUNK]
    }
}

impl std::ops::IndexMut<u32> for Slots {
    fn index_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.0[i as usize / CHUNK][i as usize % CHUNK]
    }
}

#[derive(Debug, Default)]
pub struct Cache {
    slots: Slots,
    /// Group values by hash, shared by all the readings made here.
    groups: FastMap<u64, Arc<GroupInfo>>,
    index: FastMap<ReadingKey, u32>,
    /// Meters by id, and the slot of each one's summary.
    meters: FastMap<Arc<str>, MeterRef>,
    summaries: Vec<u32>,
    /// Subjects by name (one name shared by every key of the subject).
    subjects: FastMap<Arc<str>, SubjectRef>,
    subject_names: Vec<Arc<str>>,
    /// Per meter and subject: its total and its groups' current windows.
    pairs: FastMap<(u32, u32), SubjectSlots>,
    dirty: Vec<u32>,
    /// Slots made since the last [`Cache::take_unloaded`]: their stored state is unknown.
    unloaded: Vec<u32>,
}

/// The slot of `key`, made (empty, unloaded) when new.
fn slot_of(
    slots: &mut Slots,
    index: &mut FastMap<ReadingKey, u32>,
    unloaded: &mut Vec<u32>,
    key: ReadingKey,
) -> u32 {
    if let Some(&i) = index.get(&key) {
        return i;
    }
    let i = u32::try_from(slots.len()).expect("fewer than 2^32 cached readings");
    index.insert(key.clone(), i);
    slots.push(Slot {
        key,
        reading: Reading::default(),
        revision: None,
        dirty: false,
    });
    unloaded.push(i);
    i
}

impl Cache {
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn slot(&self, i: u32) -> &Slot {
        &self.slots[i]
    }

    /// The cache's number for a meter (look it up once per batch, not per event).
    pub fn meter(&mut self, meter: &CompiledMeter) -> MeterRef {
        if let Some(&m) = self.meters.get(&*meter.id) {
            return m;
        }
        let summary = slot_of(
            &mut self.slots,
            &mut self.index,
            &mut self.unloaded,
            ReadingKey::Summary {
                meter: meter.id.clone(),
            },
        );
        let m = MeterRef(self.summaries.len() as u32);
        self.summaries.push(summary);
        self.meters.insert(meter.id.clone(), m);
        m
    }

    /// The slot of a meter's summary.
    pub fn summary(&mut self, meter: &CompiledMeter) -> u32 {
        let m = self.meter(meter);
        self.summaries[m.0 as usize]
    }

    /// The cache's number for a subject (look it up once per event, not per meter).
    pub fn subject(&mut self, subject: &str) -> SubjectRef {
        if let Some(&s) = self.subjects.get(subject) {
            return s;
        }
        let name: Arc<str> = subject.into();
        let s = SubjectRef(self.subject_names.len() as u32);
        self.subject_names.push(name.clone());
        self.subjects.insert(name, s);
        s
    }

    /// [`Self::touch_at`] by meter definition and subject name (the fold's property
    /// tests drive the cache through it).
    #[cfg(test)]
    pub fn touch(
        &mut self,
        meter: &CompiledMeter,
        subject: &str,
        group: Option<u64>,
        values: impl FnOnce() -> GroupValues,
        time: i64,
    ) -> EventSlots {
        let (m, s) = (self.meter(meter), self.subject(subject));
        self.touch_at(meter, m, s, group, values, time)
    }

    /// The slots a valid event of subject `sref` in group `group` (its hash) at `time`
    /// (epoch seconds) touches for `meter` (numbered `mref`); `values` gives the group's
    /// values when the group is new to the subject.
    pub fn touch_at(
        &mut self,
        meter: &CompiledMeter,
        mref: MeterRef,
        sref: SubjectRef,
        group: Option<u64>,
        values: impl FnOnce() -> GroupValues,
        time: i64,
    ) -> EventSlots {
        let summary = self.summaries[mref.0 as usize];
        let Cache {
            slots,
            index,
            unloaded,
            groups,
            subject_names,
            pairs,
            ..
        } = self;
        let subject = &subject_names[sref.0 as usize];
        let s = pairs
            .entry((mref.0, sref.0))
            .or_insert_with(|| SubjectSlots {
                total: slot_of(
                    slots,
                    index,
                    unloaded,
                    ReadingKey::SubjectTotal {
                        meter: meter.id.clone(),
                        subject: subject.clone(),
                    },
                ),
                groups: FastMap::default(),
            });
        let start = meter.def.window_size.window_start(time);
        let g = s.groups.entry(group).or_insert_with(|| {
            let token: Arc<str> = crate::domain::fold::token_of(group).into();
            GroupSlots {
                group: group.map(|h| {
                    groups
                        .entry(h)
                        .or_insert_with(|| {
                            Arc::new(GroupInfo {
                                token: token.to_string(),
                                values: SharedGroup::new(values()),
                            })
                        })
                        .clone()
                }),
                token,
                // no slots yet: never equal to a real window start below
                start: i64::MIN,
                windows: [0; MAX_TOUCHED - 2],
                len: 0,
            }
        });
        if g.start != start || g.len == 0 {
            let mut n = 0;
            crate::domain::fold::window_keys(meter, subject, &g.token, time, |k| {
                g.windows[n] = slot_of(slots, index, unloaded, k);
                n += 1;
            });
            g.len = n as u8;
            g.start = start;
        }
        let mut idx = [0; MAX_TOUCHED];
        idx[0] = summary;
        idx[1] = s.total;
        let len = 2 + usize::from(g.len);
        idx[2..len].copy_from_slice(&g.windows[..usize::from(g.len)]);
        EventSlots {
            idx,
            len: len as u8,
            group: g.group.clone(),
        }
    }

    /// The slots made since the last call, for the caller to load from KV.
    pub fn take_unloaded(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.unloaded)
    }

    /// What KV holds for a slot (`None`: nothing).
    pub fn loaded(&mut self, i: u32, stored: Option<(Reading, u64)>) {
        let slot = &mut self.slots[i];
        if let Some((reading, revision)) = stored {
            slot.reading = reading;
            slot.revision = Some(revision);
        }
    }

    pub fn reading_mut(&mut self, i: u32) -> &mut Reading {
        &mut self.slots[i].reading
    }

    /// The readings of `slots` for [`crate::domain::fold::apply_valid`].
    pub fn touched<'a>(&'a mut self, slots: &'a EventSlots) -> impl Touched + 'a {
        SlotsTouched {
            cache: self,
            idx: slots.slots(),
        }
    }

    /// Note that a slot's reading is ahead of KV.
    pub fn mark_dirty(&mut self, i: u32) {
        let slot = &mut self.slots[i];
        if !slot.dirty {
            slot.dirty = true;
            self.dirty.push(i);
        }
    }

    pub fn dirty_len(&self) -> usize {
        self.dirty.len()
    }

    /// The slots ahead of KV, which are clean again from here on (the caller writes
    /// them or gives up the whole cache).
    pub fn take_dirty(&mut self) -> Vec<u32> {
        let dirty = std::mem::take(&mut self.dirty);
        for &i in &dirty {
            self.slots[i].dirty = false;
        }
        dirty
    }

    /// Record the KV revision a slot's reading was written at.
    pub fn written(&mut self, i: u32, revision: u64) {
        self.slots[i].revision = Some(revision);
    }

    /// Forget everything (clean or not).
    pub fn clear(&mut self) {
        *self = Cache::default();
    }

    /// Keep only the slots whose key passes `keep` (the per-meter shortcuts are rebuilt
    /// as events come).
    pub fn retain(&mut self, keep: impl Fn(&ReadingKey) -> bool) {
        // (numbers of meters and subjects restart too: callers look them up again)
        let old = std::mem::take(self);
        let unloaded: std::collections::HashSet<u32> = old.unloaded.into_iter().collect();
        for (old_i, slot) in old.slots.0.into_iter().flatten().enumerate() {
            if !keep(&slot.key) {
                continue;
            }
            let i = self.slots.len() as u32;
            self.index.insert(slot.key.clone(), i);
            if slot.dirty {
                self.dirty.push(i);
            }
            if unloaded.contains(&(old_i as u32)) {
                self.unloaded.push(i);
            }
            self.slots.push(slot);
        }
    }
}

struct SlotsTouched<'a> {
    cache: &'a mut Cache,
    idx: &'a [u32],
}

impl Touched for SlotsTouched<'_> {
    fn count(&self) -> usize {
        self.idx.len()
    }
    fn get(&self, i: usize) -> Option<&Reading> {
        Some(&self.cache.slots[self.idx[i]].reading)
    }
    fn at(&mut self, i: usize) -> &mut Reading {
        &mut self.cache.slots[self.idx[i]].reading
    }
}
