//! The audit trail's queries: what `GET /v1/audit` reads (CONTRACT.md rule 9).
//!
//! The trail is written by the audit worker (`dossier_workers::audit`), one
//! entry per logged event, built from the log. Here: one tenant's entries,
//! newest first, filtered and paged by a keyset cursor ([`query`]), and the
//! endpoint's read-your-writes ([`wait_until_complete`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::LoggedEvent;
use dossier_eventlog::personal::{Erased, FieldCipher};
use serde::Serialize;
use serde_json::Value;
use tokio_postgres::types::ToSql;

use crate::error::ProjectionError;

/// How many of a tenant's newest events [`wait_until_complete`] checks.
const COMPLETENESS_WINDOW: i64 = 200;

/// One entry of the audit trail, as `GET /v1/audit` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// The event's log position (the cross-reference to `GET /v1/events`).
    pub position: i64,
    /// When it happened.
    pub at: DateTime<Utc>,
    /// Who did it.
    pub actor: String,
    /// What, e.g. `file.downloaded`.
    pub action: String,
    /// The file concerned, if any.
    pub file_id: Option<String>,
    /// The customer concerned, if any.
    pub customer_id: Option<String>,
    /// Everything else the event says; a personal field whose key is
    /// destroyed is `null` here and named in `erased`.
    pub details: Value,
    /// The personal fields of `details` that were erased (their key is
    /// destroyed); absent when none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub erased: Vec<String>,
}

/// Which entries [`query`] returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only entries about this customer.
    pub customer_id: Option<String>,
    /// Only entries about this file.
    pub file_id: Option<String>,
    /// Only entries at or after this time.
    pub from: Option<DateTime<Utc>>,
    /// Only entries at or before this time.
    pub to: Option<DateTime<Utc>>,
    /// At most this many (the caller bounds it).
    pub limit: i64,
    /// Only entries before this position (the cursor).
    pub before: Option<i64>,
}

/// One page of the trail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditPage {
    /// Newest first.
    pub items: Vec<AuditEntry>,
    /// The cursor of the next page, `None` on the last.
    pub next_cursor: Option<String>,
}

/// The cursor that continues after `position` (opaque to clients).
pub fn encode_cursor(position: i64) -> String {
    format!("p{position}")
}

/// The position a cursor continues before; `None` for a cursor this service did
/// not give out.
pub fn decode_cursor(cursor: &str) -> Option<i64> {
    let digits = cursor.strip_prefix('p')?;
    // Exactly what `encode_cursor` writes: digits, no sign, no leading zero.
    if digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i64>().ok().filter(|p| *p > 0)
}

