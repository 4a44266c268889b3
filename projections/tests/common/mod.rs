//! What the integration tests of this crate share: times, uploads, writing rows into
//! the real `events` table the way the event store does, reading the files read
//! model back whole, and waiting on a condition instead of sleeping.
//!
//! How events get into the log here: this crate does not drive `CqrsFramework` over
//! `PgEventStore` for file events; [`append`] writes exactly the row `PgEventStore`
//! writes (same columns; position and xid from the table's trigger), with the
//! payload in the shape `dossier_domain::codec` documents for the log.

// Each test binary uses its own part of this module.
#![allow(dead_code)]

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use dossier_domain::codec;
use dossier_domain::{
    BlobKey, ContentType, ContractId, CustomerId, DisplayName, FileEvent, FileId, FileName, Origin,
    Sha256Hex, TenantId, Visibility,
};
use dossier_eventlog::db::Pool;
use dossier_projections::Runner;
use dossier_test_support::wait::Wait;
use serde_json::{Value, json};
use uuid::Uuid;

pub const TENANT: &str = "acme";
pub const OTHER_TENANT: &str = "globex";
pub const CUSTOMER: &str = "cust-42";
pub const SHA: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
/// How long a test waits for anything before it fails.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn tenant(raw: &str) -> TenantId {
    TenantId::parse(raw).unwrap()
}

pub fn customer(raw: &str) -> CustomerId {
    CustomerId::parse(raw).unwrap()
}

/// 2026-01-01T00:00:00Z plus `minutes` (whole seconds, so the value survives
/// Postgres' microsecond precision unchanged).
pub fn at(minutes: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap() + chrono::Duration::minutes(minutes)
}

pub fn event_type(event: &FileEvent) -> &'static str {
    match event {
        FileEvent::FileUploaded { .. } => FileEvent::UPLOADED,
        FileEvent::FileRenamed { .. } => FileEvent::RENAMED,
        FileEvent::FileVisibilityChanged { .. } => FileEvent::VISIBILITY_CHANGED,
        FileEvent::FileViewed { .. } => FileEvent::VIEWED,
        FileEvent::FileSigned { .. } => FileEvent::SIGNED,
        FileEvent::FileDeleted { .. } => FileEvent::DELETED,
        FileEvent::BlobPurged { .. } => FileEvent::BLOB_PURGED,
    }
}

/// The version the event store writes an event at: `FileUploaded` at 2, the rest at 1.
pub fn event_version(event: &FileEvent) -> &'static str {
    if matches!(event, FileEvent::FileUploaded { .. }) {
        "2"
    } else {
        "1"
    }
}

/// The payload as the log stores it: the event without its enum tag.
pub fn payload(event: &FileEvent) -> Value {
    let kind = event_type(event);
    codec::unwrap_payload(kind, serde_json::to_value(event).unwrap())
}

/// What an upload records.
#[derive(Debug, Clone)]
pub struct Upload {
    pub tenant: &'static str,
    pub customer: &'static str,
    pub name: String,
    pub created: DateTime<Utc>,
    pub visibility: Visibility,
    pub origin: Origin,
    pub contract: Option<&'static str>,
    pub task: Option<Uuid>,
    pub size: u64,
}

impl Upload {
    /// An internal staff upload of [`TENANT`]'s [`CUSTOMER`].
    pub fn new(name: impl Into<String>, created: DateTime<Utc>) -> Self {
        Self {
            tenant: TENANT,
            customer: CUSTOMER,
            name: name.into(),
            created,
            visibility: Visibility::Internal,
            origin: Origin::StaffUpload,
            contract: None,
            task: None,
            size: 48_213,
        }
    }

    pub fn event(&self, id: FileId) -> FileEvent {
        let tenant = tenant(self.tenant);
        let customer_id = customer(self.customer);
        FileEvent::FileUploaded {
            blob_key: BlobKey::for_file(&tenant, &customer_id, id),
            tenant,
            customer_id,
            name: DisplayName::parse(&self.name).unwrap(),
            file_name: FileName::parse(&format!("{}.pdf", self.name.replace(' ', "_"))).unwrap(),
            content_type: ContentType::parse(Some("application/pdf")).unwrap(),
            size: self.size,
            sha256: Sha256Hex::parse(SHA).unwrap(),
            visibility: self.visibility,
            origin: self.origin,
            contract_id: self.contract.map(|c| ContractId::parse(c).unwrap()),
            task_id: self.task,
            uploaded_at: self.created,
        }
    }
}

