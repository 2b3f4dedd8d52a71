//! Wiring of one `kloudmeter run` process: HTTP server, NATS setup, meter registry,
//! leader election and aggregator, and graceful shutdown.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context as _, Result};
use tokio::sync::watch;

use crate::aggregator;
use crate::api::{self, AppState};
use crate::config::{Config, KubernetesMode};
use crate::leader::Election;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::store::Store;

pub async fn run(cfg: Config) -> Result<()> {
    if cfg.kubernetes == KubernetesMode::True {
        anyhow::bail!(
            "KUBERNETES: operator mode is not available in this build; use false or auto"
        );
    }
    let metrics = Metrics::default();
    let registry = Registry::default();
    let state = AppState::new(cfg.clone(), registry.clone(), metrics.clone());
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let addr = SocketAddr::new(cfg.http_bind_address, cfg.http_server_port);
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("HTTP_SERVER_PORT: cannot listen on {addr}"))?;
    tracing::info!(%addr, "HTTP API listening");
    let mut http_shutdown = shutdown_rx.clone();
    let app = api::router(state.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = http_shutdown.wait_for(|s| *s).await;
            })
            .await
    });

    // Start-up work that needs NATS runs beside the server, so probes answer meanwhile.
    let background = {
        let cfg = cfg.clone();
        let shutdown = shutdown_rx.clone();
        let (state, registry, metrics) = (state.clone(), registry.clone(), metrics.clone());
        tokio::spawn(async move {
            let store = loop {
                match Store::connect(&cfg).await {
                    Ok(s) => break s,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "NATS set-up failed; retrying");
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            };
            tracing::info!(url = %cfg.nats_url, stream = %cfg.meter_nats_stream, "connected to NATS");
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
            let (leading_tx, leading_rx) = watch::channel(false);
            let holder = format!("{}-{}", hostname(), std::process::id());
            let agg = tokio::spawn(aggregator::supervise(
                store.clone(),
                registry.clone(),
                metrics.clone(),
                cfg.dedup_window,
                leading_rx,
            ));
            Election {
                holder,
                ttl: cfg.leader_ttl,
            }
            .run(store.clone(), leading_tx, shutdown)
            .await;
            // The election has ended (shutdown): the aggregator finishes its batch.
            let _ = tokio::time::timeout(Duration::from_secs(20), agg).await;
            follower.abort();
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
