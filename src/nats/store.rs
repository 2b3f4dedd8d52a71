//! The NATS layer: connection, the event stream and KV buckets (created or updated at
//! start-up, idempotently), and a few primitives the rest of the code shares.

use crate::domain::meter::MeterDef;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use async_nats::jetstream::{self, consumer, kv, message::PublishMessage, object_store, stream};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use crate::config::NatsConfig;

type Pending = Result<jetstream::context::PublishAckFuture>;

async fn settle(pending: Pending) -> Result<u64> {
    Ok(pending?.await?.sequence)
}
use crate::domain::partition::Partitions;
use crate::nats::keys::Names;
use crate::nats::read_cache::ReadCache;

/// Handles to everything KloudMeter keeps in NATS.
#[derive(Clone)]
pub struct Store {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// Ingestion, on a connection of its own (see `open`).
    pub ingest: crate::ingest::publisher::Publisher,
    /// Names of the installation, as seen from this handle's partition.
    pub names: Names,
    /// How many partitions the events are spread over (recorded on partition 0's stream).
    pub partitions: Partitions,
    /// This handle's partition's events, claim log and claim snapshots (partition 0's for
    /// the handle [`Store::connect`] gives; [`Store::partition`] gives the others).
    pub events: stream::Stream,
    pub meters: kv::Store,
    pub readings: kv::Store,
    pub claims: stream::Stream,
    /// Where the leader leaves snapshots of the claim index for cold starts.
    pub claim_snapshots: object_store::ObjectStore,
    pub state: kv::Store,
    pub leader: kv::Store,
    /// Threshold notifications, and the crossings already notified.
    pub notifications: stream::Stream,
    pub fired: kv::Store,
    /// Whose events each meter counts (TENANCY), given to definitions as they are read
    /// for aggregation and serving ([`Store::scoped`]).
    pub tenancy: crate::domain::tenancy::Tenancy,
    /// Meters' subjects in order, listed once for pages ([`Store::ordered_subjects`]).
    pub(crate) subject_index: super::meters::SubjectIndex,
    /// The readings queries read lately, kept exact by a watch of the bucket.
    pub(crate) read_cache: Arc<ReadCache>,
}

/// One live entry of a KV bucket.
#[derive(Clone, Debug)]
pub struct KvItem {
    pub key: String,
    pub value: Bytes,
    pub revision: u64,
}

impl Store {
    /// Connect (retrying until NATS answers) and make sure the stream and buckets exist
    /// with the configured limits.
    pub async fn connect(cfg: &NatsConfig) -> Result<Store> {
        Self::open(cfg, true).await
    }

    /// Connect without retrying (for `kloudmeter setup`): fail if NATS is not there.
    pub async fn connect_once(cfg: &NatsConfig) -> Result<Store> {
        Self::open(cfg, false).await
    }

    async fn open(cfg: &NatsConfig, retry: bool) -> Result<Store> {
        let mut options = async_nats::ConnectOptions::new()
            .name("kloudmeter")
            .connection_timeout(Duration::from_secs(5));
        if retry {
            options = options.retry_on_initial_connect();
        }
        let servers = cfg.servers().map_err(anyhow::Error::msg)?;
        let client = options
            .clone()
            .connect(servers.as_slice())
            .await
            .with_context(|| format!("connecting to NATS at {}", cfg.nats_url))?;
        // Ingested events travel on a connection of their own: one connection is one
        // socket and one task on each side, and the aggregator's deliveries, claim-log
        // appends and reading writes would otherwise queue in front of publish acks.
        let ingest_client = options
            .name("kloudmeter-ingest")
            .connect(servers.as_slice())
            .await
            .with_context(|| format!("connecting to NATS at {}", cfg.nats_url))?;
        let ingest = crate::ingest::publisher::Publisher::start(ingest_client)
            .await
            .context("subscribing to JetStream acknowledgements")?;
        let js = jetstream::new(client.clone());
        let names = Names::new(&cfg.meter_nats_stream);
        let partitions = recorded_partitions(&js, &names, cfg).await?;
        let mut configs = shared_stream_configs(&names, cfg).to_vec();
        for p in partitions.all() {
            configs.extend(partition_stream_configs(
                &names.partition(p),
                partitions,
                cfg,
            ));
        }
        for config in configs {
            let name = config.name.clone();
            js.create_or_update_stream(config)
                .await
                .with_context(|| format!("creating or updating stream {name}"))?;
        }
        let (events, claims, claim_snapshots) = partition_handles(&js, &names).await?;
        let notifications = js.get_stream(names.notifications_stream()).await?;
        let mut buckets = Vec::with_capacity(5);
        for config in bucket_configs(&names, cfg) {
            let name = config.bucket.clone();
            buckets.push(
                js.create_or_update_key_value(config)
                    .await
                    .with_context(|| format!("creating or updating KV bucket {name}"))?,
            );
        }
        let [meters, readings, state, leader, fired]: [kv::Store; 5] = buckets
            .try_into()
            .map_err(|_| anyhow::anyhow!("expected five KV buckets"))?;
        Ok(Store {
            client,
            js,
            ingest,
            names,
            partitions,
            events,
            meters,
            readings,
            claims,
            claim_snapshots,
            state,
            leader,
            notifications,
            fired,
            tenancy: cfg.tenancy(),
            subject_index: Default::default(),
            read_cache: ReadCache::new(cfg.query_cache_mb.saturating_mul(1 << 20)),
        })
    }

