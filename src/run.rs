//! Wiring of one `kloudmeter run` process: HTTP server, NATS setup, meter registry,
//! leader election, aggregator, and (with Kubernetes) the Meter controller and status
//! write-back; graceful shutdown on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::sync::watch;

use crate::aggregate;
use crate::config::{Config, KubernetesMode};
use crate::election::partitions::{Balancer, Leases, Partitioned};
use crate::http::{self, AppState};
use crate::metrics::Metrics;
use crate::nats::registry::Registry;
use crate::nats::store::Store;
use crate::operator::api_meters::KubeMeters;

/// Name of the coordination.k8s.io Lease that elects the operator's leader (the holder
/// of partition 0); the other partitions' Leases are `<name>-p<N>`.
pub const LEASE_NAME: &str = "kloudmeter-leader";

/// Decide whether to run as an operator (CONTRACT §2 `KUBERNETES`).
async fn kube_client(mode: KubernetesMode) -> Result<Option<kube::Client>> {
    match mode {
        KubernetesMode::False => Ok(None),
        KubernetesMode::True => {
            let cfg = kube::Config::infer()
                .await
                .context("KUBERNETES=true: no in-cluster configuration or kubeconfig found")?;
            Ok(Some(kube::Client::try_from(cfg).context(
                "KUBERNETES=true: unusable Kubernetes configuration",
            )?))
        }
        KubernetesMode::Auto => match kube::Config::infer().await {
            Ok(cfg) => Ok(kube::Client::try_from(cfg).ok()),
            Err(_) => Ok(None),
        },
    }
}

/// The namespace the operator lives in: where it creates Meters for API calls and
/// keeps its Lease.
fn operator_namespace(client: &kube::Client) -> String {
    std::env::var("POD_NAMESPACE")
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| client.default_namespace().to_string())
}

/// What the long-running parts share once NATS is set up.
#[derive(Clone)]
struct Shared {
    cfg: Config,
    store: Store,
    registry: Registry,
    metrics: Metrics,
}

pub async fn run(cfg: Config) -> Result<()> {
    let client = kube_client(cfg.kubernetes).await?;
    // every partition's claim index, opened now so that a DATA_DIR in use stops start-up
    let indexes = cfg
        .nats
        .partitions()
        .all()
        .map(|p| {
            let dir = cfg.data_dir.as_ref().map(|d| match p {
                0 => d.clone(),
                p => d.join(format!("partition-{p}")),
            });
            crate::claims::LocalIndex::open(dir.as_deref()).map(Arc::new)
        })
        .collect::<Result<Vec<_>>>()?;
    let metrics = Metrics::default();
    // every partition shows (as not owned) from the start
    for p in cfg.nats.partitions().all() {
        metrics.election.owned(p, false);
    }
    let registry = Registry::default();
    let (kube_synced_tx, kube_synced) = watch::channel(client.is_none());
    let kube_meters = client.as_ref().map(|c| KubeMeters {
        client: c.clone(),
        namespace: operator_namespace(c),
    });
    match &kube_meters {
        Some(k) => {
            tracing::info!(namespace = %k.namespace, watch = ?cfg.watch_namespace, "running as a Kubernetes operator")
        }
        None => tracing::info!("running standalone (meters in NATS KV)"),
    }
    // Kubernetes identities need an API server to ask, even for standalone meters
    let reviews = match (&client, cfg.auth()) {
        (None, crate::config::AuthMode::Kubernetes) => {
            let kc = kube::Config::infer().await.context(
                "AUTH_MODE=kubernetes: no in-cluster configuration or kubeconfig to review tokens with",
            )?;
            Some(
                kube::Client::try_from(kc)
                    .context("AUTH_MODE=kubernetes: unusable Kubernetes configuration")?,
            )
        }
        _ => client.clone(),
    };
    let gate = crate::access::Gate::new(&cfg, reviews)?;
    tracing::info!(mode = ?gate.mode(), "API access");
    let state = AppState::new(
        cfg.clone(),
        registry.clone(),
        metrics.clone(),
        kube_meters.clone(),
        kube_synced,
        gate,
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let server = serve_http(&cfg, state.clone(), shutdown_rx.clone()).await?;
    // Start-up work that needs NATS runs beside the server, so probes answer meanwhile.
    let (fatal_tx, fatal) = tokio::sync::oneshot::channel();
    let background = tokio::spawn(async move {
        let store = match connect_nats(&cfg).await {
            Ok(store) => store,
            Err(e) => {
                let _ = fatal_tx.send(e);
                return;
            }
        };
        state.set_store(store.clone());
        let shared = Shared {
            cfg,
            store,
            registry,
            metrics,
        };
        lead_when_elected(shared, indexes, kube_meters, kube_synced_tx, shutdown_rx).await;
    });
    tokio::select! {
        _ = shutdown_signal() => {}
        Ok(e) = fatal => {
            shutdown_tx.send_replace(true);
            return Err(e);
        }
    }
    tracing::info!("shutting down");
    shutdown_tx.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(25), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(25), background).await;
    Ok(())
}

