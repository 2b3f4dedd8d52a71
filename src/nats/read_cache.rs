//! The readings a query process read lately, kept exact by watching the readings bucket.
//!
//! A dashboard asks the same month again and again, and every time nats-server looks up
//! the same few hundred windows (loading the blocks that hold them once they went unread
//! for ~10 s). This keeps what queries read, present or absent, and answers them again
//! without nats-server, as long as nothing changed them:
//!
//! - A watcher (an ordered consumer of the bucket's stream, headers only) removes a key
//!   the moment a change of it arrives, and publishes how far it has come (`through`, a
//!   stream sequence).
//! - A read first asks the stream for its last sequence and waits until the watcher is
//!   there: whatever the cache then holds is what the bucket held when the read began,
//!   so a reading written before a query is always in its answer (read-your-writes, as
//!   without the cache). A watcher that cannot catch up in [`SYNC_WAIT`] leaves the read
//!   to nats-server alone. The last sequence asked for after a query began serves all
//!   of its reads, and those of every query begun before it was asked: a query of one
//!   subject reads its totals and then its windows, and a dashboard's panels come
//!   together, each needing the stream once, not once a read. A query asks for it
//!   beside its meter's reads ([`ReadCache::look_ahead`]).
//! - What a read brought back is kept unless the watcher saw a change of that key after
//!   the read began (it could be older than the change); changes are remembered for
//!   that long enough (`recent`) or the read keeps nothing.
//! - Purges leave nothing on the stream to watch, so [`Store::purge_keys`] writes a
//!   marker after purging readings (a key under `purged.`): the watcher drops the
//!   purged keys, and reads begun before it keep nothing.
//!
//! Only queries of a few subjects read through it ([`Store::get_readings`]); pages of
//! every subject go to nats-server alone.
//!
//! Memory is bounded by QUERY_CACHE_MB (two generations of half each: the older goes
//! when the newer is full); a watcher that had no read for [`IDLE`] stops and the cache
//! is emptied.
//!
//! [`Store::purge_keys`]: super::store::Store::purge_keys
//! [`Store::get_readings`]: super::store::Store::get_readings

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use bytes::Bytes;
use futures::StreamExt;

/// How long a read waits for the watcher to reach the stream's last sequence.
const SYNC_WAIT: Duration = Duration::from_millis(50);
/// A watcher with no read for this long stops, and the cache empties.
const IDLE: Duration = Duration::from_secs(600);
/// Changes remembered for reads in flight (a read that began before the oldest one
/// forgotten keeps nothing).
const RECENT: usize = 20_000;
/// What an entry costs beyond its key and value (two map slots, the strings' headers).
const ENTRY_OVERHEAD: usize = 96;
/// The key prefix of purge markers (readings keys all begin `r.`).
pub const PURGED: &str = "purged";

/// The marker key written after purging `filter` from the readings bucket, and the key
/// prefix the watcher drops when it sees it (`None`: everything).
pub fn purge_marker(filter: &str) -> String {
    match filter.strip_suffix(".>") {
        Some(prefix) if !prefix.contains(['*', '>']) => format!("{PURGED}.{prefix}"),
        _ => PURGED.to_string(),
    }
}

fn purged_prefix(key: &str) -> Option<Option<String>> {
    if key == PURGED {
        return Some(None);
    }
    key.strip_prefix(PURGED)
        .and_then(|rest| rest.strip_prefix('.'))
        .map(|prefix| Some(format!("{prefix}.")))
}

/// The cached values (`None`: the key is absent) and what the watcher has applied.
#[derive(Default)]
pub struct Entries {
    budget: usize,
    young: HashMap<String, Option<Bytes>>,
    young_bytes: usize,
    old: HashMap<String, Option<Bytes>>,
    /// Every change up to this stream sequence has been applied.
    through: u64,
    /// Keys changed lately, with the sequence of their last change; every change after
    /// `floor` is here (or a purge moved `floor` past it).
    recent: HashMap<String, u64>,
    order: VecDeque<(u64, String)>,
    floor: u64,
}

