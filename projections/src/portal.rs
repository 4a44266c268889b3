//! The portal read model: tasks with their message threads, and each tenant's
//! portal settings. A task's attachments are the live files carrying its id,
//! read from the files read model ([`crate::files::by_tasks`]); a customer sees
//! only the published ones, and a message's file only when it is one of them
//! (CONTRACT.md rule 8, [`Audience`]).
//!
//! An erasure (`CustomerErased`) removes the customer's tasks and their
//! threads; a message that still arrives for an erased task (posted while the
//! erasure ran) is not kept, since its task is gone. The erased customer's
//! files left with their own `FileDeleted` events (files read model).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use dossier_domain::{CustomerEvent, CustomerId, SettingsEvent, TaskEvent, TenantId, codec};
use dossier_eventlog::db::Pool;
use dossier_eventlog::log::LoggedEvent;
use serde::Serialize;
use tokio_postgres::Row;
use tokio_postgres::types::{ToSql, Type};
use uuid::Uuid;

use crate::cursor::{Cursor, Paging};
use crate::customers::CUSTOMER_AGGREGATE_TYPE;
use crate::error::ProjectionError;
use crate::files::{self, Audience, FileView, QueryError};
use crate::projection::{ApplyTx, Projection, decode_event, decode_payload};

/// Keeps `tasks`, `task_messages` and `tenant_settings` in step with the log.
#[derive(Debug, Clone, Copy, Default)]
pub struct PortalProjection;

impl PortalProjection {
    pub const NAME: &'static str = "portal";
}

const INSERT_TASK: &str = "\
    INSERT INTO tasks (id, tenant, customer_id, title, created_at, last_position) \
    VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING";

/// Only into a task the read model has (an erased task's thread is gone).
const INSERT_MESSAGE: &str = "\
    INSERT INTO task_messages (id, task_id, tenant, author, text, file_id, at, position) \
    SELECT $1, $2, $3, $4, $5, $6, $7, $8 \
    WHERE EXISTS (SELECT 1 FROM tasks WHERE id = $2 AND tenant = $3) \
    ON CONFLICT (id) DO NOTHING";

/// An erasure removes the customer's threads: `$1` tenant, `$2` customer.
const ERASE_MESSAGES: &str = "\
    DELETE FROM task_messages WHERE tenant = $1 AND task_id IN ( \
        SELECT id FROM tasks WHERE tenant = $1 AND customer_id = $2)";

