//! The [`Projection`] trait: what a read model must say to be kept up to date by a
//! [`crate::Runner`] and rebuilt by [`crate::rebuild()`].

use std::future::Future;

use dossier_platform::log::LoggedEvent;
use tokio_postgres::Transaction;

use crate::error::ProjectionError;

/// One read model: how one logged event changes its tables.
///
/// Rules an implementation follows, because the framework relies on them:
///
/// - **Only the given transaction.** Effects go through `tx` and nothing else: the
///   runner commits them together with the checkpoint, which is what makes each event
///   take effect exactly once.
/// - **Idempotent per event.** Applying an event whose effect is already there
///   changes nothing (compare a row's last applied position with the event's). The
///   checkpoint already prevents double application; this is the second belt.
/// - **Unqualified table names, only those in [`Projection::tables`].** A rebuild
///   runs the same code against tables built aside in another schema, by putting that
///   schema first on the `search_path`.
/// - **Ignore what is not yours.** Every event of the log is offered, in position
///   order; events of other aggregates return `Ok(())`.
/// - **Never skip what you cannot read.** An event of your aggregate that does not
///   decode is [`ProjectionError::Undecodable`], which stops the projection.
pub trait Projection: Send + Sync + 'static {
    /// Stable name: the key of its row in `checkpoints`, the `projection` label of its
    /// metrics, and part of its rebuild schema's name. Lower-case ASCII letters, digits
    /// and `_`.
    fn name(&self) -> &'static str;

    /// The tables this projection owns and fills, unqualified. A rebuild builds each
    /// one aside (`CREATE TABLE ... (LIKE <table> INCLUDING ALL)`) and swaps them all
    /// in at once.
    fn tables(&self) -> &'static [&'static str];

    /// Applies one event inside `tx`.
    fn apply(
        &self,
        tx: &Transaction<'_>,
        event: &LoggedEvent,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// Checks that a projection's name and tables can be spliced into SQL as identifiers
/// (they are code constants, never user input, but a rebuild builds DDL from them).
/// The aggregate id (a UUID) and the decoded domain event of `event`, for a
/// projection's `apply`: one place that reads the log's payload back
/// (`dossier_domain::codec`; the tagged shape cqrs-es alone would write reads
/// the same) and says which projection could not.
pub(crate) fn decode_event<E: serde::de::DeserializeOwned>(
    projection: &'static str,
    event: &LoggedEvent,
) -> Result<(uuid::Uuid, E), ProjectionError> {
    let id =
        uuid::Uuid::parse_str(&event.aggregate_id).map_err(|_| ProjectionError::Malformed {
            projection,
            position: event.position,
            reason: format!(
                "{} aggregate id {:?} is not a UUID",
                event.aggregate_type, event.aggregate_id
            ),
        })?;
    let payload = dossier_domain::codec::unwrap_payload(&event.event_type, event.payload.clone());
    let decoded = dossier_domain::codec::decode(&event.event_type, &event.event_version, &payload)
        .map_err(|source| ProjectionError::Undecodable {
            projection,
            position: event.position,
            source: Box::new(source),
        })?;
    Ok((id, decoded))
}

pub(crate) fn validate<P: Projection>(projection: &P) -> Result<(), ProjectionError> {
    let plain = |s: &str| {
        !s.is_empty()
            && s.len() <= 40
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    if !plain(projection.name()) {
        return Err(ProjectionError::InvalidDefinition(format!(
            "name {:?} must be lower-case letters, digits and _",
            projection.name()
        )));
    }
    if projection.tables().is_empty() {
        return Err(ProjectionError::InvalidDefinition(format!(
            "projection {} owns no tables",
            projection.name()
        )));
    }
    if let Some(bad) = projection.tables().iter().find(|t| !plain(t)) {
        return Err(ProjectionError::InvalidDefinition(format!(
            "table {bad:?} of projection {} must be lower-case letters, digits and _",
            projection.name()
        )));
    }
    Ok(())
}
