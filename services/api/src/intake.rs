//! The AMQP command intake: upstream systems send the same commands as the
//! HTTP API, as messages on `dossier.commands` (CONTRACT.md "AMQP: commands
//! from upstream systems").
//!
//! For each message: the envelope (`message_id`, header `tenant`) is checked;
//! a message that cannot be read at all is dead-lettered with a reason header.
//! A message whose `(tenant, message_id)` has a receipt is answered with that
//! receipt again (its effect happened once already). Otherwise the command
//! runs through the same command path as HTTP; its receipt is written in the
//! same transaction as its events. The reply (if `reply_to` is set) is
//! published with a broker confirm, and only then is the message acked.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use cqrs_es::Aggregate;
use dossier_application::{Accepted, AppError, CommandContext, Commands, Recording, Uploads};
use dossier_blobstore::ByteStream;
use dossier_broker::{self, Broker, ConfirmedPublisher, INTAKE_QUEUE, Incoming, Outcome};
use dossier_domain::{
    Actor, BlobKey, ContentType, ContractId, Customer, CustomerId, DisplayName, File, FileCommand,
    FileId, FileName, Origin, Task, TaskCommand, TaskTitle, TenantId, Visibility,
};
use dossier_eventlog::db::Pool;
use dossier_eventlog::receipts::{self, Receipt};
use lapin::BasicProperties;
use lapin::types::ShortString;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use tokio::sync::{Mutex, watch};
use uuid::Uuid;

/// Messages handled at once (and prefetched) by one intake.
const PREFETCH: u16 = 16;

/// The actor of a message without an `actor` header.
const DEFAULT_ACTOR: &str = "upstream";

/// Why a message could not be taken at all: it goes to the dead-letter queue.
#[derive(Debug, thiserror::Error)]
enum Poison {
    #[error("the message has no message_id (the idempotency key)")]
    NoMessageId,
    #[error("the message has no tenant header")]
    NoTenant,
    #[error("the tenant header is malformed: {0}")]
    BadTenant(String),
    #[error("unknown routing key {0:?}")]
    UnknownCommand(String),
    #[error("the body is not JSON: {0}")]
    NotJson(String),
}

/// What the intake needs: the command path, the upload path and a publisher.
pub struct Intake {
    pool: Pool,
    uploads: Arc<Uploads>,
    commands: Arc<Commands>,
    broker: Broker,
    max_file_bytes: u64,
    publisher: Mutex<Option<ConfirmedPublisher>>,
    shutdown: watch::Receiver<bool>,
}

