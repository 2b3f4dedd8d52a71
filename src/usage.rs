//! The read side of usage: the rows a query asks for, read from the stored windows that
//! [`crate::domain::query`] plans and merged exactly. What the HTTP API answers queries
//! with and what threshold evaluation reads period values with; it knows nothing of
//! HTTP.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::{StreamExt, TryStreamExt};
use serde_json::Value;

use crate::domain::fold::{Acc, Reading};
use crate::domain::meter::{MeterDef, WindowSize};
use crate::domain::query;
use crate::domain::query::Chunk;
use crate::domain::window::Rollup;
use crate::error::FieldError;
use crate::nats::keys;
use crate::nats::meters::{Readings, StoreError};
use crate::nats::store::{KvItem, Store};

/// Why a query could not be answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum UsageError {
    /// The query asks for something the stored windows cannot answer: the caller's to
    /// change, naming the parameter.
    #[error(transparent)]
    Invalid(FieldError),
    /// NATS could not be read.
    #[error("reading stored windows: {0}")]
    Storage(String),
    /// A stored reading does not decode: a bug or corruption.
    #[error("a stored reading does not decode: {0}")]
    Corrupt(String),
}

impl From<serde_json::Error> for UsageError {
    fn from(e: serde_json::Error) -> Self {
        UsageError::Corrupt(e.to_string())
    }
}

type Result<T> = std::result::Result<T, UsageError>;

impl UsageError {
    fn storage(e: impl std::fmt::Display) -> Self {
        UsageError::Storage(e.to_string())
    }
}

impl From<StoreError> for UsageError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(_) => UsageError::storage(e),
            StoreError::Corrupt { .. } => UsageError::Corrupt(e.to_string()),
        }
    }
}

/// What one stored window contributes to a query: (output window, the [`Target`] it is
/// read for, the reading's accumulator or the part of it in range — `None`: nothing
/// stored —, and whether it is taken away rather than added: [`query::signed_cover`]).
type Fetched = (usize, usize, Option<Acc>, bool);

/// Most window scans (one per stored window and partition) an all-subject query makes
/// instead of a get per subject and window.
const MOST_SCANS: usize = 64;

/// Most stored windows one query may read.
const QUERY_KEY_LIMIT: usize = 500_000;

/// A subject to answer for, with what its total says about where its windows are.
pub(crate) struct Subject {
    pub name: String,
    /// Every group it has been seen with (`_` alone for meters without `groupBy`).
    pub groups: BTreeMap<String, crate::domain::fold::SharedGroup>,
    /// The UTC days it has events on, when its total keeps them: windows of other days
    /// are not read.
    pub days: Option<crate::domain::fold::DaySet>,
}

/// Subjects to answer for (every one, or those named that were counted), each with
/// its groups.
pub(crate) async fn query_subjects(
    store: &Store,
    at: &Readings,
    wanted: Option<&[String]>,
) -> Result<Vec<Subject>> {
    let totals = match wanted {
        None => store.subject_totals(at, None).await?,
        Some(names) => store.totals_of(at, names).await?,
    };
    Ok(totals
        .into_iter()
        .map(|(name, r)| Subject {
            name,
            groups: if r.groups.is_empty() {
                BTreeMap::from([("_".to_string(), Default::default())])
            } else {
                r.groups
            },
            days: r.days,
        })
        .collect())
}

/// Most stored windows of each subject a query may read for its subjects' totals to go
/// unread: a total (one more read each) only tells which of them to skip.
const WINDOWS_WORTH_NO_TOTAL: usize = 2;

