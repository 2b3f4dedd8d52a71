//! Typed access to the meter definitions (meters bucket), their build progress (state
//! bucket) and, for readers, their readings: callers deal in [`MeterDef`], [`Progress`]
//! and [`Reading`], never in keys or bytes. (The aggregator reads and writes readings
//! itself, with revisions, on its hot path.)

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_nats::jetstream::kv::CreateErrorKind;
use serde::Deserialize;

use super::keys;
use super::store::Store;
use crate::domain::fold::Reading;
use crate::domain::meter::MeterDef;
use crate::domain::window::ReadingKey;

/// What went wrong with a stored record: NATS did not answer (retry later), or a record
/// does not decode (a bug or corruption; never the caller's doing).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("NATS: {0}")]
    Unavailable(String),
    #[error("record {key} does not decode: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn decode<T: for<'de> Deserialize<'de>>(key: &str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

pub use crate::domain::build::Progress;

/// Where a meter's served readings are stored, partition by partition: each partition
/// keeps its subjects' readings (and its part of the meter's summary) under a name of
/// its own ([`keys::part_id`], [`keys::readings_id`]), so that partitions build and
/// switch generations independently.
#[derive(Clone, Debug)]
pub struct Readings {
    ids: Vec<String>,
    partitions: crate::domain::partition::Partitions,
    /// When they were looked up: reads of them answer at least what was written before
    /// (a query's reads through the query cache share one look at the stream).
    pub asked: std::time::Instant,
}

impl Readings {
    /// The names of `meter`'s readings at the generation each partition serves.
    pub fn new(meter: &str, generations: &[u64]) -> Readings {
        let asked = std::time::Instant::now();
        let partitions = crate::domain::partition::Partitions::new(generations.len() as u16)
            .unwrap_or(crate::domain::partition::Partitions::ONE);
        Readings {
            ids: partitions
                .all()
                .map(|p| {
                    let generation = generations.get(usize::from(p)).copied().unwrap_or(0);
                    keys::readings_id(&keys::part_id(meter, p), generation)
                })
                .collect(),
            partitions,
            asked,
        }
    }

    /// Where one subject's readings are.
    pub fn of(&self, subject: &str) -> &str {
        &self.ids[usize::from(self.partitions.of(subject))]
    }

    /// Every partition's name, partition 0's first.
    pub fn all(&self) -> &[String] {
        &self.ids
    }
}

/// Where a meter's readings are read from, and how far they are.
#[derive(Clone, Debug)]
pub struct Served {
    pub readings: Readings,
    /// Complete for the current definition and followed live (in every partition).
    pub ready: bool,
    /// Building: percent done (of the partition furthest behind).
    pub progress: Option<u8>,
    /// Windows starting before this kept the previous definition's readings.
    pub rebuilt_from: Option<chrono::DateTime<chrono::Utc>>,
    pub suspended: bool,
    pub record: Option<Progress>,
}