    /// The same installation seen from partition `p`: its events, claim log and claim
    /// snapshots, and the names of what it keeps of its own (cursor, progress, readings).
    pub async fn partition(&self, p: u16) -> Result<Store> {
        let names = self.names.partition(p);
        let (events, claims, claim_snapshots) = partition_handles(&self.js, &names).await?;
        Ok(Store {
            names,
            events,
            claims,
            claim_snapshots,
            ..self.clone()
        })
    }

    /// `def` with the scope TENANCY gives it: what the aggregator folds and what its
    /// readings are built for. Definitions as written and compared stay unscoped.
    pub fn scoped(&self, def: MeterDef) -> MeterDef {
        MeterDef {
            scope: self.tenancy.scope_of(&def.id),
            ..def
        }
    }

    pub fn connected(&self) -> bool {
        use async_nats::connection::State;
        self.client.connection_state() == State::Connected && self.ingest.connected()
    }

    /// The keys of `bucket` that match `filter`, from the stream's index of subjects:
    /// no entry is read, so a listing of 100,000 keys costs one paged request instead of
    /// 100,000 deliveries. A key whose last entry is a delete marker is listed too (the
    /// readings bucket deletes nothing: it purges, which leaves no subject behind).
    pub async fn list_keys(&self, bucket: &kv::Store, filter: &str) -> Result<Vec<String>> {
        let prefix = format!("$KV.{}.", bucket.name);
        let stream = self.js.get_stream(format!("KV_{}", bucket.name)).await?;
        let mut subjects = stream
            .info_with_subjects(format!("{prefix}{filter}"))
            .await?;
        let mut keys = Vec::new();
        while let Some((subject, _)) = subjects.try_next().await? {
            if let Some(key) = subject.strip_prefix(&prefix) {
                keys.push(key.to_string());
            }
        }
        Ok(keys)
    }

