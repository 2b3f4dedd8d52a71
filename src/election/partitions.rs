//! Sharing the partitions among the live processes: one lease per partition, and a
//! balancer that keeps this process at its fair share ([`rebalance`]). Each process
//! announces itself in the leader bucket (an entry that expires like a lease) and looks
//! every LEADER_TTL/4 at who is alive and which leases others hold: it hands over what
//! it holds beyond its share and campaigns for free partitions below it.
//!
//! A partition is handed over cleanly: the process stops aggregating it (its batch is
//! written) before the lease is released, so the next owner starts from a settled
//! cursor. A process that dies simply stops renewing; its leases expire after LEADER_TTL.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::Api;
use tokio::sync::watch;

use super::kube_lease::KubeLease;
use super::nats_lease::Election;
use crate::domain::partition::{rebalance, Holding, Partitions};
use crate::metrics::Metrics;
use crate::nats::keys::Names;
use crate::nats::store::Store;

/// Where the leases live.
#[derive(Clone)]
pub enum Leases {
    /// Keys in the NATS leader bucket (standalone).
    Nats,
    /// coordination.k8s.io Leases named `<name>` (partition 0) and `<name>-p<N>`.
    Kube {
        client: kube::Client,
        namespace: String,
        name: String,
    },
}

/// One process's view of every partition: whether it aggregates each (`leading`), and
/// whether its aggregator for each is still running (`running`, set by the aggregator's
/// supervisor), so that a lease is released only once its aggregator has stopped.
pub struct Partitioned {
    pub leading: Vec<watch::Sender<bool>>,
    pub running: Vec<watch::Receiver<bool>>,
}

pub struct Balancer {
    pub store: Store,
    pub leases: Leases,
    pub holder: String,
    pub ttl: Duration,
    pub metrics: Metrics,
}

