//! Idempotency keys of HTTP commands (`Idempotency-Key`, CONTRACT.md
//! "Idempotent requests", ADR 0017): the claims and stored answers of
//! `http_idempotency`, and the retention sweep of keys and receipts.
//!
//! A request with a key first [`claim`]s it for its tenant and user. The
//! command it runs carries [`receipt_key`] in its metadata, so its receipt is
//! written in the same statement as its events ([`crate::receipts`]): a
//! process that dies after the commit and before it answered leaves an
//! `in_flight` claim and a receipt, and the retry answers from the receipt.
//! An in-flight claim is held by a lease its process renews while the request
//! runs; one whose lease ran out is taken over only if its command recorded
//! nothing (no receipt).

use std::time::Duration;

use serde_json::Value;
use tokio_postgres::GenericClient;
use uuid::Uuid;

use crate::db::{Pool, pg_detail};
use crate::receipts::{self, Receipt};

/// How long a key and its answer are kept: the same key within this time is
/// the same request; after it, a new one. Command receipts (HTTP and AMQP)
/// are kept as long.
pub const RETENTION: Duration = Duration::from_secs(24 * 60 * 60);

/// How long an in-flight claim holds without being renewed; its process
/// renews it every third of this while the request runs.
pub const LEASE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum IdempotencyError {
    #[error("no Postgres connection for idempotency keys: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("idempotency keys: {}", pg_detail(.0))]
    Query(#[from] tokio_postgres::Error),
    #[error("idempotency keys: {0}")]
    Receipt(#[from] receipts::ReceiptError),
}

/// Who sent which key for which request.
#[derive(Debug, Clone)]
pub struct KeyClaim {
    pub tenant: String,
    /// The token's `sub`.
    pub subject: String,
    pub key: String,
    /// SHA-256 (hex) of method, path, query and (for a non-form) the body.
    pub fingerprint: String,
    /// This claim's own id: only its holder renews, completes or releases it.
    pub owner: Uuid,
}

impl KeyClaim {
    /// The key the command's events carry (`META_IDEMPOTENCY_KEY`), scoped to
    /// the user, apart from every AMQP `message_id` (see [`receipt_key`]).
    pub fn receipt_key(&self) -> String {
        receipt_key(&self.subject, &self.key)
    }
}

/// The receipt key of an HTTP request: `http:<length of sub>:<sub>:<key>`,
/// so that no two (subject, key) pairs give the same text.
pub fn receipt_key(subject: &str, key: &str) -> String {
    format!("http:{}:{subject}:{key}", subject.len())
}

/// An answer as it was given: status, the headers worth repeating, body.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredAnswer {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// What [`claim`] found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claimed {
    /// The key is this request's now (new, expired, or a stale claim that
    /// recorded nothing): run it.
    Run,
    /// The request ran before and answered this. A form's content must match
    /// `content_fingerprint` (when set) before the answer is repeated.
    Done {
        answer: StoredAnswer,
        content_fingerprint: Option<String>,
    },
    /// The request's command was recorded, but no answer was stored (its
    /// process died, or is still answering): answer from the receipt.
    Recorded {
        receipt: Receipt,
        content_fingerprint: Option<String>,
    },
    /// Still running elsewhere and nothing recorded yet.
    InFlight { retry_after: Duration },
    /// The key was used for another request.
    Reused,
}

/// Claims `claim`'s key, or says why not (see [`Claimed`]).
pub async fn claim(pool: &Pool, claim: &KeyClaim) -> Result<Claimed, IdempotencyError> {
    let mut client = pool.get().await?;
    let tx = client.transaction().await?;
    let lease = LEASE.as_secs_f64();
    let retention = RETENTION.as_secs_f64();
    let inserted = tx
        .execute(
            "INSERT INTO http_idempotency (tenant, subject, idempotency_key, fingerprint, state, \
                 owner, lease_until, expires_at) \
             VALUES ($1, $2, $3, $4, 'in_flight', $5, now() + make_interval(secs => $6), \
                 now() + make_interval(secs => $7)) \
             ON CONFLICT DO NOTHING",
            &[
                &claim.tenant,
                &claim.subject,
                &claim.key,
                &claim.fingerprint,
                &claim.owner,
                &lease,
                &retention,
            ],
        )
        .await?;
    let receipt_key = claim.receipt_key();
    if inserted == 1 {
        // A receipt without a claim: an earlier run answered something not
        // worth repeating (it released its claim) after its events may have
        // been recorded. Recorded is recorded. A receipt older than the
        // retention belongs to an earlier use of the key.
        tx.execute(
            "DELETE FROM command_receipts WHERE tenant = $1 AND idempotency_key = $2 \
             AND recorded_at < now() - make_interval(secs => $3)",
            &[&claim.tenant, &receipt_key, &retention],
        )
        .await?;
        let receipt = receipts::find_with(&*tx, &claim.tenant, &receipt_key).await?;
        tx.commit().await?;
        return Ok(match receipt {
            Some(receipt @ Receipt::Accepted { .. }) => Claimed::Recorded {
                receipt,
                content_fingerprint: None,
            },
            _ => Claimed::Run,
        });
    }
    let row = tx
        .query_one(
            "SELECT fingerprint, content_fingerprint, state, status, headers, body, \
                 expires_at < now() AS expired, \
                 greatest(extract(epoch FROM lease_until - now()), 0)::float8 AS lease_left \
             FROM http_idempotency WHERE tenant = $1 AND subject = $2 AND idempotency_key = $3 \
             FOR UPDATE",
            &[&claim.tenant, &claim.subject, &claim.key],
        )
        .await?;
    let expired: bool = row.get("expired");
    if expired {
        // A new request: the key starts over, and so does its receipt.
        take_over(&*tx, claim, true).await?;
        tx.execute(
            "DELETE FROM command_receipts WHERE tenant = $1 AND idempotency_key = $2",
            &[&claim.tenant, &receipt_key],
        )
        .await?;
        tx.commit().await?;
        return Ok(Claimed::Run);
    }
    let fingerprint: String = row.get("fingerprint");
    if fingerprint != claim.fingerprint {
        tx.commit().await?;
        return Ok(Claimed::Reused);
    }
    let content_fingerprint: Option<String> = row.get("content_fingerprint");
    let state: String = row.get("state");
    if state == "done" {
        let status: i16 = row.get::<_, Option<i16>>("status").unwrap_or(500);
        let headers: Option<Value> = row.get("headers");
        let headers = headers
            .and_then(|h| h.as_object().cloned())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(name, value)| value.as_str().map(|v| (name, v.to_owned())))
            .collect();
        let body: Vec<u8> = row.get::<_, Option<Vec<u8>>>("body").unwrap_or_default();
        tx.commit().await?;
        return Ok(Claimed::Done {
            answer: StoredAnswer {
                status: u16::try_from(status).unwrap_or(500),
                headers,
                body,
            },
            content_fingerprint,
        });
    }
    // In flight: recorded already, or still running, or abandoned.
    if let Some(receipt @ Receipt::Accepted { .. }) =
        receipts::find_with(&*tx, &claim.tenant, &receipt_key).await?
    {
        tx.commit().await?;
        return Ok(Claimed::Recorded {
            receipt,
            content_fingerprint,
        });
    }
    let lease_left: f64 = row.get("lease_left");
    if lease_left > 0.0 {
        tx.commit().await?;
        return Ok(Claimed::InFlight {
            retry_after: Duration::from_secs_f64(lease_left.clamp(1.0, 5.0)),
        });
    }
    // Its process stopped renewing the lease and recorded nothing: a run
    // that never took effect, and the key is this request's now.
    take_over(&*tx, claim, false).await?;
    tx.commit().await?;
    Ok(Claimed::Run)
}