    /// Every live entry of `bucket` whose key matches `filter` (NATS wildcards allowed),
    /// read as a snapshot: it returns once it has seen what existed when it started.
    pub async fn scan(&self, bucket: &kv::Store, filter: &str) -> Result<Vec<KvItem>> {
        let stream_name = format!("KV_{}", bucket.name);
        let prefix = format!("$KV.{}.", bucket.name);
        let stream = self.js.get_stream(&stream_name).await?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let consumer = stream
                .create_consumer(consumer::pull::OrderedConfig {
                    filter_subject: format!("{prefix}{filter}"),
                    deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                    ..Default::default()
                })
                .await?;
            let name = consumer.cached_info().name.clone();
            let scanned = read_scan(consumer, &prefix).await;
            // Removed as soon as it is read (in the background: the answer need not
            // wait). Left to expire (30 s for an ordered consumer), the consumers of a
            // client that polls readings add up to the server's consumer limit.
            let owner = stream.clone();
            tokio::spawn(async move {
                let _ = owner.delete_consumer(&name).await;
            });
            match scanned {
                Err(ScanError::Vanished) if attempt < 3 => continue,
                Err(ScanError::Vanished) => {
                    anyhow::bail!("{filter}: entries kept vanishing while being read")
                }
                Err(ScanError::Failed(e)) => return Err(e),
                Ok(items) => return Ok(items),
            }
        }
    }

    /// [`Store::get_many`] of readings, out of the query cache where it holds them
    /// ([`ReadCache`]). For queries of a few subjects: pages of every subject would
    /// push out what those asked for, and measured through the cache they cost more
    /// than they gained. Whatever was written before `began` (when the query began) is
    /// in the values.
    pub async fn get_readings(
        &self,
        keys: Vec<String>,
        began: std::time::Instant,
    ) -> Result<std::collections::HashMap<String, Bytes>> {
        let bucket = &self.readings;
        let stream = format!("KV_{}", bucket.name);
        let Some(cached) = self
            .read_cache
            .lookup(&self.js, &stream, keys.clone(), began)
            .await
        else {
            return self.get_many(bucket, keys).await;
        };
        let mut found = cached.hits;
        if !cached.misses.is_empty() {
            let fetched = self.get_many(bucket, cached.misses.clone()).await?;
            self.read_cache.keep(cached.since, cached.misses, &fetched);
            found.extend(fetched);
        }
        Ok(found)
    }

    /// Where the query cache can answer reads about to begin, let it look at the readings
    /// stream now (a query of one subject, asked again and again, then waits for
    /// nothing but its meter).
    pub async fn look_ahead_readings(&self) {
        let stream = format!("KV_{}", self.readings.name);
        self.read_cache.look_ahead(&self.js, &stream).await;
    }

    /// Keys [`Store::get_readings`] found in the query cache and keys it read past it.
    pub fn query_cache_reads(&self) -> (u64, u64) {
        self.read_cache.reads()
    }

    /// The current values of many keys of `bucket` (absent and deleted keys left out),
    /// read with JetStream's batched direct get: one request names up to
    /// [`MULTI_GET`] keys and the server streams their last values back, ended by an
    /// end-of-batch status. A query's thousands of window reads cost a few round trips
    /// instead of one each.
    pub async fn get_many(
        &self,
        bucket: &kv::Store,
        keys: Vec<String>,
    ) -> Result<std::collections::HashMap<String, Bytes>> {
        let api = format!("$JS.API.DIRECT.GET.KV_{}", bucket.name);
        let prefix = format!("$KV.{}.", bucket.name);
        let chunks: Vec<Vec<String>> = keys.chunks(MULTI_GET).map(<[String]>::to_vec).collect();
        let parts: Vec<Vec<(String, Bytes)>> = futures::stream::iter(chunks)
            .map(|chunk| multi_get(self, bucket, &api, &prefix, chunk))
            .buffer_unordered(8)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        Ok(parts.into_iter().flatten().collect())
    }
}

/// Keys one batched direct get names (the server refuses more than 1,024).
const MULTI_GET: usize = 1_000;

/// How long a batched direct get may go without its next message.
const MULTI_GET_IDLE: Duration = Duration::from_secs(5);

/// The keys of one [`Store::get_many`] chunk. Should the server end a batch before every
/// key (it bounds a batch's bytes), the keys it did not answer are asked for again in
/// a batch of their own; one by one only if a batch answers none of them.
async fn multi_get(
    store: &Store,
    bucket: &kv::Store,
    api: &str,
    prefix: &str,
    keys: Vec<String>,
) -> Result<Vec<(String, Bytes)>> {
    let mut out = Vec::with_capacity(keys.len());
    let mut left = keys;
    loop {
        let (got, complete) = one_batch(store, api, prefix, &left).await?;
        if complete {
            out.extend(got);
            return Ok(out);
        }
        if got.is_empty() {
            break;
        }
        let seen: std::collections::HashSet<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
        left.retain(|k| !seen.contains(k.as_str()));
        out.extend(got);
    }
    for key in left {
        if let Some(value) = bucket.get(&key).await? {
            out.push((key, value));
        }
    }
    Ok(out)
}