/// The subjects of a slice of the meter's subject index, for a query reading `stored`
/// stored windows of each subject ([`stored_windows`]). A meter without `groupBy` has
/// one group, `_`, so its totals are read only for the days they keep; those save no
/// read when each subject reads [`WINDOWS_WORTH_NO_TOTAL`] stored windows or fewer, and
/// then the slice reads half as many keys: a month's total reads one month rollup, and
/// so do a month's DAY windows in UTC (30 of its parts; parts without events are
/// dropped once read). Across more stored windows (DAY windows in Berlin read the day
/// rollups), the days spare the reads of days without events.
async fn listed_subjects(
    store: &Store,
    def: &MeterDef,
    at: &Readings,
    names: Vec<String>,
    stored: usize,
) -> Result<Vec<Subject>> {
    if !def.group_by.is_empty() || stored > WINDOWS_WORTH_NO_TOTAL {
        return query_subjects(store, at, Some(&names)).await;
    }
    Ok(names
        .into_iter()
        .map(|name| Subject {
            name,
            groups: BTreeMap::from([("_".to_string(), Default::default())]),
            days: None,
        })
        .collect())
}

/// Output windows: [start, end).
type Windows = Vec<(DateTime<Utc>, DateTime<Utc>)>;

/// Stored windows (or parts of them), per output window.
type Covers = Vec<Vec<Chunk>>;

/// A subject and group a query reads windows of: what all those reads share, made once
/// (a month in a half-hour zone reads over 200 windows of each).
struct Target<'s> {
    subject: &'s str,
    /// The UTC days the subject has events on, when known: windows of other days are
    /// not read.
    days: Option<&'s crate::domain::fold::DaySet>,
    /// The group's values the query keeps (its `groupBy`).
    projected: BTreeMap<String, Value>,
    /// `projected` as JSON: groups that project alike merge under it.
    projected_key: String,
    /// The answer it is merged into: targets with the same subject and projected group
    /// share one.
    answer: usize,
    /// Its windows' keys up to the window's start ([`keys::window_key_prefix`]).
    key_prefix: String,
}

/// The stored windows a query reads, and what they are read for.
struct Plan<'s> {
    targets: Vec<Target<'s>>,
    reads: Reads,
}

/// Planned reads and the keys they read, each key once: a month of DAY windows reads 30
/// parts of one month rollup, which is one key to get and decode, not 30.
#[derive(Default)]
struct Reads {
    keys: Vec<String>,
    planned: Vec<Planned>,
}

/// One stored window to read for an output window and target.
struct Planned {
    window: usize,
    /// Index into [`Plan::targets`].
    target: usize,
    /// Index into [`Reads::keys`].
    key: usize,
    chunk: Chunk,
    /// The parameter that set the boundary inside `chunk`, when it is a part.
    edge: &'static str,
}

/// What a planned read found.
enum Taken {
    Fetched(Fetched),
    /// Parts of a rollup whose reading keeps none (written before rollups kept parts):
    /// to read again as the windows inside its span ([`query::cover_in_windows`]).
    Finer(Planned),
}

impl Target<'_> {
    /// Whether the subject may have events in the span [a, b): only the stored windows on
    /// days it has events are read (all, when its days are unknown).
    fn may_have_events(&self, (a, b): (i64, i64)) -> bool {
        self.days.is_none_or(|d| d.touches(a, b))
    }
}

impl Planned {
    /// The reading's contribution: all of it, or its parts in range — refused when an
    /// HOUR window at a range's edge did not keep its quarters.
    fn take(self, reading: Option<&Reading>) -> Result<Taken> {
        let acc = match (reading, self.chunk.part) {
            (None, _) => None,
            (Some(r), None) => Some(r.acc.clone()),
            (Some(r), Some((lo, hi))) => match r.part(usize::from(lo)..usize::from(hi)) {
                Some(acc) => Some(acc),
                None if self.chunk.rollup_part() => return Ok(Taken::Finer(self)),
                None => return Err(no_quarters(self.edge, self.chunk.start)),
            },
        };
        Ok(Taken::Fetched((
            self.window,
            self.target,
            acc,
            self.chunk.minus,
        )))
    }
}