async fn take_over<C: GenericClient>(
    client: &C,
    claim: &KeyClaim,
    restart_expiry: bool,
) -> Result<(), IdempotencyError> {
    client
        .execute(
            "UPDATE http_idempotency SET fingerprint = $4, content_fingerprint = NULL, \
                 state = 'in_flight', status = NULL, headers = NULL, body = NULL, owner = $5, \
                 lease_until = now() + make_interval(secs => $6), \
                 created_at = CASE WHEN $8 THEN now() ELSE created_at END, \
                 expires_at = CASE WHEN $8 THEN now() + make_interval(secs => $7) ELSE expires_at END \
             WHERE tenant = $1 AND subject = $2 AND idempotency_key = $3",
            &[
                &claim.tenant,
                &claim.subject,
                &claim.key,
                &claim.fingerprint,
                &claim.owner,
                &LEASE.as_secs_f64(),
                &RETENTION.as_secs_f64(),
                &restart_expiry,
            ],
        )
        .await?;
    Ok(())
}

/// Extends the lease of a claim this process holds (while its request runs).
pub async fn renew(pool: &Pool, claim: &KeyClaim) -> Result<(), IdempotencyError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE http_idempotency SET lease_until = now() + make_interval(secs => $5) \
             WHERE tenant = $1 AND subject = $2 AND idempotency_key = $3 AND owner = $4 \
               AND state = 'in_flight'",
            &[
                &claim.tenant,
                &claim.subject,
                &claim.key,
                &claim.owner,
                &LEASE.as_secs_f64(),
            ],
        )
        .await?;
    Ok(())
}

