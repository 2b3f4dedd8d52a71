//! The set of meters every process knows, kept current by a watch on the meters KV
//! bucket (no polling), so that all replicas agree.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use anyhow::Result;
use async_nats::jetstream::kv::Operation;
use futures::StreamExt;
use tokio::sync::watch;

use crate::domain::meter::{CompiledMeter, MeterDef};
use crate::nats::store::Store;

#[derive(Default)]
struct Inner {
    by_id: BTreeMap<String, Arc<CompiledMeter>>,
}

/// Shared, read-mostly view of all meter definitions.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<RwLock<Inner>>,
    /// Bumped on every change; `true` in `synced` once the initial state is loaded.
    version: watch::Sender<u64>,
    synced: watch::Sender<bool>,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            inner: Arc::default(),
            version: watch::channel(0).0,
            synced: watch::channel(false).0,
        }
    }
}

impl Registry {
    pub fn get(&self, id: &str) -> Option<Arc<CompiledMeter>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .get(id)
            .cloned()
    }

    pub fn all(&self) -> Vec<Arc<CompiledMeter>> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .values()
            .cloned()
            .collect()
    }

    pub fn snapshot(&self) -> HashMap<String, Arc<CompiledMeter>> {
        let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
        inner
            .by_id
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    pub async fn wait_synced(&self) {
        let mut rx = self.synced.subscribe();
        let _ = rx.wait_for(|s| *s).await;
    }

    fn upsert(&self, def: MeterDef) {
        match CompiledMeter::compile(&def) {
            Ok(m) => {
                self.inner
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .by_id
                    .insert(def.id.clone(), Arc::new(m));
                self.version.send_modify(|v| *v += 1);
            }
            Err(e) => tracing::warn!(meter = %def.id, error = %e, "ignoring invalid stored meter"),
        }
    }

    fn remove(&self, id: &str) {
        if self
            .inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .by_id
            .remove(id)
            .is_some()
        {
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Follow the meters bucket forever: load what is there, then apply every change.
    /// Returns only on error (the caller restarts it).
    pub async fn follow(&self, store: &Store) -> Result<()> {
        let existing = store.scan(&store.meters, ">").await?;
        let last = existing.iter().map(|i| i.revision).max().unwrap_or(0);
        let mut ids = std::collections::HashSet::new();
        for item in existing {
            match serde_json::from_slice::<MeterDef>(&item.value) {
                Ok(def) => {
                    ids.insert(def.id.clone());
                    self.upsert(store.scoped(def));
                }
                Err(e) => {
                    tracing::warn!(key = %item.key, error = %e, "unreadable meter definition")
                }
            }
        }
        // drop meters deleted while we were not watching (after a reconnect)
        for m in self.all() {
            if !ids.contains(&m.def.id) {
                self.remove(&m.def.id);
            }
        }
        self.synced.send_replace(true);
        let mut watch = store.meters.watch_all_from_revision(last + 1).await?;
        while let Some(entry) = watch.next().await {
            let entry = entry?;
            let id = crate::nats::keys::meter_of(&entry.key);
            match entry.operation {
                Operation::Put => match serde_json::from_slice::<MeterDef>(&entry.value) {
                    Ok(def) => self.upsert(store.scoped(def)),
                    Err(e) => {
                        tracing::warn!(key = %entry.key, error = %e, "unreadable meter definition")
                    }
                },
                Operation::Delete | Operation::Purge => {
                    if let Some(id) = id {
                        self.remove(&id);
                    }
                }
            }
        }
        anyhow::bail!("meters watch ended")
    }
}
