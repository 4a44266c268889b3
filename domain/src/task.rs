//! The `Task` aggregate: a to-do a tenant gives a customer in the portal, with
//! a message thread. Files attach to a task by carrying its id (`task_id` on
//! `FileUploaded`); a message may carry a file, which is then an attachment
//! too (seeds: "Files sent this way appear in the message thread with the
//! message, and also as task attachments").
//!
//! Rules: a customer only ever touches its own tasks; another customer's or
//! another tenant's task answers `NotFound`, like an unknown one.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::types::{Actor, CustomerId, FileId, TenantId, ValidationError};

/// A task's title: trimmed, 1 to 200 characters, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct TaskTitle(String);

impl TaskTitle {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let title = raw.trim();
        if title.is_empty() {
            return Err(ValidationError::new("title", "must not be empty"));
        }
        if title.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "title",
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        if title.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "title",
                "must not contain control characters",
            ));
        }
        Ok(Self(title.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The text of a message in a task's thread: up to 10,000 characters; empty
/// only when the message carries a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MessageText(String);

impl MessageText {
    pub const MAX_CHARS: usize = 10_000;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let text = raw.trim();
        if text.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "text",
                format!("must be at most {} characters", Self::MAX_CHARS),
            ));
        }
        // Line breaks and tabs belong in messages; other control characters do not.
        if text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(ValidationError::new(
                "text",
                "must not contain control characters",
            ));
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TaskCommand {
    Create {
        tenant: TenantId,
        customer_id: CustomerId,
        title: TaskTitle,
        at: DateTime<Utc>,
    },
    /// A message in the thread. `as_customer` is set when a customer posts:
    /// it must be the task's own customer.
    PostMessage {
        tenant: TenantId,
        as_customer: Option<CustomerId>,
        message_id: Uuid,
        author: Actor,
        text: MessageText,
        file_id: Option<FileId>,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TaskEvent {
    TaskCreated {
        tenant: TenantId,
        customer_id: CustomerId,
        title: TaskTitle,
        created_at: DateTime<Utc>,
    },
    TaskMessagePosted {
        message_id: Uuid,
        author: Actor,
        text: MessageText,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file_id: Option<FileId>,
        at: DateTime<Utc>,
    },
}

impl TaskEvent {
    pub const CREATED: &'static str = "TaskCreated";
    pub const MESSAGE_POSTED: &'static str = "TaskMessagePosted";
}

impl DomainEvent for TaskEvent {
    fn event_type(&self) -> String {
        match self {
            Self::TaskCreated { .. } => Self::CREATED,
            Self::TaskMessagePosted { .. } => Self::MESSAGE_POSTED,
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// Unknown, another customer's, or another tenant's task.
    #[error("task not found")]
    NotFound,
    #[error("a task with this id already exists")]
    AlreadyExists,
    #[error("text: a message needs text or a file")]
    EmptyMessage,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TaskRecord {
    tenant: TenantId,
    customer_id: CustomerId,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Task {
    record: Option<TaskRecord>,
}

impl Task {
    /// The task's customer, if the task exists in `tenant`.
    pub fn customer_in(&self, tenant: &TenantId) -> Option<&CustomerId> {
        self.record
            .as_ref()
            .filter(|r| &r.tenant == tenant)
            .map(|r| &r.customer_id)
    }
}

impl Aggregate for Task {
    const TYPE: &'static str = "task";
    type Command = TaskCommand;
    type Event = TaskEvent;
    type Error = TaskError;
    type Services = ();

    async fn handle(
        &mut self,
        command: TaskCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), TaskError> {
        let event = match command {
            TaskCommand::Create {
                tenant,
                customer_id,
                title,
                at,
            } => {
                if self.record.is_some() {
                    return Err(TaskError::AlreadyExists);
                }
                TaskEvent::TaskCreated {
                    tenant,
                    customer_id,
                    title,
                    created_at: at,
                }
            }
            TaskCommand::PostMessage {
                tenant,
                as_customer,
                message_id,
                author,
                text,
                file_id,
                at,
            } => {
                let owner = self.customer_in(&tenant).ok_or(TaskError::NotFound)?;
                if as_customer.is_some_and(|customer| &customer != owner) {
                    return Err(TaskError::NotFound);
                }
                if text.is_empty() && file_id.is_none() {
                    return Err(TaskError::EmptyMessage);
                }
                TaskEvent::TaskMessagePosted {
                    message_id,
                    author,
                    text,
                    file_id,
                    at,
                }
            }
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: TaskEvent) {
        match event {
            TaskEvent::TaskCreated {
                tenant,
                customer_id,
                ..
            } => {
                self.record = Some(TaskRecord {
                    tenant,
                    customer_id,
                });
            }
            TaskEvent::TaskMessagePosted { .. } => {}
        }
    }
}