/// Records what a form held (fields and the file's SHA-256), once received:
/// a retry must send the same before it gets the answer.
pub async fn set_content(
    pool: &Pool,
    claim: &KeyClaim,
    content_fingerprint: &str,
) -> Result<(), IdempotencyError> {
    let client = pool.get().await?;
    client
        .execute(
            "UPDATE http_idempotency SET content_fingerprint = $5 \
             WHERE tenant = $1 AND subject = $2 AND idempotency_key = $3 AND owner = $4",
            &[
                &claim.tenant,
                &claim.subject,
                &claim.key,
                &claim.owner,
                &content_fingerprint,
            ],
        )
        .await?;
    Ok(())
}

/// Stores the answer of a claim this process holds: from now on it is the
/// answer to the key.
pub async fn complete(
    pool: &Pool,
    claim: &KeyClaim,
    answer: &StoredAnswer,
) -> Result<(), IdempotencyError> {
    let client = pool.get().await?;
    let headers: serde_json::Map<String, Value> = answer
        .headers
        .iter()
        .map(|(name, value)| (name.clone(), Value::String(value.clone())))
        .collect();
    let status = i16::try_from(answer.status).unwrap_or(500);
    client
        .execute(
            "UPDATE http_idempotency SET state = 'done', status = $5, headers = $6, body = $7 \
             WHERE tenant = $1 AND subject = $2 AND idempotency_key = $3 AND owner = $4",
            &[
                &claim.tenant,
                &claim.subject,
                &claim.key,
                &claim.owner,
                &status,
                &Value::Object(headers),
                &answer.body,
            ],
        )
        .await?;
    Ok(())
}

/// Gives up a claim this process holds without an answer to repeat (a
/// backing service failed, the client went away): the next request with the
/// key runs, or answers from the receipt if this one was recorded after all.
pub async fn release(pool: &Pool, claim: &KeyClaim) -> Result<(), IdempotencyError> {
    let client = pool.get().await?;
    client
        .execute(
            "DELETE FROM http_idempotency \
             WHERE tenant = $1 AND subject = $2 AND idempotency_key = $3 AND owner = $4 \
               AND state = 'in_flight'",
            &[&claim.tenant, &claim.subject, &claim.key, &claim.owner],
        )
        .await?;
    Ok(())
}

/// What one retention sweep deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub keys: u64,
    pub receipts: u64,
}

/// Deletes idempotency keys past their expiry and command receipts (HTTP and
/// AMQP) older than `retention`.
pub async fn sweep(pool: &Pool, retention: Duration) -> Result<Swept, IdempotencyError> {
    let client = pool.get().await?;
    let keys = client
        .execute("DELETE FROM http_idempotency WHERE expires_at < now()", &[])
        .await?;
    let receipts = client
        .execute(
            "DELETE FROM command_receipts WHERE recorded_at < now() - make_interval(secs => $1)",
            &[&retention.as_secs_f64()],
        )
        .await?;
    Ok(Swept { keys, receipts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipt_keys_never_collide_across_subjects() {
        assert_ne!(receipt_key("a:b", "c"), receipt_key("a", "b:c"));
        assert_eq!(receipt_key("alice", "k-1"), "http:5:alice:k-1");
    }
}
