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

/// Where a meter's readings are read from, and how far they are.
#[derive(Clone, Debug)]
pub struct Served {
    /// The name its served readings are stored under (see [`keys::readings_id`]).
    pub readings_id: String,
    /// Complete for the current definition and followed live.
    pub ready: bool,
    /// Building: percent done.
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

    pub async fn progress(&self, id: &str) -> Result<Option<Progress>, StoreError> {
        let key = keys::progress_key(id);
        match self.state.get(&key).await.map_err(unavailable)? {
            Some(raw) => decode(&key, &raw).map(Some),
            None => Ok(None),
        }
    }

    /// Every meter's progress record, by meter id.
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
            if let Some(id) = keys::progress_meter_of(&item.key) {
                match decode(&item.key, &item.value) {
                    Ok(p) => {
                        out.insert(id, p);
                    }
                    Err(e) => tracing::error!(error = %e, "unreadable build progress"),
                }
            }
        }
        Ok(out)
    }

    pub async fn put_progress(&self, id: &str, p: &Progress) -> Result<(), StoreError> {
        let key = keys::progress_key(id);
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
    ) -> Result<Option<(MeterDef, String)>, StoreError> {
        let (def, record) = futures::try_join!(self.meter(id), self.progress(id))?;
        let generation = record.as_ref().and_then(Progress::served).unwrap_or(0);
        Ok(def.map(|def| (def, keys::readings_id(id, generation))))
    }

    /// Where readers find a meter's readings.
    pub async fn served(&self, def: &MeterDef) -> Result<Served, StoreError> {
        // built for the definition as TENANCY scopes it
        let def = &self.scoped(def.clone());
        let record = self.progress(&def.id).await?;
        let p = record.as_ref();
        Ok(Served {
            readings_id: keys::readings_id(&def.id, p.and_then(Progress::served).unwrap_or(0)),
            ready: p.is_some_and(|p| p.built(def)),
            progress: p.and_then(|p| p.percent(def)),
            rebuilt_from: p
                .and_then(|p| p.rebuilt_from)
                .and_then(|s| chrono::DateTime::from_timestamp(s, 0)),
            suspended: def.suspend,
            record,
        })
    }

    /// Remove one generation of a meter's readings.
    pub async fn purge_generation(&self, id: &str, generation: u64) -> Result<(), StoreError> {
        let filter = keys::meter_readings_filter(&keys::readings_id(id, generation));
        self.purge_keys(&self.readings, &filter)
            .await
            .map_err(unavailable)
    }

    /// Remove everything stored for a deleted meter: every generation of its readings,
    /// its dead letters, its progress record (last, so that a failure part-way leaves
    /// the record that names the generations left). The one place meters are removed.
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
            .purge(keys::progress_key(id))
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
    pub async fn ordered_subjects(&self, def: &MeterDef) -> Result<Arc<[String]>, StoreError> {
        let counted = self
            .reading(&ReadingKey::Summary {
                meter: def.id.as_str().into(),
            })
            .await?
            .map_or(0, |summary| summary.subjects);
        let entry = (def.id.clone(), def.semantic_hash());
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
        let keys = self
            .list_keys(&self.readings, &keys::subject_totals_filter(&def.id, None))
            .await
            .map_err(unavailable)?;
        let mut subjects: Vec<String> = keys
            .iter()
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
        meter: &str,
        subjects: &[String],
    ) -> Result<Vec<(String, Reading)>, StoreError> {
        let keys: Vec<String> = subjects
            .iter()
            .map(|subject| {
                ReadingKey::SubjectTotal {
                    meter: meter.into(),
                    subject: subject.as_str().into(),
                }
                .kv_key()
            })
            .collect();
        let mut values = self
            .get_many(&self.readings, keys.clone())
            .await
            .map_err(unavailable)?;
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

    /// The all-time reading of every subject of a meter (or of one subject), by subject.
    pub async fn subject_totals(
        &self,
        meter: &str,
        subject: Option<&str>,
    ) -> Result<Vec<(String, Reading)>, StoreError> {
        let items = self
            .scan(&self.readings, &keys::subject_totals_filter(meter, subject))
            .await
            .map_err(unavailable)?;
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
        meter: &str,
    ) -> Result<Vec<(String, String, Reading)>, StoreError> {
        let items = self
            .scan(&self.readings, &keys::group_totals_filter(meter))
            .await
            .map_err(unavailable)?;
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