impl Store {
    pub async fn meter(&self, id: &str) -> Result<Option<MeterDef>, StoreError> {
        let key = keys::meter_key(id);
        match self.meters.get(&key).await.map_err(unavailable)? {
            Some(raw) => decode(&key, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// Every meter definition, by id. One that does not decode is left out (and logged):
    /// a listing shows what it can.
    pub async fn all_meters(&self) -> Result<Vec<MeterDef>, StoreError> {
        let items = self
            .scan(&self.meters, keys::ALL_METERS)
            .await
            .map_err(unavailable)?;
        let mut defs: Vec<MeterDef> = items
            .iter()
            .filter_map(|i| {
                decode(&i.key, &i.value)
                    .inspect_err(|e| tracing::error!(error = %e, "unreadable meter definition"))
                    .ok()
            })
            .collect();
        defs.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(defs)
    }

    pub async fn put_meter(&self, def: &MeterDef) -> Result<(), StoreError> {
        let body = serde_json::to_vec(def).map_err(|source| StoreError::Corrupt {
            key: keys::meter_key(&def.id),
            source,
        })?;
        self.meters
            .put(keys::meter_key(&def.id), body.into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// Create a definition; `false` when the id is already taken.
    pub async fn create_meter(&self, def: &MeterDef) -> Result<bool, StoreError> {
        let key = keys::meter_key(&def.id);
        let body = serde_json::to_vec(def).map_err(|source| StoreError::Corrupt {
            key: key.clone(),
            source,
        })?;
        match self.meters.create(key, body.into()).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(unavailable(e)),
        }
    }

    /// Delete a definition (every process's registry follows; the aggregator then removes
    /// the meter's readings).
    pub async fn delete_meter(&self, id: &str) -> Result<(), StoreError> {
        self.meters
            .delete(keys::meter_key(id))
            .await
            .map_err(unavailable)
    }

    /// A meter's build progress in this handle's partition.
    pub async fn progress(&self, id: &str) -> Result<Option<Progress>, StoreError> {
        self.progress_in(id, self.names.partition).await
    }

    /// A meter's build progress in partition `p`.
    pub async fn progress_in(&self, id: &str, p: u16) -> Result<Option<Progress>, StoreError> {
        let key = keys::progress_key(&keys::part_id(id, p));
        match self.state.get(&key).await.map_err(unavailable)? {
            Some(raw) => decode(&key, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// Every meter's progress record in this handle's partition, by meter id.
    pub async fn all_progress(
        &self,
    ) -> Result<std::collections::HashMap<String, Progress>, StoreError> {
        let items = self
            .scan(&self.state, keys::ALL_PROGRESS)
            .await
            .map_err(unavailable)?;
        // One that does not decode is left out (and logged): the meter is then built
        // afresh rather than every meter's metering stopping on it.
        let mut out = std::collections::HashMap::new();
        for item in items {
            if let Some(name) = keys::progress_meter_of(&item.key) {
                let (id, partition) = keys::split_part_id(&name);
                if partition != self.names.partition {
                    continue;
                }
                match decode(&item.key, &item.value) {
                    Ok(p) => {
                        out.insert(id.to_string(), p);
                    }
                    Err(e) => tracing::error!(error = %e, "unreadable build progress"),
                }
            }
        }
        Ok(out)
    }

    pub async fn put_progress(&self, id: &str, p: &Progress) -> Result<(), StoreError> {
        let key = keys::progress_key(&self.names.part_id(id));
        let body = serde_json::to_vec(p).map_err(|source| StoreError::Corrupt {
            key: key.clone(),
            source,
        })?;
        self.state
            .put(key, body.into())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// A meter's definition and the name its served readings are stored under, read
    /// side by side (one round trip where [`Self::meter`] then [`Self::served`] take
    /// two: what a query waits for before it reads any reading).
    pub async fn meter_and_readings(
        &self,
        id: &str,
    ) -> Result<Option<(MeterDef, Readings)>, StoreError> {
        let asked = std::time::Instant::now();
        // the query cache's look at the readings stream goes beside these reads, not
        // after them
        let look_ahead = async {
            self.look_ahead_readings().await;
            Ok(())
        };
        let (def, records, ()) =
            futures::try_join!(self.meter(id), self.every_progress(id), look_ahead)?;
        let generations: Vec<u64> = records
            .iter()
            .map(|r| r.as_ref().and_then(Progress::served).unwrap_or(0))
            .collect();
        Ok(def.map(|def| {
            let readings = Readings {
                asked,
                ..Readings::new(id, &generations)
            };
            (def, readings)
        }))
    }

    /// A meter's build progress in every partition, partition 0's first.
    async fn every_progress(&self, id: &str) -> Result<Vec<Option<Progress>>, StoreError> {
        futures::future::try_join_all(self.partitions.all().map(|p| self.progress_in(id, p))).await
    }

    /// Where readers find a meter's readings.
    pub async fn served(&self, def: &MeterDef) -> Result<Served, StoreError> {
        // built for the definition as TENANCY scopes it
        let def = &self.scoped(def.clone());
        let mut records = self.every_progress(&def.id).await?;
        let generations: Vec<u64> = records
            .iter()
            .map(|r| r.as_ref().and_then(Progress::served).unwrap_or(0))
            .collect();
        let ready = records
            .iter()
            .all(|r| r.as_ref().is_some_and(|p| p.built(def)));
        let progress = records
            .iter()
            .filter_map(|r| r.as_ref().and_then(|p| p.percent(def)))
            .min();
        let record = records.swap_remove(0);
        let p = record.as_ref();
        Ok(Served {
            readings: Readings::new(&def.id, &generations),
            ready,
            progress,
            rebuilt_from: p
                .and_then(|p| p.rebuilt_from)
                .and_then(|s| chrono::DateTime::from_timestamp(s, 0)),
            suspended: def.suspend,
            record,
        })
    }

    /// Remove one generation of this partition's part of a meter's readings.
    pub async fn purge_generation(&self, id: &str, generation: u64) -> Result<(), StoreError> {
        let filter =
            keys::meter_readings_filter(&keys::readings_id(&self.names.part_id(id), generation));
        self.purge_keys(&self.readings, &filter)
            .await
            .map_err(unavailable)
    }

    /// Remove everything this partition stored for a deleted meter: every generation of
    /// its readings, its dead letters, its progress record (last, so that a failure
    /// part-way leaves the record that names the generations left). The one place meters
    /// are removed (each partition's owner removes its part).
    pub async fn purge_meter(&self, id: &str) -> Result<(), StoreError> {
        let generations = match self.progress(id).await {
            Ok(Some(p)) => p.generations(),
            Ok(None) | Err(StoreError::Corrupt { .. }) => vec![0],
            Err(e) => return Err(e),
        };
        for generation in generations {
            self.purge_generation(id, generation).await?;
        }
        if let Err(e) = self
            .events_dl_purge(&self.names.deadletter_subject(id))
            .await
        {
            tracing::warn!(meter = %id, error = %e, "could not purge dead letters");
        }
        self.state
            .purge(keys::progress_key(&self.names.part_id(id)))
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

/// Meters' subjects in order, so that a page of an all-subject query finds its subjects
/// without reading every subject's total. Entries are keyed by the served readings and
/// the definition's fingerprint, and reused while the meter's summary counts as many
/// subjects as were listed (a meter only gains subjects while its readings are served)
/// and for at most [`SUBJECT_INDEX_TTL`] — a meter deleted and defined again gains the
/// same fingerprint and starts counting afresh.
#[derive(Clone, Default)]
pub struct SubjectIndex(Arc<Mutex<HashMap<(String, String), Listed>>>);

struct Listed {
    subjects: Arc<[String]>,
    at: std::time::Instant,
}

/// How long a listing of subjects is reused at most.
const SUBJECT_INDEX_TTL: std::time::Duration = std::time::Duration::from_secs(60);

/// How many meters' listings are kept (the oldest goes first).
const SUBJECT_INDEX_METERS: usize = 16;

impl Store {
    /// Every subject of a meter's served readings (`def.id`), in order: the subject
    /// totals' keys as the bucket's stream lists them ([`Store::list_keys`]), reused as
    /// [`SubjectIndex`] says.
    pub async fn ordered_subjects(
        &self,
        def: &MeterDef,
        at: &Readings,
    ) -> Result<Arc<[String]>, StoreError> {
        let counted = self
            .summary(at)
            .await?
            .map_or(0, |summary| summary.subjects);
        let entry = (at.all().join(","), def.semantic_hash());
        {
            let cache = self
                .subject_index
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(listed) = cache.get(&entry).filter(|l| {
                l.subjects.len() as u64 == counted && l.at.elapsed() < SUBJECT_INDEX_TTL
            }) {
                return Ok(listed.subjects.clone());
            }
        }
        let filters: Vec<String> = at
            .all()
            .iter()
            .map(|id| keys::subject_totals_filter(id, None))
            .collect();
        let listings = futures::future::try_join_all(
            filters.iter().map(|f| self.list_keys(&self.readings, f)),
        )
        .await
        .map_err(unavailable)?;
        let mut subjects: Vec<String> = listings
            .iter()
            .flatten()
            .filter_map(|k| keys::subject_of_total(k))
            .collect();
        subjects.sort_unstable();
        subjects.dedup();
        let subjects: Arc<[String]> = subjects.into();
        // kept only when the listing agrees with the summary: one taken while a new
        // subject was being written is used once and listed again next time
        if subjects.len() as u64 == counted {
            let mut cache = self
                .subject_index
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if cache.len() >= SUBJECT_INDEX_METERS && !cache.contains_key(&entry) {
                let oldest = cache
                    .iter()
                    .min_by_key(|(_, l)| l.at)
                    .map(|(k, _)| k.clone());
                if let Some(oldest) = oldest {
                    cache.remove(&oldest);
                }
            }
            cache.insert(
                entry,
                Listed {
                    subjects: subjects.clone(),
                    at: std::time::Instant::now(),
                },
            );
        }
        Ok(subjects)
    }

    /// The all-time readings of the given subjects of a meter (those counted so far),
    /// in one batched read.
    pub async fn totals_of(
        &self,
        at: &Readings,
        subjects: &[String],
    ) -> Result<Vec<(String, Reading)>, StoreError> {
        let keys: Vec<String> = subjects
            .iter()
            .map(|subject| {
                ReadingKey::SubjectTotal {
                    meter: at.of(subject).into(),
                    subject: subject.as_str().into(),
                }
                .kv_key()
            })
            .collect();
        let read = if subjects.len() <= crate::usage::CACHED_SUBJECTS {
            self.get_readings(keys.clone(), at.asked).await
        } else {
            self.get_many(&self.readings, keys.clone()).await
        };
        let mut values = read.map_err(unavailable)?;
        let mut out = Vec::with_capacity(subjects.len());
        for (subject, key) in subjects.iter().zip(&keys) {
            if let Some(raw) = values.remove(key) {
                out.push((subject.clone(), decode(key, &raw)?));
            }
        }
        Ok(out)
    }

    /// One reading (`None`: nothing counted there yet).
    pub async fn reading(&self, key: &ReadingKey) -> Result<Option<Reading>, StoreError> {
        let key = key.kv_key();
        match self.readings.get(&key).await.map_err(unavailable)? {
            Some(raw) => decode(&key, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// A meter's summary: every partition's part merged (counts and sums add, distinct
    /// sets unite, subjects add up as each subject lives in one partition).
    pub async fn summary(&self, at: &Readings) -> Result<Option<Reading>, StoreError> {
        let keys: Vec<ReadingKey> = at
            .all()
            .iter()
            .map(|id| ReadingKey::Summary {
                meter: id.as_str().into(),
            })
            .collect();
        let parts = futures::future::try_join_all(keys.iter().map(|k| self.reading(k))).await?;
        Ok(parts.into_iter().flatten().reduce(|mut whole, part| {
            whole.merge_summary(&part);
            whole
        }))
    }

    /// Every key matching a filter made for each partition's readings, read together.
    async fn scan_partitions(
        &self,
        at: &Readings,
        filter: impl Fn(&str) -> String,
    ) -> Result<Vec<super::store::KvItem>, StoreError> {
        let filters: Vec<String> = at.all().iter().map(|id| filter(id)).collect();
        let scans =
            futures::future::try_join_all(filters.iter().map(|f| self.scan(&self.readings, f)))
                .await
                .map_err(unavailable)?;
        Ok(scans.into_iter().flatten().collect())
    }

    /// The all-time reading of every subject of a meter (or of one subject), by subject.
    pub async fn subject_totals(
        &self,
        at: &Readings,
        subject: Option<&str>,
    ) -> Result<Vec<(String, Reading)>, StoreError> {
        let items = match subject {
            Some(s) => self
                .scan(
                    &self.readings,
                    &keys::subject_totals_filter(at.of(s), subject),
                )
                .await
                .map_err(unavailable)?,
            None => {
                self.scan_partitions(at, |id| keys::subject_totals_filter(id, None))
                    .await?
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Some(subject) = keys::subject_of_total(&item.key) {
                out.push((subject, decode(&item.key, &item.value)?));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// Every subject's per-group all-time readings of a meter with `groupBy`, by subject
    /// then group token.
    pub async fn group_totals(
        &self,
        at: &Readings,
    ) -> Result<Vec<(String, String, Reading)>, StoreError> {
        let items = self.scan_partitions(at, keys::group_totals_filter).await?;
        let mut out = Vec::with_capacity(items.len());
        for item in items {
            if let Some((subject, group)) = keys::group_total_of(&item.key) {
                out.push((subject, group, decode(&item.key, &item.value)?));
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        Ok(out)
    }
}