fn cost(key: &str, value: &Option<Bytes>) -> usize {
    key.len() + value.as_ref().map_or(0, Bytes::len) + ENTRY_OVERHEAD
}

impl Entries {
    pub fn new(budget: usize, through: u64) -> Entries {
        Entries {
            budget,
            through,
            floor: through,
            ..Default::default()
        }
    }

    /// How far the watcher has come.
    pub fn through(&self) -> u64 {
        self.through
    }

    /// What the entries take, roughly (both generations).
    pub fn bytes(&self) -> usize {
        self.young_bytes + self.old.iter().map(|(k, v)| cost(k, v)).sum::<usize>()
    }

    /// The cached value of `key`: `Some(None)` when it is known to be absent.
    pub fn get(&mut self, key: &str) -> Option<Option<Bytes>> {
        if let Some(v) = self.young.get(key) {
            return Some(v.clone());
        }
        // in use again: into the newer generation, so that it outlives the older
        let (key, value) = self.old.remove_entry(key)?;
        let found = value.clone();
        self.keep(key, value);
        Some(found)
    }

    /// What a read begun at stream sequence `since` brought back for `key`, kept unless
    /// the key changed after `since` (the value may be older than the change).
    pub fn insert(&mut self, since: u64, key: String, value: Option<Bytes>) {
        if self.floor > since || self.recent.get(&key).is_some_and(|&seq| seq > since) {
            return;
        }
        // a copy of its own: a value received shares the connection's read buffer
        let value = value.map(|v| Bytes::copy_from_slice(&v));
        self.keep(key, value);
    }

    fn keep(&mut self, key: String, value: Option<Bytes>) {
        let key_len = key.len();
        self.young_bytes += cost(&key, &value);
        if let Some(was) = self.young.insert(key, value) {
            self.young_bytes -= key_len + was.map_or(0, |v| v.len()) + ENTRY_OVERHEAD;
        }
        if self.young_bytes > self.budget / 2 {
            self.old = std::mem::take(&mut self.young);
            self.young_bytes = 0;
        }
    }

    /// The watcher saw `key` change at stream sequence `seq`.
    pub fn changed(&mut self, seq: u64, key: &str) {
        if let Some(prefix) = purged_prefix(key) {
            self.purged(seq, prefix.as_deref());
            return;
        }
        self.forget(key);
        self.recent.insert(key.to_string(), seq);
        self.order.push_back((seq, key.to_string()));
        while self.order.len() > RECENT {
            let Some((old_seq, old_key)) = self.order.pop_front() else {
                break;
            };
            self.floor = self.floor.max(old_seq);
            if self.recent.get(&old_key) == Some(&old_seq) {
                self.recent.remove(&old_key);
            }
        }
        self.through = self.through.max(seq);
    }

    /// Keys under `prefix` (every key: `None`) were purged before stream sequence `seq`.
    fn purged(&mut self, seq: u64, prefix: Option<&str>) {
        match prefix {
            None => {
                self.young.clear();
                self.old.clear();
                self.young_bytes = 0;
            }
            Some(prefix) => {
                let young_freed: usize = self
                    .young
                    .iter()
                    .filter(|(k, _)| k.starts_with(prefix))
                    .map(|(k, v)| cost(k, v))
                    .sum();
                self.young.retain(|k, _| !k.starts_with(prefix));
                self.old.retain(|k, _| !k.starts_with(prefix));
                self.young_bytes -= young_freed;
            }
        }
        // a read begun before the purge may hold what it removed
        self.floor = self.floor.max(seq);
        self.through = self.through.max(seq);
    }

    fn forget(&mut self, key: &str) {
        if let Some(v) = self.young.remove(key) {
            self.young_bytes -= cost(key, &v);
        }
        self.old.remove(key);
    }
}

