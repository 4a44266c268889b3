//! The [`Projection`] trait: what a read model must say to be kept up to date by a
//! [`crate::Runner`] and rebuilt by [`crate::rebuild()`], and the optional
//! [`BulkBuild`] a projection offers to make its rebuild fast.

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::task::Poll;

use bytes::BytesMut;
use deadpool_postgres::StatementCache;
use dossier_domain::{codec, upcast};
use dossier_eventlog::log::LoggedEvent;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, DeserializeSeed, IntoDeserializer as _, MapAccess};
use serde_json::Value;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Client, Transaction};

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
/// - **Writes through [`ApplyTx::write`], and nothing else.** The live runner
///   queues them as statements prepared once per pooled connection and sends a
///   batch's together; a rebuild sends them unprepared (see [`ApplyTx`] for why).
///   A refusal ([`ProjectionError::Undecodable`], [`ProjectionError::Malformed`])
///   comes before the event's write, never after it.
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
        tx: &ApplyTx<'_>,
        event: &LoggedEvent,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;

    /// A fresh bulk build for the build-aside phase of a rebuild, or `None` (the
    /// default) to have the rebuild [`apply`](Projection::apply) every event one by
    /// one. See [`BulkBuild`] for what an implementation promises.
    fn bulk_build(&self) -> Option<impl BulkBuild> {
        None::<NoBulkBuild>
    }
}

/// The transaction a projection applies events in ([`Projection::apply`]), and
/// [`Self::write`], the only way a projection changes its tables.
///
/// In the live runner a batch sends the same few statements event after event.
/// There `write` prepares each statement once per pooled connection, in the
/// connection's statement cache (each one parsed and planned anew was a good
/// part of Postgres's work per command), and does not wait for it: the batch's
/// writes are queued, in order, and [`Self::flush`] sends them all at once and
/// then waits for their answers (a pipeline: one round trip for the batch
/// instead of one per event and read model; the round trips were what bounded
/// the runner, and with it every command's read-your-writes wait, see README
/// "Performance"). Postgres runs them in the order they were queued, so the
/// effect is that of running them one by one. That is why a projection has no
/// other way to the transaction: a read through it would not see the writes
/// still queued (none needs one: each event is at most one statement per read
/// model, whose answer nobody looks at).
///
/// A rebuild must not use that cache: it runs `apply` against tables built aside,
/// by putting their schema first on the `search_path` of its transaction, and a
/// statement prepared on a pooled connection names the tables it was prepared
/// against. A rebuild's `ApplyTx` therefore sends every statement unprepared
/// (`execute_typed`: parsed, planned and run in one round trip), resolved with
/// the `search_path` in force, at once.
pub struct ApplyTx<'a> {
    tx: &'a Transaction<'a>,
    /// The live runner's per-connection cache and its queue; `None` in a rebuild.
    pipeline: Option<Pipeline<'a>>,
}

/// The queued writes of a live runner's batch.
struct Pipeline<'a> {
    cache: &'a StatementCache,
    queued: Mutex<Vec<QueuedWrite<'a>>>,
}

/// A prepared statement with its parameters, not sent yet.
type QueuedWrite<'a> =
    Pin<Box<dyn Future<Output = Result<u64, tokio_postgres::Error>> + Send + 'a>>;

impl<'a> ApplyTx<'a> {
    /// Statements prepared once per connection, in `tx`'s statement cache, and
    /// sent together by [`Self::flush`]: for the live tables only.
    pub fn pipelined(tx: &'a deadpool_postgres::Transaction<'a>) -> Self {
        Self {
            tx,
            pipeline: Some(Pipeline {
                cache: &tx.statement_cache,
                queued: Mutex::new(Vec::new()),
            }),
        }
    }

    /// Every statement sent unprepared and at once, its tables resolved by the
    /// `search_path` of the moment: for a rebuild, and for tests.
    pub fn unprepared(tx: &'a Transaction<'a>) -> Self {
        Self { tx, pipeline: None }
    }