/// An edge inside an hour that holds events without 15-minute detail.
fn no_quarters(field: &'static str, hour: i64) -> UsageError {
    let at = DateTime::from_timestamp(hour, 0).unwrap_or_default();
    UsageError::Invalid(FieldError::new(
        field,
        format!(
            "a window boundary falls inside the hour from {}, which holds events without 15-minute detail (recorded before quarters were kept, or more distinct values than one reading keeps); choose boundaries on whole hours",
            query::rfc3339(at)
        ),
    ))
}

/// Subjects as [`query_subjects`] finds them.
type Subjects = Vec<Subject>;

fn too_many_windows() -> UsageError {
    UsageError::Invalid(FieldError::new(
        "windowSize",
        format!("the query would read more than {QUERY_KEY_LIMIT} stored windows; narrow from/to or use a coarser windowSize"),
    ))
}

/// The rows of a parsed query over the meter's served readings, `at`
/// ([`Store::served`]). Also what threshold evaluation reads period values with.
pub(crate) async fn execute(
    store: &Store,
    def: &MeterDef,
    at: &Readings,
    p: &query::QueryParams,
) -> Result<Vec<query::Row>> {
    Ok(execute_page(store, def, at, p).await?.0)
}

/// [`execute`] for one page when the query asks for one (`p.page`): the rows of up to
/// `limit` subjects after the cursor's, in subject order, and the cursor of the next
/// page while more subjects remain.
pub(crate) async fn execute_page(
    store: &Store,
    def: &MeterDef,
    at: &Readings,
    p: &query::QueryParams,
) -> Result<(Vec<query::Row>, Option<String>)> {
    let (windows, covers) = plan_windows(def, p)?;
    let chunk_list = stored_windows(&covers);
    let stored = chunk_list.len();
    // Every subject over few stored windows: one snapshot read per stored window (all
    // subjects and groups at once) is far cheaper than a get per subject, and runs
    // beside the read of the subject list. A page reads only its own subjects.
    let scan_mode = p.subjects.is_empty()
        && p.page.is_none()
        && chunk_list.len() * at.all().len() <= MOST_SCANS;
    let scans = async {
        if scan_mode {
            scan_windows(store, at, chunk_list).await
        } else {
            Ok(Vec::new())
        }
    };
    let named = (!p.subjects.is_empty()).then_some(p.subjects.as_slice());
    let subjects_read = async {
        match (&p.page, named) {
            (None, _) => Ok((query_subjects(store, at, named).await?, None)),
            // every subject, from the ordered index: only the page's totals are read
            (Some(page), None) => {
                let (slice, next) = page_of(&store.ordered_subjects(def, at).await?, page);
                Ok((listed_subjects(store, def, at, slice, stored).await?, next))
            }
            // the subjects it names that were counted, paged
            (Some(page), Some(_)) => {
                let mut counted = query_subjects(store, at, named).await?;
                sort_subjects(&mut counted);
                let names: Vec<String> = counted.iter().map(|s| s.name.clone()).collect();
                let (slice, next) = page_of(&names, page);
                counted.retain(|s| slice.binary_search(&s.name).is_ok());
                Ok((counted, next))
            }
        }
    };
    let ((subjects, next), scans) = futures::try_join!(subjects_read, scans)?;
    let Plan { targets, reads } = plan_reads(def, at, p, &covers, &subjects)?;
    let found = scan_mode.then(|| scanned(scans));
    let fetched = read_planned(store, def, at, &targets, reads, found).await?;
    Ok((query::rows(&windows, merge(&targets, fetched), def), next))
}

/// Output windows and the stored windows covering each.
fn plan_windows(def: &MeterDef, p: &query::QueryParams) -> Result<(Windows, Covers)> {
    let windows = query::output_windows(p).ok_or_else(|| {
        UsageError::Invalid(FieldError::new(
            "windowSize",
            format!(
                "more than {} windows between from and to; narrow the range or use a coarser windowSize",
                query::MAX_WINDOWS
            ),
        ))
    })?;
    let covers = cover_windows(&windows, def, p)?;
    Ok((windows, covers))
}