/// A query process's cache of the readings bucket (one per process, shared by every
/// [`Store`](super::store::Store) handle).
pub struct ReadCache {
    budget: usize,
    state: Mutex<State>,
    /// The watcher's `through`, for reads waiting for it.
    position: tokio::sync::watch::Sender<u64>,
    /// Keys found cached, and keys read past the cache.
    hits: AtomicU64,
    misses: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Present while a watcher runs and has started from a known position.
    entries: Option<Entries>,
    /// When the watched stream was created: a stream made again (an uninstall and a
    /// new install under a process that kept running) starts its sequences again.
    created: Option<time::OffsetDateTime>,
    /// A watcher task is running (or starting).
    watching: bool,
    /// Which watcher the entries are the current one's: one told to stop (its stream
    /// was made again) may still run until its next change, and must touch nothing.
    epoch: u64,
    last_read: Option<Instant>,
    /// When the last watcher failed: the next waits a little.
    failed_at: Option<Instant>,
    /// The latest last sequence the stream answered, and when it was asked for (reads
    /// begun before then may use it).
    synced: Option<Synced>,
}

#[derive(Clone, Copy)]
struct Synced {
    asked: Instant,
    last: u64,
}

/// The outcome of [`ReadCache::lookup`].
pub struct Lookup {
    /// The stream sequence the read began at (for [`ReadCache::keep`]).
    pub since: u64,
    pub hits: HashMap<String, Bytes>,
    pub misses: Vec<String>,
}