    /// One of the projection's statements with typed parameters: run now
    /// (unprepared), or queued for [`Self::flush`] (pipelined). A failure of a
    /// queued statement is the flush's.
    pub async fn write(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<(), tokio_postgres::Error> {
        let Some(pipeline) = &self.pipeline else {
            self.tx.execute_typed(sql, params).await?;
            return Ok(());
        };
        let types: Vec<Type> = params.iter().map(|(_, ty)| ty.clone()).collect();
        // A miss prepares now, a round trip; nothing queued has been sent yet,
        // so the order of the writes stays.
        let statement = pipeline
            .cache
            .prepare_typed(self.tx.client(), sql, &types)
            .await?;
        // The parameters borrow the projection's locals: encode them now.
        let params: Vec<Encoded> = params
            .iter()
            .map(|(value, ty)| Encoded::new(*value, ty))
            .collect();
        let tx = self.tx;
        pipeline.queue().push(Box::pin(async move {
            tx.execute_raw(&statement, &params).await
        }));
        Ok(())
    }

    /// Sends every queued write, in the order queued, then waits for all their
    /// answers; the first failure, if any (Postgres has then aborted the
    /// transaction, and the caller rolls it back). Nothing to do when unprepared.
    pub async fn flush(&self) -> Result<(), tokio_postgres::Error> {
        let Some(pipeline) = &self.pipeline else {
            return Ok(());
        };
        let writes = std::mem::take(&mut *pipeline.queue());
        let mut sent = Vec::with_capacity(writes.len());
        // The first poll of a write encodes and sends it and then waits for its
        // answer: polling each once, in order, sends them all in order.
        for mut write in writes {
            match futures::poll!(write.as_mut()) {
                Poll::Pending => sent.push(write),
                Poll::Ready(Ok(_)) => {}
                // Not sent (a parameter that does not encode): neither is the rest.
                Poll::Ready(Err(error)) => return Err(error),
            }
        }
        let mut first_error = None;
        for write in sent {
            if let Err(error) = write.await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl<'a> Pipeline<'a> {
    fn queue(&self) -> MutexGuard<'_, Vec<QueuedWrite<'a>>> {
        // Only ever held to push or take: nothing is left half done.
        self.queued.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A parameter already encoded for its type, owned, so that a queued write
/// outlives the projection's locals. A value that does not encode keeps the
/// reason and fails the write when it is sent, as it would have unqueued.
#[derive(Debug)]
struct Encoded(Result<Option<BytesMut>, String>);

impl Encoded {
    fn new(value: &(dyn ToSql + Sync), ty: &Type) -> Self {
        let mut bytes = BytesMut::new();
        Self(match value.to_sql_checked(ty, &mut bytes) {
            Ok(IsNull::No) => Ok(Some(bytes)),
            Ok(IsNull::Yes) => Ok(None),
            Err(error) => Err(error.to_string()),
        })
    }
}

impl ToSql for Encoded {
    fn to_sql(
        &self,
        _: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match &self.0 {
            Ok(Some(bytes)) => {
                out.extend_from_slice(bytes);
                Ok(IsNull::No)
            }
            Ok(None) => Ok(IsNull::Yes),
            Err(reason) => Err(reason.clone().into()),
        }
    }

    // Encoded for the type the statement was prepared with.
    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

/// The fast way to fill a projection's tables aside from the whole log, for the one
/// case where it is allowed: tables that start empty and a log that is replayed from
/// position 0 up to a head that no longer changes ([`crate::rebuild()`]'s first
/// phase). The events a rebuild finds after that head go through
/// [`Projection::apply`] as always.
///
/// Per-event `apply` costs a statement (a round trip, a parse, a plan, an index
/// lookup) per event; most of those statements touch a row that a later event
/// changes again. A bulk build instead *folds* the events into memory, keeping only
/// what each row ends up as, and *flushes* the result with `COPY ... FROM STDIN`
/// (about one row written per row that exists at the end, instead of one statement
/// per event). The rebuild reads the log for it with one `COPY ... TO STDOUT` and
/// hands over each event as it stands in the log ([`RawEvent`], borrowed, the payload
/// still JSON text), without building a [`LoggedEvent`] for it.
///
/// What an implementation promises:
///
/// - **The same tables as `apply`.** After the events up to the head are folded and
///   flushed, the tables hold exactly what applying each of those events with
///   [`Projection::apply`], in position order, to empty tables gives: every row,
///   every column (`last_position` included). Test it that way.
/// - **The same errors as `apply`.** An event of its aggregates that does not decode
///   is [`ProjectionError::Undecodable`] from [`fold`](BulkBuild::fold), a malformed
///   one [`ProjectionError::Malformed`]; the rebuild then fails and changes nothing
///   live.
/// - **Any number of flushes.** The rebuild flushes whenever a chunk of events is
///   folded (memory stays bounded by the chunk, not by the log) and once at the end.
///   A flush after the first finds the rows of earlier flushes in the tables and
///   continues from them.
/// - **Only the tables aside, in short transactions.** A flush writes only to
///   [`BulkTarget::table`] names (qualified: nothing relies on the `search_path`),
///   and commits at least every few tens of thousands of rows (a `COPY` on its own
///   commits as it ends): a long write transaction anywhere in the database holds
///   back the safe watermark of every log follower (`dossier_eventlog::log`), so the
///   live projections would lag behind until it ends.
/// - **No query indexes.** The rebuild drops the tables' indexes that are neither
///   unique nor a constraint's before the first flush and builds them again after the
///   last one (once over the whole table is cheaper than row by row); primary keys and
///   unique indexes stay, for the lookups and `ON CONFLICT` of a flush.
pub trait BulkBuild: Send {
    /// The aggregate types whose events change the tables. The rebuild folds only
    /// their events; it does not even fetch the payloads of the others.
    fn aggregate_types(&self) -> &'static [&'static str];

    /// Takes one event (of [`aggregate_types`](BulkBuild::aggregate_types), in
    /// position order) into memory.
    fn fold(&mut self, event: &RawEvent<'_>) -> Result<(), ProjectionError>;

    /// Writes what has been folded since the last flush to the tables aside, through
    /// `client` (outside any transaction: each statement commits on its own unless the
    /// flush opens one), and forgets it.
    fn flush(
        &mut self,
        client: &mut Client,
        target: &BulkTarget,
    ) -> impl Future<Output = Result<(), ProjectionError>> + Send;
}

/// The [`BulkBuild`] of a projection that has none; it cannot be made, so its
/// methods never run.
#[derive(Debug)]
pub enum NoBulkBuild {}

impl BulkBuild for NoBulkBuild {
    fn aggregate_types(&self) -> &'static [&'static str] {
        match *self {}
    }

    fn fold(&mut self, _: &RawEvent<'_>) -> Result<(), ProjectionError> {
        match *self {}
    }

    async fn flush(&mut self, _: &mut Client, _: &BulkTarget) -> Result<(), ProjectionError> {
        match *self {}
    }
}

/// Where a [`BulkBuild`] writes: the schema the rebuild builds the tables in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BulkTarget {
    schema: String,
}

impl BulkTarget {
    pub(crate) fn new(schema: impl Into<String>) -> Self {
        Self {
            schema: schema.into(),
        }
    }

    /// `table` (one of [`Projection::tables`]) in the rebuild's schema, quoted and
    /// qualified, ready to splice into SQL.
    pub fn table(&self, table: &str) -> String {
        format!(
            "{}.{}",
            quote_identifier(&self.schema),
            quote_identifier(table)
        )
    }
}

/// Quotes an SQL identifier. The names come from code constants and the catalog,
/// never from users; quoting keeps odd but legal schema names working.
pub(crate) fn quote_identifier(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

/// One event as a rebuild's bulk read hands it to [`BulkBuild::fold`]: the columns
/// a projection needs, borrowed from the `COPY` buffer, the payload as the JSON text
/// the log holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawEvent<'a> {
    /// Global log order.
    pub position: i64,
    /// The tenant of the log row.
    pub tenant: &'a str,
    /// The aggregate's type, e.g. `file`.
    pub aggregate_type: &'a str,
    /// The aggregate instance.
    pub aggregate_id: &'a str,
    /// The event's name, e.g. `FileUploaded`.
    pub event_type: &'a str,
    /// The version of the event's schema.
    pub event_version: &'a str,
    /// The stored payload, JSON text.
    pub payload: &'a str,
}

/// The aggregate id (a UUID) and the decoded domain event of `event`, for a
/// projection's `apply`: one place that reads the log's payload back
/// (`dossier_domain::codec`; the tagged shape cqrs-es alone would write reads
/// the same) and says which projection could not.
pub(crate) fn decode_event<E: DeserializeOwned>(
    projection: &'static str,
    event: &LoggedEvent,
) -> Result<(uuid::Uuid, E), ProjectionError> {
    let id = aggregate_uuid(
        projection,
        event.position,
        &event.aggregate_type,
        &event.aggregate_id,
    )?;
    Ok((id, decode_payload(projection, event)?))
}

/// The decoded domain event of `event`, whatever its aggregate id: for
/// aggregates whose id is not a UUID (a customer's is `{tenant}/{customer_id}`).
pub(crate) fn decode_payload<E: DeserializeOwned>(
    projection: &'static str,
    event: &LoggedEvent,
) -> Result<E, ProjectionError> {
    // `codec::decode` copies the payload once for the upcasters; borrowing the inner
    // object here saves the second copy `codec::unwrap_payload` (by value) would take.
    let payload = match &event.payload {
        Value::Object(map) if map.len() == 1 => match map.get(&event.event_type) {
            Some(inner) => Cow::Borrowed(inner),
            None => Cow::Borrowed(&event.payload),
        },
        Value::String(_) => Cow::Owned(codec::unwrap_payload(
            &event.event_type,
            event.payload.clone(),
        )),
        _ => Cow::Borrowed(&event.payload),
    };
    codec::decode(&event.event_type, &event.event_version, &payload).map_err(|source| {
        ProjectionError::Undecodable {
            projection,
            position: event.position,
            source: Box::new(source),
        }
    })
}

/// [`decode_event`] for a [`RawEvent`] of a bulk build: the same shapes, the same
/// upcasters, the same errors, from the JSON text.
///
/// A payload that no upcaster changes and that is not in the tagged shape (nearly
/// all of them) is deserialized straight from its text into the domain event, with
/// the event type as the enum's tag ([`TaggedText`]); everything else, and anything
/// that fails that way, goes the way of `codec::decode` (a [`Value`], unwrapped,
/// upcast, wrapped, deserialized), whose answer then counts. Straight from the text
/// is more than twice as fast: a [`Value`] allocates every key and every string and
/// frees them again, and in a rebuild that was most of the decoding time.
pub(crate) fn decode_raw<E: DeserializeOwned>(
    projection: &'static str,
    event: &RawEvent<'_>,
) -> Result<(uuid::Uuid, E), ProjectionError> {
    let id = aggregate_uuid(
        projection,
        event.position,
        event.aggregate_type,
        event.aggregate_id,
    )?;
    if upcast::upcaster(event.event_type, event.event_version).is_none()
        && !may_be_tagged(event.payload, event.event_type)
        && let Ok(decoded) = E::deserialize(MapAccessDeserializer::new(TaggedText {
            tag: Some(event.event_type),
            payload: event.payload,
        }))
    {
        return Ok((id, decoded));
    }
    let undecodable = |source: serde_json::Error| ProjectionError::Undecodable {
        projection,
        position: event.position,
        source: Box::new(codec::DecodeError {
            event_type: event.event_type.to_owned(),
            event_version: event.event_version.to_owned(),
            source,
        }),
    };
    // `codec::decode` without its copy of the payload (it takes a reference).
    let stored: Value = serde_json::from_str(event.payload).map_err(undecodable)?;
    let payload = codec::unwrap_payload(event.event_type, stored);
    let current = upcast::upcast(event.event_type, event.event_version, payload);
    let decoded = serde_json::from_value(codec::wrap_payload(event.event_type, current))
        .map_err(undecodable)?;
    Ok((id, decoded))
}

/// Whether `payload` may be in a shape `codec::unwrap_payload` unwraps: the bare
/// string `"T"`, or an object whose first key is `T` (the tagged shape is an object
/// with `T` as its only key). A key with an escape in it counts as a maybe. Anything
/// else is surely the plain shape.
fn may_be_tagged(payload: &str, event_type: &str) -> bool {
    let rest = payload.trim_start();
    let Some(rest) = rest.strip_prefix('{') else {
        return rest.starts_with('"');
    };
    let Some(key) = rest.trim_start().strip_prefix('"') else {
        return false;
    };
    match key.find(['"', '\\']) {
        Some(end) if key.as_bytes()[end] == b'"' => &key[..end] == event_type,
        _ => true,
    }
}

/// A payload's JSON text with its event type as the tag of an externally tagged
/// enum: to serde, the map `{tag: payload}` (the shape cqrs-es serializes events
/// in), without building it.
struct TaggedText<'a> {
    tag: Option<&'a str>,
    payload: &'a str,
}

impl<'de> MapAccess<'de> for TaggedText<'de> {
    type Error = serde_json::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        self.tag
            .take()
            .map(|tag| seed.deserialize(tag.into_deserializer()))
            .transpose()
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        let mut payload = serde_json::Deserializer::from_str(self.payload);
        let value = seed.deserialize(&mut payload)?;
        payload.end()?;
        Ok(value)
    }
}

fn aggregate_uuid(
    projection: &'static str,
    position: i64,
    aggregate_type: &str,
    aggregate_id: &str,
) -> Result<uuid::Uuid, ProjectionError> {
    uuid::Uuid::parse_str(aggregate_id).map_err(|_| ProjectionError::Malformed {
        projection,
        position,
        reason: format!("{aggregate_type} aggregate id {aggregate_id:?} is not a UUID"),
    })
}

/// Checks that a projection's name and tables can be spliced into SQL as identifiers
/// (they are code constants, never user input, but a rebuild builds DDL from them).
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

#[cfg(test)]
mod tests {
    use dossier_domain::FileEvent;
    use serde_json::json;

    use super::*;

    const ID: &str = "0193c1b2-0000-7000-8000-000000000001";

    fn logged(event_type: &str, event_version: &str, payload: &str) -> LoggedEvent {
        LoggedEvent {
            id: uuid::Uuid::nil(),
            position: 7,
            tenant: "acme".to_owned(),
            aggregate_type: "file".to_owned(),
            aggregate_id: ID.to_owned(),
            sequence: 1,
            event_type: event_type.to_owned(),
            event_version: event_version.to_owned(),
            at: chrono::Utc::now(),
            actor: "tester".to_owned(),
            payload: serde_json::from_str(payload).unwrap_or(Value::Null),
            metadata: Value::Null,
            erased: Vec::new(),
        }
    }

    fn raw<'a>(event_type: &'a str, event_version: &'a str, payload: &'a str) -> RawEvent<'a> {
        RawEvent {
            position: 7,
            tenant: "acme",
            aggregate_type: "file",
            aggregate_id: ID,
            event_type,
            event_version,
            payload,
        }
    }