/// The subjects of one page out of subjects in order, and the next page's cursor while
/// more remain.
fn page_of(ordered: &[String], page: &query::Page) -> (Vec<String>, Option<String>) {
    let first = match &page.after {
        Some(after) => ordered.partition_point(|s| s <= after),
        None => 0,
    };
    let end = first.saturating_add(page.limit).min(ordered.len());
    let next =
        (end < ordered.len() && end > first).then(|| query::encode_cursor(&ordered[end - 1]));
    (ordered[first..end].to_vec(), next)
}

fn sort_subjects(subjects: &mut Subjects) {
    subjects.sort_by(|a, b| a.name.cmp(&b.name));
    subjects.dedup_by(|a, b| a.name == b.name);
}

/// An all-subject query answered a slice of subjects at a time: the ordered subject
/// list is read once ([`Store::ordered_subjects`]), each [`Self::next_rows`] reads only
/// its slice's totals and windows. What a streamed answer uses, so that neither the
/// rows nor the reads of the whole set are held at once.
pub(crate) struct Pages {
    store: Store,
    def: MeterDef,
    at: Readings,
    p: query::QueryParams,
    windows: Windows,
    covers: Covers,
    subjects: std::sync::Arc<[String]>,
    /// How many subjects were answered.
    done: usize,
    size: usize,
}

impl Pages {
    /// Checks the query and lists the meter's subjects.
    pub async fn start(
        store: Store,
        def: MeterDef,
        at: Readings,
        p: query::QueryParams,
        size: usize,
    ) -> Result<Pages> {
        let (windows, covers) = plan_windows(&def, &p)?;
        let subjects = store.ordered_subjects(&def, &at).await?;
        Ok(Pages {
            store,
            def,
            at,
            p,
            windows,
            covers,
            subjects,
            done: 0,
            size: size.max(1),
        })
    }

    /// The rows of the next slice of subjects; `None` once every subject is answered.
    pub async fn next_rows(&mut self) -> Option<Result<Vec<query::Row>>> {
        if self.done >= self.subjects.len() {
            return None;
        }
        let end = self.done.saturating_add(self.size).min(self.subjects.len());
        // the whole set in one slice over few stored windows: scanning each window once
        // beats a get per subject, as in a query that is not streamed
        let chunks = stored_windows(&self.covers);
        let stored = chunks.len();
        let whole = self.done == 0
            && end == self.subjects.len()
            && chunks.len() * self.at.all().len() <= MOST_SCANS;
        let names = self.subjects[self.done..end].to_vec();
        self.done = end;
        let rows = async {
            let slice = listed_subjects(&self.store, &self.def, &self.at, names, stored).await?;
            let Plan { targets, reads } =
                plan_reads(&self.def, &self.at, &self.p, &self.covers, &slice)?;
            let found = if whole {
                Some(scanned(scan_windows(&self.store, &self.at, chunks).await?))
            } else {
                None
            };
            let fetched =
                read_planned(&self.store, &self.def, &self.at, &targets, reads, found).await?;
            Ok(query::rows(
                &self.windows,
                merge(&targets, fetched),
                &self.def,
            ))
        };
        Some(rows.await)
    }
}

/// The stored windows that cover each output window exactly; an output boundary that is
/// no boundary stored (see [`query::cover`]) is refused, naming the parameter that set it.
fn cover_windows(
    windows: &[(DateTime<Utc>, DateTime<Utc>)],
    def: &MeterDef,
    p: &query::QueryParams,
) -> Result<Covers> {
    windows
        .iter()
        .map(|(a, b)| {
            let (a, b) = (a.timestamp(), b.timestamp());
            let covered = if takes_away(def.aggregation) {
                query::signed_cover(a, b, def.window_size)
            } else {
                query::cover(a, b, def.window_size)
            };
            covered.map_err(|t| {
                let finest = match def.window_size {
                    WindowSize::Hour => "a quarter hour".to_string(),
                    other => format!(
                        "the meter's {} windows",
                        format!("{other:?}").to_uppercase()
                    ),
                };
                UsageError::Invalid(FieldError::new(
                    field_at(p, t),
                    format!("window boundaries must fall on {finest}"),
                ))
            })
        })
        .collect()
}

