//! Seed data, made fast: file events appended in batches through the real
//! event store, or rows streamed in with `COPY` when there are a million.

use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use cqrs_es::persist::SerializedEvent;
use dossier_eventlog::db::Pool;
use dossier_eventlog::eventstore::{META_ACTOR, META_TENANT, PgEventStore};
use dossier_test_support::wait::Wait;
use futures::SinkExt as _;
use serde_json::{Value, json};
use uuid::Uuid;

/// The aggregate type of files in the log.
pub const FILE: &str = "file";

/// The payload of a `FileUploaded` (version 2), as the log stores it (the
/// inner object, without the type tag).
pub fn uploaded_payload(
    tenant: &str,
    customer: &str,
    id: Uuid,
    name: &str,
    at: DateTime<Utc>,
) -> Value {
    json!({
        "tenant": tenant,
        "customer_id": customer,
        "name": name,
        "file_name": "document.pdf",
        "content_type": "application/pdf",
        "size": 48213,
        "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "blob_key": format!("{tenant}/{customer}/{id}"),
        "visibility": "internal",
        "origin": "staff_upload",
        "contract_id": null,
        "task_id": null,
        "uploaded_at": at,
    })
}

/// A file event for the event store (payload tagged the way cqrs-es writes it).
pub fn serialized(
    tenant: &str,
    id: Uuid,
    sequence: usize,
    event_type: &str,
    event_version: &str,
    inner: Value,
) -> SerializedEvent {
    let mut tagged = serde_json::Map::new();
    tagged.insert(event_type.to_owned(), inner);
    SerializedEvent {
        aggregate_id: id.to_string(),
        sequence,
        aggregate_type: FILE.to_owned(),
        event_type: event_type.to_owned(),
        event_version: event_version.to_owned(),
        payload: Value::Object(tagged),
        metadata: json!({ META_TENANT: tenant, META_ACTOR: "bench" }),
    }
}

/// Uploads `files` (id, customer) of `tenant` through the event store, 500
/// events per transaction.
pub async fn append_uploads(
    store: &PgEventStore,
    tenant: &str,
    files: &[(Uuid, String)],
) -> anyhow::Result<()> {
    let now = Utc::now();
    for chunk in files.chunks(500) {
        let events: Vec<SerializedEvent> = chunk
            .iter()
            .map(|(id, customer)| {
                serialized(
                    tenant,
                    *id,
                    1,
                    "FileUploaded",
                    "2",
                    uploaded_payload(tenant, customer, *id, "Seeded file", now),
                )
            })
            .collect();
        store
            .persist_returning_positions(&events)
            .await
            .map_err(|e| anyhow::anyhow!("seeding uploads: {e}"))?;
    }
    Ok(())
}

/// Waits until the files read model shows `count` files of `tenant`.
pub async fn wait_for_files(pool: &Pool, tenant: &str, count: i64) -> anyhow::Result<()> {
    // A failing query ends the wait at once, with its error.
    Wait::new(format!("the files read model to show {count} seeded files"))
        .timeout(Duration::from_secs(120))
        .until(async || {
            let seen = match files_of(pool, tenant).await {
                Ok(seen) => seen,
                Err(error) => return Ok(Err(error)),
            };
            if seen >= count { Ok(Ok(())) } else { Err(seen) }
        })
        .await?
}

/// How many files of `tenant` the files read model shows.
async fn files_of(pool: &Pool, tenant: &str) -> anyhow::Result<i64> {
    let client = pool.get().await?;
    Ok(client
        .query_one("SELECT count(*) FROM files WHERE tenant = $1", &[&tenant])
        .await?
        .get(0))
}

/// Streams `rows` (lines of COPY text format, each ending in `\n`) into
/// `copy_sql` (`COPY t (...) FROM STDIN`), in chunks of about a megabyte.
pub async fn copy_in(
    pool: &Pool,
    copy_sql: &str,
    rows: impl Iterator<Item = String>,
) -> anyhow::Result<u64> {
    let client = pool.get().await?;
    let sink = client.copy_in::<_, Bytes>(copy_sql).await?;
    futures::pin_mut!(sink);
    let mut buffer = String::with_capacity(1 << 20);
    for row in rows {
        buffer.push_str(&row);
        if buffer.len() >= 1 << 20 {
            let chunk = std::mem::replace(&mut buffer, String::with_capacity(1 << 20));
            sink.send(Bytes::from(chunk)).await?;
        }
    }
    if !buffer.is_empty() {
        sink.send(Bytes::from(buffer)).await?;
    }
    let copied = sink.as_mut().finish().await.context("finishing COPY")?;
    Ok(copied)
}

/// A cheap, deterministic pseudo-random sequence for seed data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// In `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// A UUID from the seed sequence (v4-shaped), fast and reproducible.
pub fn uuid(rng: &mut Rng) -> Uuid {
    let bits = (u128::from(rng.next()) << 64) | u128::from(rng.next());
    uuid::Builder::from_random_bytes(bits.to_le_bytes()).into_uuid()
}