    /// `decode_raw` of the text and `decode_event` of the same payload as a value
    /// agree: the same event, or both an error of the same kind.
    fn assert_same(event_type: &str, event_version: &str, payload: &str) -> Option<FileEvent> {
        let from_value: Result<(uuid::Uuid, FileEvent), _> =
            decode_event("files", &logged(event_type, event_version, payload));
        let from_text: Result<(uuid::Uuid, FileEvent), _> =
            decode_raw("files", &raw(event_type, event_version, payload));
        match (from_value, from_text) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a, b, "{payload}");
                Some(a.1)
            }
            (Err(a), Err(b)) => {
                assert_eq!(a.kind(), b.kind(), "{payload}: {a} / {b}");
                None
            }
            (a, b) => panic!("{payload}: from a value {a:?}, from the text {b:?}"),
        }
    }

    fn upload_v2() -> Value {
        json!({
            "tenant": "acme",
            "customer_id": "cust-1",
            "name": "Invoice",
            "file_name": "invoice.pdf",
            "content_type": "application/pdf",
            "size": 48213,
            "sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
            "blob_key": "acme/cust-1/x",
            "visibility": "internal",
            "origin": "staff_upload",
            "contract_id": "k-1",
            "task_id": null,
            "uploaded_at": "2025-11-30T10:15:00.123456Z"
        })
    }

    #[test]
    fn decoding_the_text_gives_what_decoding_the_value_gives() {
        let renamed = r#"{"from": "a", "name": "b \"quoted\" \u00e9"}"#;
        assert!(matches!(
            assert_same("FileRenamed", "1", renamed),
            Some(FileEvent::FileRenamed { .. })
        ));
        let upload = upload_v2().to_string();
        assert!(matches!(
            assert_same("FileUploaded", "2", &upload),
            Some(FileEvent::FileUploaded {
                contract_id: Some(_),
                ..
            })
        ));
        // Version 1 goes through its upcaster.
        let mut v1 = upload_v2();
        v1.as_object_mut().unwrap().remove("contract_id");
        v1.as_object_mut().unwrap().remove("task_id");
        assert!(matches!(
            assert_same("FileUploaded", "1", &v1.to_string()),
            Some(FileEvent::FileUploaded {
                contract_id: None,
                ..
            })
        ));
        // The tagged shape cqrs-es alone would write, with odd spacing too.
        let tagged = json!({"FileRenamed": {"from": "a", "name": "b"}}).to_string();
        assert!(assert_same("FileRenamed", "1", &tagged).is_some());
        assert!(
            assert_same(
                "FileRenamed",
                "1",
                r#" { "FileRenamed" : {"from": "a", "name": "b"}}"#
            )
            .is_some()
        );
        assert!(
            assert_same(
                "FileRenamed",
                "1",
                r#"{"File\u0052enamed": {"from": "a", "name": "b"}}"#
            )
            .is_some()
        );
        // What does not decode fails both ways.
        for bad in [
            r#"{"nonsense": true}"#,
            r#""FileRenamed""#,
            "[]",
            "{}",
            r#"{"from": "a", "name": 3}"#,
            r#"{"from": "a", "name": "b"} trailing"#,
            "not json",
        ] {
            assert!(assert_same("FileRenamed", "1", bad).is_none(), "{bad}");
        }
        assert!(assert_same("NoSuchEvent", "1", renamed).is_none());
    }

    #[test]
    fn undecodable_text_names_the_projection_position_and_event() {
        let error = decode_raw::<FileEvent>("files", &raw("FileRenamed", "1", "{}")).unwrap_err();
        match error {
            ProjectionError::Undecodable {
                projection,
                position,
                source,
            } => {
                assert_eq!((projection, position), ("files", 7));
                assert_eq!(source.event_type, "FileRenamed");
            }
            other => panic!("expected Undecodable, got {other:?}"),
        }
        let mut not_a_uuid = raw("FileRenamed", "1", "{}");
        not_a_uuid.aggregate_id = "x";
        assert!(matches!(
            decode_raw::<FileEvent>("files", &not_a_uuid),
            Err(ProjectionError::Malformed { position: 7, .. })
        ));
    }

    #[test]
    fn only_payloads_that_may_be_tagged_are_taken_for_tagged() {
        assert!(may_be_tagged(r#"{"T": {}}"#, "T"));
        assert!(may_be_tagged(r#"  {  "T":1}"#, "T"));
        assert!(may_be_tagged(r#""T""#, "T"));
        assert!(may_be_tagged(r#"{"\u0054": {}}"#, "T"));
        assert!(!may_be_tagged(r#"{"from": "T"}"#, "T"));
        assert!(!may_be_tagged(r#"{"Tx": {}}"#, "T"));
        assert!(!may_be_tagged("{}", "T"));
        assert!(!may_be_tagged("[1]", "T"));
    }
}
