//! The portal read model: tasks with their message threads, and each tenant's
//! portal settings. A task's attachments are the live files carrying its id,
//! read from the files read model ([`crate::files::by_tasks`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use dossier_domain::{CustomerId, SettingsEvent, TaskEvent, TenantId, codec};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::LoggedEvent;
use serde::Serialize;
use tokio_postgres::Transaction;
use uuid::Uuid;

use crate::error::ProjectionError;
use crate::files::{self, FileView, QueryError};
use crate::projection::{Projection, decode_event};

/// Keeps `tasks`, `task_messages` and `tenant_settings` in step with the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortalProjection;

impl PortalProjection {
    pub const NAME: &'static str = "portal";
}

const INSERT_TASK: &str = "\
    INSERT INTO tasks (id, tenant, customer_id, title, created_at, last_position) \
    VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING";

const INSERT_MESSAGE: &str = "\
    INSERT INTO task_messages (id, task_id, tenant, author, text, file_id, at, position) \
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (id) DO NOTHING";

const UPSERT_SETTINGS: &str = "\
    INSERT INTO tenant_settings (tenant, portal_uploads_enabled, last_position) VALUES ($1, $2, $3) \
    ON CONFLICT (tenant) DO UPDATE SET portal_uploads_enabled = EXCLUDED.portal_uploads_enabled, \
        last_position = EXCLUDED.last_position \
    WHERE tenant_settings.last_position < EXCLUDED.last_position";

impl Projection for PortalProjection {
    fn name(&self) -> &'static str {
        Self::NAME
    }

    fn tables(&self) -> &'static [&'static str] {
        &["tasks", "task_messages", "tenant_settings"]
    }

    async fn apply(
        &self,
        tx: &Transaction<'_>,
        event: &LoggedEvent,
    ) -> Result<(), ProjectionError> {
        let undecodable = |source: codec::DecodeError| ProjectionError::Undecodable {
            projection: Self::NAME,
            position: event.position,
            source: Box::new(source),
        };
        let position = event.position;
        let tenant = event.tenant.as_str();
        match event.aggregate_type.as_str() {
            "task" => {
                let (task_id, decoded): (Uuid, TaskEvent) = decode_event(Self::NAME, event)?;
                match decoded {
                    TaskEvent::TaskCreated {
                        customer_id,
                        title,
                        created_at,
                        ..
                    } => {
                        tx.execute(
                            INSERT_TASK,
                            &[
                                &task_id,
                                &tenant,
                                &customer_id.as_str(),
                                &title.as_str(),
                                &created_at,
                                &position,
                            ],
                        )
                        .await?;
                    }
                    TaskEvent::TaskMessagePosted {
                        message_id,
                        author,
                        text,
                        file_id,
                        at,
                    } => {
                        let file_id = file_id.map(|f| f.0);
                        tx.execute(
                            INSERT_MESSAGE,
                            &[
                                &message_id,
                                &task_id,
                                &tenant,
                                &author.as_str(),
                                &text.as_str(),
                                &file_id,
                                &at,
                                &position,
                            ],
                        )
                        .await?;
                    }
                }
            }
            "settings" => {
                let SettingsEvent::PortalUploadsSet { enabled, .. } =
                    codec::decode(&event.event_type, &event.event_version, &event.payload)
                        .map_err(undecodable)?;
                tx.execute(UPSERT_SETTINGS, &[&tenant, &enabled, &position])
                    .await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// One message of a task's thread (CONTRACT.md Task).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct MessageView {
    pub id: Uuid,
    pub author: String,
    pub text: String,
    pub at: DateTime<Utc>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file_id: Option<Uuid>,
}

/// A task with its attachments and messages (CONTRACT.md Task).
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = Task)]
pub struct TaskView {
    pub id: Uuid,
    #[schema(value_type = String)]
    pub customer_id: CustomerId,
    pub title: String,
    pub created_at: DateTime<Utc>,
    pub attachments: Vec<FileView>,
    pub messages: Vec<MessageView>,
}

/// The customer a task of `tenant` belongs to; `None` for an unknown task or
/// another tenant's.
pub async fn task_customer(
    pool: &Pool,
    tenant: &TenantId,
    task_id: Uuid,
) -> Result<Option<CustomerId>, QueryError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT customer_id FROM tasks WHERE id = $1 AND tenant = $2",
            &[&task_id, &tenant.as_str()],
        )
        .await?;
    row.map(|row| {
        let raw: String = row.get(0);
        CustomerId::parse(&raw).map_err(|e| QueryError::Corrupt {
            column: "customer_id",
            detail: e.to_string(),
        })
    })
    .transpose()
}

/// A customer's tasks, oldest first, each with its attachments and thread.
pub async fn tasks_of(
    pool: &Pool,
    tenant: &TenantId,
    customer: &CustomerId,
) -> Result<Vec<TaskView>, QueryError> {
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, title, created_at FROM tasks WHERE tenant = $1 AND customer_id = $2 ORDER BY created_at, id",
            &[&tenant.as_str(), &customer.as_str()],
        )
        .await?;
    let mut tasks: Vec<TaskView> = rows
        .iter()
        .map(|row| TaskView {
            id: row.get(0),
            customer_id: customer.clone(),
            title: row.get(1),
            created_at: row.get(2),
            attachments: Vec::new(),
            messages: Vec::new(),
        })
        .collect();
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    if ids.is_empty() {
        return Ok(tasks);
    }
    let index: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let messages = client
        .query(
            "SELECT task_id, id, author, text, at, file_id FROM task_messages \
             WHERE tenant = $1 AND task_id = ANY($2::uuid[]) ORDER BY position",
            &[&tenant.as_str(), &ids],
        )
        .await?;
    for row in &messages {
        let task_id: Uuid = row.get(0);
        if let Some(&i) = index.get(&task_id) {
            tasks[i].messages.push(MessageView {
                id: row.get(1),
                author: row.get(2),
                text: row.get(3),
                at: row.get(4),
                file_id: row.get(5),
            });
        }
    }
    drop(client);
    for file in files::by_tasks(pool, tenant, &ids).await? {
        if let Some(&i) = file.task_id.as_ref().and_then(|t| index.get(t)) {
            tasks[i].attachments.push(file);
        }
    }
    Ok(tasks)
}

/// Whether the tenant lets customers upload in the portal (on unless switched off).
pub async fn portal_uploads_enabled(pool: &Pool, tenant: &TenantId) -> Result<bool, QueryError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT portal_uploads_enabled FROM tenant_settings WHERE tenant = $1",
            &[&tenant.as_str()],
        )
        .await?;
    Ok(row.map(|row| row.get(0)).unwrap_or(true))
}