/// The stored windows the covers read, each once (an hour two edges share is one).
fn stored_windows(covers: &Covers) -> Vec<(Option<Rollup>, i64)> {
    let mut windows: Vec<(Option<Rollup>, i64)> = covers
        .iter()
        .flatten()
        .map(|c| (c.rollup, c.start))
        .collect();
    windows.sort();
    windows.dedup();
    windows
}

/// Every subject's and group's reading of each stored window, one scan per window
/// (and partition).
async fn scan_windows(
    store: &Store,
    at: &Readings,
    chunks: Vec<(Option<Rollup>, i64)>,
) -> Result<Vec<Vec<KvItem>>> {
    let filters: Vec<String> = chunks
        .iter()
        .flat_map(|&(rollup, start)| {
            at.all()
                .iter()
                .map(move |id| keys::window_filter(id, rollup, start))
        })
        .collect();
    futures::stream::iter(filters)
        .map(|filter| async move {
            store
                .scan(&store.readings, &filter)
                .await
                .map_err(UsageError::storage)
        })
        .buffer_unordered(8)
        .try_collect()
        .await
}

/// Which stored windows to read, for which output window, subject and projected group.
/// Refused before anything large is built when it would read too many.
fn plan_reads<'s>(
    def: &MeterDef,
    at: &Readings,
    p: &query::QueryParams,
    covers: &Covers,
    subjects: &'s Subjects,
) -> Result<Plan<'s>> {
    let chunks: usize = covers.iter().map(Vec::len).sum();
    let groups: usize = subjects.iter().map(|s| s.groups.len()).sum();
    if chunks.saturating_mul(groups) > QUERY_KEY_LIMIT {
        return Err(too_many_windows());
    }
    // every subject's groups that pass the filters, with the days it has events on
    let mut targets = Vec::new();
    let mut answers: HashMap<(&str, String), usize> = HashMap::new();
    for subject in subjects {
        for (token, values) in &subject.groups {
            if !query::group_matches(values, &p.filters) {
                continue;
            }
            let projected = query::project(values, &p.group_by);
            let projected_key = serde_json::to_string(&projected)?;
            let next = answers.len();
            let answer = *answers
                .entry((subject.name.as_str(), projected_key.clone()))
                .or_insert(next);
            targets.push(Target {
                subject: &subject.name,
                days: subject.days.as_ref(),
                projected_key,
                answer,
                projected,
                key_prefix: keys::window_key_prefix(at.of(&subject.name), &subject.name, token),
            });
        }
    }
    // what every target's reads share, worked out once
    let stored = stored_windows(covers);
    let chunks: Vec<ChunkRead> = covers
        .iter()
        .enumerate()
        .flat_map(|(window, chunks)| chunks.iter().map(move |c| (window, *c)))
        .map(|(window, chunk)| ChunkRead {
            window,
            chunk,
            edge: edge_field(p, &chunk),
            span: chunk.span(def.window_size),
            // (always found: `stored` lists every chunk's window)
            stored: stored
                .binary_search(&(chunk.rollup, chunk.start))
                .unwrap_or_default(),
        })
        .collect();
    let mut reads = Reads::default();
    let mut key_of = vec![None; stored.len()];
    for (ti, target) in targets.iter().enumerate() {
        key_of.fill(None);
        for c in &chunks {
            if !target.may_have_events(c.span) {
                continue;
            }
            let key = *key_of[c.stored].get_or_insert_with(|| reads.key(target, c.chunk));
            reads.planned.push(Planned {
                window: c.window,
                target: ti,
                key,
                chunk: c.chunk,
                edge: c.edge,
            });
        }
        if reads.planned.len() > QUERY_KEY_LIMIT {
            return Err(too_many_windows());
        }
    }
    Ok(Plan { targets, reads })
}

