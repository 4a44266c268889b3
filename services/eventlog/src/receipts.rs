//! Command receipts: what a command with an idempotency key (an AMQP
//! `message_id`) answered, so that the same key has its effect once and the
//! second answer repeats the first.
//!
//! An accepted command's receipt is written by the event store in the same
//! transaction as its events ([`crate::eventstore`] reads
//! [`crate::eventstore::META_IDEMPOTENCY_KEY`]); a command that wrote no events
//! (refused, or nothing to change) gets its receipt afterwards, first writer
//! wins.

use serde_json::Value;
use tokio_postgres::GenericClient;

use crate::db::{Pool, pg_detail};

/// The SQL the event store runs inside its append transaction.
pub(crate) const INSERT_ACCEPTED: &str = "\
    INSERT INTO command_receipts (tenant, idempotency_key, status, aggregate_type, aggregate_id, position) \
    VALUES ($1, $2, 'accepted', $3, $4, $5)";

/// The constraint whose violation means "this key was already used".
pub(crate) const PRIMARY_KEY: &str = "command_receipts_pkey";

#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("no Postgres connection for command receipts: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("command receipts: {}", pg_detail(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// How a command with an idempotency key ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Receipt {
    Accepted {
        aggregate_type: String,
        aggregate_id: String,
        position: i64,
    },
    Rejected {
        code: String,
        message: String,
    },
}

impl Receipt {
    /// The contract's AMQP reply: `{"status": "accepted", "file_id"?, "position"}`
    /// or `{"status": "rejected", "error": {"code", "message"}}`. The aggregate's id
    /// is named after its type (`file_id`, `task_id`); an id scoped by its tenant
    /// (`{tenant}/{customer_id}`, a customer's) is answered without the tenant,
    /// which is the message's own.
    pub fn reply(&self) -> Value {
        match self {
            Self::Accepted {
                aggregate_type,
                aggregate_id,
                position,
            } => {
                let mut reply = serde_json::json!({"status": "accepted", "position": position});
                let id = aggregate_id
                    .split_once('/')
                    .map_or(aggregate_id.as_str(), |(_, id)| id);
                reply[format!("{aggregate_type}_id")] = Value::String(id.to_owned());
                reply
            }
            Self::Rejected { code, message } => serde_json::json!({
                "status": "rejected",
                "error": {"code": code, "message": message},
            }),
        }
    }
}

/// The receipt of `(tenant, key)`, if the key was used before.
pub async fn find(pool: &Pool, tenant: &str, key: &str) -> Result<Option<Receipt>, ReceiptError> {
    let client = pool.get().await?;
    find_with(&**client, tenant, key).await
}

pub(crate) async fn find_with<C: GenericClient>(
    client: &C,
    tenant: &str,
    key: &str,
) -> Result<Option<Receipt>, ReceiptError> {
    let row = client
        .query_opt(
            "SELECT status, aggregate_type, aggregate_id, position, error \
             FROM command_receipts WHERE tenant = $1 AND idempotency_key = $2",
            &[&tenant, &key],
        )
        .await?;
    Ok(row.map(|row| {
        let status: String = row.get(0);
        if status == "accepted" {
            Receipt::Accepted {
                aggregate_type: row.get::<_, Option<String>>(1).unwrap_or_default(),
                aggregate_id: row.get::<_, Option<String>>(2).unwrap_or_default(),
                position: row.get::<_, Option<i64>>(3).unwrap_or_default(),
            }
        } else {
            let error: Option<Value> = row.get(4);
            let error = error.unwrap_or(Value::Null);
            Receipt::Rejected {
                code: error["code"].as_str().unwrap_or("internal").to_owned(),
                message: error["message"].as_str().unwrap_or_default().to_owned(),
            }
        }
    }))
}

/// Records `receipt` unless the key already has one, and answers the receipt
/// that stands (the first one written).
pub async fn record(
    pool: &Pool,
    tenant: &str,
    key: &str,
    receipt: &Receipt,
) -> Result<Receipt, ReceiptError> {
    let client = pool.get().await?;
    match receipt {
        Receipt::Accepted {
            aggregate_type,
            aggregate_id,
            position,
        } => {
            client
                .execute(
                    &format!("{INSERT_ACCEPTED} ON CONFLICT DO NOTHING"),
                    &[&tenant, &key, aggregate_type, aggregate_id, position],
                )
                .await?;
        }
        Receipt::Rejected { code, message } => {
            let error = serde_json::json!({"code": code, "message": message});
            client
                .execute(
                    "INSERT INTO command_receipts (tenant, idempotency_key, status, error) \
                     VALUES ($1, $2, 'rejected', $3) ON CONFLICT DO NOTHING",
                    &[&tenant, &key, &error],
                )
                .await?;
        }
    }
    Ok(find_with(&**client, tenant, key)
        .await?
        .unwrap_or_else(|| receipt.clone()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reply_names_the_aggregate_id_after_its_type_without_a_tenant_scope() {
        let file = Receipt::Accepted {
            aggregate_type: "file".into(),
            aggregate_id: "0193c1b2-0000-7000-8000-000000000000".into(),
            position: 7,
        };
        assert_eq!(
            file.reply(),
            serde_json::json!({"status": "accepted", "position": 7,
                "file_id": "0193c1b2-0000-7000-8000-000000000000"})
        );
        let customer = Receipt::Accepted {
            aggregate_type: "customer".into(),
            aggregate_id: "acme/cust-42".into(),
            position: 9,
        };
        assert_eq!(customer.reply()["customer_id"], "cust-42");
    }
}