/// One row for the log: tenant, aggregate type and id, event type, version, payload.
#[derive(Debug, Clone)]
pub struct Row {
    pub tenant: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub event_type: String,
    pub version: String,
    pub payload: Value,
}

impl Row {
    /// A file event as the event store writes it (see [`event_version`], [`payload`]).
    pub fn file(tenant: &str, id: Uuid, event: &FileEvent) -> Self {
        Self {
            tenant: tenant.to_owned(),
            aggregate_type: "file".to_owned(),
            aggregate_id: id.to_string(),
            event_type: event_type(event).to_owned(),
            version: event_version(event).to_owned(),
            payload: payload(event),
        }
    }

    /// Any aggregate, any payload, version 1 (poison, foreign events, odd shapes).
    pub fn raw(
        tenant: &str,
        aggregate_type: &str,
        aggregate_id: &str,
        kind: &str,
        payload: Value,
    ) -> Self {
        Self {
            tenant: tenant.to_owned(),
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            event_type: kind.to_owned(),
            version: "1".to_owned(),
            payload,
        }
    }
}

/// Appends `rows` in one transaction, each aggregate's sequence going on from the
/// log's; answers the last position.
pub async fn append(pool: &Pool, rows: &[Row]) -> i64 {
    let mut client = pool.get().await.unwrap();
    let tx = client.transaction().await.unwrap();
    let mut last = 0;
    for row in rows {
        let metadata = json!({"tenant": row.tenant, "actor": "tester"});
        last = tx
            .query_one(
                "INSERT INTO events (id, tenant, aggregate_type, aggregate_id, sequence, \
                     event_type, event_version, payload, metadata, actor) \
                 SELECT $1, $2, $3, $4, COALESCE(max(sequence), 0) + 1, $5, $6, $7, $8, 'tester' \
                 FROM events WHERE aggregate_type = $3 AND aggregate_id = $4 \
                 RETURNING position",
                &[
                    &Uuid::now_v7(),
                    &row.tenant,
                    &row.aggregate_type,
                    &row.aggregate_id,
                    &row.event_type,
                    &row.version,
                    &row.payload,
                    &metadata,
                ],
            )
            .await
            .unwrap()
            .get(0);
    }
    tx.commit().await.unwrap();
    last
}

/// Every row of `files` and `files_tombstones`, every column, in id order.
pub async fn snapshot(pool: &Pool) -> (Vec<Value>, Vec<Value>) {
    let client = pool.get().await.unwrap();
    let mut tables = Vec::new();
    for sql in [
        "SELECT to_jsonb(f) FROM files f ORDER BY id",
        "SELECT to_jsonb(t) FROM files_tombstones t ORDER BY id",
    ] {
        tables.push(
            client
                .query(sql, &[])
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<_, Value>(0))
                .collect::<Vec<_>>(),
        );
    }
    let tombstones = tables.pop().unwrap();
    (tables.pop().unwrap(), tombstones)
}

/// Waits (looking every few milliseconds) until `condition` holds; fails the
/// test, naming `what`, after [`WAIT`].
pub async fn wait_until(what: &str, condition: impl AsyncFnMut() -> bool) {
    Wait::new(what)
        .timeout(WAIT)
        .interval(Duration::from_millis(5))
        .expect(condition)
        .await;
}

/// Steps until the runner's checkpoint is at or past `position`. (`catch_up` alone
/// stops at what is safe to read at that moment; other tests' transactions on the
/// same server can hold the log's watermark back for a moment.)
pub async fn catch_up_to(runner: &mut Runner, position: i64) {
    Wait::new(format!("the runner to reach {position}"))
        .timeout(WAIT)
        .interval(Duration::from_millis(5))
        .expect(async || {
            let reached = runner.catch_up().await.expect("the projection applies");
            if reached >= position {
                Ok(())
            } else {
                Err(reached)
            }
        })
        .await;
}