/// What reading one chunk of an output window's cover takes, whatever the target.
struct ChunkRead {
    window: usize,
    chunk: Chunk,
    /// The parameter that set the boundary inside `chunk` ([`edge_field`]).
    edge: &'static str,
    span: (i64, i64),
    /// Index into the query's [`stored_windows`].
    stored: usize,
}

impl Reads {
    /// A new key: the stored window `chunk` reads of `target`.
    fn key(&mut self, target: &Target, chunk: Chunk) -> usize {
        self.keys.push(keys::window_key(
            &target.key_prefix,
            chunk.rollup,
            chunk.start,
        ));
        self.keys.len() - 1
    }
}

/// Reads of the windows inside the spans of rollup parts whose readings keep none.
fn finer_reads(def: &MeterDef, targets: &[Target], coarse: Vec<Planned>) -> Result<Reads> {
    let mut reads = Reads::default();
    // each finer window's key once per target, as in `plan_reads`
    let mut known: HashMap<(usize, Option<Rollup>, i64), usize> = HashMap::new();
    for c in coarse {
        let (a, b) = c.chunk.span(def.window_size);
        // (a rollup part's span lies on whole hours or days: always covered)
        let chunks = query::cover_in_windows(a, b, def.window_size)
            .map_err(|t| UsageError::Corrupt(format!("no windows cover a rollup part at {t}")))?;
        for chunk in chunks {
            let chunk = Chunk {
                minus: c.chunk.minus,
                ..chunk
            };
            let target = &targets[c.target];
            if !target.may_have_events(chunk.span(def.window_size)) {
                continue;
            }
            let key = *known
                .entry((c.target, chunk.rollup, chunk.start))
                .or_insert_with(|| reads.key(target, chunk));
            reads.planned.push(Planned {
                window: c.window,
                target: c.target,
                key,
                chunk,
                edge: c.edge,
            });
        }
    }
    Ok(reads)
}

/// Which parameter set a boundary at `t` (epoch seconds): `from`, `to`, or the zone's
/// midnights (`windowTimeZone`).
fn field_at(p: &query::QueryParams, t: i64) -> &'static str {
    if t == p.from.timestamp() {
        "from"
    } else if t == p.to.timestamp() {
        "to"
    } else {
        "windowTimeZone"
    }
}

/// Which parameter set the boundary inside a part of one of the meter's own windows (a
/// rollup's parts are never refused: they are read as finer windows instead).
fn edge_field(p: &query::QueryParams, chunk: &Chunk) -> &'static str {
    let (None, Some((lo, hi))) = (chunk.rollup, chunk.part) else {
        return "windowTimeZone";
    };
    let at = |q: u8| chunk.start + crate::domain::meter::QUARTER * i64::from(q);
    field_at(p, if lo > 0 { at(lo) } else { at(hi) })
}

/// Stored values by key.
type Found = HashMap<String, bytes::Bytes>;

/// The planned readings out of `found` (each stored window decoded once, however many
/// output windows read it), and the rollup parts to read again as finer windows. What
/// holds no event (a part of a month without events that day) is left out: it adds
/// nothing and takes nothing away.
fn take_found(reads: Reads, found: &Found) -> Result<(Vec<Fetched>, Vec<Planned>)> {
    // parts are decoded only for the windows some read takes a part of
    let mut with_parts = vec![false; reads.keys.len()];
    for p in reads.planned.iter().filter(|p| p.chunk.part.is_some()) {
        with_parts[p.key] = true;
    }
    let decoded: Vec<Option<Reading>> = reads
        .keys
        .iter()
        .zip(with_parts)
        .map(|(key, parts)| {
            found
                .get(key)
                .map(|raw| Reading::queried_window(raw, parts))
                .transpose()
        })
        .collect::<serde_json::Result<_>>()?;
    let mut fetched = Vec::with_capacity(reads.planned.len());
    let mut finer = Vec::new();
    for p in reads.planned {
        let reading = decoded[p.key].as_ref();
        match p.take(reading)? {
            Taken::Fetched((_, _, None, _)) => {}
            Taken::Fetched((_, _, Some(acc), _)) if acc.count == 0 => {}
            Taken::Fetched(f) => fetched.push(f),
            Taken::Finer(p) => finer.push(p),
        }
    }
    Ok((fetched, finer))
}