impl ReadCache {
    /// A cache of at most `budget` bytes (0: none).
    pub fn new(budget: usize) -> Arc<ReadCache> {
        Arc::new(ReadCache {
            budget,
            state: Mutex::new(State::default()),
            position: tokio::sync::watch::Sender::new(0),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // the state stays consistent at every await-free step, so a panic elsewhere
        // leaves nothing half-done
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cached ones of `keys` (absent keys left out of `hits`) for a read begun at
    /// `began`, once the watcher has caught up with the stream as it stood then; `None`
    /// when the cache cannot answer (off, starting, behind): the read goes to
    /// nats-server whole. Starts the watcher when none runs.
    pub async fn lookup(
        self: &Arc<Self>,
        js: &jetstream::Context,
        stream: &str,
        keys: Vec<String>,
        began: Instant,
    ) -> Option<Lookup> {
        if self.budget == 0 {
            return None;
        }
        let synced = {
            let mut state = self.state();
            state.last_read = Some(Instant::now());
            let resting = state
                .failed_at
                .is_some_and(|t| t.elapsed() < Duration::from_secs(5));
            if !state.watching && !resting {
                state.watching = true;
                state.epoch += 1;
                let epoch = state.epoch;
                tokio::spawn(watch(self.clone(), js.clone(), stream.to_string(), epoch));
            }
            state.entries.as_ref()?;
            state.synced.filter(|s| s.asked >= began)
        };
        let last = match synced {
            Some(synced) => synced.last,
            None => self.sync(js, stream).await?,
        };
        let mut position = self.position.subscribe();
        tokio::time::timeout(SYNC_WAIT, position.wait_for(|&w| w >= last))
            .await
            .ok()?
            .ok()?;
        let mut state = self.state();
        let entries = state.entries.as_mut()?;
        if entries.through() < last {
            return None;
        }
        let mut hits = HashMap::new();
        let mut misses = Vec::new();
        let keys_asked = keys.len();
        for key in keys {
            match entries.get(&key) {
                Some(Some(value)) => {
                    hits.insert(key, value);
                }
                Some(None) => {}
                None => misses.push(key),
            }
        }
        self.hits.fetch_add(
            u64::try_from(keys_asked - misses.len()).unwrap_or(0),
            Ordering::Relaxed,
        );
        self.misses
            .fetch_add(u64::try_from(misses.len()).unwrap_or(0), Ordering::Relaxed);
        Some(Lookup {
            since: last,
            hits,
            misses,
        })
    }

    /// Look at the stream now for reads about to begin, when a watcher runs (a failure
    /// leaves them to look for themselves).
    pub async fn look_ahead(&self, js: &jetstream::Context, stream: &str) {
        if self.budget > 0 && self.state().entries.is_some() {
            self.sync(js, stream).await;
        }
    }

    /// The stream's last sequence, asked for now (and kept for reads begun before).
    async fn sync(&self, js: &jetstream::Context, stream: &str) -> Option<u64> {
        let asked = Instant::now();
        let info = js
            .get_stream_no_info(stream)
            .await
            .ok()?
            .get_info()
            .await
            .ok()?;
        let mut state = self.state();
        if state.created.is_some_and(|c| c != info.created) {
            let epoch = state.epoch;
            drop(state);
            self.stop(epoch, true);
            return None;
        }
        let last = info.state.last_sequence;
        if state.synced.is_none_or(|s| s.asked < asked) {
            state.synced = Some(Synced { asked, last });
        }
        Some(last)
    }

    /// Keep what a read begun at `since` brought back for the keys it asked for.
    pub fn keep(&self, since: u64, asked: Vec<String>, got: &HashMap<String, Bytes>) {
        let mut state = self.state();
        let Some(entries) = state.entries.as_mut() else {
            return;
        };
        for key in asked {
            let value = got.get(&key).cloned();
            entries.insert(since, key, value);
        }
    }

    /// Keys found cached and keys read past the cache, since the process started.
    pub fn reads(&self) -> (u64, u64) {
        (
            self.hits.load(Ordering::Relaxed),
            self.misses.load(Ordering::Relaxed),
        )
    }

    /// What the cache holds now, in bytes.
    pub fn bytes(&self) -> usize {
        self.state().entries.as_ref().map_or(0, Entries::bytes)
    }

    /// Watcher `epoch` stopped (or must): the cache empties.
    fn stop(&self, epoch: u64, failed: bool) {
        let mut state = self.state();
        if state.epoch != epoch {
            return;
        }
        state.epoch += 1;
        state.entries = None;
        state.created = None;
        state.synced = None;
        state.watching = false;
        if failed {
            state.failed_at = Some(Instant::now());
        }
    }

    fn idle(&self) -> bool {
        self.state().last_read.is_none_or(|t| t.elapsed() > IDLE)
    }
}

/// The watcher: applies every change of the bucket to the cache until it goes idle or
/// the stream fails it (then the cache empties and the next read starts another).
async fn watch(cache: Arc<ReadCache>, js: jetstream::Context, stream_name: String, epoch: u64) {
    match watch_until_idle(&cache, &js, &stream_name, epoch).await {
        Ok(()) => cache.stop(epoch, false),
        Err(e) => {
            tracing::warn!(stream = %stream_name, error = %format!("{e:#}"), "query cache watcher stopped; queries read nats-server directly until it restarts");
            cache.stop(epoch, true);
        }
    }
}

async fn watch_until_idle(
    cache: &Arc<ReadCache>,
    js: &jetstream::Context,
    stream_name: &str,
    epoch: u64,
) -> anyhow::Result<()> {
    let mut stream = js.get_stream(stream_name).await?;
    let info = stream.info().await?;
    let (from, created) = (info.state.last_sequence, info.created);
    let prefix = format!(
        "$KV.{}.",
        stream_name.strip_prefix("KV_").unwrap_or(stream_name)
    );
    let consumer = stream
        .create_consumer(consumer::push::OrderedConfig {
            deliver_subject: js.client().new_inbox(),
            description: Some("kloudmeter query cache".into()),
            filter_subject: format!("{prefix}>"),
            headers_only: true,
            replay_policy: consumer::ReplayPolicy::Instant,
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from + 1,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    {
        let mut state = cache.state();
        if state.epoch != epoch {
            return Ok(());
        }
        state.entries = Some(Entries::new(cache.budget, from));
        state.created = Some(created);
    }
    cache.position.send_replace(from);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            message = messages.next() => {
                let Some(message) = message else {
                    anyhow::bail!("the readings watch ended");
                };
                let message = message?;
                let seq = message.info().map_err(|e| anyhow::anyhow!("{e}"))?.stream_sequence;
                let key = message.subject.as_str().strip_prefix(&prefix).unwrap_or_default();
                let through = {
                    let mut state = cache.state();
                    if state.epoch != epoch {
                        return Ok(());
                    }
                    let Some(entries) = state.entries.as_mut() else {
                        return Ok(());
                    };
                    entries.changed(seq, key);
                    entries.through()
                };
                cache.position.send_replace(through);
            }
            _ = tick.tick() => {
                if cache.idle() || cache.state().epoch != epoch {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Option<Bytes> {
        Some(Bytes::from(s.to_string()))
    }

    #[test]
    fn a_change_removes_the_key_and_a_read_from_before_it_is_not_kept() {
        let mut e = Entries::new(1 << 20, 10);
        e.insert(10, "r.a.1".into(), v("one"));
        e.insert(10, "r.a.2".into(), None);
        assert_eq!(e.get("r.a.1"), Some(v("one")));
        assert_eq!(e.get("r.a.2"), Some(None));
        e.changed(11, "r.a.1");
        assert_eq!(e.get("r.a.1"), None);
        // read begun at 10 brought the value from before 11: refused
        e.insert(10, "r.a.1".into(), v("one"));
        assert_eq!(e.get("r.a.1"), None);
        // read begun at 11 saw the change
        e.insert(11, "r.a.1".into(), v("two"));
        assert_eq!(e.get("r.a.1"), Some(v("two")));
        // absent keys written later are removed too
        e.changed(12, "r.a.2");
        assert_eq!(e.get("r.a.2"), None);
        assert_eq!(e.through(), 12);
    }

    #[test]
    fn a_purge_marker_drops_its_prefix_and_refuses_reads_from_before_it() {
        let mut e = Entries::new(1 << 20, 0);
        e.insert(0, "r.a.1".into(), v("a"));
        e.insert(0, "r.ab.1".into(), v("ab"));
        assert_eq!(purge_marker("r.a.>"), "purged.r.a");
        e.changed(5, &purge_marker("r.a.>"));
        assert_eq!(e.get("r.a.1"), None);
        assert_eq!(e.get("r.ab.1"), Some(v("ab")));
        e.insert(4, "r.ab.2".into(), v("x"));
        assert_eq!(e.get("r.ab.2"), None);
        e.insert(5, "r.ab.2".into(), v("x"));
        assert_eq!(e.get("r.ab.2"), Some(v("x")));
        // a filter with wildcards inside purges everything
        assert_eq!(purge_marker("r.*.x.>"), "purged");
        e.changed(6, &purge_marker("r.*.x.>"));
        assert_eq!(e.get("r.ab.1"), None);
        assert_eq!(e.get("r.ab.2"), None);
    }

    #[test]
    fn reads_older_than_the_changes_remembered_keep_nothing() {
        let mut e = Entries::new(1 << 20, 0);
        for seq in 1..=(RECENT as u64 + 1) {
            e.changed(seq, &format!("r.k.{seq}"));
        }
        // the change at 1 is forgotten: a read begun at 0 cannot tell whether it is older
        e.insert(0, "r.other".into(), v("x"));
        assert_eq!(e.get("r.other"), None);
        e.insert(1, "r.other".into(), v("x"));
        assert_eq!(e.get("r.other"), Some(v("x")));
    }

    #[test]
    fn the_budget_bounds_the_entries_and_the_older_generation_goes_first() {
        let budget = 10 * (ENTRY_OVERHEAD + 8);
        let mut e = Entries::new(budget, 0);
        for i in 0..100 {
            e.insert(0, format!("r.k.{i:03}"), v("1234"));
            assert!(
                e.bytes() <= budget + ENTRY_OVERHEAD + 8,
                "{} bytes",
                e.bytes()
            );
        }
        assert_eq!(e.get("r.k.000"), None);
        assert_eq!(e.get("r.k.099"), Some(v("1234")));
        // a key read again moves to the newer generation and outlives its old peers
        let kept = (0..100)
            .map(|i| format!("r.k.{i:03}"))
            .find(|k| e.old.contains_key(k))
            .unwrap();
        assert_eq!(e.get(&kept), Some(v("1234")));
        assert!(e.young.contains_key(&kept));
    }
}