impl Balancer {
    /// Hold a fair share of the partitions until `shutdown`; then hand every partition
    /// over (each after its aggregator stopped) and leave.
    pub async fn run(self, parts: Partitioned, mut shutdown: watch::Receiver<bool>) {
        let partitions = self.store.partitions;
        let first = (xxhash_rust::xxh3::xxh3_64(self.holder.as_bytes())
            % u64::from(partitions.count())) as u16;
        let mut campaigns: Vec<Campaign> = Vec::new();
        for (p, (leading, running)) in parts.leading.into_iter().zip(parts.running).enumerate() {
            let p = p as u16;
            campaigns.push(Campaign::start(
                self.lease(p),
                p,
                leading,
                running,
                self.metrics.clone(),
            ));
        }
        let member = Names::member_key(&self.holder);
        let every = (self.ttl / 4).max(Duration::from_millis(250));
        // Announced, then a moment's wait before the first look: processes started
        // together (a rollout) see each other, instead of the first taking everything
        // and handing most of it over a moment later. (One partition has nothing to
        // spread: it is campaigned for at once, as before partitions.)
        let mut announced = partitions.count() == 1;
        let mut free_for = vec![0usize; usize::from(partitions.count())];
        loop {
            if let Err(e) = self
                .store
                .leader
                .put(&member, self.holder.clone().into())
                .await
            {
                tracing::warn!(error = %e, "announcing this process failed");
            }
            if !std::mem::replace(&mut announced, true) {
                tokio::select! {
                    _ = tokio::time::sleep(every) => continue,
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
            match self.look(partitions, &campaigns).await {
                Ok(mut holding) => {
                    holding.owned = campaigns
                        .iter()
                        .filter(|c| c.holds())
                        .map(|c| c.p)
                        .collect();
                    holding.campaigning = campaigns
                        .iter()
                        .filter(|c| c.wants() && !c.holds())
                        .map(|c| c.p)
                        .collect();
                    // free at this look and the two before it
                    for p in partitions.all() {
                        let free =
                            !holding.owned.contains(&p) && !holding.held_elsewhere.contains_key(&p);
                        let looks = &mut free_for[usize::from(p)];
                        *looks = if free { *looks + 1 } else { 0 };
                    }
                    holding.long_free = partitions
                        .all()
                        .filter(|&p| free_for[usize::from(p)] >= 3)
                        .collect();
                    let moves = rebalance(partitions, &self.holder, first, &holding);
                    if !moves.release.is_empty() || !moves.start.is_empty() {
                        tracing::info!(others = holding.others.len(), release = ?moves.release, campaign = ?moves.start, "rebalancing partitions");
                    }
                    for p in moves.release.into_iter().chain(moves.stop) {
                        campaigns[usize::from(p)].want(false);
                    }
                    for p in moves.start {
                        campaigns[usize::from(p)].want(true);
                    }
                }
                Err(e) => tracing::warn!(
                    error = format!("{e:#}"),
                    "looking at the partition leases failed"
                ),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        // leave first, so that the others count one process fewer and take over each
        // partition as soon as it is released
        let _ = self.store.leader.delete(&member).await;
        for c in &campaigns {
            c.want(false);
        }
        futures::future::join_all(campaigns.into_iter().map(Campaign::finished)).await;
    }

    /// Which other processes are alive, and which partitions' leases they hold.
    async fn look(
        &self,
        partitions: Partitions,
        campaigns: &[Campaign],
    ) -> anyhow::Result<Holding> {
        use futures::TryStreamExt;
        let others = self
            .store
            .leader
            .keys()
            .await?
            .try_filter_map(|k| {
                futures::future::ready(Ok(k
                    .strip_prefix("member.")
                    .and_then(crate::nats::keys::untoken)))
            })
            .try_filter(|m| futures::future::ready(*m != self.holder))
            .try_collect()
            .await?;
        let mut held_elsewhere = BTreeMap::new();
        for p in partitions.all() {
            if campaigns[usize::from(p)].holds() {
                continue;
            }
            if let Some(holder) = self.holder_elsewhere(p).await? {
                held_elsewhere.insert(p, holder);
            }
        }
        Ok(Holding {
            held_elsewhere,
            others,
            ..Default::default()
        })
    }

    /// Who else holds partition `p`'s lease (unexpired), if anyone.
    async fn holder_elsewhere(&self, p: u16) -> anyhow::Result<Option<String>> {
        let holder = match &self.leases {
            Leases::Nats => {
                let key = self.store.names.partition(p).lease_key();
                self.store
                    .leader
                    .get(&key)
                    .await?
                    .map(|h| String::from_utf8_lossy(&h).into_owned())
            }
            Leases::Kube {
                client,
                namespace,
                name,
            } => {
                let api: Api<Lease> = Api::namespaced(client.clone(), namespace);
                let Some(lease) = api.get_opt(&lease_name(name, p)).await? else {
                    return Ok(None);
                };
                let spec = lease.spec.unwrap_or_default();
                let live = match (&spec.renew_time, spec.lease_duration_seconds) {
                    (Some(MicroTime(t)), Some(d)) => {
                        *t + SignedDuration::from_secs(i64::from(d)) >= Timestamp::now()
                    }
                    _ => false,
                };
                spec.holder_identity.filter(|_| live)
            }
        };
        Ok(holder.filter(|h| !h.is_empty() && *h != self.holder))
    }

    fn lease(&self, p: u16) -> LeaseOf {
        match &self.leases {
            Leases::Nats => LeaseOf::Nats(
                Box::new(self.store.clone()),
                Election {
                    key: self.store.names.partition(p).lease_key(),
                    holder: self.holder.clone(),
                    ttl: self.ttl,
                },
            ),
            Leases::Kube {
                client,
                namespace,
                name,
            } => LeaseOf::Kube(Box::new(KubeLease::new(
                client.clone(),
                namespace,
                &lease_name(name, p),
                self.holder.clone(),
                self.ttl,
            ))),
        }
    }
}

/// Partition 0's Lease keeps the one leader's name of before partitions.
fn lease_name(name: &str, p: u16) -> String {
    match p {
        0 => name.to_string(),
        p => format!("{name}-p{p}"),
    }
}

enum LeaseOf {
    // (boxed: a store handle carries its streams' cached information)
    Nats(Box<Store>, Election),
    Kube(Box<KubeLease>),
}

impl LeaseOf {
    async fn run(&self, held: watch::Sender<bool>, stop: watch::Receiver<bool>) {
        match self {
            LeaseOf::Nats(store, e) => e.run(Store::clone(store), held, stop).await,
            LeaseOf::Kube(k) => k.run(held, stop).await,
        }
    }
}

/// One partition's campaign: while wanted, its lease is campaigned for and held, and the
/// partition is aggregated while held.
struct Campaign {
    p: u16,
    want: watch::Sender<bool>,
    held: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Campaign {
    fn start(
        lease: LeaseOf,
        p: u16,
        leading: watch::Sender<bool>,
        mut running: watch::Receiver<bool>,
        metrics: Metrics,
    ) -> Campaign {
        let (want, mut wanted) = watch::channel(false);
        let (held_out, held) = watch::channel(false);
        metrics.election.owned(p, false);
        let task = tokio::spawn(async move {
            let mut lease = Some(lease);
            loop {
                if wanted.wait_for(|w| *w).await.is_err() {
                    return;
                }
                let Some(l) = lease.take() else { return };
                let (stop_tx, stop_rx) = watch::channel(false);
                let (held_tx, mut held_rx) = watch::channel(false);
                let runner = tokio::spawn(async move {
                    l.run(held_tx, stop_rx).await;
                    l
                });
                // lead while the lease is held and the partition still wanted
                loop {
                    let now = *held_rx.borrow_and_update() && *wanted.borrow_and_update();
                    leading.send_if_modified(|l| std::mem::replace(l, now) != now);
                    held_out.send_replace(*held_rx.borrow());
                    metrics.election.owned(p, now);
                    if p == 0 {
                        metrics.election.leader.set(i64::from(now));
                    }
                    if !*wanted.borrow() {
                        break;
                    }
                    tokio::select! {
                        r = held_rx.changed() => if r.is_err() { break },
                        r = wanted.changed() => if r.is_err() { break },
                    }
                }
                // hand over: the aggregator writes what it applied, then the lease goes
                leading.send_replace(false);
                metrics.election.owned(p, false);
                if p == 0 {
                    metrics.election.leader.set(0);
                }
                // (the supervisor stops an aggregator that takes longer than its hand-over
                // time; this bound only guards against a supervisor that is gone)
                let _ =
                    tokio::time::timeout(Duration::from_secs(30), running.wait_for(|r| !*r)).await;
                stop_tx.send_replace(true);
                match runner.await {
                    Ok(l) => lease = Some(l),
                    Err(_) => return,
                }
                held_out.send_replace(false);
            }
        });
        Campaign {
            p,
            want,
            held,
            task,
        }
    }

    fn want(&self, on: bool) {
        self.want
            .send_if_modified(|w| std::mem::replace(w, on) != on);
    }

    fn wants(&self) -> bool {
        *self.want.borrow()
    }

    fn holds(&self) -> bool {
        *self.held.borrow()
    }

    /// Wait until the partition is handed over (after `want(false)`).
    async fn finished(self) {
        let mut held = self.held.clone();
        let _ = tokio::time::timeout(Duration::from_secs(35), held.wait_for(|h| !*h)).await;
        drop(self.want);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
    }
}