impl Intake {
    pub fn new(
        pool: Pool,
        uploads: Arc<Uploads>,
        commands: Arc<Commands>,
        broker: Broker,
        max_file_bytes: u64,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Self> {
        Arc::new(Self {
            pool,
            uploads,
            commands,
            broker,
            max_file_bytes,
            publisher: Mutex::new(None),
            shutdown,
        })
    }

    /// Consumes `dossier.intake` until shutdown.
    pub async fn run(self: Arc<Self>) -> Result<(), dossier_broker::AmqpError> {
        let broker = self.broker.clone();
        let shutdown = self.shutdown.clone();
        dossier_broker::consume(
            &broker,
            INTAKE_QUEUE,
            PREFETCH,
            move |message| {
                let intake = self.clone();
                async move { intake.handle(message).await }
            },
            shutdown,
        )
        .await
    }

    #[tracing::instrument(skip_all, fields(routing_key = %message.routing_key, message_id = message.message_id().unwrap_or("-")))]
    async fn handle(&self, mut message: Incoming) -> Outcome {
        let envelope = match Envelope::read(&message) {
            Ok(envelope) => envelope,
            Err(poison) => return Self::dead_letter(&poison),
        };
        let receipt =
            match receipts::find(&self.pool, envelope.tenant.as_str(), &envelope.key).await {
                Ok(Some(receipt)) => {
                    metrics::counter!("dossier_intake_duplicates_total").increment(1);
                    receipt
                }
                Ok(None) => match self.execute(&envelope, &mut message).await {
                    Ok(receipt) => receipt,
                    Err(Failure::Poison(poison)) => return Self::dead_letter(&poison),
                    Err(Failure::Transient(detail)) => return self.retry_later(&detail).await,
                },
                Err(error) => return self.retry_later(&error.to_string()).await,
            };
        metrics::counter!("dossier_intake_commands_total", "routing_key" => message.routing_key.clone(), "status" => receipt_status(&receipt))
            .increment(1);
        match self.reply(&message, &receipt).await {
            Ok(()) => Outcome::Ack,
            // The receipt stands: the redelivery answers it again.
            Err(error) => {
                self.retry_later(&format!("publishing the reply: {error}"))
                    .await
            }
        }
    }

    /// Runs the command and answers its receipt (the one that stands, if a
    /// concurrent delivery of the same message won). An upload takes the
    /// message's body (the broker still has it for a redelivery).
    async fn execute(
        &self,
        envelope: &Envelope,
        message: &mut Incoming,
    ) -> Result<Receipt, Failure> {
        let ctx = envelope.context();
        // A body or field that is malformed is answered as `validation_failed`.
        macro_rules! parse {
            ($value:expr) => {
                match $value {
                    Ok(value) => value,
                    Err(error) => {
                        return self
                            .settle(envelope, Ran::Refused(AppError::from(error)))
                            .await
                    }
                }
            };
        }
        let ran = match message.routing_key.as_str() {
            "file.upload" => self.upload(&ctx, message).await?,
            "file.rename" => {
                let body: Rename = parse!(json_body(&message.body)?);
                let command = FileCommand::Rename {
                    tenant: ctx.tenant.clone(),
                    name: parse!(DisplayName::parse(&body.name)),
                };
                self.file_command(&ctx, &body.file_id, command).await
            }
            "file.change_visibility" => {
                let body: ChangeVisibility = parse!(json_body(&message.body)?);
                let command = FileCommand::ChangeVisibility {
                    tenant: ctx.tenant.clone(),
                    visibility: parse!(Visibility::parse(&body.visibility)),
                };
                self.file_command(&ctx, &body.file_id, command).await
            }
            "file.mark_viewed" => {
                let body: MarkViewed = parse!(json_body(&message.body)?);
                let command = FileCommand::MarkViewed {
                    tenant: ctx.tenant.clone(),
                    viewer: parse!(CustomerId::parse(&body.customer_id)),
                    at: body.viewed_at.unwrap_or_else(Utc::now),
                };
                self.file_command(&ctx, &body.file_id, command).await
            }
            "file.mark_signed" => {
                let body: MarkSigned = parse!(json_body(&message.body)?);
                let command = FileCommand::MarkSigned {
                    tenant: ctx.tenant.clone(),
                    signed_at: body.signed_at.unwrap_or_else(Utc::now),
                };
                self.file_command(&ctx, &body.file_id, command).await
            }
            "file.delete" => {
                let body: Delete = parse!(json_body(&message.body)?);
                let command = FileCommand::Delete {
                    tenant: ctx.tenant.clone(),
                    confirmed: body.confirm,
                    at: Utc::now(),
                };
                self.file_command(&ctx, &body.file_id, command).await
            }
            "task.create" => {
                let body: CreateTask = parse!(json_body(&message.body)?);
                let command = TaskCommand::Create {
                    tenant: ctx.tenant.clone(),
                    customer_id: parse!(CustomerId::parse(&body.customer_id)),
                    title: parse!(TaskTitle::parse(&body.title)),
                    at: Utc::now(),
                };
                let task_id = Uuid::now_v7().to_string();
                let outcome = self.commands.run::<Task>(&ctx, &task_id, command, ()).await;
                Ran::from_command(Task::TYPE, task_id, outcome)
            }
            "customer.erase" => {
                let body: EraseCustomer = parse!(json_body(&message.body)?);
                let customer = parse!(CustomerId::parse(&body.customer_id));
                let outcome = self
                    .commands
                    .erase_customer(&ctx, &customer, body.confirm)
                    .await
                    .map(|erasure| erasure.accepted);
                let aggregate_id = Customer::aggregate_id(&ctx.tenant, &customer);
                Ran::from_command(Customer::TYPE, aggregate_id, outcome)
            }
            other => return Err(Failure::Poison(Poison::UnknownCommand(other.to_owned()))),
        };
        self.settle(envelope, ran).await
    }

    /// `file.upload`: the body is the file; the headers are the form. The
    /// bytes and the command go the one upload path, which also decides what
    /// becomes of the blob if the command fails.
    async fn upload(&self, ctx: &CommandContext, message: &mut Incoming) -> Result<Ran, Failure> {
        let form = match UploadHeaders::read(message) {
            Ok(form) => form,
            Err(error) => return Ok(Ran::Refused(error)),
        };
        if message.body.len() as u64 > self.max_file_bytes {
            // Refused before anything is stored.
            return Ok(Ran::Refused(AppError::FileTooLarge {
                limit: self.max_file_bytes,
            }));
        }
        let file_id = FileId::new();
        let key = BlobKey::for_file(&ctx.tenant, &form.customer_id, file_id);
        // The body moves into one chunk without a copy; the S3 store slices
        // its parts out of it.
        let chunk = std::mem::take(&mut message.body);
        let length = chunk.len() as u64;
        let body: ByteStream = Box::pin(futures::stream::once(async move { Ok(chunk) }));
        let stored = match self
            .uploads
            .store(
                key,
                form.file_name,
                form.content_type,
                body,
                self.max_file_bytes,
                Some(length),
            )
            .await
        {
            Ok(stored) => stored,
            Err(error) => return Ok(Ran::Refused(error)),
        };
        let recording = Recording {
            tenant: ctx.tenant.clone(),
            file_id,
            customer_id: form.customer_id,
            name: form.name,
            visibility: form.visibility,
            origin: form.origin,
            contract_id: form.contract_id,
            task_id: None,
        };
        let outcome = self
            .uploads
            .record(ctx, stored, recording)
            .await
            .map(|recorded| Accepted {
                position: recorded.position,
            });
        Ok(Ran::from_command(File::TYPE, file_id.to_string(), outcome))
    }

    async fn file_command(&self, ctx: &CommandContext, raw_id: &str, command: FileCommand) -> Ran {
        // An id that is not a UUID names no file.
        let Ok(file_id) = FileId::parse(raw_id) else {
            return Ran::Refused(AppError::NotFound);
        };
        let outcome = self.commands.file(ctx, file_id, command).await;
        Ran::from_command(File::TYPE, file_id.to_string(), outcome)
    }

    /// Turns what a command did into the receipt that stands.
    async fn settle(&self, envelope: &Envelope, ran: Ran) -> Result<Receipt, Failure> {
        let receipt = match ran {
            // With events, the receipt is already there (written in the same
            // transaction); a command that changed nothing gets one now.
            Ran::Accepted {
                aggregate_type,
                aggregate_id,
                position,
            } => Receipt::Accepted {
                aggregate_type: aggregate_type.to_owned(),
                aggregate_id,
                position,
            },
            // A concurrent delivery of the same message won: its receipt stands.
            Ran::Duplicate => {
                return match receipts::find(&self.pool, envelope.tenant.as_str(), &envelope.key)
                    .await
                {
                    Ok(Some(receipt)) => Ok(receipt),
                    Ok(None) => Err(Failure::Transient(
                        "a duplicate's receipt is not visible yet".into(),
                    )),
                    Err(error) => Err(Failure::Transient(error.to_string())),
                };
            }
            // A backing service failed (the command may or may not have been
            // recorded): the message goes back to the queue, and its
            // redelivery finds the receipt if it was.
            Ran::Refused(error) if error.is_transient() => {
                return Err(Failure::Transient(
                    error.detail().unwrap_or_default().to_owned(),
                ));
            }
            Ran::Refused(error) => Receipt::Rejected {
                code: error.code().to_owned(),
                message: error.to_string(),
            },
        };
        self.record(envelope, &receipt).await
    }

    async fn record(&self, envelope: &Envelope, receipt: &Receipt) -> Result<Receipt, Failure> {
        receipts::record(&self.pool, envelope.tenant.as_str(), &envelope.key, receipt)
            .await
            .map_err(|error| Failure::Transient(error.to_string()))
    }

    /// Publishes the receipt's reply to `reply_to`, if the message asked for one.
    async fn reply(
        &self,
        message: &Incoming,
        receipt: &Receipt,
    ) -> Result<(), dossier_broker::AmqpError> {
        let Some(reply_to) = message.properties.reply_to().as_ref() else {
            return Ok(());
        };
        let mut properties = BasicProperties::default()
            .with_content_type(ShortString::from(dossier_broker::JSON_CONTENT_TYPE))
            .with_delivery_mode(dossier_broker::PERSISTENT);
        if let Some(correlation_id) = message.properties.correlation_id() {
            properties = properties.with_correlation_id(correlation_id.clone());
        }
        if let Some(message_id) = message.message_id() {
            properties = properties.with_message_id(ShortString::from(message_id));
        }
        let body = serde_json::to_vec(&receipt.reply()).unwrap_or_default();
        self.publish("", reply_to.as_str(), properties, &body).await
    }

    /// Dead-letters the message with the poison as its reason (the broker's
    /// consumer copies it, confirmed, into `dossier.commands.dead`): exactly
    /// once, with a reason an operator can read, never redelivered.
    fn dead_letter(poison: &Poison) -> Outcome {
        tracing::warn!(reason = %poison, "dead-lettering a command message that cannot be handled");
        metrics::counter!("dossier_intake_dead_lettered_total").increment(1);
        Outcome::DeadLetter {
            reason: poison.to_string(),
        }
    }

    async fn retry_later(&self, detail: &str) -> Outcome {
        tracing::warn!(
            detail,
            "a command could not be handled now; it goes back to the queue"
        );
        metrics::counter!("dossier_intake_retries_total").increment(1);
        let mut shutdown = self.shutdown.clone();
        dossier_runtime::shutdown::sleep_or_stop(
            std::time::Duration::from_millis(500),
            &mut shutdown,
        )
        .await;
        Outcome::Retry
    }

    /// Publishes with a confirm on the shared channel, opening a new one after a failure.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
    ) -> Result<(), dossier_broker::AmqpError> {
        let mut slot = self.publisher.lock().await;
        let publisher = match slot.take() {
            Some(publisher) if publisher.is_open() => publisher,
            _ => ConfirmedPublisher::open(&self.broker, &self.shutdown).await?,
        };
        let published = publisher
            .publish(exchange, routing_key, properties, body)
            .await;
        match &published {
            Ok(()) => *slot = Some(publisher),
            // A confirm that never came means a connection that looks alive but
            // is not: rebuild it. Other errors only cost this channel.
            Err(dossier_broker::AmqpError::ConfirmTimeout(_)) => {
                self.broker.invalidate(publisher.connection())
            }
            Err(_) => {}
        }
        published
    }
}