/// One page of `tenant`'s audit trail, newest first. Every query filters by
/// tenant: another tenant's entries are never seen. The trail keeps the
/// event's fields as the log stores them; `cipher` opens the personal ones
/// for the answer (without it they stay sealed).
pub async fn query(
    pool: &Pool,
    cipher: Option<&FieldCipher>,
    tenant: &str,
    filter: &AuditFilter,
) -> Result<AuditPage, ProjectionError> {
    let limit = filter.limit.max(1);
    let fetch = limit + 1;
    let mut sql = String::from(
        "SELECT position, at, actor, action, file_id, customer_id, details, \
                aggregate_type, event_type \
         FROM audit_trail WHERE tenant = $1",
    );
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&tenant];
    if let Some(customer_id) = &filter.customer_id {
        params.push(customer_id);
        sql.push_str(&format!(" AND customer_id = ${}", params.len()));
    }
    if let Some(file_id) = &filter.file_id {
        params.push(file_id);
        sql.push_str(&format!(" AND file_id = ${}", params.len()));
    }
    if let Some(from) = &filter.from {
        params.push(from);
        sql.push_str(&format!(" AND at >= ${}", params.len()));
    }
    if let Some(to) = &filter.to {
        params.push(to);
        sql.push_str(&format!(" AND at <= ${}", params.len()));
    }
    if let Some(before) = &filter.before {
        params.push(before);
        sql.push_str(&format!(" AND position < ${}", params.len()));
    }
    params.push(&fetch);
    sql.push_str(&format!(" ORDER BY position DESC LIMIT ${}", params.len()));

    let client = pool.get().await?;
    let rows = client.query(&sql, &params).await?;
    drop(client);
    let mut items = rows
        .iter()
        .map(|row| {
            Ok(AuditEntry {
                position: row.try_get("position")?,
                at: row.try_get("at")?,
                actor: row.try_get("actor")?,
                action: row.try_get("action")?,
                file_id: row.try_get("file_id")?,
                customer_id: row.try_get("customer_id")?,
                details: row.try_get("details")?,
                erased: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    if let Some(cipher) = cipher {
        // The details are the event's payload (less the entry's columns): open
        // them as the event's own fields.
        let mut events = rows
            .iter()
            .zip(&mut items)
            .map(|(row, entry)| {
                Ok(LoggedEvent {
                    id: uuid::Uuid::nil(),
                    position: entry.position,
                    tenant: tenant.to_owned(),
                    aggregate_type: row.try_get("aggregate_type")?,
                    aggregate_id: String::new(),
                    sequence: 0,
                    event_type: row.try_get("event_type")?,
                    event_version: String::new(),
                    at: entry.at,
                    actor: String::new(),
                    payload: std::mem::take(&mut entry.details),
                    metadata: Value::Null,
                    erased: Vec::new(),
                })
            })
            .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
        cipher.open(&mut events, Erased::Null).await?;
        for (entry, event) in items.iter_mut().zip(events) {
            entry.details = event.payload;
            entry.erased = event.erased;
        }
    }
    let next_cursor = if items.len() as i64 > limit {
        items.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        items.last().map(|entry| encode_cursor(entry.position))
    } else {
        None
    };
    Ok(AuditPage { items, next_cursor })
}

/// Read-your-writes for the trail: waits (at most `timeout`) until each of the
/// tenant's newest events that were in the log when the call began has its
/// entry. Answers whether it got there; on `false` the caller answers with what
/// there is (the worker lags or is not running anywhere).
///
/// Only the newest [`COMPLETENESS_WINDOW`] events are checked, so the cost is
/// bounded and an old entry that never came (a dead-lettered message) does not
/// slow every request down.
pub async fn wait_until_complete(
    pool: &Pool,
    tenant: &str,
    timeout: Duration,
) -> Result<bool, ProjectionError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let head: Option<i64> = pool
        .get()
        .await?
        .query_one(
            "SELECT max(position) FROM events WHERE tenant = $1",
            &[&tenant],
        )
        .await?
        .try_get(0)?;
    let Some(head) = head else {
        return Ok(true);
    };
    let mut pause = Duration::from_millis(5);
    loop {
        // A connection per look, so that waiting requests do not hold the pool.
        let client = pool.get().await?;
        let statement = client
            .prepare_cached(
                "SELECT count(*) FROM ( \
                     SELECT position FROM events WHERE tenant = $1 AND position <= $2 \
                     ORDER BY position DESC LIMIT $3) newest \
                 WHERE NOT EXISTS (SELECT 1 FROM audit_trail a WHERE a.position = newest.position)",
            )
            .await?;
        let missing: i64 = client
            .query_one(&statement, &[&tenant, &head, &COMPLETENESS_WINDOW])
            .await?
            .try_get(0)?;
        drop(client);
        if missing == 0 {
            return Ok(true);
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                tenant,
                missing,
                head,
                "the audit trail lags behind the log; answering with what it has (is the \
                 workers role running?)"
            );
            return Ok(false);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_foreign_ones_are_refused() {
        assert_eq!(decode_cursor(&encode_cursor(42)), Some(42));
        assert_eq!(decode_cursor("42"), None);
        assert_eq!(decode_cursor("p0"), None);
        assert_eq!(decode_cursor("p-1"), None);
        assert_eq!(decode_cursor("px"), None);
    }
}
