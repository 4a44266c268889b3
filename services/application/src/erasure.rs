//! Erasing a customer (CONTRACT.md "Data protection"): every file of the
//! customer that is not protected is deleted, each by its own `FileDeleted`
//! through the file command path (which is what has the blob worker purge its
//! bytes and the event store destroy its key), and then the customer's
//! `CustomerErased` is recorded with the files it erased and the number of
//! protected files it kept (which destroys the customer's key and empties the
//! read models of the customer).
//!
//! Safe to run again, also after a crash in the middle: what was deleted is
//! gone from the files read model and is not listed again, and the idempotency
//! key of the command (an AMQP `message_id`) goes with `CustomerErased` only,
//! the last event, so a run that did not get that far has left no receipt and
//! the redelivery finishes the work. A retried run counts what it erased
//! itself; the files an interrupted run deleted have their own `FileDeleted`
//! events (and audit entries) with the same actor.
//!
//! What an erasure sees: the files recorded for the customer before it began.
//! It first waits until the read models show every event of the tenant
//! recorded so far, so that a file uploaded just before is not missed; if they
//! lag past the freshness timeout, it refuses before deleting anything. A file
//! uploaded while it runs is not erased (a second erasure erases it).

use chrono::Utc;
use dossier_domain::{
    Customer, CustomerCommand, CustomerId, EraseCustomer, FileCommand, FileId, erasure_confirmed,
};
use dossier_projections::files;

use crate::commands::{Accepted, CommandContext, Commands};
use crate::error::AppError;

/// What an erasure did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Erasure {
    /// The files this erasure deleted.
    pub erased_files: Vec<FileId>,
    /// The customer's protected files, kept.
    pub kept_protected_files: u64,
    /// Where `CustomerErased` is in the log.
    pub accepted: Accepted,
}

impl Commands {
    /// Erases `customer` of `ctx.tenant` (see the module header). `confirmed`
    /// is the request's `confirm`: without it nothing happens and the answer
    /// is [`AppError::ConfirmationRequired`]. Waits until the read models show
    /// the erasure, like every command a person is answered.
    #[tracing::instrument(skip(self, ctx), fields(tenant = %ctx.tenant, customer_id = %customer))]
    pub async fn erase_customer(
        &self,
        ctx: &CommandContext,
        customer: &CustomerId,
        confirmed: bool,
    ) -> Result<Erasure, AppError> {
        erasure_confirmed(confirmed)?;
        let tenant = &ctx.tenant;
        let head = self
            .store()
            .tenant_head(tenant.as_str())
            .await
            .map_err(|e| AppError::Unavailable(e.to_string()))?;
        if let Some(head) = head
            && !self.await_read_models(head).await
        {
            return Err(AppError::Unavailable(format!(
                "the read models had not reached position {head} of the log; nothing was erased"
            )));
        }
        let live = files::of_customer(self.store().pool(), tenant, customer)
            .await
            .map_err(|e| AppError::Unavailable(e.to_string()))?;

        // The file deletes carry no idempotency key: the erasure's key is
        // recorded with its last event, `CustomerErased`.
        let files_ctx = CommandContext {
            idempotency_key: None,
            command_id: None,
            ..ctx.clone()
        };
        let mut erased_files = Vec::new();
        let mut kept_protected_files = 0u64;
        for file in live {
            if file.protected {
                kept_protected_files += 1;
                continue;
            }
            let delete = FileCommand::Delete {
                tenant: tenant.clone(),
                confirmed: true,
                at: Utc::now(),
            };
            match self.file_no_wait(&files_ctx, file.id, delete).await {
                Ok(_) => erased_files.push(file.id),
                // Deleted since it was listed (by someone else, or by an
                // earlier run whose answer was lost): gone all the same.
                Err(AppError::NotFound) => {}
                // The read model and the aggregate agree on origin, which
                // never changes; should they not, the file is kept.
                Err(AppError::FileProtected) => kept_protected_files += 1,
                // Files were deleted already: the caller must not read
                // "nothing was recorded". Running the erasure again finishes it.
                Err(AppError::Unavailable(detail)) if !erased_files.is_empty() => {
                    return Err(AppError::OutcomeUnknown(format!(
                        "erasure stopped after deleting {} files: {detail}",
                        erased_files.len()
                    )));
                }
                Err(error) => return Err(error),
            }
        }

        let command = CustomerCommand::Erase(EraseCustomer {
            tenant: tenant.clone(),
            customer_id: customer.clone(),
            confirmed,
            erased_files: erased_files.clone(),
            kept_protected_files,
            at: Utc::now(),
        });
        let aggregate_id = Customer::aggregate_id(tenant, customer);
        let accepted = self
            .run::<Customer>(ctx, &aggregate_id, command, ())
            .await?;
        tracing::info!(
            erased_files = erased_files.len(),
            kept_protected_files,
            position = accepted.position,
            "a customer was erased"
        );
        Ok(Erasure {
            erased_files,
            kept_protected_files,
            accepted,
        })
    }
}