/// One batched direct get: the values it brought (deleted keys left out) and whether
/// the server said it answered every key.
async fn one_batch(
    store: &Store,
    api: &str,
    prefix: &str,
    keys: &[String],
) -> Result<(Vec<(String, Bytes)>, bool)> {
    let inbox = store.client.new_inbox();
    let mut replies = store.client.subscribe(inbox.clone()).await?;
    let subjects: Vec<String> = keys.iter().map(|k| format!("{prefix}{k}")).collect();
    let request = serde_json::to_vec(&serde_json::json!({ "multi_last": subjects }))?;
    store
        .client
        .publish_with_reply(api.to_string(), inbox, request.into())
        .await?;
    let mut out = Vec::with_capacity(keys.len());
    let mut complete = false;
    while let Some(msg) = tokio::time::timeout(MULTI_GET_IDLE, replies.next())
        .await
        .context("a batched read of readings went unanswered")?
    {
        match msg.status.map(|s| s.as_u16()) {
            // end of batch: complete unless the server says more were left
            Some(204) => {
                complete = header(&msg, "Nats-Num-Pending").is_none_or(|n| n == "0");
                break;
            }
            // none of the keys exists
            Some(404) => {
                complete = true;
                break;
            }
            Some(code) => anyhow::bail!(
                "batched read of readings refused: {code} {}",
                msg.description.unwrap_or_default()
            ),
            None => {}
        }
        let deleted = header(&msg, "KV-Operation").is_some_and(|op| op == "DEL" || op == "PURGE");
        if let Some(key) = header(&msg, "Nats-Subject").and_then(|s| s.strip_prefix(prefix)) {
            if !deleted {
                out.push((key.to_string(), msg.payload.clone()));
            }
        }
    }
    let _ = replies.unsubscribe().await;
    Ok((out, complete))
}

fn header<'a>(msg: &'a async_nats::Message, name: &str) -> Option<&'a str> {
    msg.headers.as_ref()?.get(name).map(|v| v.as_str())
}

/// Why a scan did not complete.
enum ScanError {
    /// Entries counted when the scan began were purged before they were delivered (a
    /// meter's old generation removed meanwhile): the scan is read again.
    Vanished,
    Failed(anyhow::Error),
}

/// How long a scan waits for the next entry it counted before deciding it was purged.
const SCAN_STALL: Duration = Duration::from_secs(2);

/// Every live key of a scan's consumer, with its value and revision.
async fn read_scan(
    consumer: consumer::Consumer<consumer::pull::OrderedConfig>,
    prefix: &str,
) -> Result<Vec<KvItem>, ScanError> {
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    let failed = |e: anyhow::Error| ScanError::Failed(e);
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| failed(anyhow::Error::new(e)))?;
    loop {
        let msg = match tokio::time::timeout(SCAN_STALL, messages.next()).await {
            Ok(Some(msg)) => msg.map_err(|e| failed(anyhow::Error::new(e)))?,
            Ok(None) => break,
            Err(_) => return Err(ScanError::Vanished),
        };
        let info = msg.info().map_err(|e| failed(anyhow::anyhow!("{e}")))?;
        let (left, revision) = (info.pending, info.stream_sequence);
        let op = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("KV-Operation"))
            .map(|v| v.as_str().to_string());
        if op.is_none() {
            let key = msg
                .subject
                .as_str()
                .strip_prefix(prefix)
                .unwrap_or_default()
                .to_string();
            out.push(KvItem {
                key,
                value: msg.payload.clone(),
                revision,
            });
        }
        if left == 0 {
            break;
        }
    }
    Ok(out)
}

impl Store {
    /// An ordered consumer over the stored events of one type after stream sequence
    /// `after` (builds and the hand-over to the live pass replay them).
    pub async fn events_of_type_after(
        &self,
        event_type: &str,
        after: u64,
    ) -> Result<consumer::Consumer<consumer::pull::OrderedConfig>> {
        Ok(self
            .events
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.names.event_subject(event_type),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await?)
    }

    /// Remove every entry of `bucket` under `filter` in one call (no per-key deletes).
    pub async fn purge_keys(&self, bucket: &kv::Store, filter: &str) -> Result<()> {
        let stream = self.js.get_stream(format!("KV_{}", bucket.name)).await?;
        stream
            .purge()
            .filter(format!("$KV.{}.{}", bucket.name, filter))
            .await
            .with_context(|| format!("purging {filter} from {}", bucket.name))?;
        if bucket.name == self.readings.name {
            // what tells query caches (every process's) to drop the purged readings:
            // a purge leaves nothing on the stream to watch
            bucket
                .purge(super::read_cache::purge_marker(filter))
                .await
                .with_context(|| format!("marking {filter} purged in {}", bucket.name))?;
        }
        Ok(())
    }
}