fn receipt_status(receipt: &Receipt) -> &'static str {
    match receipt {
        Receipt::Accepted { .. } => "accepted",
        Receipt::Rejected { .. } => "rejected",
    }
}

/// What running a command came to, before its receipt.
enum Ran {
    Accepted {
        aggregate_type: &'static str,
        aggregate_id: String,
        position: i64,
    },
    Refused(AppError),
    Duplicate,
}

impl Ran {
    fn from_command(
        aggregate_type: &'static str,
        aggregate_id: String,
        outcome: Result<Accepted, AppError>,
    ) -> Self {
        match outcome {
            Ok(accepted) => Self::Accepted {
                aggregate_type,
                aggregate_id,
                position: accepted.position,
            },
            Err(AppError::Duplicate) => Self::Duplicate,
            Err(error) => Self::Refused(error),
        }
    }
}

/// Why a message was not settled with a receipt.
enum Failure {
    Poison(Poison),
    Transient(String),
}

/// The parts of every command message: who, for which tenant, under which key.
struct Envelope {
    tenant: TenantId,
    key: String,
    actor: Actor,
    correlation_id: Option<String>,
}

impl Envelope {
    fn read(message: &Incoming) -> Result<Self, Poison> {
        let key = message
            .message_id()
            .filter(|id| !id.trim().is_empty())
            .ok_or(Poison::NoMessageId)?
            .to_owned();
        let tenant = message
            .header_str(dossier_broker::HEADER_TENANT)
            .ok_or(Poison::NoTenant)?;
        let tenant = TenantId::parse(&tenant).map_err(|e| Poison::BadTenant(e.to_string()))?;
        let actor = message
            .header_str(dossier_broker::HEADER_ACTOR)
            .filter(|a| !a.trim().is_empty())
            .unwrap_or_else(|| DEFAULT_ACTOR.to_owned());
        let correlation_id = message
            .properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().to_owned());
        Ok(Self {
            tenant,
            key,
            actor: Actor::new(actor),
            correlation_id,
        })
    }

    fn context(&self) -> CommandContext {
        let ctx = CommandContext::new(self.tenant.clone(), self.actor.clone())
            .with_idempotency_key(self.key.clone());
        match &self.correlation_id {
            Some(correlation_id) => ctx.with_correlation_id(correlation_id.clone()),
            None => ctx,
        }
    }
}

