//! Wiring of one `kloudmeter run` process: HTTP server, NATS setup, meter registry,
//! leader election, aggregator, and (with Kubernetes) the Meter controller and status
//! write-back; graceful shutdown on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::sync::watch;

use crate::aggregator;
use crate::api::{self, AppState, KubeMode};
use crate::config::{Config, KubernetesMode};
use crate::leader::Election;
use crate::lease::KubeLease;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;

/// Name of the coordination.k8s.io Lease that elects the operator's leader.
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

pub async fn run(cfg: Config) -> Result<()> {
    let client = kube_client(cfg.kubernetes).await?;
    let index = Arc::new(crate::claims::LocalIndex::open(cfg.data_dir.as_deref())?);
    let metrics = Metrics::default();
    let registry = Registry::default();
    let (kube_synced_tx, kube_synced) = watch::channel(client.is_none());
    let kube_mode = client.as_ref().map(|c| KubeMode {
        client: c.clone(),
        namespace: operator_namespace(c),
    });
    match &kube_mode {
        Some(k) => {
            tracing::info!(namespace = %k.namespace, watch = ?cfg.watch_namespace, "running as a Kubernetes operator")
        }
        None => tracing::info!("running standalone (meters in NATS KV)"),
    }
    let state = AppState::new(
        cfg.clone(),
        registry.clone(),
        metrics.clone(),
        kube_mode.clone(),
        kube_synced,
    );
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let addr = SocketAddr::new(cfg.http_bind_address, cfg.http_server_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("HTTP_SERVER_PORT: cannot listen on {addr}"))?;
    tracing::info!(%addr, "HTTP API listening");
    let mut http_shutdown = shutdown_rx.clone();
    let app = api::router(state.clone());
    let header_timeout = cfg.http_header_timeout;
    let server = tokio::spawn(async move {
        let stop = async move {
            let _ = http_shutdown.wait_for(|s| *s).await;
        };
        crate::server::serve(listener, app, header_timeout, stop, Duration::from_secs(25)).await
    });

    // Start-up work that needs NATS runs beside the server, so probes answer meanwhile.
    let background = {
        let cfg = cfg.clone();
        let shutdown = shutdown_rx.clone();
        let (state, registry, metrics) = (state.clone(), registry.clone(), metrics.clone());
        tokio::spawn(async move {
            let store = loop {
                match Store::connect(&cfg.nats).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "NATS set-up failed; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            };
            tracing::info!(url = %cfg.nats.nats_url, stream = %cfg.nats.meter_nats_stream, "connected to NATS");
            state.set_store(store.clone());
            let follower = {
                let (store, registry) = (store.clone(), registry.clone());
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
            };
            // The claim index is read up to date before this process may lead, so that a
            // new leader decides duplicates from the whole history at once.
            let claims = loop {
                let attached =
                    crate::claims::Claims::attach(index.clone(), &store, cfg.nats.dedup_window)
                        .await;
                match attached {
                    Ok(mut c) => match c.catch_up().await {
                        Ok(n) => {
                            tracing::info!(claims = n, "claim log read");
                            break Arc::new(tokio::sync::Mutex::new(c));
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
            };
            let (leading_tx, leading_rx) = watch::channel(false);
            let standby = tokio::spawn(follow_claims(claims.clone(), leading_rx.clone()));
            let holder = format!("{}-{}", hostname(), std::process::id());
            let changed = kube_mode
                .as_ref()
                .map(|_| crate::status::Changed::default());
            let agg = tokio::spawn(aggregator::supervise(
                store.clone(),
                registry.clone(),
                metrics.clone(),
                cfg.nats.dedup_window,
                claims.clone(),
                changed.clone(),
                leading_rx.clone(),
            ));
            let operator = kube_mode.as_ref().map(|k| {
                tokio::spawn(operate(
                    k.client.clone(),
                    store.clone(),
                    registry.clone(),
                    metrics.clone(),
                    cfg.clone(),
                    holder.clone(),
                    changed.clone().unwrap_or_default(),
                    leading_rx.clone(),
                    kube_synced_tx,
                ))
            });
            match &kube_mode {
                Some(k) => {
                    KubeLease::new(
                        k.client.clone(),
                        &k.namespace,
                        LEASE_NAME,
                        holder,
                        cfg.nats.leader_ttl,
                    )
                    .run(leading_tx, shutdown)
                    .await
                }
                None => {
                    Election {
                        holder,
                        ttl: cfg.nats.leader_ttl,
                    }
                    .run(store.clone(), leading_tx, shutdown)
                    .await
                }
            }
            // The election has ended (shutdown): the aggregator finishes its batch.
            let _ = tokio::time::timeout(Duration::from_secs(20), agg).await;
            if let Some(op) = operator {
                let _ = tokio::time::timeout(Duration::from_secs(5), op).await;
            }
            follower.abort();
            standby.abort();
            let _ = store.client.flush().await;
        })
    };

    shutdown_signal().await;
    tracing::info!("shutting down");
    shutdown_tx.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(25), server).await;
    let _ = tokio::time::timeout(Duration::from_secs(25), background).await;
    Ok(())
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

/// While leading: the Meter controller and the status write-back. A standby counts as
/// synced (it serves the API from NATS and does not reconcile).
#[allow(clippy::too_many_arguments)]
async fn operate(
    client: kube::Client,
    store: Store,
    registry: Registry,
    metrics: Metrics,
    cfg: Config,
    holder: String,
    changed: crate::status::Changed,
    mut leading: watch::Receiver<bool>,
    synced: watch::Sender<bool>,
) {
    let ctx = Arc::new(crate::controller::Ctx::new(
        client.clone(),
        store.clone(),
        metrics.clone(),
        holder,
    ));
    loop {
        synced.send_replace(true);
        if leading.wait_for(|l| *l).await.is_err() {
            return;
        }
        synced.send_replace(false);
        metrics.leader.set(1);
        let writer = tokio::spawn(crate::status::run(
            client.clone(),
            store.clone(),
            registry.clone(),
            changed.clone(),
            cfg.meter_interval,
            leading.clone(),
        ));
        crate::controller::run(
            ctx.clone(),
            cfg.watch_namespace.clone(),
            leading.clone(),
            synced.clone(),
        )
        .await;
        let _ = writer.await;
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
