//! The `Customer` aggregate: what is decided about a customer as a whole,
//! apart from its files and tasks. Today: its erasure (CONTRACT.md "Data
//! protection").
//!
//! A customer is not created by an event of its own: it exists upstream, and
//! its files and tasks name it. The aggregate records only erasures, each a
//! `CustomerErased` that lists the files the erasure deleted (each deleted
//! before, by its own `FileDeleted`, through the file command path) and how
//! many protected files it kept.
//!
//! Rules:
//! - an erasure needs explicit confirmation, like a delete ([`confirmed`]);
//! - every confirmed erasure is recorded, also a second one and one of a
//!   customer nothing is known of: a second erasure erases what was recorded
//!   for the customer since the first (files uploaded, tasks created), and the
//!   event is what destroys the customer's key that such later data was
//!   sealed with; an erasure of nothing is still the fact that it was asked
//!   for and done, for the audit trail;
//! - the aggregate id is `{tenant}/{customer_id}` ([`Customer::aggregate_id`]):
//!   customer ids are chosen upstream and two tenants may use the same one.

use chrono::{DateTime, Utc};
use cqrs_es::event_sink::EventSink;
use cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

use crate::types::{CustomerId, FileId, TenantId};

/// Erase everything of a customer that may be erased. The application layer
/// deletes the files first and names them here.
#[derive(Debug, Clone, PartialEq)]
pub struct EraseCustomer {
    pub tenant: TenantId,
    pub customer_id: CustomerId,
    pub confirmed: bool,
    /// The files this erasure deleted.
    pub erased_files: Vec<FileId>,
    /// The customer's protected files (origin `system`, `product`), kept.
    pub kept_protected_files: u64,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum CustomerCommand {
    Erase(EraseCustomer),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CustomerEvent {
    CustomerErased {
        tenant: TenantId,
        customer_id: CustomerId,
        erased_files: Vec<FileId>,
        kept_protected_files: u64,
        erased_at: DateTime<Utc>,
    },
}

impl CustomerEvent {
    pub const ERASED: &'static str = "CustomerErased";
}

impl DomainEvent for CustomerEvent {
    fn event_type(&self) -> String {
        match self {
            Self::CustomerErased { .. } => Self::ERASED,
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1".to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CustomerError {
    #[error("erasing a customer needs explicit confirmation (confirm=true)")]
    ConfirmationRequired,
    /// The command names another customer than the aggregate's id: a bug at the edge.
    #[error("the command names another customer than its aggregate")]
    WrongCustomer,
}

/// The one rule for an erasure's confirmation. The application checks it
/// before it deletes the first file, and the aggregate again when it records
/// the erasure.
pub fn confirmed(confirmed: bool) -> Result<(), CustomerError> {
    if confirmed {
        Ok(())
    } else {
        Err(CustomerError::ConfirmationRequired)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CustomerRecord {
    tenant: TenantId,
    customer_id: CustomerId,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Customer {
    record: Option<CustomerRecord>,
    erasures: u64,
}

impl Customer {
    /// The id of a customer's aggregate in the log: the tenant, `/`, the
    /// customer id (neither may contain `/`, so the pair is unambiguous).
    pub fn aggregate_id(tenant: &TenantId, customer_id: &CustomerId) -> String {
        format!("{tenant}/{customer_id}")
    }

    /// How many erasures were recorded.
    pub fn erasures(&self) -> u64 {
        self.erasures
    }
}

impl Aggregate for Customer {
    const TYPE: &'static str = "customer";
    type Command = CustomerCommand;
    type Event = CustomerEvent;
    type Error = CustomerError;
    type Services = ();

    async fn handle(
        &mut self,
        command: CustomerCommand,
        _: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), CustomerError> {
        let CustomerCommand::Erase(erase) = command;
        if self
            .record
            .as_ref()
            .is_some_and(|r| r.tenant != erase.tenant || r.customer_id != erase.customer_id)
        {
            return Err(CustomerError::WrongCustomer);
        }
        confirmed(erase.confirmed)?;
        sink.write(
            CustomerEvent::CustomerErased {
                tenant: erase.tenant,
                customer_id: erase.customer_id,
                erased_files: erase.erased_files,
                kept_protected_files: erase.kept_protected_files,
                erased_at: erase.at,
            },
            self,
        )
        .await;
        Ok(())
    }

    fn apply(&mut self, event: CustomerEvent) {
        let CustomerEvent::CustomerErased {
            tenant,
            customer_id,
            ..
        } = event;
        self.record = Some(CustomerRecord {
            tenant,
            customer_id,
        });
        self.erasures += 1;
    }
}