/// ... and then its tasks.
const ERASE_TASKS: &str = "DELETE FROM tasks WHERE tenant = $1 AND customer_id = $2";

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

    async fn apply(&self, tx: &ApplyTx<'_>, event: &LoggedEvent) -> Result<(), ProjectionError> {
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
                        tx.write(
                            INSERT_TASK,
                            &[
                                (&task_id, Type::UUID),
                                (&tenant, Type::TEXT),
                                (&customer_id.as_str(), Type::TEXT),
                                (&title.as_str(), Type::TEXT),
                                (&created_at, Type::TIMESTAMPTZ),
                                (&position, Type::INT8),
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
                        tx.write(
                            INSERT_MESSAGE,
                            &[
                                (&message_id, Type::UUID),
                                (&task_id, Type::UUID),
                                (&tenant, Type::TEXT),
                                (&author.as_str(), Type::TEXT),
                                (&text.as_str(), Type::TEXT),
                                (&file_id, Type::UUID),
                                (&at, Type::TIMESTAMPTZ),
                                (&position, Type::INT8),
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
                tx.write(
                    UPSERT_SETTINGS,
                    &[
                        (&tenant, Type::TEXT),
                        (&enabled, Type::BOOL),
                        (&position, Type::INT8),
                    ],
                )
                .await?;
            }
            CUSTOMER_AGGREGATE_TYPE => {
                let CustomerEvent::CustomerErased { customer_id, .. } =
                    decode_payload(Self::NAME, event)?;
                let who: &[(&(dyn ToSql + Sync), Type)] =
                    &[(&tenant, Type::TEXT), (&customer_id.as_str(), Type::TEXT)];
                tx.write(ERASE_MESSAGES, who).await?;
                tx.write(ERASE_TASKS, who).await?;
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
    row.map(|row| parse_customer(row.get(0))).transpose()
}

/// One page of a customer's tasks: `{"items": [Task], "next_cursor": ...}`.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
#[schema(as = TaskPage)]
pub struct TaskPage {
    /// Newest first.
    pub items: Vec<TaskView>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// A customer's tasks, oldest first, each with its attachments and thread as
/// staff see them: the staff list.
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
    drop(client);
    let tasks = rows.iter().map(|row| task_row(row, customer)).collect();
    with_threads(pool, tenant, Audience::Staff, tasks).await
}

/// One page of a customer's tasks, newest first (by `created_at`, then id),
/// each with what `audience` may see of its attachments and thread.
pub async fn tasks_page(
    pool: &Pool,
    tenant: &TenantId,
    customer: &CustomerId,
    audience: Audience<'_>,
    paging: Paging,
) -> Result<TaskPage, QueryError> {
    let limit = paging.limit.clamp(1, Paging::MAX_LIMIT);
    // One more than the page, to know whether there is a next page.
    let fetch = i64::from(limit) + 1;
    let cursor_at = paging.cursor.map(|c| c.created_at);
    let cursor_id = paging.cursor.map(|c| c.id);
    let client = pool.get().await?;
    let rows = client
        .query(
            "SELECT id, title, created_at FROM tasks WHERE tenant = $1 AND customer_id = $2 \
               AND ($3::timestamptz IS NULL OR (created_at, id) < ($3::timestamptz, $4::uuid)) \
             ORDER BY created_at DESC, id DESC LIMIT $5",
            &[
                &tenant.as_str(),
                &customer.as_str(),
                &cursor_at,
                &cursor_id,
                &fetch,
            ],
        )
        .await?;
    drop(client);
    let mut tasks: Vec<TaskView> = rows.iter().map(|row| task_row(row, customer)).collect();
    let next_cursor = if tasks.len() > limit as usize {
        tasks.truncate(limit as usize);
        tasks
            .last()
            .map(|last| Cursor::after(last.created_at, last.id).encode())
    } else {
        None
    };
    let items = with_threads(pool, tenant, audience, tasks).await?;
    Ok(TaskPage { items, next_cursor })
}

/// One task of `tenant` with what `audience` may see of its attachments and
/// thread; `None` for an unknown task or another tenant's. (The caller checks
/// that a customer's task is their own.)
pub async fn task(
    pool: &Pool,
    tenant: &TenantId,
    id: Uuid,
    audience: Audience<'_>,
) -> Result<Option<TaskView>, QueryError> {
    let client = pool.get().await?;
    let row = client
        .query_opt(
            "SELECT id, title, created_at, customer_id FROM tasks WHERE id = $1 AND tenant = $2",
            &[&id, &tenant.as_str()],
        )
        .await?;
    drop(client);
    let Some(row) = row else {
        return Ok(None);
    };
    let customer = parse_customer(row.get(3))?;
    let task = task_row(&row, &customer);
    let mut tasks = with_threads(pool, tenant, audience, vec![task]).await?;
    Ok(tasks.pop())
}

fn parse_customer(raw: String) -> Result<CustomerId, QueryError> {
    CustomerId::parse(&raw).map_err(|e| QueryError::Corrupt {
        column: "customer_id",
        detail: e.to_string(),
    })
}

/// A task without its attachments and thread, from `id, title, created_at`.
fn task_row(row: &Row, customer: &CustomerId) -> TaskView {
    TaskView {
        id: row.get(0),
        customer_id: customer.clone(),
        title: row.get(1),
        created_at: row.get(2),
        attachments: Vec::new(),
        messages: Vec::new(),
    }
}

/// Fills in each task's attachments and thread, as far as `audience` may see
/// them (rule 8): for a customer, only published attachments, and a message's
/// `file_id` only when it names one of them.
async fn with_threads(
    pool: &Pool,
    tenant: &TenantId,
    audience: Audience<'_>,
    mut tasks: Vec<TaskView>,
) -> Result<Vec<TaskView>, QueryError> {
    let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();
    if ids.is_empty() {
        return Ok(tasks);
    }
    let index: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
    let mut visible_files = HashSet::new();
    for file in files::by_tasks(pool, tenant, &ids, audience).await? {
        if let Some(&i) = file.task_id.as_ref().and_then(|t| index.get(t)) {
            visible_files.insert(file.id.0);
            tasks[i].attachments.push(file);
        }
    }
    let client = pool.get().await?;
    let messages = client
        .query(
            "SELECT task_id, id, author, text, at, file_id FROM task_messages \
             WHERE tenant = $1 AND task_id = ANY($2::uuid[]) ORDER BY position",
            &[&tenant.as_str(), &ids],
        )
        .await?;
    for row in &messages {
        let task_id: Uuid = row.get(0);
        let file_id: Option<Uuid> = row.get(5);
        let file_id = match audience {
            Audience::Staff => file_id,
            Audience::Customer(_) => file_id.filter(|id| visible_files.contains(id)),
        };
        if let Some(&i) = index.get(&task_id) {
            tasks[i].messages.push(MessageView {
                id: row.get(1),
                author: row.get(2),
                text: row.get(3),
                at: row.get(4),
                file_id,
            });
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
