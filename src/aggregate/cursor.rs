//! The aggregation cursor: the stream sequence up to which every reading is written,
//! advanced with compare-and-swap so that a second leader cannot move it backwards.

use anyhow::{anyhow, bail, Result};
use async_nats::jetstream::kv;

use super::*;
use crate::metrics::PartitionLabel;

impl Aggregator {
    pub(super) async fn load_cursor(&mut self) -> Result<()> {
        match self
            .store
            .state
            .entry(self.store.names.cursor_key())
            .await?
        {
            Some(e) if e.operation == kv::Operation::Put => {
                self.cursor = std::str::from_utf8(&e.value)?.parse()?;
                self.cursor_rev = Some(e.revision);
            }
            _ => {
                self.cursor = 0;
                self.cursor_rev = None;
            }
        }
        self.metrics
            .aggregate
            .cursor
            .get_or_create(&PartitionLabel::of(self.store.names.partition))
            .set(self.cursor);
        self.committed.send_replace(self.cursor);
        Ok(())
    }

    /// Record that every reading includes the events through `seq`: the cursor, or in a
    /// build the build's checkpoint.
    pub(super) async fn commit_cursor(&mut self, seq: u64) -> Result<()> {
        if self.building.is_some() {
            return self.commit_checkpoint(seq).await;
        }
        for _ in 0..5 {
            let value = seq.to_string().into();
            let res = match self.cursor_rev {
                Some(rev) => self
                    .store
                    .state
                    .update(self.store.names.cursor_key(), value, rev)
                    .await
                    .map_err(|e| anyhow!(e)),
                None => self
                    .store
                    .state
                    .create(self.store.names.cursor_key(), value)
                    .await
                    .map_err(|e| anyhow!(e)),
            };
            match res {
                Ok(rev) => {
                    self.cursor = seq;
                    self.cursor_rev = Some(rev);
                    self.metrics
                        .aggregate
                        .cursor
                        .get_or_create(&PartitionLabel::of(self.store.names.partition))
                        .set(seq);
                    self.committed.send_replace(seq);
                    return Ok(());
                }
                Err(e) => {
                    // Another leader moved it (we lost the lease but have not noticed yet).
                    tracing::warn!(error = %e, "cursor changed underneath; reloading");
                    self.load_cursor().await?;
                    if self.cursor >= seq {
                        return Ok(());
                    }
                }
            }
        }
        bail!("could not store the aggregation cursor")
    }
}