/// The HTTP API, until `shutdown` (in-flight requests are finished).
async fn serve_http(
    cfg: &Config,
    state: AppState,
    mut shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>> {
    let addr = SocketAddr::new(cfg.http_bind_address, cfg.http_server_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("HTTP_SERVER_PORT: cannot listen on {addr}"))?;
    tracing::info!(%addr, "HTTP API listening");
    let app = http::router(state);
    let header_timeout = cfg.http_header_timeout;
    Ok(tokio::spawn(async move {
        let stop = async move {
            let _ = shutdown.wait_for(|s| *s).await;
        };
        http::server::serve(listener, app, header_timeout, stop, Duration::from_secs(25)).await
    }))
}

/// Connect to NATS and lay out the streams and buckets, retrying until it works (or
/// until it cannot: PARTITIONS differs from the installation's).
async fn connect_nats(cfg: &Config) -> Result<Store> {
    loop {
        match Store::connect(&cfg.nats).await {
            Ok(store) => {
                tracing::info!(url = %cfg.nats.nats_url, stream = %cfg.nats.meter_nats_stream, partitions = store.partitions.count(), "connected to NATS");
                return Ok(store);
            }
            Err(e) if e.is::<crate::nats::store::PartitionsMismatch>() => return Err(e),
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "NATS set-up failed; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// The claim index, read up to date before this process may lead, so that a new leader
/// decides duplicates from the whole history at once.
async fn read_claims(
    index: Arc<crate::claims::LocalIndex>,
    store: &Store,
    dedup_window: Duration,
) -> Arc<tokio::sync::Mutex<crate::claims::Claims>> {
    loop {
        match crate::claims::Claims::attach(index.clone(), store, dedup_window).await {
            Ok(mut c) => match c.catch_up().await {
                Ok(n) => {
                    tracing::info!(claims = n, "claim log read");
                    return Arc::new(tokio::sync::Mutex::new(c));
                }
                Err(e) => tracing::error!(
                    error = format!("{e:#}"),
                    "reading the claim log failed; retrying"
                ),
            },
            Err(e) => tracing::error!(
                error = format!("{e:#}"),
                "opening the claim index failed; retrying"
            ),
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// Every process follows the meter definitions; the registry serves the API and the
/// aggregator.
fn follow_meters(store: Store, registry: Registry) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Err(e) = registry.follow(&store).await {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "meter watch interrupted; resuming"
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    })
}

/// Take a fair share of the partitions until shutdown; aggregate the partitions held,
/// and while holding partition 0 (operator mode) reconcile and write status. On shutdown
/// every partition is handed over after its aggregator has finished its batch.
async fn lead_when_elected(
    shared: Shared,
    indexes: Vec<Arc<crate::claims::LocalIndex>>,
    kube_meters: Option<KubeMeters>,
    kube_synced: watch::Sender<bool>,
    shutdown: watch::Receiver<bool>,
) {
    let Shared {
        cfg,
        store,
        registry,
        metrics,
    } = shared.clone();
    let follower = follow_meters(store.clone(), registry.clone());
    // operator mode: meters whose readings an aggregator wrote, for the status write-back
    // of whichever process holds partition 0 (announced over NATS: it may be another)
    let changed = kube_meters
        .as_ref()
        .map(|_| announce_changed(store.clone()));
    let mut partitioned = Partitioned {
        leading: Vec::new(),
        running: Vec::new(),
    };
    let mut background = vec![follower];
    let mut aggregators = Vec::new();
    for (p, index) in indexes.into_iter().enumerate() {
        let part = partition_store(&store, p as u16).await;
        let claims = read_claims(index, &part, cfg.nats.dedup_window).await;
        let (leading_tx, leading_rx) = watch::channel(false);
        let (running_tx, running_rx) = watch::channel(false);
        background.push(tokio::spawn(follow_claims(
            claims.clone(),
            leading_rx.clone(),
        )));
        background.push(tokio::spawn(snapshot_claims(
            claims.clone(),
            cfg.claim_snapshot_interval,
            leading_rx.clone(),
            metrics.snapshots.clone(),
        )));
        let parts = aggregate::Parts {
            store: part,
            registry: registry.clone(),
            metrics: metrics.clone(),
            dedup_window: cfg.nats.dedup_window,
            build_checkpoint: cfg.nats.build_checkpoint_interval,
            claims,
            changed: changed.clone(),
        };
        aggregators.push(tokio::spawn(aggregate::supervise(
            parts, leading_rx, running_tx,
        )));
        partitioned.leading.push(leading_tx);
        partitioned.running.push(running_rx);
    }
    // partition 0's holder: the notifier, and (operator mode) the controller
    let role = partitioned.leading[0].subscribe();
    background.push(tokio::spawn(crate::notify::run(
        store.clone(),
        registry.clone(),
        metrics.clone(),
        role.clone(),
    )));
    // every process delivers (they share one durable consumer), leader or not
    if let Some(url) = &cfg.webhook_url {
        let hook = crate::notify::webhook::Webhook {
            url: url.clone(),
            secret: cfg.webhook_secret.clone(),
            retry_for: cfg.webhook_retry_for,
        };
        tokio::spawn(crate::notify::webhook::run(
            store.clone(),
            hook,
            metrics.notify.clone(),
            shutdown.clone(),
        ));
    }
    let holder = format!("{}-{}", hostname(), std::process::id());
    let operator = kube_meters.as_ref().map(|k| {
        let (client, holder) = (k.client.clone(), holder.clone());
        tokio::spawn(operate(shared, client, holder, role, kube_synced))
    });
    let leases = match &kube_meters {
        Some(k) => Leases::Kube {
            client: k.client.clone(),
            namespace: k.namespace.clone(),
            name: LEASE_NAME.to_string(),
        },
        None => Leases::Nats,
    };
    Balancer {
        store: store.clone(),
        leases,
        holder,
        ttl: cfg.nats.leader_ttl,
        metrics,
    }
    .run(partitioned, shutdown)
    .await;
    // Every partition was handed over: its aggregator finished its batch.
    for agg in aggregators {
        agg.abort();
    }
    if let Some(op) = operator {
        let _ = tokio::time::timeout(Duration::from_secs(5), op).await;
    }
    for task in background {
        task.abort();
    }
    let _ = store.client.flush().await;
}

/// A partition's handle on the store, retrying until NATS answers.
async fn partition_store(store: &Store, p: u16) -> Store {
    loop {
        match store.partition(p).await {
            Ok(part) => return part,
            Err(e) => {
                tracing::error!(
                    partition = p,
                    error = format!("{e:#}"),
                    "opening the partition failed; retrying"
                );
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

/// Where aggregators send the ids of meters whose readings they wrote: each id is
/// announced on the installation's `changed` subject, for the status write-back of the
/// process that holds partition 0 ([`listen_changed`]). At most once: a lost
/// announcement delays a status until the meter's next change (a new leader writes
/// every status once).
fn announce_changed(store: Store) -> crate::operator::status::ChangedSender {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let subject = store.names.changed_subject();
    tokio::spawn(async move {
        while let Some(id) = rx.recv().await {
            if let Err(e) = store.client.publish(subject.clone(), id.into()).await {
                tracing::debug!(error = %e, "announcing a changed meter failed");
            }
        }
    });
    tx
}

/// The announcements of [`announce_changed`], from every process.
fn listen_changed(store: Store) -> crate::operator::status::ChangedReceiver {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        use futures::StreamExt;
        while !tx.is_closed() {
            match store.client.subscribe(store.names.changed_subject()).await {
                Ok(mut sub) => {
                    // the subscription goes when the write-back drops the receiver
                    loop {
                        let m = tokio::select! {
                            m = sub.next() => m,
                            _ = tx.closed() => return,
                        };
                        let Some(m) = m else { break };
                        if let Ok(id) = std::str::from_utf8(&m.payload) {
                            if tx.send(id.to_string()).is_err() {
                                return;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "listening for changed meters failed; retrying")
                }
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
    rx
}

/// A standby keeps its claim index following the log, so that it can take over warm.
async fn follow_claims(
    claims: Arc<tokio::sync::Mutex<crate::claims::Claims>>,
    leading: watch::Receiver<bool>,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if *leading.borrow() {
            continue;
        }
        // The leader's aggregator holds the lock; a standby never waits for it.
        let Ok(mut c) = claims.try_lock() else {
            continue;
        };
        if let Err(e) = c.catch_up().await {
            tracing::warn!(
                error = format!("{e:#}"),
                "following the claim log failed; retrying"
            );
        }
    }
}

/// While leading, publish a snapshot of the claim index every `interval` when it has
/// changed, for processes that start with an empty DATA_DIR.
async fn snapshot_claims(
    claims: Arc<tokio::sync::Mutex<crate::claims::Claims>>,
    interval: Duration,
    leading: watch::Receiver<bool>,
    metrics: crate::metrics::ClaimSnapshotMetrics,
) {
    let mut published = 0;
    loop {
        tokio::time::sleep(interval).await;
        if !*leading.borrow() {
            continue;
        }
        let taking = {
            let mut c = claims.lock().await;
            // everything applied so far goes into the file first (the snapshot reads
            // the file): an idle leader's last claims would otherwise wait for the next
            if let Err(e) = c.persist().await {
                tracing::warn!(error = format!("{e:#}"), "writing the claim index failed");
                continue;
            }
            if c.persisted() == published {
                continue;
            }
            c.snapshot()
        };
        let started = std::time::Instant::now();
        match taking.await {
            Ok(Some(header)) => {
                published = header.applied;
                metrics
                    .claims
                    .set(i64::try_from(header.count).unwrap_or(i64::MAX));
                metrics.seconds.set(started.elapsed().as_secs_f64());
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                metrics.published_at.set(now.as_secs_f64());
            }
            Ok(None) => {}
            Err(e) => {
                metrics.failures.inc();
                tracing::warn!(
                    error = format!("{e:#}"),
                    "publishing a claim index snapshot failed; trying again later"
                )
            }
        }
    }
}

/// While leading: the Meter controller and the status write-back. A standby counts as
/// synced (it serves the API from NATS and does not reconcile).
async fn operate(
    shared: Shared,
    client: kube::Client,
    holder: String,
    mut leading: watch::Receiver<bool>,
    synced: watch::Sender<bool>,
) {
    let Shared {
        cfg,
        store,
        registry,
        metrics,
    } = shared;
    let ctx = Arc::new(crate::operator::controller::Ctx::new(
        client.clone(),
        store.clone(),
        metrics.clone(),
        holder.clone(),
    ));
    loop {
        synced.send_replace(true);
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        synced.send_replace(false);
        metrics.election.leader.set(1);
        tokio::spawn(crate::operator::crossings::run(
            client.clone(),
            store.clone(),
            holder.clone(),
            leading.clone(),
        ));
        // announcements are listened to only while leading (a standby would only pile
        // them up); a new leader writes every status once anyway
        let writer = tokio::spawn(crate::operator::status::run(
            client.clone(),
            store.clone(),
            registry.clone(),
            listen_changed(store.clone()),
            cfg.meter_interval,
            leading.clone(),
        ));
        crate::operator::controller::run(
            ctx.clone(),
            cfg.watch_namespace.clone(),
            leading.clone(),
            synced.clone(),
        )
        .await;
        // (the receiver it hands back is dropped: its listener stops)
        if let Err(e) = writer.await {
            tracing::error!(error = %e, "status write-back ended abnormally");
            return;
        }
        tracing::info!("controller stopped");
    }
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|s| s.trim().to_string())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "kloudmeter".into())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