impl Store {
    /// Publish many messages with at most `window` acknowledgements outstanding, awaiting
    /// them oldest first (they arrive in order). An item that is an error is not published
    /// and keeps its place. One outcome per item, in
    /// order: the stream sequence of the stored message.
    pub async fn publish_all(
        &self,
        messages: Vec<Result<(String, PublishMessage)>>,
        window: usize,
    ) -> Vec<Result<u64>> {
        let mut outcomes = Vec::new();
        let mut waiting = std::collections::VecDeque::with_capacity(window);
        for item in messages {
            if waiting.len() >= window {
                if let Some(ack) = waiting.pop_front() {
                    outcomes.push(settle(ack).await);
                }
            }
            let pending = match item {
                Ok((subject, message)) => self
                    .js
                    .send_publish(subject, message)
                    .await
                    .map_err(anyhow::Error::from),
                Err(e) => Err(e),
            };
            waiting.push_back(pending);
        }
        for ack in waiting {
            outcomes.push(settle(ack).await);
        }
        outcomes
    }

    /// Drop the dead letters kept for one meter.
    pub async fn events_dl_purge(&self, subject: &str) -> Result<()> {
        let stream = self.js.get_stream(self.names.deadletter_stream()).await?;
        stream.purge().filter(subject).await?;
        Ok(())
    }
}

/// Where the number of partitions is recorded: the metadata of partition 0's events
/// stream (the stream of before partitions existed, which therefore counts one).
const PARTITIONS_METADATA: &str = "kloudmeter.partitions";

/// The partitions this installation was created with: PARTITIONS when its events stream
/// is new, what partition 0's stream records otherwise (one for a stream made before
/// partitions were recorded). A different PARTITIONS is refused: every subject would
/// move to another partition, and with it its readings and the claims of its ids.
async fn recorded_partitions(
    js: &jetstream::Context,
    names: &Names,
    cfg: &NatsConfig,
) -> Result<Partitions> {
    let wanted = cfg.partitions();
    let recorded = match js.get_stream(&names.stream).await {
        Ok(mut stream) => {
            let info = stream.info().await.context("reading the events stream")?;
            match info.config.metadata.get(PARTITIONS_METADATA) {
                None => 1,
                Some(n) => n.parse::<u16>().map_err(|_| {
                    anyhow::anyhow!(
                        "stream {}: unreadable {PARTITIONS_METADATA} {n:?}",
                        names.stream
                    )
                })?,
            }
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            wanted.count()
        }
        Err(e) => return Err(e).context("looking for the events stream"),
    };
    if recorded != wanted.count() {
        return Err(PartitionsMismatch {
            recorded,
            stream: names.stream.clone(),
        }
        .into());
    }
    Ok(wanted)
}

/// PARTITIONS differs from what the installation recorded: start-up stops (retrying
/// cannot help).
#[derive(Debug, thiserror::Error)]
#[error(
    "PARTITIONS: this installation's events are spread over {recorded} partition(s) \
     (recorded on stream {stream} when it was created); start with PARTITIONS={recorded}"
)]
pub struct PartitionsMismatch {
    pub recorded: u16,
    pub stream: String,
}

/// A partition's events stream, claim log and claim snapshot bucket.
async fn partition_handles(
    js: &jetstream::Context,
    names: &Names,
) -> Result<(stream::Stream, stream::Stream, object_store::ObjectStore)> {
    let events = js
        .get_stream(&names.stream)
        .await
        .with_context(|| format!("opening stream {}", names.stream))?;
    let claims = js.get_stream(names.claims_stream()).await?;
    let snapshots = js
        .get_object_store(names.claim_snapshots_bucket())
        .await
        .context("opening the claim snapshot bucket")?;
    Ok((events, claims, snapshots))
}