/// The planned readings, out of `found` (window scans) or else one pipelined get each;
/// rollup parts whose readings keep none are read again as the windows inside them.
async fn read_planned(
    store: &Store,
    def: &MeterDef,
    at: &Readings,
    targets: &[Target<'_>],
    plan: Reads,
    found: Option<Found>,
) -> Result<Vec<Fetched>> {
    // a query of a few subjects (a customer's dashboard, asked again and again) reads
    // through the query cache; pages of every subject do not
    let subjects: HashSet<&str> = targets.iter().map(|t| t.subject).collect();
    let cached = (subjects.len() <= CACHED_SUBJECTS).then_some(at.asked);
    let found = match found {
        Some(found) => found,
        None => get_values(store, &plan.keys, cached).await?,
    };
    let (mut fetched, finer) = take_found(plan, &found)?;
    if !finer.is_empty() {
        let plan = finer_reads(def, targets, finer)?;
        let found = get_values(store, &plan.keys, cached).await?;
        let (more, parts) = take_found(plan, &found)?;
        if !parts.is_empty() {
            return Err(UsageError::Corrupt("finer windows read as parts".into()));
        }
        fetched.extend(more);
    }
    Ok(fetched)
}

/// The window scans' values by key.
fn scanned(scans: Vec<Vec<KvItem>>) -> Found {
    scans
        .into_iter()
        .flatten()
        .map(|item| (item.key, item.value))
        .collect()
}

/// The most subjects a query may read and go through the query cache.
pub(crate) const CACHED_SUBJECTS: usize = 16;

/// The values of the planned keys (each named once), one pipelined get each (`cached`:
/// through the query cache, for a query begun then).
async fn get_values(store: &Store, keys: &[String], cached: Option<Instant>) -> Result<Found> {
    let keys = keys.to_vec();
    let read = match cached {
        Some(began) => store.get_readings(keys, began).await,
        None => store.get_many(&store.readings, keys).await,
    };
    read.map_err(UsageError::storage)
}

/// Whether readings of this aggregation can be taken away again exactly: its value
/// depends only on the count and the sum.
fn takes_away(aggregation: crate::domain::meter::Aggregation) -> bool {
    use crate::domain::meter::Aggregation::{Avg, Count, Sum};
    matches!(aggregation, Count | Sum | Avg)
}

/// Readings merged exactly per (output window, subject, projected group): every
/// reading added first, then those a signed cover takes away.
fn merge(targets: &[Target], fetched: Vec<Fetched>) -> query::Merged {
    // by (output window, answer) first: the answer's names are copied once, not per read
    let mut by_answer: HashMap<(usize, usize), (usize, Acc)> = HashMap::new();
    let (added, taken): (Vec<Fetched>, Vec<Fetched>) = fetched.into_iter().partition(|f| !f.3);
    for (wi, ti, acc, minus) in added.into_iter().chain(taken) {
        let Some(acc) = acc else { continue };
        let entry = &mut by_answer
            .entry((wi, targets[ti].answer))
            .or_insert_with(|| (ti, Acc::default()))
            .1;
        if minus {
            entry.take_away(&acc);
        } else {
            entry.merge(&acc);
        }
    }
    by_answer
        .into_iter()
        .map(|((wi, _), (ti, acc))| {
            let target = &targets[ti];
            (
                (wi, target.subject.to_string(), target.projected_key.clone()),
                (target.projected.clone(), acc),
            )
        })
        .collect()
}