/// A JSON body: unreadable JSON is poison (dead-lettered); well-formed JSON
/// with a missing or malformed field is a `validation_failed` answer.
fn json_body<T: DeserializeOwned>(body: &[u8]) -> Result<Result<T, AppError>, Failure> {
    match serde_json::from_slice::<T>(body) {
        Ok(value) => Ok(Ok(value)),
        Err(error) if error.classify() == serde_json::error::Category::Data => {
            Ok(Err(AppError::validation("body", error.to_string())))
        }
        Err(error) => Err(Failure::Poison(Poison::NotJson(error.to_string()))),
    }
}

#[derive(Deserialize)]
struct CreateTask {
    customer_id: String,
    title: String,
}

/// `customer.erase`: the same rules as `POST /v1/customers/{customer_id}/erasure`.
#[derive(Deserialize)]
struct EraseCustomer {
    customer_id: String,
    #[serde(default)]
    confirm: bool,
}

#[derive(Deserialize)]
struct Rename {
    file_id: String,
    name: String,
}

#[derive(Deserialize)]
struct ChangeVisibility {
    file_id: String,
    visibility: String,
}

#[derive(Deserialize)]
struct MarkViewed {
    file_id: String,
    customer_id: String,
    viewed_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct MarkSigned {
    file_id: String,
    signed_at: Option<DateTime<Utc>>,
}

#[derive(Deserialize)]
struct Delete {
    file_id: String,
    #[serde(default)]
    confirm: bool,
}

/// The headers of a `file.upload`, parsed into domain types.
struct UploadHeaders {
    customer_id: CustomerId,
    name: DisplayName,
    file_name: FileName,
    content_type: ContentType,
    visibility: Visibility,
    origin: Origin,
    contract_id: Option<ContractId>,
}

impl UploadHeaders {
    fn read(message: &Incoming) -> Result<Self, AppError> {
        let required = |name: &'static str| {
            message
                .header_str(name)
                .ok_or_else(|| AppError::validation(name, "header is required"))
        };
        Ok(Self {
            customer_id: CustomerId::parse(&required("customer_id")?)?,
            name: DisplayName::parse(&required("name")?)?,
            file_name: FileName::parse(&required("file_name")?)?,
            content_type: ContentType::parse(message.header_str("content_type").as_deref())?,
            visibility: message
                .header_str("visibility")
                .map(|v| Visibility::parse(&v))
                .transpose()?
                .unwrap_or_default(),
            origin: message
                .header_str("origin")
                .map(|o| Origin::parse(&o))
                .transpose()?
                .unwrap_or_default(),
            contract_id: message
                .header_str("contract_id")
                .filter(|c| !c.is_empty())
                .map(|c| ContractId::parse(&c))
                .transpose()?,
        })
    }
}