fn file_stream(
    cfg: &NatsConfig,
    name: String,
    what: &str,
    subject: String,
    max_age: Duration,
) -> stream::Config {
    stream::Config {
        name,
        description: Some(what.into()),
        subjects: vec![subject],
        storage: stream::StorageType::File,
        max_age,
        num_replicas: cfg.nats_replicas,
        ..Default::default()
    }
}

/// The streams every partition shares: the events invalid for a meter (with the
/// reason), and threshold notifications.
fn shared_stream_configs(names: &Names, cfg: &NatsConfig) -> [stream::Config; 2] {
    [
        file_stream(
            cfg,
            names.deadletter_stream(),
            "KloudMeter events that were invalid for a meter, with the reason",
            names.deadletter_wildcard(),
            cfg.event_retention,
        ),
        // a notification published again after a crash (before its crossing was
        // recorded) is dropped by its id within this window
        stream::Config {
            duplicate_window: Duration::from_secs(3600).min(cfg.event_retention),
            ..file_stream(
                cfg,
                names.notifications_stream(),
                "KloudMeter threshold notifications (CloudEvents)",
                names.notifications_wildcard(),
                cfg.event_retention,
            )
        },
    ]
}

/// The streams of one partition: its events, its claim log, and the object store of its
/// claim index snapshots.
fn partition_stream_configs(
    names: &Names,
    partitions: Partitions,
    cfg: &NatsConfig,
) -> [stream::Config; 3] {
    // Claims are read back for DEDUP_WINDOW after they are made; the extra retention
    // covers an aggregator that lags behind the clock (disk only, no server memory).
    let claims_age = (cfg.dedup_window * 2).max(cfg.dedup_window + Duration::from_secs(3600));
    let metadata = if names.partition == 0 {
        [(
            PARTITIONS_METADATA.to_string(),
            partitions.count().to_string(),
        )]
        .into()
    } else {
        Default::default()
    };
    [
        stream::Config {
            duplicate_window: cfg.jetstream_duplicate_window.min(cfg.event_retention),
            allow_direct: true,
            metadata,
            ..file_stream(
                cfg,
                names.stream.clone(),
                "KloudMeter usage events",
                names.events_wildcard(),
                cfg.event_retention,
            )
        },
        stream::Config {
            duplicate_window: Duration::from_secs(60),
            ..file_stream(
                cfg,
                names.claims_stream(),
                "KloudMeter claim log: the stream sequence that first claimed each event id",
                names.claims_subject(),
                claims_age,
            )
        },
        // laid out as an object store bucket is (what `create_object_store` would make),
        // but created or updated like the others, so NATS_REPLICAS applies to it too
        stream::Config {
            subjects: vec![
                format!("$O.{}.C.>", names.claim_snapshots_bucket()),
                format!("$O.{}.M.>", names.claim_snapshots_bucket()),
            ],
            discard: stream::DiscardPolicy::New,
            allow_rollup: true,
            allow_direct: true,
            ..file_stream(
                cfg,
                format!("OBJ_{}", names.claim_snapshots_bucket()),
                "KloudMeter claim index snapshots (cold starts)",
                String::new(),
                Duration::ZERO,
            )
        },
    ]
}

/// The KV buckets, in the order [`Store`] holds them: meter definitions (a short
/// history), readings, aggregator progress, the lease (entries expire), and the
/// threshold crossings already notified.
fn bucket_configs(names: &Names, cfg: &NatsConfig) -> [kv::Config; 5] {
    let bucket = |bucket: String, what: &str, history: i64, max_age: Duration| kv::Config {
        bucket,
        description: what.into(),
        history,
        max_age,
        storage: stream::StorageType::File,
        num_replicas: cfg.nats_replicas,
        ..Default::default()
    };
    [
        bucket(
            names.meters_bucket(),
            "KloudMeter meter definitions",
            5,
            Duration::ZERO,
        ),
        bucket(
            names.readings_bucket(),
            "KloudMeter readings",
            1,
            Duration::ZERO,
        ),
        bucket(
            names.state_bucket(),
            "KloudMeter aggregator progress",
            1,
            Duration::ZERO,
        ),
        bucket(
            names.leader_bucket(),
            "KloudMeter aggregator lease",
            1,
            cfg.leader_ttl,
        ),
        bucket(
            names.fired_bucket(),
            "KloudMeter threshold crossings already notified",
            1,
            Duration::ZERO,
        ),
    ]
}
