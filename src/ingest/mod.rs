//! Ingestion: publish validated events to the stream and wait until JetStream has
//! acknowledged every one of them (a 2xx means durable). Publishes are pipelined: all
//! messages of a request are sent before the first acknowledgement is awaited.

pub mod publisher;

use std::time::Duration;

use async_nats::header::HeaderName;
use async_nats::HeaderMap;

use crate::domain::event::Incoming;
use crate::nats::keys::DEDUP_HEADER;
use crate::nats::store::Store;

/// How long a request waits for JetStream before answering 503.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn publish(store: &Store, events: &[Incoming<'_>]) -> Result<(), String> {
    if !store.connected() {
        return Err("NATS is not connected".into());
    }
    let work = async {
        let mut batch = store.ingest.batch(events.len());
        // batches are usually of one event type: escape it into a subject once (per
        // partition: an event goes to the partition of its subject)
        let mut subject: Option<(&str, u16, async_nats::Subject)> = None;
        for e in events {
            let mut headers = HeaderMap::new();
            // (a static name and an owned value: no copies per event)
            headers.insert(HeaderName::from_static(DEDUP_HEADER), e.dedup_hash());
            let partition = store.partitions.of(&e.subject);
            let to = match &subject {
                Some((t, p, s)) if *t == e.event_type && *p == partition => s.clone(),
                _ => {
                    let names = store.names.partition(partition);
                    let s = async_nats::Subject::from(names.event_subject(&e.event_type));
                    subject = Some((&e.event_type, partition, s.clone()));
                    s
                }
            };
            batch.send(to, headers, e.to_bytes().into()).await?;
        }
        batch.acknowledged().await
    };
    tokio::time::timeout(ACK_TIMEOUT, work)
        .await
        .map_err(|_| "JetStream did not answer in time".to_string())?
}
